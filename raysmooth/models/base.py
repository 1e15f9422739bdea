"""Base classifiers f: noisy image in [0,1] and its σ ↦ class. A registry of named builders.

The smoothed classifier is g(x) = argmax_c P[f(x + σε) = c]; everything between the noisy input and
the class (denoising, local smoothing, noise conditioning) is part of f. Adding a method is adding one
``@register_base_classifier`` function, as timm registers models: the function's parameters name the
config sections it takes (``denoiser``, ``classifier``, ``onestep``, ``input_shape`` and its options),
so nothing else has to know about it. A name of the form ``pkg.module:builder`` is a user's own
builder that returns a ``torch.nn.Module`` (logits); it is wrapped like any classifier.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, finite_number, one_line, whole_number
from .classifier import ClassifierConfig, NormalizedClassifier, load_classifier
from .denoiser import DenoiserConfig, DiffusionDenoiser, load_denoiser
from .onestep import NoiseConditionedClassifier, OneStepConfig, load_onestep

__all__ = [
    "BaseClassifier",
    "PlainBase",
    "DenoiseThenClassify",
    "DiffSmoothBase",
    "OneStepBase",
    "LinearBase",
    "register_base_classifier",
    "check_base_config",
    "create_base_classifier",
    "list_base_classifiers",
    "model_sections",
    "import_builder",
]

_REGISTRY: dict[str, Callable[..., BaseClassifier]] = {}


def register_base_classifier(fn: Callable[..., BaseClassifier]) -> Callable[..., BaseClassifier]:
    _REGISTRY[fn.__name__] = fn
    return fn


def list_base_classifiers() -> list[str]:
    return sorted(_REGISTRY)


def import_builder(target: str) -> Callable[..., nn.Module]:
    """The function named by ``pkg.module:builder`` (a one-line error when it cannot be imported)."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ConfigError(
            f"model.base: {target!r} is neither a registered base classifier "
            f"({', '.join(list_base_classifiers())}) nor an import path pkg.module:builder"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises while importing
        raise ConfigError(
            f"model.base={target}: cannot import {module_name} ({type(exc).__name__}: {one_line(exc, 160)}); "
            "is it installed or on PYTHONPATH?"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"model.base={target}: {module_name} has no callable {attr!r}")
    return fn


def _bind(name: str, fn: Callable, kwargs: dict[str, Any]) -> None:
    """Check the config sections against the builder's parameters before building anything."""
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as exc:
        text = str(exc)
        missing = text.split("'")[1] if "missing" in text and "'" in text else None
        unexpected = text.split("'")[1] if "unexpected keyword" in text and "'" in text else None
        if missing:
            raise ConfigError(f"model.base={name} needs model.{missing}") from None
        if unexpected:
            raise ConfigError(
                f"model.base={name} takes no {unexpected!r} (model.{unexpected} or model.options.{unexpected})"
            ) from None
        raise ConfigError(f"model.base={name}: {text}") from None


def _user_builder(name: str) -> bool:
    return ":" in name and name not in _REGISTRY


def check_base_config(name: str, **kwargs: Any) -> None:
    """What ``create_base_classifier`` checks before it builds a registered base: a known name and
    sections that fit its parameters. The job runs it on the driver, so a mistyped ``model.base`` is one
    line before any Ray actor starts rather than a worker's error seconds later. A user's
    ``pkg.module:builder`` is left to where it is imported and built (the workers: a module that needs
    their packages or GPUs must not be imported on a CPU head node just to be checked)."""
    if _user_builder(name):
        return
    if name not in _REGISTRY:
        raise ConfigError(
            f"model.base: unknown base classifier {name!r}; choose one of {', '.join(list_base_classifiers())} "
            "or give an import path pkg.module:builder"
        )
    _bind(name, _REGISTRY[name], kwargs)
    if isinstance(kwargs.get("denoiser"), dict):
        from .denoiser import denoiser_config

        denoiser_config(kwargs["denoiser"])


def create_base_classifier(name: str, **kwargs: Any) -> BaseClassifier:
    """Build the base classifier registered as ``name`` (or a user's ``pkg.module:builder``) from
    config sections: each builder takes the sections its parameters name."""
    if _user_builder(name):
        from .adapter import user_base_classifier

        return user_base_classifier(name, import_builder(name), **kwargs)
    check_base_config(name, **kwargs)
    return _REGISTRY[name](**kwargs)


def model_sections(model: Any) -> tuple[str, dict[str, Any]]:
    """``(base name, builder arguments)`` from a model config (``ModelCfg`` or a dict of its fields):
    every non-empty section and ``input_shape``, with the options spread in."""
    get = model.get if isinstance(model, dict) else lambda k, d=None: getattr(model, k, d)
    kwargs: dict[str, Any] = {"input_shape": list(get("input_shape"))}
    for section in ("denoiser", "classifier", "onestep"):
        if get(section):
            kwargs[section] = dict(get(section))
    kwargs.update(dict(get("options") or {}))
    return get("base"), kwargs


class BaseClassifier(nn.Module):
    """The composite f. ``classify`` returns one class per sample; ``num_classes`` and
    ``input_shape`` (C, H, W) state what it certifies, so inputs can be checked before sampling."""

    num_classes: int
    input_shape: tuple[int, int, int]
    aux_noise_per_sample: int = 0  # extra noise images per sample (stochastic multi-step denoising)

    def logits(self, z: torch.Tensor, sigma: torch.Tensor, aux_noise: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def classify(self, z: torch.Tensor, sigma: torch.Tensor, aux_noise: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits(z, sigma, aux_noise).argmax(dim=1)

    def forward(self, z: torch.Tensor, sigma: torch.Tensor, aux_noise: torch.Tensor | None = None) -> torch.Tensor:
        """The logits (or votes) of every sample: what the engine compiles and counts the argmax of."""
        return self.logits(z, sigma, aux_noise)

    @property
    def model_id(self) -> str:
        parts = [getattr(m, "model_id", None) for m in self.children()]
        return type(self).__name__ + ":" + "+".join(p for p in parts if p)


class PlainBase(BaseClassifier):
    """Cohen et al.: classify the noisy input."""

    def __init__(self, classifier: NormalizedClassifier, input_shape: tuple[int, int, int]):
        super().__init__()
        _check_channels(input_shape, classifier)
        self.classifier = classifier
        self.num_classes = classifier.num_classes
        self.input_shape = tuple(input_shape)

    def logits(self, z, sigma, aux_noise=None):
        return self.classifier(z)


def _check_channels(input_shape: Sequence[int], *modules: nn.Module) -> None:
    """The images' channels must be those each model was built for (3-channel images into a greyscale
    denoiser or classifier was a convolution error from inside the first batch). A module that does not
    say (a user's own, wrapped by the adapter) is not checked."""
    for module in modules:
        channels = getattr(module, "in_channels", None)
        if channels is not None and int(input_shape[0]) != int(channels):
            kind = "denoiser" if isinstance(module, DiffusionDenoiser) else "classifier"
            raise ConfigError(
                f"the {kind} {getattr(module, 'model_id', '') or ''} takes {channels}-channel images but the "
                f"input shape is {tuple(input_shape)} (C, H, W)"
            )


class DenoiseThenClassify(BaseClassifier):
    """Carlini et al. / Jeong & Shin: one-shot (or multi-step) diffusion denoising, then classify."""

    def __init__(
        self, denoiser: DiffusionDenoiser, classifier: NormalizedClassifier, input_shape: tuple[int, int, int]
    ):
        super().__init__()
        _check_channels(input_shape, denoiser, classifier)
        self.denoiser = denoiser
        self.classifier = classifier
        self.num_classes = classifier.num_classes
        self.input_shape = tuple(input_shape)
        self.aux_noise_per_sample = denoiser.aux_noise_per_sample

    def logits(self, z, sigma, aux_noise=None):
        return self.classifier(self.denoiser(z, sigma, aux_noise))


class DiffSmoothBase(BaseClassifier):
    """DiffSmooth: denoise, add m *fixed* local noises, soft-vote over the mean softmax.

    The local noises are drawn once from ``local_seed`` and reused for every sample, so f stays a
    deterministic function and Cohen's certificate applies with the global σ.
    """

    def __init__(
        self,
        denoiser: DiffusionDenoiser,
        classifier: NormalizedClassifier,
        input_shape: tuple[int, int, int],
        local_sigma: float = 0.25,
        local_samples: int = 5,
        local_seed: int = 42,
    ):
        super().__init__()
        local_samples = whole_number("model.options.local_samples", local_samples, error=ConfigError)
        local_seed = whole_number("model.options.local_seed", local_seed, minimum=None, error=ConfigError)
        if not (isinstance(local_sigma, (int, float)) and math.isfinite(local_sigma) and local_sigma >= 0):
            raise ConfigError(f"model.options.local_sigma must be a finite number >= 0, got {local_sigma!r}")
        _check_channels(input_shape, denoiser, classifier)
        self.denoiser = denoiser
        self.classifier = classifier
        self.num_classes = classifier.num_classes
        self.input_shape = tuple(input_shape)
        self.aux_noise_per_sample = denoiser.aux_noise_per_sample
        gen = torch.Generator().manual_seed(int(local_seed))
        eta = torch.randn((local_samples, *input_shape), generator=gen) * float(local_sigma)
        self.register_buffer("local_noise", eta, persistent=False)

    def logits(self, z, sigma, aux_noise=None):
        x = self.denoiser(z, sigma, aux_noise)  # (B, C, H, W) in [0,1]
        b, m = x.shape[0], self.local_noise.shape[0]
        local = (x[:, None] + self.local_noise[None].to(x.dtype)).reshape(b * m, *x.shape[1:])
        probs = self.classifier(local).float().softmax(dim=1).view(b, m, -1).mean(dim=1)
        return probs  # the vote; argmax of the mean softmax


class OneStepBase(BaseClassifier):
    """rRCM-style: a noise-conditioned classifier sees the noisy input and σ; one forward per sample."""

    def __init__(self, model: NoiseConditionedClassifier, input_shape: tuple[int, int, int]):
        super().__init__()
        _check_channels(input_shape, model)
        self.model = model
        self.num_classes = model.num_classes
        self.input_shape = tuple(input_shape)

    def logits(self, z, sigma, aux_noise=None):
        return self.model(z, sigma)


class LinearBase(BaseClassifier):
    """f(z) = argmax(W·vec(z) + b). With two classes and rows (0, w), P[f(x+σε) = 1] = Φ((w·x+b)/(σ‖w‖)),
    so smoothed probabilities and true radii are known in closed form."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray, input_shape: tuple[int, int, int]):
        super().__init__()
        weight = torch.as_tensor(np.asarray(weight), dtype=torch.float32)
        bias = torch.as_tensor(np.asarray(bias), dtype=torch.float32)
        if weight.ndim != 2 or weight.shape[1] != int(np.prod(input_shape)) or bias.shape != (weight.shape[0],):
            raise ConfigError("linear: weight must be (classes, C·H·W) and bias (classes,)")
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.num_classes = int(weight.shape[0])
        self.input_shape = tuple(input_shape)

    def logits(self, z, sigma, aux_noise=None):
        return z.flatten(1).to(self.weight.dtype) @ self.weight.T + self.bias


# ---- registered builders (config data in, module out) --------------------------------------------
def _shape(input_shape) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3:
        raise ConfigError(f"model.input_shape must be (C, H, W), got {input_shape}")
    return shape  # type: ignore[return-value]


@register_base_classifier
def plain(classifier: dict | ClassifierConfig, input_shape) -> PlainBase:
    return PlainBase(load_classifier(classifier), _shape(input_shape))


@register_base_classifier
def dds(denoiser: dict | DenoiserConfig, classifier: dict | ClassifierConfig, input_shape) -> DenoiseThenClassify:
    return DenoiseThenClassify(load_denoiser(denoiser), load_classifier(classifier), _shape(input_shape))


@register_base_classifier
def diffsmooth(
    denoiser: dict | DenoiserConfig,
    classifier: dict | ClassifierConfig,
    input_shape,
    local_sigma: float = 0.25,
    local_samples: int = 5,
    local_seed: int = 42,
) -> DiffSmoothBase:
    return DiffSmoothBase(
        load_denoiser(denoiser),
        load_classifier(classifier),
        _shape(input_shape),
        local_sigma,
        local_samples,
        local_seed,
    )


@register_base_classifier
def onestep(onestep: dict | OneStepConfig, input_shape) -> OneStepBase:
    return OneStepBase(load_onestep(onestep), _shape(input_shape))


@register_base_classifier
def linear(input_shape, weight=None, bias=None, num_classes: int = 10, seed: int = 0, scale: float = 1.0) -> LinearBase:
    """Given weights, or random ones (seeded, times ``scale``) centred on the mid-grey image."""
    shape = _shape(input_shape)
    if weight is None:
        num_classes = whole_number("model.options.num_classes", num_classes, minimum=2, error=ConfigError)
        seed = whole_number("model.options.seed", seed, minimum=0, error=ConfigError)
        if not finite_number("model.options.scale", scale, error=ConfigError) > 0:  # 0: class 0 for every input
            raise ConfigError(f"model.options.scale must be a positive number, got {scale!r}")
        rng = np.random.default_rng(seed)
        weight = scale * rng.standard_normal((num_classes, int(np.prod(shape)))) / np.sqrt(np.prod(shape))
        bias = -weight @ np.full(int(np.prod(shape)), 0.5) if bias is None else bias
    if bias is None:
        raise ConfigError("linear: give both weight and bias, or neither")
    return LinearBase(np.asarray(weight), np.asarray(bias), shape)
