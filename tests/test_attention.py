"""engine.attention: BEiT's relative-position attention with its bias computed once (sdpa_cached) and
as FlexAttention (flex), checked against timm's own SDPA path on tiny BEiTs our code builds (no
download)."""

import logging

import numpy as np
import pytest
import torch
from timm.models.beit import Beit, gen_relative_position_index

from raysmooth.config import ConfigError, compose
from raysmooth.engine import EngineConfig, Replica
from raysmooth.errors import InputError
from raysmooth.models.attention import relative_position_index, set_attention
from raysmooth.models.base import PlainBase
from raysmooth.models.classifier import InputContract, NormalizedClassifier
from raysmooth.units import WorkUnit


def tiny_beit(seed: int = 0, **kw) -> Beit:
    """Two blocks on 16×16 images in 4×4 patches (a 4×4 window, 17 tokens); every parameter drawn at a
    scale that makes the bias matter (timm starts the bias tables at zero)."""
    torch.manual_seed(seed)
    args = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=4, num_classes=10)
    args.update(use_abs_pos_emb=False, use_rel_pos_bias=True)
    model = Beit(**{**args, **kw}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 2.0 if name.endswith("relative_position_bias_table") else 0.3)
    return model


def _flex_modules(model) -> int:
    return sum(type(m).__name__ == "FlexBeitAttention" for m in model.modules())


@pytest.mark.parametrize("window", [(4, 4), (3, 5), (32, 32)])
def test_the_computed_relative_position_index_is_timms(window):
    tokens = torch.arange(window[0] * window[1] + 1)
    computed = relative_position_index(window, tokens[:, None], tokens[None, :])
    assert torch.equal(computed, gen_relative_position_index(window))


TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.04}  # bf16: a few units in the last place at logits ~2


def _beit_and_its_logits(dtype) -> tuple[Beit, torch.Tensor, torch.Tensor]:
    """A tiny BEiT in ``dtype``, a batch of inputs, and timm's own (SDPA) logits for them."""
    model = tiny_beit().to(dtype)
    x = torch.randn(6, 1, 16, 16, dtype=dtype)
    with torch.no_grad():
        return model, x, model(x).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_flex_attention_gives_the_logits_of_timms_sdpa(dtype):
    model, x, expected = _beit_and_its_logits(dtype)
    with torch.no_grad():
        assert set_attention(model, "flex") == 2 and _flex_modules(model) == 2
        got = torch.compile(model, dynamic=False)(x).float()
    assert (got - expected).abs().max() < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_missing_bias_would_fail_that_check(dtype):
    """The check above can fail: attention without the bias moves the logits well past its tolerance."""
    model, x, expected = _beit_and_its_logits(dtype)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.relative_position_bias_table.zero_()
        assert (model(x).float() - expected).abs().max() > 2 * TOLERANCE[dtype]


def test_switching_keeps_every_parameter_and_state_dict_key_and_switches_back():
    model = tiny_beit()
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    set_attention(model, "flex")
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before
    assert set_attention(model, "sdpa") == 2 and _flex_modules(model) == 0


def test_models_without_a_per_layer_bias_keep_sdpa(caplog):
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10)
    assert set_attention(vit, "flex") == 0  # no relative-position bias: flash already applies
    shared = tiny_beit(use_rel_pos_bias=False, use_shared_rel_pos_bias=True)
    assert set_attention(shared, "flex") == 0
    edited = tiny_beit()
    edited.blocks[1].attn.relative_position_index[1, 2] += 1  # an index of its own: not what flex computes
    with caplog.at_level(logging.WARNING, logger="raysmooth"):
        assert set_attention(edited, "flex") == 1
    assert "blocks.1.attn" in caplog.text and "keeps SDPA" in caplog.text


def test_a_subclass_of_timms_attention_keeps_its_own_forward():
    from timm.models.beit import Attention

    class Custom(Attention):
        pass

    model = tiny_beit()
    model.blocks[0].attn.__class__ = Custom
    assert set_attention(model, "flex") == 1 and type(model.blocks[0].attn) is Custom
    assert set_attention(model, "sdpa") == 1 and type(model.blocks[0].attn) is Custom


def test_an_unknown_attention_kernel_is_refused():
    with pytest.raises(ValueError, match="sdpa, sdpa_cached, sdpa_by_head, flex"):
        set_attention(tiny_beit(), "xformers")


def _beit_base() -> PlainBase:
    contract = InputContract(input_size=(16, 16), interpolation="bilinear", mean=(0.5,), std=(0.5,))
    return PlainBase(NormalizedClassifier(tiny_beit(), contract, 10), (1, 16, 16))


def test_a_flex_replica_counts_like_an_sdpa_one():
    images = {i: np.random.default_rng(i).random((1, 16, 16), dtype=np.float32) for i in range(3)}
    units = [WorkUnit(i, 0, "estimation", 0, 200) for i in images]
    z = torch.rand(256, 1, 16, 16)
    counts, logits = {}, {}
    for kernel in ("sdpa", "flex"):
        replica = Replica(_beit_base(), [0.25], 0, EngineConfig(batch_size=256, compile=True, attention=kernel))
        assert _flex_modules(replica.base) == (2 if kernel == "flex" else 0)
        counts[kernel] = replica.run(units, images)
        with torch.no_grad():
            logits[kernel] = replica._forward(z, torch.full((256,), 0.25))
    assert (logits["flex"] - logits["sdpa"]).abs().max() < TOLERANCE[torch.float32]
    flips = sum(np.abs(counts["flex"][u.key] - counts["sdpa"][u.key]).sum() // 2 for u in units)
    assert flips <= 1  # 600 samples: reordered float arithmetic may flip a rare near-tie


def test_a_model_a_flex_replica_switched_runs_sdpa_in_a_later_sdpa_replica():
    base = _beit_base()
    Replica(base, [0.25], 0, EngineConfig(batch_size=16, compile=True, attention="flex"))
    assert _flex_modules(base) == 2
    Replica(base, [0.25], 0, EngineConfig(batch_size=16))
    assert _flex_modules(base) == 0  # eager FlexAttention would run unfused


def test_flex_attention_without_compile_is_refused_in_the_engine_and_the_config(tmp_path):
    with pytest.raises(InputError, match="engine.compile=true"):
        EngineConfig(attention="flex")
    with pytest.raises(InputError, match="sdpa, sdpa_cached, sdpa_by_head, flex"):
        EngineConfig(attention="flash", compile=True)
    with pytest.raises(ConfigError, match="engine.attention=flex needs engine.compile=true"):
        compose("certify", ["engine.attention=flex", f"out={tmp_path}"])
    assert compose("certify", ["engine=gpu_compiled", "engine.attention=flex"]).engine.attention == "flex"


def test_a_replica_whose_compile_fails_goes_back_to_sdpa(caplog):
    images = {0: np.random.default_rng(0).random((1, 16, 16), dtype=np.float32)}
    units = [WorkUnit(0, 0, "estimation", 0, 50)]
    replica = Replica(_beit_base(), [0.25], 0, EngineConfig(batch_size=64, compile=True, attention="flex"))

    def unbuildable(*args):
        raise RuntimeError("backend='inductor' raised: no flex template for this device")

    replica._forward = unbuildable
    with caplog.at_level("WARNING", logger="raysmooth"):
        counts = replica.run(units, images)
    assert counts[units[0].key].sum() == 50
    assert replica.config.attention == "sdpa" and _flex_modules(replica.base) == 0  # eager FlexAttention is slow


# ---- sdpa_cached ---------------------------------------------------------------------------------
def _cached_modules(model) -> list:
    return [m for m in model.modules() if type(m).__name__ == "CachedBiasBeitAttention"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_cached_bias_is_timms_bias_in_rows_aligned_to_16(dtype):
    model = tiny_beit().to(dtype)
    with torch.no_grad():
        timms = [block.attn._get_rel_pos_bias() for block in model.blocks]
        assert set_attention(model, "sdpa_cached") == 2 and len(_cached_modules(model)) == 2
        kept = [block.attn._get_rel_pos_bias() for block in model.blocks]
    for theirs, ours in zip(timms, kept, strict=True):
        assert torch.equal(theirs, ours) and ours.dtype == dtype
        assert ours.stride(-1) == 1 and ours.stride(-2) % 16 == 0  # 17 tokens, rows of 32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_cached_bias_gives_timms_logits_eager_and_compiled(dtype):
    model, x, expected = _beit_and_its_logits(dtype)
    with torch.no_grad():
        set_attention(model, "sdpa_cached")
        eager = model(x).float()
        compiled = torch.compile(model, dynamic=False)(x).float()
    assert torch.equal(eager, expected)
    assert (compiled - expected).abs().max() < TOLERANCE[dtype]


def test_a_cached_bias_is_not_a_weight_and_goes_when_switched_back():
    model = tiny_beit()
    keys = set(model.state_dict())
    set_attention(model, "sdpa_cached")
    assert set(model.state_dict()) == keys  # a checkpoint saved from a replica's model is timm's
    assert all("rel_pos_bias_cache" in dict(m.named_buffers()) for m in _cached_modules(model))
    assert set_attention(model, "sdpa") == 2
    assert not any("rel_pos_bias_cache" in name for name, _ in model.named_buffers())


def test_weights_changed_after_caching_are_used_not_the_stale_bias():
    """Eager, a table written in place or loaded from a state dict is seen at once: the cache stands
    only for the table it was computed from."""
    model, x, _ = _beit_and_its_logits(torch.float32)
    other = tiny_beit(seed=1)
    set_attention(model, "sdpa_cached")
    with torch.no_grad():
        model.load_state_dict(other.state_dict())
        assert torch.equal(model(x), other(x))
        for block in (model.blocks[0], other.blocks[0]):
            block.attn.relative_position_bias_table.mul_(3)
        assert torch.equal(model(x), other(x))


def test_training_a_cached_model_trains_its_bias_table():
    model = tiny_beit()
    set_attention(model, "sdpa_cached")
    model.train()
    model(torch.randn(2, 1, 16, 16)).square().sum().backward()
    assert all(m.relative_position_bias_table.grad.abs().sum() > 0 for m in _cached_modules(model))


def test_a_cached_replica_counts_exactly_like_an_sdpa_one(caplog):
    images = {i: np.random.default_rng(i).random((1, 16, 16), dtype=np.float32) for i in range(3)}
    units = [WorkUnit(i, 0, "estimation", 0, 200) for i in images]
    z = torch.rand(64, 1, 16, 16)
    counts, logits = {}, {}
    for kernel in ("sdpa", "sdpa_cached"):
        with caplog.at_level(logging.INFO, logger="raysmooth"):
            replica = Replica(_beit_base(), [0.25], 0, EngineConfig(batch_size=64, attention=kernel))
        counts[kernel] = replica.run(units, images)
        with torch.no_grad():
            logits[kernel] = replica._forward(z, torch.full((64,), 0.25))
    assert len(_cached_modules(replica.base)) == 2
    assert "engine.attention=sdpa_cached: 2 attention layers switched (their biases hold" in caplog.text
    assert torch.equal(logits["sdpa"], logits["sdpa_cached"])
    assert all(np.array_equal(counts["sdpa"][u.key], counts["sdpa_cached"][u.key]) for u in units)


def test_a_cached_bias_on_a_model_without_beit_is_plain_sdpa_and_no_warning(caplog):
    """sdpa_cached is engine=gpu_compiled's setting, which the CIFAR pair (a ViT, no relative-position
    bias) runs too: nothing to switch, and nothing a user must act on."""
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, in_chans=1, num_classes=10)
    contract = InputContract(input_size=(16, 16), interpolation="bilinear", mean=(0.5,), std=(0.5,))
    base = PlainBase(NormalizedClassifier(vit.eval(), contract, 10), (1, 16, 16))
    with caplog.at_level(logging.INFO, logger="raysmooth"):
        Replica(base, [0.25], 0, EngineConfig(batch_size=8, attention="sdpa_cached"))
    assert "no BEiT relative-position attention" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_cached_bias_needs_no_compile():
    assert EngineConfig(attention="sdpa_cached").attention == "sdpa_cached"
    assert compose("certify", ["engine.attention=sdpa_cached"]).engine.attention == "sdpa_cached"


def test_a_model_built_in_inference_mode_runs_with_a_cached_bias():
    """Inference tensors keep no count of in-place writes; the cache then stands for the storage alone."""
    with torch.inference_mode():
        model, x, expected = _beit_and_its_logits(torch.float32)
        set_attention(model, "sdpa_cached")
        assert torch.equal(model(x), expected)
    with torch.no_grad():
        assert torch.equal(model(x.clone()), expected)


@pytest.mark.parametrize("kernel", ["sdpa_cached", "flex"])
def test_a_switched_model_pickles_and_loads_in_a_fresh_process(tmp_path, kernel):
    """torch.save of a whole model (or multiprocessing) pickles its classes by name."""
    import pickle
    import subprocess
    import sys

    model, x, expected = _beit_and_its_logits(torch.float32)
    set_attention(model, kernel)
    (tmp_path / "model.pkl").write_bytes(pickle.dumps((model, x, expected)))
    check = (
        "import pickle, sys, torch; torch.set_grad_enabled(False); "
        "model, x, expected = pickle.loads(open(sys.argv[1], 'rb').read()); "
        "print(type(model.blocks[0].attn).__name__, float((model.eval()(x) - expected).abs().max()))"
    )
    out = subprocess.run([sys.executable, "-c", check, str(tmp_path / "model.pkl")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    name, difference = out.stdout.split()
    assert name == ("CachedBiasBeitAttention" if kernel == "sdpa_cached" else "FlexBeitAttention")
    assert float(difference) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_batched_by_head_gives_timms_logits_eager_and_compiled(dtype):
    """sdpa_by_head hands SDPA the heads as its batch axis and the samples as its head axis: each
    (sample, head) attention is the one timm computes."""
    model, x, expected = _beit_and_its_logits(dtype)
    with torch.no_grad():
        assert set_attention(model, "sdpa_by_head") == 2
        assert sum(type(m).__name__ == "ByHeadBeitAttention" for m in model.modules()) == 2
        eager = model(x).float()
        compiled = torch.compile(model, dynamic=False)(x).float()
    assert (eager - expected).abs().max() < TOLERANCE[dtype]
    assert (compiled - expected).abs().max() < TOLERANCE[dtype]


def test_attention_batched_by_head_hands_sdpa_the_heads_as_its_batch_and_one_bias_per_head(monkeypatch):
    """What the kernel is given: q, k, v of shape (heads, samples, tokens, width) as views of the packed
    projection (no copy), and the cached bias, aligned rows and all, broadcast over the samples."""
    model = tiny_beit()
    set_attention(model, "sdpa_by_head")
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append((q, k, v, attn_mask))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        model(torch.randn(6, 1, 16, 16))
    assert len(seen) == 2
    for q, k, v, bias in seen:
        assert q.shape == k.shape == v.shape == (4, 6, 17, 8)  # heads, samples, tokens, head width
        assert q.stride(0) < q.stride(1) and not q.is_contiguous()  # a view: heads are not outermost in memory
        assert bias.shape == (4, 1, 17, 17) and bias.stride(-2) % 16 == 0  # the cached, aligned rows


def test_a_by_head_replica_counts_like_an_sdpa_one(caplog):
    images = {i: np.random.default_rng(i).random((1, 16, 16), dtype=np.float32) for i in range(3)}
    units = [WorkUnit(i, 0, "estimation", 0, 200) for i in images]
    counts = {}
    for kernel in ("sdpa", "sdpa_by_head"):
        with caplog.at_level(logging.INFO, logger="raysmooth"):
            replica = Replica(_beit_base(), [0.25], 0, EngineConfig(batch_size=64, attention=kernel))
        counts[kernel] = replica.run(units, images)
    assert "engine.attention=sdpa_by_head: 2 attention layers switched (their biases hold" in caplog.text
    assert all(np.array_equal(counts["sdpa"][u.key], counts["sdpa_by_head"][u.key]) for u in units)


def test_a_model_batched_by_head_pickles_by_name():
    """As the twins above (their classes are found by name, which a fresh process does the same way)."""
    import pickle

    model, x, expected = _beit_and_its_logits(torch.float32)
    set_attention(model, "sdpa_by_head")
    again = pickle.loads(pickle.dumps(model))
    assert type(again.blocks[0].attn).__name__ == "ByHeadBeitAttention"
    with torch.no_grad():
        assert (again(x) - expected).abs().max() < TOLERANCE[torch.float32]
