"""Test sets: the bundled digits split, subsampling as the papers do it, and on-disk formats read from
tiny stand-in files (CIFAR-10 python batches without executing pickles, class-folder trees)."""

import pickle

import numpy as np
import pytest

from raysmooth.config import DataCfg
from raysmooth.data import load_dataset, load_test_set, subsample
from raysmooth.errors import ConfigError


def test_digits_test_split_is_fixed_and_in_range():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert len(a) == 359 and a.images.shape[1:] == (1, 8, 8)
    assert np.array_equal(a.ids, b.ids) and a.images.min() >= 0 and a.images.max() <= 1
    train = load_dataset("digits", split="train")
    assert not set(train.ids) & set(a.ids)


def test_subsampling_every_kth_then_at_most_m_or_by_indices():
    d = load_dataset("digits")
    s = subsample(d, skip=20, max_images=5)
    assert s.ids.tolist() == d.ids[[0, 20, 40, 60, 80]].tolist()
    assert subsample(d, indices=[3, 1]).ids.tolist() == d.ids[[3, 1]].tolist()
    with pytest.raises(ConfigError):
        subsample(d, indices=[10_000])
    with pytest.raises(ConfigError):
        subsample(d, skip=0)


def _cifar_batch(path, n=6, seed=0):
    rng = np.random.default_rng(seed)
    batch = {
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"labels": rng.integers(0, 10, n).tolist(),
        b"batch_label": b"testing batch 1 of 1",
    }
    path.write_bytes(pickle.dumps(batch, protocol=2))
    return batch


def test_cifar10_reads_python_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batch = _cifar_batch(folder / "test_batch")
    d = load_dataset("cifar10", root=str(tmp_path))
    assert d.images.shape == (6, 3, 32, 32) and d.labels.tolist() == batch[b"labels"]
    np.testing.assert_allclose(d.images[0, 0, 0, :4], batch[b"data"][0, :4] / 255.0)
    assert d.images[0, 1, 0, 0] == pytest.approx(batch[b"data"][0, 1024] / 255.0)  # channel-major rows


class _Evil:
    def __reduce__(self):
        return (print, ("executed",))


def test_a_cifar_batch_that_would_execute_code_is_refused(tmp_path, capsys):
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": _Evil()}, protocol=2))
    with pytest.raises(ConfigError, match="refused global"):
        load_dataset("cifar10", root=str(tmp_path))
    assert "executed" not in capsys.readouterr().out


def test_missing_dataset_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="test_batch"):
        load_dataset("cifar10", root=str(tmp_path))
    with pytest.raises(ConfigError, match="no such folder"):
        load_dataset("imagenet", root=str(tmp_path / "val"))


def test_imagenet_val_tree_gives_the_standard_synset_indices_and_center_crops(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    for wnid in ("n01530575", "n01440764"):
        (tmp_path / wnid).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)).save(tmp_path / wnid / f"img{i}.JPEG")
    d = load_test_set(DataCfg(name="imagenet", split="val", root=str(tmp_path), skip=2, max_images=2))
    assert d.images.shape == (2, 3, 224, 224) and d.num_classes == 1000
    img = d.images[1]  # read from disk only now
    assert img.shape == (3, 224, 224) and img.dtype == np.float32 and 0 <= img.min() and img.max() <= 1
    assert d.labels.tolist() == [0, 0] and d.ids.tolist() == [0, 2]  # n01440764 sorts first: class 0
    full = load_test_set(DataCfg(name="imagenet", split="val", root=str(tmp_path)))
    # n01530575 (brambling) is class 10 of ImageNet-1k, not the 2nd folder present: a subset of the
    # synsets keeps the indices the model's outputs mean.
    assert full.labels.tolist() == [0, 0, 0, 10, 10, 10]


def test_imagenet_class_folders_that_are_not_synsets_are_refused(tmp_path):
    from PIL import Image

    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name / "0.png")
    with pytest.raises(ConfigError, match="not ImageNet-1k synsets .* data.name=image_folder"):
        load_dataset("imagenet", root=str(tmp_path))


@pytest.mark.parametrize(
    ("name", "options", "says"),
    [
        ("synthetic", {"num_imags": 3}, r"synthetic takes no 'num_imags' \(it takes num_images, shape"),
        ("digits", {"size": 8}, r"digits takes no 'size' \(it takes no options\)"),
    ],
)
def test_an_option_the_loader_does_not_take_is_refused_not_swallowed(name, options, says):
    with pytest.raises(ConfigError, match=says):
        load_dataset(name, **options)


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"num_images": -1}, "num_images must be a whole number of at least 1"),
        ({"num_classes": 1}, "num_classes must be a whole number of at least 2"),
        ({"shape": [1, 8]}, r"shape must be \(C, H, W\)"),
    ],
)
def test_synthetic_options_are_checked_in_one_line(options, says):
    with pytest.raises(ConfigError, match=says):
        load_dataset("synthetic", **options)


def test_a_common_key_given_among_the_options_names_its_own_key():
    with pytest.raises(ConfigError, match="data.options.root: set it as data.root"):
        load_test_set(DataCfg(name="digits", options={"root": "/x"}))
