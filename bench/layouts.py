"""The UNet's skip concatenations pinned to channels_last for inductor: a benchmark variant, not an
engine setting.

Under torch 2.11 (the GPU image's) inductor fuses each up-block concatenation with the bias of the
convolution before it and, with no layout to follow for that fused result, writes it channels-first
between channels_last convolutions; the GroupNorm-then-SiLU pass after it then reads with neighbouring
threads H·W elements apart. The project's torch 2.14.1 writes it channels_last by itself: there the pin
changes no kernel (docs/performance.md, "Inductor's kernels without a GPU"). So on the GPU image the pin
measures what our pinned torch's layout is worth, without a torch the image cannot install.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["pin_concatenations", "pinned_concatenations"]

_PINNED: dict[type, type] = {}


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 4:
        return x
    _, c, h, w = x.shape
    # Eager: no copy when x is channels_last already (what it is in a channels_last run). Compiled: the
    # buffer inductor writes the concatenation into gets this stride order.
    return torch.ops.prims.inductor_force_stride_order(x, [c * h * w, 1, w * c, c])


def _pinned_class(cls: type) -> type:
    """``cls`` with its first input pinned. A class of its own, as the GroupNorm twin is, because Dynamo
    guards on a module's class but not on hooks added later: a hook would reuse the unpinned compile."""
    if cls not in _PINNED:

        def forward(self, x, *args, **kwargs):
            return cls.forward(self, _channels_last(x), *args, **kwargs)

        _PINNED[cls] = type(f"ConcatPinned{cls.__name__}", (cls,), {"forward": forward})
    return _PINNED[cls]


def pin_concatenations(model: nn.Module) -> int:
    """Pin the input of every resnet in a diffusers UNet's up blocks (each one the concatenation of the
    path and a skip) to channels_last; returns how many inputs are pinned."""
    import torch._inductor.inductor_prims  # noqa: F401  registers prims.inductor_force_stride_order

    pinned = 0
    for unet in (m for m in model.modules() if type(m).__name__ == "UNet2DModel"):
        for block in unet.up_blocks:
            for resnet in block.resnets:
                if type(resnet) not in _PINNED.values():
                    resnet.__class__ = _pinned_class(type(resnet))
                pinned += 1
    return pinned


def pinned_concatenations(model: nn.Module) -> int:
    """How many inputs of ``model`` ``pin_concatenations`` has pinned (0 for a model it never saw)."""
    return sum(type(m) in _PINNED.values() for m in model.modules())
