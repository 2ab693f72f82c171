"""What the plan costs the driver as buckets grow: time and peak RSS, and Ray Data's scheduling cost per block.

Each size runs in a fresh process (its peak RSS is its own) against a fresh local Ray:
  keys    the listed keys as the job holds them (one Arrow column of S3-like keys)
  plan    keys_per_block + the keys' blocks put into Ray (pipeline.dag.stages._keys, what build_dataset starts from)
  pass    optionally, the keys through one trivial Ray Data task stage (one task per block, as the
          compute stages run them): wall seconds per block is the scheduling overhead the driver pays
Sizes given with --dry-run-files also list a local folder of that many tiny files with the real
``segment_bucket.py --dry-run`` and record its peak RSS (the child's ru_maxrss) and its plan.

    python benchmarks/plan_scale.py --keys 10000,1000000 --pass-upto 200000 --dry-run-files 200000
prints one JSON object and writes it to --out (docs/scale.md reads its figures).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_size(keys: int, batch_size: int, run_pass: bool) -> dict:
    """Runs in its own process: the plan's driver cost for ``keys`` keys."""
    import pyarrow as pa
    import ray

    from pipeline.cli import build_parser, config_from_args
    from pipeline.dag.stages import Resources, _keys, keys_per_block
    from pipeline.io.storage import Inputs

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    out = {"keys": keys, "batch_size": batch_size, "rss_start_mib": round(_rss_mib(), 1)}
    start = time.perf_counter()
    names = pa.array([f"images/2026/{i // 1000:05d}/{i:09d}.jpg" for i in range(keys)], pa.string())
    inputs = Inputs("s3://bucket/images", None, pa.chunked_array([names]))
    out["keys_s"] = round(time.perf_counter() - start, 3)
    out["keys_mib"] = round(inputs.keys.nbytes / 2**20, 1)
    parser = build_parser()  # the configuration as the CLI makes it
    argv = ["s3://bucket/images", "--output", "s3://bucket/out", "--run-id", "scale"]
    config = config_from_args(parser.parse_args(argv), parser)
    resources = Resources.resolve(config, {"CPU": 2.0})
    start = time.perf_counter()
    per_block = keys_per_block(keys, batch_size)
    ds = _keys(inputs, per_block, resources, True)
    out["plan_s"] = round(time.perf_counter() - start, 3)
    out["keys_per_block"] = per_block
    out["blocks"] = -(-keys // per_block)
    out["rss_after_plan_mib"] = round(_rss_mib(), 1)
    if run_pass:
        start = time.perf_counter()
        rows = 0
        # A task per block, as the compute stages run them; the function does nothing.
        for batch in ds.map_batches(lambda b: b, batch_size=batch_size, batch_format="pyarrow").iter_batches(
            batch_size=None, batch_format="pyarrow"
        ):
            rows += batch.num_rows
        seconds = time.perf_counter() - start
        assert rows == keys, (rows, keys)
        out["pass_s"] = round(seconds, 3)
        out["pass_ms_per_block"] = round(1000 * seconds / out["blocks"], 3)
        out["rss_after_pass_mib"] = round(_rss_mib(), 1)
    out["peak_rss_mib"] = round(_peak_mib(), 1)
    ray.shutdown()
    return out


def dry_run(files: int, batch_size: int, root: Path) -> dict:
    """``segment_bucket.py --dry-run`` on a local folder of ``files`` tiny files: its plan and peak RSS."""
    folder = root / f"bucket-{files}"
    if not (folder / "done").exists():
        for i in range(files):
            sub = folder / f"{i // 1000:04d}"
            if i % 1000 == 0:
                sub.mkdir(parents=True, exist_ok=True)
            (sub / f"{i:07d}.jpg").write_bytes(b"x")
        (folder / "done").write_text("")
    cmd = [sys.executable, str(REPO / "jobs" / "segment_bucket.py"), str(folder), "--output", str(root / "out")]
    cmd += ["--batch-size", str(batch_size), "--no-crf", "--dry-run"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    start = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {
        "files": files,
        "seconds": round(time.perf_counter() - start, 1),
        "driver_peak_rss_mib": round(peak / 1024, 1) if peak > before else None,
        "plan": json.loads(proc.stdout.strip().splitlines()[-1]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", default="10000,1000000", help="comma-separated key counts")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--pass-upto", type=int, default=200_000, help="run the Ray Data pass up to this many keys")
    p.add_argument("--dry-run-files", default="", help="comma-separated folder sizes for the real --dry-run")
    p.add_argument("--root", default="/tmp/plan-scale", help="where the tiny-file folders go")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "plan-scale.json"))
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one size, in this process
    p.add_argument("--run-pass", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one is not None:
        print(json.dumps(one_size(args.one, args.batch_size, args.run_pass)))
        return
    result = {"sizes": [], "dry_runs": []}
    # The dry runs first: RUSAGE_CHILDREN's peak is the largest of any child waited for so far.
    for files in (int(f) for f in args.dry_run_files.split(",") if f):
        result["dry_runs"].append(dry_run(files, args.batch_size, Path(args.root)))
        print(json.dumps(result["dry_runs"][-1]), flush=True)
    for keys in (int(k) for k in args.keys.split(",") if k):
        cmd = [sys.executable, __file__, "--one", str(keys), "--batch-size", str(args.batch_size)]
        if keys <= args.pass_upto:
            cmd.append("--run-pass")
        env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        result["sizes"].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(result["sizes"][-1]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
