"""GroupNorm computed in the activation's own memory layout (``engine.group_norm=channels_last``).

A UNet run in channels_last keeps its activations with the channels innermost, which is what the GPU's
convolution kernels read fastest. PyTorch's GroupNorm does not: outside the CPU, its reference
decomposition, which ``torch.compile`` lowers, first copies a channels_last input to the contiguous
layout (channels outermost) and normalises there. Inductor fuses most of that copy away, but in the
code it generates for a GPU the attention blocks' GroupNorm still writes channels-first and is read
back transposed (kernels tiled to transpose, 16 launches per batch of the ImageNet pair;
docs/performance.md, "Inductor's kernels without a GPU").

``ChannelsLastGroupNorm`` computes the same normalisation on a view of the activation with the channels
last, (N, H·W, groups, channels per group): the normalisation and the affine map run along memory, and
the result is a channels_last tensor again. The statistics come in two steps: each channel's over chunks
of positions, then each group's from those. Taken per group in one step, inductor's reduction walks a
group's few channels (16 bytes for 8 bf16 channels) and then jumps a row, which is how PyTorch's
GroupNorm reads a channels_last activation too; per channel, neighbouring lanes read neighbouring
channels (bench/codegen.py counts both). The statistics are taken in float32 for bf16 and fp16 inputs,
as PyTorch's decomposition does; the values agree with ``nn.GroupNorm`` to the float rounding of another
summation order. An input that is not channels_last, or whose layout is ambiguous (one channel, one
position), takes ``nn.GroupNorm``'s own path. The module keeps GroupNorm's parameters and state-dict
keys: switching only changes the class. Eager it would build float32 copies of every activation, so it
is for compiled runs, where inductor fuses its passes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import GROUP_NORM_KINDS

__all__ = ["GROUP_NORM_KINDS", "ChannelsLastGroupNorm", "set_group_norm"]

UNROLLED = 8  # torch._inductor.config.unroll_reductions_threshold's default


class ChannelsLastGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that normalises a channels_last input without leaving its layout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = x.movedim(1, -1)  # (N, *positions, C): contiguous exactly when x is channels-last in memory
        if x.dim() < 3 or x.is_contiguous() or not last.is_contiguous():
            return super().forward(x)
        n, c = x.shape[0], x.shape[1]
        acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        g, cg = self.num_groups, c // self.num_groups
        positions = last.numel() // (n * c)
        # The statistics in two steps, so that the pass over the activation reads along memory: each
        # channel's over chunks of positions (neighbouring lanes read neighbouring channels), then each
        # group's from those (equal counts: the law of total variance, exact). Enough chunks that the
        # second step reduces more than UNROLLED values, which inductor would otherwise unroll into the
        # normalising pass, recomputing it per element and tiling that pass across layouts.
        chunks = 1
        while chunks * cg <= UNROLLED and positions % (2 * chunks) == 0:
            chunks *= 2
        parts = last.reshape(n, chunks, -1, c).to(acc)
        var_c, mean_c = torch.var_mean(parts, dim=2, correction=0)  # (N, chunks, C)
        mean_c, var_c = mean_c.view(n, chunks, g, cg), var_c.view(n, chunks, g, cg)
        mean = mean_c.mean(dim=(1, 3)).view(n, 1, g, 1)
        var = (var_c + (mean_c - mean).square()).mean(dim=(1, 3)).view(n, 1, g, 1)
        grouped = last.reshape(n, -1, g, cg).to(acc)
        y = ((grouped - mean) * torch.rsqrt(var + self.eps)).reshape(last.shape)
        if self.affine:
            y = y * self.weight + self.bias  # channels are the last axis here: plain broadcasting
        return y.to(x.dtype).movedim(-1, 1)


def set_group_norm(model: nn.Module, kind: str) -> int:
    """Compute every ``nn.GroupNorm`` in ``model`` as ``kind`` says (native: PyTorch's own;
    channels_last: in the activation's layout); returns how many modules run it now. Only the plain
    class and its twin switch: a subclass of GroupNorm has a forward of its own, which stays."""
    if kind not in GROUP_NORM_KINDS:
        raise ValueError(f"group norm must be one of {', '.join(GROUP_NORM_KINDS)}, got {kind!r}")
    target = {"native": nn.GroupNorm, "channels_last": ChannelsLastGroupNorm}[kind]
    switched = 0
    for module in model.modules():
        if type(module) in (nn.GroupNorm, ChannelsLastGroupNorm):
            module.__class__ = target
            switched += 1
    return switched
