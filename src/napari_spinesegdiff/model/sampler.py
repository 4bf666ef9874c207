"""DDIM sampling with presegmentation and the step-uncertainty ensemble, as a generator.

``sample(...)`` yields one :class:`StepEvent` per DDIM step (for live display) and *returns* a
:class:`SampleResult` (``StopIteration.value``; :func:`run_sampler` drains a generator and gives it).
Closing the generator stops the work at the next step.

Per step ``k`` (model call at timestep ``t_k``): ``m_k`` = mean over the S samples of the logits,
``p_k = sigmoid(m_k)``, ``u_k = -p log p`` with ``p`` clamped to >= 1e-4 (per class, max 1/e).

Fusion over the aggregated (last ``Ts``) steps, ``j = 1..Ts`` (``j = Ts`` is the last step):

* ``"step_uncertainty"`` (SpineSegDiff): ``fused = sum_j w_j m_j``, ``w_j = exp(-a (Ts - j)/Ts)``,
  ``a = Ts // 2``.  ``logits = fused / sum_j w_j``, ``probabilities = sigmoid(logits)``,
  ``mask = fused > 0`` (the same as ``sigmoid(fused) > 0.5`` and ``probabilities > 0.5``).
* ``"diffunet"`` (Diff-UNet): each sample's clamped x0 (in [-1, 1]) is weighted per pixel by
  ``w_j = exp(sigmoid(j/Ts) (1 - u_j))``; ``v = sum w x0 / sum w`` in [-1, 1],
  ``probabilities = (v + 1)/2``, ``logits = logit(probabilities)``, ``mask = v > 0``.

``uncertainty`` of the result is the max of ``u_k`` over the aggregated steps; a :class:`StepEvent`
carries the running max over all steps so far.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Generator, Literal, Sequence

import torch
from torch import nn

from .diffusion import CosineSchedule

Fusion = Literal["step_uncertainty", "diffunet"]
X0Mode = Literal["sigmoid", "clamp"]
UNCERTAINTY_FLOOR = 1e-4


@dataclass(frozen=True)
class StepEvent:
    """One finished DDIM step: ``index`` is 1-based (``index == total`` on the last step)."""

    index: int
    total: int
    t: int
    probabilities: torch.Tensor  # (B, C, H, W) sigmoid of the ensemble-mean logits at this step
    uncertainty: torch.Tensor  # (B, C, H, W) running max of -p log p over the steps so far


@dataclass(frozen=True)
class SampleResult:
    """Fused output of a sampling run (all tensors (B, C, H, W) on the image's device)."""

    probabilities: torch.Tensor
    uncertainty: torch.Tensor
    logits: torch.Tensor
    mask: torch.Tensor  # bool
    steps_run: int
    timesteps: list[int]
    # (B, S, C, H, W): each ensemble member's own x0 estimate (in [-1, 1]) at the last step, before fusion;
    # ``(x0 + 1) / 2`` are that member's probabilities (the ensemble samples of the measurement intervals,
    # report.intervals); None when no step ran
    sample_x0: torch.Tensor | None = None


def step_weights(ts: int) -> list[float]:
    """Step-uncertainty weights ``w_j = exp(-a (Ts - j)/Ts)``, ``j = 1..Ts``, ``a = Ts // 2``."""
    if ts < 1:
        raise ValueError(f"aggregate_steps must be at least 1, got {ts}.")
    a = ts // 2
    return [math.exp(-a * (ts - j) / ts) for j in range(1, ts + 1)]


def step_uncertainty(p: torch.Tensor) -> torch.Tensor:
    """``-p log p`` with ``p`` clamped to >= 1e-4 (per class)."""
    p = p.clamp_min(UNCERTAINTY_FLOOR)
    return -p * torch.log(p)


def diffunet_weight(j: int, ts: int, u: torch.Tensor) -> torch.Tensor:
    """Diff-UNet's per-pixel weight ``exp(sigmoid(j/Ts) (1 - u))`` for aggregated step ``j`` (1-based)."""
    return torch.exp(torch.sigmoid(torch.tensor(j / ts, dtype=u.dtype, device=u.device)) * (1.0 - u))


def logits_to_x0(logits: torch.Tensor, mode: X0Mode) -> torch.Tensor:
    """x0 estimate in [-1, 1]: ``"clamp"`` (reference) or ``"sigmoid"`` (``2 sigmoid - 1``)."""
    if mode == "clamp":
        return logits.clamp(-1.0, 1.0)
    if mode == "sigmoid":
        return 2.0 * torch.sigmoid(logits) - 1.0
    raise ValueError(f"x0_mode must be 'sigmoid' or 'clamp', got {mode!r}.")


def _make_generator(seed: int | torch.Generator) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    return torch.Generator(device="cpu").manual_seed(int(seed))


def _randn(shape: Sequence[int], gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Gaussian noise drawn on the generator's device, then moved (same numbers on every device)."""
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32, device=gen.device).to(
        device=like.device, dtype=like.dtype
    )


def _check_inputs(net: nn.Module, image: torch.Tensor, prior: torch.Tensor | None) -> int:
    if image.ndim != 4:
        raise ValueError(f"image must be (B, 1, H, W), got shape {tuple(image.shape)}.")
    c = int(net.config.num_classes)
    if prior is not None:
        want = (image.shape[0], c, *image.shape[2:])
        if tuple(prior.shape) != want:
            raise ValueError(f"prior must have shape {want} (B, classes, H, W), got {tuple(prior.shape)}.")
    return c


def _prior_result(prior: torch.Tensor, timesteps: list[int]) -> SampleResult:
    p = prior.float().clamp(0.0, 1.0)
    return SampleResult(
        probabilities=p,
        uncertainty=torch.zeros_like(p),
        logits=torch.logit(p, eps=1e-6),
        mask=p > 0.5,
        steps_run=0,
        timesteps=timesteps,
    )


class _Fuser:
    """Accumulates the chosen fusion over the aggregated steps."""

    def __init__(self, fusion: Fusion, ts: int) -> None:
        if fusion not in ("step_uncertainty", "diffunet"):
            raise ValueError(f"fusion must be 'step_uncertainty' or 'diffunet', got {fusion!r}.")
        self.fusion, self.ts = fusion, ts
        self.weights = step_weights(ts)
        self.num: torch.Tensor | None = None
        self.den: torch.Tensor | float = 0.0
        self.umax: torch.Tensor | None = None

    def add(self, j: int, mean_logits: torch.Tensor, x0: torch.Tensor, u: torch.Tensor) -> None:
        """``j`` 1-based within the window; ``x0`` is (B, S, C, H, W)."""
        if self.fusion == "step_uncertainty":
            w = self.weights[j - 1]
            term, self.den = w * mean_logits, self.den + w
        else:
            w = diffunet_weight(j, self.ts, u)
            term = w * x0.sum(dim=1)
            self.den = self.den + w * x0.shape[1]
        self.num = term if self.num is None else self.num + term
        self.umax = u if self.umax is None else torch.maximum(self.umax, u)

    def result(self, timesteps: list[int], sample_x0: torch.Tensor | None = None) -> SampleResult:
        assert self.num is not None and self.umax is not None
        v = self.num / self.den
        if self.fusion == "step_uncertainty":
            logits, probs, mask = v, torch.sigmoid(v), self.num > 0
        else:
            probs = ((v + 1.0) / 2.0).clamp(0.0, 1.0)
            logits, mask = torch.logit(probs, eps=1e-6), v > 0
        return SampleResult(probs, self.umax, logits, mask, len(timesteps), timesteps, sample_x0)


def sample(
    net: nn.Module,
    image: torch.Tensor,
    *,
    schedule: CosineSchedule | None = None,
    steps: int = 10,
    t_start: int | None = None,
    prior: torch.Tensor | None = None,
    ensemble: int = 5,
    aggregate_steps: int | None = None,
    fusion: Fusion = "step_uncertainty",
    seed: int | torch.Generator = 0,
    x0_mode: X0Mode = "sigmoid",
    eta: float = 0.0,
) -> Generator[StepEvent, None, SampleResult]:
    """DDIM sampler generator; see the module docstring for the maths.

    ``image`` (B, 1, H, W); ``prior`` (B, C, H, W) in {0, 1} or probabilities.  With a prior, it is mapped
    to ``2p - 1``, noised to ``t_start`` (fresh noise per ensemble member) and denoised from there;
    without one, sampling starts from pure noise at ``T`` (``t_start`` is then ignored).  ``t_start = 0``
    with a prior returns the prior unchanged (no events).  ``steps`` is capped at ``t_start``.  The S
    samples of each image run as one batch; encoder features are computed once.  Noise comes from a CPU
    generator seeded by ``seed`` (or the given generator), so a seed gives the same run on every device.
    """
    schedule = schedule or CosineSchedule()
    c = _check_inputs(net, image, prior)
    if ensemble < 1:
        raise ValueError(f"ensemble must be at least 1, got {ensemble}.")
    if aggregate_steps is not None and aggregate_steps < 1:
        raise ValueError(f"aggregate_steps must be at least 1 (or None for all), got {aggregate_steps}.")
    logits_to_x0(torch.zeros(1), x0_mode)  # validates the mode before any work
    start = schedule.T if prior is None or t_start is None else int(t_start)
    timesteps = schedule.respaced_timesteps(start, steps)
    n = len(timesteps)
    ts = n if aggregate_steps is None else min(int(aggregate_steps), n)
    fuser = _Fuser(fusion, max(ts, 1))
    gen = _make_generator(seed)
    return _generate(net, image, prior, schedule, timesteps, fuser, gen, int(ensemble), c, x0_mode, eta)


def _generate(
    net: nn.Module,
    image: torch.Tensor,
    prior: torch.Tensor | None,
    schedule: CosineSchedule,
    timesteps: list[int],
    fuser: _Fuser,
    gen: torch.Generator,
    s: int,
    c: int,
    x0_mode: X0Mode,
    eta: float,
) -> Generator[StepEvent, None, SampleResult]:
    """The generator behind :func:`sample` (inputs already validated)."""
    if prior is not None:
        prior = prior.to(device=image.device, dtype=torch.float32)
        if not timesteps:
            return _prior_result(prior, timesteps)
    n, ts, b = len(timesteps), fuser.ts, image.shape[0]
    shape = (b * s, c, *image.shape[2:])
    with torch.inference_mode():
        image_rep = image.repeat_interleave(s, dim=0)
        embeddings = [e.repeat_interleave(s, dim=0) for e in net.encode(image)]
        noise = _randn(shape, gen, image)
        if prior is None:
            x = noise
        else:
            x0_prior = (2.0 * prior.clamp(0.0, 1.0) - 1.0).repeat_interleave(s, dim=0).to(image.dtype)
            x = schedule.q_sample(x0_prior, timesteps[0], noise)
    running_u: torch.Tensor | None = None
    x0 = None

    for k, t in enumerate(timesteps):
        t_prev = timesteps[k + 1] if k + 1 < n else -1
        with torch.inference_mode():  # never held across a yield: the caller's grad mode is untouched
            t_batch = torch.full((b * s,), t, dtype=torch.long, device=image.device)
            logits = net(x, t_batch, image_rep, embeddings)
            x0 = logits_to_x0(logits, x0_mode)
            x = schedule.ddim_step(x, x0, t, t_prev, eta=eta, generator=gen)
            mean_logits = logits.view(b, s, *logits.shape[1:]).mean(dim=1)
            p = torch.sigmoid(mean_logits)
            u = step_uncertainty(p)
            running_u = u if running_u is None else torch.maximum(running_u, u)
            j = k + 1 - (n - ts)
            if j >= 1:
                fuser.add(j, mean_logits, x0.view(b, s, *x0.shape[1:]), u)  # x0 is in [-1, 1]
        yield StepEvent(index=k + 1, total=n, t=t, probabilities=p, uncertainty=running_u)

    return fuser.result(timesteps, None if x0 is None else x0.view(b, s, *x0.shape[1:]))


def run_sampler(gen: Generator[StepEvent, None, SampleResult], callback=None) -> SampleResult:
    """Drain a :func:`sample` generator (calling ``callback(event)`` per step) and return its result.

    It works for any generator that returns its result (the pipeline's :func:`segment` too)."""
    while True:
        try:
            event = next(gen)
        except StopIteration as stop:
            return stop.value
        if callback is not None:
            callback(event)
