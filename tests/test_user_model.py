"""A user's own nn.Module on the Ray path: `model.base=pkg.module:builder`, shipped to the workers by
Ray's runtime environment, and one line when it cannot be imported."""

import os
import sys
import textwrap

import pytest

from raysmooth.apps import certify_main
from raysmooth.store import RunStore

pytest.importorskip("ray")

MODULE = """
import os
import torch


def build(width=10, scale=1.0):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, width))


class NeedsColour(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(x.reshape(len(x), 3 * 8 * 8))  # grey 8x8 images have 64 values, not 192


def build_colour():
    return NeedsColour()
"""

BROKEN_ON_WORKERS = """
import os

if os.getpid() != int(open(os.path.join(os.path.dirname(__file__), "driver.pid")).read()):
    raise ImportError("libcustom_op.so: cannot open shared object file")


def build():
    import torch

    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
"""


@pytest.fixture(autouse=True)
def fresh_ray():
    """Each run starts its own local cluster, with the user's package in its runtime environment."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        ray.shutdown()
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def userpkg(tmp_path, monkeypatch):
    pkg = tmp_path / "src" / "userpkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(textwrap.dedent(MODULE))
    (pkg / "broken.py").write_text(textwrap.dedent(BROKEN_ON_WORKERS))
    (pkg / "driver.pid").write_text(str(os.getpid()))
    # Only the driver has the package on its path; the workers get it from Ray.
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    assert "src" not in os.environ.get("PYTHONPATH", "")
    yield pkg
    for name in [m for m in sys.modules if m.startswith("userpkg")]:
        del sys.modules[name]


COMMON = [
    "model=custom",
    "model.input_shape=[1,8,8]",
    "data=digits",
    "data.max_images=6",
    "smoothing.n=40",
    "smoothing.n0=8",
    "ray.num_actors=1",
    "plot=false",
    "model.name=mine",
    "compare=[]",
]


def test_a_users_module_is_certified_on_ray_workers(userpkg, tmp_path, capsys):
    code = certify_main(
        [
            "model.base=userpkg.models:build",
            "+model.options.width=10",
            "+model.classifier.mean=[0.5]",
            "+model.classifier.std=[0.25]",
            f"out={tmp_path / 'out'}",
            *COMMON,
        ]
    )
    assert code == 0, capsys.readouterr().err
    store = RunStore.open(tmp_path / "out" / "mine")
    counts = store.read_counts()
    assert counts.num_rows == 6 * 3 * 2
    assert store.manifest["model_id"].startswith("PlainBase")


def test_a_module_the_driver_cannot_find_is_one_line(userpkg, tmp_path, capsys):
    assert certify_main(["model.base=userpkg.nope:build", f"out={tmp_path / 'out'}", *COMMON]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "userpkg.nope" in err and "PYTHONPATH" in err
    assert not (tmp_path / "out").exists()


def test_a_module_the_workers_cannot_import_is_one_line(userpkg, tmp_path, capsys):
    assert certify_main(["model.base=userpkg.broken:build", f"out={tmp_path / 'out'}", *COMMON]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "libcustom_op.so" in err and "on Ray worker" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "mine" / "manifest.json").exists()


def test_a_module_wider_than_its_declared_classes_is_one_line_and_stores_nothing(userpkg, tmp_path, capsys):
    args = ["model.base=userpkg.models:build", "+model.options.width=12", "+model.classifier.num_classes=10"]
    assert certify_main([*args, f"out={tmp_path / 'out'}", *COMMON]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "declared with 10 classes" in err and "Traceback" not in err, err
    parts = list((tmp_path / "out" / "mine").rglob("*.parquet"))
    assert parts == [], parts


def test_a_module_that_fails_on_the_images_is_one_line_naming_its_code_and_stores_nothing(userpkg, tmp_path, capsys):
    args = ["model.base=userpkg.models:build_colour", "+model.classifier.num_classes=10"]
    assert certify_main([*args, f"out={tmp_path / 'out'}", *COMMON]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "failed on a batch of shape (" in err and ", 1, 8, 8) (RuntimeError: " in err, err
    assert "userpkg/models.py:" in err and "Traceback" not in err, err
    assert list((tmp_path / "out" / "mine").rglob("*.parquet")) == []
