"""The results store at cluster scale: a simulated full-ImageNet run (50,000 images × 3 σ × 2 phases,
1,000 classes, counts synthesised, no model) written as a 40-hour run flushes it, in about 10,000
small Parquet files; then read back as a resumed run reads it, compacted, and read back again.

Goal (issue 13): resume-read of the compacted run under 5 s.

    python bench/store.py [--images 50000] [--files 10000] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sweep import synthetic_counts_table  # noqa: E402

from raysmooth.certificates import counts_view  # noqa: E402
from raysmooth.store import RunStore, append_table, replace_text  # noqa: E402


def resume_read(root: Path) -> dict:
    """What a resumed run reads: the keys of the stored rows, then the counts for its certificates."""
    t0 = time.perf_counter()
    store = RunStore.open(root)
    keys = store.completed_keys()
    t1 = time.perf_counter()
    view = counts_view(store.read_counts())
    t2 = time.perf_counter()
    return {
        "keys_s": round(t1 - t0, 3),
        "counts_and_align_s": round(t2 - t1, 3),
        "total_s": round(t2 - t0, 3),
        "rows": len(keys),
        "images": len(view.image_ids),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    result: dict = {
        "benchmark": "results store at cluster scale",
        "images": args.images,
        "sigmas": [0.25, 0.5, 1.0],
        "classes": 1000,
        "files_before": args.files,
    }
    with tempfile.TemporaryDirectory() as tmp:
        run = RunStore.create(Path(tmp) / "run", {"bench": "store", "images": args.images})
        tables = synthetic_counts_table(rng, run, args.images, (0.25, 0.5, 1.0), 1000, 100, 10_000)
        rows = sum(t.num_rows for t in tables)
        per_file = max(1, rows // args.files)
        t0 = time.perf_counter()
        written = 0
        for table in tables:
            for start in range(0, table.num_rows, per_file):
                append_table(
                    run.root / "counts", table.slice(start, per_file), {"config_hash": run.manifest["config_hash"]}
                )
                written += 1
        result["write_s"] = round(time.perf_counter() - t0, 1)
        result["files_written"] = written
        result["rows"] = rows
        result["resume_read_before_compaction"] = resume_read(run.root)
        t0 = time.perf_counter()
        run.compact()
        result["compact_s"] = round(time.perf_counter() - t0, 1)
        files = list((run.root / "counts").glob("part-*.parquet"))
        result["files_after"] = len(files)
        result["bytes_after"] = sum(f.stat().st_size for f in files)
        result["resume_read_after_compaction"] = resume_read(run.root)
    result["goal_resume_read_after_compaction_s"] = 5.0
    result.update(
        machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
        cores=2,
        python=sys.version.split()[0],
        when=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    replace_text(args.out / "store.json", json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
