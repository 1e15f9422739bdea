"""bench/roofline.py: the operator trace behind the GPU bounds counts FLOPs and bytes correctly."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import roofline  # noqa: E402


def tiny_block():
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.SiLU())
    return net.to("meta", torch.bfloat16)


def test_a_convolution_group_norm_and_silu_are_counted_by_hand():
    x = torch.empty((2, 4, 6, 6), device="meta", dtype=torch.bfloat16)
    ops = roofline.trace(tiny_block(), (x,))
    assert [op.kind for op in ops] == ["convolution", "group_norm", "elementwise"]
    conv, norm, act = ops
    activation_in, activation_out = 2 * 4 * 36 * 2, 2 * 8 * 36 * 2  # bf16: 2 bytes per element
    assert conv.flops == 2 * (2 * 8 * 36) * (4 * 3 * 3)  # a multiply-add per weight per output element
    assert conv.bytes_in == activation_in + 8 * 4 * 9 * 2 + 8 * 2  # input, weight, bias
    assert conv.bytes_out == activation_out and conv.spatial == 36
    assert norm.flops == 0 and norm.bytes_in == activation_out + 2 * 8 * 2 and norm.bytes_out == activation_out
    assert act.bytes_in == act.bytes_out == activation_out


def test_a_broadcast_tensor_counts_its_distinct_elements_once():
    bias = torch.empty((1, 16, 100, 100), device="meta", dtype=torch.bfloat16)
    assert roofline.tensor_bytes(bias.expand(96, 16, 100, 100)) == 16 * 100 * 100 * 2


def test_views_and_eval_dropout_move_nothing():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(12, 3)).eval()
    ops = roofline.trace(net.to("meta"), (torch.empty((5, 3, 2, 2), device="meta"),))
    assert [op.kind for op in ops] == ["matmul"] and ops[0].flops == 2 * 5 * 3 * 12


def test_a_matmul_counts_its_inner_dimension_whatever_the_call():
    a, b = torch.empty((5, 12), device="meta"), torch.empty((12, 3), device="meta")
    bias = torch.empty((3,), device="meta")
    assert roofline.op_flops("mm", "matmul", (a, b), a @ b) == 2 * 5 * 3 * 12
    assert roofline.op_flops("addmm", "matmul", (bias, a, b), a @ b) == 2 * 5 * 3 * 12


def test_the_pair_flops_agree_with_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from raysmooth.models.architectures import paper_pair

    model = paper_pair("cifar10", "meta")
    z = torch.empty((2, *model.input_shape), device="meta")
    sigma = torch.full((2,), 0.5, device="meta")
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(z, sigma, None)
    traced = sum(op.flops for op in roofline.trace(model, (z, sigma, None)))
    assert traced == pytest.approx(counter.get_total_flops(), rel=1e-9)


def test_each_bound_is_faster_than_the_one_that_moves_more():
    ops = roofline.pair_ops("cifar10", batch=2)
    b = roofline.bounds(ops, 2, flop_rate=779e12, bandwidth=3.35e12, peak=989e12)
    assert b["eager"]["samples_per_s"] < b["fused"]["samples_per_s"] < b["compute"]["samples_per_s"]
    assert b["compute"]["share_of_bf16_peak"] == pytest.approx(779 / 989, abs=1e-4)  # FLOPs at the matmul rate
    assert {op.part for op in ops} >= {"denoiser", "classifier"}


def test_a_kernel_profile_is_set_against_the_bound_of_its_own_kind(tmp_path):
    profile = {
        "pair": "cifar10",
        "test": "CUDA kernel time by kind, one forward batch (bf16, channels_last)",
        "total_ms": 100.0,
        "share_by_kind": {"convolution": 0.5, "elementwise": 0.3, "normalisation": 0.2},
    }
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"rows": [{"pair": "cifar10", "batch": 10}, profile]}))  # one fresh run
    ops = roofline.pair_ops("cifar10", batch=2)
    runs = roofline.runs_of(json.loads(path.read_text()))
    (row,) = roofline.kernels_against_bound(ops, 2, "cifar10", runs, 779e12, 3.35e12)
    assert row["run"] == "new" and row["bound"] == "eager" and row["batch"] == 10
    kinds = row["by_kind"]
    assert kinds["convolution"]["measured_ms_per_sample"] == 5.0  # 50% of 100 ms over 10 samples
    assert kinds["everything else"]["measured_ms_per_sample"] == 5.0  # elementwise and norms pooled
    assert kinds["matmul"]["measured_ms_per_sample"] == 0.0 and kinds["matmul"]["bound_ms_per_sample"] > 0
    conv = kinds["convolution"]
    ratio = conv["measured_ms_per_sample"] / conv["bound_ms_per_sample"]  # the bound is rounded to 1 µs
    assert conv["measured_over_bound"] == pytest.approx(ratio, rel=0.02)


def test_the_best_compiled_rate_counts_the_compiled_comparisons_variants_named_with_their_test():
    run = {
        "run": 7,
        "rows": [
            {"pair": "imagenet", "precision": "bf16", "compiled": True, "samples_per_s": 150.0},
            {
                "pair": "imagenet",
                "test": "bf16 compiled, channels_last: free against pinned",
                "free": {"samples_per_s": 153.0},
                "pinned": {"samples_per_s": 168.0},
            },
            {"pair": "imagenet", "test": "eager, by SDPA backend", "cudnn": {"samples_per_s": 999.0}},
        ],
    }
    best = roofline.measured_rates([run])["imagenet compiled"]
    assert best == {
        "samples_per_s": 168.0,
        "run": 7,
        "case": "pinned (bf16 compiled, channels_last: free against pinned)",
    }
