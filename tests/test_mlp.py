"""engine.gelu=epilogue: a timm MLP's first matmul and its GELU as one call with cuBLASLt's epilogue."""

import functools
import logging

import numpy as np
import pytest
import torch
from timm.layers import Mlp
from timm.models.beit import Beit
from torch import nn

from raysmooth.config import ConfigError, compose, counts_relevant_config
from raysmooth.engine import EngineConfig, Replica
from raysmooth.errors import InputError
from raysmooth.models.base import PlainBase
from raysmooth.models.classifier import InputContract, NormalizedClassifier
from raysmooth.models.mlp import GELU_TANH_MAX_ERROR, set_gelu
from raysmooth.store import config_differences, config_hash
from raysmooth.units import WorkUnit


def _mlps() -> tuple[Mlp, Mlp]:
    torch.manual_seed(0)
    native = Mlp(16, 64)
    twin = Mlp(16, 64)
    twin.load_state_dict(native.state_dict())
    assert set_gelu(twin, "epilogue") == 1
    return native.eval(), twin.eval()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 0.0)])
def test_on_a_cpu_the_epilogue_mlp_gives_timms_outputs(dtype, tol):
    """ATen's CPU kernel applies the exact GELU after the product, as nn.GELU does."""
    native, twin = _mlps()
    x = torch.randn(3, 5, 16) * 2
    with torch.inference_mode():
        expected, got = native.to(dtype)(x.to(dtype)), twin.to(dtype)(x.to(dtype))
    assert got.shape == (3, 5, 16)
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


def test_the_gpus_tanh_gelu_is_within_the_stated_error_of_the_exact_one():
    """What the epilogue changes on a GPU, where cuBLASLt's GELU is the tanh form: at most
    GELU_TANH_MAX_ERROR, and the constant is not loose."""
    x = torch.linspace(-12, 12, 2_400_001, dtype=torch.float64)
    gap = (nn.functional.gelu(x) - nn.functional.gelu(x, approximate="tanh")).abs().max().item()
    assert 0.95 * GELU_TANH_MAX_ERROR < gap <= GELU_TANH_MAX_ERROR


def test_under_autocast_it_runs_timms_own_forward():
    """The fused op is not on autocast's lower-precision list: under autocast the MLP keeps timm's path,
    whose matmuls autocast casts."""
    native, twin = _mlps()
    x = torch.randn(4, 16)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = native(x), twin(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    assert torch.equal(got, expected)


def test_switching_keeps_every_state_dict_key_and_switches_back():
    beit = Beit(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, use_rel_pos_bias=True)
    keys = list(beit.state_dict())
    assert set_gelu(beit, "epilogue") == 2
    assert list(beit.state_dict()) == keys
    assert not any(type(m) is Mlp for m in beit.modules())
    assert set_gelu(beit, "native") == 2
    assert sum(type(m) is Mlp for m in beit.modules()) == 2


def test_mlps_without_a_biased_linear_and_the_exact_gelu_or_of_a_subclass_stay_as_they_are():
    class MyMlp(Mlp):
        pass

    tanh = functools.partial(nn.GELU, approximate="tanh")  # a CPU's epilogue would give it the exact GELU
    model = nn.Sequential(
        Mlp(8, 16, act_layer=nn.SiLU),
        Mlp(8, 16, act_layer=tanh),
        Mlp(8, 16, bias=False),
        Mlp(8, 16, use_conv=True),
        MyMlp(8, 16),
        Mlp(8, 16),
    )
    assert set_gelu(model, "epilogue") == 1
    assert [type(m).__name__ for m in model] == ["Mlp", "Mlp", "Mlp", "Mlp", "MyMlp", "EpilogueGeluMlp"]


def test_an_unknown_gelu_kind_is_refused_by_the_module_the_engine_and_the_config():
    with pytest.raises(ValueError, match="native, epilogue"):
        set_gelu(Mlp(4, 8), "tanh")
    with pytest.raises(InputError, match="engine.gelu must be one of native, epilogue, got 'tanh'"):
        EngineConfig(gelu="tanh")
    with pytest.raises(ConfigError, match="engine.gelu must be one of native, epilogue"):
        compose("certify", ["engine.gelu=tanh"])


def test_the_compiled_presets_run_the_epilogue_and_a_run_can_still_ask_for_timms_mlp():
    """Measured faster on an H100 (run 12: 1.018x ImageNet, 1.045x CIFAR), so engine=gpu_compiled sets it;
    engine=gpu (eager) and the CPU keep timm's MLP."""
    assert compose("certify", ["engine=gpu_compiled"]).engine.gelu == "epilogue"
    assert compose("certify", ["engine=gpu_compiled", "engine.gelu=native"]).engine.gelu == "native"
    assert compose("certify", ["engine=gpu"]).engine.gelu == "native"
    assert compose("certify", []).engine.gelu == "native"


def _mlp_base() -> PlainBase:
    """Pixels through a linear map, one timm MLP and a linear head: quick to compile."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), Mlp(32, 128), nn.Linear(32, 10))
    contract = InputContract((8, 8), "bilinear", (0.5,) * 3, (0.5,) * 3)
    return PlainBase(NormalizedClassifier(net.eval(), contract, 10), (3, 8, 8))


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_a_replica_switches_its_model_and_counts_exactly_as_with_timms_mlp(compile, caplog):
    """On a CPU the epilogue's GELU is the exact one: the same counts to the vote, eager and compiled
    (inductor leaves the fused op to ATen)."""
    base = _mlp_base()
    images = {i: np.random.default_rng(i).random((3, 8, 8), dtype=np.float32) for i in range(2)}
    units = [WorkUnit(i, 0, "estimation", 0, 300) for i in images]
    counts = {}
    for kind in ("native", "epilogue"):
        with caplog.at_level(logging.INFO, logger="raysmooth"):
            replica = Replica(base, [0.5], 0, EngineConfig(batch_size=64, compile=compile, gelu=kind))
        counts[kind] = replica.run(units, images)
        assert replica.config.compile is compile
    assert "engine.gelu=epilogue: 1 MLPs switched" in caplog.text
    assert sum(type(m).__name__ == "EpilogueGeluMlp" for m in base.modules()) == 1
    assert all(np.array_equal(counts["native"][u.key], counts["epilogue"][u.key]) for u in units)
    assert sum(int(c.sum()) for c in counts["native"].values()) == 600  # every sample counted once
    Replica(base, [0.5], 0, EngineConfig(batch_size=64))  # a later native replica switches it back
    assert not any(type(m).__name__ == "EpilogueGeluMlp" for m in base.modules())


def test_the_python_api_hands_its_gelu_setting_to_the_replica():
    """Smoothed(..., gelu="epilogue") switches its own copy of the model (never the caller's) and, on a
    CPU, predicts from the same counts as timm's MLP."""
    from raysmooth.smoothed import Smoothed

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), Mlp(32, 128), nn.Linear(32, 10)).eval()
    x = np.random.default_rng(0).random((3, 8, 8), dtype=np.float32)
    got = {}
    for kind in ("native", "epilogue"):
        smoothed = Smoothed(net, 0.5, num_classes=10, input_shape=(3, 8, 8), gelu=kind, progress=False)
        got[kind] = smoothed.predict(x, n=300, alpha=0.001).counts
        switched = sum(type(m).__name__ == "EpilogueGeluMlp" for m in smoothed._replica.base.modules())
        assert switched == (kind == "epilogue")
    assert np.array_equal(got["native"], got["epilogue"]) and got["native"].sum() == 300
    assert type(net[2]) is Mlp  # the caller's module is left as it was


def test_a_model_without_a_timm_mlp_says_nothing_changes(caplog):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    contract = InputContract((8, 8), "bilinear", (0.5,) * 3, (0.5,) * 3)
    base = PlainBase(NormalizedClassifier(net.eval(), contract, 10), (3, 8, 8))
    with caplog.at_level(logging.INFO, logger="raysmooth"):
        Replica(base, [0.5], 0, EngineConfig(batch_size=64, gelu="epilogue"))
    assert "engine.gelu=epilogue: the model has no timm MLP with a GELU; nothing changes" in caplog.text


def test_the_epilogue_is_part_of_a_runs_identity_and_the_default_leaves_it_as_before():
    """On a GPU the epilogue's GELU is another function, so a run is not resumed under the other setting
    (the refusal names the key); timm's MLP keeps the identity runs had before the option."""
    before = counts_relevant_config(compose("certify", []))
    assert "gelu" not in before and counts_relevant_config(compose("certify", ["engine.gelu=native"])) == before
    fused = counts_relevant_config(compose("certify", ["engine.gelu=epilogue"]))
    assert config_hash(fused) != config_hash(before)
    assert config_differences(before, fused) == "gelu: '(unset)' there, 'epilogue' here"


def test_a_run_started_with_timms_mlp_is_refused_under_the_epilogue_saying_what_to_set(tmp_path):
    """A run begun under the presets before they took the epilogue: the refusal says engine.gelu=native."""
    from raysmooth import runner
    from raysmooth.store import StoreError

    before = compose("certify", ["engine=gpu_compiled", "engine.gelu=native"])
    with runner._run_store(tmp_path, before) as store:
        store.commit_manifest()
    with pytest.raises(StoreError, match=r"another config \(engine\.gelu: 'native' there, 'epilogue' here\)"):
        runner._run_store(tmp_path, compose("certify", ["engine=gpu_compiled"]))
    with runner._run_store(tmp_path, before) as store:  # the same config resumes
        assert store.manifest["config"]["precision"] == "bf16"


def test_a_switched_model_pickles_by_name():
    """torch.save of a whole model (or multiprocessing) finds the twin's class by name."""
    import pickle

    native, twin = _mlps()
    again = pickle.loads(pickle.dumps(nn.Sequential(twin)))[0]
    assert type(again).__name__ == "EpilogueGeluMlp"
    x = torch.randn(3, 16)
    with torch.inference_mode():
        torch.testing.assert_close(again(x), native(x), atol=1e-6, rtol=1e-6)
