"""The honest ceiling: the job (its CLI, end to end) vs a plain script running one process per core.

    python benchmarks/ceiling.py                     # 480 images CRF off, 240 CRF on, new + old code
    python benchmarks/ceiling.py --images-off 480 --images-on 240 --procs 2 --skip-old
    python benchmarks/ceiling.py --images-off 32 --images-on 16 --no-docs     # a quick try

The loop (the ceiling): ``--procs`` processes (multiprocessing, 'spawn'), each with
``torch.set_num_threads(1)``, over a strided share of the sorted file list: read bytes →
decode_image → infer_batch (default InferenceConfig, demo model, bundled weights) → class_map, or
with CRF encode_probs(uint8)/decode_probs → dense_crf(CRFParams()) as the job does → mask_to_png to
a file. End to end: from before the processes start (their imports included) to the last file
written. Steady state: each process's images/s after its first 10 % of images, summed.

The job: ``jobs/segment_bucket.py BUCKET/images --output OUT --run-id X [--no-crf]`` in a fresh
interpreter, timed from Popen to exit. Steady state comes from the part files' mtimes and row
counts (not from the progress lines, which come every 10 s): the run with ``--rows-per-file 16``
publishes a part per batch, and images/s after the first 10 % of images up to the last part is its
steady state. The default-flags run (1000 rows a part) gives the end-to-end figure. The old code
(``--old-root``, a worktree of an earlier commit) runs with --rows-per-file 16 too, or, before the
workers wrote the parts, with ``--commit-interval 0.01`` (its driver then writes one per batch).

Ray's floor (``ceiling_parts/floor.py``, each round): the job's CPU plan (keys in blocks of 16 →
one 1-CPU actor per loop process → one 0-CPU writer actor) with stages that return their batch
untouched, in a fresh interpreter through the job's own ``init_ray``: on the Ray head it starts,
and on a head started before (``ray start --head --block``, as a KubeRay cluster runs), with the
job CLI on that running head too. What Ray costs with no work at all, beside what the job costs.

Start-up (new code): a harness in a fresh interpreter goes through ``pipeline.job.run()`` step by
step with timestamps up to the first part file (rows-per-file 16), while the process tree is
sampled every 0.25 s: Ray worker titles (``ray::MapWorker(MapBatches(Segmenter)).__init__``) tell
when the inference actors were being built and when they were ready, and CPU seconds per process
group tell where the cores went. Fixed overhead = end-to-end seconds - images / steady state.

Every run is repeated ``--rounds`` times (3), interleaved (loop, new code, old code, then the next
round): this host's speed drifts between runs by more than the differences measured, so the tables
give medians, and each job/loop ratio is the median of the ratios within a round.

Every timed run holds an exclusive flock on /tmp/bench.lock: the host is shared with other
agents, and the CPU used outside the measured process tree during each run is printed ("other").
Masks are checked too: the loop's PNGs against the job's ``mask`` column, key by key.
The tables are printed and (unless --no-docs) appended to docs/benchmarks.md.
"""

from __future__ import annotations

import time

T_MODULE = time.time()  # the harness's "python started" mark: before any other import

import argparse  # noqa: E402
import contextlib  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ceiling_parts import DOCS, PYTHON  # noqa: E402  (benchmarks/ceiling_parts/)
from ceiling_parts.floor import floor_harness, measure_floor  # noqa: E402
from ceiling_parts.report import Workload, num, report  # noqa: E402
from ceiling_parts.runs import compare_masks, job_env, run_job, run_loop  # noqa: E402
from ceiling_parts.startup import harness, import_profile, run_harness  # noqa: E402
from common import write_section  # noqa: E402  (benchmarks/common.py)


def warm_caches(old_root: Path | None) -> None:
    """Untimed: import what every run imports once, so no run pays for a cold page cache alone."""
    for root in [ROOT] + ([old_root] if old_root else []):
        subprocess.run(
            [PYTHON, "-c", "import ray, ray.data, pipeline.job, pipeline.stages"],
            cwd=root,
            env=job_env(root),
            check=True,
        )


def steady_flags(root: Path) -> list[str]:
    """The flags that make ``root``'s job publish a part per batch: workers' --rows-per-file, or the
    driver-written parts' --commit-interval of the code before the scale-out change."""
    help_text = subprocess.run(
        [PYTHON, "jobs/segment_bucket.py", "--help"], cwd=root, env=job_env(root), capture_output=True, text=True
    ).stdout
    return ["--rows-per-file", "16"] if "--rows-per-file" in help_text else ["--commit-interval", "0.01"]


def measure(
    work: Workload, bucket: Path, tmp: Path, procs: int, old_root: Path | None, rounds: int, floor: bool
) -> None:
    """``rounds`` rounds of the loop and every job run, interleaved: this host's speed drifts by
    more than the differences measured, so each ratio is taken within a round."""
    images_uri = bucket / "images"
    files = sorted(images_uri.glob("*.jpg"))
    tag = "on" if work.crf else "off"
    runs = [("new16", "job (new)", ROOT, ["--rows-per-file", "16"]), ("new", "job (new)", ROOT, [])]
    if old_root:
        runs += [("old1", "job (old)", old_root, steady_flags(old_root)), ("old", "job (old)", old_root, [])]
    for r in range(rounds):
        print(f"[ceiling] {work.name}, round {r + 1}/{rounds}: loop, {procs} processes", flush=True)
        loop = run_loop(files, procs, work.crf, tmp / f"loop-{tag}")
        work.rounds.append({"loop": loop})
        for key, name, root, extra in runs:
            print(f"[ceiling] {work.name}, round {r + 1}/{rounds}: {name} {' '.join(extra) or 'defaults'}", flush=True)
            job = run_job(name, root, images_uri, tmp / f"out-{tag}", key, work.images, work.crf, extra)
            job.flags = " ".join(extra) or "defaults"
            work.rounds[-1][key] = job
            same = compare_masks(tmp / f"loop-{tag}", job.run_dir)
            work.masks[key] = min(work.masks.get(key, same), same)  # the round with the fewest identical
            print(
                f"[ceiling]   {job.seconds:.1f} s, {job.rate:.2f} images/s, steady {num(job.steady, 2)}, "
                f"masks identical {same[0]}/{same[1]}",
                flush=True,
            )
        print(f"[ceiling]   loop {loop.seconds:.1f} s, {loop.rate:.2f} images/s, steady {loop.steady:.2f}", flush=True)
        if floor:
            print(f"[ceiling] {work.name}, round {r + 1}/{rounds}: Ray's floor; the job on a running head", flush=True)
            measure_floor(work, images_uri, tmp, procs, work.rounds[-1])
    work.pick_median()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--images-off", type=int, default=480, help="images of the CRF-off workload (0: skip)")
    add("--images-on", type=int, default=240, help="images of the CRF-on workload (0: skip)")
    add("--procs", type=int, default=os.cpu_count() or 1, help="loop processes")
    add("--rounds", type=int, default=3, help="rounds of every run, interleaved; the tables give medians")
    add("--old-root", type=Path, default=Path("/work/wt-old"), help="worktree of the old code")
    add("--skip-old", action="store_true", help="don't run the old code")
    add("--skip-startup", action="store_true", help="no start-up harness")
    add("--skip-floor", action="store_true", help="no floor runs (no-op DAG) and no job on a running Ray head")
    add("--no-docs", action="store_true", help="print only; don't append to docs/benchmarks.md")
    add("--keep", type=Path, help="write buckets and outputs here and keep them")
    add("--startup-harness", nargs=2, metavar=("IMAGES", "OUT"), help=argparse.SUPPRESS)
    add("--harness-no-crf", action="store_true", help=argparse.SUPPRESS)
    add("--floor-harness", nargs=2, type=int, metavar=("IMAGES", "PROCS"), help=argparse.SUPPRESS)
    return parser


def run_all(args, tmp: Path, old_root: Path | None, command: str) -> tuple[list[Workload], str]:
    """Every workload (loop and job runs), then the start-up harness; the report's markdown."""
    from pipeline.synthetic import write_bucket

    works = [
        w
        for w in (
            Workload(f"{args.images_off} images, CRF off", False, args.images_off),
            Workload(f"{args.images_on} images, CRF on", True, args.images_on),
        )
        if w.images
    ]
    warm_caches(old_root)
    for w in works:
        bucket = tmp / f"bucket-{'on' if w.crf else 'off'}"
        if not (bucket / "images").exists():
            write_bucket(bucket, range(3_000_000, 3_000_000 + w.images))
        measure(w, bucket, tmp, args.procs, old_root, args.rounds, not args.skip_floor)
    startups, imports = [], []
    if not args.skip_startup:
        for w in works:
            print(f"[ceiling] start-up harness, {w.name}", flush=True)
            bucket = tmp / f"bucket-{'on' if w.crf else 'off'}"
            shutil.rmtree(tmp / f"harness-{w.crf}", ignore_errors=True)
            startups.append(run_harness(bucket / "images", tmp / f"harness-{w.crf}", w.crf))
        imports = import_profile()
    return works, report(works, startups, imports, command)


def main() -> int:
    args = build_parser().parse_args()
    if args.startup_harness:
        harness(T_MODULE, *args.startup_harness, crf=not args.harness_no_crf)
        return 0
    if args.floor_harness:
        floor_harness(T_MODULE, *args.floor_harness)
        return 0
    old_root = None if args.skip_old else args.old_root
    command = "python benchmarks/ceiling.py " + " ".join(sys.argv[1:])

    with contextlib.ExitStack() as stack:
        tmp = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ceiling-")))
        tmp.mkdir(parents=True, exist_ok=True)
        works, text = run_all(args, tmp, old_root, command)
    for w in works:
        job = w.jobs["new16"]
        print(f"\nprocess titles of the CLI run (new code, --rows-per-file 16), {w.name}, first seen:")
        print("\n".join(job.sampler.timeline(job.start)))
    print("\n" + text)
    if not args.no_docs:
        write_section(DOCS, "## Ceiling: the job vs one process per core", text)
        print(f"[ceiling] wrote its section of {DOCS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
