"""The sampling engine: a ``Replica`` turns work units into class counts on one device.

It packs the samples of many units (images, σ, phases, chunks) into full forward batches, draws each
unit's noise from its own seeded generator in fixed-size blocks (so counts do not depend on batch size,
packing or order), counts on the device with ``bincount``, and copies counts to the host once per
``run``. It knows nothing of Ray.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from .errors import InputError
from .models.base import BaseClassifier
from .units import WorkUnit, block_seed

__all__ = ["EngineConfig", "Replica", "validate_images", "validate_sampling"]


@dataclass
class EngineConfig:
    """How a replica runs. ``noise_block`` is part of the noise definition (changing it changes the
    counts); everything else only changes speed."""

    batch_size: int = 1000
    noise_block: int = 256
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; CUDA only)
    channels_last: bool = False
    compile: bool = False
    threads: int | None = None  # torch intra-op threads on CPU

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.noise_block < 1:
            raise InputError("engine.batch_size and engine.noise_block must be at least 1")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise InputError(f"engine.precision must be fp32, bf16 or fp16, got {self.precision!r}")


def validate_sampling(sigmas: Sequence[float], n0: int, n: int) -> None:
    """One error before any sampling for σ ≤ 0 or a budget below one sample."""
    bad = [s for s in sigmas if not (isinstance(s, (int, float)) and math.isfinite(s) and s > 0)]
    if not sigmas or bad:
        raise InputError(f"every σ must be a positive number, got {list(sigmas)}")
    if n0 < 1 or n < 1:
        raise InputError(f"n0 and n must be at least 1, got n0={n0}, n={n}")


def validate_images(images: np.ndarray | torch.Tensor, labels: np.ndarray | None, input_shape: Sequence[int],
                    model_classes: int, num_classes: int | None = None) -> None:
    """Shape, dtype, range and finiteness of a whole test set, and its classes against the model's
    (``input_shape`` and ``model_classes`` of the base classifier)."""
    shape = tuple(images.shape)
    if len(shape) != 4 or tuple(shape[1:]) != tuple(input_shape):
        raise InputError(f"images must have shape (N, {', '.join(map(str, input_shape))}) for this model, got {shape}")
    is_float = images.dtype.is_floating_point if isinstance(images, torch.Tensor) else np.issubdtype(images.dtype, np.floating)
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
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        raise InputError(f"images must lie in [0, 1] (noise is added in that space), got values in [{lo:.3g}, {hi:.3g}]")
    if num_classes is not None and num_classes != model_classes:
        raise InputError(f"the data has {num_classes} classes but the classifier predicts {model_classes}")
    if labels is not None:
        labels = np.asarray(labels)
        if len(labels) != shape[0]:
            raise InputError(f"{shape[0]} images but {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= model_classes):
            raise InputError(f"labels must lie in [0, {model_classes}) for this classifier, got [{labels.min()}, {labels.max()}]")


@dataclass(frozen=True)
class _Piece:
    """Samples [start, start+length) of one noise block of one unit."""

    unit: int
    block: int
    start: int
    length: int


class Replica:
    """One base classifier on one device, turning work units into counts."""

    def __init__(self, base: BaseClassifier, sigmas: Sequence[float], run_seed: int,
                 config: EngineConfig | None = None, device: str | torch.device = "cpu"):
        validate_sampling(list(sigmas), 1, 1)
        self.config = config or EngineConfig()
        self.device = torch.device(device)
        self.sigmas = torch.tensor([float(s) for s in sigmas], dtype=torch.float32, device=self.device)
        self.run_seed = int(run_seed)
        if self.config.threads:
            torch.set_num_threads(int(self.config.threads))
        self.base = base.to(self.device).eval()
        if self.config.channels_last and self.device.type == "cuda":
            self.base = self.base.to(memory_format=torch.channels_last)
        self._classify = torch.compile(self.base.classify) if self.config.compile else self.base.classify
        self.num_classes = base.num_classes

    # ---- the noise of a unit ------------------------------------------------------------------
    def _block_noise(self, seed: int, block: int, length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        gen = torch.Generator(device=self.device).manual_seed(block_seed(seed, block))
        shape = tuple(self.base.input_shape)
        noise = torch.randn((length, *shape), generator=gen, device=self.device)
        aux = None
        if self.base.aux_noise_per_sample:
            aux = torch.randn((length, self.base.aux_noise_per_sample, *shape), generator=gen, device=self.device)
        return noise, aux

    def _pieces(self, units: Sequence[WorkUnit]) -> Iterator[list[_Piece]]:
        """Batches of pieces, filling each batch across unit boundaries."""
        block, size = self.config.noise_block, self.config.batch_size
        batch: list[_Piece] = []
        room = size
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
                        batch, room = [], size
        if batch:
            yield batch

    def _autocast(self):
        if self.device.type == "cuda" and self.config.precision != "fp32":
            dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    # ---- the work ---------------------------------------------------------------------------
    def run(self, units: Sequence[WorkUnit], images: Mapping[int, torch.Tensor | np.ndarray]) -> dict[tuple, np.ndarray]:
        """Counts (length ``num_classes``) for every unit, keyed by ``unit.key``."""
        if not units:
            return {}
        k = len(self.sigmas)
        for unit in units:
            if not 0 <= unit.sigma_index < k:
                raise InputError(f"unit {unit.key}: σ index {unit.sigma_index} outside the {k} configured σ")
            if unit.image_id not in images:
                raise InputError(f"unit {unit.key}: image {unit.image_id} was not provided")
        ids = sorted({u.image_id for u in units})
        row_of = {i: r for r, i in enumerate(ids)}
        stack = torch.stack([images[i] if isinstance(images[i], torch.Tensor) else torch.from_numpy(np.array(images[i], dtype=np.float32))
                             for i in ids]).to(self.device, torch.float32)
        unit_row = torch.tensor([row_of[u.image_id] for u in units], device=self.device)
        unit_sigma = torch.tensor([u.sigma_index for u in units], device=self.device)
        seeds = [u.seed(self.run_seed) for u in units]
        counts = torch.zeros((len(units), self.num_classes), dtype=torch.int64, device=self.device)
        cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor | None]] = {}

        with torch.inference_mode(), self._autocast():
            for batch in self._pieces(units):
                noise_parts, aux_parts, owner = [], [], []
                for piece in batch:
                    key = (piece.unit, piece.block)
                    if key not in cache:
                        length = min(self.config.noise_block, units[piece.unit].n_samples - piece.block * self.config.noise_block)
                        cache.clear()  # pieces arrive in order, so at most one block is partly used
                        cache[key] = self._block_noise(seeds[piece.unit], piece.block, length)
                    noise, aux = cache[key]
                    noise_parts.append(noise[piece.start : piece.start + piece.length])
                    if aux is not None:
                        aux_parts.append(aux[piece.start : piece.start + piece.length])
                    owner.append((piece.unit, piece.length))
                local_units = sorted({u for u, _ in owner})
                local_of = {u: i for i, u in enumerate(local_units)}
                local = torch.repeat_interleave(
                    torch.tensor([local_of[u] for u, _ in owner]), torch.tensor([n for _, n in owner])
                ).to(self.device, non_blocking=True)
                global_units = torch.tensor(local_units).to(self.device, non_blocking=True)
                sample_unit = global_units[local]
                sigma = self.sigmas[unit_sigma[sample_unit]]
                z = stack[unit_row[sample_unit]] + sigma.view(-1, 1, 1, 1) * torch.cat(noise_parts)
                if self.config.channels_last and self.device.type == "cuda":
                    z = z.contiguous(memory_format=torch.channels_last)
                aux = torch.cat(aux_parts) if aux_parts else None
                labels = self._classify(z, sigma, aux)
                flat = torch.bincount(local * self.num_classes + labels, minlength=len(local_units) * self.num_classes)
                counts.index_add_(0, global_units, flat.view(len(local_units), self.num_classes))
        host = counts.cpu().numpy()  # the one device-to-host copy of this call
        return {unit.key: host[i] for i, unit in enumerate(units)}
