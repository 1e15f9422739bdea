"""BEiT's relative-position-biased attention, run four ways (``engine.attention``): timm's own SDPA
call (``sdpa``), SDPA with the bias computed once per replica (``sdpa_cached``), the same batched head
by head (``sdpa_by_head``), or FlexAttention (``flex``).

``sdpa_cached``: timm gathers, permutes and copies each layer's (heads, N, N) bias from its small table
in every forward, and the fused kernels then want its rows aligned (1,025 tokens is not a multiple of
the 16 elements they read at once), which costs another copy. A replica's weights never change, so the
bias can be computed once, when the replica is built, into rows padded to 16 elements: the same values,
hence the same logits, at the cost of holding it (about 0.8 GB for BEiT-L/16 at 512 px in bf16).

``sdpa_by_head``: ``sdpa_cached`` with SDPA's batch and head axes swapped. The bias is the same for every
sample, but fused kernels usually walk (sample, head) pairs with the heads innermost, and so read every
head's bias once per sample: for BEiT-L/16 at 512 px and 96 samples, 3.3 GB per layer, about what the biased
call takes longer than the unbiased one on an H100 (docs/performance.md). With the heads as the batch
axis and the samples as the head axis (views of the same q, k, v; no copy), a head's 2 MB of bias is read
while its samples are computed, where the GPU's L2 cache can keep it. Each (sample, head) attention is
computed as before, so the values are the same.

``flex``: timm's BEiT passes its relative-position bias to ``scaled_dot_product_attention`` as a dense
(heads, N, N) mask, which rules out the flash kernel; on an H100 the ImageNet classifier's attention ran
at 7.7x its roofline bound (docs/performance.md). FlexAttention instead adds the bias inside a fused
kernel, and here the bias is *computed* there: the relative offset of query and key follows from their
token positions, so each score reads one entry of the small (distances, heads) table and no N×N index or
bias is ever built or read. Outside ``torch.compile`` FlexAttention runs unfused, so this is for compiled
runs only. The module keeps timm's parameters and state-dict keys: switching only changes the class.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable

import torch
from torch import nn

from ..config import ATTENTION_KERNELS

__all__ = [
    "ATTENTION_KERNELS",
    "cached_bias_bytes",
    "relative_position_index",
    "relative_position_score_mod",
    "set_attention",
]

log = logging.getLogger("raysmooth")


def relative_position_index(window: tuple[int, int], q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    """The row of BEiT's relative-position table for query token ``q_idx`` and key token ``kv_idx``
    (token 0 is the class token, then the window's patches row by row), from the positions alone.
    It reproduces the index buffer timm builds (a test checks it), with the three class-token entries
    last: class→patch, patch→class, class→class."""
    wh, ww = int(window[0]), int(window[1])
    distances = (2 * wh - 1) * (2 * ww - 1)
    i, j = q_idx - 1, kv_idx - 1
    rel = (i // ww - j // ww + (wh - 1)) * (2 * ww - 1) + (i % ww - j % ww + (ww - 1))
    rel = torch.where(kv_idx == 0, distances + 1, rel)
    rel = torch.where(q_idx == 0, torch.where(kv_idx == 0, distances + 2, distances), rel)
    return rel


def relative_position_score_mod(table: torch.Tensor, window: tuple[int, int]) -> Callable:
    """A FlexAttention ``score_mod`` adding ``table[index(q, k), head]`` to each score."""

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[relative_position_index(window, q_idx, kv_idx), h]

    return score_mod


def _packed_qkv(self, x: torch.Tensor) -> torch.Tensor:
    """timm's BEiT projection of ``x`` (samples, tokens, width) to q, k and v in one tensor, viewed as
    (samples, tokens, 3, heads, head width)."""
    if self.q_bias is None:
        qkv = self.qkv(x)
    else:
        qkv = nn.functional.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
    return qkv.reshape(*x.shape[:2], 3, self.num_heads, -1)


def _flex_forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
    """timm's BEiT attention (eval, per-layer bias) with the bias added inside FlexAttention."""
    if shared_rel_pos_bias is not None or (self.training and self.attn_drop.p > 0):
        return _classes()[0].forward(self, x, shared_rel_pos_bias)  # timm's own SDPA path
    from torch.nn.attention.flex_attention import flex_attention

    b, n, _ = x.shape
    q, k, v = _packed_qkv(self, x).permute(2, 0, 3, 1, 4).unbind(0)
    score_mod = relative_position_score_mod(self.relative_position_bias_table, self.window_size)
    x = flex_attention(q, k, v, score_mod=score_mod, scale=self.scale)
    x = x.transpose(1, 2).reshape(b, n, -1)
    return self.proj_drop(self.proj(x))


ALIGN = 16  # elements per bias row the fused SDPA kernels read at once; rows are padded to a multiple


def attend_by_head(packed: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """SDPA batched over heads, each head over the samples: ``packed`` (samples, tokens, 3, heads, head
    width) gives q, k and v as (heads, samples, tokens, head width) views, ``bias`` (1, heads, N, N) is
    handed over as (heads, 1, N, N). The output as (samples, tokens, heads, head width)."""
    q, k, v = packed.permute(2, 3, 0, 1, 4).unbind(0)
    x = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias.transpose(0, 1))
    return x.permute(1, 2, 0, 3)


def _by_head_forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
    """timm's BEiT attention (eval, per-layer bias) with SDPA batched by head (``attend_by_head``)."""
    if shared_rel_pos_bias is not None or (self.training and self.attn_drop.p > 0):
        return _classes()[0].forward(self, x, shared_rel_pos_bias)  # timm's own SDPA path
    b, n, _ = x.shape
    x = attend_by_head(_packed_qkv(self, x), self._get_rel_pos_bias()).reshape(b, n, -1)  # timm's layout
    return self.proj_drop(self.proj(x))


def _cached_rel_pos_bias(self) -> torch.Tensor:
    """The bias ``set_attention`` computed (rows padded to ``ALIGN``, this view drops the padding); in
    training, or once the table was changed in place or replaced, timm's own computation again."""
    table = self.relative_position_bias_table
    if self.training or (not torch.compiler.is_compiling() and self._bias_source != _identity(table)):
        return _classes()[0]._get_rel_pos_bias(self)
    return self.rel_pos_bias_cache[..., : self.relative_position_index.shape[-1]]


def _identity(table: torch.Tensor) -> tuple[int, int, torch.dtype, torch.device]:
    """What tells a table's values apart without reading them: storage, in-place writes (an inference
    tensor counts none: it can be written only inside inference mode), dtype, device."""
    return table.data_ptr(), -1 if table.is_inference() else table._version, table.dtype, table.device


def _cache_bias(module: nn.Module) -> None:
    with torch.no_grad():
        bias = _classes()[0]._get_rel_pos_bias(module)
        tokens = bias.shape[-1]
        padded = bias.new_zeros((*bias.shape[:-1], -(-tokens // ALIGN) * ALIGN))
        padded[..., :tokens] = bias
    module.register_buffer("rel_pos_bias_cache", padded, persistent=False)  # moves with the module
    module._bias_source = _identity(module.relative_position_bias_table)


def cached_bias_bytes(model: nn.Module) -> int:
    """Bytes the ``sdpa_cached`` and ``sdpa_by_head`` layers of ``model`` hold in their biases."""
    return sum(
        m.rel_pos_bias_cache.numel() * m.rel_pos_bias_cache.element_size()
        for m in model.modules()
        if isinstance(getattr(m, "rel_pos_bias_cache", None), torch.Tensor)
    )


@functools.cache
def _classes() -> tuple[type, type, type, type]:
    """(timm's BEiT attention, its cached-bias twin, its FlexAttention twin, its cached-bias twin
    batched by head); timm is imported only when asked."""
    from timm.models.beit import Attention

    cached = type(
        "CachedBiasBeitAttention",
        (Attention,),
        {"_get_rel_pos_bias": _cached_rel_pos_bias, "__doc__": "timm's BEiT attention, its bias computed once."},
    )
    flex = type("FlexBeitAttention", (Attention,), {"forward": _flex_forward, "__doc__": _flex_forward.__doc__})
    by_head = type(
        "ByHeadBeitAttention",
        (Attention,),
        {"_get_rel_pos_bias": _cached_rel_pos_bias, "forward": _by_head_forward, "__doc__": _by_head_forward.__doc__},
    )
    for twin in (cached, flex, by_head):
        twin.__module__ = __name__  # pickle finds it by name through __getattr__ below
    return Attention, cached, flex, by_head


def __getattr__(name: str) -> type:
    """The twins by name, so that a switched model pickles (torch.save, multiprocessing) and unpickles
    in a process that has not switched one yet."""
    twins = {cls.__name__: cls for cls in _classes()[1:]} if name.endswith("BeitAttention") else {}
    if name not in twins:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return twins[name]


def _index_matches(module: nn.Module) -> bool:
    """The module's own index buffer is the one ``relative_position_index`` computes (a model that
    interpolated or edited it keeps SDPA)."""
    index = module.relative_position_index
    tokens = torch.arange(index.shape[0], device=index.device)
    return torch.equal(relative_position_index(module.window_size, tokens[:, None], tokens[None, :]), index.long())


def set_attention(model: nn.Module, kernel: str) -> int:
    """Run every timm BEiT attention with a per-layer relative-position bias in ``model`` with
    ``kernel`` (sdpa: timm's own; sdpa_cached: its bias computed now, from the weights as they are;
    sdpa_by_head: the same with SDPA batched by head; flex: FlexAttention); returns how many modules run
    it now. Only timm's own class and its twins switch: a subclass of it has a forward of its own, which
    stays."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel must be one of {', '.join(ATTENTION_KERNELS)}, got {kernel!r}")
    if "timm.models.beit" not in sys.modules:
        return 0  # no BEiT can be in the model: timm need not be imported
    sdpa, cached, flex, by_head = _classes()
    switched = 0
    for name, module in model.named_modules():
        if type(module) not in (sdpa, cached, flex, by_head) or module.relative_position_bias_table is None:
            continue
        module._buffers.pop("rel_pos_bias_cache", None)  # a cache of an earlier sdpa_cached switch
        if kernel == "flex" and not _index_matches(module):
            log.warning("engine.attention=flex: %s has a relative-position index of its own; it keeps SDPA", name)
            module.__class__ = sdpa
            continue
        module.__class__ = {"sdpa": sdpa, "sdpa_cached": cached, "sdpa_by_head": by_head, "flex": flex}[kernel]
        if kernel in ("sdpa_cached", "sdpa_by_head"):
            _cache_bias(module)
        switched += 1
    return switched
