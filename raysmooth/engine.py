"""The sampling engine: a ``Replica`` turns work units into class counts on one device.

It packs the samples of many units (images, σ, phases, chunks) into full forward batches, draws each
unit's noise from its own seeded generator in fixed-size blocks (so counts do not depend on batch size,
packing or order), and counts on the device. Inside the sampling loop nothing waits for the device:
the per-sample index tensors are built once per call, counting is an ``index_add_`` into device
counts, and the counts (with a tally of non-finite logits) come back in one copy at the end. It
knows nothing of Ray.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .config import DEFAULT_BATCH_SIZE, EngineCfg, compile_settings_problem
from .errors import ConfigError, InputError, ModelError, RaySmoothError, logits_hint, one_line, whole_number
from .models.attention import cached_bias_bytes, set_attention
from .models.base import BaseClassifier
from .models.mlp import set_gelu
from .models.norms import set_group_norm
from .units import WorkUnit, block_seed

__all__ = ["EngineConfig", "Replica", "resolve_device", "validate_images", "validate_sampling", "DEFAULT_BATCH_SIZE"]

log = logging.getLogger("raysmooth")
PRECISIONS = ("fp32", "bf16", "fp16", "bf16-mixed")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Compiled versions of the base classifiers' forward one process may hold (each model, batch shape and
# precision compiled in it is one; Dynamo's own limit is 8, past which it runs the code eager with
# nothing but a log line). Past this limit a replica says so and records that it runs eager.
RECOMPILE_LIMIT = 64


def _recompile_room() -> int:
    """The recompile limit a compiled replica runs under: ours, or the user's if they set a larger one."""
    import torch._dynamo.config as dynamo

    return max(RECOMPILE_LIMIT, dynamo.recompile_limit)


@dataclass
class EngineConfig:
    """How a replica runs. ``noise_block``, ``noise`` and ``levels`` are part of the noise definition
    (changing them changes the counts); everything else leaves the noise as it is and changes the model's
    arithmetic only (precision, layout, kernels), which can flip the label of a sample near a decision
    boundary (bf16: at most 0.8% of the counts on the embedded models; a layout change, fewer)."""

    batch_size: int | str = DEFAULT_BATCH_SIZE  # an int, or "auto": probe the device once at start
    noise_block: int = EngineCfg.noise_block
    precision: str = EngineCfg.precision  # fp32 | bf16 | fp16 (weights and activations) | bf16-mixed (autocast)
    channels_last: bool = False
    compile: bool = False  # torch.compile the whole base classifier at a static batch shape
    compile_mode: str = EngineCfg.compile_mode  # torch.compile's mode (max-autotune: slower compile, tuned kernels)
    attention: str = EngineCfg.attention  # sdpa | sdpa_cached | sdpa_by_head | flex (compiled only): BEiT's attention
    group_norm: str = EngineCfg.group_norm  # native | channels_last (compiled runs only): GroupNorm's layout
    gelu: str = EngineCfg.gelu  # native | epilogue: a timm MLP's GELU as its own pass or in fc1's matmul
    noise: str = "gaussian"  # gaussian | lattice (sound in floating point; see raysmooth.noise)
    levels: int = EngineCfg.levels  # lattice noise: images lie on (1/levels)ℤ
    threads: int | None = None  # torch intra-op threads on CPU

    def __post_init__(self) -> None:
        bs = self.batch_size
        if not (bs == "auto" or (isinstance(bs, (int, np.integer)) and not isinstance(bs, bool) and bs >= 1)):
            raise InputError(f"engine.batch_size must be a positive integer or auto, got {bs!r}")
        self.noise_block = whole_number("engine.noise_block", self.noise_block)
        self.levels = whole_number("engine.levels", self.levels)
        if self.levels > 65535:  # up to 16-bit images, the range raysmooth.noise.lattice_table takes
            raise InputError(f"engine.levels must lie in [1, 65535], got {self.levels}")
        if self.precision not in PRECISIONS:
            raise InputError(f"engine.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.noise not in ("gaussian", "lattice"):
            raise InputError(f"engine.noise must be gaussian or lattice, got {self.noise!r}")
        problem = compile_settings_problem(
            self.compile, self.compile_mode, self.attention, self.group_norm, self.channels_last, self.gelu
        )
        if problem:
            raise InputError(problem)


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto``: the GPU when one is visible, else the CPU. Any other device is tried once here, so a
    GPU this process cannot see is one line naming the setting, not a RuntimeError from the first batch."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = None
    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError, TypeError, ValueError) as exc:
        if dev is not None and dev.type == "cuda" and not torch.cuda.is_available():
            why = "this process sees no CUDA GPU (in a Ray job: ray.gpus_per_actor=1 gives each actor one)"
        else:
            why = one_line(exc, 200)
        raise ConfigError(
            f"device {str(device)!r} cannot be used: {why}; 'auto' takes the GPU if there is one"
        ) from None
    return dev


def validate_sampling(sigmas: Sequence[float], n0: int, n: int) -> None:
    """One error before any sampling for σ ≤ 0 or a budget below one sample."""
    bad = [s for s in sigmas if not (isinstance(s, (int, float)) and math.isfinite(s) and s > 0)]
    if not sigmas or bad:
        raise InputError(f"every σ must be a positive number, got {list(sigmas)}")
    if n0 < 1 or n < 1:
        raise InputError(f"n0 and n must be at least 1, got n0={n0}, n={n}")


def validate_images(
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray | None,
    input_shape: Sequence[int],
    model_classes: int,
    num_classes: int | None = None,
) -> None:
    """Shape, dtype, range and finiteness of a whole test set, and its classes against the model's
    (``input_shape`` and ``model_classes`` of the base classifier)."""
    shape = tuple(images.shape)
    if len(shape) != 4 or tuple(shape[1:]) != tuple(input_shape):
        raise InputError(f"images must have shape (N, {', '.join(map(str, input_shape))}) for this model, got {shape}")
    is_float = (
        images.dtype.is_floating_point if isinstance(images, torch.Tensor) else np.issubdtype(images.dtype, np.floating)
    )
    if not is_float:
        raise InputError(f"images must be floating point in [0, 1], got dtype {images.dtype}")
    if not isinstance(images, (torch.Tensor, np.ndarray)):
        # Read on demand (LazyImages): each file is converted by ToTensor into [0,1] and shape-checked
        # when loaded; scanning 50,000 files here would double the I/O.
        arr = torch.from_numpy(np.asarray(images[0]))[None] if len(images) else torch.zeros((0, *input_shape))
    else:
        arr = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    if not torch.isfinite(arr).all():
        raise InputError(f"images contain NaN or inf ({int((~torch.isfinite(arr)).sum())} values)")
    lo, hi = (float(arr.min()), float(arr.max())) if arr.numel() else (0.0, 0.0)
    if lo < 0.0 or hi > 1.0:
        raise InputError(
            f"images must lie in [0, 1] (noise is added in that space), got values in [{lo:.3g}, {hi:.3g}]"
        )
    if num_classes is not None and num_classes != model_classes:
        raise InputError(f"the data has {num_classes} classes but the classifier predicts {model_classes}")
    if labels is not None:
        labels = np.asarray(labels)
        if len(labels) != shape[0]:
            raise InputError(f"{shape[0]} images but {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= model_classes):
            raise InputError(
                f"labels must lie in [0, {model_classes}) for this classifier, got [{labels.min()}, {labels.max()}]"
            )


@dataclass(frozen=True)
class _Piece:
    """Samples [start, start+length) of one noise block of one unit."""

    unit: int
    block: int
    start: int
    length: int


def _logits_problem(model_id: str, logits: object, width: int, classes: int) -> str:
    """Checked on every batch from host metadata (no sync): a row wider than the declared classes would
    vote into the next unit's counts, a tuple or dict has no argmax to count."""
    got = f"shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else f"a {type(logits).__name__}"
    return (
        f"model {model_id} returned {got} for a batch of {width}; it was declared with {classes} classes, so "
        f"logits of shape ({width}, {classes}) were expected (check num_classes, and return the logits tensor itself)"
        + logits_hint(logits)
    )


def _model_failure(
    model_id: str,
    shape: tuple[int, ...],
    exc: BaseException,
    weights: tuple[torch.dtype, torch.dtype] | None = None,
    resized: tuple[int, int] | None = None,
) -> str:
    """One line for a model that raised on a batch: what it was given, what it said, and the innermost
    line of code outside torch and raysmooth (the user's module, usually) that was running. ``weights``:
    (a weight dtype, the input dtype) when they differ, the likelier cause than the shape; ``resized``:
    the (H, W) a classifier's input contract resized the batch to, which its module really received."""
    import traceback
    from pathlib import Path

    ours = str(Path(__file__).resolve().parent)
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith(ours) and "/torch/" not in f.filename
    ]
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return (
        f"model {model_id} failed on a batch of shape {shape} ({type(exc).__name__}: {one_line(exc, 200)}{where}); "
        + (
            f"its weights are {str(weights[0]).removeprefix('torch.')} and its inputs "
            f"{str(weights[1]).removeprefix('torch.')} (engine.precision): convert the model (model.float() for "
            "fp32) or choose the precision its weights have"
            if weights is not None
            else f"does it take images of shape {(shape[1], *resized)} (resized from {shape[2]}×{shape[3]} by its "
            "input_size)?"
            if resized is not None
            else f"does it take images of shape {shape[1:]}?"
        )
    )


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


class Replica:
    """One base classifier on one device, turning work units into counts."""

    def __init__(
        self,
        base: BaseClassifier,
        sigmas: Sequence[float],
        run_seed: int,
        config: EngineConfig | None = None,
        device: str | torch.device = "cpu",
    ):
        validate_sampling(list(sigmas), 1, 1)
        self.config = config or EngineConfig()
        self.device = resolve_device(device)
        if self.config.precision == "fp16" and self.device.type != "cuda":
            raise InputError("engine.precision=fp16 needs a CUDA device (use bf16 or fp32 on the CPU)")
        self.sigma_values = [float(s) for s in sigmas]
        # The σ the noise really has: float32 multiplies the Gaussian draws. Certificates use these.
        self.sigmas = torch.tensor(self.sigma_values, dtype=torch.float32, device=self.device)
        self.run_seed = int(run_seed)
        if self.config.threads:
            torch.set_num_threads(int(self.config.threads))
        self.base = base.to(self.device).eval()
        # bf16/fp16: the whole denoise-then-classify step in that dtype, weights and activations (the
        # denoiser keeps its noise schedule in float64); the noisy input is cast once, after the noise.
        self.input_dtype = _DTYPES.get(self.config.precision, torch.float32)
        if self.input_dtype != torch.float32:
            self.base = self.base.to(self.input_dtype)
        if self.config.channels_last and self.device.type == "cuda":
            self.base = self.base.to(memory_format=torch.channels_last)
        self.num_classes = base.num_classes
        if self.num_classes < 2:  # one logit would vote for class 0 on every sample: a certificate of nothing
            raise ConfigError(
                f"model {base.model_id} predicts {self.num_classes} class; smoothing needs two or more (a binary "
                "classifier with one logit z certifies as the two logits [0, z])"
            )
        self.shape = tuple(int(s) for s in base.input_shape)
        self._lattice = None
        if self.config.noise == "lattice":
            from .noise import lattice_table

            tables = [lattice_table(s, int(self.config.levels)) for s in self.sigma_values]
            self._lattice = [(torch.from_numpy(t.thresholds).to(self.device), t.offset) for t in tables]
        # Both ways: a model an earlier flex replica switched runs SDPA again in an sdpa replica.
        switched = set_attention(self.base, self.config.attention)
        if self.config.attention != "sdpa":
            if switched:
                held = cached_bias_bytes(self.base)
                log.info(
                    "engine.attention=%s: %d attention layers switched%s",
                    self.config.attention,
                    switched,
                    f" (their biases hold {held / 2**20:.0f} MiB)" if held else "",
                )
            else:
                # sdpa_cached is the compiled presets' setting, so a model without BEiT's bias (the CIFAR
                # pair's ViT) meets it as a matter of course: there it simply is sdpa. flex was asked for.
                (log.warning if self.config.attention == "flex" else log.info)(
                    "engine.attention=%s: the model has no BEiT relative-position attention; nothing changes",
                    self.config.attention,
                )
        # Both ways too: a model an earlier channels_last replica switched runs PyTorch's GroupNorm again.
        norms = set_group_norm(self.base, self.config.group_norm)
        if self.config.group_norm != "native":
            said = f"{norms} GroupNorm layers switched" if norms else "the model has no GroupNorm; nothing changes"
            if norms and self.device.type != "cuda":
                said += f" (on {self.device.type} activations stay contiguous: they take PyTorch's own path)"
            log.info("engine.group_norm=%s: %s", self.config.group_norm, said)
        # And the MLPs: a model an earlier epilogue replica switched runs timm's own MLP again.
        mlps = set_gelu(self.base, self.config.gelu)
        if self.config.gelu != "native":
            said = f"{mlps} MLPs switched" if mlps else "the model has no timm MLP with a GELU; nothing changes"
            if mlps and self.device.type == "cuda":
                said += " (cuBLASLt's GELU is the tanh approximation)"
            log.info("engine.gelu=%s: %s", self.config.gelu, said)
        self._forward = self._compiled() if self.config.compile else self.base
        self._compile_worked = False  # a compiled call has finished: later errors are not the compiler's
        if self.config.batch_size == "auto":
            self.config.batch_size = self.probe_batch_size()
        self.batch_size = int(self.config.batch_size)

    def _resized_to(self, shape: Sequence[int]) -> tuple[int, int] | None:
        """The (H, W) a classifier's input contract resizes a batch of ``shape`` to, when it does."""
        for module in self.base.modules():
            size = getattr(getattr(module, "contract", None), "input_size", None)
            if size is not None and tuple(size) != tuple(shape[-2:]):
                return int(size[0]), int(size[1])
        return None

    def _weight_dtypes(self) -> tuple[torch.dtype, torch.dtype] | None:
        """(a floating weight dtype, the input dtype) when a weight is not in the input's dtype."""
        for p in self.base.parameters():
            if p.is_floating_point() and p.dtype != self.input_dtype:
                return p.dtype, self.input_dtype
        return None

    def _compiled(self, **inductor_options):
        """The whole base classifier compiled at one static batch shape. On a CPU inductor also folds the
        weights in as constants (``freezing``), which lets it pre-pack them for oneDNN: that is what makes
        compiling pay on a CPU (README, Benchmarks); on an H100 freezing changed nothing (1.01x). The
        mode's options are passed as options (torch.compile takes a mode or options, not both);
        ``inductor_options`` go on top (the GPU benchmark tries settings there before they are offered)."""
        from torch._inductor import list_mode_options

        options = dict(list_mode_options(self.config.compile_mode))
        if self.device.type == "cpu":
            options["freezing"] = True
        options |= inductor_options
        return torch.compile(self.base, dynamic=False, options=options or None)

    @property
    def applied_sigmas(self) -> list[float]:
        """The σ of the noise actually drawn: float32(σ) for Gaussian noise, σ itself on the lattice."""
        if self._lattice is not None:
            return list(self.sigma_values)
        return [float(s) for s in self.sigmas.cpu().numpy()]

    # ---- the noise of a unit ------------------------------------------------------------------
    def _block_noise(
        self, seed: int, block: int, length: int, sigma_index: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One block of a unit's noise: N(0, 1) draws (Gaussian), or lattice steps as int64 (lattice)."""
        gen = torch.Generator(device=self.device).manual_seed(block_seed(seed, block))
        if self._lattice is None:
            noise = torch.randn((length, *self.shape), generator=gen, device=self.device)
        else:
            from .noise import LATTICE_BITS

            thresholds, offset = self._lattice[sigma_index]
            uniform = torch.randint(
                0, 2**LATTICE_BITS, (length, *self.shape), generator=gen, device=self.device, dtype=torch.int64
            )
            noise = torch.searchsorted(thresholds, uniform, right=True) - offset
        aux = None
        if self.base.aux_noise_per_sample:
            aux = torch.randn((length, self.base.aux_noise_per_sample, *self.shape), generator=gen, device=self.device)
        return noise, aux

    def _pieces(self, units: Sequence[WorkUnit], batch_size: int) -> Iterator[list[_Piece]]:
        """Batches of pieces in the order of the units' samples, filling each batch across units."""
        block = self.config.noise_block
        batch: list[_Piece] = []
        room = batch_size
        for u, unit in enumerate(units):
            for b in range(math.ceil(unit.n_samples / block)):
                length = min(block, unit.n_samples - b * block)
                start = 0
                while start < length:
                    take = min(room, length - start)
                    batch.append(_Piece(u, b, start, take))
                    start += take
                    room -= take
                    if room == 0:
                        yield batch
                        batch, room = [], batch_size
        if batch:
            yield batch

    def _autocast(self):
        """bf16-mixed only: autocast runs matmuls and convolutions in bf16 but casts norms and
        reductions to float32, which costs memory traffic; bf16 and fp16 convert the model instead."""
        if self.config.precision != "bf16-mixed":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _recompile_limit(self):
        """Compiled runs only: room for ``RECOMPILE_LIMIT`` compiled versions of the forward, and an
        error instead of Dynamo's silent eager fallback past it (``_compile_failed`` then switches this
        replica to eager in the open, so its record, ``config.compile``, does not claim a compile it lost)."""
        if self._forward is self.base:
            return contextlib.nullcontext()
        import torch._dynamo.config as dynamo

        return dynamo.patch(
            recompile_limit=_recompile_room(),
            fail_on_recompile_limit_hit=not dynamo.suppress_errors,  # Dynamo refuses the two together
        )

    # ---- the work ---------------------------------------------------------------------------
    def _stage_images(self, units: Sequence[WorkUnit], images: Mapping[int, torch.Tensor | np.ndarray]):
        ids = sorted({u.image_id for u in units})
        host = torch.stack(
            [
                images[i]
                if isinstance(images[i], torch.Tensor)
                else torch.from_numpy(np.array(images[i], dtype=np.float32))
                for i in ids
            ]
        ).to(torch.float32)
        if tuple(host.shape[1:]) != self.shape:
            raise InputError(f"images must have shape {self.shape} for this model, got {tuple(host.shape[1:])}")
        if self._lattice is not None:
            levels = int(self.config.levels)
            scaled = host.double() * levels
            off = float((scaled - scaled.round()).abs().max()) if scaled.numel() else 0.0
            if off > 1e-3:
                raise InputError(
                    f"engine.noise=lattice needs images on the grid k/{levels} (engine.levels={levels}); these "
                    f"are {off:.3g} steps off it: set engine.levels to the data's quantisation (8-bit: 255)"
                )
            host = scaled.round().to(torch.int64)
        if self.device.type == "cuda" and host.device.type == "cpu":
            host = host.pin_memory()  # the copy below then overlaps with queued work
        return host.to(self.device, non_blocking=True), {i: r for r, i in enumerate(ids)}

    def run(
        self,
        units: Sequence[WorkUnit],
        images: Mapping[int, torch.Tensor | np.ndarray],
        progress: Callable[[int], object] | None = None,
    ) -> dict[tuple, np.ndarray]:
        """Counts (length ``num_classes``) for every unit, keyed by ``unit.key``. On a CUDA
        out-of-memory error the batch is halved and the call starts over: noise comes in fixed
        blocks, so the counts are the same at any batch size. ``progress(k)`` hears of every batch of
        k samples as it is queued (a host-side number, no sync), and of ``-done`` when a call starts over."""
        if not units:
            return {}
        k = len(self.sigma_values)
        for unit in units:
            if not 0 <= unit.sigma_index < k:
                raise InputError(f"unit {unit.key}: σ index {unit.sigma_index} outside the {k} configured σ")
            if unit.image_id not in images:
                raise InputError(f"unit {unit.key}: image {unit.image_id} was not provided")
        reported = 0

        def report(k: int) -> None:
            nonlocal reported
            reported += k
            progress(k)

        while True:
            try:
                counts = self._run(units, images, self.batch_size, report if progress else None)
                self._compile_worked |= self._forward is not self.base
                return counts
            except Exception as exc:  # torch.OutOfMemoryError, or a backend's RuntimeError saying so
                if reported:
                    report(-reported)  # the call starts over, or fails: nothing it queued counts
                if self._compile_failed(exc):
                    continue
                if not _is_oom(exc) or self.batch_size == 1:
                    raise
                self.batch_size = max(1, self.batch_size // 2)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                log.warning("out of device memory: batch size halved to %d (counts are unchanged)", self.batch_size)

    def _compile_failed(self, exc: BaseException) -> bool:
        """A model torch.compile cannot build (a GPU its backend does not support, an operator it cannot
        trace) runs eager on this replica instead of ending the run; nothing was counted by the failed call.
        Only a first call, or an error raised by the compiler itself, counts as such a failure."""
        if self._forward is self.base or _is_oom(exc) or isinstance(exc, InputError):
            return False
        from_compiler = type(exc).__module__.startswith(("torch._dynamo", "torch._inductor"))
        if self._compile_worked and not from_compiler:
            return False
        import torch._dynamo

        if isinstance(exc, torch._dynamo.exc.FailOnRecompileLimitHit):
            log.warning(
                "engine.compile: this process has reached its limit of %d compiled versions of the base "
                "classifier (torch._dynamo's recompile_limit); this replica runs eager. Compile fewer models, batch "
                "sizes or precisions per process, or call torch._dynamo.reset() between them",
                _recompile_room(),
            )
        else:
            log.warning(
                "engine.compile: torch.compile failed (%s: %s); this replica runs eager",
                type(exc).__name__,
                one_line(exc, 200),
            )
        self._forward = self.base
        self.config.compile = False
        self.config.compile_mode = "default"
        if self.config.attention == "flex":  # FlexAttention only pays compiled
            set_attention(self.base, "sdpa")
            self.config.attention = "sdpa"
        if self.config.group_norm != "native":  # eager it would build float32 copies of each activation
            set_group_norm(self.base, "native")
            self.config.group_norm = "native"
        return True

    def _run(
        self, units: Sequence[WorkUnit], images, batch_size: int, progress: Callable[[int], None] | None = None
    ) -> dict[tuple, np.ndarray]:
        dev, c = self.device, self.num_classes
        stack, row_of = self._stage_images(units, images)
        n = np.array([u.n_samples for u in units], dtype=np.int64)
        total = int(n.sum())
        pad = self.config.compile  # a compiled model sees one static batch shape: pad the last batch
        padded = -(-total // batch_size) * batch_size if pad else total
        # Per-sample indices for the whole call, built on the host once and copied once; the padding
        # samples belong to an extra unit row that is never returned.
        unit_of = np.full(padded, len(units), dtype=np.int64)
        unit_of[:total] = np.repeat(np.arange(len(units)), n)
        unit_row = np.array([row_of[u.image_id] for u in units] + [0], dtype=np.int64)
        unit_sig = np.array([u.sigma_index for u in units] + [0], dtype=np.int64)
        sample_unit = torch.from_numpy(unit_of).to(dev, non_blocking=True)
        sample_row = torch.from_numpy(unit_row).to(dev)[sample_unit]
        sample_sigma_index = torch.from_numpy(unit_sig).to(dev)[sample_unit]
        counts = torch.zeros((len(units) + 1) * c, dtype=torch.int64, device=dev)
        nonfinite = torch.zeros(len(units) + 1, dtype=torch.int64, device=dev)
        ones = torch.ones(batch_size, dtype=torch.int64, device=dev)
        noise_dtype = torch.int64 if self._lattice is not None else torch.float32
        aux_n = self.base.aux_noise_per_sample
        # What the model is handed (σ, and the auxiliary noise as it is when no cast copies it) is made in
        # inference mode, as z is, whatever mode the caller is in: a compiled model guards on it.
        with torch.inference_mode():
            sample_sigma = self.sigmas[sample_sigma_index]
            noise_buf = torch.zeros((batch_size, *self.shape), dtype=noise_dtype, device=dev)
            aux_buf = torch.zeros((batch_size, aux_n, *self.shape), device=dev) if aux_n else None
        seeds = [u.seed(self.run_seed) for u in units]
        cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor | None]] = {}
        block = self.config.noise_block
        start = 0
        with torch.inference_mode(), self._autocast(), self._recompile_limit():
            for batch in self._pieces(units, batch_size):
                off = 0
                for piece in batch:
                    key = (piece.unit, piece.block)
                    if key not in cache:
                        unit = units[piece.unit]
                        length = min(block, unit.n_samples - piece.block * block)
                        cache.clear()  # pieces arrive in order, so at most one block is partly used
                        cache[key] = self._block_noise(seeds[piece.unit], piece.block, length, unit.sigma_index)
                    noise, aux = cache[key]
                    noise_buf[off : off + piece.length] = noise[piece.start : piece.start + piece.length]
                    if aux is not None:
                        aux_buf[off : off + piece.length] = aux[piece.start : piece.start + piece.length]
                    off += piece.length
                width = batch_size if pad else off
                if pad and off < batch_size:
                    noise_buf[off:].zero_()
                rows = sample_row[start : start + width]
                sigma = sample_sigma[start : start + width]
                if self._lattice is None:
                    z = stack[rows] + sigma.view(-1, 1, 1, 1) * noise_buf[:width]
                else:  # exact integer lattice point, then one deterministic conversion to [0,1] units
                    z = (stack[rows] + noise_buf[:width]).to(torch.float32) * (1.0 / self.config.levels)
                z = z.to(self.input_dtype)
                if self.config.channels_last and dev.type == "cuda":
                    z = z.contiguous(memory_format=torch.channels_last)
                aux = aux_buf[:width].to(self.input_dtype) if aux_buf is not None else None
                try:
                    logits = self._forward(z, sigma, aux)
                except Exception as exc:  # a compiled model's failures are judged by run(): it may fall back to eager
                    if self._forward is not self.base or _is_oom(exc) or isinstance(exc, RaySmoothError):
                        raise
                    raise ModelError(
                        _model_failure(
                            self.base.model_id, tuple(z.shape), exc, self._weight_dtypes(), self._resized_to(z.shape)
                        )
                    ) from exc
                if not isinstance(logits, torch.Tensor) or logits.shape != (width, c):
                    raise InputError(_logits_problem(self.base.model_id, logits, width, c))
                if logits.dtype == torch.bool:  # a one-hot vote: argmax has no bool kernel, its first True is the class
                    logits = logits.to(torch.uint8)
                owner = sample_unit[start : start + width]
                nonfinite.index_add_(0, owner, (~torch.isfinite(logits).all(dim=1)).to(torch.int64))
                counts.index_add_(0, owner * c + logits.argmax(dim=1), ones[:width])
                start += off
                if progress is not None:
                    progress(off)
        host = torch.cat([counts, nonfinite]).cpu().numpy()  # the one device-to-host copy of this call
        dense = host[: (len(units) + 1) * c].reshape(len(units) + 1, c)
        bad = host[(len(units) + 1) * c :][: len(units)]
        if bad.any():
            u = units[int(np.flatnonzero(bad)[0])]
            raise InputError(
                f"model {self.base.model_id} returned NaN or inf logits for {int(bad.sum())} sample(s), e.g. image "
                f"{u.image_id} at σ={self.sigma_values[u.sigma_index]:g}; such votes are never counted (an fp16/bf16 "
                "overflow does this: try engine.precision=fp32)"
            )
        return {unit.key: dense[i] for i, unit in enumerate(units)}

    # ---- batch size ------------------------------------------------------------------------
    def probe_batch_size(self, headroom: float = 0.15, cap: int = 4096) -> int:
        """The largest batch that fits in the device memory this replica has, with ``headroom`` left
        over: two trial batches measure the fixed and the per-sample memory (PyTorch's cached but
        unused blocks count as free), then the estimate is tried and halved until it runs. On a CPU,
        the default batch."""
        if self.device.type != "cuda":
            return DEFAULT_BATCH_SIZE
        aux_n = self.base.aux_noise_per_sample

        def peak(b: int) -> int:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            z = torch.rand((b, *self.shape), device=self.device, dtype=self.input_dtype)
            sig = self.sigmas[torch.zeros(b, dtype=torch.int64, device=self.device)]
            aux = torch.randn((b, aux_n, *self.shape), device=self.device, dtype=self.input_dtype) if aux_n else None
            with torch.inference_mode(), self._autocast():
                self.base(z, sig, aux)
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - before

        torch.cuda.empty_cache()
        b1, b2 = 4, 16
        try:
            p1, p2 = peak(b1), peak(b2)
        except Exception as exc:  # noqa: BLE001
            if _is_oom(exc):
                torch.cuda.empty_cache()
                return 1
            raise
        per_sample = max(1.0, (p2 - p1) / (b2 - b1))
        fixed = max(0.0, p1 - b1 * per_sample)
        free = torch.cuda.mem_get_info(self.device)[0]
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        # 1.25: what a sampling call adds to the forward (noise, counting buffers, the input copy)
        guess = int(((1 - headroom) * free - fixed) // (1.25 * per_sample))
        b = max(1, min(cap, guess))
        if b > 64:  # whole multiples of 64 suit the kernels
            b -= b % 64
        while b > 1:
            try:
                peak(b)
                break
            except Exception as exc:  # noqa: BLE001
                if not _is_oom(exc):
                    raise
                torch.cuda.empty_cache()
                b //= 2
        torch.cuda.empty_cache()
        log.info(
            "engine.batch_size=auto: %d samples per batch (%.1f MB per sample, %.1f GB free)",
            b,
            per_sample / 1e6,
            free / 1e9,
        )
        return b
