"""Inputs that crash their worker: what isolating them costs (issue 29).

Writes ``--images`` tiny random JPEGs (24x32), ``--poison`` of them every ``--step``-th from the 6th
(with the default batch of 16, one per batch), and runs the CLI (``--scales 1.0 --no-crf``) with
tests/fault_hooks.py crashing, with a real SIGSEGV, any worker that decodes a poison key. From the
job's output (Ray's log deduplication off) it counts where the time went: the crashed processes by
kind (inference actor, decode actor, probe task), Ray Data executions (the first pass, the runner's
isolation passes and stage probes), and checks every key is once in masks ∪ errors.

``--checkout DIR`` measures another checkout (its own jobs/, pipeline/ and tests/fault_hooks.py) on
the same inputs, e.g. a worktree of the commit before a change:

    PYTHONPATH=. python benchmarks/poison.py --images 1000 --poison 30
    git worktree add /tmp/before <commit> && PYTHONPATH=. python benchmarks/poison.py --images 200 \\
        --poison 6 --checkout /tmp/before
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness

NAME = "poison"
# A crashed process's title in the job's output: "(MapWorker(MapBatches(Segmenter)) pid=123) Fatal ..."
CRASH = re.compile(r"\((?:MapWorker\(MapBatches\()?(\w+)\)*\s+pid=\d+\).*Fatal Python error")


def write_inputs(folder: Path, count: int, step: int, poison: int) -> tuple[list[str], list[str]]:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(29)
    keys = [f"{i:04d}.jpg" for i in range(count)]
    for key in keys:
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(folder / key, quality=80)
    return keys, keys[5::step][:poison]


def fault_environment(checkout: Path, poison: list[str]) -> dict[str, str]:
    """The checkout's own fault hooks, armed with ``poison``, and only that checkout on the path."""
    # Its own name: the workers import the hook by it (tests.fault_hooks.setup), from the checkout.
    spec = importlib.util.spec_from_file_location("tests.fault_hooks", checkout / "tests" / "fault_hooks.py")
    assert spec is not None and spec.loader is not None
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    env = harness.env(RAY_DEDUP_LOGS="0") | hooks.fault_env(crash_keys=poison)
    return env | {"PYTHONPATH": str(checkout)}


def measure(checkout: Path, work: Path, count: int, step: int, poison_count: int) -> dict:
    import pyarrow.parquet as pq

    images, out = work / "images", work / "out"
    keys, poison = write_inputs(images, count, step, poison_count)
    cmd = [sys.executable, str(checkout / "jobs" / "segment_bucket.py"), str(images), "--output", str(out)]
    cmd += ["--run-id", "p", "--scales", "1.0", "--no-crf"]
    run = harness.run(cmd, environ=fault_environment(checkout, poison), cwd=checkout)
    text = [line for _, line in run.lines]
    run_dir = out / "run=p"
    masks = pq.read_table(run_dir / "masks", columns=["key"]).column("key").to_pylist()
    errors = pq.read_table(run_dir / "errors", columns=["key", "stage"]).to_pylist()
    first = run.line_time("images written")
    head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True)
    return {
        "checkout": str(checkout),
        "checkout_commit": head.stdout.strip() or None,  # the code measured (machine.commit: this script's)
        "images": count,
        "poison": len(poison),
        "wall_s": round(run.seconds, 1),
        "first_pass_done_s": first and round(first, 1),
        "masks": len(masks),
        "errors": len(errors),
        "every_key_once": sorted(masks + [r["key"] for r in errors]) == keys,
        "errors_are_the_poison": sorted(r["key"] for r in errors) == sorted(poison),
        "error_stages": dict(Counter(r["stage"] for r in errors)),
        "crashed_processes": dict(Counter(m.group(1) for line in text if (m := CRASH.search(line)))),
        "ray_data_executions": sum("Execution plan of Dataset" in line for line in text),
        "peak_rss_mib": run.summary()["peak_rss_mib"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--poison", type=int, default=30)
    parser.add_argument("--step", type=int, default=33, help="a poison key every STEP keys (33: one per batch of 16)")
    parser.add_argument("--checkout", type=Path, default=harness.ROOT, help="the checkout to measure")
    harness.add_results_arg(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="poison-bench-") as tmp:
        result = measure(args.checkout.resolve(), Path(tmp), args.images, args.step, args.poison)
    harness.log(NAME, str(result))
    harness.save(NAME, args, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
