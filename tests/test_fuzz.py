"""Malformed input to `raysmooth analyze` and `raysmooth sweep`: every case ends in exit status 2 with
one line on stderr and no traceback (a traceback would escape `main` and fail the test)."""

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysmooth.certificates import counts_view, derive_certificates
from raysmooth.cli import main

from helpers import random_levels, write_run

GOOD_TSV = "idx\tlabel\tpredict\tradius\tcorrect\ttime\n" + "".join(
    f"{i}\t{i % 10}\t{i % 10 if i % 3 else -1}\t{0.1 * (i % 7):.3f}\t{int(i % 3 != 0)}\t0:00:01\n" for i in range(30)
)


def _tsv_cases(tmp: Path) -> list[tuple[str, Path]]:
    rng = np.random.default_rng(0)
    cases = []

    def add(name, data: bytes):
        path = tmp / f"{name}.tsv"
        path.write_bytes(data)
        cases.append((name, path))

    good = GOOD_TSV.encode()
    add("empty", b"")
    add("binary", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    add("header_only", good.splitlines(keepends=True)[0])
    add("commas", GOOD_TSV.replace("\t", ",").encode())
    add("utf16", GOOD_TSV.encode("utf-16"))
    add("gzip", gzip.compress(good))
    for cut in sorted(rng.choice(np.arange(1, 40), 4, replace=False)):  # inside the header
        add(f"truncated_at_{cut}", good[:cut])
    lines = GOOD_TSV.splitlines()
    for col, idx in (("label", 1), ("predict", 2), ("radius", 3), ("correct", 4)):
        for bad in ("nan", "", "abc", "inf", "-5", "1e400"):
            rows = [ln.split("\t") for ln in lines]
            rows[5][idx] = bad
            text = "\n".join("\t".join(r) for r in rows) + "\n"
            add(f"{col}_{bad or 'empty'}", text.encode())
    rows = [ln.split("\t") for ln in lines]
    add("ragged_row", ("\n".join("\t".join(r) for r in rows[:4]) + "\n1\t2\n").encode())
    return cases


def _run_dir_cases(tmp: Path) -> list[tuple[str, Path]]:
    rng = np.random.default_rng(1)
    cases = []

    def fresh(name):
        levels, _ = random_levels(rng, 12, [0.25, 0.5], 6)
        store = write_run(tmp / name, levels, np.zeros(12, int))
        store.append_certificates(derive_certificates(counts_view(store.read_counts()), alpha=0.001))
        cases.append((name, tmp / name))
        return tmp / name

    (fresh("manifest_missing") / "manifest.json").unlink()
    (fresh("manifest_garbage") / "manifest.json").write_bytes(os.urandom(64))
    (fresh("manifest_list") / "manifest.json").write_text("[1, 2, 3]")
    (fresh("manifest_empty") / "manifest.json").write_text("")
    (fresh("manifest_no_run_id") / "manifest.json").write_text(json.dumps({"config_hash": "x"}))
    for field, value in (("sigmas", "abc"), ("sigmas", [None]), ("noise", "x"), ("noise", {"margins": [1]})):
        d = fresh(f"manifest_{field}_{json.dumps(value)}")  # a hand-edited field the sweep reads
        manifest = json.loads((d / "manifest.json").read_text())
        (d / "manifest.json").write_text(json.dumps({**manifest, field: value}))
    for sub in ("counts", "certificates"):
        for cut in (16, 200, 1000):
            d = fresh(f"{sub}_truncated_{cut}")
            part = sorted((d / sub).glob("part-*.parquet"))[0]
            part.write_bytes(part.read_bytes()[:cut])
        d = fresh(f"{sub}_random_bytes")
        sorted((d / sub).glob("part-*.parquet"))[0].write_bytes(os.urandom(2048))
        d = fresh(f"{sub}_foreign_schema")
        for p in (d / sub).glob("part-*.parquet"):
            p.unlink()
        pq.write_table(pa.table({"a": [1, 2], "b": ["x", "y"]}), d / sub / "part-0-foreign.parquet")
    d = fresh("counts_empty")
    for p in (d / "counts").glob("part-*.parquet"):
        p.unlink()
    d = fresh("mixed_runs")
    other = write_run(tmp / "other", random_levels(rng, 12, [0.25, 0.5], 6)[0], np.zeros(12, int), config={"other": 1})
    for p in (other.root / "counts").glob("part-*.parquet"):
        (d / "counts" / ("part-9" + p.name[6:])).write_bytes(p.read_bytes())
    d = tmp / "is_a_file"
    d.write_text("not a folder")
    cases.append(("is_a_file", d))
    (tmp / "empty_folder").mkdir()
    cases.append(("empty_folder", tmp / "empty_folder"))
    return cases


def _expect_one_line(capsys, code) -> str:
    out = capsys.readouterr()
    assert code == 2, out.err
    assert out.err.count("\n") == 1 and "Traceback" not in out.err, out.err
    return out.err.strip()


def test_analyze_refuses_every_malformed_tsv_in_one_line(tmp_path, capsys):
    for name, path in _tsv_cases(tmp_path):
        line = _expect_one_line(capsys, main(["analyze", str(path)]))
        assert line.startswith("raysmooth analyze: error:"), (name, line)


def test_analyze_and_sweep_refuse_every_damaged_run_directory_in_one_line(tmp_path, capsys):
    for name, path in _run_dir_cases(tmp_path):
        analyze = main(["analyze", str(path)])
        if name in (
            "counts_truncated_16",
            "counts_truncated_200",
            "counts_truncated_1000",
            "counts_random_bytes",
            "counts_foreign_schema",
            "counts_empty",
            "mixed_runs",
        ) or name.startswith(("manifest_sigmas", "manifest_noise")):
            # analyze reads only the certificates, which are intact here; the counts are the sweep's business
            assert analyze == 0, name
            capsys.readouterr()
        else:
            _expect_one_line(capsys, analyze)
        if name in (
            "certificates_truncated_16",
            "certificates_truncated_200",
            "certificates_truncated_1000",
            "certificates_random_bytes",
            "certificates_foreign_schema",
        ):
            assert main(["sweep", str(path), "--p0", "0.5:0.7:0.1"]) == 0, name  # the sweep reads the counts only
            capsys.readouterr()
            continue
        line = _expect_one_line(capsys, main(["sweep", str(path), "--p0", "0.5:0.7:0.1"]))
        assert line.startswith("raysmooth sweep: error:"), (name, line)


@pytest.mark.parametrize(
    "args",
    [
        ["--p0", "nan"],
        ["--p0", "0.5:inf:0.1"],
        ["--alpha", "nan"],
        ["--alpha", "0"],
        ["--p0", "0.5:0.6:0"],
        ["--radii", "-1"],
        ["--radii", "a,b"],
        ["--policy", "strict", "--p0", "0.5:0.9:1e-9"],
    ],
)
def test_sweep_refuses_every_malformed_parameter_in_one_line(tmp_path, capsys, args):
    levels, _ = random_levels(np.random.default_rng(3), 6, [0.25, 0.5], 4)
    write_run(tmp_path / "run", levels, np.zeros(6, int))
    _expect_one_line(capsys, main(["sweep", str(tmp_path / "run"), *args]))
