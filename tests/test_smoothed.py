"""The Python API: Smoothed(model, sigma).certify(x, …) in one process, the same counts as the job."""

import re
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from raysmooth import Certificate, Smoothed, stats
from raysmooth.data import load_dataset
from raysmooth.errors import ConfigError, InputError, ModelError, ModelLoadError
from raysmooth.models import DenoiseThenClassify, PlainBase, save_classifier
from raysmooth.models.classifier import ClassifierConfig, create_timm_model

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "raysmooth" / "embedded" / "digits"


def _readme_block(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    found = re.search(rf"<!-- {marker} -->\s*```python\n(.*?)```", text, flags=re.S)
    assert found, f"README has no python block after <!-- {marker} -->"
    return found.group(1)


def test_the_readme_notebook_example_runs(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the example names the embedded denoiser by its path in the checkout
    code = _readme_block("example: api")
    assert len(code.strip().splitlines()) <= 12
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    cert = scope["cert"]
    assert isinstance(cert, Certificate) and cert.n_used == 100 + 1000 and cert.counts.sum() == 1000
    assert capsys.readouterr().out.strip()


def test_the_readme_batch_example_prints_the_certified_accuracy_of_its_certificates(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    scope: dict = {}
    exec(compile(_readme_block("example: api") + _readme_block("example: api-batch"), "README.md", "exec"), scope)
    certs, labels = scope["certs"], scope["digits"].labels[:20]
    printed = [float(v) for v in capsys.readouterr().out.strip().splitlines()[-1].strip("[]").split()]
    by_hand = [np.mean([c.prediction == y and c.radius >= r for c, y in zip(certs, labels)]) for r in (0, 0.25, 0.5)]
    assert printed == pytest.approx(by_hand) and len(certs) == 20 and printed[0] > 0.5


def _linear_module(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))


def test_the_same_seeds_give_the_job_paths_counts(tmp_path, monkeypatch):
    """The API and `raysmooth certify` draw the same noise for the same (seed, image id, σ, chunk)."""
    import os

    from raysmooth import runner
    from raysmooth.config import compose
    from raysmooth.store import RunStore

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cfg = compose(
        "certify",
        [
            "data=synthetic",
            "model=linear",
            f"out={tmp_path}",
            "smoothing.n=300",
            "smoothing.n0=30",
            "smoothing.chunk=100",
            "ray.num_actors=1",
            "plot=false",
            "smoothing.seed=7",
            "data.options.num_images=6",
        ],
    )
    runner.certify(cfg)
    counts = RunStore.open(tmp_path / "linear").read_counts()
    data = load_dataset("synthetic", num_images=6)
    smoothed = Smoothed(
        "linear",
        cfg.smoothing.sigmas,
        input_shape=(1, 8, 8),
        seed=7,
        chunk=100,
        model_kwargs={"num_classes": 10, "seed": 0},
    )
    for sigma in cfg.smoothing.sigmas:
        certs = smoothed.certify_batch(data.images, n0=30, n=300, sigma=sigma, ids=data.ids)
        for phase, got in (
            ("selection", [c.selection_counts for c in certs]),
            ("estimation", [c.counts for c in certs]),
        ):
            rows = counts.filter(pc.and_(pc.equal(counts["sigma"], sigma), pc.equal(counts["phase"], phase)))
            stored = {
                i: dict(zip(c, k))
                for i, c, k in zip(
                    rows["image_id"].to_pylist(), rows["classes"].to_pylist(), rows["counts"].to_pylist()
                )
            }
            for image_id, dense in zip(data.ids, got):
                assert {c: int(k) for c, k in enumerate(dense) if k} == stored[int(image_id)], (sigma, phase, image_id)


def test_certify_is_cohens_certify_on_its_own_counts():
    digits = load_dataset("digits")
    smoothed = Smoothed(_linear_module(), 0.5, num_classes=10)
    cert = smoothed.certify(digits.images[0], n0=50, n=500, alpha=0.01)
    expect = stats.certify(
        stats.SparseCounts.from_dense(cert.selection_counts[None]),
        stats.SparseCounts.from_dense(cert.counts[None]),
        float(np.float32(0.5)),
        0.01,
    )
    assert cert.prediction == expect.prediction[0] and cert.radius == pytest.approx(expect.radius[0])
    assert cert.p_lower == pytest.approx(expect.p_lower[0])
    assert cert.n_used == 550 and cert.sigma == 0.5


def test_certify_batch_equals_one_image_at_a_time():
    digits = load_dataset("digits")
    smoothed = Smoothed(_linear_module(), 0.25, batch_size=128)
    batch = smoothed.certify_batch(digits.images[:5], n0=20, n=200, ids=[10, 11, 12, 13, 14])
    single = [smoothed.certify(digits.images[i], n0=20, n=200, image_id=10 + i) for i in range(5)]
    for a, b in zip(batch, single):
        assert np.array_equal(a.counts, b.counts) and a.radius == b.radius


def test_compile_true_certifies_with_the_compiled_model_and_counts_every_sample_once():
    digits = load_dataset("digits")
    eager = Smoothed(EMBEDDED / "onestep", 0.5, batch_size=256).certify_batch(digits.images[:4], n0=20, n=300)
    compiled = Smoothed(EMBEDDED / "onestep", 0.5, batch_size=256, compile=True)
    assert compiled.engine.compile is True
    certs = compiled.certify_batch(digits.images[:4], n0=20, n=300)  # 1,280 samples: the last batch is padded
    assert all(c.counts.sum() == 300 and c.selection_counts.sum() == 20 for c in certs)
    moved = sum(np.abs(a.counts - b.counts).sum() for a, b in zip(eager, certs)) / 2
    assert moved <= 0.002 * 4 * 300  # reordered float arithmetic may move a rare vote, never more


def test_the_adapter_normalises_and_resizes_as_the_module_was_trained():
    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen["x"] = x
            return torch.zeros((len(x), 3))

    smoothed = Smoothed(Probe(), 0.25, input_shape=(1, 8, 8), mean=[0.5], std=[0.25], input_size=(16, 16))
    smoothed.certify(np.full((1, 8, 8), 0.75, np.float32), n0=2, n=4)
    x = seen["x"]
    assert tuple(x.shape[1:]) == (1, 16, 16) and smoothed.num_classes == 3
    base = smoothed._replica.base
    assert isinstance(base, PlainBase)
    clean = base.classifier(torch.full((1, 1, 8, 8), 0.75))  # through the contract: resize, then (x − 0.5)/0.25
    assert torch.allclose(seen["x"][:1].mean(), torch.tensor(1.0)) and clean.shape == (1, 3)


def test_a_denoiser_goes_in_front_of_the_users_own_classifier():
    smoothed = Smoothed(_linear_module(), [0.25, 0.5], denoiser=str(EMBEDDED / "denoiser"), input_shape=(1, 8, 8))
    assert isinstance(smoothed._replica.base, DenoiseThenClassify)
    cert = smoothed.cascade(load_dataset("digits").images[0], n0=20, n=200, p0=0.5)
    assert cert.sigma in (None, 0.25, 0.5)


def test_a_bare_unet_as_denoiser_is_refused_with_the_construction_that_gives_the_folders_counts():
    """A UNet2DModel has no noise schedule (t is picked from it): the message's construction is exact."""
    from diffusers import DDPMScheduler, UNet2DModel

    from raysmooth.models import DiffusionDenoiser

    unet = UNet2DModel.from_pretrained(str(EMBEDDED / "denoiser" / "unet"))
    with pytest.raises(ConfigError, match=r"UNet2DModel alone has no noise schedule.*DiffusionDenoiser\(unet, sched"):
        Smoothed(_linear_module(), 0.25, denoiser=unet, input_shape=(1, 8, 8))
    with pytest.raises(
        ConfigError, match="denoiser must be a diffusers folder, an hf:// id or a DiffusionDenoiser, got int"
    ):
        Smoothed(_linear_module(), 0.25, denoiser=42, input_shape=(1, 8, 8))
    schedule = DDPMScheduler.from_pretrained(str(EMBEDDED / "denoiser" / "scheduler")).alphas_cumprod.numpy()
    x = np.full((1, 8, 8), 0.5, np.float32)
    built = Smoothed(_linear_module(), 0.25, denoiser=DiffusionDenoiser(unet, schedule), progress=False)
    folder = Smoothed(_linear_module(), 0.25, denoiser=str(EMBEDDED / "denoiser"), progress=False)
    assert np.array_equal(built.certify(x, 5, 200).counts, folder.certify(x, 5, 200).counts)


def test_colour_images_into_a_greyscale_denoiser_are_one_config_error():
    colour = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 10))
    with pytest.raises(ConfigError, match=r"takes 1-channel images but the input shape is \(3, 8, 8\)"):
        Smoothed(colour, 0.25, denoiser=str(EMBEDDED / "denoiser"), input_shape=(3, 8, 8))


@pytest.mark.parametrize("folder", ["onestep", "classifier"])
def test_colour_images_into_a_greyscale_model_folder_are_one_error_and_the_next_right_image_certifies(folder):
    """Found by hand: a one-step or classifier folder declares in_chans, yet 3-channel images reached
    the network and failed inside the first batch as a convolution error about 4 channels."""
    smoothed = Smoothed(str(EMBEDDED / folder), 0.25, progress=False)
    with pytest.raises(ConfigError, match=r"classifier .*takes 1-channel images but the input shape is \(3, 8, 8\)"):
        smoothed.certify(np.zeros((3, 8, 8), np.float32), 5, 20)
    assert smoothed.certify(np.zeros((1, 8, 8), np.float32), 5, 20).counts.sum() == 20


def test_a_model_folder_certifies_like_the_module_it_holds(tmp_path):
    cfg = ClassifierConfig(
        name="resnet18",
        num_classes=10,
        in_chans=1,
        input_size=(8, 8),
        mean=(0.5,),
        std=(0.5,),
        model_kwargs={"channels": [8, 8, 8, 8]},
    )
    torch.manual_seed(0)
    module = create_timm_model(cfg)
    folder = save_classifier(module, cfg, tmp_path / "clf")
    x = load_dataset("digits").images[3]
    from_folder = Smoothed(str(folder), 0.5).certify(x, n0=10, n=300)
    from_module = Smoothed(module, 0.5, mean=[0.5], std=[0.5]).certify(x, n0=10, n=300)
    assert np.array_equal(from_folder.counts, from_module.counts)


def test_the_cascade_is_the_strict_cascade_of_its_levels():
    smoothed = Smoothed(str(EMBEDDED / "onestep"), [0.25, 0.5, 1.0])
    x = load_dataset("digits").images[1]
    cert = smoothed.cascade(x, n0=30, n=400, p0=0.6, alpha=0.01)
    levels = []
    for s in (0.25, 0.5, 1.0):
        one = smoothed.certify(x, n0=30, n=400, sigma=s)
        levels.append(
            stats.Level(
                float(np.float32(s)),
                stats.SparseCounts.from_dense(one.selection_counts[None]),
                stats.SparseCounts.from_dense(one.counts[None]),
            )
        )
    expect = stats.cascade_certify(levels, 0.6, 0.01, "strict")
    assert cert.prediction == expect.prediction[0] and cert.radius == pytest.approx(expect.radius[0])


def test_predict_abstains_on_a_coin_flip():
    class Coin(torch.nn.Module):
        def forward(self, x):  # class 0 or 1 by the sign of the first noisy pixel: a fair coin
            first = x.flatten(1)[:, :1] - 0.5
            return torch.cat([first, -first], dim=1)

    p = Smoothed(Coin(), 0.5, input_shape=(1, 2, 2)).predict(np.full((1, 2, 2), 0.5, np.float32), n=400, alpha=0.001)
    assert p.abstained and p.counts.sum() == 400


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"sigma": float("nan")}, ConfigError, "sigma"),
        ({"sigma": -1.0}, ConfigError, "sigma"),
        ({"sigma": [0.5, 0.5]}, ConfigError, "twice"),
        ({"sigma": None}, ConfigError, "a number or a list of numbers"),
        ({"sigma": 0.5, "compile_mode": "max-autotune"}, InputError, r"compile_mode=max-autotune needs compile=True"),
        ({"sigma": 0.5, "attention": "flex"}, InputError, r"^attention=flex needs compile=True"),
        ({"sigma": 0.5, "gelu": "tanh"}, InputError, r"^gelu must be one of native, epilogue, got 'tanh'"),
        ({"sigma": 0.5, "group_norm": "channels_last"}, InputError, r"^group_norm=channels_last needs compile=True"),
        ({"sigma": 0.5, "channels_last": "yes"}, ConfigError, "channels_last must be True or False"),
        ({"sigma": 0.5, "progress": "off"}, ConfigError, "progress must be True or False"),
        ({"sigma": 0.5, "batch_size": 0}, InputError, r"^batch_size must be a positive integer or auto"),
        ({"sigma": 0.5, "compile": True, "compile_mode": "fast"}, InputError, "compile_mode must be one of"),
        ({"sigma": 0.5, "seed": 1.5}, ConfigError, "seed must be a whole number"),
        ({"sigma": 0.5, "chunk": 10.5}, ConfigError, "chunk must be a whole number"),
        ({"sigma": 0.5, "noise_block": 2.5}, InputError, "noise_block must be a whole number"),
        ({"sigma": 0.5, "noise": "lattice", "levels": 0}, InputError, "levels must be a whole number of at least 1"),
        ({"sigma": 0.5, "num_classes": 0, "input_shape": (1, 8, 8)}, ConfigError, "num_classes must be a whole"),
        ({"sigma": 0.5, "num_classes": True}, ConfigError, "num_classes must be a whole number of at least 2"),
        ({"sigma": 0.5, "num_classes": 2.5}, ConfigError, "num_classes must be a whole number of at least 2"),
        ({"sigma": 0.5, "num_classes": 1}, ConfigError, "num_classes must be a whole number of at least 2"),
        ({"sigma": 0.5, "model_kwargs": {"width": 3}, "input_shape": (1, 8, 8)}, ConfigError, "would be ignored"),
        ({"sigma": 0.5, "mean": [123.7], "std": [58.4], "input_shape": (1, 8, 8)}, ConfigError, "0-255 units"),
        ({"sigma": []}, ConfigError, "at least one noise level"),
        ({"sigma": 0.5, "seed": 2**63}, ConfigError, "seed must fit in 64 bits"),
        ({"sigma": 0.5, "mean": [0.5], "input_shape": (1, 8, 8)}, ConfigError, "mean and std go together"),
        ({"sigma": 0.5, "input_size": -3, "input_shape": (1, 8, 8)}, ConfigError, "input_size must be"),
        ({"sigma": 0.5, "input_size": (8, 0), "input_shape": (1, 8, 8)}, ConfigError, "input_size must be"),
        ({"sigma": 0.5, "input_size": (16.5, 16), "input_shape": (1, 8, 8)}, ConfigError, "whole positive sizes"),
        ({"sigma": 0.5, "input_size": True, "input_shape": (1, 8, 8)}, ConfigError, "whole positive sizes"),
        (
            {"sigma": 0.5, "precision": "fp16", "device": "cpu", "input_shape": (1, 8, 8)},
            InputError,
            "^precision=fp16 needs a CUDA",
        ),
    ],
)
def test_bad_parameters_are_refused_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        Smoothed(_linear_module(), **kwargs)


@pytest.mark.parametrize(
    ("model", "kwargs", "says"),
    [
        ("linear", {"denoiser": str(EMBEDDED / "denoiser")}, "denoiser would be ignored: the model is linear"),
        ("linear", {"mean": [0.5], "std": [0.2]}, "mean, std would be ignored: the model is linear"),
        (str(EMBEDDED / "onestep"), {"denoiser": str(EMBEDDED / "denoiser")}, "a one-step model"),
        (str(EMBEDDED / "classifier"), {"input_size": 16}, "input_size would be ignored: .* carries its own"),
        (str(EMBEDDED / "classifier"), {"model_kwargs": {"x": 1}}, "model_kwargs would be ignored"),
    ],
)
def test_settings_the_kind_of_model_has_no_use_for_are_refused_not_ignored(model, kwargs, says):
    if model == "linear":
        kwargs = {**kwargs, "model_kwargs": {"num_classes": 10}}
    with pytest.raises(ConfigError, match=says):
        Smoothed(model, 0.25, input_shape=(1, 8, 8), progress=False, **kwargs)


@pytest.mark.parametrize(
    ("model_kwargs", "says"),
    [
        ({}, r"^dds needs model_kwargs\['denoiser'\]$"),
        ({"denoiser": {"path": str(EMBEDDED / "denoiser")}}, r"^dds needs model_kwargs\['classifier'\]$"),
        (
            {
                "denoiser": {"path": str(EMBEDDED / "denoiser")},
                "classifier": {"path": str(EMBEDDED / "classifier")},
                "w": 1,
            },
            r"^dds takes no model_kwargs\['w'\]$",
        ),
    ],
)
def test_a_registered_models_missing_or_unknown_section_is_named_as_a_model_kwargs_key(model_kwargs, says):
    """The builders speak the job's words (model.base=dds needs model.denoiser); the API says model_kwargs."""
    with pytest.raises(ConfigError, match=says):
        Smoothed("dds", 0.25, input_shape=(1, 8, 8), model_kwargs=model_kwargs, progress=False)


def test_one_input_size_is_a_square():
    smoothed = Smoothed(_linear_module(), 0.5, input_shape=(1, 8, 8), input_size=8, progress=False)
    assert smoothed.certify(np.full((1, 8, 8), 0.5, np.float32), n0=5, n=20).n_used == 25


@pytest.mark.parametrize("sigma", [np.float32(0.1), torch.tensor(0.1), np.array([0.1])])
def test_sigma_may_be_given_as_a_numpy_or_torch_number(sigma):
    smoothed = Smoothed(_linear_module(), sigma, input_shape=(1, 8, 8))
    assert len(smoothed.sigmas) == 1 and abs(smoothed.sigmas[0] - 0.1) < 1e-7


@pytest.mark.parametrize("sigma", [True, "0.25", ["0.25", 0.5], b"0.5"])
def test_a_sigma_given_as_a_bool_or_as_text_is_refused_not_read_as_a_number(sigma):
    """Found by hand: sigma=True certified at σ = 1 and sigma="0.25" was parsed from text."""
    with pytest.raises(ConfigError, match="sigma must be a number or a list of numbers"):
        Smoothed(_linear_module(), sigma, input_shape=(1, 8, 8))


@pytest.mark.parametrize("sigma", [np.float32(0.1), torch.tensor(0.1)])
def test_a_float32_sigma_names_the_level_it_rounds(sigma):
    smoothed = Smoothed(_linear_module(), [0.1, 0.2], input_shape=(1, 8, 8))
    assert smoothed.certify(np.full((1, 8, 8), 0.5, np.float32), n0=5, n=50, sigma=sigma).sigma == 0.1


def test_a_sigma_in_what_looks_like_0_255_units_is_said_not_refused(caplog):
    with caplog.at_level("WARNING", logger="raysmooth"):
        Smoothed(_linear_module(), [0.5, 64.0], input_shape=(1, 8, 8))
    assert "σ = 64 in [0, 1] pixel units" in caplog.text and "divide it by 255" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="raysmooth"):
        Smoothed(_linear_module(), [0.5, 1.0], input_shape=(1, 8, 8))
    assert "pixel units" not in caplog.text


def test_two_sigmas_equal_in_float32_are_one_level_and_refused():
    with pytest.raises(ConfigError, match="twice"):
        Smoothed(_linear_module(), [0.1, float(np.float32(0.1))])


def test_bad_calls_are_one_clear_error():
    smoothed = Smoothed(_linear_module(), [0.25, 0.5], input_shape=(1, 8, 8))
    x = np.zeros((1, 8, 8), np.float32)
    with pytest.raises(ConfigError, match="say which"):
        smoothed.certify(x, n0=5, n=50)
    with pytest.raises(ConfigError, match="not one of"):
        smoothed.certify(x, n0=5, n=50, sigma=0.3)
    with pytest.raises(InputError, match="shape"):
        smoothed.certify(np.zeros((3, 8, 8), np.float32), n0=5, n=50, sigma=0.25)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        smoothed.certify(np.full((1, 8, 8), 2.0, np.float32), n0=5, n=50, sigma=0.25)
    with pytest.raises(ConfigError, match="alpha"):
        smoothed.certify(x, n0=5, n=50, alpha=float("nan"), sigma=0.25)


@pytest.mark.parametrize(
    ("method", "image", "says"),
    [
        ("certify", np.zeros((1, 1, 8, 8), np.float32), "certify takes one image .* use certify_batch"),
        ("certify", np.zeros((8, 8), np.float32), r"channel axis: x\[None\]"),
        ("predict", np.zeros((1, 1, 8, 8), np.float32), "predict takes one image"),
        ("certify", np.array([["a"]]), "must be numbers"),
        ("certify_batch", np.zeros((1, 8, 8), np.float32), r"one image: certify, or x\[None\]"),
        ("certify_batch", [np.zeros((1, 8, 8)), np.zeros((1, 4, 4))], "share one shape"),
    ],
)
def test_images_of_the_wrong_form_are_one_line_saying_which_form_the_call_takes(method, image, says):
    smoothed = Smoothed(_linear_module(), 0.25, input_shape=(1, 8, 8), progress=False)
    with pytest.raises(InputError, match=says):
        getattr(smoothed, method)(image, **({} if method == "predict" else {"n0": 5}), n=50)


def test_a_module_that_cannot_take_the_images_is_one_model_error_keeping_its_own_traceback():
    smoothed = Smoothed(torch.nn.Linear(3, 3), 0.25, num_classes=3, progress=False)
    with pytest.raises(ModelError, match=r"failed on a batch of shape \(5, 1, 8, 8\) \(RuntimeError: ") as info:
        smoothed.certify(np.zeros((1, 8, 8), np.float32), n0=5, n=20)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_a_failure_after_an_input_size_resize_names_the_size_the_module_really_got():
    """It asked "does it take images of shape (1, 8, 8)?" of a module that was handed 16×16 images."""
    smoothed = Smoothed(_linear_module(), 0.25, num_classes=10, input_size=(16, 16), progress=False)
    with pytest.raises(ModelError, match=r"shape \(1, 16, 16\) \(resized from 8×8 by its input_size\)\?$"):
        smoothed.certify(np.zeros((1, 8, 8), np.float32), n0=5, n=20)


def test_a_first_image_the_model_cannot_take_does_not_fix_the_shape_for_later_images():
    """The shape comes from the first image; if the model fails on it, the next image's shape is tried
    afresh (a colour image into a grey model made every later, right image an error)."""
    smoothed = Smoothed(_linear_module(), 0.25, num_classes=10, progress=False)
    with pytest.raises(ModelError, match=r"shape \(3, 8, 8\)"):
        smoothed.certify(np.zeros((3, 8, 8), np.float32), n0=5, n=20)
    grey = np.full((1, 8, 8), 0.5, np.float32)
    cert = smoothed.certify(grey, n0=5, n=20)
    fresh = Smoothed(_linear_module(), 0.25, num_classes=10, progress=False).certify(grey, n0=5, n=20)
    assert smoothed.input_shape == (1, 8, 8) and np.array_equal(cert.counts, fresh.counts)


def test_a_shape_the_model_has_run_on_is_held_and_named_as_taken_from_the_first_image():
    smoothed = Smoothed(_linear_module(), 0.25, num_classes=10, progress=False)
    smoothed.certify(np.full((1, 8, 8), 0.5, np.float32), n0=5, n=20)
    with pytest.raises(InputError, match=r"\(1, 8, 8\) for this model \(taken from the first image; input_shape="):
        smoothed.certify(np.zeros((1, 4, 16), np.float32), n0=5, n=20)


def test_a_module_voting_one_hot_in_bools_counts_each_vote_for_its_class():
    """Any deterministic f may be smoothed: a one-hot bool output is a vote (argmax has no bool kernel)."""

    class Threshold(torch.nn.Module):
        def forward(self, z):  # class 3 where the image is bright, else class 1
            bright = z.flatten(1).mean(dim=1) > 0.5
            return torch.nn.functional.one_hot(torch.where(bright, 3, 1), 10).bool()

    cert = Smoothed(Threshold(), 0.1, num_classes=10, progress=False).certify(
        np.full((1, 8, 8), 0.9, np.float32), 5, 100
    )
    assert cert.prediction == 3 and cert.counts[3] == 100


@pytest.mark.parametrize("empty", [[], np.zeros((0, 1, 8, 8), np.float32), torch.zeros(0, 1, 8, 8)])
def test_an_empty_batch_certifies_to_an_empty_list(empty):
    smoothed = Smoothed(_linear_module(), 0.25, progress=False)
    assert smoothed.certify_batch(empty, n0=5, n=50) == []
    assert smoothed.certify_sequential(empty, n0=5, n_max=400, unit=100) == []
    with pytest.raises(InputError, match="ids for no images"):
        smoothed.certify_batch(empty, n0=5, n=50, ids=[3])


@pytest.mark.parametrize("n", [100.5, float("nan"), float("inf"), "100", True])
def test_a_sample_count_that_is_not_a_whole_number_is_refused_not_rounded(n):
    smoothed = Smoothed(_linear_module(), 0.25, input_shape=(1, 8, 8))
    with pytest.raises(InputError, match="whole number"):
        smoothed.certify(np.zeros((1, 8, 8), np.float32), n0=5, n=n)


def test_a_whole_float_sample_count_is_the_same_as_the_int():
    smoothed = Smoothed(_linear_module(), 0.25, input_shape=(1, 8, 8))
    x = np.full((1, 8, 8), 0.5, np.float32)
    assert smoothed.certify(x, n0=5, n=1e3).counts.tolist() == smoothed.certify(x, n0=5, n=1000).counts.tolist()


def test_an_image_id_beyond_int64_is_refused_as_the_job_cannot_store_it():
    smoothed = Smoothed(_linear_module(), 0.25, input_shape=(1, 8, 8))
    with pytest.raises(InputError, match=r"below 2\*\*63 \(stored as int64\), got 9223372036854775808"):
        smoothed.certify_batch(np.zeros((2, 1, 8, 8), np.float32), n0=5, n=50, ids=[0, 2**63])


@pytest.mark.parametrize("ids", [[1.5, 2], [-1, 2], ["a", "b"]])
def test_image_ids_must_be_whole_numbers_as_in_the_job(ids):
    smoothed = Smoothed(_linear_module(), 0.25, input_shape=(1, 8, 8))
    with pytest.raises(InputError, match="an image id must be a whole number of at least 0"):
        smoothed.certify_batch(np.zeros((2, 1, 8, 8), np.float32), n0=5, n=50, ids=ids)


def test_a_whole_float_unit_runs_sequential_certification_like_the_int():
    smoothed = Smoothed(_linear_module(), 0.25, input_shape=(1, 8, 8))
    x = np.full((1, 1, 8, 8), 0.5, np.float32)
    as_float = smoothed.certify_sequential(x, n0=5, n_max=400.0, unit=100.0)[0]
    as_int = smoothed.certify_sequential(x, n0=5, n_max=400, unit=100)[0]
    assert (as_float.counts.tolist(), as_float.rounds) == (as_int.counts.tolist(), as_int.rounds)


def test_a_module_with_more_outputs_than_num_classes_is_refused():
    smoothed = Smoothed(_linear_module(), 0.25, num_classes=5)
    with pytest.raises(InputError, match=r"declared with 5 classes.*check num_classes"):
        smoothed.certify(np.zeros((1, 8, 8), np.float32), n0=5, n=50)


def test_certify_batch_takes_a_generator_of_images_as_the_list_it_yields():
    smoothed = Smoothed(_linear_module(), 0.25, input_shape=(1, 8, 8))
    images = load_dataset("digits").images[:3]
    listed = smoothed.certify_batch(list(images), n0=5, n=50)
    generated = smoothed.certify_batch((x for x in images), n0=5, n=50)
    assert [c.counts.tolist() for c in generated] == [c.counts.tolist() for c in listed]


def test_a_test_set_given_whole_says_to_pass_its_images_and_ids():
    smoothed = Smoothed(_linear_module(), 0.25, input_shape=(1, 8, 8))
    with pytest.raises(InputError, match=r"got a TestSet: pass its .images \(and ids=its .ids"):
        smoothed.certify_batch(load_dataset("digits"), n0=5, n=50)


def test_a_module_with_one_logit_is_refused_with_the_two_logit_form():
    one_logit = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 1))  # a sigmoid binary classifier
    with pytest.raises(ConfigError, match=r"predicts 1 class; smoothing needs two or more"):
        Smoothed(one_logit, 0.25, input_shape=(1, 8, 8))


def test_a_module_returning_a_tuple_is_told_to_return_the_logits_tensor():
    class Packed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _linear_module()

        def forward(self, x):
            return (self.inner(x),)

    smoothed = Smoothed(Packed(), 0.25, num_classes=10)
    with pytest.raises(InputError, match="returned a tuple .* return the logits tensor itself"):
        smoothed.certify(np.zeros((1, 8, 8), np.float32), n0=5, n=50)


@pytest.mark.parametrize("progress", [True, False])
def test_a_long_call_shows_its_samples_unless_progress_is_off(monkeypatch, capsys, progress):
    monkeypatch.setattr(Smoothed, "PROGRESS_DELAY_S", 0.0)  # every call counts as long
    smoothed = Smoothed(_linear_module(), 0.25, input_shape=(1, 8, 8), batch_size=100, progress=progress)
    smoothed.certify(np.zeros((1, 8, 8), np.float32), n0=5, n=500)
    err = capsys.readouterr().err
    assert ("estimation σ=0.25" in err and "/500 " in err) is progress, err


@pytest.mark.parametrize("sigmas", [[0.25], [0.25, 0.25, 0.5]])
def test_a_cascade_over_fewer_than_two_distinct_sigmas_is_refused(sigmas):
    smoothed = Smoothed(_linear_module(), [0.25, 0.5], input_shape=(1, 8, 8))
    with pytest.raises(ConfigError, match="two or more distinct σ"):
        smoothed.cascade(np.zeros((1, 8, 8), np.float32), sigmas=sigmas, n0=5, n=50)


@pytest.mark.parametrize(
    "kwargs,says",
    [
        ({"sigmas": "0.25,0.5"}, r"sigmas must be a list of numbers, e.g. sigmas=\[0.25, 0.5\], got '0.25,0.5'"),
        ({"sigmas": [0.25, "0.5"]}, "sigmas must be a list of numbers"),
        ({"sigmas": 0.25}, "two or more distinct σ"),  # one number is a list of one (was a TypeError)
        ({"p0": "0.7"}, r"p0 must lie in \[0.5, 1\), got '0.7'"),  # was parsed from the text
        ({"sigmas": [0.5, 1.0]}, r"sigma=1.0 is not one of this classifier's σ .*sigma=\[0.25, 0.5, 1.0\]"),
    ],
)
def test_a_cascade_given_text_or_one_sigma_is_one_config_error(kwargs, says):
    smoothed = Smoothed(_linear_module(), [0.25, 0.5], input_shape=(1, 8, 8))
    with pytest.raises(ConfigError, match=says):
        smoothed.cascade(np.zeros((1, 8, 8), np.float32), n0=5, n=50, **kwargs)


@pytest.mark.parametrize(
    "model,denoiser,error,says",
    [
        (None, None, ConfigError, "model must be an nn.Module, a base-classifier name or a model folder, got NoneType"),
        (str(EMBEDDED / "onestp"), None, ConfigError, "onestp: neither a registered base classifier"),
        ("os.path", None, ConfigError, "os.path: neither a registered base classifier"),
        ("module", "/no/such/denoiser", ModelLoadError, "/no/such/denoiser: no such denoiser folder"),
        (
            "module",
            0.5,
            ConfigError,
            "denoiser must be a diffusers folder, an hf:// id or a DiffusionDenoiser, got float",
        ),
        ("module", torch.nn.Identity(), ConfigError, "a Identity alone has no noise schedule"),
    ],
)
def test_a_model_or_denoiser_that_names_nothing_is_refused_at_construction(model, denoiser, error, says):
    """Without input_shape the model is built on the first image: these were first heard of at certify."""
    model = _linear_module() if model == "module" else model
    with pytest.raises(error, match=says):
        Smoothed(model, 0.25, num_classes=10, denoiser=denoiser)


def test_a_device_this_process_cannot_use_is_refused_at_construction():
    with pytest.raises(ConfigError, match="device 'tpu' cannot be used"):
        Smoothed(_linear_module(), 0.25, device="tpu")


def test_a_sequential_schedule_that_cannot_work_is_one_clear_error():
    smoothed = Smoothed(_linear_module(), 0.25, input_shape=(1, 8, 8))
    x = np.zeros((1, 1, 8, 8), np.float32)
    with pytest.raises(ConfigError, match="multiple of the unit"):
        smoothed.certify_sequential(x, n0=5, n_max=250, unit=100)
    with pytest.raises(ConfigError, match="unit"):
        smoothed.certify_sequential(x, n0=5, n_max=100, unit=0)
    with pytest.raises(ConfigError, match="spending"):
        smoothed.certify_sequential(x, n0=5, n_max=400, unit=100, alpha_spending="greedy")


@pytest.mark.parametrize(
    "kwargs,says",
    [
        ({"look_ratio": "2"}, "look_ratio must be a finite number, got '2'"),  # these four were TypeErrors
        ({"futility_beta": "0.05"}, "futility_beta must be a finite number"),
        ({"precision": "0.1"}, "precision must be a finite number"),
        ({"r_cap": "2"}, "r_cap must be a finite number"),
        ({"group_samples": 0.5}, "group_samples must be a whole number of at least 1"),
    ],
)
def test_a_sequential_setting_given_as_text_is_one_config_error(kwargs, says):
    smoothed = Smoothed(_linear_module(), 0.25, input_shape=(1, 8, 8))
    with pytest.raises(ConfigError, match=says):
        smoothed.certify_sequential(np.zeros((1, 1, 8, 8), np.float32), n0=5, n_max=400, unit=100, **kwargs)


def test_certify_sequential_stops_early_where_the_answer_is_clear():
    digits = load_dataset("digits")
    smoothed = Smoothed(_linear_module(), 0.25)
    certs = smoothed.certify_sequential(digits.images[:4], n0=20, n_max=1600, unit=100, radii=[0.0])
    for cert in certs:
        assert cert.stop_reason in ("certified_all", "futile", "n_max")
        assert cert.n_used == 20 + int(cert.counts.sum()) and cert.counts.sum() == 100 * 2 ** (cert.rounds - 1)
    certified = [c for c in certs if not c.abstained]
    assert certified and all(c.stop_reason == "certified_all" and c.rounds < 5 for c in certified)


def test_counts_at_a_sigma_index_the_classifier_lacks_is_one_input_error():
    smoothed = Smoothed(_linear_module(), [0.25, 0.5], input_shape=(1, 8, 8), progress=False)
    with pytest.raises(InputError, match=r"sigma_index=2, but this classifier has 2 σ"):
        smoothed.counts(np.zeros((1, 1, 8, 8), np.float32), phase="selection", n=10, sigma_index=2, ids=[0])


def test_a_channels_last_first_image_is_refused_with_the_transpose():
    """A flattening model runs an (H, W, C) image as H channels without complaint: wrong numbers."""
    flat = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    hwc = np.full((8, 8, 3), 0.5, np.float32)
    with pytest.raises(InputError, match=r"looks channels-last \(H, W, C\) = \(8, 8, 3\).*transpose\(2, 0, 1\)"):
        Smoothed(flat, 0.25, num_classes=10).certify(hwc, n0=5, n=50)
    chw = Smoothed(flat, 0.25, num_classes=10).certify(hwc.transpose(2, 0, 1), n0=5, n=50)
    declared = Smoothed(flat, 0.25, num_classes=10, input_shape=(8, 8, 3)).certify(hwc, n0=5, n=50)
    assert chw.counts.sum() == declared.counts.sum() == 50


@pytest.mark.parametrize("flag", ["false", "no", 0, None])
def test_compile_takes_only_true_or_false(flag):
    with pytest.raises(ConfigError, match=r"compile must be True or False"):
        Smoothed(_linear_module(), 0.25, input_shape=(1, 8, 8), compile=flag)


def test_the_compiled_presets_engine_settings_are_arguments_handed_to_the_engine():
    """What engine=gpu_compiled sets (configs/engine/gpu_compiled.yaml) a notebook can set too."""
    settings = dict(compile=True, channels_last=True, attention="sdpa_cached", group_norm="channels_last")
    engine = Smoothed(_linear_module(), 0.25, gelu="epilogue", **settings).engine
    assert (engine.compile, engine.channels_last, engine.attention, engine.group_norm, engine.gelu) == (
        True,
        True,
        "sdpa_cached",
        "channels_last",
        "epilogue",
    )


def test_a_float64_module_is_told_its_weights_dtype_not_asked_about_the_image_shape():
    doubled = _linear_module().double()
    with pytest.raises(ModelError, match=r"its weights are float64 and its inputs float32 .*model.float\(\)"):
        Smoothed(doubled, 0.25, num_classes=10).certify(np.zeros((1, 8, 8), np.float32), n0=5, n=50)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_callers_module_is_left_as_it_was_given(precision):
    """Certifying in the middle of training must not leave the model in eval mode (dropout and batch norm
    off for the rest of training), with frozen weights, or in bf16."""
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10), torch.nn.Dropout(0.1)).train()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    Smoothed(module, 0.25, precision=precision).certify(load_dataset("digits").images[0], n0=10, n=100)
    assert all(m.training for m in module.modules())
    assert all(p.requires_grad and p.dtype == torch.float32 for p in module.parameters())
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())


def test_a_smoothed_classifier_certifies_the_module_as_it_was_when_built():
    """A certificate is for one fixed classifier: training that goes on after Smoothed(module, …) changes
    neither its certificates nor, with compile=True, leaves a compiled copy of older weights."""
    image = load_dataset("digits").images[3]
    module = _linear_module()
    smoothed = Smoothed(module, 0.5)
    first = smoothed.certify(image, n0=20, n=400)
    with torch.no_grad():
        module[1].weight.mul_(-1.0)  # training goes on: every vote changes
    assert np.array_equal(smoothed.certify(image, n0=20, n=400).counts, first.counts)
    assert not np.array_equal(Smoothed(module, 0.5).certify(image, n0=20, n=400).counts, first.counts)


def test_a_module_that_cannot_be_copied_is_certified_in_place_with_a_warning(caplog):
    import threading

    module = _linear_module()
    module.lock = threading.Lock()  # deepcopy cannot copy a lock
    with caplog.at_level("WARNING", logger="raysmooth"):
        cert = Smoothed(module, 0.5).certify(load_dataset("digits").images[0], n0=10, n=100)
    assert cert.counts.sum() == 100
    assert "model: the module cannot be copied (TypeError" in caplog.text and "certified in place" in caplog.text


@pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")  # deprecated, but still how many models ship
@pytest.mark.filterwarnings("error::UserWarning")  # and nothing of ours may warn about them
@pytest.mark.parametrize("export", ["script", "trace"])
def test_a_torchscript_module_certifies_as_the_module_it_was_made_from(export):
    """A deployed model is often TorchScript, whose modules refuse requires_grad_ (a RuntimeError before)."""
    image = load_dataset("digits").images[0]
    module = _linear_module()
    scripted = torch.jit.script(module) if export == "script" else torch.jit.trace(module, torch.zeros(1, 1, 8, 8))
    expect = Smoothed(module, 0.5).certify(image, n0=10, n=200).counts
    assert np.array_equal(Smoothed(scripted, 0.5).certify(image, n0=10, n=200).counts, expect)
    assert all(p.requires_grad for p in scripted.parameters())


@pytest.mark.parametrize("num_classes", [None, 10])
def test_a_module_returning_a_transformers_style_output_is_told_to_return_its_logits(num_classes):
    class Output:  # what transformers' ImageClassifierOutput looks like to us
        def __init__(self, logits):
            self.logits = logits

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _linear_module()

        def forward(self, x):
            return Output(self.inner(x))

    with pytest.raises((ConfigError, InputError), match=r"has a \.logits tensor.*forward returns model\(x\)\.logits"):
        Smoothed(Wrapped(), 0.25, num_classes=num_classes).certify(np.zeros((1, 8, 8), np.float32), n0=5, n=50)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_an_8_bit_image_is_told_to_divide_by_255(as_tensor):
    image = (np.arange(64).reshape(1, 8, 8) * 4).astype(np.uint8)
    x = torch.from_numpy(image) if as_tensor else image
    with pytest.raises(InputError, match=r"got uint8 values up to 252: an 8-bit image .* is x / 255 as floats"):
        Smoothed(_linear_module(), 0.25).certify(x, n0=5, n=50)


def test_a_read_only_array_certifies_without_a_warning(recwarn):
    """np.asarray of a PIL image is read-only: torch warned on every call."""
    image = load_dataset("digits").images[0].copy()
    image.flags.writeable = False
    cert = Smoothed(_linear_module(), 0.25).certify(image, n0=5, n=50)
    assert cert.counts.sum() == 50 and not [w for w in recwarn if "not writable" in str(w.message)]


@pytest.mark.parametrize(
    "call, says",
    [
        (lambda s, x: s.certify(x, n0=0, n=50), "n0 must be a whole number of at least 1"),
        (lambda s, x: s.certify(x, n0=5, n=0), "n must be a whole number of at least 1"),
        (lambda s, x: s.predict(x, n=0), "n must be a whole number of at least 1"),
        (lambda s, x: s.certify_sequential([x], n0=0, n_max=1000), "n0 must be a whole number of at least 1"),
        # a count that could never be drawn: its work units alone were a MemoryError
        (
            lambda s, x: s.certify(x, n0=5, n=10**14),
            r"n=100,000,000,000,000 in chunks of chunk=10,000 is 10,000,000,000",
        ),
        (lambda s, x: s.predict(x, n=2**70), r"n must be below 2\*\*63"),
        (lambda s, x: s.cascade(x, n0=10**12, n=50), r"n0=1,000,000,000,000 in chunks of chunk=10,000"),
    ],
)
def test_a_bad_sample_count_names_its_argument_before_any_sample_is_drawn(call, says, monkeypatch):
    smoothed = Smoothed(_linear_module(), [0.25, 0.5], input_shape=(1, 8, 8))
    drawn = []
    monkeypatch.setattr(smoothed, "_draw", lambda *a, **k: drawn.append(a))
    with pytest.raises(InputError, match=f"^{says}"):
        call(smoothed, np.zeros((1, 8, 8), np.float32))
    assert drawn == []


def test_a_sequential_schedule_of_more_units_than_a_call_lists_is_refused_before_sampling(monkeypatch):
    smoothed = Smoothed(_linear_module(), 0.25, input_shape=(1, 8, 8))
    monkeypatch.setattr(smoothed, "_draw", lambda *a, **k: pytest.fail("sampled"))
    with pytest.raises(ConfigError, match=r"n_max=125,000,000,000 in units of unit=125 is 1,000,000,000 work units"):
        smoothed.certify_sequential([np.zeros((1, 8, 8), np.float32)], n0=5, n_max=125 * 10**9)


@pytest.mark.parametrize(
    "radii,says",
    [
        ([], r"radii is empty: give the radii to decide"),  # was taken as [0]: stopped at the first certificate
        ([0.5, -1], r"the radius grid must hold non-negative numbers, got \[0.5, -1.0\]$"),  # as given, not with 0
        ("0.5", r"radii must be a list of numbers, e.g. radii=\[0.25, 0.5\], got '0.5'"),  # was read per character
        ([True], r"radii must be a list of numbers"),
        (None, r"radii must be a list of numbers"),
    ],
)
def test_a_sequential_radius_grid_that_is_empty_or_negative_is_refused_before_sampling(monkeypatch, radii, says):
    smoothed = Smoothed(_linear_module(), 0.25, input_shape=(1, 8, 8))
    monkeypatch.setattr(smoothed, "_draw", lambda *a, **k: pytest.fail("sampled"))
    with pytest.raises(ConfigError, match=says):
        smoothed.certify_sequential([np.zeros((1, 8, 8), np.float32)], n0=5, n_max=1000, radii=radii)


def test_one_radius_given_as_a_number_is_a_grid_of_one():
    """radii=0.5 was a TypeError from len()."""
    smoothed = Smoothed(_linear_module(), 0.25, input_shape=(1, 8, 8), progress=False)
    x = [np.full((1, 8, 8), 0.5, np.float32)]
    one, listed = (smoothed.certify_sequential(x, n0=5, n_max=1000, radii=r)[0] for r in (0.5, [0.5]))
    assert (one.prediction, one.radius, one.n_used) == (listed.prediction, listed.radius, listed.n_used)


def test_counts_in_a_phase_that_does_not_exist_is_a_config_error_not_a_bare_value_error():
    smoothed = Smoothed(_linear_module(), 0.25, input_shape=(1, 8, 8))
    with pytest.raises(ConfigError, match="phase must be one of selection, estimation, got 'bogus'"):
        smoothed.counts(np.zeros((1, 1, 8, 8), np.float32), phase="bogus", n=10, sigma_index=0, ids=[0])


def test_lattice_noise_on_images_off_its_grid_says_so_in_the_api_words():
    """The engine's advice named the job's keys (engine.levels=255), not the argument levels=."""
    smoothed = Smoothed(_linear_module(), 0.25, num_classes=10, noise="lattice", progress=False)
    with pytest.raises(InputError, match=r"^noise=lattice needs images on the grid k/255 \(levels=255\).*set levels"):
        smoothed.certify(np.full((1, 8, 8), 0.5, np.float32), n0=5, n=50)
    on_grid = np.full((1, 8, 8), 8 / 16, np.float32)
    assert Smoothed(_linear_module(), 0.25, noise="lattice", levels=16, progress=False).certify(on_grid, 5, 50).n_used


def test_a_sigma_named_as_text_at_a_call_is_refused_as_at_construction():
    smoothed = Smoothed(_linear_module(), [0.25, 0.5], input_shape=(1, 8, 8), progress=False)
    with pytest.raises(ConfigError, match="sigma must be a finite number, got '0.25'"):
        smoothed.predict(np.zeros((1, 8, 8), np.float32), n=50, sigma="0.25")
    assert smoothed.predict(np.zeros((1, 8, 8), np.float32), n=50, sigma=np.float32(0.25)).n_used == 50


@pytest.mark.parametrize(
    "denoiser,says",
    [
        ({"path": ""}, r"model_kwargs\['denoiser'\].path is empty"),  # was read as the working directory
        ({"subfolder": "unet"}, r"model_kwargs\['denoiser'\] needs either path .* or weights"),
    ],
)
def test_a_registered_dds_given_a_denoiser_section_naming_no_weights_says_so(denoiser, says):
    kwargs = {"denoiser": denoiser, "classifier": {"path": str(EMBEDDED / "classifier")}}
    with pytest.raises(ConfigError, match=says):
        Smoothed("dds", 0.25, model_kwargs=kwargs, input_shape=(1, 8, 8))


@pytest.mark.parametrize(
    "name,kwargs,says",
    [
        ("dds", {"classifier": {"path": ""}}, r"model_kwargs\['classifier'\].path is empty"),
        ("dds", {"classifier": {"checkpoint": " "}}, r"model_kwargs\['classifier'\].checkpoint is empty"),
        ("onestep", {"onestep": {"path": ""}}, r"model_kwargs\['onestep'\].path is empty"),
    ],
)
def test_an_empty_model_path_never_builds_a_random_timm_model(name, kwargs, says):
    """Found by hand: classifier.path='' read as no path, so timm built resnet18 with random weights."""
    if name == "dds":
        kwargs = {"denoiser": {"path": str(EMBEDDED / "denoiser")}, **kwargs}
    with pytest.raises(ConfigError, match=says):
        Smoothed(name, 0.25, model_kwargs=kwargs, input_shape=(1, 8, 8))
