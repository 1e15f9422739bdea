"""Test sets as arrays in [0,1]: a registry of named loaders, and the subsampling of the papers.

``digits`` ships with scikit-learn (8×8 grey, 10 classes) and needs nothing on disk; ``synthetic``
is random images for tests and benchmarks. Every loader returns the same ``TestSet`` record.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError, InputError, pixel_size, whole_number

__all__ = [
    "TestSet",
    "register_dataset",
    "load_dataset",
    "list_datasets",
    "subsample",
    "digits_split",
    "load_test_set",
    "check_names",
    "fingerprint",
]

_DATASETS: dict[str, Callable[..., TestSet]] = {}


class LazyImages:
    """Images read from files when indexed: a full ImageNet val set (50,000 × 3 × 224 × 224 floats,
    30 GB) never sits in memory; the driver reads each image when it first ships it to an actor."""

    def __init__(self, files: Sequence, transform, shape: tuple[int, int, int]):
        self.files = list(files)
        self.transform = transform
        self.shape = (len(self.files), *shape)
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            img = _read_image(self.files[index], self.transform)
            if img.shape != self.shape[1:]:
                raise InputError(f"{self.files[index]}: gives an image of shape {img.shape}, expected {self.shape[1:]}")
            return img
        rows = np.arange(len(self.files))[index]
        return LazyImages([self.files[i] for i in rows], self.transform, self.shape[1:])


@dataclass(frozen=True)
class TestSet:
    """Images (N, C, H, W) float32 in [0,1] (an array, or ``LazyImages`` read on demand), labels (N,),
    and the ids the results are keyed by."""

    __test__ = False  # not a pytest class

    name: str
    images: np.ndarray
    labels: np.ndarray
    ids: np.ndarray  # stable index of each image in the full split
    num_classes: int

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, rows: np.ndarray) -> TestSet:
        return TestSet(self.name, self.images[rows], self.labels[rows], self.ids[rows], self.num_classes)


def fingerprint(data: TestSet) -> str:
    """What a test set's image ids name, as a short hash: a run's rows are keyed by image id, so a resumed
    run checks it (a file added to or removed from a folder gives the later ids to other images). Files
    count by their class folder and name, so a damaged file replaced by a good copy keeps the run's."""
    h = hashlib.sha256()
    h.update(np.asarray(data.ids, np.int64).tobytes())
    h.update(np.asarray(data.labels, np.int64).tobytes())
    if isinstance(data.images, LazyImages):
        for f in data.images.files:
            h.update(f"{Path(f).parent.name}/{Path(f).name}\n".encode())
    else:
        h.update(np.ascontiguousarray(data.images, dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def register_dataset(fn: Callable[..., TestSet]) -> Callable[..., TestSet]:
    _DATASETS[fn.__name__] = fn
    return fn


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def subsample(
    data: TestSet, skip: int = 1, max_images: int | None = None, indices: Sequence[int] | None = None
) -> TestSet:
    """Every ``skip``-th image (Cohen's --skip), then at most ``max_images``; or explicit ``indices``."""
    if indices is not None:
        idx = np.asarray(indices, dtype=np.int64)
        outside = idx[(idx < 0) | (idx >= len(data))]
        if len(idx) == 0 or len(outside):
            shown = ", ".join(str(i) for i in outside[:5]) + (
                f" and {len(outside) - 5} more" if len(outside) > 5 else ""
            )
            raise ConfigError(
                f"data.indices must lie in [0, {len(data)}) ({data.name} has {len(data)} images), got {shown or 'none'}"
            )
        if len(np.unique(idx)) != len(idx):
            raise ConfigError("data.indices lists an image twice")
        return data.take(idx)
    if skip < 1:
        raise ConfigError(f"data.skip must be at least 1, got {skip}")
    if max_images is not None and max_images < 1:
        raise ConfigError(f"data.max_images must be at least 1, got {max_images}")
    rows = np.arange(0, len(data), skip)
    if max_images is not None:
        rows = rows[:max_images]
    return data.take(rows)


def subsamples_itself(name: str) -> bool:
    """Loaders that read images from disk take skip/max_images themselves (never load what is skipped)."""
    return getattr(_DATASETS.get(name), "subsamples", False)


def load_dataset(name: str, **kwargs) -> TestSet:
    if name not in _DATASETS:
        raise ConfigError(f"data.name: unknown dataset {name!r}; choose one of {', '.join(list_datasets())}")
    _check_options(name, {k: v for k, v in kwargs.items() if k not in _SET_BY_KEYS})
    return _DATASETS[name](**kwargs)


_SET_BY_KEYS = ("split", "root", "skip", "max_images")  # data.split …, not data.options


def _check_options(name: str, options: dict) -> None:
    """Loaders take ``**_`` so that every one accepts the common keys; an option a loader does not
    name (a typo: data.options.num_imags) would vanish into it, so it is refused here."""
    import inspect

    params = inspect.signature(_DATASETS[name]).parameters
    takes = [p for p, v in params.items() if v.kind is not v.VAR_KEYWORD and p not in _SET_BY_KEYS]
    for key in options:
        if key not in takes:
            offered = f"it takes {', '.join(takes)}" if takes else "it takes no options"
            raise ConfigError(f"data.options: {name} takes no {key!r} ({offered})")


def check_names(data) -> None:
    """What a ``DataCfg`` names, checked without reading a file (the dataset, its split, its options):
    the config's one validation runs it, so a typo stops before any folder or log line is made."""
    if data.name not in _DATASETS:
        raise ConfigError(f"data.name: unknown dataset {data.name!r}; choose one of {', '.join(list_datasets())}")
    splits = getattr(_DATASETS[data.name], "splits", None)
    if splits and data.split not in splits:
        raise ConfigError(f"data.split must be {' or '.join(splits)} for {data.name}, got {data.split!r}")
    options = dict(data.options or {})
    if misplaced := sorted(set(options) & set(_SET_BY_KEYS)):
        raise ConfigError(f"data.options.{misplaced[0]}: set it as data.{misplaced[0]}")
    _check_options(data.name, options)


def load_test_set(data) -> TestSet:
    """The test set a ``DataCfg`` describes, subsampled (disk loaders skip unread images themselves)."""
    from .config import resolve_path

    check_names(data)
    options = dict(data.options or {})
    root = resolve_path(data.root)
    if subsamples_itself(data.name) and not data.indices:
        options.update(skip=data.skip, max_images=data.max_images)
        return load_dataset(data.name, split=data.split, root=root, **options)
    full = load_dataset(data.name, split=data.split, root=root, **options)
    return subsample(full, data.skip, data.max_images, data.indices)


def digits_split(seed: int = 0, test_fraction: float = 0.2) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """scikit-learn's digits in a fixed train/test split: images (N,1,8,8) in [0,1], labels, ids."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = (raw.images.astype(np.float32) / 16.0)[:, None]
    labels = raw.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(test_fraction * len(labels)))
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    return {"train": (images[train], labels[train], train), "test": (images[test], labels[test], test)}


@register_dataset
def digits(split: str = "test", **_: object) -> TestSet:
    """8×8 handwritten digits from scikit-learn; the test split is fixed (seed 0, 20%)."""
    parts = digits_split()
    if split not in digits.splits:
        raise ConfigError(f"data.split must be train or test for digits, got {split!r}")
    images, labels, ids = parts[split]
    return TestSet(f"digits-{split}", images, labels, ids.astype(np.int64), 10)


@register_dataset
def synthetic(
    num_images: int = 16, shape: Sequence[int] = (1, 8, 8), num_classes: int = 10, seed: int = 0, **_: object
) -> TestSet:
    """Random images and labels (tests and benchmarks)."""
    num_images = whole_number("data.options.num_images", num_images, error=ConfigError)
    num_classes = whole_number("data.options.num_classes", num_classes, minimum=2, error=ConfigError)
    shape = [whole_number("data.options.shape", s, error=ConfigError) for s in shape]
    if len(shape) != 3:
        raise ConfigError(f"data.options.shape must be (C, H, W), got {shape}")
    rng = np.random.default_rng(whole_number("data.options.seed", seed, minimum=None, error=ConfigError))
    images = rng.random((num_images, *shape), dtype=np.float32)
    labels = rng.integers(0, num_classes, num_images)
    return TestSet("synthetic", images, labels, np.arange(num_images, dtype=np.int64), num_classes)


# ---- data sets on disk -------------------------------------------------------------------------------
class _ArrayUnpickler:
    """Reads CIFAR-10's python batches (pickled dicts of numpy arrays) without executing arbitrary
    code: only numpy's array reconstruction is allowed."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    @classmethod
    def load(cls, path) -> dict:
        import pickle

        class Restricted(pickle.Unpickler):
            def find_class(self, module: str, name: str):
                if (module, name) not in cls.ALLOWED:
                    raise pickle.UnpicklingError(f"refused global {module}.{name}")
                return super().find_class(module, name)

        with open(path, "rb") as fh:
            return Restricted(fh, encoding="bytes").load()


@register_dataset
def cifar10(split: str = "test", root: str | None = None, **_: object) -> TestSet:
    """CIFAR-10 from its python batches (``cifar-10-batches-py``): ``root`` is that folder or its parent."""
    import pickle

    if root is None:
        raise ConfigError("data.root must point at the CIFAR-10 python batches (cifar-10-batches-py)")
    base = Path(root)
    if (base / "cifar-10-batches-py").is_dir():
        base = base / "cifar-10-batches-py"
    names = (
        ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else None
    )
    if names is None:
        raise ConfigError(f"data.split must be train or test for cifar10, got {split!r}")
    missing = [str(base / n) for n in names if not (base / n).is_file()]
    if missing:
        archive = next(iter(sorted(Path(root).glob("cifar-10-python.tar*"))), None) if Path(root).is_dir() else None
        unpack = f"; extract {archive} there first (tar xzf {archive.name})" if archive is not None else ""
        raise ConfigError(f"CIFAR-10 batch file(s) not found: {', '.join(missing)}{unpack}")
    images, labels = [], []
    for name in names:
        try:
            batch = _ArrayUnpickler.load(base / name)
        except (
            pickle.UnpicklingError,
            EOFError,
            ValueError,
            TypeError,
            AttributeError,
            IndexError,
            MemoryError,
        ) as exc:
            raise ConfigError(f"{base / name}: not a CIFAR-10 python batch ({type(exc).__name__}: {exc})") from None
        if not isinstance(batch, dict):
            raise ConfigError(
                f"{base / name}: not a CIFAR-10 python batch (it holds a {type(batch).__name__}, not a dict "
                "with data and labels)"
            )
        data = batch.get(b"data", batch.get("data"))
        raw_labels = batch.get(b"labels", batch.get("labels"))
        if data is None or raw_labels is None:
            raise ConfigError(f"{base / name}: not a CIFAR-10 python batch (no data or labels entry)")
        data = np.asarray(data)
        if data.ndim != 2 or data.shape[1] != 3072 or not np.issubdtype(data.dtype, np.integer):
            raise ConfigError(f"{base / name}: expected integer data of shape (N, 3072), got {data.dtype} {data.shape}")
        try:
            label_arr = np.asarray(raw_labels, dtype=np.int64)
        except (TypeError, ValueError):
            raise ConfigError(f"{base / name}: the labels are not integers") from None
        if label_arr.shape != (len(data),) or (len(label_arr) and (label_arr.min() < 0 or label_arr.max() > 9)):
            raise ConfigError(f"{base / name}: expected {len(data)} labels in 0..9")
        images.append(data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
        labels.append(label_arr)
    x, y = np.concatenate(images), np.concatenate(labels)
    return TestSet(f"cifar10-{split}", x, y, np.arange(len(y), dtype=np.int64), 10)


IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


def _folder_files(root) -> tuple[list, list[int], list[str]]:
    base = Path(root)
    if not base.is_dir():
        raise ConfigError(f"data.root: no such folder {base}")
    classes = sorted(d.name for d in base.iterdir() if d.is_dir())
    if not classes:
        flat = sum(1 for f in base.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        hint = (
            f"; it holds {flat} images directly, as ImageNet's validation archive unpacks: move each into the "
            "folder of its synset (the labels are not in the file names)"
            if flat
            else ""
        )
        raise ConfigError(f"{base}: expected one sub-folder per class (e.g. ImageNet's n01440764/ …){hint}")
    files, labels = [], []
    for index, name in enumerate(classes):
        for f in sorted((base / name).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(index)
    if not files:
        raise ConfigError(f"{base}: no images found")
    return files, labels, classes


def _read_image(file, transform) -> np.ndarray:
    """One image file as a float32 (C, H, W) array; a file PIL cannot read is one line that says what to
    do (a lazy set meets it mid-run: the rows stored so far are kept and the same command resumes)."""
    from PIL import Image

    try:
        with Image.open(file) as im:
            return np.asarray(transform(im.convert("RGB")), dtype=np.float32)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(
            f"{file}: not a readable image ({exc.__class__.__name__}: {exc}); replace it with a readable copy under "
            "the same name and run the same command to resume (removing it would renumber the images after it)"
        ) from exc


def _load_images(files, transform) -> np.ndarray:
    return np.stack([_read_image(f, transform) for f in files])


@register_dataset
def imagenet(
    split: str = "val",
    root: str | None = None,
    skip: int = 1,
    max_images: int | None = None,
    lazy: bool = True,
    **_: object,
) -> TestSet:
    """ImageNet val as a class-folder tree (each synset folder labelled with its ImageNet-1k index), with the
    references' Resize(256) + CenterCrop(224) (PIL, antialiased). Images are read when first needed."""
    from torchvision import transforms

    if root is None:
        raise ConfigError("data.root must point at the ImageNet val folder (one sub-folder per synset)")
    files, labels, classes = _folder_files(root)
    labels = _imagenet_indices(classes, root)[np.asarray(labels, np.int64)]
    rows = np.arange(0, len(files), max(1, skip))[: max_images or None]
    tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()])
    chosen = [files[i] for i in rows]
    images = LazyImages(chosen, tf, (3, 224, 224)) if lazy else _load_images(chosen, tf)
    return TestSet(f"imagenet-{split}", images, labels[rows], rows.astype(np.int64), 1000)


def _imagenet_indices(synsets: Sequence[str], root) -> np.ndarray:
    """The standard ImageNet-1k class index of each synset folder (timm's list: the 1,000 synsets sorted).
    Counting the folders present instead would give a subset of the classes (a quick test on 10 synsets)
    labels 0..9 that the model's outputs do not mean: silently wrong accuracy."""
    from timm.data import ImageNetInfo

    index = {name: i for i, name in enumerate(ImageNetInfo().label_names())}
    unknown = [s for s in synsets if s not in index]
    if unknown:
        raise ConfigError(
            f"{root}: {len(unknown)} class folder(s) are not ImageNet-1k synsets (e.g. {unknown[0]!r}); data=imagenet "
            "needs folders named like n01440764 (another class-folder tree: data.name=image_folder "
            "'+data.options.size=[224,224]')"
        )
    return np.array([index[s] for s in synsets], dtype=np.int64)


@register_dataset
def image_folder(
    root: str | None = None,
    size: Sequence[int] | None = None,
    num_classes: int | None = None,
    skip: int = 1,
    max_images: int | None = None,
    **_: object,
) -> TestSet:
    """Any class-folder tree; images resized (and centre-cropped) to ``size`` = (H, W)."""
    from torchvision import transforms

    if root is None or size is None:
        raise ConfigError("image_folder needs data.root and data.options.size=[H, W]")
    height, width = _image_size(size)
    files, labels, classes = _folder_files(root)
    if num_classes is None:
        num_classes = len(classes)
    elif whole_number("data.options.num_classes", num_classes, error=ConfigError) < len(classes):
        raise ConfigError(
            f"data.options.num_classes={num_classes} but {root} has {len(classes)} class folders (labels 0 to "
            f"{len(classes) - 1}, in sorted folder order)"
        )
    rows = np.arange(0, len(files), max(1, skip))[: max_images or None]
    tf = transforms.Compose(
        [transforms.Resize(min(height, width)), transforms.CenterCrop((height, width)), transforms.ToTensor()]
    )
    images = LazyImages([files[i] for i in rows], tf, (3, height, width))
    return TestSet("image_folder", images, np.asarray(labels, np.int64)[rows], rows.astype(np.int64), int(num_classes))


def _image_size(size: object) -> tuple[int, int]:
    """data.options.size as (H, W): one size means a square."""
    hw = pixel_size(size)
    if hw is None:
        raise ConfigError(f"data.options.size must be [H, W] in pixels (or one size for a square), got {size}")
    return hw


digits.splits = cifar10.splits = ("train", "test")  # type: ignore[attr-defined]  # checked before loading
imagenet.subsamples = True  # type: ignore[attr-defined]
image_folder.subsamples = True  # type: ignore[attr-defined]
