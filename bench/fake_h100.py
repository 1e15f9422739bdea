"""Inductor's CUDA kernels for a model, generated on a machine with no GPU (a pretend H100).

The GPU profile names inductor's slowest kernels but a GPU session is short and rare; their source says
why they are slow (which layout each buffer has, how an index is computed). This module makes inductor
write that source on a CPU: the model is built on the meta device and re-typed as fake CUDA tensors,
dynamo captures its graph (nothing runs), and inductor lowers, schedules and generates every Triton
kernel and the wrapper that launches them, for a device that answers inductor's questions as an H100
80GB does. Nothing is compiled by Triton or run.

What is emulated, and how (``pretend_h100`` patches torch for good, so run it in a process of its own,
as bench/codegen.py does):
- convolutions pick cuDNN, so a channels_last input gives a channels_last output as on a GPU (the fake
  tensor's own choice, made without a GPU, is the slow CPU-style kernel with contiguous outputs);
- attention runs cuDNN's fused kernel, as the H100 profiles of the ImageNet pair show PyTorch picking
  (the C++ choice needs a GPU and would fall back to the unfused math);
- device properties are an H100's (132 SMs, compute capability 9.0);
- two things inductor would do on the device itself are answered without it: timing whether to pad a
  matrix product (answered no; the questions are recorded) and evaluating uniform constants to fold
  them (skipped).
The kernels it writes for the ImageNet pair under the GPU image's PyTorch are those of the H100
profile, name for name (docs/performance.md, "Inductor's kernels without a GPU").
"""

from __future__ import annotations

import collections
import dataclasses
import sys
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["H100", "Generated", "capture", "fake_cuda", "generate", "pretend_h100"]

_Props = collections.namedtuple(
    "_Props",
    "name major minor multi_processor_count total_memory regs_per_multiprocessor "
    "max_threads_per_multi_processor max_threads_per_block warp_size shared_memory_per_block_optin "
    "L2_cache_size gcnArchName",
)
H100 = _Props("NVIDIA H100 80GB HBM3", 9, 0, 132, 80 * 2**30, 65536, 2048, 1024, 32, 232448, 50 * 2**20, "")


@dataclasses.dataclass
class Generated:
    """What inductor wrote: each Triton kernel's source by name, the wrapper modules that launch
    them, and the matrix products whose padding it asked about (answered no)."""

    kernels: dict[str, str] = dataclasses.field(default_factory=dict)
    wrappers: list[str] = dataclasses.field(default_factory=list)
    pad_questions: list[tuple[str, tuple, tuple]] = dataclasses.field(default_factory=list)


_SEEN = Generated()  # what the patched hooks write into (generate() starts a fresh one per graph)


def _layouts_as_on_a_gpu() -> None:
    """cuDNN convolutions and cuDNN attention for fake CUDA tensors (needed while dynamo traces too)."""
    if getattr(torch._C._select_conv_backend, "_pretend", False):
        return
    select = torch._C._select_conv_backend

    def cudnn_select(*args, **kwargs):
        tensor = args[0] if args else kwargs["input"]
        return torch._C._ConvBackend.Cudnn if tensor.device.type == "cuda" else select(*args, **kwargs)

    cudnn_select._pretend = True
    torch._C._select_conv_backend = cudnn_select

    import torch.nn.functional as F

    sdpa = F.scaled_dot_product_attention

    def cudnn_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if q.device.type != "cuda" or enable_gqa:
            return sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        op = torch.ops.aten._scaled_dot_product_cudnn_attention
        return op(q, k, v, attn_mask, False, dropout_p, is_causal, False, scale=scale)[0]

    F.scaled_dot_product_attention = cudnn_sdpa


def pretend_h100() -> Generated:
    """Patch torch (in this process, for good) so that inductor generates CUDA kernels without a GPU;
    returns the record the generated code is written into."""
    _layouts_as_on_a_gpu()
    import torch._inductor.config as inductor
    import torch._subclasses.fake_tensor as fake_tensor
    import torch.utils._triton as triton_utils
    from torch._inductor import async_compile
    from torch._inductor.fx_passes import fuse_attention, joint_graph, misc_patterns, pad_mm

    for name, fn in {
        "is_available": lambda: True,
        "device_count": lambda: 1,
        "current_device": lambda: 0,
        "set_device": lambda *a, **k: None,
        "synchronize": lambda *a, **k: None,
        "get_device_properties": lambda *a, **k: H100,
        "_get_device_properties": lambda *a, **k: H100,
        "get_device_capability": lambda *a, **k: (H100.major, H100.minor),
        "get_device_name": lambda *a, **k: H100.name,
        "is_bf16_supported": lambda *a, **k: True,
        "get_rng_state": lambda *a, **k: torch.zeros(16, dtype=torch.uint8),
        "set_rng_state": lambda *a, **k: None,
        "_lazy_init": lambda: None,
        "_exchange_device": lambda index: 0,
        "_maybe_exchange_device": lambda index: 0,
    }.items():
        setattr(torch.cuda, name, fn)
    fake_tensor.init_gpu_context = lambda device: None
    for module in list(sys.modules.values()):  # modules that imported has_triton by name
        if getattr(module, "__name__", "").startswith("torch") and callable(getattr(module, "has_triton", None)):
            module.has_triton = lambda: True
    triton_utils.triton_hash_with_backend = lambda: "pretend-h100"
    triton_utils.triton_backend = lambda: "cuda"

    def keep_source(self, kernel_name, source_code, *args, **kwargs):
        _SEEN.kernels[kernel_name] = source_code
        return _NotRunnable()

    async_compile.AsyncCompile.triton = keep_source

    def no_padding(match, mat1, mat2, op, input=None):
        _SEEN.pad_questions.append((str(op), tuple(mat1.shape), tuple(mat2.shape)))
        return False

    pad_mm._should_pad = no_padding
    joint_graph.constant_fold_uniform_value = lambda gm: None
    # Pattern libraries trace small example tensors on the input's device: trace them on the CPU.
    for module, fn in ((fuse_attention, "_sfdp_init"), (misc_patterns, "_misc_patterns_init")):
        original = getattr(module, fn)
        setattr(module, fn, lambda input_device=None, _original=original: _original(torch.device("cpu")))
    inductor.fx_graph_cache = False  # a cache hit writes no code
    inductor.autotune_local_cache = False
    return _SEEN


class _NotRunnable:
    def run(self, *args, **kwargs):
        raise RuntimeError("a kernel generated for a pretend H100 cannot run")


def fake_cuda(model: nn.Module, mode) -> nn.Module:
    """``model`` (built on the meta device) with every parameter and buffer a fake CUDA tensor of
    ``mode``, in place: dynamo then traces it with a GPU's layout rules, allocating nothing."""
    from torch._subclasses.fake_tensor import FakeTensor

    _layouts_as_on_a_gpu()
    device = torch.device("cuda", 0)
    for module in model.modules():
        for key, value in list(module._parameters.items()):
            if value is not None:
                module._parameters[key] = nn.Parameter(FakeTensor(mode, value.data, device), requires_grad=False)
        for key, value in list(module._buffers.items()):
            if value is not None:
                module._buffers[key] = FakeTensor(mode, value, device)
    return model


def capture(fn: Callable, *args) -> tuple[torch.fx.GraphModule, list]:
    """The one graph dynamo captures for ``fn(*args)`` (a graph break is an error), with its example
    inputs (parameters lifted); the backend stops there, so nothing runs."""
    graphs: list = []

    class _Captured(Exception):
        pass

    def backend(gm, example_inputs):
        graphs.append((gm, example_inputs))
        raise _Captured

    torch._dynamo.reset()
    with torch.no_grad():
        try:
            torch.compile(fn, backend=backend, dynamic=False, fullgraph=True)(*args)
        except Exception:
            if not graphs:
                raise
    return graphs[0]


def generate(gm: torch.fx.GraphModule, example_inputs: list) -> Generated:
    """Inductor's code for the captured graph on a pretend H100: kernels and wrapper modules."""
    from torch._inductor import codecache
    from torch._inductor.compile_fx import compile_fx
    from torch._subclasses.fake_tensor import FakeTensorMode

    global _SEEN
    pretend_h100()
    _SEEN = seen = Generated()  # a fresh record for this graph; the patched hooks write into _SEEN
    with FakeTensorMode(allow_non_fake_inputs=False):
        inputs = [
            torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda") if isinstance(t, torch.Tensor) else t
            for t in example_inputs
        ]
    load = codecache.PyCodeCache.load_by_key_path

    def keep_wrapper(key, path, *args, **kwargs):
        with open(path) as f:
            seen.wrappers.append(f.read())
        return load(key, path, *args, **kwargs)

    codecache.PyCodeCache.load_by_key_path = keep_wrapper
    try:
        with torch.no_grad():
            compile_fx(gm, inputs)
    finally:
        codecache.PyCodeCache.load_by_key_path = load
    return seen
