"""A transformer MLP's GELU applied in its first matmul's epilogue (``engine.gelu=epilogue``).

timm's ``Mlp`` runs ``fc1``, then ``GELU``, then ``fc2``. ``torch.compile`` calls cuBLAS for both
matmuls and can fuse nothing into them, so the GELU between them becomes a pass of its own over the
widest activation of the block: in BEiT-L/16 at 512 px, 1,025 tokens × 4,096 features per sample, read
and written 24 times per forward, 0.40 GB per sample, 11% of the bytes inductor's kernels move for the
ImageNet pair (docs/performance.md, "A pass the matmul can take over"). cuBLASLt can apply the bias and
a GELU to the product before writing it; PyTorch reaches that epilogue through
``torch._addmm_activation(bias, x, weight.T, use_gelu=True)``, which inductor leaves to ATen as it is
(a private op: tests/test_mlp.py would say if it left).

The epilogue's GELU is the tanh approximation, so on a GPU the classifier changes: by at most 4.8·10⁻⁴
in each activation (``GELU_TANH_MAX_ERROR``, at x ≈ 2.7, where bf16's spacing is 1.6·10⁻²), far below the
rounding of the bf16 runs it is meant for, but another function: a label may differ, and the setting is
part of a run's identity. On a CPU ATen computes the exact GELU after the product, as ``nn.GELU`` does.
Only the exact GELU switches (an MLP built with the tanh form would get the exact one on a CPU). The module keeps timm's
parameters and state-dict keys: switching only changes the class.
"""

from __future__ import annotations

import functools
import sys

import torch
from torch import nn

from ..config import GELU_KINDS

__all__ = ["GELU_KINDS", "GELU_TANH_MAX_ERROR", "set_gelu"]

# max over x of |GELU(x) − GELU_tanh(x)| (tests/test_mlp.py checks it on a fine grid).
GELU_TANH_MAX_ERROR = 4.8e-4


def _fusable(mlp: nn.Module) -> bool:
    """An MLP whose first layer is a linear map with a bias followed by the exact GELU."""
    fc1, act = getattr(mlp, "fc1", None), getattr(mlp, "act", None)
    return (
        type(fc1) is nn.Linear
        and fc1.bias is not None
        and type(act) is nn.GELU
        and act.approximate == "none"
        and type(getattr(mlp, "fc2", None)) is nn.Linear
    )


def _epilogue_forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm's MLP with ``fc1`` and its GELU as one call (cuBLASLt's bias and GELU epilogue on a GPU)."""
    if torch.is_autocast_enabled(x.device.type):  # not on autocast's lower-precision list: it would run in fp32
        return _classes()[0].forward(self, x)
    h = torch._addmm_activation(self.fc1.bias, x.reshape(-1, x.shape[-1]), self.fc1.weight.t(), use_gelu=True)
    h = self.norm(self.drop1(h.view(*x.shape[:-1], h.shape[-1])))
    return self.drop2(self.fc2(h))


@functools.cache
def _classes() -> tuple[type, type]:
    """(timm's ``Mlp``, its epilogue twin); timm is imported only when asked."""
    from timm.layers import Mlp

    twin = type("EpilogueGeluMlp", (Mlp,), {"forward": _epilogue_forward, "__doc__": _epilogue_forward.__doc__})
    twin.__module__ = __name__  # pickle finds it by name through __getattr__ below
    return Mlp, twin


def __getattr__(name: str) -> type:
    """The twin by name, so that a switched model pickles (torch.save, multiprocessing) and unpickles in
    a process that has not switched one yet."""
    if name != "EpilogueGeluMlp":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _classes()[1]


def set_gelu(model: nn.Module, kind: str) -> int:
    """Run every timm ``Mlp`` in ``model`` whose first layer is a biased linear map followed by the exact
    GELU as ``kind`` says (native: timm's own; epilogue: fc1 and the GELU as one matmul with its epilogue);
    returns how many modules run it now. Only timm's own class and its twin switch: a subclass of it
    has a forward of its own, which stays."""
    if kind not in GELU_KINDS:
        raise ValueError(f"gelu must be one of {', '.join(GELU_KINDS)}, got {kind!r}")
    if "timm.layers" not in sys.modules:
        return 0  # no timm model can be in the model: timm need not be imported
    native, epilogue = _classes()
    target = {"native": native, "epilogue": epilogue}[kind]
    switched = 0
    for module in model.modules():
        if type(module) in (native, epilogue) and _fusable(module):
            module.__class__ = target
            switched += 1
    return switched
