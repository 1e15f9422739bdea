"""The GPU-minded engine paths, checked on the CPU: out-of-memory halving, one copy to the host per
call, bf16 and compiled runs against fp32, padding, the memory model behind the presets' batch."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from raysmooth.config import compose, resolve_model_paths
from raysmooth.data import load_dataset
from raysmooth.engine import EngineConfig, Replica
from raysmooth.models import LinearBase, create_base_classifier, model_sections
from raysmooth.models.adm import ADM_PRESETS, scheduler_config, timestep_scale, unet_config
from raysmooth.models.attention import set_attention
from raysmooth.models.base import DenoiseThenClassify
from raysmooth.models.classifier import InputContract, NormalizedClassifier
from raysmooth.models.denoiser import DiffusionDenoiser
from raysmooth.models.mlp import set_gelu
from raysmooth.models.schedule import schedule_from_config
from raysmooth.units import WorkUnit

ROOT = Path(__file__).resolve().parents[1]


def _embedded(name: str):
    cfg = compose("certify", [f"model={name}"])
    base_name, kwargs = model_sections(dataclasses.asdict(resolve_model_paths(cfg.model)))
    return create_base_classifier(base_name, **kwargs)


@pytest.fixture(scope="module")
def digits():
    d = load_dataset("digits")
    return {i: d.images[i] for i in range(8)}


def _units(images, n=500, phase="estimation"):
    return [WorkUnit(i, 0, phase, 0, n) for i in images]


class FlakyMemory(LinearBase):
    """A linear model that 'runs out of device memory' on batches above 64."""

    def logits(self, z, sigma, aux_noise=None):
        if len(z) > 64:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().logits(z, sigma, aux_noise)


def _linear_case():
    """Six 4×4 images, 300 samples each, and a 5-class linear model's weights."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 16))
    images = {i: rng.random((1, 4, 4), dtype=np.float32) for i in range(6)}
    return w, images, _units(images, n=300)


def _same_as_a_plain_linear_run(counts, w, images, units) -> bool:
    plain = Replica(LinearBase(w, np.zeros(5), (1, 4, 4)), [0.5], 3, EngineConfig(batch_size=64)).run(units, images)
    return all(np.array_equal(counts[k], plain[k]) for k in plain)


def test_out_of_memory_halves_the_batch_and_keeps_every_count():
    w, images, units = _linear_case()
    flaky = Replica(FlakyMemory(w, np.zeros(5), (1, 4, 4)), [0.5], 3, EngineConfig(batch_size=256))
    counts = flaky.run(units, images)
    assert flaky.batch_size == 64
    assert _same_as_a_plain_linear_run(counts, w, images, units)


class OutOfMemoryOnce(LinearBase):
    """Runs out of device memory once, on its third batch, after two batches were reported as progress."""

    def __init__(self, *args):
        super().__init__(*args)
        self.calls = 0

    def logits(self, z, sigma, aux_noise=None):
        self.calls += 1
        if self.calls == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().logits(z, sigma, aux_noise)


def test_progress_hears_every_sample_once_even_when_an_out_of_memory_call_starts_over():
    w, images, units = _linear_case()
    heard = []
    replica = Replica(OutOfMemoryOnce(w, np.zeros(5), (1, 4, 4)), [0.5], 3, EngineConfig(batch_size=256))
    counts = replica.run(units, images, progress=heard.append)
    assert heard[:3] == [256, 256, -512]  # two batches queued, then taken back when the call started over
    assert sum(heard) == 6 * 300 and all(k == 128 for k in heard[3:-1])
    assert _same_as_a_plain_linear_run(counts, w, images, units)


def test_a_call_copies_to_the_host_once_and_never_asks_the_device_for_a_value(monkeypatch, digits):
    replica = Replica(_embedded("toy_onestep"), [0.25, 0.5], 0, EngineConfig(batch_size=128))
    calls = {"cpu": 0, "item": 0, "tolist": 0, "bool": 0}
    originals = {name: getattr(torch.Tensor, name) for name in ("cpu", "item", "tolist", "__bool__")}

    def counting(name, key):
        def wrapper(self, *args, **kwargs):
            calls[key] += 1
            return originals[name](self, *args, **kwargs)

        return wrapper

    for name, key in (("cpu", "cpu"), ("item", "item"), ("tolist", "tolist"), ("__bool__", "bool")):
        monkeypatch.setattr(torch.Tensor, name, counting(name, key))
    replica.run(_units(digits, n=600) + [WorkUnit(i, 1, "selection", 0, 70) for i in digits], digits)
    monkeypatch.undo()
    # 5,360 samples in 42 batches: one copy of the counts at the end, no value read inside the loop.
    assert calls == {"cpu": 1, "item": 0, "tolist": 0, "bool": 0}


def _flip_bound(a: dict, b: dict) -> float:
    """A lower bound on the share of samples whose class differs: half the L1 distance of the counts."""
    diff = sum(np.abs(a[k] - b[k]).sum() for k in a)
    total = sum(a[k].sum() for k in a)
    return diff / (2 * total)


@pytest.mark.parametrize("model", ["toy_onestep", "toy_dds"])
@pytest.mark.parametrize("precision", ["bf16", "bf16-mixed"])
def test_bf16_counts_agree_with_fp32_to_within_two_percent_of_the_samples(model, precision, digits):
    units = _units(digits)
    fp32 = Replica(_embedded(model), [0.5], 0, EngineConfig(batch_size=500)).run(units, digits)
    low = Replica(_embedded(model), [0.5], 0, EngineConfig(batch_size=500, precision=precision)).run(units, digits)
    # Same noise, a rounder model: a few labels flip near the decision boundaries, never many.
    assert _flip_bound(fp32, low) <= 0.02
    assert sum(c.sum() for c in low.values()) == 8 * 500


@pytest.mark.parametrize("precision", ["bf16", "bf16-mixed"])
def test_the_analytic_linear_model_runs_in_bf16_and_counts_like_fp32(precision):
    """Found by hand: `model=linear engine.precision=bf16` failed on every batch, its input cast to fp32
    against weights the engine had cast to bf16."""
    w, images, units = _linear_case()
    fp32 = Replica(LinearBase(w, np.zeros(5), (1, 4, 4)), [0.5], 3, EngineConfig(batch_size=64)).run(units, images)
    config = EngineConfig(batch_size=64, precision=precision)
    low = Replica(LinearBase(w, np.zeros(5), (1, 4, 4)), [0.5], 3, config).run(units, images)
    assert _flip_bound(fp32, low) <= 0.02 and all(low[u.key].sum() == 300 for u in units)


def test_a_compiled_model_counts_like_the_eager_one_and_padding_is_never_counted(digits):
    units = _units(digits, n=150)  # 1,200 samples in batches of 512: the last one is padded
    eager = Replica(_embedded("toy_onestep"), [0.5], 0, EngineConfig(batch_size=512)).run(units, digits)
    compiled = Replica(_embedded("toy_onestep"), [0.5], 0, EngineConfig(batch_size=512, compile=True)).run(
        units, digits
    )
    assert all(compiled[u.key].sum() == 150 for u in units)
    assert _flip_bound(eager, compiled) <= 0.002  # reordered float arithmetic may flip a rare label


class AuxLinear(LinearBase):
    """A linear model that also reads one auxiliary noise image per sample (as stochastic multi-step
    denoising does), so the engine hands its compiled forward a third tensor."""

    aux_noise_per_sample = 1

    def logits(self, z, sigma, aux_noise=None):
        return super().logits(z + 0.01 * aux_noise[:, 0], sigma)


def _toy_onestep():
    return _embedded("toy_onestep"), None


def _aux_linear():
    w, images, _ = _linear_case()
    return AuxLinear(w, np.zeros(5), (1, 4, 4)), images


@pytest.mark.parametrize("make", [_toy_onestep, _aux_linear], ids=["toy_onestep", "with_aux_noise"])
def test_a_compiled_replica_compiles_once_whether_or_not_its_caller_is_in_inference_mode(make, digits):
    """σ, the noise and any auxiliary noise reach the model made in inference mode like the images, so
    a caller's grad mode (a benchmark timing inside torch.inference_mode, an actor outside it) never
    costs a recompile."""
    from torch._dynamo.utils import counters

    base, images = make()
    images = images or dict(list(digits.items())[:2])
    replica = Replica(base, [0.5], 0, EngineConfig(batch_size=64, compile=True))
    units = _units(images, n=32)
    with torch.inference_mode():
        first = replica.run(units, images)
    compiled = counters["stats"]["unique_graphs"]
    second = replica.run(units, images)
    assert counters["stats"]["unique_graphs"] == compiled  # the second call reused the first one's graph
    assert all(np.array_equal(first[u.key], second[u.key]) for u in units)


def test_a_max_autotune_compiled_model_counts_like_the_eager_one(digits):
    units = _units(digits, n=150)  # padded as in the default mode
    eager = Replica(_embedded("toy_onestep"), [0.5], 0, EngineConfig(batch_size=512)).run(units, digits)
    cfg = EngineConfig(batch_size=512, compile=True, compile_mode="max-autotune-no-cudagraphs")
    tuned = Replica(_embedded("toy_onestep"), [0.5], 0, cfg).run(units, digits)
    assert all(tuned[u.key].sum() == 150 for u in units)
    assert _flip_bound(eager, tuned) <= 0.002


@pytest.mark.parametrize("mode", ["default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"])
def test_the_compile_mode_reaches_torch_compile_with_the_cpus_freezing_kept(monkeypatch, mode):
    """torch.compile takes a mode or options, not both: the engine passes the mode's options, plus
    freezing on a CPU (what makes compiling pay there)."""
    seen = {}

    def recording(model, **kwargs):
        seen.update(kwargs)
        return model

    monkeypatch.setattr(torch, "compile", recording)
    Replica(_embedded("linear"), [0.5], 0, EngineConfig(compile=True, compile_mode=mode))
    options = seen["options"]
    assert options.pop("freezing") is True and seen["dynamic"] is False
    assert options.get("max_autotune", False) is mode.startswith("max-autotune")
    assert options.get("triton.cudagraphs", False) is (mode in ("max-autotune", "reduce-overhead"))


def test_an_unknown_compile_mode_or_one_without_compile_is_refused(tmp_path):
    from raysmooth.config import ConfigError
    from raysmooth.errors import InputError

    with pytest.raises(InputError, match="engine.compile_mode must be one of default, max-autotune"):
        EngineConfig(compile=True, compile_mode="fastest")
    with pytest.raises(InputError, match="engine.compile_mode=max-autotune needs engine.compile=true"):
        EngineConfig(compile_mode="max-autotune")
    with pytest.raises(ConfigError, match="engine.compile_mode=reduce-overhead needs engine.compile=true"):
        compose("certify", ["engine.compile_mode=reduce-overhead", f"out={tmp_path}"])
    assert compose("certify", ["engine=gpu_compiled", "engine.compile_mode=max-autotune"]).engine.compile_mode == (
        "max-autotune"
    )


def _one_graph(base) -> None:
    """Trace ``base`` as the engine's compile does, refusing graph breaks (dynamo raises on one)."""
    z, sigma = torch.rand(4, *base.input_shape), torch.full((4,), 0.5)
    n_aux = base.aux_noise_per_sample
    aux = torch.randn(4, n_aux, *base.input_shape) if n_aux else None
    torch._dynamo.reset()
    with torch.inference_mode():
        torch.compile(base, fullgraph=True, backend="eager", dynamic=False)(z, sigma, aux)


@pytest.mark.parametrize(
    "model, overrides",
    [
        ("linear", []),
        ("toy_dds", []),
        ("toy_dds", ["+model.denoiser.steps=3", "+model.denoiser.eta=1"]),
        ("toy_diffsmooth", []),
        ("toy_onestep", []),
    ],
    ids=["linear", "dds", "dds-stochastic-multi-step", "diffsmooth", "onestep"],
)
def test_every_embedded_base_compiles_as_one_graph(model, overrides):
    """engine.compile compiles the whole base classifier: a graph break would split what inductor
    fuses and add a host round trip per batch, silently."""
    cfg = compose("certify", [f"model={model}", *overrides])
    base_name, kwargs = model_sections(dataclasses.asdict(resolve_model_paths(cfg.model)))
    _one_graph(create_base_classifier(base_name, **kwargs).eval())


def test_a_graph_break_is_what_that_check_catches():
    """The check can fail: a base that branches on a value read from the device breaks the graph."""

    class HostRead(LinearBase):
        def logits(self, z, sigma, aux_noise=None):
            out = super().logits(z, sigma, aux_noise)
            return out if bool((sigma > 0).all()) else -out

    with pytest.raises(torch._dynamo.exc.TorchDynamoException):
        _one_graph(HostRead(np.ones((3, 4)), np.zeros(3), (1, 2, 2)))


@pytest.mark.parametrize(
    "attention, gelu",
    [
        ("sdpa", "native"),
        ("sdpa_cached", "native"),
        ("sdpa_by_head", "native"),
        ("flex", "native"),
        ("sdpa_cached", "epilogue"),
    ],
)
def test_the_imagenet_pairs_layout_compiles_as_one_graph(attention, gelu):
    """guided-diffusion's ADM layout (up/down-sampling resblocks, fixed-width heads) then a BEiT with a
    per-layer relative-position bias, at toy sizes, with any attention kernel and either GELU."""
    from diffusers import UNet2DModel
    from timm.models.beit import Beit

    shrunk = dict(image_size=16, model_channels=32, channel_mult=[1, 1, 2], num_res_blocks=1, num_head_channels=16)
    adm = dataclasses.replace(ADM_PRESETS["imagenet256"], **shrunk, attention_resolutions=[8, 4])
    torch.manual_seed(0)
    unet = UNet2DModel(**unet_config(adm)).eval()
    denoiser = DiffusionDenoiser(unet, schedule_from_config(scheduler_config(adm)), timestep_scale=timestep_scale(adm))
    beit = Beit(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=1000, use_rel_pos_bias=True)
    beit.eval().requires_grad_(False)
    assert set_attention(beit, attention) == 2
    assert set_gelu(beit, gelu) == 2
    contract = InputContract((32, 32), "bicubic", (0.5,) * 3, (0.5,) * 3)
    _one_graph(DenoiseThenClassify(denoiser, NormalizedClassifier(beit, contract, 1000), (3, 16, 16)).eval())


def test_the_imagenet_preset_starts_with_a_batch_that_fits_an_80_gb_gpu(tmp_path):
    """+experiment=carlini_imagenet engine=gpu: the batch the run would start with, through the memory
    model of the real architectures (ADM-256 at 224 + BEiT-L/16 at 512) on the meta device."""
    from raysmooth.models.architectures import paper_pair
    from raysmooth.models.memory import estimate_memory
    from raysmooth.runner import engine_settings

    from helpers import imagenet_stand_in_overrides

    cfg = compose("certify", ["+experiment=carlini_imagenet", "engine=gpu", *imagenet_stand_in_overrides(tmp_path)])
    batch = engine_settings(cfg)["batch_size"]
    assert batch == cfg.model.batch_size == 96 and cfg.engine.batch_size is None  # the model's own batch
    est = estimate_memory(paper_pair("imagenet", "meta"), torch.bfloat16)
    assert 0.2e9 < est.per_sample_bytes < 0.4e9  # an H100 measured 0.28 GB per sample in bf16
    assert est.batch_bytes(batch) * 1.25 < 0.85 * 80e9  # with the engine's own buffers, under 85% of 80 GB


def test_the_imagenet_pairs_cached_bias_holds_0_8_gb_and_the_preset_batch_still_fits():
    """engine.attention=sdpa_cached keeps BEiT-L/16's 24 biases (16 heads × 1,025 rows padded to 1,040)
    as buffers, which the memory model counts with the weights."""
    from raysmooth.models.architectures import paper_pair
    from raysmooth.models.attention import cached_bias_bytes
    from raysmooth.models.memory import estimate_memory

    pair = paper_pair("imagenet", "meta").to(torch.bfloat16)
    assert set_attention(pair, "sdpa_cached") == 24
    held = cached_bias_bytes(pair)
    assert held == 24 * 16 * 1025 * 1040 * 2  # about 0.82 GB
    est = estimate_memory(pair, torch.bfloat16)
    assert est.weights_bytes > held and est.batch_bytes(96) * 1.25 < 0.85 * 80e9


@pytest.mark.parametrize("experiment", ["carlini_imagenet", "sequential_imagenet"])
def test_the_papers_imagenet_presets_compile_while_engine_gpu_stays_eager(tmp_path, experiment):
    """Measured on an H100 (README): compiled bf16 is 1.54x eager, and channels_last only pays compiled."""
    from helpers import imagenet_stand_in_overrides

    stand_ins = imagenet_stand_in_overrides(tmp_path)
    preset = compose("certify", [f"+experiment={experiment}", *stand_ins]).engine
    assert (preset.precision, preset.compile, preset.channels_last) == ("bf16", True, True)
    eager = compose("certify", [f"+experiment={experiment}", "engine=gpu", *stand_ins]).engine
    assert (eager.precision, eager.compile, eager.channels_last) == ("bf16", False, False)
    assert compose("certify", [f"+experiment={experiment}", "engine=cpu", *stand_ins]).engine.compile is False


def test_a_model_torch_compile_cannot_build_runs_eager_with_a_warning(digits, caplog):
    units = _units(digits, n=150)
    eager = Replica(_embedded("toy_onestep"), [0.5], 0, EngineConfig(batch_size=512)).run(units, digits)
    cfg = EngineConfig(batch_size=512, compile=True, compile_mode="max-autotune")
    replica = Replica(_embedded("toy_onestep"), [0.5], 0, cfg)

    def unbuildable(*args):
        raise RuntimeError("backend='inductor' raised: the GPU is too old for Triton")

    replica._forward = unbuildable  # what a failed compile raises at the first call
    with caplog.at_level("WARNING", logger="raysmooth"):
        counts = replica.run(units, digits)
    assert all(np.array_equal(counts[u.key], eager[u.key]) for u in units)  # the eager model's counts exactly
    assert "torch.compile failed" in caplog.text and "too old for Triton" in caplog.text
    assert replica.config.compile is False and replica.config.compile_mode == "default"


def test_a_compiled_model_that_fails_after_working_is_an_error_not_a_silent_switch(digits):
    units = _units(digits, n=150)
    replica = Replica(_embedded("toy_onestep"), [0.5], 0, EngineConfig(batch_size=512, compile=True))
    replica.run(units, digits)  # compiles and counts

    def broken(*args):
        raise RuntimeError("a model bug, not the compiler")

    replica._forward = broken
    with pytest.raises(RuntimeError, match="a model bug"):
        replica.run(units, digits)
    assert replica.config.compile is True


def _compiled_linear_runs(classes: list[int], engine_limit: int, dynamo_limit: int, monkeypatch):
    """Compiled replicas of linear models with ``classes`` outputs (so each is a new compiled version
    of the one forward), run in turn under the given limits; Dynamo's cache is fresh before and after.
    Returns what each replica records, whether its counts equal the eager model's, and how many graphs
    Dynamo really compiled (its own fallback past the limit would leave the record saying compiled)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    import raysmooth.engine as engine

    rng = np.random.default_rng(0)
    images = {i: rng.random((1, 4, 4), dtype=np.float32) for i in range(3)}
    units = _units(images, n=100)
    bases = [LinearBase(rng.standard_normal((k, 16)), np.zeros(k), (1, 4, 4)) for k in classes]
    monkeypatch.setattr(engine, "RECOMPILE_LIMIT", engine_limit)
    torch._dynamo.reset()
    counters.clear()  # reset() leaves Dynamo's statistics
    try:
        with torch._dynamo.config.patch(recompile_limit=dynamo_limit):
            replicas = [Replica(b, [0.5], 0, EngineConfig(batch_size=64, compile=True)) for b in bases]
            counts = [r.run(units, images) for r in replicas]
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    eager = [Replica(b, [0.5], 0, EngineConfig(batch_size=64)).run(units, images) for b in bases]
    same = [all(np.array_equal(c[u.key], e[u.key]) for u in units) for c, e in zip(counts, eager, strict=True)]
    return [r.config.compile for r in replicas], same, graphs


def test_a_process_compiles_more_models_than_dynamos_own_recompile_limit(monkeypatch):
    """Dynamo keeps 8 compiled versions of one forward by default, and every base classifier shares
    BaseClassifier.forward: the engine makes room for RECOMPILE_LIMIT (lowered here to stay quick)."""
    compiled, same, graphs = _compiled_linear_runs([5, 6, 7], engine_limit=3, dynamo_limit=1, monkeypatch=monkeypatch)
    assert graphs == 3 and compiled == [True, True, True] and all(same)


def test_a_replica_past_the_recompile_limit_runs_eager_and_says_so(monkeypatch, caplog):
    """Past the limit Dynamo itself would run the forward eager with only a log line, and the replica's
    config would still claim a compile: the replica switches to eager in the open instead."""
    with caplog.at_level("WARNING", logger="raysmooth"):
        compiled, same, graphs = _compiled_linear_runs([5, 6], engine_limit=1, dynamo_limit=1, monkeypatch=monkeypatch)
    assert graphs == 1 and compiled == [True, False] and all(same)
    assert "reached its limit of 1 compiled versions" in caplog.text and "runs eager" in caplog.text
