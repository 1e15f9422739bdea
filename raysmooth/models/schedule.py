"""Noise schedules and the σ → t* rule of denoised smoothing (docs/methods.md §3.1).

Images live in [0,1]; diffusion models in [-1,1], where smoothing noise σ becomes 2σ. The timestep
whose noise-to-signal ratio r_t = √(1−ᾱ_t)/√ᾱ_t first reaches 2σ is t*; all three reference codebases
pick the same t*. Computed in float64 from the betas (diffusers keeps ᾱ in float32).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "linear_betas",
    "cosine_betas",
    "alphas_cumprod",
    "noise_ratio",
    "timestep_for_sigma",
    "schedule_from_config",
    "DDPM_LINEAR",
]

DDPM_LINEAR: dict[str, Any] = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """DDPM's linear schedule, scaled as guided-diffusion scales it for other step counts."""
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """improved-diffusion's cosine schedule (diffusers' ``squaredcos_cap_v2``)."""

    def abar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [min(1 - abar((i + 1) / num_timesteps) / abar(i / num_timesteps), max_beta) for i in range(num_timesteps)],
        dtype=np.float64,
    )


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    return np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))


def noise_ratio(acp: np.ndarray) -> np.ndarray:
    """r_t = √(1−ᾱ_t)/√ᾱ_t, increasing in t."""
    acp = np.asarray(acp, dtype=np.float64)
    return np.sqrt((1.0 - acp) / acp)


def timestep_for_sigma(acp: np.ndarray, sigma: float) -> tuple[int, float]:
    """``(t*, √ᾱ_{t*})``: the first t with r_t ≥ 2σ (the last t if none reaches it)."""
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    r = noise_ratio(acp)
    t = int(np.searchsorted(r, 2.0 * sigma, side="left"))
    t = min(t, len(r) - 1)
    return t, float(np.sqrt(acp[t]))


def schedule_from_config(cfg: dict[str, Any]) -> np.ndarray:
    """ᾱ in float64 from ``DDPMScheduler`` arguments (or a saved ``scheduler_config.json``): the one
    implementation the denoiser, the toy trainer and the tests share. diffusers' ``linear`` takes
    beta_start/beta_end as given (no rescaling for other step counts)."""
    from ..errors import ModelLoadError

    t = int(cfg.get("num_train_timesteps", 1000))
    kind = cfg.get("beta_schedule", "linear")
    if cfg.get("trained_betas") is not None:
        betas = np.asarray(cfg["trained_betas"], dtype=np.float64)
    elif kind == "linear":
        betas = np.linspace(cfg.get("beta_start", 1e-4), cfg.get("beta_end", 0.02), t, dtype=np.float64)
    elif kind == "squaredcos_cap_v2":
        betas = cosine_betas(t)
    elif kind == "scaled_linear":
        betas = (
            np.linspace(cfg.get("beta_start", 1e-4) ** 0.5, cfg.get("beta_end", 0.02) ** 0.5, t, dtype=np.float64) ** 2
        )
    else:
        raise ModelLoadError(f"unsupported beta_schedule {kind!r} (linear, scaled_linear, squaredcos_cap_v2)")
    return alphas_cumprod(betas)
