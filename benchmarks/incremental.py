"""A 1 %-changed night with --incremental against a full night, on the same bucket (issue 30).

Writes a bucket of ``--images`` small synthetic scenes (images + labels), runs the night once in
full (--incremental with no base yet: every image segmented), rewrites ``--changed`` of the images
(new bytes, new size, new mtime), then runs the night again with --incremental. Each night is the
real CLI in its own process with its own local Ray, sampled by benchmarks/harness.py: wall time
(Popen to exit), images segmented and carried (its manifest.json), and the driver's peak RSS (its
VmHWM; Ray's workers are other processes). One JSON result under benchmarks/results/.

    PYTHONPATH=. python benchmarks/incremental.py --images 2000 --changed 0.01
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness

NAME = "incremental"


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

    changed = paths[:: max(1, round(1 / share))]
    for i, path in enumerate(changed):
        image, _ = make_scene(10_000_000 + i, SceneSpec(height=height, width=width))
        path.write_bytes(encode_jpeg(image))
    return len(changed)


def night(bucket: Path, out: Path, run_id: str, count: int, extra: list[str]) -> dict:
    job = harness.run_cli(bucket / "images", out, run_id, count, "--labels", str(bucket / "labels"), *extra)
    manifest = job.manifest
    return {
        "run": run_id,
        "wall_s": round(job.run.seconds, 2),
        "segment_s": manifest["timings"]["segment_s"],
        "inputs": manifest["counts"]["inputs"],
        "segmented": manifest["counts"]["segmented"],
        "carried": manifest["counts"]["carried"],
        "incremental": manifest["incremental"],
        "driver_peak_rss_mib": job.run.summary()["peak_rss_mib"].get("driver"),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--changed", type=float, default=0.01, help="share of images rewritten before the second night")
    p.add_argument("--height", type=int, default=48)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--work", type=Path, help="folder for the bucket and runs (default: a temporary one)")
    p.add_argument("extra", nargs="*", help="more segment_bucket.py flags for both nights (after --)")
    harness.add_results_arg(p)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="incremental-bench-") as tmp:
        work = args.work or Path(tmp)
        bucket, out = work / "bucket", work / "out"
        paths = write_bucket(bucket, args.images, args.height, args.width)
        full = night(bucket, out, "full", args.images, ["--incremental", *args.extra])
        changed = change(paths, args.changed, args.height, args.width)
        incremental = night(bucket, out, "incremental", args.images, ["--incremental", *args.extra])
    result = {
        "images": args.images,
        "image_size": [args.height, args.width],
        "changed": changed,
        "full": full,
        "incremental": incremental,
        "wall_ratio": round(incremental["wall_s"] / full["wall_s"], 3),
        "rss_ratio": round(harness.ratio(incremental["driver_peak_rss_mib"], full["driver_peak_rss_mib"]) or 0, 3),
    }
    print(f"{'night':<12} {'wall s':>8} {'segment s':>10} {'segmented':>10} {'carried':>8} {'driver RSS MiB':>15}")
    for row in (full, incremental):
        print(
            f"{row['run']:<12} {row['wall_s']:>8.1f} {row['segment_s']:>10.1f} {row['segmented']:>10} "
            f"{row['carried']:>8} {row['driver_peak_rss_mib']:>15.0f}"
        )
    harness.save(NAME, args, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
