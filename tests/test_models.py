"""Denoisers, classifiers and base classifiers: the rules of docs/methods.md §3 and safe loading."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from raysmooth.errors import ConfigError, ModelLoadError
from raysmooth.models import (
    DiffusionDenoiser,
    LinearBase,
    NormalizedClassifier,
    alphas_cumprod,
    cosine_betas,
    create_base_classifier,
    linear_betas,
    list_base_classifiers,
    load_classifier,
    load_denoiser,
    load_onestep,
    model_sections,
    timestep_for_sigma,
)
from raysmooth.models.classifier import ClassifierConfig
from raysmooth.models.denoiser import DenoiserConfig

from tiny_models import (
    TINY_CLASSIFIER,
    TINY_SCHEDULER,
    TINY_UNET,
    save_denoiser_folder,
    tiny_classifier_config,
    tiny_unet,
)

EMBEDDED = Path(__file__).resolve().parents[1] / "raysmooth" / "embedded" / "digits"


# ---- σ → t* ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "betas,expected",
    [
        (linear_betas(1000), {0.12: 70, 0.25: 145, 0.5: 259, 1.0: 396}),  # guided-diffusion ImageNet
        (cosine_betas(4000), {0.12: 573, 0.25: 1158, 0.5: 1984, 1.0: 2809}),  # improved-diffusion CIFAR-10
    ],
)
def test_timestep_for_sigma_matches_the_reference_codebases(betas, expected):
    acp = alphas_cumprod(betas)
    for sigma, t in expected.items():
        got, sqrt_abar = timestep_for_sigma(acp, sigma)
        assert got == t
        assert sqrt_abar == pytest.approx(np.sqrt(acp[t]))
        # t* is the first step whose noise-to-signal ratio reaches 2σ.
        r = np.sqrt((1 - acp) / acp)
        assert r[t] >= 2 * sigma > r[t - 1]


def test_the_denoiser_picks_the_same_timesteps_on_the_device():
    acp = alphas_cumprod(linear_betas(1000))
    den = DiffusionDenoiser(torch.nn.Identity(), acp)
    sigmas = torch.tensor([0.12, 0.25, 0.5, 1.0, 500.0])
    assert den.timesteps(sigmas).tolist() == [70, 145, 259, 396, 999]  # beyond the schedule: the last t


class _FixedEps(torch.nn.Module):
    """A stand-in UNet that predicts a given ε (optionally with a learned-variance half)."""

    def __init__(self, eps, extra_channels=0):
        super().__init__()
        self.eps, self.extra = eps, extra_channels
        self.seen_t = None

    def forward(self, x, t):
        self.seen_t = t
        out = self.eps.expand_as(x)
        if self.extra:
            out = torch.cat([out, torch.full_like(out, 123.0)], dim=1)
        return type("Out", (), {"sample": out})()


@pytest.mark.parametrize("extra", [0, 1])
def test_one_shot_x0_follows_the_formula_and_ignores_learned_variance(extra):
    acp = alphas_cumprod(linear_betas(1000))
    torch.manual_seed(0)
    x = torch.rand(4, 1, 8, 8)
    eps = torch.randn(1, 1, 8, 8)
    sigma = torch.full((4,), 0.25)
    unet = _FixedEps(eps, extra)
    den = DiffusionDenoiser(unet, acp)
    z = x + 0.25 * torch.randn(4, 1, 8, 8)
    got = den(z, sigma)
    a = acp[145]
    x_t = np.sqrt(a) * (2 * z - 1)  # exact noise: scale, never q-sample
    expect = ((x_t - np.sqrt(1 - a) * eps) / np.sqrt(a)).clamp(-1, 1)
    torch.testing.assert_close(got, (expect + 1) / 2, rtol=1e-5, atol=1e-6)
    assert unet.seen_t.tolist() == [145] * 4


def test_rescaled_timesteps_are_fed_as_floats():
    acp = alphas_cumprod(cosine_betas(4000))
    unet = _FixedEps(torch.zeros(1, 1, 8, 8))
    den = DiffusionDenoiser(unet, acp, timestep_scale=1000 / 4000)
    den(torch.rand(2, 1, 8, 8), torch.full((2,), 0.5))
    assert unet.seen_t.dtype == torch.float32 and unet.seen_t.tolist() == [1984 / 4] * 2


def test_multi_step_ddim_runs_the_configured_number_of_unet_calls(tmp_path):
    calls = []
    unet = tiny_unet()
    unet.register_forward_hook(lambda m, i, o: calls.append(i[1].clone()))
    den = DiffusionDenoiser(unet, alphas_cumprod(linear_betas(1000)), steps=4)
    out = den(torch.rand(3, 1, 8, 8), torch.tensor([0.25, 0.5, 1.0]))
    assert len(calls) == 4 and out.shape == (3, 1, 8, 8)
    assert calls[0].tolist() == [145, 259, 396]
    assert calls[-1].tolist() == [145 // 4, 259 // 4, 396 // 4]
    assert float(out.detach().min()) >= 0 and float(out.detach().max()) <= 1


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"steps": 2.5}, "steps must be a whole number"),
        ({"eta": 2}, "eta"),
        ({"timestep_scale": -1}, "timestep_scale must be a positive number, got -1.0"),  # the UNet saw -t
        ({"timestep_scale": "fast"}, "timestep_scale must be a finite number, got 'fast'"),
        ({"eta": None}, "eta must be a finite number, got None"),
    ],
)
def test_a_denoising_schedule_that_cannot_be_run_as_given_is_refused(kwargs, says):
    with pytest.raises(ConfigError, match=says):
        DiffusionDenoiser(tiny_unet(), alphas_cumprod(linear_betas(1000)), **kwargs)


# ---- loading -----------------------------------------------------------------------------------
def test_a_diffusers_folder_loads_with_from_pretrained(tmp_path):
    folder = save_denoiser_folder(tmp_path / "den")
    den = load_denoiser(DenoiserConfig(path=str(folder)))
    ref = tiny_unet()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 500])
    torch.testing.assert_close(den.unet(x, t).sample, ref(x, t).sample)
    np.testing.assert_allclose(den.acp.numpy(), alphas_cumprod(linear_betas(1000)), rtol=1e-12)


def test_our_own_safetensors_load_with_a_config(tmp_path):
    unet = tiny_unet(seed=3)
    save_file(unet.state_dict(), str(tmp_path / "w.safetensors"))
    den = load_denoiser(
        DenoiserConfig(weights=str(tmp_path / "w.safetensors"), unet=TINY_UNET, scheduler=TINY_SCHEDULER)
    )
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 500])
    torch.testing.assert_close(den.unet(x, t).sample, unet(x, t).sample)


def test_a_mismatched_checkpoint_names_the_file_and_the_mismatch(tmp_path):
    other = tiny_unet(block_out_channels=(8, 32))
    save_file(other.state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(ModelLoadError, match=r"w\.safetensors.*shape mismatch"):
        load_denoiser(DenoiserConfig(weights=str(tmp_path / "w.safetensors"), unet=TINY_UNET, scheduler=TINY_SCHEDULER))


def test_a_missing_checkpoint_is_one_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no such checkpoint file"):
        load_denoiser(
            DenoiserConfig(weights=str(tmp_path / "nope.safetensors"), unet=TINY_UNET, scheduler=TINY_SCHEDULER)
        )
    with pytest.raises(ModelLoadError, match="no such denoiser folder"):
        load_denoiser(DenoiserConfig(path=str(tmp_path / "nope")))


def test_a_folder_that_is_no_denoiser_is_named_for_what_it_is(tmp_path, caplog):
    from raysmooth.toy import EMBEDDED_DIR

    with pytest.raises(ModelLoadError, match=r"onestep: a raysmooth onestep folder, not a denoiser"):
        load_denoiser(DenoiserConfig(path=str(EMBEDDED_DIR / "onestep")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"empty: no unet/config.json, so not a diffusers denoiser folder"):
        load_denoiser(DenoiserConfig(path=str(tmp_path / "empty")))
    tiny_unet().save_config(tmp_path / "den" / "unet")
    with pytest.raises(ModelLoadError, match=r"unet: a UNet config without its weights"):
        load_denoiser(DenoiserConfig(path=str(tmp_path / "den"), scheduler=TINY_SCHEDULER))
    assert "unsafe serialization" not in caplog.text  # diffusers never got to try its fallbacks


def test_a_file_that_is_not_a_checkpoint_says_so_with_the_error_kind(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hi, these are notes")  # torch.load raises a bare KeyError(105) here
    with pytest.raises(
        ModelLoadError, match=r"notes.pt: not a readable torch checkpoint \(damaged, or not a .*KeyError"
    ):
        load_denoiser(DenoiserConfig(weights=str(path), unet=TINY_UNET, scheduler=TINY_SCHEDULER))


def test_a_model_folder_is_replaced_whole_or_not_at_all(tmp_path):
    from raysmooth.models.checkpoints import replacing_folder

    dst = tmp_path / "model"
    with replacing_folder(dst) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError), replacing_folder(dst) as tmp:
        (tmp / "weights").write_text("half of v2")
        raise RuntimeError("the writer died")
    assert (dst / "weights").read_text() == "v1" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    dst.rename(tmp_path / "_model.old")  # a crash between moving the old folder aside and renaming the new one
    with pytest.raises(RuntimeError), replacing_folder(dst):
        raise RuntimeError("and the next writer died too")
    assert (dst / "weights").read_text() == "v1"  # the whole old folder is back


class _Payload:
    pass


def test_a_checkpoint_that_needs_arbitrary_pickles_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": tiny_unet().state_dict(), "extra": _Payload()}, path)
    with pytest.raises(ModelLoadError, match="refused"):
        load_denoiser(DenoiserConfig(weights=str(path), unet=TINY_UNET, scheduler=TINY_SCHEDULER))


class _Writes:
    """Unpickling this creates a file: the proof that a pickle ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_diffusers_folder_whose_bin_weights_need_arbitrary_pickles_is_refused_and_runs_nothing(tmp_path):
    tiny_unet().save_pretrained(tmp_path / "den" / "unet", safe_serialization=False)  # no safetensors beside it
    weights = tmp_path / "den" / "unet" / "diffusion_pytorch_model.bin"
    state = torch.load(weights, weights_only=True)
    torch.save({**state, "payload": _Writes(tmp_path / "ran")}, weights)
    with pytest.raises(ModelLoadError, match="cannot load a UNet2DModel"):
        load_denoiser(DenoiserConfig(path=str(tmp_path / "den"), subfolder="unet", scheduler=TINY_SCHEDULER))
    assert not (tmp_path / "ran").exists()


def test_a_weights_only_torch_checkpoint_loads(tmp_path):
    unet = tiny_unet(seed=5)
    torch.save({"state_dict": {f"module.{k}": v for k, v in unet.state_dict().items()}}, tmp_path / "ok.pt")
    den = load_denoiser(DenoiserConfig(weights=str(tmp_path / "ok.pt"), unet=TINY_UNET, scheduler=TINY_SCHEDULER))
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([10])
    torch.testing.assert_close(den.unet(x, t).sample, unet(x, t).sample)


def test_timm_classifier_loads_a_local_checkpoint_and_carries_its_input_contract(tmp_path):
    import timm

    torch.manual_seed(0)
    net = timm.create_model("test_efficientnet", num_classes=10, in_chans=1)
    save_file(net.state_dict(), str(tmp_path / "clf.safetensors"))
    clf = load_classifier(tiny_classifier_config(checkpoint=str(tmp_path / "clf.safetensors")))
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(clf(x), net.eval()((x - 0.5) / 0.5))
    # Without overrides the contract comes from timm's pretrained config.
    default = load_classifier(ClassifierConfig(name="test_efficientnet", num_classes=10, in_chans=3))
    assert default.contract.input_size == (160, 160) and default.contract.interpolation == "bicubic"


def test_a_classifier_contract_in_0_255_units_is_refused():
    with pytest.raises(ConfigError, match="0-255 units"):
        load_classifier(tiny_classifier_config(mean=[127.5], std=[63.75]))


def test_classifier_resizes_bicubic_with_antialiasing():
    clf = load_classifier(tiny_classifier_config(input_size=(4, 4)))
    seen = []
    clf.model.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    x = torch.rand(1, 1, 8, 8)
    clf(x)
    expect = torch.nn.functional.interpolate(x, size=(4, 4), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(seen[0], (expect - 0.5) / 0.5)


def test_an_unknown_timm_model_is_one_clear_error():
    with pytest.raises(ModelLoadError, match="no model 'nonexistent_net'"):
        load_classifier(ClassifierConfig(name="nonexistent_net"))


@pytest.mark.parametrize(
    ("load", "section", "says"),
    [
        (
            load_classifier,
            {"path": str(EMBEDDED / "classifier"), "nme": "x"},
            r"model\.classifier takes no 'nme' \(did you mean name\?\)",
        ),
        (load_denoiser, {"path": "x", "t": 5}, r"model\.denoiser takes no 't' \(it takes path, "),
        (
            load_onestep,
            {"path": str(EMBEDDED / "onestep"), "num_clases": 3},
            r"model\.onestep takes no 'num_clases' \(did you mean num_classes",
        ),
    ],
)
def test_a_key_a_model_section_does_not_have_names_the_section_not_the_folder(load, section, says):
    with pytest.raises(ConfigError, match=says):
        load(section)


@pytest.mark.parametrize(
    ("section", "says"),
    [
        ({"name": "resnet18", "num_classes": 10.5}, "num_classes must be a whole number"),
        ({"name": "resnet18", "num_classes": 0}, "num_classes must be a whole number of at least 1, got 0"),
        ({"name": "resnet18", "in_chans": 1.5}, "in_chans must be a whole number"),
    ],
)
def test_a_classifier_head_timm_would_misread_is_refused(section, says):
    # timm builds a headless feature extractor for num_classes=0 and fails deep inside on 10.5
    with pytest.raises(ConfigError, match=says):
        load_classifier(section)


# ---- base classifiers --------------------------------------------------------------------------
def test_the_registry_names_every_method():
    assert set(list_base_classifiers()) >= {"plain", "dds", "diffsmooth", "onestep", "linear"}
    with pytest.raises(ConfigError, match="unknown base classifier"):
        create_base_classifier("nope")


def test_dds_is_denoise_then_classify(tmp_path):
    den_cfg = DenoiserConfig(path=str(save_denoiser_folder(tmp_path / "d")))
    base = create_base_classifier("dds", denoiser=den_cfg, classifier=tiny_classifier_config(), input_shape=(1, 8, 8))
    z, sigma = torch.rand(5, 1, 8, 8), torch.full((5,), 0.5)
    with torch.no_grad():
        expect = base.classifier(base.denoiser(z, sigma)).argmax(1)
    assert torch.equal(base.classify(z, sigma), expect)


def test_diffsmooth_soft_votes_over_fixed_local_noise(tmp_path):
    den_cfg = DenoiserConfig(path=str(save_denoiser_folder(tmp_path / "d")))
    kw = dict(
        denoiser=den_cfg, classifier=tiny_classifier_config(), input_shape=(1, 8, 8), local_sigma=0.25, local_samples=3
    )
    a = create_base_classifier("diffsmooth", **kw)
    b = create_base_classifier("diffsmooth", **kw)
    assert torch.equal(a.local_noise, b.local_noise)  # fixed by the seed: f is deterministic
    z, sigma = torch.rand(4, 1, 8, 8), torch.full((4,), 0.25)
    with torch.no_grad():
        x = a.denoiser(z, sigma)
        probs = torch.stack([a.classifier(x + a.local_noise[i]).softmax(1) for i in range(3)]).mean(0)
        torch.testing.assert_close(a.logits(z, sigma), probs)
        assert torch.equal(a.classify(z, sigma), probs.argmax(1))


@pytest.mark.parametrize(
    ("option", "says"),
    [
        ({"local_samples": 2.5}, "local_samples must be a whole number"),
        ({"local_seed": 1.5}, "local_seed must be a whole number"),
        ({"local_sigma": float("nan")}, "local_sigma must be a finite number"),
    ],
)
def test_diffsmooth_options_that_would_be_truncated_or_nan_are_refused(tmp_path, option, says):
    den_cfg = DenoiserConfig(path=str(save_denoiser_folder(tmp_path / "d")))
    kw = dict(denoiser=den_cfg, classifier=tiny_classifier_config(), input_shape=(1, 8, 8), **option)
    with pytest.raises(ConfigError, match=says):
        create_base_classifier("diffsmooth", **kw)


def test_onestep_is_conditioned_on_sigma():
    base = create_base_classifier(
        "onestep", onestep=dict(name="test_efficientnet", num_classes=10, in_chans=1), input_shape=(1, 8, 8)
    )
    z = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        lo = base.logits(z, torch.full((2,), 0.25))
        hi = base.logits(z, torch.full((2,), 1.0))
    assert not torch.allclose(lo, hi)


def test_linear_base_rejects_weights_of_the_wrong_shape():
    with pytest.raises(ConfigError):
        create_base_classifier("linear", weight=np.zeros((2, 10)), bias=np.zeros(2), input_shape=(1, 8, 8))


@pytest.mark.parametrize(
    "options, says",
    [
        ({"num_classes": 2.5}, "num_classes must be a whole number of at least 2, got 2.5"),  # was a TypeError
        ({"num_classes": 1}, "num_classes must be a whole number of at least 2, got 1"),
        ({"scale": 0}, "scale must be a positive number, got 0"),  # zero weights: class 0 for every input
        ({"seed": -1}, "seed must be a whole number of at least 0, got -1"),
    ],
)
def test_the_random_linear_model_refuses_options_it_cannot_build_from(options, says):
    with pytest.raises(ConfigError, match=f"model.options.{says}"):
        create_base_classifier("linear", input_shape=(1, 8, 8), **options)


def test_a_classifier_folder_describes_itself_and_loads_back(tmp_path):
    from raysmooth.models import save_classifier
    from raysmooth.models.classifier import create_timm_model

    cfg = ClassifierConfig(**TINY_CLASSIFIER)
    torch.manual_seed(1)
    module = create_timm_model(cfg)
    folder = save_classifier(module, cfg, tmp_path / "clf", card={"trained": "here"})
    assert sorted(p.name for p in folder.iterdir()) == ["card.json", "config.json", "model.safetensors"]
    loaded = load_classifier({"path": str(folder)})  # nothing but the folder
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(loaded(x), NormalizedClassifier(module.eval(), loaded.contract, 10)(x))
    assert loaded.contract.input_size == (8, 8) and loaded.contract.mean == (0.5,)


def test_a_folder_of_another_kind_is_refused(tmp_path):
    from raysmooth.models import OneStepConfig, load_onestep, save_onestep
    from raysmooth.models.onestep import build_onestep

    cfg = OneStepConfig(name="test_efficientnet", num_classes=10, in_chans=1)
    folder = save_onestep(build_onestep(cfg), cfg, tmp_path / "one")
    assert load_onestep({"path": str(folder)}).num_classes == 10
    with pytest.raises(ModelLoadError, match="onestep folder where a classifier folder was expected"):
        load_classifier({"path": str(folder)})


def test_a_denoiser_folder_given_as_a_classifier_is_named_as_one():
    with pytest.raises(ModelLoadError, match=r"denoiser: a diffusers denoiser folder, not a classifier folder"):
        load_classifier({"path": str(EMBEDDED / "denoiser")})


def test_adding_a_method_is_one_registered_function():
    from raysmooth.models import register_base_classifier
    from raysmooth.models.base import _REGISTRY

    @register_base_classifier
    def half_linear(input_shape, classifier: dict, scale: float = 0.5) -> LinearBase:  # noqa: ANN001
        w = np.eye(2, int(np.prod(input_shape))) * scale
        return LinearBase(w, np.zeros(2), tuple(input_shape))

    try:
        name, kwargs = model_sections(
            {"base": "half_linear", "input_shape": [1, 2, 2], "classifier": {"any": 1}, "options": {"scale": 2.0}}
        )
        base = create_base_classifier(name, **kwargs)
        assert isinstance(base, LinearBase) and float(base.weight[0, 0]) == 2.0
        with pytest.raises(ConfigError, match="half_linear needs model.classifier"):
            create_base_classifier("half_linear", input_shape=[1, 2, 2])
    finally:
        del _REGISTRY["half_linear"]


def test_one_noise_schedule_serves_the_denoiser_the_trainer_and_diffusers():
    from diffusers import DDPMScheduler

    from raysmooth.models.schedule import DDPM_LINEAR, schedule_from_config

    acp = schedule_from_config(DDPM_LINEAR)
    assert np.allclose(acp, DDPMScheduler(**DDPM_LINEAR).alphas_cumprod.numpy(), rtol=1e-5)
    # No other module computes a schedule of its own.
    pkg = Path(__file__).resolve().parents[1] / "raysmooth"
    owners = [p.relative_to(pkg).as_posix() for p in pkg.rglob("*.py") if re.search(r"\bcumprod\(", p.read_text())]
    assert owners == ["models/schedule.py"]
