"""The embedded default: committed models load and certify, and the reported table is recomputed
exactly by `raysmooth analyze` and `raysmooth sweep` from the stored counts alone."""

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from raysmooth.apps import certify_main
from raysmooth.cli import main as cli
from raysmooth.store import RunStore

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "raysmooth" / "embedded" / "digits"


def test_the_training_job_writes_the_embedded_models_as_folders_that_load(tmp_path, capsys):
    """`raysmooth train-toy --quick` (a smoke run: the models are poor), as the committed ones were made."""
    from raysmooth.models import load_classifier, load_denoiser, load_onestep

    assert cli(["train-toy", "--out", str(tmp_path), "--quick"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classifier", "classifier_noisy", "denoiser", "onestep"]
    assert json.loads((tmp_path / "denoiser" / "card.json").read_text())["steps"] == 200
    load_denoiser({"path": str(tmp_path / "denoiser")})
    assert load_classifier({"path": str(tmp_path / "classifier")}).num_classes == 10
    assert load_onestep({"path": str(tmp_path / "onestep")}).num_classes == 10


@pytest.mark.parametrize("args", [["--quick"], ["--seed", "3"], ["--out", "{embedded}", "--quick"]])
def test_a_smoke_or_other_seed_training_never_replaces_the_embedded_models_unasked(args, tmp_path, monkeypatch, capsys):
    """Found by hand: `raysmooth train-toy --quick` wrote smoke-test models over the committed ones that
    every default run uses. (The embedded folder is a stand-in here, and training would fail the test.)"""
    from raysmooth import toy

    stand_in = tmp_path / "embedded"
    stand_in.mkdir()
    monkeypatch.setattr(toy, "EMBEDDED_DIR", stand_in)
    monkeypatch.setattr(toy, "train_all", lambda *a, **k: pytest.fail("trained into the embedded folder"))
    assert cli(["train-toy", *(a.format(embedded=stand_in) for a in args)]) == 2
    assert "would replace the embedded models that raysmooth certify runs by default" in capsys.readouterr().err


def test_the_committed_models_are_safetensors_with_cards_and_fit_the_budget():
    files = [p for p in EMBEDDED.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 20e6
    weights = sorted(str(p.relative_to(EMBEDDED)) for p in files if p.suffix == ".safetensors")
    assert weights == [
        "classifier/model.safetensors",
        "classifier_noisy/model.safetensors",
        "denoiser/unet/diffusion_pytorch_model.safetensors",
        "denoiser_ft/unet/diffusion_pytorch_model.safetensors",
        "onestep/model.safetensors",
    ]
    assert not [p for p in files if p.suffix in (".pt", ".pth", ".bin", ".pkl")]
    assert (EMBEDDED / "denoiser_ft" / "finetune_config.json").is_file()  # the recipe travels with the weights
    for name, kind in (("classifier", "classifier"), ("classifier_noisy", "classifier"), ("onestep", "onestep")):
        # Self-describing folders: the config to rebuild the model, its weights, and how it was trained.
        assert json.loads((EMBEDDED / name / "config.json").read_text())["raysmooth_model"] == kind
        card = json.loads((EMBEDDED / name / "card.json").read_text())
        assert card["config"]["seed"] == 0 and "dataset" in card
    card = json.loads((EMBEDDED / "denoiser" / "card.json").read_text())
    assert set(card["test"]) == {"sigma_0.25", "sigma_0.5", "sigma_1.0"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    out = tmp_path_factory.mktemp("demo")
    # The default job (three models, three σ) on 24 images and a small budget.
    code = certify_main(["data.max_images=24", "smoothing.n=60", "smoothing.n0=10", f"out={out}", "ray.num_actors=2"])
    assert code == 0
    return out


def test_the_default_job_certifies_plain_and_fine_tuned_dds_and_onestep(demo, capsys):
    for name in ("dds", "dds_ft", "onestep"):
        store = RunStore.open(demo / name)
        assert store.read_counts().num_rows == 24 * 3 * 2
        methods = set(store.read_certificates().column("method").to_pylist())
        assert methods == {"certify", "predict", "cascade"}
    assert (demo / "certified_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    denoisers = {
        name: RunStore.open(demo / name).manifest["config"]["model"]["denoiser"]["path"] for name in ("dds", "dds_ft")
    }
    assert denoisers["dds"].endswith("digits/denoiser") and denoisers["dds_ft"].endswith("digits/denoiser_ft")


def test_analyze_recomputes_the_reported_table(demo, capsys):
    capsys.readouterr()
    assert certify_main(["data.max_images=24", "smoothing.n=60", "smoothing.n0=10", f"out={demo}", "plot=false"]) == 0
    job_table = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")]
    assert cli(["analyze", str(demo), "--radii", "0,0.25,0.5,0.75,1,1.25,1.5"]) == 0
    analyzed = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")]
    # The job reports certify and cascade rows; analyze also lists predict rows.
    assert job_table[0] == analyzed[0]
    assert set(job_table[2:]) <= set(analyzed[2:]) and len(job_table) > 10


def test_sweep_from_counts_reproduces_the_stored_cascade_and_certify_certificates(demo):
    run = demo / "dds"
    assert cli(["sweep", str(run), "--p0", "0.5:0.8:0.3", "--policy", "strict"]) == 0
    sweep_dir = sorted((run / "sweeps").iterdir())[-1]
    swept = RunStore.open(run).read_certificates(f"sweeps/{sweep_dir.name}")
    stored = RunStore.open(run).read_certificates()
    for p0 in (0.5, 0.8):
        a = stored.filter(pc.and_(pc.equal(stored["p0"], p0), pc.equal(stored["policy"].cast("string"), "strict")))
        b = swept.filter(pc.equal(swept["p0"], p0))
        ia, ib = np.argsort(a["image_id"].to_numpy()), np.argsort(b["image_id"].to_numpy())
        assert a.num_rows == b.num_rows == 24
        assert np.array_equal(a["prediction"].to_numpy()[ia], b["prediction"].to_numpy()[ib])
        assert np.array_equal(a["radius"].to_numpy()[ia], b["radius"].to_numpy()[ib])
    for sigma in (0.25, 0.5, 1.0):  # each σ's CERTIFY at the run's α, recomputed by the sweep, is the stored one
        certify_rows = pc.field("method").cast("string") == "certify"
        a = stored.filter(certify_rows & (pc.field("sigma") == sigma)).sort_by("image_id")
        b = swept.filter(certify_rows & (pc.field("sigma") == sigma)).sort_by("image_id")
        assert a.num_rows == b.num_rows == 24
        assert a["prediction"].to_pylist() == b["prediction"].to_pylist() and a["radius"] == b["radius"]
