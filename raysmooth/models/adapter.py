"""Your own ``torch.nn.Module`` as a base classifier: the seam between a researcher's model and the
engine, so neither the Python API nor the Ray path needs to know what the module is.

The module takes images (optionally resized and normalised first, as its training did) and returns
logits. With a denoiser in front it becomes denoised smoothing (``dds``) around that classifier.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, ModelLoadError, logits_hint, one_line, pixel_size, whole_number
from .base import BaseClassifier, DenoiseThenClassify, PlainBase
from .classifier import InputContract, NormalizedClassifier

__all__ = ["as_classifier", "from_module", "user_base_classifier"]


def _infer_num_classes(module: nn.Module, shape: Sequence[int]) -> int:
    """The width of the module's output on one blank image (on the module's own device)."""
    try:
        param = next(module.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        was_training = module.training
        module.eval()
        with torch.no_grad():
            out = module(torch.zeros((1, *shape), device=device))
        module.train(was_training)
    except Exception as exc:  # noqa: BLE001 - any failure means we cannot tell; say so in one line
        raise ConfigError(
            f"cannot run the model on an input of shape (1, {', '.join(map(str, shape))}) to find its number "
            f"of classes ({type(exc).__name__}: {one_line(exc, 160)}); give num_classes"
        ) from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise ConfigError(
            f"the model must return logits of shape (batch, classes); it returned "
            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}{logits_hint(out)}"
        )
    return int(out.shape[1])


def as_classifier(
    module: nn.Module,
    *,
    input_shape: Sequence[int],
    num_classes: int | None = None,
    input_size: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str = "bicubic",
    model_id: str | None = None,
) -> NormalizedClassifier:
    """Wrap ``module`` so that it takes images in [0,1] of ``input_shape`` (C, H, W): resized to
    ``input_size`` and normalised by ``mean``/``std`` first when given (identity otherwise)."""
    if not isinstance(module, nn.Module):
        raise ConfigError(f"the model must be a torch.nn.Module returning logits, got {type(module).__name__}")
    c = int(input_shape[0])
    wanted = input_shape[1:] if input_size is None else input_size
    size = pixel_size(wanted)
    if size is None:
        raise ConfigError(f"input_size must be (H, W) of whole positive sizes, or one size, got {input_size}")
    if (mean is None) != (std is None):  # half a normalisation is never what a model was trained with
        raise ConfigError(f"mean and std go together: give both or neither, got mean={mean}, std={std}")
    if interpolation not in ("bicubic", "bilinear", "nearest"):
        raise ConfigError(f"interpolation must be bicubic, bilinear or nearest, got {interpolation!r}")
    mean = tuple(float(m) for m in (mean if mean is not None else [0.0] * c))
    std = tuple(float(s) for s in (std if std is not None else [1.0] * c))
    if len(mean) != c or len(std) != c or any(s <= 0 for s in std):
        raise ConfigError(f"mean and std need one value per channel ({c}), std positive; got {mean}, {std}")
    module = module.eval()
    for p in module.parameters():  # not module.requires_grad_, which TorchScript modules refuse
        if p.is_leaf:  # a copied TorchScript module's are not; the engine runs in inference mode anyway
            p.requires_grad_(False)
    if num_classes is None:
        num_classes = _infer_num_classes(module, (c, *size))
    num_classes = whole_number("num_classes", num_classes, error=ConfigError)
    name = model_id or type(module).__module__ + "." + type(module).__qualname__
    return NormalizedClassifier(module, InputContract(size, interpolation, mean, std), num_classes, model_id=name)


def from_module(
    module: nn.Module | NormalizedClassifier, input_shape: Sequence[int], *, denoiser: Any = None, **adapter: Any
) -> BaseClassifier:
    """A base classifier around a user's module: plain (Cohen et al.) or, with a ``denoiser``
    (``DiffusionDenoiser``, diffusers folder path or ``DenoiserConfig`` fields), denoise-then-classify."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3:
        raise ConfigError(f"input_shape must be (C, H, W), got {input_shape}")
    clf = module if isinstance(module, NormalizedClassifier) else as_classifier(module, input_shape=shape, **adapter)
    if denoiser is None:
        return PlainBase(clf, shape)
    from .denoiser import DenoiserConfig, load_denoiser

    check_denoiser(denoiser)
    if isinstance(denoiser, str) or hasattr(denoiser, "__fspath__"):
        denoiser = load_denoiser({"path": str(denoiser)})
    elif isinstance(denoiser, (dict, DenoiserConfig)):
        denoiser = load_denoiser(denoiser)
    return DenoiseThenClassify(denoiser, clf, shape)


def check_denoiser(denoiser: Any) -> None:
    """What a denoiser argument names, checked without loading it: the Python API checks it when the
    smoothed classifier is made, though the model is built only on the first image."""
    from .denoiser import DenoiserConfig, DiffusionDenoiser

    if isinstance(denoiser, str) or hasattr(denoiser, "__fspath__"):
        path = str(denoiser)
        if not path.startswith("hf://") and not Path(path).is_dir():
            raise ModelLoadError(f"{path}: no such denoiser folder (for a hub id write hf://owner/name)")
    elif isinstance(denoiser, nn.Module) and not isinstance(denoiser, DiffusionDenoiser):
        raise ConfigError(
            f"denoiser: a {type(denoiser).__name__} alone has no noise schedule to pick t from; give its diffusers "
            "folder (unet/ and scheduler/, as pipeline.save_pretrained writes it) or "
            "raysmooth.models.DiffusionDenoiser(unet, scheduler.alphas_cumprod.numpy())"
        )
    elif not isinstance(denoiser, (dict, DenoiserConfig, DiffusionDenoiser)):
        raise ConfigError(
            f"denoiser must be a diffusers folder, an hf:// id or a DiffusionDenoiser, got {type(denoiser).__name__}"
        )


_ADAPTER_KEYS = ("num_classes", "input_size", "mean", "std", "interpolation")


def user_base_classifier(
    target: str,
    builder: Callable[..., nn.Module],
    *,
    input_shape: Sequence[int],
    classifier: dict | None = None,
    denoiser: dict | None = None,
    **options: Any,
) -> BaseClassifier:
    """``model.base=pkg.module:builder``: ``builder(**model.options)`` returns the module; the
    ``model.classifier`` section may give its input contract (num_classes, input_size, mean, std,
    interpolation) and ``model.denoiser`` puts a diffusion denoiser in front."""
    extra = sorted(set(classifier or {}) - set(_ADAPTER_KEYS))
    if extra:
        raise ConfigError(
            f"model.classifier for model.base={target} takes only {', '.join(_ADAPTER_KEYS)}; got {extra}"
        )
    try:
        module = builder(**options)
    except TypeError as exc:
        raise ConfigError(
            f"model.base={target}: the builder does not take model.options {sorted(options)} ({exc})"
        ) from None
    if not isinstance(module, nn.Module):
        raise ConfigError(f"model.base={target}: the builder returned {type(module).__name__}, not a torch.nn.Module")
    return from_module(module, input_shape, denoiser=denoiser, model_id=target, **(classifier or {}))
