"""One-shot (and optional multi-step) diffusion denoising around ``diffusers.UNet2DModel``.

Noise is added exactly (docs/methods.md §3.2): the engine adds σ·ε in [0,1] space, and the
denoiser maps z ↦ u = 2z − 1, scales by √ᾱ_{t*} and predicts x̂₀ — it never q-samples.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, ModelLoadError, check_keys, check_paths_given, finite_number, whole_number
from .checkpoints import folder_kind, load_state_dict_file, load_strict
from .schedule import noise_ratio, schedule_from_config

__all__ = ["DenoiserConfig", "DiffusionDenoiser", "load_denoiser", "schedule_from_config"]


@dataclass
class DenoiserConfig:
    """Where a denoiser comes from and how it denoises.

    Either ``path`` (a diffusers folder, or ``hf://owner/name`` for a hub id, read with ``from_pretrained``; the UNet in
    ``subfolder`` and the noise schedule in ``scheduler_subfolder``) or ``weights`` (our own
    safetensors) with ``unet`` (the ``UNet2DModel`` config) and ``scheduler`` (``DDPMScheduler``
    arguments).
    """

    path: str | None = None
    subfolder: str | None = "unet"
    scheduler_subfolder: str | None = "scheduler"
    weights: str | None = None
    unet: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    timestep_scale: float | None = None  # t·scale is fed to the UNet; None: the folder's raysmooth.json, else 1
    # (improved-diffusion's rescale_timesteps: 1000/T)
    steps: int = 1  # 1 = one-shot; more = that many reverse steps from t* to 0
    eta: float = 0.0  # multi-step only: 0 = DDIM (deterministic), 1 = DDPM-like ancestral steps
    extra: dict[str, Any] = field(default_factory=dict)


class DiffusionDenoiser(nn.Module):
    """x̂₀ of a noisy image in [0,1] at smoothing noise σ, per sample (one UNet call per step)."""

    def __init__(
        self,
        unet: nn.Module,
        alphas_cumprod: np.ndarray,
        *,
        timestep_scale: float = 1.0,
        steps: int = 1,
        eta: float = 0.0,
        model_id: str = "denoiser",
    ):
        super().__init__()
        steps = whole_number("model.denoiser.steps", steps, error=ConfigError)  # 2.5 would run 2, unsaid
        eta = finite_number("model.denoiser.eta", eta, error=ConfigError)
        timestep_scale = finite_number("model.denoiser.timestep_scale", timestep_scale, error=ConfigError)
        if not 0.0 <= eta <= 1.0:
            raise ConfigError(f"model.denoiser.eta must lie in [0, 1], got {eta}")
        if not timestep_scale > 0:  # t·scale is the UNet's time input
            raise ConfigError(f"model.denoiser.timestep_scale must be a positive number, got {timestep_scale}")
        self.unet = unet
        acp = np.asarray(alphas_cumprod, dtype=np.float64)
        self.register_buffer("acp", torch.from_numpy(acp), persistent=False)
        self.register_buffer("ratio", torch.from_numpy(noise_ratio(acp)), persistent=False)
        self.timestep_scale = float(timestep_scale)
        self.steps = int(steps)
        self.eta = float(eta)
        self.model_id = model_id
        self.in_channels = int(getattr(unet.config, "in_channels", 3)) if hasattr(unet, "config") else 3

    def _apply(self, fn, recurse=True):
        """Moving or casting the model (``.to(bfloat16)`` for a bf16 engine) keeps the noise schedule in
        float64: t* and √ᾱ must not move with the compute dtype."""
        super()._apply(fn, recurse)
        self.acp, self.ratio = self.acp.to(torch.float64), self.ratio.to(torch.float64)
        return self

    @property
    def num_timesteps(self) -> int:
        return len(self.acp)

    @property
    def aux_noise_per_sample(self) -> int:
        """How many extra noise images each sample needs (stochastic multi-step only)."""
        return self.steps - 1 if self.eta > 0 else 0

    def timesteps(self, sigma: torch.Tensor) -> torch.Tensor:
        """t* for every sample: the first t with r_t ≥ 2σ (on the device, no host sync)."""
        t = torch.searchsorted(self.ratio, 2.0 * sigma.to(self.ratio.dtype), right=False)
        return t.clamp_(max=self.num_timesteps - 1)

    def _x0(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.acp[t].to(torch.float32).view(-1, 1, 1, 1)
        t_in = t.to(torch.float32) * self.timestep_scale if self.timestep_scale != 1.0 else t
        out = self.unet(x_t, t_in).sample
        eps = out[:, : x_t.shape[1]].float()  # learned-variance models output [ε, v]; x̂₀ needs ε
        return ((x_t.float() - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1.0, 1.0)

    def forward(self, z: torch.Tensor, sigma: torch.Tensor, aux_noise: torch.Tensor | None = None) -> torch.Tensor:
        """Denoise z = x + σε (in [0,1] space); returns x̂₀ in [0,1]."""
        t = self.timesteps(sigma)
        x_t = self.acp[t].sqrt().to(z.dtype).view(-1, 1, 1, 1) * (2.0 * z - 1.0)
        x0 = self._x0(x_t, t)
        t_star = t
        for k in range(1, self.steps):
            # Next timestep on a per-sample linear grid from t* towards 0.
            t_next = torch.div(t_star * (self.steps - k), self.steps, rounding_mode="floor")
            a_t = self.acp[t].float().view(-1, 1, 1, 1)
            a_n = self.acp[t_next].float().view(-1, 1, 1, 1)
            eps = (x_t.float() - a_t.sqrt() * x0) / (1 - a_t).clamp_min(1e-12).sqrt()
            std = self.eta * ((1 - a_n) / (1 - a_t) * (1 - a_t / a_n)).clamp_min(0).sqrt()
            x_t = a_n.sqrt() * x0 + (1 - a_n - std**2).clamp_min(0).sqrt() * eps
            if self.eta > 0:
                if aux_noise is None:
                    raise ValueError("stochastic multi-step denoising needs aux_noise")
                x_t = x_t + std * aux_noise[:, k - 1]
            x_t = x_t.to(z.dtype)
            t = t_next
            x0 = self._x0(x_t, t)
        return ((x0 + 1.0) / 2.0).to(z.dtype)  # float32 math inside; the caller's dtype out


def _scheduler_config(cfg: DenoiserConfig) -> dict[str, Any]:
    if cfg.scheduler is not None:
        return dict(cfg.scheduler)
    if cfg.path is None:
        raise ModelLoadError("a denoiser from weights needs its noise schedule (denoiser.scheduler)")
    from diffusers import DDPMScheduler

    try:
        sched = DDPMScheduler.from_pretrained(str(cfg.path).removeprefix("hf://"), subfolder=cfg.scheduler_subfolder)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{cfg.path}: no noise schedule in {cfg.scheduler_subfolder or '.'} ({_first_line(exc)})"
        ) from None
    return dict(sched.config)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _check_unet_folder(folder: Path, subfolder: str | None) -> None:
    """A local folder that cannot hold a diffusers UNet is named for what it is before diffusers tries
    every file name it knows (and logs each miss, with a note on pickles that reads as a warning)."""
    kind = folder_kind(folder)
    if kind:
        raise ModelLoadError(
            f"{folder}: a raysmooth {kind} folder, not a denoiser (a diffusers folder with "
            f"{subfolder or '.'}/config.json and its weights)"
        )
    where = folder / subfolder if subfolder else folder
    if not (where / "config.json").is_file():
        raise ModelLoadError(
            f"{folder}: no {subfolder + '/' if subfolder else ''}config.json, so not a diffusers denoiser folder "
            "(denoiser.subfolder names the UNet's folder inside it; null for the folder itself)"
        )
    if not any(where.glob("diffusion_pytorch_model*")):
        raise ModelLoadError(f"{where}: a UNet config without its weights (no diffusion_pytorch_model.safetensors)")


def denoiser_config(cfg: DenoiserConfig | dict) -> DenoiserConfig:
    """``cfg`` as a DenoiserConfig whose keys are known and which names its weights (a folder or a
    file): checked without loading, so the job can say so before any actor starts."""
    if isinstance(cfg, dict):
        check_keys("model.denoiser", cfg, DenoiserConfig)
        cfg = DenoiserConfig(**cfg)
    check_paths_given("model.denoiser", vars(cfg))
    if cfg.path is None and cfg.weights is None:
        raise ConfigError("model.denoiser needs either path (a diffusers folder, or hf://owner/name) or weights")
    return cfg


def load_denoiser(cfg: DenoiserConfig | dict) -> DiffusionDenoiser:
    """Build a denoiser from a diffusers folder / hub id, or from our own safetensors + config."""
    cfg = denoiser_config(cfg)
    from diffusers import UNet2DModel

    if cfg.path is not None and cfg.weights is None:
        source = str(cfg.path)
        if source.startswith("hf://"):
            source = source[len("hf://") :]  # a hub id (needs the network or a warm cache)
        elif not Path(source).is_dir():
            raise ModelLoadError(f"{cfg.path}: no such denoiser folder (for a hub id write hf://owner/name)")
        else:
            _check_unet_folder(Path(source), cfg.subfolder)
        try:
            unet = UNet2DModel.from_pretrained(source, subfolder=cfg.subfolder, low_cpu_mem_usage=False)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"{cfg.path}: cannot load a UNet2DModel from {cfg.subfolder or '.'} ({_first_line(exc)})"
            ) from None
        model_id = str(cfg.path)
    else:  # weights: denoiser_config made sure that one of the two is given
        if cfg.unet is None:
            config_file = Path(cfg.weights).with_name("config.json")
            if not config_file.is_file():
                raise ModelLoadError(
                    f"{cfg.weights}: no UNet config given (denoiser.unet) and no {config_file.name} beside it"
                )
            cfg.unet = {k: v for k, v in json.loads(config_file.read_text()).items() if not k.startswith("_")}
        try:
            unet = UNet2DModel(**cfg.unet)
        except TypeError as exc:
            raise ModelLoadError(f"denoiser.unet is not a UNet2DModel config ({exc})") from None
        state = load_state_dict_file(cfg.weights)
        load_strict(unet, state, cfg.weights)
        model_id = str(cfg.weights)
    acp = schedule_from_config(_scheduler_config(cfg))
    scale = cfg.timestep_scale
    if scale is None:  # a converted ADM folder says how its model was told the timestep
        info = Path(cfg.path) / "raysmooth.json" if cfg.path and not str(cfg.path).startswith("hf://") else None
        scale = json.loads(info.read_text()).get("timestep_scale", 1.0) if info is not None and info.is_file() else 1.0
    unet.eval().requires_grad_(False)
    return DiffusionDenoiser(unet, acp, timestep_scale=scale, steps=cfg.steps, eta=cfg.eta, model_id=model_id)
