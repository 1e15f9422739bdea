"""The papers' presets compose and run end to end on tiny stand-in files of the real formats:
an ADM .pt converted with convert-adm, a transformers ViT folder, CIFAR-10 python batches, an
ImageNet-style class-folder tree, timm safetensors."""

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from raysmooth.apps import certify_main
from raysmooth.config import compose
from raysmooth.errors import ConfigError
from raysmooth.models.adm import ADMConfig, adm_key_shapes, convert_adm_checkpoint
from raysmooth.store import RunStore

from test_adm import random_adm

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("local_ray_per_module")


def _adm_folder(tmp, image_size):
    # Attention one level down at 32 px; at 224 px four levels with attention at 28 px, since attention
    # over 112×112 positions would cost most of a CPU test's time (12,544 tokens per sample).
    levels = [1, 2] if image_size <= 64 else [1, 1, 2, 2]
    cfg = ADMConfig(
        image_size=image_size,
        model_channels=32,
        channel_mult=levels,
        num_res_blocks=1,
        attention_resolutions=[image_size // 2 ** (len(levels) - 1)],
        num_heads=2,
    )
    assert set(adm_key_shapes(cfg))
    torch.save(random_adm(cfg), tmp / "adm.pt")
    return convert_adm_checkpoint(tmp / "adm.pt", tmp / f"adm-{image_size}", cfg)


def _cifar(tmp):
    folder = tmp / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batch = {b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), b"labels": [1, 2, 3]}
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    return tmp / "cifar"


def _hf_vit(tmp, image_size):
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=image_size,
        patch_size=16,
        num_labels=10,
    )
    model = transformers.ViTForImageClassification(config)
    folder = tmp / "vit"
    folder.mkdir()
    config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return (
        folder,
        f"+model.classifier.model_kwargs={{img_size:{image_size},patch_size:16,embed_dim:32,depth:1,num_heads:2,mlp_ratio:2.0}}",
    )


SMALL = ["smoothing.n=12", "smoothing.n0=4", "engine=cpu", "ray=local", "ray.num_actors=1", "plot=false"]


def _run(tmp, overrides, extra=()):
    assert certify_main([*overrides, *SMALL, *extra, f"out={tmp / 'out'}"]) == 0
    runs = [d for d in (tmp / "out").iterdir() if (d / "manifest.json").exists()]
    assert len(runs) == 1
    return RunStore.open(runs[0])


@pytest.mark.parametrize("experiment", ["carlini_cifar10", "multiscale_cifar10"])
def test_cifar10_presets_run_on_stand_in_files(tmp_path, experiment):
    den = _adm_folder(tmp_path, 32)
    vit, kwargs = _hf_vit(tmp_path, 224)
    store = _run(
        tmp_path,
        [
            f"+experiment={experiment}",
            f"data.root={_cifar(tmp_path)}",
            f"model.denoiser.path={den}",
            f"model.classifier.checkpoint={vit}",
            kwargs,
        ],
    )
    assert store.read_counts().num_rows == 3 * 3 * 2
    assert "cascade" in set(store.read_certificates().column("method").to_pylist())
    assert store.manifest["config"]["smoothing"]["n"] == 12


def test_the_diffsmooth_preset_runs_on_stand_in_files(tmp_path):
    import timm

    den = _adm_folder(tmp_path, 32)
    net = timm.create_model("resnet18", num_classes=10, in_chans=3, channels=[8, 16, 32, 64])
    save_file(net.state_dict(), str(tmp_path / "clf.safetensors"))
    store = _run(
        tmp_path,
        [
            "+experiment=diffsmooth_cifar10",
            f"data.root={_cifar(tmp_path)}",
            f"model.denoiser.path={den}",
            f"model.classifier.checkpoint={tmp_path / 'clf.safetensors'}",
            "+model.classifier.model_kwargs={channels:[8,16,32,64]}",
        ],
    )
    assert store.read_counts().num_rows == 3 * 2 * 2


def test_the_imagenet_preset_runs_on_stand_in_files(tmp_path):
    import timm
    from PIL import Image

    val = tmp_path / "val"
    rng = np.random.default_rng(2)
    for wnid in ("n01440764", "n01443537"):
        (val / wnid).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (240, 300, 3), dtype=np.uint8)).save(val / wnid / "a.JPEG")
    den = _adm_folder(tmp_path, 224)
    net = timm.create_model("test_vit", num_classes=1000)
    save_file(net.state_dict(), str(tmp_path / "beit.safetensors"))
    store = _run(
        tmp_path,
        [
            "+experiment=carlini_imagenet",
            f"data.root={val}",
            "data.skip=1",
            f"model.denoiser.path={den}",
            "model.classifier.name=test_vit",
            f"model.classifier.checkpoint={tmp_path / 'beit.safetensors'}",
            "model.classifier.input_size=[160,160]",
            "smoothing.sigmas=[0.5]",
        ],
        extra=["smoothing.n=4", "smoothing.n0=2"],
    )  # a UNet at 224×224 on the CPU: keep it small
    counts = store.read_counts()
    assert counts.num_rows == 2 * 2 and set(counts.column("label").to_pylist()) == {0, 1}


@pytest.mark.parametrize(
    "experiment", ["carlini_cifar10", "carlini_imagenet", "multiscale_cifar10", "diffsmooth_cifar10"]
)
def test_a_preset_without_its_files_names_them_in_one_line(experiment, capsys, tmp_path):
    with pytest.raises(ConfigError, match="not found"):  # checked when the config is composed, before any actor
        compose("certify", [f"+experiment={experiment}"])
    assert certify_main([f"+experiment={experiment}", f"out={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not found" in err
    assert not any(tmp_path.iterdir())  # nothing was created for a run that could not start
    # the committed config whose comments say how to make the missing file, by name
    missing, named = re.search(r": (\S+) not found .*see the comments in (configs/model/\w+\.yaml)\)$", err).groups()
    assert missing in (ROOT / named).read_text()
