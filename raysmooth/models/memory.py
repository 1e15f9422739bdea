"""How much device memory a base classifier needs per sample, measured without a device.

The model runs once on the ``meta`` device (shapes only, no data, no allocation) under a dispatch
mode that keeps a ledger of every tensor storage the forward creates and frees, as the caching
allocator would see them; the peak of that ledger is the activation memory of the batch. Two batch
sizes separate the per-sample part from the fixed part. This is what lets a CPU test say that a
preset's batch fits an 80 GB H100 (``engine.batch_size=auto`` measures on the device instead).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["MemoryEstimate", "estimate_memory"]


@dataclass(frozen=True)
class MemoryEstimate:
    weights_bytes: int
    per_sample_bytes: float  # peak activation memory per sample of the batch
    fixed_bytes: float  # peak activation memory that does not grow with the batch

    def batch_bytes(self, batch: int) -> float:
        return self.weights_bytes + self.fixed_bytes + batch * self.per_sample_bytes

    def largest_batch(self, device_bytes: float, headroom: float = 0.2) -> int:
        room = (1 - headroom) * device_bytes - self.weights_bytes - self.fixed_bytes
        return max(0, int(room // self.per_sample_bytes))


class _Ledger(TorchDispatchMode):
    """Live bytes of the storages created inside the mode; a storage is freed when the last tensor
    object that we saw referencing it is collected."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.refs: dict[int, list[int]] = {}  # storage key -> [tensor objects alive, bytes]

    def _release(self, key: int) -> None:
        entry = self.refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.refs[key]

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.refs:
            self.refs[key][0] += 1
        else:
            self.refs[key] = [1, storage.nbytes()]
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def _peak(base: torch.nn.Module, batch: int, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    z = torch.empty((batch, *shape), device="meta", dtype=dtype)
    sigma = torch.full((batch,), 0.5, device="meta")
    aux_n = getattr(base, "aux_noise_per_sample", 0)
    aux = torch.empty((batch, aux_n, *shape), device="meta", dtype=dtype) if aux_n else None
    ledger = _Ledger()
    with torch.inference_mode(), ledger:
        out = base(z, sigma, aux)
        del out
    return ledger.peak


def estimate_memory(base: torch.nn.Module, dtype: torch.dtype = torch.bfloat16, batches: tuple[int, int] = (2, 4)):
    """Per-sample and fixed activation memory of ``base`` (a BaseClassifier on the meta device) with
    its weights and activations in ``dtype``. Autocast keeps some reductions in float32, so leave
    headroom; the estimate is checked against measured CUDA peaks by bench/gpu.py."""
    base = base.to(device="meta", dtype=dtype)
    shape = tuple(base.input_shape)
    weights = sum(p.numel() * p.element_size() for p in base.parameters())
    weights += sum(b.numel() * b.element_size() for b in base.buffers())
    b1, b2 = batches
    p1, p2 = _peak(base, b1, shape, dtype), _peak(base, b2, shape, dtype)
    per_sample = max(1.0, (p2 - p1) / (b2 - b1))
    return MemoryEstimate(int(weights), per_sample, max(0.0, p1 - b1 * per_sample))
