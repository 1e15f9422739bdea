"""timm classifiers that carry their input contract (size, interpolation, mean, std).

Callers hand them images in [0,1] at any size; the classifier resizes (antialiased) and normalises
the way its pretrained config says, unless the config overrides it. Our own classifiers save and load
as self-describing folders, in diffusers' manner: ``config.json`` (the ``ClassifierConfig``) beside
``model.safetensors``, so a model config needs nothing but ``path``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, ModelLoadError, check_keys, check_paths_given, whole_number
from .checkpoints import load_state_dict_file, load_strict, read_folder_config, save_folder, unwrap_state_dict

__all__ = [
    "ClassifierConfig",
    "InputContract",
    "NormalizedClassifier",
    "create_timm_model",
    "load_classifier",
    "save_classifier",
]


@dataclass
class ClassifierConfig:
    """A timm model and how to feed it. ``path`` is a folder saved by ``save_classifier`` (its
    ``config.json`` fills the other fields; fields given here override it); ``checkpoint`` is a local
    safetensors or weights-only torch file; ``pretrained`` asks timm for its published weights (a
    download unless cached or overlaid)."""

    path: str | None = None
    name: str = "resnet18"
    num_classes: int = 10
    in_chans: int = 3
    pretrained: bool = False
    checkpoint: str | None = None
    checkpoint_format: str = "timm"  # timm | hf_vit (a transformers ViTForImageClassification file or folder)
    input_size: Sequence[int] | None = None  # (H, W); default: the model's pretrained config
    interpolation: str | None = None  # bicubic | bilinear | nearest
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class InputContract:
    """What a classifier expects after we hand it an image in [0,1]."""

    input_size: tuple[int, int]
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


class NormalizedClassifier(nn.Module):
    """Resize and normalise images in [0,1], then classify: returns logits."""

    def __init__(
        self,
        model: nn.Module,
        contract: InputContract,
        num_classes: int,
        model_id: str = "classifier",
        in_channels: int | None = None,
    ):
        super().__init__()
        # Statistics of images in [0, 1]: a mean above 1 or a std above 1 is a contract in 0-255 units,
        # which would feed the model inputs ~255x too large with no error (silently wrong accuracy).
        if not all(0.0 <= m <= 1.0 for m in contract.mean) or not all(0.0 < s <= 1.0 for s in contract.std):
            raise ConfigError(
                f"{model_id}: mean and std are statistics of images in [0, 1] (ImageNet's: mean 0.485, 0.456, "
                f"0.406; std 0.229, 0.224, 0.225), so mean lies in [0, 1] and std in (0, 1]; got mean "
                f"{list(contract.mean)}, std {list(contract.std)} (in 0-255 units? divide by 255)"
            )
        self.model = model
        self.contract = contract
        self.num_classes = num_classes
        self.model_id = model_id
        self.in_channels = in_channels  # the images' channels the model was built for (None: not known)
        self.register_buffer("mean", torch.tensor(contract.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(contract.std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(self.contract.input_size)
        if tuple(x.shape[-2:]) != size:
            mode = self.contract.interpolation
            dtype = x.dtype  # resampled in float32 (not every kernel has bf16), then back
            if mode in ("bicubic", "bilinear"):
                x = F.interpolate(x.float(), size=size, mode=mode, align_corners=False, antialias=True).to(dtype)
            else:
                x = F.interpolate(x.float(), size=size, mode="nearest").to(dtype)
        return self.model((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))


def create_timm_model(cfg: ClassifierConfig, **extra: Any) -> nn.Module:
    import timm

    try:
        return timm.create_model(
            cfg.name,
            pretrained=cfg.pretrained,
            num_classes=cfg.num_classes,
            in_chans=cfg.in_chans,
            **cfg.model_kwargs,
            **extra,
        )
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ModelLoadError(f"classifier.name: timm has no model {cfg.name!r}") from None
        raise


def contract_for(model: nn.Module, cfg: ClassifierConfig) -> InputContract:
    import timm.data

    data_cfg = timm.data.resolve_model_data_config(model)
    size = tuple(cfg.input_size) if cfg.input_size else tuple(data_cfg["input_size"][1:])
    mean = tuple(cfg.mean) if cfg.mean is not None else tuple(data_cfg["mean"])
    std = tuple(cfg.std) if cfg.std is not None else tuple(data_cfg["std"])
    if len(mean) != cfg.in_chans:  # a grey model with an RGB default: repeat the first entry
        mean, std = (mean[0],) * cfg.in_chans, (std[0],) * cfg.in_chans
    return InputContract(
        (int(size[0]), int(size[1])), cfg.interpolation or data_cfg.get("interpolation", "bicubic"), mean, std
    )


def _folder_config(cfg: ClassifierConfig | dict) -> ClassifierConfig:
    """A ClassifierConfig from a section that may name a folder: the folder's config.json, then the
    section's own fields on top, and the folder's weights as the checkpoint."""
    given = dict(cfg) if isinstance(cfg, dict) else {k: v for k, v in cfg.__dict__.items()}
    check_keys("model.classifier", given, ClassifierConfig)
    check_paths_given("model.classifier", given)
    path = given.get("path")
    if not path:
        return cfg if isinstance(cfg, ClassifierConfig) else ClassifierConfig(**given)
    saved, weights = read_folder_config(path, "classifier")
    explicit = (
        given if isinstance(cfg, dict) else {k: v for k, v in given.items() if v != getattr(ClassifierConfig(), k)}
    )
    merged = {**saved, **{k: v for k, v in explicit.items() if k != "path"}}
    try:
        out = ClassifierConfig(**merged)
    except TypeError as exc:
        raise ModelLoadError(f"{path}: config.json is not a classifier config ({exc})") from None
    out.path = str(path)
    out.checkpoint = out.checkpoint or str(weights)
    return out


def save_classifier(model: nn.Module, cfg: ClassifierConfig, folder, card: dict | None = None):
    """Save a timm classifier as a folder that ``load_classifier({"path": folder})`` reads back."""
    fields = {k: v for k, v in cfg.__dict__.items() if k not in ("path", "checkpoint", "pretrained")}
    return save_folder(folder, "classifier", fields, model.state_dict(), card)


def load_classifier(cfg: ClassifierConfig | dict) -> NormalizedClassifier:
    """``timm.create_model`` plus our local checkpoint (loaded without executing pickles)."""
    try:
        cfg = _folder_config(cfg)
    except TypeError as exc:
        raise ModelLoadError(f"model.classifier: {exc}") from None
    # timm takes num_classes=0 as "no head" (features, not logits) and a fraction as a TypeError deep inside
    cfg.num_classes = whole_number("model.classifier.num_classes", cfg.num_classes, error=ConfigError)
    cfg.in_chans = whole_number("model.classifier.in_chans", cfg.in_chans, error=ConfigError)
    if cfg.checkpoint_format == "hf_vit":
        model = _load_hf_vit(cfg)
    elif cfg.checkpoint_format == "timm":
        model = create_timm_model(cfg)
        if cfg.checkpoint:
            state = unwrap_state_dict(load_state_dict_file(cfg.checkpoint), cfg.checkpoint)
            load_strict(model, state, cfg.checkpoint)
    else:
        raise ModelLoadError(f"classifier.checkpoint_format must be timm or hf_vit, got {cfg.checkpoint_format!r}")
    model.eval().requires_grad_(False)
    return NormalizedClassifier(
        model,
        contract_for(model, cfg),
        cfg.num_classes,
        model_id=cfg.path or cfg.checkpoint or cfg.name,
        in_channels=cfg.in_chans,
    )


def _load_hf_vit(cfg: ClassifierConfig) -> nn.Module:
    """A transformers ViT checkpoint in the timm ViT named by ``cfg.name`` (same sizes)."""
    from functools import partial
    from pathlib import Path

    from .hf_vit import hf_vit_layer_norm_eps, hf_vit_to_timm

    if not cfg.checkpoint:
        raise ModelLoadError("classifier.checkpoint_format=hf_vit needs classifier.checkpoint (file or folder)")
    path = Path(cfg.checkpoint)
    if path.is_dir():
        found = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
        if not found:
            raise ModelLoadError(f"{path}: no model.safetensors or pytorch_model.bin in this folder")
        path = found[0]
    model = create_timm_model(cfg, norm_layer=partial(nn.LayerNorm, eps=hf_vit_layer_norm_eps(path)))
    state = hf_vit_to_timm(unwrap_state_dict(load_state_dict_file(path), str(path)), str(path))
    load_strict(model, state, str(path))
    return model
