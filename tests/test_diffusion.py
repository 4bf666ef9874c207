"""Cosine schedule, q_sample, respacing and the DDIM step, checked against hand-written formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_spinesegdiff.model.diffusion import CosineSchedule, schedule_from_dict

T = 1000


def f(t: float) -> float:
    """Nichol & Dhariwal's cos^2 function, written out by hand."""
    return math.cos(((t / T) + 0.008) / 1.008 * math.pi / 2) ** 2


def abar(t: int) -> float:
    """alphas_cumprod[t] = f(t+1)/f(0) where no beta is clipped."""
    return 1.0 if t == -1 else f(t + 1) / f(0)


@pytest.fixture(scope="module")
def sched() -> CosineSchedule:
    return CosineSchedule(T)


@pytest.mark.parametrize("t", [0, 1, 299, 499, 900])
def test_alphas_cumprod_matches_hand_formula(sched: CosineSchedule, t: int) -> None:
    assert sched.alphas_cumprod.dtype == np.float64
    assert sched.alphas_cumprod[t] == pytest.approx(abar(t), rel=1e-10)
    assert sched.abar(t) == pytest.approx(abar(t), rel=1e-10)


def test_betas_clipped_and_clean_end(sched: CosineSchedule) -> None:
    assert sched.betas.shape == (T,) and sched.alphas_cumprod.shape == (T,)
    assert sched.betas.max() == 0.999  # the last beta is 1 - f(T)/f(T-1) = 1 > 0.999, clipped
    assert sched.betas[0] == pytest.approx(1 - f(1) / f(0), rel=1e-12)
    assert sched.abar(-1) == 1.0
    assert sched.alphas_cumprod[-1] < 1e-7  # essentially pure noise at t = T-1
    with pytest.raises(ValueError):
        sched.abar(T)
    assert schedule_from_dict({"name": "cosine", "T": 50}).T == 50
    assert sched.to_dict() == {"name": "cosine", "T": 1000}


def test_q_sample_on_constants(sched: CosineSchedule) -> None:
    x0 = torch.full((1, 3, 2, 2), 0.5)
    noise = torch.full((1, 3, 2, 2), 2.0)
    a = abar(499)
    expected = math.sqrt(a) * 0.5 + math.sqrt(1 - a) * 2.0
    out = sched.q_sample(x0, 499, noise)
    assert torch.allclose(out, torch.full_like(out, expected), atol=1e-6)


def test_q_sample_per_batch_timesteps(sched: CosineSchedule) -> None:
    x0 = torch.ones(2, 1, 1, 1)
    noise = torch.zeros(2, 1, 1, 1)
    out = sched.q_sample(x0, torch.tensor([0, 700]), noise)
    assert out[0].item() == pytest.approx(math.sqrt(abar(0)), rel=1e-6)
    assert out[1].item() == pytest.approx(math.sqrt(abar(700)), rel=1e-6)


def test_ddim_step_on_constants(sched: CosineSchedule) -> None:
    x_t = torch.full((1, 3, 2, 2), 0.3)
    x0_hat = torch.full((1, 3, 2, 2), 1.7)  # clamped to 1 before the update
    a_t, a_p = abar(500), abar(250)
    eps = (0.3 - math.sqrt(a_t) * 1.0) / math.sqrt(1 - a_t)
    expected = math.sqrt(a_p) * 1.0 + math.sqrt(1 - a_p) * eps
    out = sched.ddim_step(x_t, x0_hat, 500, 250)
    assert torch.allclose(out, torch.full_like(out, expected), atol=1e-6)


def test_ddim_step_to_clean_returns_clamped_x0(sched: CosineSchedule) -> None:
    x0_hat = torch.tensor([[[[-3.0, 0.25]]]])
    out = sched.ddim_step(torch.randn(1, 1, 1, 2), x0_hat, 0, -1)
    assert torch.equal(out, torch.tensor([[[[-1.0, 0.25]]]]))


def test_ddim_with_exact_x0_follows_the_forward_process(sched: CosineSchedule) -> None:
    gen = torch.Generator().manual_seed(3)
    x0 = torch.rand(2, 3, 4, 4, generator=gen) * 2 - 1
    eps = torch.randn(2, 3, 4, 4, generator=gen)
    x_t = sched.q_sample(x0, 800, eps)
    assert torch.allclose(sched.ddim_step(x_t, x0, 800, 400), sched.q_sample(x0, 400, eps), atol=1e-5)


def test_ddim_eta_adds_seeded_noise(sched: CosineSchedule) -> None:
    x_t, x0 = torch.zeros(1, 1, 3, 3), torch.zeros(1, 1, 3, 3)
    a = sched.ddim_step(x_t, x0, 600, 300, eta=1.0, generator=torch.Generator().manual_seed(1))
    b = sched.ddim_step(x_t, x0, 600, 300, eta=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.abs().sum() > 0
    assert sched.ddim_step(x_t, x0, 600, 300).abs().sum() == 0


def test_respaced_timesteps(sched: CosineSchedule) -> None:
    assert sched.respaced_timesteps(None, 10) == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert sched.respaced_timesteps(1000, 10) == sched.respaced_timesteps(5000, 10)
    # linspace(299, 0, 10) = 299, 265.8, 232.6, 199.3, 166.1, 132.9, 99.7, 66.4, 33.2, 0 rounded half-up
    assert sched.respaced_timesteps(300, 10) == [299, 266, 233, 199, 166, 133, 100, 66, 33, 0]
    assert sched.respaced_timesteps(300, 3) == [299, 150, 0]  # 149.5 rounds up
    assert sched.respaced_timesteps(5, 10) == [4, 3, 2, 1, 0]  # capped at t_start
    assert sched.respaced_timesteps(40, 1) == [39]
    assert sched.respaced_timesteps(0, 10) == []
    for n, k in [(1000, 50), (137, 30), (31, 30), (2, 2)]:
        ts = sched.respaced_timesteps(n, k)
        assert len(ts) == min(n, k) and ts[0] == n - 1 and ts[-1] == 0
        assert all(a > b for a, b in zip(ts, ts[1:]))
    with pytest.raises(ValueError):
        sched.respaced_timesteps(100, 0)
