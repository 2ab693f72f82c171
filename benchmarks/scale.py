"""Driver scale: what the driver holds and spends as the bucket grows, through the CLIs only.

    python benchmarks/scale.py                          # 1k and 10k images
    python benchmarks/scale.py --sizes 100000 --skip compare
    python benchmarks/scale.py --sizes 16,32            # dry run

For each size N: N 64x64 JPEGs (256 distinct synthetic scenes, repeated), then, each a fresh
process sampled by the harness (the driver's peak RSS is its VmHWM; Ray's processes are not in it,
their PSS is the tree's), CRF off:

- run A: ``jobs/segment_bucket.py IMAGES --output OUT --no-crf``: listing, planning, progress,
  commit from the workers' part summaries; driver CPU seconds per image, images/s end to end and
  the manifest's (from the DAG's start to its last part).
- run B, ``--compare-previous``: the same, and the comparison with A inside the run.
- resume B, ``--resume --run-id B``: nothing left to do: listing + the anti-join with the parts'
  keys + the commit, what a restarted driver pays.
- compare: ``jobs/compare_runs.py OUT --run B --against A`` alone.

The marginal driver CPU per image between the smallest and the largest N says what grows with the
bucket. The commit and comparison at 10k-1M synthetic keys and the S3 listing (before/after "the
workers write") were measured once with the former scale.py; their figures are in docs/benchmarks.md.
Results: benchmarks/results/scale-<time>.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

NAME = "scale"
STEPS = ("run", "compare_previous", "resume", "compare")


def driver(summary: dict, images: int) -> dict:
    """The driver's figures of a step: peak RSS, CPU seconds (and per image), wall seconds, tree PSS."""
    cpu = summary["cpu_s"].get("driver", 0.0)
    return {
        "driver_peak_rss_mib": summary["peak_rss_mib"].get("driver"),
        "driver_cpu_s": cpu,
        "driver_cpu_ms_per_image": round(1000 * cpu / images, 3),
        "seconds": summary["seconds"],
        "tree_pss_mib": summary["tree_pss_mib"],
    }


def measure(n: int, tmp: Path, skip: set[str]) -> dict:
    images = harness.tiny_bucket(tmp / f"images-{n}", n, 64, "JPEG")
    out, flags, row = tmp / f"out-{n}", ["--no-crf"], {}
    harness.log(NAME, f"{n} images: run A")
    a = harness.run_cli(images, out, "a", n, *flags, pss=True)
    row["run"] = driver(a.summary(), n) | {
        "images_per_s": round(n / a.run.seconds, 2),
        "manifest_images_per_s": a.summary()["manifest_images_per_s"],
    }
    if "compare_previous" not in skip or "resume" not in skip or "compare" not in skip:
        harness.log(NAME, f"{n} images: run B --compare-previous")
        b = harness.run_cli(images, out, "b", n, *flags, "--compare-previous", pss=True)
        row["compare_previous"] = driver(b.summary(), n)
    if "resume" not in skip:
        harness.log(NAME, f"{n} images: resume B (nothing left)")
        cmd = [harness.PYTHON, "jobs/segment_bucket.py", str(images), "--output", str(out), "--run-id", "b"]
        row["resume"] = driver(harness.run([*cmd, *flags, "--resume"], pss=True).summary(), n)
    if "compare" not in skip:
        harness.log(NAME, f"{n} images: compare_runs.py B against A")
        cmd = [harness.PYTHON, "jobs/compare_runs.py", str(out), "--run", "b", "--against", "a"]
        row["compare"] = driver(harness.run(cmd, pss=True).summary(), n)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1000, 10000])
    parser.add_argument("--skip", type=lambda s: set(s.split(",")), default=set(), help=f"of {', '.join(STEPS[1:])}")
    harness.add_results_arg(parser)
    args = parser.parse_args()
    results: dict = {"sizes": {}}
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        for n in args.sizes:
            results["sizes"][n] = measure(n, Path(tmp), args.skip)
            harness.log(NAME, f"{n}: {results['sizes'][n]}")
    small, large = results["sizes"][args.sizes[0]]["run"], results["sizes"][args.sizes[-1]]["run"]
    if args.sizes[-1] > args.sizes[0]:
        extra = args.sizes[-1] - args.sizes[0]
        results["driver_cpu_ms_per_extra_image"] = 1000 * (large["driver_cpu_s"] - small["driver_cpu_s"]) / extra
        results["driver_rss_large_vs_small"] = harness.ratio(large["driver_peak_rss_mib"], small["driver_peak_rss_mib"])
    harness.save(NAME, args, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
