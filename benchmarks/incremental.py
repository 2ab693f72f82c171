"""A 1 %-changed night with --incremental against a full night, on the same bucket.

Writes a bucket of N small synthetic scenes (images + labels), runs the job once in full (no base:
every image segmented), rewrites ``--changed`` of the images (new bytes, new mtime), then runs the
night again with --incremental. Each run is the real CLI in its own process with its own local Ray;
the driver's peak RSS is that process's own ``ru_maxrss`` (Ray's workers are other processes).
Prints a table and writes JSON (``--json``).

    PYTHONPATH=. python benchmarks/incremental.py --images 2000 --changed 0.01
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import bench_lock  # noqa: E402

# The driver as segment_bucket.py runs it, reporting its own peak RSS when it ends.
_DRIVER = """
import json, resource, sys
from pipeline.cli import main
try:
    code = main(sys.argv[2:])
finally:
    with open(sys.argv[1], "w") as f:
        json.dump({"driver_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, f)
sys.exit(code)
"""


def write_bucket(root: Path, n: int, height: int, width: int) -> list[Path]:
    from pipeline.demo.synthetic import SceneSpec, encode_jpeg, make_scene
    from pipeline.io.palette import mask_to_png

    spec = SceneSpec(height=height, width=width)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir(parents=True)
    paths = []
    for seed in range(n):
        image, label = make_scene(seed, spec)
        paths.append(root / "images" / f"scene_{seed:06d}.jpg")
        paths[-1].write_bytes(encode_jpeg(image))
        (root / "labels" / f"scene_{seed:06d}.png").write_bytes(mask_to_png(label))
    return paths


def change(paths: list[Path], share: float, height: int, width: int) -> int:
    """Rewrite every (1/share)-th image with another scene: new bytes, new size, new mtime."""
    from pipeline.demo.synthetic import SceneSpec, encode_jpeg, make_scene

    step = max(1, round(1 / share))
    changed = paths[::step]
    for i, path in enumerate(changed):
        image, _ = make_scene(10_000_000 + i, SceneSpec(height=height, width=width))
        path.write_bytes(encode_jpeg(image))
    return len(changed)


def night(bucket: Path, out: Path, run_id: str, extra: list[str], work: Path) -> dict:
    rss = work / f"{run_id}.rss.json"
    args = [str(bucket / "images"), "--labels", str(bucket / "labels"), "--output", str(out), "--run-id", run_id]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    env.pop("RAY_ADDRESS", None)
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(rss), *args, *extra], env=env, capture_output=True, text=True, cwd=REPO
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{run_id} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    manifest = json.loads((out / f"run={run_id}" / "manifest.json").read_text())
    return {
        "run": run_id,
        "wall_s": round(wall, 2),
        "segment_s": manifest["timings"]["segment_s"],
        "inputs": manifest["counts"]["inputs"],
        "segmented": manifest["counts"]["segmented"],
        "carried": manifest["counts"]["carried"],
        "incremental": manifest["incremental"],
        **json.loads(rss.read_text()),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--changed", type=float, default=0.01, help="share of images rewritten before the second night")
    p.add_argument("--height", type=int, default=48)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "incremental.json")
    p.add_argument("--work", type=Path, help="folder for the bucket and runs (default: a temporary one)")
    p.add_argument("extra", nargs="*", help="more segment_bucket.py flags for both nights (after --)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="incremental-bench-") as tmp:
        work = args.work or Path(tmp)
        bucket, out = work / "bucket", work / "out"
        paths = write_bucket(bucket, args.images, args.height, args.width)
        with bench_lock():
            full = night(bucket, out, "full", ["--incremental", *args.extra], work)
            changed = change(paths, args.changed, args.height, args.width)
            incremental = night(bucket, out, "incremental", ["--incremental", *args.extra], work)
    result = {
        "images": args.images,
        "image_size": [args.height, args.width],
        "changed": changed,
        "machine": f"{os.cpu_count()} cores",
        "full": full,
        "incremental": incremental,
        "wall_ratio": round(incremental["wall_s"] / full["wall_s"], 3),
        "rss_ratio": round(incremental["driver_peak_rss_mib"] / full["driver_peak_rss_mib"], 3),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'night':<12} {'wall s':>8} {'segment s':>10} {'segmented':>10} {'carried':>8} {'driver RSS MiB':>15}")
    for row in (full, incremental):
        print(
            f"{row['run']:<12} {row['wall_s']:>8.1f} {row['segment_s']:>10.1f} {row['segmented']:>10} "
            f"{row['carried']:>8} {row['driver_peak_rss_mib']:>15.0f}"
        )
    print(f"incremental / full: wall {result['wall_ratio']}, driver RSS {result['rss_ratio']}  ({args.json})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
