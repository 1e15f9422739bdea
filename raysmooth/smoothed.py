"""The Python API: ``Smoothed(model, sigma).certify(x, n0, n, alpha)`` in one process, no Ray, no store.

For a researcher with a model in a notebook::

    from raysmooth import Smoothed
    smoothed = Smoothed(my_module, sigma=0.5, num_classes=10)          # any nn.Module returning logits
    cert = smoothed.certify(x, n0=100, n=10_000, alpha=0.001)          # x: (C, H, W) in [0, 1]
    cert.prediction, cert.radius, cert.p_lower, cert.counts

It runs the same engine and the same statistics as the certify job: with the same seed, σ list, chunk
size and noise block, ``certify_batch(images, ids=...)`` draws exactly the counts the job stores for
those image ids (tests/test_smoothed.py checks it).
"""

from __future__ import annotations

import copy
import logging
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import stats
from .config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_RADII,
    EngineCfg,
    SequentialCfg,
    SmoothingCfg,
    distinct_in_float32,
    fits_int64,
    large_sigma_warning,
)
from .data import TestSet
from .engine import EngineConfig, Replica, resolve_device, validate_images
from .errors import ConfigError, InputError, finite_number, one_line, whole_number
from .models.base import BaseClassifier, create_base_classifier, list_base_classifiers
from .units import PHASES, WorkUnit, budget_units, split_budget

__all__ = ["Smoothed", "Certificate", "Prediction"]

log = logging.getLogger("raysmooth")


@dataclass(frozen=True)
class Certificate:
    """The outcome for one image. ``prediction`` is -1 when the smoothed classifier abstains."""

    prediction: int
    radius: float  # L2 radius in [0,1] pixel units; 0 when abstaining
    p_lower: float  # the lower confidence bound on p_A behind the answer (NaN when there is none)
    counts: np.ndarray  # the estimation counts per class (of the σ that answered, for the cascade)
    n_used: int  # samples drawn: selection and estimation, over every σ used
    sigma: float | None = None  # the σ whose counts gave the answer
    reason: str = ""  # why it abstains ("" when it does not)
    selection_counts: np.ndarray | None = field(default=None, repr=False)
    rounds: int | None = None  # sequential: estimation rounds drawn
    stop_reason: str = ""  # sequential: why sampling stopped (certified_all, futile, n_max, …)
    grid_radius: float | None = None  # sequential: the largest grid radius the decisions certified

    @property
    def abstained(self) -> bool:
        return self.prediction < 0


@dataclass(frozen=True)
class Prediction:
    """Cohen's PREDICT: the top class if the binomial test separates it from the runner-up."""

    prediction: int  # -1 = abstain
    p_value: float
    counts: np.ndarray
    n_used: int

    @property
    def abstained(self) -> bool:
        return self.prediction < 0


def _as_image(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x
    else:
        a = np.asarray(x)
        if a.dtype.kind not in "biuf":  # strings, objects, ragged lists: not pixels
            raise InputError(f"images must be numbers (a tensor or an array), got an array of {a.dtype}")
        t = torch.from_numpy(a if a.flags.writeable else a.copy())  # PIL's arrays are read-only
    if t.is_complex():
        raise InputError("images must be real numbers, got complex ones")
    if not (t.is_floating_point() or t.dtype == torch.bool) and t.numel() and int(t.max()) > 1:
        raise InputError(
            f"images must lie in [0, 1], got {str(t.dtype).removeprefix('torch.')} values up to {int(t.max())}: "
            "an 8-bit image (PIL, OpenCV, torchvision.io) is x / 255 as floats"
        )
    return t.detach().to("cpu", torch.float32)


def _batch_input(xs: Any) -> Any:
    """A generator of images as the list it yields; a ``TestSet`` refused with what to pass instead
    (numpy would read the record as one object and the error would not say why)."""
    if isinstance(xs, TestSet):
        raise InputError("got a TestSet: pass its .images (and ids=its .ids, to keep the job's image ids)")
    return list(xs) if isinstance(xs, Iterator) else xs


def _no_images(xs: Any, ids: Sequence[int] | None) -> bool:
    """An empty list or (0, C, H, W) batch: certified as an empty list, nothing built or drawn."""
    shape = getattr(xs, "shape", None)
    empty = len(shape) == 4 and shape[0] == 0 if shape is not None else isinstance(xs, (list, tuple)) and not xs
    if empty and ids:
        raise InputError(f"{len(ids)} ids for no images")
    return empty


def _one_image(x: Any, method: str) -> torch.Tensor:
    """``x`` as a batch of one, refusing a batch: a (1, C, H, W) given to ``certify`` would otherwise be
    read as one image of shape (1, C, H, W) and refused with a confusing shape."""
    img = _as_image(x)
    if img.ndim != 3:
        several = {2: "; a grey image needs its channel axis: x[None]"}.get(img.ndim, "")
        if img.ndim == 4 and method == "certify":
            several = "; for a batch use certify_batch"
        raise InputError(f"{method} takes one image of shape (C, H, W), got {tuple(img.shape)}{several}")
    return img[None]


def _not_a_model(what: Any) -> ConfigError:
    if isinstance(what, (str, Path)):
        from .models.checkpoints import CONFIG_NAME

        return ConfigError(
            f"{what}: neither a registered base classifier ({', '.join(list_base_classifiers())}) "
            f"nor a model folder with {CONFIG_NAME}"
        )
    return ConfigError(
        f"model must be an nn.Module, a base-classifier name or a model folder, got {type(what).__name__}"
    )


def _names_a_builder(name: str) -> bool:
    """A registered base classifier (``dds``) or an import path (``pkg.module:builder``), not a folder."""
    return name in list_base_classifiers() or (":" in name and not Path(name).exists())


def _check_references(model: Any, denoiser: Any) -> None:
    """What the model and denoiser name, checked at construction without building anything: the model is
    built lazily (on the first image, unless input_shape is given), so model=None or a mistyped folder
    were first heard of at the first certify, far from the line that made the mistake."""
    if not isinstance(model, (nn.Module, str, Path)):
        raise _not_a_model(model)
    if isinstance(model, (str, Path)):
        from .models.checkpoints import CONFIG_NAME

        if not _names_a_builder(str(model)) and not (Path(model) / CONFIG_NAME).is_file():
            raise _not_a_model(model)
    if denoiser is not None:
        from .models.adapter import check_denoiser

        check_denoiser(denoiser)


def _own_copy(obj: Any, what: str) -> Any:
    """A caller's module, copied: the engine puts its model in eval mode, freezes it and may cast it to bf16
    (a notebook would go on training a model left so), and a certificate is for the weights as given,
    not for what later training makes of them."""
    if not isinstance(obj, nn.Module):
        return obj
    try:
        return copy.deepcopy(obj)
    except Exception as exc:  # noqa: BLE001 - a module holding something that cannot be copied (a lock, a handle)
        log.warning(
            "%s: the module cannot be copied (%s: %s), so it is certified in place: it is left in eval mode with "
            "frozen weights (in the engine's precision), and training it further changes what this object certifies",
            what,
            type(exc).__name__,
            one_line(exc, 120),
        )
        return obj


# Work units one call lists (each image's chunks, drawn group by group): n=1e14 in chunks of 10,000
# was a MemoryError while they were listed. The job's planner issues units lazily and has no such limit.
MAX_CALL_UNITS = 20_000_000


def _engine_words(text: str) -> str:
    """The engine's complaint in the API's words: ``engine.compile=true`` is the argument ``compile=True``."""
    return re.sub(r"\bengine\.(\w+)", r"\1", text).replace("=true", "=True")


def _model_kwargs_words(text: str) -> str:
    """A registered builder's complaint about its config sections, in the API's words: ``model.base=dds
    needs model.denoiser`` becomes ``dds needs model_kwargs['denoiser']``."""
    text = re.sub(r"takes no '(\w+)' \(model\.\w+ or model\.options\.\w+\)", r"takes no model_kwargs['\1']", text)
    text = re.sub(r"\bmodel\.base=(\S+)", r"\1", text)
    return re.sub(r"\bmodel\.(\w+)", r"model_kwargs['\1']", text)


def _refuse_channels_last(shape: tuple[int, ...]) -> None:
    """The first image fixes the model's input shape: an (H, W, C) array from PIL or OpenCV would be read
    as H channels of H × W pixels, which a model that flattens its input runs without complaint."""
    if len(shape) == 3 and shape[0] > 4 and shape[-1] in (1, 3, 4):
        raise InputError(
            f"the image looks channels-last (H, W, C) = {tuple(shape)}; images are (C, H, W): pass "
            "x.transpose(2, 0, 1) (numpy) or x.permute(2, 0, 1) (torch), or give input_shape= to declare "
            f"{tuple(shape)} as (C, H, W)"
        )


class Smoothed:
    """A smoothed classifier g around a base classifier f, certified in this process.

    ``model``: a ``torch.nn.Module`` returning logits (wrapped with optional ``mean``/``std``
    normalisation and resizing to ``input_size``, as it was trained), a ``BaseClassifier``, a
    registered base-classifier name (``dds``, ``onestep``, ``linear`` …, configured by
    ``model_kwargs``), an import path ``pkg.module:builder``, or a folder saved by
    ``save_classifier``/``save_onestep``. ``denoiser`` (a diffusers folder, ``DenoiserConfig`` fields or a
    ``DiffusionDenoiser``) puts one-shot diffusion denoising in front of a module or classifier folder.
    ``sigma``: one noise level or several (for ``cascade``). ``compile=True`` runs the model through
    ``torch.compile`` (as ``engine.compile``; worth it for long runs, docs/methods.md §8.5);
    ``compile_mode`` is torch.compile's mode (``engine.compile_mode``, needs ``compile=True``);
    ``attention`` says how a timm BEiT's biased attention runs (``engine.attention``: ``"sdpa_cached"``
    computes its bias once, as the compiled presets do, 1.064× on an H100; ``"sdpa_by_head"`` also batches
    the attention by head; ``"flex"`` runs FlexAttention and needs ``compile=True``); ``gelu="epilogue"``
    runs a timm MLP's GELU in its first matmul's epilogue (``engine.gelu``, the compiled presets' setting:
    1.018× on the ImageNet pair and 1.045× on the CIFAR pair on an H100; on a GPU it is the tanh GELU).
    ``channels_last=True`` keeps the model's activations in the channels-last memory layout on the device
    (``engine.channels_last``, as the compiled presets do; images are still given as (C, H, W)), and
    ``group_norm="channels_last"`` computes GroupNorm in that layout (``engine.group_norm``; needs
    ``compile=True`` and ``channels_last=True``).
    ``progress``: a bar of samples drawn (a widget in a notebook) for every call that runs over 2 s.
    A module ``model`` or ``denoiser`` is copied here: the caller's is never changed (its mode, weights and
    dtype stay as they were), and training it further does not change what this object certifies.
    """

    PROGRESS_DELAY_S = 2.0  # a call shows its bar once it has run this long: short calls stay quiet

    def __init__(
        self,
        model: Any,
        sigma: float | Sequence[float],
        *,
        num_classes: int | None = None,
        input_shape: Sequence[int] | None = None,
        denoiser: Any = None,
        seed: int = 0,
        batch_size: int | str = DEFAULT_BATCH_SIZE,
        device: str = "auto",
        precision: str = EngineCfg.precision,
        compile: bool = False,
        channels_last: bool = False,
        compile_mode: str = EngineCfg.compile_mode,
        attention: str = EngineCfg.attention,
        group_norm: str = EngineCfg.group_norm,
        gelu: str = EngineCfg.gelu,
        noise_block: int = EngineCfg.noise_block,
        chunk: int = SmoothingCfg.chunk,
        noise: str = "gaussian",
        levels: int = EngineCfg.levels,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        input_size: Sequence[int] | None = None,
        interpolation: str | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        progress: bool = True,
    ):
        try:  # True would be σ = 1 and "0.25" a σ parsed from text: neither is a number given as one
            sigmas = [float(sigma)] if np.ndim(sigma) == 0 else [float(s) for s in np.ravel(sigma)]
            given = sigma if isinstance(sigma, (list, tuple)) else [sigma]
            if any(isinstance(s, (bool, np.bool_, str, bytes)) for s in given):
                raise TypeError
        except (TypeError, ValueError):
            raise ConfigError(f"sigma must be a number or a list of numbers, got {sigma!r}") from None
        if not sigmas:
            raise ConfigError("sigma must name at least one noise level, got none")
        for s in sigmas:
            try:
                stats.check_sigma(s)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if not distinct_in_float32(sigmas):
            raise ConfigError(f"sigma lists a value twice (in float32): {sigmas}")
        if warning := large_sigma_warning(sigmas):
            log.warning("sigma: %s", warning)
        self.sigmas = sorted(sigmas)  # index order = ascending σ, as in the job
        self.seed = whole_number("seed", seed, minimum=None, error=ConfigError)
        if not fits_int64(self.seed):  # the job stores it as an int64: the same seed must name the same noise
            raise ConfigError(f"seed must fit in 64 bits, as the job stores it, got {self.seed}")
        self.chunk = whole_number("chunk", chunk, error=ConfigError)
        for name, flag in (("compile", compile), ("channels_last", channels_last), ("progress", progress)):
            if not isinstance(flag, (bool, np.bool_)):  # bool("false") is True: a string would switch it on
                raise ConfigError(f"{name} must be True or False, got {flag!r}")
        try:
            self.engine = EngineConfig(
                batch_size=batch_size,
                noise_block=noise_block,
                precision=precision,
                compile=bool(compile),
                channels_last=bool(channels_last),
                compile_mode=compile_mode,
                attention=attention,
                group_norm=group_norm,
                gelu=gelu,
                noise=noise,
                levels=levels,
            )
        except InputError as exc:  # said in the job's words (engine.compile=true); here they are arguments
            raise type(exc)(_engine_words(str(exc))) from None
        self.device = str(resolve_device(device))
        _check_references(model, denoiser)
        self._model, self._denoiser = _own_copy(model, "model"), _own_copy(denoiser, "denoiser")
        # Checked here, not only against the model's logits: num_classes=True or 2.5 would otherwise first be
        # met as a puzzling mismatch, and num_classes=1 (nothing to smooth) only once a model agreed.
        self._num_classes = None if num_classes is None else whole_number("num_classes", num_classes, 2, ConfigError)
        given = dict(mean=mean, std=std, input_size=input_size, interpolation=interpolation)
        self._adapter = {k: v for k, v in given.items() if v is not None}  # how a module was trained
        self._model_kwargs = dict(model_kwargs or {})
        self.progress = bool(progress)
        self.input_shape = tuple(int(s) for s in input_shape) if input_shape is not None else None
        self._replica: Replica | None = None
        # A shape taken from the first image is held only once the model has run on it: a first image of
        # the wrong shape (3 channels into a grey model) must not make every later, right one an error.
        self._shape_from_image = input_shape is None
        self._shape_proven = input_shape is not None
        if self.input_shape is not None:
            self._build(self.input_shape)

    # ---- the base classifier --------------------------------------------------------------------
    def _base(self, shape: tuple[int, int, int]) -> BaseClassifier:
        from .models.adapter import from_module

        model = self._model
        if isinstance(model, BaseClassifier):
            self._refuse_unused("a BaseClassifier, used as it is", denoiser=True, adapter=True, kwargs=True)
            return model
        if isinstance(model, nn.Module):
            self._refuse_unused("a module (build it with them instead)", kwargs=True)
            return from_module(model, shape, denoiser=self._denoiser, num_classes=self._num_classes, **self._adapter)
        if isinstance(model, (str, Path)):
            name = str(model)
            if _names_a_builder(name):
                what = f"{name}, configured by model_kwargs (dds: model_kwargs={{'denoiser': {{'path': …}}}})"
                self._refuse_unused(what, denoiser=True, adapter=True)
                try:
                    return create_base_classifier(name, input_shape=list(shape), **self._model_kwargs)
                except ConfigError as exc:  # said in the job's words (model.denoiser); here they are model_kwargs
                    raise ConfigError(_model_kwargs_words(str(exc))) from None
            return self._from_folder(Path(name), shape)
        raise _not_a_model(model)

    def _from_folder(self, folder: Path, shape: tuple[int, int, int]) -> BaseClassifier:
        from .models import OneStepBase, load_onestep
        from .models.adapter import from_module
        from .models.checkpoints import CONFIG_NAME, folder_kind
        from .models.classifier import load_classifier

        if not (folder / CONFIG_NAME).is_file():  # checked at construction too; the folder may have gone since
            raise _not_a_model(folder)
        if folder_kind(folder) == "onestep":
            self._refuse_unused(
                f"{folder}, a one-step model (no denoiser; it carries its own input contract)",
                denoiser=True,
                adapter=True,
                kwargs=True,
            )
            return OneStepBase(load_onestep({"path": str(folder)}), shape)
        self._refuse_unused(
            f"{folder}, a classifier folder that carries its own input contract", adapter=True, kwargs=True
        )
        return from_module(load_classifier({"path": str(folder)}), shape, denoiser=self._denoiser)

    def _refuse_unused(self, what: str, *, denoiser: bool = False, adapter: bool = False, kwargs: bool = False) -> None:
        """Settings this kind of model has no use for are refused: ignored, they would certify another
        model than the one the caller described (no denoiser, no normalisation) without a word."""
        unused = [
            *(["denoiser"] if denoiser and self._denoiser is not None else []),
            *(sorted(self._adapter) if adapter else []),
            *(["model_kwargs"] if kwargs and self._model_kwargs else []),
        ]
        if unused:
            raise ConfigError(f"{', '.join(unused)} would be ignored: the model is {what}")

    def _build(self, shape: tuple[int, ...]) -> Replica:
        if len(shape) != 3:
            raise InputError(f"an image must have shape (C, H, W), got {tuple(shape)}")
        base = self._base(tuple(shape))  # type: ignore[arg-type]
        if self._num_classes is not None and base.num_classes != self._num_classes:
            raise ConfigError(f"num_classes={self._num_classes} but the model predicts {base.num_classes} classes")
        with warnings.catch_warnings():  # a copied TorchScript module's parameters are not leaves: harmless here
            warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
            try:
                self._replica = Replica(base, self.sigmas, self.seed, self.engine, device=self.device)
            except InputError as exc:  # a setting the device cannot run (fp16 on a CPU), in the API's words
                raise type(exc)(_engine_words(str(exc))) from None
        self.input_shape = tuple(base.input_shape)
        return self._replica

    def _ready(self, shape: tuple[int, ...]) -> Replica:
        if self._replica is None or (not self._shape_proven and tuple(shape) != self.input_shape):
            _refuse_channels_last(shape)
            return self._build(shape)
        if tuple(shape) != self.input_shape:
            taken = " (taken from the first image; input_shape= declares it)" if self._shape_from_image else ""
            raise InputError(f"images must have shape {self.input_shape} for this model{taken}, got {tuple(shape)}")
        return self._replica

    @property
    def num_classes(self) -> int:
        if self._replica is None:
            raise ConfigError("the model is built on the first image (or give input_shape)")
        return self._replica.num_classes

    # ---- sampling ----------------------------------------------------------------------------
    def _sigma_index(self, sigma: float | None) -> int:
        if sigma is None:
            if len(self.sigmas) != 1:
                raise ConfigError(f"this smoothed classifier has σ = {self.sigmas}: say which (sigma=…)")
            return 0
        sigma = finite_number("sigma", sigma, ConfigError)  # as at construction: text is no σ
        # Relative float32 precision: sigma=np.float32(0.1) names the level 0.1 (its noise is float32 anyway).
        matches = [i for i, s in enumerate(self.sigmas) if np.isclose(s, sigma, rtol=1e-6, atol=0)]
        if not matches:
            raise ConfigError(
                f"sigma={sigma} is not one of this classifier's σ {self.sigmas}: build it with every σ it is to "
                f"use, e.g. Smoothed(…, sigma={sorted({*self.sigmas, sigma})})"
            )
        return matches[0]

    def _stack(self, xs: Any) -> torch.Tensor:
        if isinstance(xs, (list, tuple)):
            images = [_as_image(x) for x in xs]
            shapes = sorted({tuple(i.shape) for i in images})
            if len(shapes) > 1:
                raise InputError(f"images of a batch must share one shape, got {shapes}")
            batch = torch.stack(images) if images else torch.empty(0)
        else:
            batch = _as_image(xs)
        if batch.ndim != 4:
            hint = " (one image: certify, or x[None])" if batch.ndim == 3 else ""
            raise InputError(f"a batch of images must have shape (N, C, H, W), got {tuple(batch.shape)}{hint}")
        replica = self._ready(tuple(batch.shape[1:]))
        validate_images(batch, None, replica.shape, replica.num_classes)
        return batch

    def _samples(self, name: str, value: Any) -> int:
        """A sample count as a whole number the call can split into work units (checked before any sample is
        drawn): n=1e14 in chunks of 10,000 was a MemoryError while its units were listed."""
        n = whole_number(name, value)
        if not fits_int64(n):
            raise InputError(f"{name} must be below 2**63 (counts are int64), got {n}")
        if (units := budget_units(n, self.chunk)) > MAX_CALL_UNITS:
            raise InputError(
                f"{name}={n:,} in chunks of chunk={self.chunk:,} is {units:,} work units, more than the "
                f"{MAX_CALL_UNITS:,} one call lists; lower {name} or build with a larger chunk= (it seeds the noise)"
            )
        return n

    def _ids(self, batch: torch.Tensor, ids: Sequence[int] | None) -> list[int]:
        ids = list(range(len(batch))) if ids is None else [whole_number("an image id", i, minimum=0) for i in ids]
        if len(ids) != len(batch) or len(set(ids)) != len(ids):
            raise InputError(f"ids must name each of the {len(batch)} images once")
        if ids and not fits_int64(max(ids)):  # the job's image_id column: an id beyond it has no job counts to match
            raise InputError(f"an image id must be below 2**63 (stored as int64), got {max(ids)}")
        return ids

    def _draw(
        self,
        batch: torch.Tensor,
        ids: list[int],
        rows: Sequence[int],
        sigma_index: int,
        phase: str,
        chunks: list[tuple[int, int]],
        out: np.ndarray,
        group_samples: int,
        bar: Any = None,
    ) -> None:
        """Add to ``out[r]``, for every row ``r``, the counts of the work units (chunk index, size) in
        ``chunks`` of image ``ids[r]``: the job's units, so the job's noise. Images go to the engine in
        groups of about ``group_samples`` samples, so memory stays bounded."""
        group_samples = whole_number("group_samples", group_samples, error=ConfigError)
        per_group = max(1, group_samples // max(1, sum(size for _, size in chunks)))
        progress = bar.update if bar is not None else None
        for g in range(0, len(rows), per_group):
            row_of = {ids[r]: r for r in rows[g : g + per_group]}
            units = [WorkUnit(i, sigma_index, phase, c, size) for i in row_of for c, size in chunks]
            try:
                counts = self._replica.run(units, {i: batch[r] for i, r in row_of.items()}, progress)
            except InputError as exc:  # the engine's advice (engine.levels=255) as this API's arguments
                raise type(exc)(_engine_words(str(exc))) from exc.__cause__
            self._shape_proven = True
            for u in units:
                out[row_of[u.image_id]] += counts[u.key]

    def counts(
        self, xs: Any, *, phase: str, n: int, sigma_index: int, ids: Sequence[int], group_samples: int = 200_000
    ) -> np.ndarray:
        """Dense counts (N, classes) of ``n`` draws per image in ``phase`` at σ number ``sigma_index``,
        split into chunks and seeded exactly as the job's work units."""
        if phase not in PHASES:
            raise ConfigError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
        batch = self._stack(xs)
        n = self._samples("the number of samples", n)
        sigma_index = whole_number("sigma_index", sigma_index, minimum=0)
        if sigma_index >= len(self.sigmas):
            raise InputError(f"sigma_index={sigma_index}, but this classifier has {len(self.sigmas)} σ: {self.sigmas}")
        ids = self._ids(batch, ids)
        out = np.zeros((len(ids), self._replica.num_classes), dtype=np.int64)
        chunks = list(enumerate(split_budget(n, self.chunk)))
        with self._bar(len(ids) * n, f"{phase} σ={self.sigmas[sigma_index]:g}") as bar:
            self._draw(batch, ids, range(len(ids)), sigma_index, phase, chunks, out, group_samples, bar)
        return out

    def _bar(self, total: int | None, desc: str):
        """Samples drawn, for calls that run over ``PROGRESS_DELAY_S`` (tqdm.auto: a notebook widget, else stderr)."""
        from tqdm.auto import tqdm

        return tqdm(
            total=total,
            desc=desc,
            unit="sample",
            unit_scale=True,
            delay=self.PROGRESS_DELAY_S,
            leave=False,
            disable=not self.progress,
        )

    def _certificates(
        self, cert: stats.Certificates, sel: np.ndarray, est: np.ndarray, sigma_index: int, **extra: Any
    ) -> list[Certificate]:
        """One Certificate per image from vectorised results; ``extra`` holds per-image arrays."""
        return [
            Certificate(
                int(cert.prediction[i]),
                float(cert.radius[i]),
                float(cert.p_lower[i]),
                est[i],
                int(sel[i].sum() + est[i].sum()),
                self.sigmas[sigma_index],
                stats.Reason.NAMES[cert.reason[i]],
                sel[i],
                **{k: v[i] for k, v in extra.items()},
            )
            for i in range(len(sel))
        ]

    # ---- certificates ------------------------------------------------------------------------
    def _noise(self, sigma_index: int) -> tuple[float, float]:
        """(σ the noise really had, margin on p_A) for one level."""
        applied = self._replica.applied_sigmas[sigma_index]
        if self.engine.noise != "lattice":
            return applied, 0.0
        from .noise import lattice_margin

        return applied, lattice_margin(self.sigmas[sigma_index], self.engine.levels, int(np.prod(self.input_shape)))

    def certify_batch(
        self,
        xs: Any,
        n0: int = 100,
        n: int = 100_000,
        alpha: float = 0.001,
        *,
        sigma: float | None = None,
        ids: Sequence[int] | None = None,
    ) -> list[Certificate]:
        """CERTIFY (Cohen et al.) for many images, packed into full batches."""
        _check_alpha(alpha)
        n0, n = self._samples("n0", n0), self._samples("n", n)  # before any sample is spent
        xs = _batch_input(xs)
        if _no_images(xs, ids):
            return []
        batch = self._stack(xs)
        ids = self._ids(batch, ids)
        s = self._sigma_index(sigma)
        sel = self.counts(batch, phase="selection", n=n0, sigma_index=s, ids=ids)
        est = self.counts(batch, phase="estimation", n=n, sigma_index=s, ids=ids)
        applied, margin = self._noise(s)
        cert = stats.certify(
            stats.SparseCounts.from_dense(sel), stats.SparseCounts.from_dense(est), applied, alpha, margin=margin
        )
        return self._certificates(cert, sel, est, s)

    def certify(
        self,
        x: Any,
        n0: int = 100,
        n: int = 100_000,
        alpha: float = 0.001,
        *,
        sigma: float | None = None,
        image_id: int = 0,
    ) -> Certificate:
        """CERTIFY for one image ``x`` of shape (C, H, W) in [0, 1]."""
        return self.certify_batch(_one_image(x, "certify"), n0, n, alpha, sigma=sigma, ids=[image_id])[0]

    def certify_sequential(
        self,
        xs: Any,
        n0: int = 100,
        n_max: int = SequentialCfg.n_max,
        alpha: float = 0.001,
        *,
        radii: Sequence[float] = tuple(DEFAULT_RADII),
        unit: int = SequentialCfg.unit,
        look_ratio: float = SequentialCfg.look_ratio,
        alpha_spending: str = SequentialCfg.alpha_spending,
        futility_beta: float = SequentialCfg.futility_beta,
        precision: float | None = None,
        r_cap: float | None = None,
        sigma: float | None = None,
        ids: Sequence[int] | None = None,
        group_samples: int = 200_000,
    ) -> list[Certificate]:
        """Sequential CERTIFY (docs/sequential.md) for many images: rounds of ``unit`` samples, looked at
        on a doubling schedule up to ``n_max``, each image stopped once every radius of ``radii`` is
        decided. Valid at level ``alpha`` under that stopping. With the same seed, σ list and unit it
        draws exactly the noise of ``raysmooth certify smoothing.mode=sequential``."""
        _check_alpha(alpha)
        n0 = self._samples("n0", n0)
        unit = whole_number("unit", unit, error=ConfigError)  # it also numbers the chunks of every round below
        n_max = whole_number("n_max", n_max, error=ConfigError)
        if n_max // unit > MAX_CALL_UNITS:
            raise ConfigError(
                f"n_max={n_max:,} in units of unit={unit:,} is {n_max // unit:,} work units, more than the "
                f"{MAX_CALL_UNITS:,} one call lists; raise unit or lower n_max"
            )
        # Numbers, not text: look_ratio="2" and precision="0.1" were TypeErrors from inside the design.
        look_ratio = finite_number("look_ratio", look_ratio, ConfigError)
        futility_beta = finite_number("futility_beta", futility_beta, ConfigError)
        precision = None if precision is None else finite_number("precision", precision, ConfigError)
        r_cap = None if r_cap is None else finite_number("r_cap", r_cap, ConfigError)
        radii = _number_list("radii", radii)
        if not radii:  # the job refuses an empty grid too; [0] is the grid that asks only for a prediction
            raise ConfigError(
                "radii is empty: give the radii to decide, e.g. radii=[0.25, 0.5] ([0]: certified at all)"
            )
        xs = _batch_input(xs)
        if _no_images(xs, ids):
            return []
        batch = self._stack(xs)
        ids = self._ids(batch, ids)
        s = self._sigma_index(sigma)
        applied, margin = self._noise(s)
        try:
            d = stats.sequential.design(
                alpha,
                unit,
                n_max,
                radii,
                applied,
                ratio=look_ratio,
                spending=alpha_spending,
                beta=futility_beta,
                margin=margin,
                precision=precision,
                r_cap=r_cap,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        sel = self.counts(batch, phase="selection", n=n0, sigma_index=s, ids=ids)
        c_hat = sel.argmax(axis=1)  # ĉ from the selection samples only, as the job chooses it
        est = np.zeros_like(sel)
        cumulative = np.zeros((len(ids), d.num_looks), np.int64)
        rounds = np.zeros(len(ids), np.int64)
        still_open = np.arange(len(ids))
        with self._bar(None, f"sequential σ={self.sigmas[s]:g}") as bar:  # the total depends on when images stop
            for k in range(d.num_looks):
                bar.set_postfix_str(f"round {k + 1}, {len(still_open)} of {len(ids)} images open", refresh=False)
                first, last = (0 if k == 0 else int(d.looks[k - 1])) // unit, int(d.looks[k]) // unit
                chunks = [(c, unit) for c in range(first, last)]  # round k: the units between looks k-1 and k
                self._draw(batch, ids, still_open, s, "estimation", chunks, est, group_samples, bar)
                cumulative[still_open, k] = est[still_open, c_hat[still_open]]
                rounds[still_open] = k + 1
                still_open = still_open[stats.sequential.decide(d, cumulative[still_open, : k + 1])]
                if len(still_open) == 0:
                    break
        cert, out = stats.sequential.sequential_certify(c_hat, cumulative, d, rounds)
        grid = [float(d.radii[j]) if j >= 0 else None for j in out.grid_index]
        reasons = [stats.sequential.STOP_REASONS[r] for r in out.reason]
        return self._certificates(cert, sel, est, s, rounds=rounds.tolist(), stop_reason=reasons, grid_radius=grid)

    def predict(
        self, x: Any, n: int = 10_000, alpha: float = 0.001, *, sigma: float | None = None, image_id: int = 0
    ) -> Prediction:
        """PREDICT for one image: abstains unless the top class beats the runner-up at level ``alpha``."""
        _check_alpha(alpha)
        n = self._samples("n", n)
        s = self._sigma_index(sigma)
        counts = self.counts(_one_image(x, "predict"), phase="estimation", n=n, sigma_index=s, ids=[image_id])
        sparse = stats.SparseCounts.from_dense(counts)
        result = stats.predict(sparse, alpha)
        _c1, n1, _c2, n2 = sparse.top2()
        p_value = float(stats.binomial_test_pvalue(n1, n2)[0])
        return Prediction(int(result.prediction[0]), p_value, counts[0], int(counts[0].sum()))

    def cascade(
        self,
        x: Any,
        sigmas: Sequence[float] | None = None,
        p0: float = 0.5,
        policy: str = "strict",
        n0: int = 100,
        n: int = 100_000,
        alpha: float = 0.001,
        *,
        image_id: int = 0,
    ) -> Certificate:
        """The multi-scale cascade (Jeong & Shin) over ``sigmas`` (default: all of this classifier's):
        every level is sampled, then the largest σ whose lower bound clears ``p0`` answers."""
        _check_alpha(alpha)
        n0, n = self._samples("n0", n0), self._samples("n", n)
        try:
            stats.check_p0(p0)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if policy not in stats.POLICIES:
            raise ConfigError(f"policy must be one of {stats.POLICIES}, got {policy!r}")
        asked = _number_list("sigmas", sigmas) if sigmas is not None else self.sigmas
        chosen = sorted(self._sigma_index(s) for s in asked)
        if len(chosen) < 2 or len(set(chosen)) != len(chosen):
            raise ConfigError(f"the cascade needs two or more distinct σ, got {asked}")
        img = _one_image(x, "cascade")
        levels, dense, margin = [], [], 0.0
        for s in chosen:
            sel = self.counts(img, phase="selection", n=n0, sigma_index=s, ids=[image_id])
            est = self.counts(img, phase="estimation", n=n, sigma_index=s, ids=[image_id])
            applied, m = self._noise(s)
            margin = max(margin, m)
            levels.append(stats.Level(applied, stats.SparseCounts.from_dense(sel), stats.SparseCounts.from_dense(est)))
            dense.append((sel[0], est[0]))
        cert = stats.cascade_certify(levels, p0, alpha, policy, margin=margin)
        level = int(cert.level[0])
        sel, est = dense[level] if level >= 0 else dense[-1]
        used = sum(int(a.sum() + b.sum()) for a, b in dense[max(level, 0) :])
        return Certificate(
            int(cert.prediction[0]),
            float(cert.radius[0]),
            float(cert.p_lower[0]),
            est,
            used,
            self.sigmas[chosen[level]] if level >= 0 else None,
            stats.Reason.NAMES[cert.reason[0]],
            sel,
        )


def _number_list(name: str, given: Any) -> list[float]:
    """``given`` as a list of floats, one number being a list of one: radii="0.5" was read character by
    character, radii=0.5 was a TypeError from len(), and cascade(sigmas=0.25) one from iterating it."""
    values = [given] if np.ndim(given) == 0 else given  # text is 0-d too: refused as a number below
    try:
        return [finite_number(name, v, error=ConfigError) for v in values]
    except (ConfigError, TypeError):
        raise ConfigError(f"{name} must be a list of numbers, e.g. {name}=[0.25, 0.5], got {given!r}") from None


def _check_alpha(alpha: float) -> None:
    try:
        stats.check_alpha(alpha)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
