"""The run store: append-only, crash-safe, resumable, and honest about what it holds."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from raysmooth.store import (
    COUNTS_SCHEMA,
    CountsRecord,
    RunStore,
    StoreError,
    append_table,
    config_differences,
    read_table,
)


def _records(image_ids, sigma=0.5, phase="estimation", num_classes=1000):
    out = []
    for i in image_ids:
        c = np.zeros(num_classes, dtype=np.int64)
        c[i % num_classes] = 90
        c[(i + 7) % num_classes] = 10
        out.append(CountsRecord(i, i % 10, sigma, phase, c))
    return out


def test_counts_round_trip_sparsely(tmp_path):
    store = RunStore.create(tmp_path / "run", {"a": 1})
    store.append_counts(_records(range(20)), model_id="m", seed=3, alpha=0.001)
    table = store.read_counts()
    assert table.num_rows == 20
    assert table.column("classes")[4].as_py() == [4, 11]  # only the nonzero classes are stored
    assert table.column("counts")[4].as_py() == [90, 10]
    assert set(table.column("n").to_pylist()) == {100}
    assert set(table.column("num_classes").to_pylist()) == {1000}
    assert table.column("seed")[0].as_py() == 3


def test_every_append_is_a_new_file_and_nothing_is_rewritten(tmp_path):
    store = RunStore.create(tmp_path / "run", {"a": 1})
    first = store.append_counts(_records(range(5)), model_id="m", seed=0, alpha=0.001)
    before = first.read_bytes()
    second = store.append_counts(_records(range(5, 10)), model_id="m", seed=0, alpha=0.001)
    assert first != second and first.read_bytes() == before
    assert store.read_counts().num_rows == 10


def test_a_half_written_staging_file_is_never_read(tmp_path):
    store = RunStore.create(tmp_path / "run", {"a": 1})
    store.append_counts(_records(range(5)), model_id="m", seed=0, alpha=0.001)
    # A crash in the middle of a write leaves a truncated staging file behind.
    good = next((tmp_path / "run" / "counts").glob("part-*.parquet")).read_bytes()
    (tmp_path / "run" / "counts" / "_staging-dead.parquet.tmp").write_bytes(good[: len(good) // 2])
    assert store.read_counts().num_rows == 5


def test_a_damaged_committed_file_is_an_error_not_silent_data_loss(tmp_path):
    d = tmp_path / "t"
    append_table(d, COUNTS_SCHEMA.empty_table())
    (d / "part-99999999999999999999-bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(StoreError, match="cannot be read"):
        read_table(d, COUNTS_SCHEMA)


def test_a_key_committed_twice_is_read_once(tmp_path):
    store = RunStore.create(tmp_path / "run", {"a": 1})
    store.append_counts(_records(range(5)), model_id="m", seed=0, alpha=0.001)
    store.append_counts(_records(range(3, 8)), model_id="m", seed=0, alpha=0.001)  # 3 and 4 again
    table = store.read_counts()
    assert sorted(table.column("image_id").to_pylist()) == list(range(8))
    assert store.completed_keys() >= {(3, 0.5, "estimation", 0), (7, 0.5, "estimation", 0)}


def test_resuming_with_the_same_config_keeps_the_rows(tmp_path):
    RunStore.create(tmp_path / "run", {"a": 1, "b": [1, 2]}).append_counts(
        _records(range(5)), model_id="m", seed=0, alpha=0.001
    )
    again = RunStore.create(tmp_path / "run", {"b": [1, 2], "a": 1})  # same config, other key order
    assert again.read_counts().num_rows == 5


def test_another_config_into_the_same_directory_is_refused(tmp_path):
    RunStore.create(tmp_path / "run", {"a": 1})
    with pytest.raises(StoreError, match="another config"):
        RunStore.create(tmp_path / "run", {"a": 2})


def test_a_refused_resume_names_the_keys_that_changed(tmp_path):
    stored = {"smoothing": {"n": 40, "sigmas": [0.25, 0.5], "seed": 0}, "precision": "fp32"}
    RunStore.create(tmp_path / "run", stored)
    changed = {"smoothing": {"n": 80, "sigmas": (0.25, 0.5), "seed": 0}, "precision": "fp32", "extra": 1}
    with pytest.raises(StoreError) as refused:
        RunStore.create(tmp_path / "run", changed)
    assert "(extra: '(unset)' there, 1 here; smoothing.n: 40 there, 80 here)" in str(refused.value)


def test_a_refused_resume_names_at_most_three_keys():
    stored = {k: 0 for k in "abcde"}
    assert config_differences(stored, {k: 1 for k in "abcde"}).endswith("c: 0 there, 1 here, and 2 more")


def test_a_foreign_non_empty_directory_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty"):
        RunStore.create(tmp_path, {"a": 1})


def test_the_manifest_records_the_config_and_its_hash(tmp_path):
    store = RunStore.create(tmp_path / "run", {"smoothing": {"alpha": 0.001}}, model_ids=["toy"])
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["config"] == {"smoothing": {"alpha": 0.001}}
    assert manifest["config_hash"] == store.manifest["config_hash"]
    assert manifest["model_ids"] == ["toy"]


def test_files_are_zstd_parquet_readable_without_raysmooth(tmp_path):
    store = RunStore.create(tmp_path / "run", {"a": 1})
    path = store.append_counts(_records(range(3)), model_id="m", seed=0, alpha=0.001)
    meta = pq.ParquetFile(path).metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"
    assert pq.read_table(path).num_rows == 3


def _many_parts(tmp_path, parts=20):
    store = RunStore.create(tmp_path / "run", {"a": 1})
    for p in range(parts):
        store.append_counts(_records(range(p * 5, p * 5 + 5)), model_id="m", seed=0, alpha=0.001)
    return store


def test_a_finished_run_is_compacted_into_one_file_with_the_same_rows(tmp_path):
    store = _many_parts(tmp_path)
    before = store.read_counts().sort_by("image_id")
    store.compact(above=4)
    files = list((tmp_path / "run" / "counts").glob("part-*.parquet"))
    assert len(files) == 1 and "-compact-" in files[0].name
    assert store.read_counts().sort_by("image_id").equals(before)


def test_a_run_of_many_files_says_what_its_last_silent_minute_does(tmp_path, caplog):
    """A 40-hour run ends by reading ~10,000 count files, certifying and compacting: a minute without a line."""
    import logging

    from raysmooth.runner import _say_finishing

    caplog.set_level(logging.INFO, logger="raysmooth")
    _say_finishing(_many_parts(tmp_path / "few", parts=3))
    assert "certifying from the stored counts" not in caplog.text  # a short run (the demo's) stays quiet
    _say_finishing(_many_parts(tmp_path / "many", parts=20))
    assert "certifying from the stored counts (20 files), then compacting them into one" in caplog.text


def test_a_run_resumed_on_another_kind_of_device_is_told_its_counts_mix_two_devices(tmp_path, caplog):
    import logging

    from raysmooth.runner import _note_other_devices

    caplog.set_level(logging.INFO, logger="raysmooth")
    store = RunStore.create(tmp_path / "run", {"a": 1}, engine={"devices": ["cpu"]})
    _note_other_devices(store, {"cpu"})
    _note_other_devices(RunStore.create(tmp_path / "new", {"a": 1}), {"cuda:0"})  # a new run: nothing to say
    assert "started on" not in caplog.text
    _note_other_devices(store, {"cuda:0", "cuda:1"})
    assert "this run started on cpu and goes on on cuda:0/cuda:1" in caplog.text and "mix two devices'" in caplog.text


def test_an_interrupted_compaction_loses_and_doubles_nothing(tmp_path):
    from raysmooth.store import COUNTS_SCHEMA, append_table, read_table

    store = _many_parts(tmp_path)
    counts = tmp_path / "run" / "counts"
    parts = sorted(counts.glob("part-*.parquet"))
    # A crash after the compacted file was written, before the parts it replaces were removed:
    append_table(
        counts, read_table(counts, COUNTS_SCHEMA), {"replaces": json.dumps([p.name for p in parts])}, tag="compact-"
    )
    raw = pq.read_table(counts)  # a reader that does not know about compaction sees both
    assert raw.num_rows == 2 * 100
    assert store.read_counts().num_rows == 100 and len(store.completed_keys()) == 100
    store.compact(above=0)  # the next compaction finishes the job
    assert len(list(counts.glob("part-*.parquet"))) == 1 and pq.read_table(counts).num_rows == 100


def test_a_reader_racing_the_runs_compaction_lists_again_instead_of_calling_a_part_damaged(tmp_path, monkeypatch):
    """`analyze` or `sweep` of a run as it ends: the parts it listed are compacted away before it reads them."""
    import raysmooth.store as store_module

    store = _many_parts(tmp_path)
    before = store.read_counts().sort_by("image_id")
    stale = store_module._live_parts(tmp_path / "run" / "counts")
    store.compact(above=0)  # the writer compacts between the reader's listing and its read
    real, listings = store_module._live_parts, []

    def listed_before_the_compaction(directory):
        listings.append(directory)
        return stale if len(listings) == 1 else real(directory)

    monkeypatch.setattr(store_module, "_live_parts", listed_before_the_compaction)
    assert store.read_counts().sort_by("image_id").equals(before)
    assert len(listings) == 2


def test_every_file_carries_its_runs_config_hash_and_the_schema_version(tmp_path):
    from raysmooth.store import SCHEMA_VERSION

    store = _many_parts(tmp_path, parts=2)
    for f in (tmp_path / "run" / "counts").glob("part-*.parquet"):
        meta = pq.read_schema(f).metadata
        assert meta[b"raysmooth.config_hash"].decode() == store.manifest["config_hash"]
        assert int(meta[b"raysmooth.schema_version"]) == SCHEMA_VERSION


def test_counts_written_before_rounds_existed_read_as_round_zero(tmp_path):
    import pyarrow as pa

    store = _many_parts(tmp_path, parts=1)
    old = pq.read_table(next((tmp_path / "run" / "counts").glob("part-*.parquet")))
    old = old.drop_columns(["round", "seq_continue"])
    for f in (tmp_path / "run" / "counts").glob("part-*.parquet"):
        f.unlink()
    pq.write_table(old, tmp_path / "run" / "counts" / "part-0-old.parquet")
    table = store.read_counts()
    assert table.num_rows == 5 and set(table.column("round").to_pylist()) == {0}
    assert isinstance(table.column("round").type, pa.DataType)
