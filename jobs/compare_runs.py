"""Compare two committed runs under OUTPUT_URI: per-class IoU and mIoU deltas, per-image mask
disagreement, keys added/removed, new error types (docs/uncertainty.md).

    python jobs/compare_runs.py s3://bucket/seg        # latest committed run vs the one before
    python jobs/compare_runs.py s3://bucket/seg --run B --against A --fail-on-regression 0.02

Runs on Ray Data (a local Ray unless --ray-address / $RAY_ADDRESS): writes comparison/*.parquet,
comparison_classes.parquet and comparison.json under the newer run.
Exit 0 when compared, 2 on bad arguments (no such committed run), 3 on a regression larger
than --fail-on-regression.
"""

import argparse
import sys
from pathlib import Path

# Runnable from a checkout (`ray job submit --working-dir .` style), like jobs/segment_bucket.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config.flags import json_object
from pipeline.dag.cluster import init_ray
from pipeline.dag.compare import compare_outputs
from pipeline.evaluation.compare_text import format_comparison, regression_message
from pipeline.io.credentials import public_text, public_uri, refused_options
from pipeline.outputs.run import RunOutput, committed_runs, run_before

PROG = "compare_runs.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", metavar="OUTPUT_URI", help="the job's --output: holds run=<id>/ folders")
    p.add_argument("--run", metavar="ID", help="the newer run (default: the latest committed run)")
    p.add_argument("--against", metavar="ID", help="the older run (default: the committed run before --run)")
    p.add_argument(
        "--fail-on-regression",
        type=float,
        metavar="DELTA",
        help="exit 3 when the mIoU or any class IoU dropped by more than DELTA (e.g. 0.02)",
    )
    p.add_argument(
        "--write",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write the comparison files under the newer run (--no-write: print only)",
    )
    p.add_argument("--ray-address", help="Ray cluster to run on (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument(
        "--storage-options",
        type=json_object,
        default={},
        metavar="JSON",
        help='fsspec storage options, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\'',
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.fail_on_regression is not None and args.fail_on_regression < 0:
        return _error(f"--fail-on-regression must be >= 0, got {args.fail_on_regression}")
    refused = refused_options(args.storage_options)
    if refused:  # the same allow-list as segment_bucket.py (docs/security.md); names only, never values
        return _error(
            f"--storage-options may only hold options known to carry no credentials; refused: {', '.join(refused)}. "
            "Take credentials from a mounted credentials file, IRSA / workload identity or the AWS_* environment"
        )
    shown = public_uri(args.output)  # never userinfo or a presigned query string in what is printed
    try:
        runs = committed_runs(args.output, args.storage_options)
    except Exception as exc:  # credentials, endpoint, missing bucket: one line, no traceback
        return _error(f"cannot list {shown}: {public_text(f'{type(exc).__name__}: {exc}', [args.output])}")
    new = args.run or (runs[-1] if runs else None)
    old = args.against or (run_before(runs, new) if new else None)
    for name, run_id in (("--run", new), ("--against", old)):
        if run_id is None:
            return _error(f"need two committed runs under {shown}, found {len(runs)}")
        if run_id not in runs:
            return _error(f"{name} {run_id}: no committed run=<id>/ (with _SUCCESS) under {shown}")
    if old == new:
        return _error(f"--run and --against are the same run ({new})")

    init_ray(args.ray_address)
    newer = RunOutput(args.output, new, args.storage_options)
    older = RunOutput(args.output, old, args.storage_options)
    comparison = compare_outputs(older, newer, write=args.write)
    print(format_comparison(comparison))
    if args.write:
        print(f"written          : {public_uri(newer.uri)}/comparison/, comparison_classes.parquet, comparison.json")
    if args.fail_on_regression is not None:
        reason = regression_message(comparison, args.fail_on_regression)
        if reason:
            print(f"{PROG}: {reason}", file=sys.stderr)
            return 3
    return 0


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
