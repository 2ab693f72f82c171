"""The measured steps, child side: each runs in a fresh process that imports the tree it measures."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

from scale_parts import CATEGORIES, NUM_CLASSES


class Clock:
    """The timed part of a step: wall and CPU (user + sys) of this process between start and stop."""

    def __init__(self) -> None:
        self.start()
        self.wall = self.cpu = None

    @staticmethod
    def _cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def start(self) -> None:
        self._wall0, self._cpu0 = time.perf_counter(), self._cpu()

    def stop(self) -> None:
        if self.wall is None:
            self.wall, self.cpu = time.perf_counter() - self._wall0, self._cpu() - self._cpu0


def _vm_hwm_mib() -> float:
    """Peak RSS of this process since exec (unlike ru_maxrss, not inherited from a forking parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def manifest_for(run_id: str) -> dict:
    """The manifest fields commit and the report read (job.py writes more)."""
    return {
        "run_id": run_id,
        "model": "deeplabv3plus_demo",
        "weights": {"uri": "demo", "sha256": "0" * 64},
        "config": {"inference": {"low_conf_threshold": 0.5}},
        "categories": list(CATEGORIES),
        "timings": {"segment_s": 1.0, "processed": 0, "images_per_s": 0.0, "total_s": 1.0},
        "finished_at": "2026-12-02T00:00:00+00:00",
    }


def step_commit_before(clock: Clock, out: str, run_id: str, **_) -> dict:
    from pipeline.outputs import RunOutput

    summary = RunOutput(out, run_id).commit(CATEGORIES, manifest_for(run_id), labels_uri=None, previous=None)
    return {"images": summary.images, "errors": summary.errors, "miou": summary.post.miou}


def step_commit_after(clock: Clock, out: str, run_id: str, stats_file: str, input_uri: str, **_) -> dict:
    from pipeline.outputs import RunOutput
    from pipeline.partstats import PartStats
    from pipeline.storage import Locator

    stats = PartStats.empty(NUM_CLASSES)
    with open(stats_file) as f:  # what the write workers returned, one line per part
        for line in f:
            stats += PartStats.from_json(line)
    summed_s = time.perf_counter() - clock._wall0
    summary = RunOutput(out, run_id).commit(stats, CATEGORIES, manifest_for(run_id), locator=Locator(input_uri, None))
    return {"images": summary.images, "errors": summary.errors, "miou": summary.post.miou, "sum_stats_s": summed_s}


def step_compare_before(clock: Clock, out: str, old_id: str, new_id: str, **_) -> dict:
    from pipeline.compare import compare_runs, load_run, write_comparison
    from pipeline.outputs import RunOutput

    old, new = RunOutput(out, old_id), RunOutput(out, new_id)
    comparison = compare_runs(load_run(old), load_run(new))
    write_comparison(new, comparison)
    return {"both": comparison.count("both"), "changed": comparison.changed_images}


def step_compare_after(clock: Clock, out: str, old_id: str, new_id: str, **_) -> dict:
    import ray

    from pipeline.compare_stage import compare_outputs
    from pipeline.outputs import RunOutput

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray_init_s = time.perf_counter() - clock._wall0
    clock.start()  # ray.init is a fixed cost, not what grows with the run
    comparison = compare_outputs(RunOutput(out, old_id), RunOutput(out, new_id), write=True)
    clock.stop()
    ray.shutdown()
    return {"both": comparison.count("both"), "changed": comparison.changed_images, "ray_init_s": ray_init_s}


def step_resume_before(clock: Clock, input_uri: str, out: str, run_id: str, **_) -> dict:
    from pipeline.outputs import RunOutput
    from pipeline.storage import list_inputs

    files = list_inputs(input_uri, None)
    listed_s = time.perf_counter() - clock._wall0
    done = RunOutput(out, run_id).done_keys()
    todo = [f for f in files if f.key not in done]  # as the old job.py did
    return {"inputs": len(files), "done": len(done), "todo": len(todo), "list_s": listed_s}


def step_resume_after(clock: Clock, input_uri: str, out: str, run_id: str, **_) -> dict:
    from pipeline.outputs import RunOutput
    from pipeline.storage import list_inputs

    inputs = list_inputs(input_uri, None)
    listed_s = time.perf_counter() - clock._wall0
    earlier = RunOutput(out, run_id).earlier(NUM_CLASSES)
    todo = inputs.without(earlier.keys)
    return {"inputs": len(inputs), "done": len(earlier.keys), "todo": len(todo), "list_s": listed_s}


def step_e2e(clock: Clock, tree: str, images: str, labels: str, out: str, run_id: str, **_) -> dict:
    """This process is the CLI: the job's own main(), as `python jobs/segment_bucket.py ...` runs it."""
    import runpy

    script = str(Path(tree) / "jobs" / "segment_bucket.py")
    sys.argv = [script, images, "--labels", labels, "--output", out, "--no-crf", "--run-id", run_id]
    try:
        runpy.run_path(script, run_name="__main__")
        rc = 0
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    if rc:
        raise RuntimeError(f"segment_bucket.py exited {rc}")
    manifest = json.loads((Path(out) / f"run={run_id}" / "manifest.json").read_text())
    return {
        "images_per_s": manifest["timings"]["images_per_s"],
        "segment_s": manifest["timings"]["segment_s"],
        "images": manifest["counts"]["images"],
        "errors": manifest["counts"]["errors"],
    }


STEPS = {name.removeprefix("step_"): fn for name, fn in globals().items() if name.startswith("step_")}


def child_main(step: str, params: dict, result: str) -> None:
    clock = Clock()
    extra = STEPS[step](clock, **params)
    clock.stop()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    Path(result).write_text(
        json.dumps(
            {
                "rss_mib": _vm_hwm_mib(),
                "cpu_s": clock.cpu,
                "wall_s": clock.wall,
                "process_cpu_s": usage.ru_utime + usage.ru_stime,
                "extra": extra,
                "pipeline": sys.modules["pipeline"].__file__ if "pipeline" in sys.modules else None,
            }
        )
    )
