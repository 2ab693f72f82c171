"""Driver scale, before and after "the driver coordinates": one table per part, both codes side by side.

    .venv/bin/python benchmarks/scale.py                       # 10k/100k/1M keys, S3 10k/100k, e2e 1k/10k
    .venv/bin/python benchmarks/scale.py --sizes 2000 --list-sizes 2000 --e2e-sizes 200   # quick check
    .venv/bin/python benchmarks/scale.py --skip-before --skip-e2e --keep

"Before" is the code of the previous commit, checked out at ``--old-tree`` (default /work/wt-old);
"after" is this working tree. Every measured step runs in a fresh subprocess with
``PYTHONPATH=<tree>`` and ``cwd=<tree>`` (the cwd matters: the venv's editable install would
otherwise map ``pipeline`` to this tree), under ``flock /tmp/bench.lock``, and reports its driver's
peak RSS (``VmHWM``: that process only, never its Ray children), the step's CPU seconds
(user + sys of that process) and wall seconds. The parent also samples the whole process tree's PSS
for the steps that start Ray, and kills a step past ``--rss-limit-gb`` or ``--timeout-min``.

1. ``commit`` (commit + report) and ``compare`` over synthetic committed runs of N keys: part files
   of 1000 rows with MASKS_SCHEMA's columns (64x64 mask PNGs drawn from 256 pre-encoded scenes,
   6 classes, CRF columns filled as with the default CRF on, 10% unlabelled rows, 2 error rows in
   every 50th part). The second run of a size has 5% of its masks changed. The ``PartStats`` the
   write workers would have returned are computed while generating and kept in a side file; the
   after-commit step sums them as the driver does (``PartStats.from_json`` and ``+``).
   before: ``RunOutput.commit(categories, manifest)`` / ``compare_runs(load_run(a), load_run(b))`` +
   ``write_comparison``; after: ``RunOutput.commit(stats, ...)`` / ``compare_outputs`` on a 2-CPU
   local Ray (``ray.init`` is not timed, its seconds are printed).
2. ``list + resume`` against a moto S3 server on loopback: N tiny objects, and a run on S3 holding
   part files (full MASKS_SCHEMA) for the first half of the keys. before: ``list_inputs`` +
   ``done_keys`` + the old job's list comprehension; after: ``list_inputs(...).without(earlier.keys)``.
3. ``end to end``: the CLI (``jobs/segment_bucket.py IMAGES --labels LABELS --output OUT --no-crf``)
   over N 64x64 JPEGs (256 distinct ``pipeline.synthetic`` scenes). The CLI process is the measured
   driver; its whole-life CPU and RSS are reported, images/s from manifest.json.

Tables go to stdout and to docs/benchmarks.md (section "Scale: the driver coordinates"), the raw
numbers to WORK/results.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # also as a child step: its cwd is the measured tree
from common import write_section  # noqa: E402
from scale_parts import OLD_TREE, SECTION, SIDES  # noqa: E402
from scale_parts.parts import part_e2e, part_listing, part_runs  # noqa: E402
from scale_parts.report import render  # noqa: E402
from scale_parts.runner import Result, Runner  # noqa: E402
from scale_parts.steps import child_main  # noqa: E402
from scale_parts.synthetic import Pool  # noqa: E402


def merge(args) -> int:
    """One section from several runs of this script (e.g. the driver-side parts and the end-to-end part)."""
    groups: dict[str, list[dict]] = {"runs": [], "listing": [], "e2e": []}
    commands = []
    for path in args.merge:
        raw = json.loads(path.read_text())
        commands.append(raw["command"])
        for row in raw["rows"]:
            row = {**row, **{side: Result(**row[side]) for side in SIDES if side in row}}
            kind = "listing" if row["step"].startswith("list") else "e2e" if row["step"].startswith("end") else "runs"
            groups[kind].append(row)
    args.sizes = sorted({r["n"] for r in groups["runs"]})
    args.skip_e2e = not groups["e2e"]
    args.e2e_sizes = sorted({r["n"] for r in groups["e2e"]})
    section = render(args, groups["runs"], groups["listing"], groups["e2e"], "` and `".join(commands))
    print(section)
    if args.docs:
        write_section(Path(args.docs), SECTION, section)
    return 0


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=_ints, default=[10_000, 100_000, 1_000_000], help="keys per synthetic run")
    p.add_argument("--list-sizes", type=_ints, default=[10_000, 100_000], help="objects on the S3 server")
    p.add_argument("--e2e-sizes", type=_ints, default=[1000, 10_000], help="images end to end")
    p.add_argument("--skip-runs", action="store_true", help="skip commit/compare")
    p.add_argument("--skip-listing", action="store_true", help="skip list + resume on S3")
    p.add_argument("--skip-e2e", action="store_true", help="skip the end-to-end CLI runs")
    p.add_argument("--skip-before", action="store_true", help="measure the new code only")
    p.add_argument("--before-max-keys", type=int, help="run the old commit/compare only up to this many keys")
    p.add_argument("--keep", action="store_true", help="keep WORK (otherwise its big files are removed)")
    p.add_argument("--work", type=Path, default=Path("/tmp/scale-bench"))
    p.add_argument("--old-tree", type=Path, default=OLD_TREE, help="checkout of the code before")
    p.add_argument("--rss-limit-gb", type=float, default=16, help="kill a step whose driver RSS passes this")
    p.add_argument("--timeout-min", type=float, default=15, help="kill a step running longer")
    p.add_argument("--docs", default=str(REPO / "docs" / "benchmarks.md"), help="'' to not write")
    p.add_argument("--date", default=dt.date.today().isoformat())
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    p.add_argument("--machine", default=f"{os.cpu_count()} cores, {memory_gib:.0f} GiB")
    p.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        metavar="RESULTS_JSON",
        help="render one section from the results.json of earlier runs (each part measured once)",
    )
    p.add_argument("--step", help=argparse.SUPPRESS)
    p.add_argument("--params", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p


def measure_all(args) -> int:
    """The three parts, their section printed (and written to --docs), raw numbers in WORK."""
    sys.path.insert(0, str(REPO))  # generation uses this tree's pipeline (PartStats.of, part_name)
    command = "python benchmarks/scale.py " + " ".join(sys.argv[1:])
    sides = ["after"] if args.skip_before else list(SIDES)
    args.work.mkdir(parents=True, exist_ok=True)
    runner = Runner(
        args.work,
        {"before": args.old_tree.resolve(), "after": REPO},
        rss_limit_gb=args.rss_limit_gb,
        timeout_min=args.timeout_min,
    )
    pool = Pool()
    runs = [] if args.skip_runs else part_runs(runner, pool, args.sizes, sides, args.before_max_keys)
    listing = [] if args.skip_listing else part_listing(runner, pool, args.list_sizes, sides)
    e2e = [] if args.skip_e2e else part_e2e(runner, pool, args.e2e_sizes, sides)

    section = render(args, runs, listing, e2e, command)
    print("\n" + section)
    raw = {
        "command": command,
        "date": args.date,
        "machine": args.machine,
        "rows": [
            {**{k: v for k, v in r.items() if k not in SIDES}, **{s: asdict(r[s]) for s in SIDES if s in r}}
            for r in runs + listing + e2e
        ],
    }
    (args.work / "results.json").write_text(json.dumps(raw, indent=2))
    if args.docs:
        write_section(Path(args.docs), SECTION, section)
        print(f"\nwrote {args.docs}")
    if not args.keep:
        for child in args.work.iterdir():
            if child.name not in ("logs", "results.json"):
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    return 0


def main() -> int:
    args = build_parser().parse_args()
    if args.step:  # a measured step, in its own process: imports `pipeline` from PYTHONPATH
        child_main(args.step, json.loads(args.params), args.result)
        return 0
    if args.merge:
        return merge(args)
    return measure_all(args)


if __name__ == "__main__":
    raise SystemExit(main())
