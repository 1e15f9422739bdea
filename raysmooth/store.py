"""The run directory: a write-once manifest and append-only Parquet tables.

Layout (ecosystem.md §7)::

    RUN_DIR/manifest.json              resolved config, its hash, models, seed (written once)
    RUN_DIR/counts/part-*.parquet      one row per (image, σ, phase) once all its chunks are in
    RUN_DIR/certificates/part-*.parquet  derived from counts; recomputable at any time
    RUN_DIR/sweeps/<id>/part-*.parquet   certificates of a threshold sweep

Every file is written under a name that readers skip (``_staging-…parquet.tmp``), fsynced, then renamed
into place, so a crash never leaves a half-written file that a reader takes for data, and nothing is
ever overwritten in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from .errors import RaySmoothError

__all__ = [
    "COUNTS_SCHEMA",
    "CERTIFICATES_SCHEMA",
    "PHASES",
    "CountsRecord",
    "RunStore",
    "StoreError",
    "append_table",
    "read_table",
    "config_hash",
]

PHASES = ("selection", "estimation")

COUNTS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("config_hash", pa.string()),
        ("model_id", pa.string()),
        ("seed", pa.int64()),
        ("alpha", pa.float64()),
        ("image_id", pa.int64()),
        ("label", pa.int32()),
        ("sigma", pa.float64()),
        ("phase", pa.string()),
        ("n", pa.int64()),
        ("num_classes", pa.int32()),
        ("classes", pa.list_(pa.int32())),
        ("counts", pa.list_(pa.int64())),
    ]
)

_LABEL = pa.dictionary(pa.int32(), pa.string())  # low-cardinality strings, stored once per file

CERTIFICATES_SCHEMA = pa.schema(
    [
        ("run_id", _LABEL),
        ("model_id", _LABEL),
        ("image_id", pa.int64()),
        ("label", pa.int32()),
        ("method", _LABEL),  # certify | predict | cascade
        ("sigma", pa.float64()),  # the σ of a single-σ method; NaN for the cascade
        ("policy", _LABEL),  # cascade policy; "" otherwise
        ("p0", pa.float64()),  # cascade threshold; NaN otherwise
        ("alpha", pa.float64()),
        ("prediction", pa.int64()),  # -1 = abstain
        ("abstain_reason", _LABEL),
        ("radius", pa.float64()),  # [0,1] pixel units
        ("correct", pa.bool_()),
        ("sigma_answered", pa.float64()),  # σ of the level that answered; NaN when abstaining
    ]
)


class StoreError(RaySmoothError):
    """A run directory that cannot be used as asked (missing, foreign config, damaged)."""


@dataclass(frozen=True)
class CountsRecord:
    """Finished counts of one (image, σ, phase): the unit of the counts table."""

    image_id: int
    label: int
    sigma: float
    phase: str
    counts: np.ndarray  # dense, length num_classes

    @property
    def key(self) -> tuple[int, float, str]:
        return (int(self.image_id), float(self.sigma), self.phase)


def config_hash(config: dict) -> str:
    """Stable short hash of a resolved config (key order does not matter)."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def append_table(directory: Path | str, table: pa.Table) -> Path:
    """Write ``table`` as a new immutable Parquet file in ``directory`` (staged, fsynced, renamed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    staging = directory / f"_staging-{token}.parquet.tmp"
    final = directory / f"part-{time.time_ns():020d}-{token[:12]}.parquet"
    with open(staging, "wb") as fh:
        pq.write_table(table, fh, compression="zstd")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(staging, final)
    _fsync_dir(directory)
    return final


def read_table(directory: Path | str, schema: pa.Schema) -> pa.Table:
    """All committed rows under ``directory`` (staging files are invisible); empty if none."""
    directory = Path(directory)
    if not directory.is_dir():
        return schema.empty_table()
    files = sorted(str(p) for p in directory.glob("part-*.parquet"))
    if not files:
        return schema.empty_table()
    try:
        return ds.dataset(files, format="parquet", schema=schema).to_table()
    except (pa.ArrowInvalid, OSError) as exc:
        raise StoreError(f"{directory}: a committed Parquet file cannot be read ({exc})") from exc


class RunStore:
    """One run directory. ``create`` it with a config, or ``open`` an existing one."""

    MANIFEST = "manifest.json"

    def __init__(self, root: Path | str, manifest: dict):
        self.root = Path(root)
        self.manifest = manifest

    # ---- lifecycle ----------------------------------------------------------------------------
    @classmethod
    def create(cls, root: Path | str, config: dict, **extra: Any) -> "RunStore":
        """Open ``root`` for a run of ``config``; refuse a directory that holds another config's run.

        Resuming means calling this again with the same config: the manifest matches and the existing
        rows stay.
        """
        root = Path(root)
        digest = config_hash(config)
        path = root / cls.MANIFEST
        if path.exists():
            store = cls.open(root)
            if store.manifest.get("config_hash") != digest:
                raise StoreError(
                    f"{root} holds a run of another config (hash {store.manifest.get('config_hash')}, "
                    f"this one is {digest}); use a new output directory or the same config to resume"
                )
            return store
        if root.exists() and any(p for p in root.iterdir() if not p.name.startswith((".", "_"))):
            raise StoreError(f"{root} is not empty and is not a raysmooth run directory")
        manifest = {
            "run_id": f"{time.strftime('%Y%m%d-%H%M%S')}-{digest[:8]}",
            "config_hash": digest,
            "config": config,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **extra,
        }
        root.mkdir(parents=True, exist_ok=True)
        staging = root / f"_staging-{uuid.uuid4().hex}.json.tmp"
        staging.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        os.replace(staging, path)
        return cls(root, manifest)

    @classmethod
    def open(cls, root: Path | str) -> "RunStore":
        root = Path(root)
        path = root / cls.MANIFEST
        if not root.is_dir():
            raise StoreError(f"{root}: no such run directory")
        if not path.is_file():
            raise StoreError(f"{root}: not a raysmooth run directory (no {cls.MANIFEST})")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise StoreError(f"{path}: damaged manifest ({exc})") from exc
        return cls(root, manifest)

    @property
    def run_id(self) -> str:
        return self.manifest["run_id"]

    # ---- counts -------------------------------------------------------------------------------
    def append_counts(self, records: Sequence[CountsRecord], *, model_id: str, seed: int, alpha: float) -> Path | None:
        """Commit finished (image, σ, phase) counts as one new file."""
        if not records:
            return None
        classes, counts = [], []
        for rec in records:
            if rec.phase not in PHASES:
                raise ValueError(f"phase must be one of {PHASES}, got {rec.phase!r}")
            nz = np.flatnonzero(rec.counts)
            classes.append(nz.astype(np.int32))
            counts.append(np.asarray(rec.counts)[nz].astype(np.int64))
        num = len(records)
        table = pa.table(
            {
                "run_id": [self.run_id] * num,
                "config_hash": [self.manifest["config_hash"]] * num,
                "model_id": [model_id] * num,
                "seed": pa.array([seed] * num, pa.int64()),
                "alpha": pa.array([alpha] * num, pa.float64()),
                "image_id": pa.array([r.image_id for r in records], pa.int64()),
                "label": pa.array([r.label for r in records], pa.int32()),
                "sigma": pa.array([r.sigma for r in records], pa.float64()),
                "phase": [r.phase for r in records],
                "n": pa.array([int(np.sum(r.counts)) for r in records], pa.int64()),
                "num_classes": pa.array([len(r.counts) for r in records], pa.int32()),
                "classes": pa.array(classes, pa.list_(pa.int32())),
                "counts": pa.array(counts, pa.list_(pa.int64())),
            },
            schema=COUNTS_SCHEMA,
        )
        return append_table(self.root / "counts", table)

    def read_counts(self) -> pa.Table:
        """The counts table with one row per (image, σ, phase): a key committed twice (a unit that ran
        again after a crash between commit and bookkeeping) is kept once."""
        table = read_table(self.root / "counts", COUNTS_SCHEMA)
        return dedupe(table, ("image_id", "sigma", "phase"))

    def completed_keys(self) -> set[tuple[int, float, str]]:
        table = read_table(self.root / "counts", COUNTS_SCHEMA).select(["image_id", "sigma", "phase"])
        cols = table.to_pydict()
        return set(zip(cols["image_id"], cols["sigma"], cols["phase"]))

    # ---- certificates -------------------------------------------------------------------------
    def append_certificates(self, table: pa.Table, subdir: str = "certificates") -> Path:
        return append_table(self.root / subdir, table.cast(CERTIFICATES_SCHEMA))

    def read_certificates(self, subdir: str = "certificates") -> pa.Table:
        return read_table(self.root / subdir, CERTIFICATES_SCHEMA)


def dedupe(table: pa.Table, keys: Iterable[str]) -> pa.Table:
    """First row of every distinct key, in the table's order."""
    keys = list(keys)
    if table.num_rows == 0:
        return table
    cols = [np.asarray(table.column(k).to_numpy(zero_copy_only=False)) for k in keys]
    # Encode each key column as integer codes, then find the first occurrence of each combination.
    codes = np.stack([np.unique(c, return_inverse=True)[1] for c in cols], axis=1)
    _, first = np.unique(codes, axis=0, return_index=True)
    if len(first) == table.num_rows:
        return table
    return table.take(np.sort(first))
