"""The whole job, CRF on, with each CRF plan: images/s end to end and in steady state, and mask agreement.

    python benchmarks/crf_backends_job.py [--images 600] [--timeout 150] [--table-out t.md] [--allow-cpu]

Runs the real CLI (jobs/segment_bucket.py, its own local Ray each time) on a synthetic bucket
(pipeline.synthetic.write_bucket: 160-320 x 200-400 scenes, demo model, scale 1.0, DeepLab v2 CRF):
  --crf-backend torch       on a GPU machine: GPU inference with the torch CRF fused into the GPU actor
  --crf-backend pydensecrf  on a GPU machine: GPU inference, then the CPU CRF pool (one actor per free core)
End to end = command start to exit; segment = the manifest's images/s (Ray start to the last part file);
steady = images in part files after the first one, over the time between the first and the last part file.
Without CUDA it refuses to run unless --allow-cpu (then both plans are the CPU plan: a check of this script).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.synthetic import write_bucket  # noqa: E402

BACKENDS = ("torch", "pydensecrf")
ROWS_PER_FILE = 16  # a part file per Ray batch: often enough to time the steady state from their mtimes
MIN_PARTS = 6  # fewer part files than this make the steady state a guess: reported as n/a


def run_job(bucket: Path, out: Path, backend: str, timeout: float) -> dict:
    flags = {"--labels": bucket / "labels", "--output": out, "--run-id": backend, "--crf-backend": backend}
    flags["--rows-per-file"] = ROWS_PER_FILE
    cmd = [sys.executable, str(REPO / "jobs" / "segment_bucket.py"), str(bucket / "images")]
    cmd += [str(part) for item in flags.items() for part in item]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    start = time.time()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"backend": backend, "failed": f"timed out after {timeout:.0f} s"}
    seconds = time.time() - start
    if proc.returncode != 0:
        return {"backend": backend, "failed": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    run_dir = out / f"run={backend}"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    parts = sorted((p.stat().st_mtime, pq.read_metadata(p).num_rows) for p in (run_dir / "masks").glob("*.parquet"))
    span = parts[-1][0] - parts[0][0]
    steady = sum(n for _, n in parts[1:]) / span if len(parts) >= MIN_PARTS and span > 0 else None
    images = manifest["counts"]["images"]
    return {
        "backend": backend,
        "images": images,
        "errors": manifest["counts"]["errors"],
        "e2e_s": seconds,
        "e2e_rate": images / seconds,
        "segment_rate": manifest["timings"]["images_per_s"],
        "steady": steady,
        "miou": manifest["metrics"]["miou"],
        "resources": manifest["resources"],
        "run_dir": run_dir,
    }


def plan(resources: dict) -> str:
    where = "GPU" if resources["use_gpu"] else "CPU"
    lo, hi = resources["infer_actors"]
    crf = (
        f"{resources['crf_backend']} fused"
        if resources["crf_fused"]
        else f"{resources['crf_backend']} pool {resources['crf_actors'][0]}-{resources['crf_actors'][1]}"
    )
    return f"{lo}-{hi} {where} inference actor(s), CRF {crf}"


def agreement(a: Path, b: Path) -> float:
    """Share of identical mask pixels between two runs over the same keys."""

    def masks(run_dir):
        return {r["key"]: r["mask"] for r in pq.read_table(run_dir / "masks", columns=["key", "mask"]).to_pylist()}

    ma, mb = masks(a), masks(b)
    same = total = 0
    for key in ma.keys() & mb.keys():
        x, y = (np.array(Image.open(io.BytesIO(m))) for m in (ma[key], mb[key]))
        same, total = same + int((x == y).sum()), total + x.size
    return same / total if total else float("nan")


def _compare(work: Path, timeout: float, emit) -> list[dict]:
    """Both backends' job runs, a table row each, then their ratio; returns the runs that finished."""
    results = []
    for backend in BACKENDS:
        r = run_job(work / "bucket", work / "out", backend, timeout)
        results.append(r)
        if "failed" in r:
            emit(f"| {backend} | FAILED: {r['failed']} | | | | | | |")
            continue
        steady = f"{r['steady']:.2f}" if r["steady"] else "n/a"
        emit(
            f"| {backend} | {plan(r['resources'])} | {r['images']} | {r['e2e_s']:.1f} | {r['e2e_rate']:.2f} | "
            f"{r['segment_rate']:.2f} | {steady} | {r['miou']:.4f} |"
        )
    ok = [r for r in results if "failed" not in r]
    if len(ok) == 2:
        fused, pool = ok
        ratio = f"{fused['steady'] / pool['steady']:.2f}" if fused["steady"] and pool["steady"] else "n/a"
        emit()
        emit(
            f"torch / pydensecrf images/s: end to end {fused['e2e_rate'] / pool['e2e_rate']:.2f}, steady {ratio}; "
            f"identical mask pixels {agreement(fused['run_dir'], pool['run_dir']):.6f}"
        )
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds per job run")
    parser.add_argument("--table-out", type=Path)
    parser.add_argument("--allow-cpu", action="store_true", help="run without CUDA (checks the script only)")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print(
            "CUDA is not available: the job-level CRF comparison needs a GPU (--allow-cpu to check the script)",
            file=sys.stderr,
        )
        return 1
    work = Path(tempfile.mkdtemp(prefix="crf_backends_job."))
    lines: list[str] = []

    def emit(line: str = "") -> None:  # row by row: a run cut short by the caller's timeout keeps the rows before it
        print(line, flush=True)
        lines.append(line)

    try:
        write_bucket(work / "bucket", range(3_000_000, 3_000_000 + args.images))
        device = f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
        emit(f"Whole job, CRF on, {args.images} synthetic scenes, demo model, {device}, {os.cpu_count()} CPUs")
        emit()
        emit("| --crf-backend | plan | images | e2e s | images/s e2e | images/s segment | images/s steady | mIoU |")
        emit("|---|---|---|---|---|---|---|---|")
        ok = _compare(work, args.timeout, emit)
        return 0 if len(ok) == 2 else 1
    finally:
        if args.table_out:
            args.table_out.write_text("\n".join(lines) + "\n")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
