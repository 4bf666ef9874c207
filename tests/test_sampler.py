"""The DDIM sampler generator: events, presegmentation, seeding, fusion numbers checked by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from napari_spinesegdiff.model.diffusion import CosineSchedule
from napari_spinesegdiff.model.network import SpineSegDiffNet
from napari_spinesegdiff.model.sampler import (
    SampleResult,
    StepEvent,
    run_sampler,
    sample,
    step_uncertainty,
    step_weights,
)

torch.set_num_threads(1)
SCHED = CosineSchedule(1000)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def u_of(p: float) -> float:
    p = max(p, 1e-4)
    return -p * math.log(p)


class FakeNet(nn.Module):
    """Logits = fn(x_t, t); records every call (timesteps and inputs)."""

    def __init__(self, fn, num_classes: int = 3) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_classes=num_classes)
        self.fn = fn
        self.calls: list[tuple[list[int], torch.Tensor]] = []
        self.encodes = 0

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        self.encodes += 1
        return [image.clone()]

    def forward(self, x_t, t, image, embeddings=None):
        assert embeddings is not None and embeddings[0].shape[0] == x_t.shape[0]
        self.calls.append((t.tolist(), x_t.clone()))
        return self.fn(x_t, t)


def time_logits(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(t - 500)/100 everywhere: m_k is known by hand for every step."""
    return ((t.float() - 500.0) / 100.0).view(-1, 1, 1, 1).expand_as(x_t).clone()


@pytest.fixture(scope="module")
def tiny() -> SpineSegDiffNet:
    torch.manual_seed(0)
    return SpineSegDiffNet("tiny").eval()


def test_step_weights_by_hand() -> None:
    assert step_weights(4) == pytest.approx([math.exp(-2 * 3 / 4), math.exp(-2 * 2 / 4), math.exp(-2 * 1 / 4), 1.0])
    assert step_weights(1) == [1.0]
    assert step_weights(5) == pytest.approx([math.exp(-2 * (5 - j) / 5) for j in range(1, 6)])
    with pytest.raises(ValueError):
        step_weights(0)


def test_uncertainty_formula_on_known_p() -> None:
    p = torch.tensor([0.0, 0.5, 1 / math.e, 1.0, 0.9])
    expected = torch.tensor([-1e-4 * math.log(1e-4), 0.5 * math.log(2), 1 / math.e, 0.0, -0.9 * math.log(0.9)])
    assert torch.allclose(step_uncertainty(p), expected, atol=1e-7)


def test_t_start_zero_returns_prior_without_work() -> None:
    net = FakeNet(time_logits)
    prior = torch.zeros(1, 3, 6, 5)
    prior[0, 1, 2:4, 1:3] = 1.0
    prior[0, 2, 0, 0] = 0.7
    gen = sample(net, torch.zeros(1, 1, 6, 5), schedule=SCHED, prior=prior, t_start=0, steps=10)
    events = []
    res = run_sampler(gen, events.append)
    assert events == [] and net.calls == [] and res.steps_run == 0 and res.timesteps == []
    assert torch.equal(res.probabilities, prior)
    assert torch.equal(res.uncertainty, torch.zeros_like(prior))
    assert torch.equal(res.mask, prior > 0.5)


def test_exactly_steps_events_and_close_stops_work() -> None:
    net = FakeNet(time_logits)
    image = torch.zeros(2, 1, 4, 4)
    gen = sample(net, image, schedule=SCHED, steps=6, ensemble=3)
    events = []
    res = run_sampler(gen, events.append)
    assert [e.index for e in events] == [1, 2, 3, 4, 5, 6] and all(e.total == 6 for e in events)
    assert len(net.calls) == 6 and net.encodes == 1
    assert all(len(t) == 2 * 3 for t, _ in net.calls)  # B * S samples in one batch
    assert isinstance(res, SampleResult) and res.steps_run == 6

    net2 = FakeNet(time_logits)
    gen2 = sample(net2, image, schedule=SCHED, steps=6, ensemble=3)
    first = next(gen2)
    next(gen2)
    assert isinstance(first, StepEvent) and first.probabilities.shape == (2, 3, 4, 4)
    gen2.close()
    assert len(net2.calls) == 2
    with pytest.raises(StopIteration):
        next(gen2)
    assert len(net2.calls) == 2


def test_grad_mode_untouched_between_steps() -> None:
    gen = sample(FakeNet(time_logits), torch.zeros(1, 1, 3, 3), schedule=SCHED, steps=3, ensemble=1)
    next(gen)
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
    gen.close()


def test_step_uncertainty_fusion_by_hand() -> None:
    net = FakeNet(time_logits)
    events = []
    res = run_sampler(sample(net, torch.zeros(1, 1, 2, 3), schedule=SCHED, steps=4, ensemble=2), events.append)
    ts = [999, 666, 333, 0]
    assert res.timesteps == ts and [t[0] for t, _ in net.calls] == ts
    m = [(t - 500) / 100 for t in ts]  # 4.99, 1.66, -1.67, -5.0
    w = [math.exp(-2 * 3 / 4), math.exp(-2 * 2 / 4), math.exp(-2 * 1 / 4), 1.0]
    fused = sum(wi * mi for wi, mi in zip(w, m)) / sum(w)
    assert torch.allclose(res.logits, torch.full_like(res.logits, fused), atol=1e-5)
    assert torch.allclose(res.probabilities, torch.full_like(res.logits, sig(fused)), atol=1e-6)
    assert bool(res.mask.all()) == (fused > 0) and res.mask.dtype == torch.bool
    assert torch.allclose(res.uncertainty, torch.full_like(res.logits, max(u_of(sig(x)) for x in m)), atol=1e-6)
    # events: p = sigmoid(m_k); uncertainty = running max of u
    for k, e in enumerate(events):
        assert e.t == ts[k]
        assert torch.allclose(e.probabilities, torch.full_like(e.probabilities, sig(m[k])), atol=1e-6)
        run_max = max(u_of(sig(x)) for x in m[: k + 1])
        assert torch.allclose(e.uncertainty, torch.full_like(e.uncertainty, run_max), atol=1e-6)


def test_aggregate_last_steps_only() -> None:
    res = run_sampler(
        sample(FakeNet(time_logits), torch.zeros(1, 1, 2, 2), schedule=SCHED, steps=4, ensemble=1, aggregate_steps=2)
    )
    m = [(333 - 500) / 100, (0 - 500) / 100]  # only the last two steps, a = 1
    w = [math.exp(-1 * 1 / 2), 1.0]
    fused = (w[0] * m[0] + w[1] * m[1]) / sum(w)
    assert torch.allclose(res.logits, torch.full_like(res.logits, fused), atol=1e-5)
    assert not bool(res.mask.any())
    u = max(u_of(sig(x)) for x in m)
    assert torch.allclose(res.uncertainty, torch.full_like(res.uncertainty, u), atol=1e-6)


def test_diffunet_fusion_by_hand() -> None:
    res = run_sampler(
        sample(
            FakeNet(lambda x, t: time_logits(x, t) / 5.0),
            torch.zeros(1, 1, 2, 2),
            schedule=SCHED,
            steps=4,
            ensemble=3,
            fusion="diffunet",
            x0_mode="clamp",
        )
    )
    m = [(t - 500) / 500 for t in [999, 666, 333, 0]]  # 0.998, 0.332, -0.334, -1.0
    x0 = [max(-1.0, min(1.0, v)) for v in m]
    w = [math.exp(sig(j / 4) * (1 - u_of(sig(v)))) for j, v in zip(range(1, 5), m)]
    v = sum(wi * xi for wi, xi in zip(w, x0)) / sum(w)
    assert torch.allclose(res.probabilities, torch.full_like(res.probabilities, (v + 1) / 2), atol=1e-6)
    assert bool(res.mask.all()) == (v > 0)


def test_first_step_sees_seeded_noise_and_mean_over_samples() -> None:
    net = FakeNet(lambda x, t: x.clone())  # logits = x_t: m_1 is the sample mean of the start noise
    b, s, shape = 2, 4, (3, 5, 4)
    events = []
    run_sampler(sample(net, torch.zeros(b, 1, 5, 4), schedule=SCHED, steps=2, ensemble=s, seed=11), events.append)
    noise = torch.randn((b * s, *shape), generator=torch.Generator().manual_seed(11))
    assert torch.equal(net.calls[0][1], noise)
    expected = torch.sigmoid(noise.view(b, s, *shape).mean(dim=1))
    assert torch.allclose(events[0].probabilities, expected, atol=1e-6)


def test_presegmentation_noises_prior_to_t_start() -> None:
    net = FakeNet(lambda x, t: torch.zeros_like(x))
    prior = torch.zeros(1, 3, 4, 4)
    prior[:, 0, 1:3, 1:3] = 1.0
    s = 2
    image = torch.zeros(1, 1, 4, 4)
    run_sampler(sample(net, image, schedule=SCHED, prior=prior, t_start=300, steps=3, ensemble=s, seed=5))
    assert [t[0] for t, _ in net.calls] == [299, 150, 0]
    noise = torch.randn((s, 3, 4, 4), generator=torch.Generator().manual_seed(5))
    a = SCHED.abar(299)
    expected = math.sqrt(a) * (2 * prior - 1).repeat_interleave(s, 0) + math.sqrt(1 - a) * noise
    assert torch.allclose(net.calls[0][1], expected, atol=1e-6)
    assert not torch.equal(net.calls[0][1][0], net.calls[0][1][1])  # different noise per member


def test_invalid_arguments_raise_at_call() -> None:
    net = FakeNet(time_logits)
    with pytest.raises(ValueError, match="prior"):
        sample(net, torch.zeros(1, 1, 4, 4), schedule=SCHED, prior=torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="fusion"):
        sample(net, torch.zeros(1, 1, 4, 4), schedule=SCHED, fusion="vote")
    with pytest.raises(ValueError, match="x0_mode"):
        sample(net, torch.zeros(1, 1, 4, 4), schedule=SCHED, x0_mode="tanh")
    with pytest.raises(ValueError, match="aggregate_steps"):
        sample(net, torch.zeros(1, 1, 4, 4), schedule=SCHED, aggregate_steps=0)


def test_tiny_network_same_seed_identical(tiny: SpineSegDiffNet) -> None:
    image = torch.randn(1, 1, 20, 27, generator=torch.Generator().manual_seed(0))
    prior = (torch.rand(1, 3, 20, 27, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    kw = dict(schedule=SCHED, steps=3, ensemble=2, prior=prior, t_start=400)
    r1 = run_sampler(sample(tiny, image, seed=7, **kw))
    r2 = run_sampler(sample(tiny, image, seed=7, **kw))
    r3 = run_sampler(sample(tiny, image, seed=8, **kw))
    for name in ("probabilities", "uncertainty", "logits", "mask"):
        assert torch.equal(getattr(r1, name), getattr(r2, name))
    assert not torch.equal(r1.logits, r3.logits)
    assert r1.probabilities.shape == (1, 3, 20, 27) and r1.mask.dtype == torch.bool
    assert float(r1.probabilities.min()) >= 0 and float(r1.probabilities.max()) <= 1
    assert float(r1.uncertainty.max()) <= 1 / math.e + 1e-6
    assert torch.equal(r1.mask, r1.probabilities > 0.5)


def test_each_member_keeps_its_last_x0(tiny: SpineSegDiffNet) -> None:
    """sample_x0 holds each ensemble member's own last-step x0 (B, S, C, H, W): with x0 = 2 sigmoid - 1 the
    mean of the members' logits is the last step's ensemble mean, which the last event shows."""
    image = torch.randn(2, 1, 12, 10, generator=torch.Generator().manual_seed(3))
    prior = (torch.rand(2, 3, 12, 10, generator=torch.Generator().manual_seed(4)) > 0.5).float()
    events: list[StepEvent] = []
    res = run_sampler(sample(tiny, image, schedule=SCHED, steps=3, ensemble=3, prior=prior, t_start=400,
                             x0_mode="sigmoid"), events.append)
    x0 = res.sample_x0
    assert x0 is not None and x0.shape == (2, 3, 3, 12, 10)
    assert float(x0.abs().max()) <= 1.0
    assert not torch.allclose(x0[:, 0], x0[:, 1])  # the members differ (their own noise)
    p = ((x0 + 1.0) / 2.0).clamp(1e-6, 1 - 1e-6)
    mean_logits = torch.logit(p.double()).mean(dim=1)
    torch.testing.assert_close(torch.sigmoid(mean_logits).float(), events[-1].probabilities, atol=2e-4, rtol=0)
    # no step, no members
    assert run_sampler(sample(tiny, image, schedule=SCHED, prior=prior, t_start=0)).sample_x0 is None
