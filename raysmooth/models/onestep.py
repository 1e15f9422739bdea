"""A one-step noise-conditioned classifier (rRCM-style): no denoiser, one forward per noisy sample.

rRCM conditions a ViT on the noise level through a time token; we condition any timm model through an
extra input channel that holds c(σ) = ln(2σ)/4 (the [-1,1]-space noise level, log-scaled), which works
for convolutional and transformer backbones alike. What matters for certification is that σ is an
input and nothing denoises in between.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, ModelLoadError, check_keys, check_paths_given, whole_number
from .checkpoints import load_state_dict_file, load_strict, read_folder_config, save_folder, unwrap_state_dict
from .classifier import ClassifierConfig, create_timm_model

__all__ = ["OneStepConfig", "NoiseConditionedClassifier", "load_onestep", "save_onestep", "noise_level_channel"]


@dataclass
class OneStepConfig:
    """A timm backbone with one extra input channel for σ. ``path``: a folder saved by ``save_onestep``."""

    path: str | None = None
    name: str = "resnet18"
    num_classes: int = 10
    in_chans: int = 3  # of the images; the model sees in_chans + 1
    checkpoint: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)


def noise_level_channel(sigma: torch.Tensor) -> torch.Tensor:
    """The conditioning value of σ (per sample)."""
    return torch.log(2.0 * sigma.clamp_min(1e-6)) / 4.0


class NoiseConditionedClassifier(nn.Module):
    """logits = model([ (2z−1), c(σ) ]) for a noisy image z in [0,1] and its σ."""

    def __init__(self, model: nn.Module, num_classes: int, model_id: str = "onestep", in_channels: int | None = None):
        super().__init__()
        self.model = model
        self.num_classes = num_classes
        self.model_id = model_id
        self.in_channels = in_channels  # of the images, without the σ channel (None: not known)

    def forward(self, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        cond = noise_level_channel(sigma).to(z.dtype).view(-1, 1, 1, 1).expand(-1, 1, *z.shape[-2:])
        return self.model(torch.cat([2.0 * z - 1.0, cond], dim=1))


def build_onestep(cfg: OneStepConfig) -> NoiseConditionedClassifier:
    model = create_timm_model(
        ClassifierConfig(
            name=cfg.name, num_classes=cfg.num_classes, in_chans=cfg.in_chans + 1, model_kwargs=cfg.model_kwargs
        )
    )
    return NoiseConditionedClassifier(
        model, cfg.num_classes, model_id=cfg.path or cfg.checkpoint or cfg.name, in_channels=cfg.in_chans
    )


def save_onestep(net: NoiseConditionedClassifier, cfg: OneStepConfig, folder, card: dict | None = None):
    """Save as a folder that ``load_onestep({"path": folder})`` reads back."""
    fields = {k: v for k, v in cfg.__dict__.items() if k not in ("path", "checkpoint")}
    return save_folder(folder, "onestep", fields, net.model.state_dict(), card)


def load_onestep(cfg: OneStepConfig | dict) -> NoiseConditionedClassifier:
    given = dict(cfg) if isinstance(cfg, dict) else dict(cfg.__dict__)
    check_keys("model.onestep", given, OneStepConfig)
    check_paths_given("model.onestep", given)
    if given.get("path"):
        saved, weights = read_folder_config(given["path"], "onestep")
        overrides = {
            k: v
            for k, v in given.items()
            if k != "path" and (not isinstance(cfg, OneStepConfig) or v != getattr(OneStepConfig(), k))
        }
        given = {**saved, **overrides, "path": given["path"], "checkpoint": given.get("checkpoint") or str(weights)}
    try:
        cfg = OneStepConfig(**given)
    except TypeError as exc:
        raise ModelLoadError(f"model.onestep: {exc}") from None
    cfg.num_classes = whole_number("model.onestep.num_classes", cfg.num_classes, error=ConfigError)
    cfg.in_chans = whole_number("model.onestep.in_chans", cfg.in_chans, error=ConfigError)
    net = build_onestep(cfg)
    if cfg.checkpoint:
        load_strict(net.model, unwrap_state_dict(load_state_dict_file(cfg.checkpoint), cfg.checkpoint), cfg.checkpoint)
    net.eval().requires_grad_(False)
    return net
