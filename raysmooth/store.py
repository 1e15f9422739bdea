"""The run directory: a write-once manifest and append-only Parquet tables.

Layout (docs/storage.md)::

    RUN_DIR/manifest.json                resolved config, its hash, σ actually applied, seed (written once)
    RUN_DIR/.lock                        held by the run writing here (released when its process ends)
    RUN_DIR/counts/part-*.parquet        one row per (image, σ, phase, round) once all its chunks are in
    RUN_DIR/certificates/part-*.parquet  derived from counts; recomputable at any time
    RUN_DIR/sweeps/<id>/part-*.parquet   certificates of a threshold sweep

Every file is written under a name that readers skip (``_staging-…parquet.tmp``), fsynced, then renamed
into place, so a crash never leaves a half-written file that a reader takes for data, and nothing is
ever overwritten in place. A finished run is compacted into few files: the compacted file names the
parts it replaces in its own metadata, so a crash between writing it and removing them loses and
doubles nothing. Every file carries its run's config hash and the schema version in its metadata.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from .errors import RaySmoothError, naming
from .units import PHASES

log = logging.getLogger("raysmooth")

__all__ = [
    "COUNTS_SCHEMA",
    "CERTIFICATES_SCHEMA",
    "SCHEMA_VERSION",
    "CountsRecord",
    "RunStore",
    "StoreError",
    "append_table",
    "read_table",
    "compact_table",
    "config_hash",
    "config_differences",
]

SCHEMA_VERSION = 2  # 2: counts gain `round`; certificates gain p_lower, n_used and the sequential columns
COMPACT_ABOVE = 16  # a finished run whose table has more part files than this is compacted

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
        ("round", pa.int32()),  # 0: selection, full and cascade rows; 1..K: rounds of a sequential run
        ("n", pa.int64()),
        ("num_classes", pa.int32()),
        ("classes", pa.list_(pa.int32())),
        ("counts", pa.list_(pa.int64())),
        ("seq_continue", pa.bool_()),  # sequential runs: the rule's decision after this round (null otherwise)
    ]
)
COUNTS_KEY = ("image_id", "sigma", "phase", "round")

_LABEL = pa.dictionary(pa.int32(), pa.string())  # low-cardinality strings, stored once per file

CERTIFICATES_SCHEMA = pa.schema(
    [
        ("run_id", _LABEL),
        ("model_id", _LABEL),
        ("image_id", pa.int64()),
        ("label", pa.int32()),
        ("method", _LABEL),  # certify | predict | cascade | sequential
        ("sigma", pa.float64()),  # the σ of a single-σ method; NaN for the cascade
        ("policy", _LABEL),  # cascade policy; "" otherwise
        ("p0", pa.float64()),  # cascade threshold; NaN otherwise
        ("alpha", pa.float64()),
        ("prediction", pa.int64()),  # -1 = abstain
        ("abstain_reason", _LABEL),
        ("radius", pa.float64()),  # [0,1] pixel units
        ("correct", pa.bool_()),
        ("sigma_answered", pa.float64()),  # σ of the level that answered; NaN when abstaining
        ("p_lower", pa.float64()),  # the lower bound on p_A behind the answer (NaN: none, e.g. PREDICT)
        ("n_used", pa.int64()),  # samples drawn for this certificate (selection + estimation, all σ used)
        ("rounds", pa.int32()),  # sequential: rounds sampled (null otherwise)
        ("grid_radius", pa.float64()),  # sequential: largest decision-grid radius certified (null otherwise)
        ("stop_reason", _LABEL),  # sequential: certified_all | futile | cap | precision | n_max (null otherwise)
    ]
)
CERTIFICATE_KEY = ("image_id", "method", "sigma", "policy", "p0", "alpha")


class StoreError(RaySmoothError):
    """A run directory that cannot be used as asked (missing, foreign config, damaged, in use)."""


@dataclass(frozen=True)
class CountsRecord:
    """Finished counts of one (image, σ, phase, round): the unit of the counts table."""

    image_id: int
    label: int
    sigma: float
    phase: str
    counts: np.ndarray  # dense, length num_classes
    round: int = 0
    seq_continue: bool | None = None

    @property
    def key(self) -> tuple[int, float, str, int]:
        return (int(self.image_id), float(self.sigma), self.phase, int(self.round))


def config_hash(config: dict) -> str:
    """Stable short hash of a resolved config (key order does not matter)."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        return {k: v for key in value for k, v in _leaves(value[key], f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def config_differences(
    stored: Any,
    config: dict,
    limit: int = 3,
    names: Mapping[str, str] | None = None,
    absent: Mapping[str, Any] | None = None,
) -> str:
    """Which keys a stored run's config and ``config`` disagree on, as "key: A there, B here" (at most
    ``limit`` named), so a refused resume says what changed instead of two hashes. ``names``: the name a
    user sets a key by; ``absent``: the value a key left out of the config stands for (a default kept
    out so that older runs keep their identity), so the line says what to set to resume."""
    if not isinstance(stored, dict):
        return ""
    names, absent = names or {}, absent or {}
    here = _leaves(json.loads(json.dumps(config, default=str)))  # as the manifest stored it
    there = _leaves(stored)
    unset = "(unset)"

    def value(side: dict[str, Any], key: str) -> Any:
        return side[key] if key in side else absent.get(key, unset)

    keys = sorted(k for k in set(here) | set(there) if value(here, k) != value(there, k))
    parts = [f"{names.get(k, k)}: {value(there, k)!r} there, {value(here, k)!r} here" for k in keys[:limit]]
    more = f", and {len(keys) - limit} more" if len(keys) > limit else ""
    return "; ".join(parts) + more


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _staged(staging: Path, mode: str, target: Path) -> Iterator[IO]:
    """``staging`` opened for writing, flushed and fsynced on leaving. A failed write (a full disk) removes
    the half-written file at once, as it holds space a resume needs, and names ``target``: the OS error of
    a write into an open file names no file."""
    try:
        with open(staging, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        staging.unlink(missing_ok=True)
        if (named := naming(exc, target)) is not exc:
            raise named from exc
        raise


def replace_text(path: Path | str, text: str) -> None:
    """Write ``text`` beside ``path`` (a staging name readers skip), fsync, and rename it over ``path``:
    a crash leaves the old file or the new one, never half of one."""
    path = Path(path)
    staging = path.with_name(f"_staging-{path.name}.tmp")
    with _staged(staging, "w", path) as fh:
        fh.write(text)
    os.replace(staging, path)
    _fsync_dir(path.parent)


def _with_metadata(table: pa.Table, metadata: dict[str, str] | None) -> pa.Table:
    meta = dict(table.schema.metadata or {})
    meta[b"raysmooth.schema_version"] = str(SCHEMA_VERSION).encode()
    for k, v in (metadata or {}).items():
        meta[f"raysmooth.{k}".encode()] = str(v).encode()
    return table.replace_schema_metadata(meta)


def append_table(directory: Path | str, table: pa.Table, metadata: dict[str, str] | None = None, tag: str = "") -> Path:
    """Write ``table`` as a new immutable Parquet file in ``directory`` (staged, fsynced, renamed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    staging = directory / f"_staging-{token}.parquet.tmp"
    final = directory / f"part-{time.time_ns():020d}-{tag}{token[:12]}.parquet"
    with _staged(staging, "wb", directory) as fh:
        pq.write_table(_with_metadata(table, metadata), fh, compression="zstd", row_group_size=256 * 1024)
    os.replace(staging, final)
    _fsync_dir(directory)
    return final


READ_ATTEMPTS = 5


class _Vanished(Exception):
    """A file listed a moment ago is gone: the run writing here compacted its parts meanwhile."""


def _replaced(directory: Path, files: list[Path]) -> set[str]:
    """Names of the parts that compacted files say they replace."""
    replaced: set[str] = set()
    for f in files:
        if "-compact-" in f.name:
            try:
                meta = pq.read_schema(f).metadata or {}
            except (pa.ArrowInvalid, OSError) as exc:
                if not f.exists():  # compacted again since it was listed
                    raise _Vanished from exc
                raise _damaged(directory, f, exc) from exc
            replaced |= set(json.loads(meta.get(b"raysmooth.replaces", b"[]")))
    return replaced


def _live_parts(directory: Path) -> list[Path]:
    """Committed part files, minus those a compacted file says it replaces (still present only when a
    compaction was interrupted between writing the new file and removing the old ones)."""
    files = sorted(directory.glob("part-*.parquet"))
    replaced = _replaced(directory, files)
    return [f for f in files if f.name not in replaced]


def finish_compaction(directory: Path | str) -> int:
    """Remove the parts an interrupted compaction already replaced; returns how many."""
    directory = Path(directory)
    files = sorted(directory.glob("part-*.parquet")) if directory.is_dir() else []
    stale = [f for f in files if f.name in _replaced(directory, files)]
    for f in stale:
        f.unlink(missing_ok=True)
    return len(stale)


def _damaged(directory: Path, f: Path | None, exc: BaseException) -> StoreError:
    """A damaged committed file, named, with what to do: readers skip it once renamed, and the run
    re-creates its rows (counts are sampled again with the same noise; certificates re-derived)."""
    what = str(f) if f is not None else f"a committed Parquet file in {directory}"
    aside = f"rename it to {f.name}.bad" if f is not None else "rename it to end in .bad"
    rerun = "its rows are sampled again with the same noise" if directory.name == "counts" else "it is derived again"
    return StoreError(
        f"{what} cannot be read ({str(exc).splitlines()[0][:120]}); move it aside ({aside}) and run the same "
        f"command again: {rerun}"
    )


OPTIONAL_COLUMNS = {"round", "seq_continue", "p_lower", "n_used", "rounds", "grid_radius", "stop_reason"}


def _read_files(directory: Path, files: list[str], schema: pa.Schema, columns: Sequence[str] | None) -> pa.Table:
    try:
        return ds.dataset(files, format="parquet", schema=schema).to_table(columns=list(columns) if columns else None)
    except (pa.ArrowInvalid, OSError) as exc:
        if not all(Path(f).exists() for f in files):
            raise _Vanished from exc
        bad = None
        for f in files:  # name the file
            try:
                pq.read_metadata(f)
            except (pa.ArrowInvalid, OSError):
                bad = Path(f)
                break
        raise _damaged(directory, bad, exc) from exc


def read_table(directory: Path | str, schema: pa.Schema, columns: Sequence[str] | None = None) -> pa.Table:
    """All committed rows under ``directory`` (staging files are invisible); empty if none. Columns a
    file written by an older version lacks come back as nulls (the callers fill their defaults); a
    file without the others is not one of ours, and is named."""
    directory = Path(directory)
    empty = schema.empty_table() if columns is None else schema.empty_table().select(list(columns))
    if not directory.is_dir():
        return empty
    for attempt in range(READ_ATTEMPTS):
        try:
            files = [str(p) for p in _live_parts(directory)]
            if not files:
                return empty
            table = _read_files(directory, files, schema, columns)
            break
        except _Vanished:
            if attempt + 1 == READ_ATTEMPTS:
                raise StoreError(
                    f"{directory}: its files kept being replaced while read (a compaction by the run writing "
                    "there); read it again once that run has finished"
                ) from None
    required = [c for c in table.column_names if c not in OPTIONAL_COLUMNS and schema.field(c).nullable]
    if any(table.column(c).null_count for c in required):
        for f in files:  # only on this error path: which file lacks our columns?
            names = set(pq.read_schema(f).names)
            lacking = [c for c in required if c not in names]
            if lacking:
                raise _damaged(directory, Path(f), ValueError(f"not a raysmooth file: no column {lacking[0]}"))
        raise StoreError(f"{directory}: rows with empty {', '.join(required)} cells; the table is damaged")
    return table


def compact_table(
    directory: Path | str, schema: pa.Schema, metadata: dict[str, str] | None = None, above: int = COMPACT_ABOVE
) -> Path | None:
    """Rewrite the live parts of ``directory`` as one file when there are more than ``above``; the new
    file lists the parts it replaces, then they are removed. Safe to interrupt at any point."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    finish_compaction(directory)
    parts = _live_parts(directory)
    if len(parts) <= above or len(parts) < 2:
        return None
    table = read_table(directory, schema)
    meta = dict(metadata or {})
    meta["replaces"] = json.dumps([p.name for p in parts])
    new = append_table(directory, table, meta, tag="compact-")
    for p in parts:
        p.unlink(missing_ok=True)
    _fsync_dir(directory)
    return new


def _some(names: list[str], shown: int = 6) -> str:
    """A list for one line: the first few names, and how many in all when there are more."""
    return ", ".join(names[:shown]) + (f" … ({len(names)} in all)" if len(names) > shown else "")


class FolderLock:
    """An exclusive ``flock`` on FOLDER/.lock that says who holds it: the kernel releases it when the holding
    process ends, however it ends, so a crash never leaves the folder stuck. One writer per folder: two
    would interleave their parts, manifests or checkpoints."""

    NAME = ".lock"

    def __init__(self, folder: Path | str, what: str = "run"):
        self.folder, self.what = Path(folder), what
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        import fcntl

        fd = os.open(self.folder / self.NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)  # a file system without flock (some FUSE mounts): held by nobody, so not refused
                log.warning(
                    "%s: this file system cannot lock files (%s); run one %s in this folder at a time",
                    self.folder,
                    exc.strerror or exc,
                    self.what,
                )
                return self
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise StoreError(
                f"{self.folder} is in use by another {self.what} ({holder}); wait for it to finish or stop it "
                "(the lock goes with that process)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(
            fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0
        )
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            try:
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class RunStore:
    """One run directory. ``open`` an existing one to read it; ``for_run`` to write into it (locked).

    ``create`` is the one-call form (lock, manifest, done) that tests and small tools use.
    """

    MANIFEST = "manifest.json"
    LOCK = FolderLock.NAME

    def __init__(self, root: Path | str, manifest: dict | None, config: dict | None = None):
        self.root = Path(root)
        self.manifest = manifest
        self._config = config
        self._lock: FolderLock | None = None

    # ---- lifecycle ----------------------------------------------------------------------------
    @classmethod
    def for_run(
        cls,
        root: Path | str,
        config: dict,
        *,
        lock: bool = True,
        names: Mapping[str, str] | None = None,
        absent: Mapping[str, Any] | None = None,
        advice: Callable[[dict], str | None] | None = None,
    ) -> RunStore:
        """Take the run directory for a run of ``config``: lock it, refuse another config's run or a
        foreign folder, and clear staging files a crash left behind. A new run's manifest is written
        by ``commit_manifest`` once the run has really started. ``names`` and ``absent`` word a refusal
        in the caller's terms (``config_differences``); ``advice``, given the stored config, may say what
        to do instead of the refusal's usual advice."""
        root = Path(root)
        digest = config_hash(config)
        if root.exists() and not root.is_dir():
            raise StoreError(f"{root} is a file, not a run directory")
        root.mkdir(parents=True, exist_ok=True)
        store = cls(root, None, config)
        if lock:
            store._acquire()
        try:
            if (root / cls.MANIFEST).exists():
                store.manifest = cls.open(root).manifest
                if store.manifest.get("config_hash") != digest:
                    changed = config_differences(store.manifest.get("config"), config, names=names, absent=absent)
                    what = changed or f"hash {store.manifest.get('config_hash')}, this one {digest}"
                    stored = store.manifest.get("config")
                    instead = advice(stored) if advice and isinstance(stored, dict) else None
                    raise StoreError(
                        f"{root} holds a run of another config ({what}); "
                        + (instead or "use a new output directory, or the same config to resume")
                    )
            elif any(p for p in root.iterdir() if not p.name.startswith((".", "_"))):
                raise StoreError(f"{root} is not empty and is not a raysmooth run directory")
            if lock:
                store._clean_staging()
        except BaseException:
            store.release()
            raise
        return store

    @classmethod
    def create(cls, root: Path | str, config: dict, **extra: Any) -> RunStore:
        """Open ``root`` for a run of ``config`` and write its manifest if new (no lock kept)."""
        store = cls.for_run(root, config, lock=False)
        if store.manifest is None:
            store.commit_manifest(**extra)
        return store

    def commit_manifest(self, **extra: Any) -> dict:
        """Write the manifest of a new run (once); a resumed run keeps the one it has."""
        if self.manifest is not None:
            return self.manifest
        if self._config is None:
            raise StoreError(f"{self.root}: no config to write a manifest for")
        digest = config_hash(self._config)
        manifest = {
            "run_id": f"{time.strftime('%Y%m%d-%H%M%S')}-{digest[:8]}",
            "config_hash": digest,
            "config": self._config,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "schema_version": SCHEMA_VERSION,
            **extra,
        }
        replace_text(self.root / self.MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, default=str))
        self.manifest = manifest
        return manifest

    @classmethod
    def runs_below(cls, folder: Path) -> list[Path]:
        """The run directories in ``folder`` (an ``out`` of several models) or one level further down
        (``certify -m`` writes such a folder per value); hidden folders (hydra's records) are skipped."""
        folder, runs = Path(folder), []
        for d in sorted(folder.iterdir()) if folder.is_dir() else []:
            if not d.is_dir() or d.name.startswith("."):
                continue
            if (d / cls.MANIFEST).is_file():
                runs.append(d)
            else:
                runs += [r for r in sorted(d.iterdir()) if r.is_dir() and (r / cls.MANIFEST).is_file()]
        return runs

    @classmethod
    def missing_hint(cls, path: Path) -> str:
        """For a path that does not exist: the runs beside it, since a run is named for ``model.name``
        (dds), not for the config chosen with ``model=`` (toy_dds), which is what users type."""
        parent = Path(path).parent
        runs = [r.relative_to(parent).as_posix() for r in cls.runs_below(parent)]
        return f"; {parent} holds the runs {_some(runs)} (named for model.name)" if runs else ""

    @classmethod
    def open(cls, root: Path | str) -> RunStore:
        root = Path(root).expanduser()  # run_dir="~/runs/x", quoted so that no shell expanded it
        path = root / cls.MANIFEST
        if not root.is_dir():
            raise StoreError(f"{root}: no such run directory{cls.missing_hint(root)}")
        if not path.is_file():
            runs = [r.relative_to(root).as_posix() for r in cls.runs_below(root)]
            inside = next((p for p in root.parents if (p / cls.MANIFEST).is_file()), None)
            hint = ""
            if runs:
                hint = f"; it holds the runs {_some(runs)}: name one ({root / runs[0]})"
            elif inside:
                hint = f"; it is inside the run {inside}"
            raise StoreError(f"{root}: not a raysmooth run directory (no {cls.MANIFEST}){hint}")
        try:
            manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StoreError(f"{path}: damaged manifest ({exc})") from exc
        if not isinstance(manifest, dict) or "run_id" not in manifest or "config_hash" not in manifest:
            raise StoreError(f"{path}: not a raysmooth manifest (no run_id / config_hash)")
        return cls(root, manifest)

    # ---- the lock -----------------------------------------------------------------------------
    def _acquire(self) -> None:
        self._lock = FolderLock(self.root, "run").acquire()

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _clean_staging(self) -> None:
        """Remove the staging files of an interrupted write, and the parts an interrupted compaction
        already replaced (only the lock holder may)."""
        for sub in ("counts", "certificates"):
            for f in (self.root / sub).glob("_staging-*") if (self.root / sub).is_dir() else ():
                f.unlink(missing_ok=True)
            finish_compaction(self.root / sub)
        for f in self.root.glob("_staging-*.json.tmp"):
            f.unlink(missing_ok=True)

    # ---- identity -------------------------------------------------------------------------------
    def _require_manifest(self) -> dict:
        if self.manifest is None:
            raise StoreError(f"{self.root}: the run has no manifest yet")
        return self.manifest

    @property
    def run_id(self) -> str:
        return self._require_manifest()["run_id"]

    @property
    def manifest_path(self) -> Path:
        return self.root / self.MANIFEST

    def _file_metadata(self, table: str) -> dict[str, str]:
        m = self._require_manifest()
        return {"config_hash": m["config_hash"], "run_id": m["run_id"], "table": table}

    # ---- counts -------------------------------------------------------------------------------
    def append_counts(self, records: Sequence[CountsRecord], *, model_id: str, seed: int, alpha: float) -> Path | None:
        """Commit finished (image, σ, phase, round) counts as one new file."""
        if not records:
            return None
        manifest = self._require_manifest()
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
                "run_id": [manifest["run_id"]] * num,
                "config_hash": [manifest["config_hash"]] * num,
                "model_id": [model_id] * num,
                "seed": pa.array([seed] * num, pa.int64()),
                "alpha": pa.array([alpha] * num, pa.float64()),
                "image_id": pa.array([r.image_id for r in records], pa.int64()),
                "label": pa.array([r.label for r in records], pa.int32()),
                "sigma": pa.array([r.sigma for r in records], pa.float64()),
                "phase": [r.phase for r in records],
                "round": pa.array([r.round for r in records], pa.int32()),
                "n": pa.array([int(np.sum(r.counts)) for r in records], pa.int64()),
                "num_classes": pa.array([len(r.counts) for r in records], pa.int32()),
                "classes": pa.array(classes, pa.list_(pa.int32())),
                "counts": pa.array(counts, pa.list_(pa.int64())),
                "seq_continue": pa.array([r.seq_continue for r in records], pa.bool_()),
            },
            schema=COUNTS_SCHEMA,
        )
        return append_table(self.root / "counts", table, self._file_metadata("counts"))

    def read_counts(self) -> pa.Table:
        """The counts table with one row per (image, σ, phase, round): a key committed twice (a unit
        that ran again after a crash between commit and bookkeeping) is kept once."""
        table = _fill_round(read_table(self.root / "counts", COUNTS_SCHEMA))
        self._check_one_run(table)
        return dedupe(table, COUNTS_KEY)

    def _check_one_run(self, table: pa.Table) -> None:
        """Every row belongs to this directory's run: a part file copied in from another run is named."""
        if not table.num_rows:
            return
        ids = table.column("run_id").unique().to_pylist()
        mine = (self.manifest or {}).get("run_id", ids[0])
        if ids == [mine]:
            return
        for f in _live_parts(self.root / "counts"):
            theirs = set(pq.read_table(f, columns=["run_id"]).column("run_id").unique().to_pylist())
            if theirs != {mine}:
                raise StoreError(
                    f"{f} holds counts of another run ({', '.join(sorted(map(str, theirs - {mine})))}, "
                    f"this directory's run is {mine}); move it out of {self.root / 'counts'}"
                )
        raise StoreError(f"{self.root / 'counts'} mixes the counts of several runs: {ids[:4]}")

    def completed_keys(self) -> set[tuple[int, float, str, int]]:
        table = _fill_round(read_table(self.root / "counts", COUNTS_SCHEMA, columns=COUNTS_KEY))
        cols = table.to_pydict()
        return set(zip(cols["image_id"], cols["sigma"], cols["phase"], cols["round"]))

    # ---- certificates -------------------------------------------------------------------------
    def append_certificates(self, table: pa.Table, subdir: str = "certificates") -> Path:
        meta = self._file_metadata("certificates") if self.manifest is not None else None
        return append_table(self.root / subdir, conform_certificates(table), meta)

    def read_certificates(self, subdir: str = "certificates") -> pa.Table:
        return read_table(self.root / subdir, CERTIFICATES_SCHEMA)

    # ---- compaction ---------------------------------------------------------------------------
    def live_parts(self, table: str = "counts") -> int:
        """How many committed part files ``table`` reads (what a resume and the certificates read)."""
        return len(_live_parts(self.root / table)) if (self.root / table).is_dir() else 0

    def compact(self, above: int = COMPACT_ABOVE) -> list[Path]:
        """Compact the counts and certificates of a finished run (few files read fast on resume)."""
        done = []
        for sub, schema in (("counts", COUNTS_SCHEMA), ("certificates", CERTIFICATES_SCHEMA)):
            new = compact_table(self.root / sub, schema, self._file_metadata(sub), above=above)
            if new is not None:
                done.append(new)
        return done


def conform_certificates(table: pa.Table) -> pa.Table:
    """A certificates table in the current schema: columns it lacks (older writers) become nulls."""
    cols = []
    for f in CERTIFICATES_SCHEMA:
        if f.name in table.column_names:
            cols.append(table.column(f.name).cast(f.type))
        else:
            cols.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=CERTIFICATES_SCHEMA)


def _fill_round(table: pa.Table) -> pa.Table:
    """Counts written before rounds existed read as round 0."""
    if table.num_rows and table.column("round").null_count:
        import pyarrow.compute as pc

        i = table.schema.get_field_index("round")
        table = table.set_column(i, "round", pc.fill_null(table.column("round"), 0))
    return table


def dedupe(table: pa.Table, keys: Iterable[str]) -> pa.Table:
    """First row of every distinct key, in the table's order."""
    keys = list(keys)
    if table.num_rows == 0:
        return table
    cols = [np.asarray(table.column(k).to_numpy(zero_copy_only=False)) for k in keys]
    # Encode each key column as integer codes, then find the first occurrence of each combination.
    codes = np.stack([np.unique(c, return_inverse=True)[1].reshape(-1) for c in cols], axis=1)
    _, first = np.unique(codes, axis=0, return_index=True)
    if len(first) == table.num_rows:
        return table
    return table.take(np.sort(first))
