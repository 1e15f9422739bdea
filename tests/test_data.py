"""Test sets: the bundled digits split, subsampling as the papers do it, and on-disk formats read from
tiny stand-in files (CIFAR-10 python batches without executing pickles, class-folder trees)."""

import pickle

import numpy as np
import pytest

from raysmooth.config import DataCfg
from raysmooth.data import fingerprint, load_dataset, load_test_set, subsample
from raysmooth.errors import ConfigError, InputError


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


def test_a_cifar_root_holding_only_the_archive_says_to_extract_it(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not extracted")
    with pytest.raises(ConfigError, match=r"test_batch; extract .*cifar-10-python.tar.gz there first"):
        load_dataset("cifar10", root=str(tmp_path))


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


def test_a_flat_imagenet_val_folder_says_to_sort_it_into_synset_folders(tmp_path):
    from PIL import Image

    for i in (1, 2):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f"ILSVRC2012_val_{i:08d}.JPEG")
    with pytest.raises(ConfigError, match=r"holds 2 images directly, .* into the folder of its synset"):
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


def _class_tree(root, classes=("cat", "dog"), per_class=2, size=(10, 12)):
    from PIL import Image

    rng = np.random.default_rng(2)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize(("size", "shape"), [(8, (3, 8, 8)), ([6, 8], (3, 6, 8)), ((8.0, 4), (3, 8, 4))])
def test_image_folder_takes_one_size_for_a_square_or_h_and_w(tmp_path, size, shape):
    d = load_dataset("image_folder", root=str(_class_tree(tmp_path)), size=size)
    assert d.images[0].shape == shape and d.images.shape == (4, *shape)


@pytest.mark.parametrize("size", [[0, 8], [8, 8, 8], 8.5, "large", [8, -1]])
def test_image_folder_refuses_a_size_that_is_not_pixels_in_one_line(tmp_path, size):
    with pytest.raises(ConfigError, match=r"data.options.size must be \[H, W\] in pixels"):
        load_dataset("image_folder", root=str(_class_tree(tmp_path)), size=size)


def test_image_folder_refuses_fewer_classes_than_it_has_class_folders(tmp_path):
    root = _class_tree(tmp_path, classes=("a", "b", "c"))
    with pytest.raises(ConfigError, match=r"num_classes=2 but .* has 3 class folders \(labels 0 to 2"):
        load_dataset("image_folder", root=str(root), size=8, num_classes=2)
    assert load_dataset("image_folder", root=str(root), size=8, num_classes=10).num_classes == 10


def test_a_damaged_image_file_is_one_line_saying_to_replace_it_not_remove_it(tmp_path):
    root = _class_tree(tmp_path)
    (root / "dog" / "1.png").write_bytes(b"not an image")
    d = load_dataset("image_folder", root=str(root), size=8)
    with pytest.raises(InputError, match=r"dog/1.png: not a readable image .* replace it with a readable copy"):
        d.images[3]


def test_the_fingerprint_names_which_images_the_ids_mean(tmp_path):
    root = _class_tree(tmp_path)
    before = fingerprint(load_dataset("image_folder", root=str(root), size=8))
    (root / "dog" / "1.png").write_bytes((root / "cat" / "0.png").read_bytes())  # a file replaced under its name
    assert fingerprint(load_dataset("image_folder", root=str(root), size=8)) == before
    (root / "cat" / "0.png").unlink()  # the later ids now name other images
    assert fingerprint(load_dataset("image_folder", root=str(root), size=8)) != before
    digits = load_dataset("digits")
    assert fingerprint(digits) == fingerprint(load_dataset("digits"))
    assert fingerprint(digits) != fingerprint(subsample(digits, skip=2))


def test_indices_outside_the_split_are_named_with_its_size():
    """It printed the first five indices given, in range or not, and an ellipsis after any list."""
    d = load_dataset("digits")
    with pytest.raises(ConfigError, match=r"must lie in \[0, 359\) \(digits-test has 359 images\), got 5000$"):
        subsample(d, indices=[1, 2, 3, 4, 5, 5000])
    with pytest.raises(ConfigError, match=r"got 359, 360, 361, 362, 363 and 2 more$"):
        subsample(d, indices=list(range(352, 366)))
