"""The papers' denoiser/classifier pairs, built with random weights (no download): for the GPU
benchmarks and the memory model. Same architectures as the presets (configs/model/carlini_*.yaml):
CIFAR-10: the improved-diffusion ADM at 32×32 and a ViT-B/16 at 224; ImageNet: the guided-diffusion
ADM run at 224×224 and BEiT-L/16 at 512."""

from __future__ import annotations

import torch

from .adm import ADM_PRESETS, scheduler_config, timestep_scale, unet_config
from .base import DenoiseThenClassify
from .classifier import ClassifierConfig, InputContract, NormalizedClassifier, create_timm_model, load_classifier
from .denoiser import DiffusionDenoiser
from .schedule import DDPM_LINEAR, schedule_from_config

__all__ = ["PAPER_PAIRS", "paper_pair", "toy_pair"]

_HALF = (0.5, 0.5, 0.5)
PAPER_PAIRS: dict[str, dict] = {
    "cifar10": dict(
        adm="cifar10",
        input_shape=(3, 32, 32),
        classifier=ClassifierConfig(
            name="vit_base_patch16_224",
            num_classes=10,
            input_size=(224, 224),
            interpolation="bicubic",
            mean=_HALF,
            std=_HALF,
        ),
    ),
    "imagenet": dict(
        adm="imagenet256",
        input_shape=(3, 224, 224),
        classifier=ClassifierConfig(
            name="beit_large_patch16_512",
            num_classes=1000,
            input_size=(512, 512),
            interpolation="bicubic",
            mean=_HALF,
            std=_HALF,
        ),
    ),
}


def paper_pair(name: str, device: str | torch.device = "cpu", seed: int = 0) -> DenoiseThenClassify:
    """Denoise-then-classify with the paper's architectures and random weights, built on ``device``
    (``meta``: shapes only, for the memory model)."""
    from diffusers import UNet2DModel

    spec = PAPER_PAIRS[name]
    adm = ADM_PRESETS[spec["adm"]]
    clf_cfg: ClassifierConfig = spec["classifier"]
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DModel(**unet_config(adm)).eval().requires_grad_(False)
        model = create_timm_model(clf_cfg).eval().requires_grad_(False)
    denoiser = DiffusionDenoiser(
        unet,
        schedule_from_config(scheduler_config(adm)),
        timestep_scale=timestep_scale(adm),
        model_id=f"adm-{spec['adm']} (random)",
    )
    contract = InputContract(tuple(clf_cfg.input_size), clf_cfg.interpolation, clf_cfg.mean, clf_cfg.std)
    classifier = NormalizedClassifier(
        model, contract, clf_cfg.num_classes, model_id=f"{clf_cfg.name} (random)", in_channels=clf_cfg.in_chans
    )
    return DenoiseThenClassify(denoiser, classifier, spec["input_shape"]).to(device)


def toy_pair(name: str, seed: int = 0) -> DenoiseThenClassify:
    """The same code path as ``paper_pair`` at toy sizes, for tests of the benchmarks on a CPU: a small
    UNet2DModel with attention in both directions (8×8 inputs) and, for ``imagenet``, a two-block BEiT
    with BEiT's per-layer relative-position bias (a tiny timm EfficientNet for ``cifar10``)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=6,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    denoiser = DiffusionDenoiser(unet.eval().requires_grad_(False), schedule_from_config(DDPM_LINEAR))
    if name == "cifar10":
        arch = dict(name="test_efficientnet")
    else:
        arch = dict(
            name="beit_base_patch16_224",
            model_kwargs=dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2),
        )
    classifier = load_classifier(
        ClassifierConfig(
            **arch,
            num_classes=10 if name == "cifar10" else 1000,
            input_size=(16, 16),
            mean=_HALF,
            std=_HALF,
        )
    )
    return DenoiseThenClassify(denoiser, classifier, (3, 8, 8)).eval()
