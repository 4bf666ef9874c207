"""Cosine noise schedule, forward noising and the deterministic DDIM update.

Conventions (same as guided-diffusion / Diff-UNet, which the reference builds on):

* Timesteps are integers ``t = 0 .. T-1``; ``alphas_cumprod[t] = prod_{i<=t} (1 - beta_i)`` with
  ``beta_i = min(1 - f(i+1)/f(i), 0.999)`` and ``f(t) = cos(((t/T) + s)/(1 + s) * pi/2)^2``, so
  ``alphas_cumprod[t] = f(t+1)/f(0)`` wherever the clip is inactive (all but the very last steps).
* ``t = -1`` means "clean": ``abar(-1) = 1``.  A DDIM step to ``t_prev = -1`` returns the x0 estimate.
* Masks live in [-1, 1]: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``.
* ``t_start`` counts noising steps: ``t_start = T`` is pure noise (first model call at ``T-1``),
  ``t_start = 0`` is the clean prior (no model call).  See :meth:`CosineSchedule.respaced_timesteps`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


class CosineSchedule:
    """Nichol & Dhariwal cosine schedule with ``T`` training steps (``s = 0.008``, betas clipped at 0.999)."""

    name = "cosine"

    def __init__(self, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> None:
        if T < 1:
            raise ValueError(f"T must be at least 1, got {T}.")
        self.T, self.s, self.max_beta = int(T), float(s), float(max_beta)
        grid = np.arange(self.T + 1, dtype=np.float64) / self.T
        f = np.cos((grid + self.s) / (1.0 + self.s) * math.pi / 2.0) ** 2
        self.betas = np.minimum(1.0 - f[1:] / f[:-1], self.max_beta)
        self.alphas_cumprod = np.cumprod(1.0 - self.betas)  # float64, (T,)

    # -- bookkeeping -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "T": self.T}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CosineSchedule":
        if d.get("name", "cosine") != "cosine":
            raise ValueError(f"Only the cosine schedule is supported, got {d.get('name')!r}.")
        return cls(T=int(d.get("T", 1000)))

    def abar(self, t: int) -> float:
        """``alphas_cumprod[t]``; ``t = -1`` -> 1.0 (clean)."""
        t = int(t)
        if t == -1:
            return 1.0
        if not 0 <= t < self.T:
            raise ValueError(f"timestep must be in -1..{self.T - 1}, got {t}.")
        return float(self.alphas_cumprod[t])

    def _coef(self, t: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """sqrt(abar_t) shaped to broadcast over ``like`` (float64 maths, ``like``'s dtype)."""
        table = torch.as_tensor(self.alphas_cumprod, dtype=torch.float64, device="cpu")
        if isinstance(t, torch.Tensor) and t.ndim > 0:
            a = table[t.detach().to("cpu", torch.long)].reshape(-1, *([1] * (like.ndim - 1)))
        else:
            a = torch.tensor(self.abar(int(t)), dtype=torch.float64)
        return a.to(device=like.device, dtype=like.dtype)

    # -- forward process ---------------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: int | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``; ``t`` an int or a (B,) tensor of timesteps."""
        a = self._coef(t, x0)
        return a.sqrt() * x0 + (1.0 - a).sqrt() * noise

    # -- sampling ----------------------------------------------------------------------------------
    def respaced_timesteps(self, t_start: int | None, steps: int) -> list[int]:
        """Strictly decreasing timesteps for ``steps`` DDIM model calls starting from ``t_start``.

        ``n = min(t_start, T)`` (``None`` -> ``T``); the sequence runs from ``n - 1`` down to ``0``
        inclusive, evenly spaced and rounded half-up (``t_start = T``, 10 steps -> 999, 888, ..., 111, 0,
        as guided-diffusion's ``space_timesteps``).  At most ``n`` steps fit: ``steps`` is capped at
        ``n``.  ``t_start = 0`` -> ``[]``.  After the last (``t = 0``) call DDIM goes to ``t = -1`` (x0).
        """
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}.")
        n = self.T if t_start is None else min(int(t_start), self.T)
        if n < 0:
            raise ValueError(f"t_start must be 0 or more, got {t_start}.")
        if n == 0:
            return []
        k = min(int(steps), n)
        if k == 1:
            return [n - 1]
        grid = np.linspace(n - 1, 0, k)
        return [int(v) for v in np.floor(grid + 0.5)]

    def ddim_step(
        self,
        x_t: torch.Tensor,
        x0_hat: torch.Tensor,
        t: int,
        t_prev: int,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One DDIM update ``x_t -> x_{t_prev}`` from an x0 estimate (clamped to [-1, 1] first).

        ``eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)``;
        ``x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z`` with
        ``sigma = eta sqrt((1 - abar_prev)/(1 - abar_t)) sqrt(1 - abar_t/abar_prev)`` (0 for ``eta = 0``).
        ``t_prev = -1`` returns the clamped x0.
        """
        x0 = x0_hat.clamp(-1.0, 1.0)
        a_t, a_prev = self.abar(t), self.abar(t_prev)
        sigma = 0.0
        if eta > 0:
            sigma = eta * math.sqrt((1.0 - a_prev) / (1.0 - a_t)) * math.sqrt(1.0 - a_t / a_prev)
        # the same update written as A x0 + B x_t: two passes over the (large) batch instead of six
        k = math.sqrt(max(1.0 - a_prev - sigma**2, 0.0)) / math.sqrt(1.0 - a_t)
        out = torch.add(x_t * k, x0, alpha=math.sqrt(a_prev) - k * math.sqrt(a_t))
        if sigma > 0:
            z = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype, device=_gen_device(generator))
            out = out + sigma * z.to(x_t.device)
        return out


def _gen_device(generator: torch.Generator | None) -> torch.device | str:
    return generator.device if generator is not None else "cpu"


def schedule_from_dict(d: dict[str, Any] | None) -> CosineSchedule:
    """Schedule from a checkpoint's ``schedule`` dict (``None`` -> cosine, T = 1000)."""
    return CosineSchedule() if d is None else CosineSchedule.from_dict(d)
