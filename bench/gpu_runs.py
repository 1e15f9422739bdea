"""Keep each GPU benchmark run in bench/results/gpu.json, numbered, with the commit it measured.

    python bench/gpu_runs.py add RESULT.json [--into bench/results/gpu.json] [--commit REV]

``bench/gpu.sh`` on a device machine writes one run (``gpu.json`` with ``rows``); this appends it to
the kept file as the next ``runs`` entry (run number, commit, time, device, sections, rows, skipped
sections, errors), so numbers from different machines and commits never mix in one table. The kept
file is rewritten through a temporary file and a rename: a crash leaves the old one whole.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN_KEYS = (
    "when",
    "elapsed_s",
    "device",
    "device_memory_gb",
    "torch",
    "sections",
    "rows",
    "compiles",
    "skipped",
    "errors",
    "in_progress",
)


def runs_of(data: dict) -> list[dict]:
    """The runs in a gpu.json: the kept file's ``runs``, or a single fresh result as run "new"."""
    if "runs" in data:
        return list(data["runs"])
    if "rows" in data:
        return [{"run": "new", **{k: data[k] for k in RUN_KEYS if k in data}}]
    return []


def append_run(result: dict, kept: dict, commit: str) -> dict:
    """``kept`` with ``result`` appended as its next run."""
    if "rows" not in result or "runs" in result:
        raise ValueError("not a single run of bench/gpu.py (it has no 'rows', or already holds 'runs')")
    runs = list(kept.get("runs", []))
    numbers = [r["run"] for r in runs if isinstance(r.get("run"), int)]
    run = {"run": max(numbers, default=0) + 1, "commit": commit, **{k: result[k] for k in RUN_KEYS if k in result}}
    header = {k: v for k, v in kept.items() if k != "runs"}
    if not header:
        header = {k: result[k] for k in ("benchmark", "peak_bf16_tflops", "peak_source") if k in result}
    return {**header, "runs": runs + [run]}


def write_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="append a run written by bench/gpu.py")
    add.add_argument("result", type=Path)
    add.add_argument("--into", type=Path, default=ROOT / "bench" / "results" / "gpu.json")
    add.add_argument("--commit", default="HEAD", help="the commit the run measured (default: this checkout's)")
    args = parser.parse_args()
    try:
        result = json.loads(args.result.read_text())
        kept = json.loads(args.into.read_text()) if args.into.exists() else {}
    except (OSError, json.JSONDecodeError) as exc:
        sys.exit(f"gpu_runs: cannot read {exc.filename if isinstance(exc, OSError) else 'a file'}: {exc}")
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", args.commit], capture_output=True, text=True
    ).stdout.strip()
    if not commit:
        sys.exit(f"gpu_runs: {args.commit!r} is not a commit of this checkout")
    try:
        merged = append_run(result, kept, commit)
    except ValueError as exc:
        sys.exit(f"gpu_runs: {args.result}: {exc}")
    write_atomic(args.into, merged)
    print(f"{args.into}: run {merged['runs'][-1]['run']} ({commit}, {len(result['rows'])} rows)")


if __name__ == "__main__":
    main()
