"""Tiny models that our own code builds, so loaders and the engine are tested with no download."""

from __future__ import annotations

from pathlib import Path

import torch

from raysmooth.models import ClassifierConfig, DenoiserConfig

TINY_UNET = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    layers_per_block=1,
    block_out_channels=(8, 16),
    down_block_types=("DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D"),
    norm_num_groups=4,
)
TINY_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
TINY_CLASSIFIER = dict(name="test_efficientnet", num_classes=10, in_chans=1, input_size=(8, 8), mean=(0.5,), std=(0.5,))


def tiny_unet(seed: int = 0, **overrides):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(**{**TINY_UNET, **overrides})


def save_denoiser_folder(root: Path, seed: int = 0) -> Path:
    """A diffusers folder: unet/ and scheduler/, as ``from_pretrained`` expects."""
    from diffusers import DDPMScheduler

    tiny_unet(seed).save_pretrained(root / "unet")
    DDPMScheduler(**TINY_SCHEDULER).save_pretrained(root / "scheduler")
    return root


def tiny_denoiser_config(root: Path, **kw) -> DenoiserConfig:
    return DenoiserConfig(path=str(save_denoiser_folder(root)), **kw)


def tiny_classifier_config(**kw) -> ClassifierConfig:
    return ClassifierConfig(**{**TINY_CLASSIFIER, **kw})
