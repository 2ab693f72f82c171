"""Ray's own floor: the job's CPU plan with stages that do nothing, on the Ray head the CLI starts
and on one already running (as a KubeRay cluster is, what ``ray job submit`` pays), and the job
itself on that running head. Start-up then splits into what Ray costs and what the project adds."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from common import bench_lock

from ceiling_parts import PYTHON, ROOT, SCRIPT
from ceiling_parts.runs import job_env, run_job
from pipeline.config import ComputeConfig

BATCH = ComputeConfig().batch_size  # the job's default --batch-size


def floor_harness(t_module: float, images: int, procs: int) -> None:
    """In a fresh interpreter: ``images`` keys in blocks of BATCH → ``procs`` 1-CPU actors → one
    0-CPU writer actor, the job's CPU plan, but every stage returns its batch untouched; Ray is
    started (or joined, with $RAY_ADDRESS) by the job's own ``init_ray``."""
    import pyarrow as pa
    import ray

    from pipeline.cluster import init_ray

    class Idle:  # defined here: pickled by value, so the workers import nothing of the benchmark
        def __call__(self, batch):
            return batch

    imported = time.time()
    init_ray(None)
    started = time.time()
    keys = pa.table({"key": [f"k{i}" for i in range(images)]})
    ds = ray.data.from_blocks([keys.slice(i, BATCH) for i in range(0, images, BATCH)])
    ds.context.memory_usage_poll_interval_s = None  # as the job's DAG
    pool = ray.data.ActorPoolStrategy
    ds = ds.map_batches(Idle, batch_size=BATCH, num_cpus=1, compute=pool(min_size=procs, max_size=procs))
    ds = ds.map_batches(Idle, batch_size=BATCH, num_cpus=0, compute=pool(min_size=1, max_size=1))
    first = None
    for _ in ds.iter_batches(batch_size=None):
        first = first or time.time()
    last = time.time()
    ray.shutdown()
    marks = {"python started": t_module, "imported": imported, "ray": started, "first": first, "last": last}
    print("FLOOR " + json.dumps(marks), flush=True)


@dataclass
class FloorRun:
    start: float  # Popen
    end: float  # exit
    marks: dict[str, float]

    @property
    def first(self) -> float:
        return self.marks["first"] - self.start

    @property
    def seconds(self) -> float:
        return self.end - self.start


def run_floor(images: int, procs: int, address: str | None) -> FloorRun:
    cmd = [PYTHON, str(SCRIPT), "--floor-harness", str(images), str(procs)]
    with bench_lock():
        start = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, env=job_env(ROOT, address), capture_output=True, text=True)
        end = time.time()
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("FLOOR ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"floor harness failed ({proc.returncode}): {(proc.stdout + proc.stderr)[-2000:]}")
    return FloorRun(start, end, json.loads(line[len("FLOOR ") :]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_head(procs: int, log: Path):
    """A Ray head with ``procs`` CPUs started before the runs and stopped after them: ``ray start
    --block`` stays the parent of every process it starts and stops them all when terminated."""
    port = free_port()
    env = job_env(ROOT) | {"RAY_AUTH_MODE": "disabled"}  # its workers import this checkout's code
    ray_cli = str(Path(PYTHON).with_name("ray"))
    cmd = [ray_cli, "start", "--head", "--block", f"--num-cpus={procs}", "--num-gpus=0", f"--port={port}"]
    cmd += ["--include-dashboard=false", "--disable-usage-stats", "--node-ip-address=127.0.0.1"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while "Ray runtime started" not in log.read_text():
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray start failed: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        # ray start names its head in Ray's bootstrap file; left behind, a later ray.init() without an
        # address would wait minutes on this dead head instead of starting its own.
        bootstrap = Path("/tmp/ray/ray_current_cluster")
        if bootstrap.exists() and bootstrap.read_text().strip().endswith(f":{port}"):
            bootstrap.unlink()


def floor_table(works) -> list[str]:
    """Medians over the rounds: where the first result and the end come, loop, floor and job."""
    out = [
        "| work | run | first result s | end to end s | end to end, x the loop's |",
        "| --- | --- | --- | --- | --- |",
    ]
    for w in works:
        if "floor" not in w.rounds[0]:
            continue
        loop_e2e = w.median(lambda r: r["loop"].seconds)
        rows = [
            ("multi-process loop (its own start: imports, model)", "loop", "loop"),
            ("no-op DAG, the Ray head the CLI starts (Ray's floor)", "floor", "floor"),
            ("no-op DAG, a Ray head already running", "floor_running", "floor_running"),
            ("job CLI, the Ray head it starts (--rows-per-file 16 / defaults)", "new16", "new"),
            ("job CLI, a Ray head already running (RAY_ADDRESS, --rows-per-file 16)", "running", "running"),
        ]
        for name, first_key, e2e_key in rows:
            first = w.median(lambda r: r[first_key].first)  # noqa: B023 (called here, in this iteration)
            e2e = w.median(lambda r: r[e2e_key].seconds)  # noqa: B023 (called here, in this iteration)
            out.append(f"| {w.name} | {name} | {first:.1f} | {e2e:.1f} | {e2e / loop_e2e:.2f} |")
        floor_plus_loop = w.median(lambda r: r["floor"].first + r["loop"].first)
        out.append(f"| {w.name} | Ray's floor + the loop's own first result (sum) | {floor_plus_loop:.1f} | | |")
    return out


def measure_floor(work, images_uri: Path, tmp: Path, procs: int, runs: dict) -> None:
    """Into ``runs`` (one round's): the floor on the CLI's head and on a running one, and the job
    (--rows-per-file 16) on that running head."""
    runs["floor"] = run_floor(work.images, procs, None)
    with ray_head(procs, tmp / "ray-head.log") as address:
        runs["floor_running"] = run_floor(work.images, procs, address)
        out, extra = tmp / f"out-{'on' if work.crf else 'off'}", ["--rows-per-file", "16"]
        job = run_job("job (new), Ray running", ROOT, images_uri, out, "running", work.images, work.crf, extra, address)
        job.flags = "RAY_ADDRESS, " + " ".join(extra)
        runs["running"] = job
    print(
        f"[ceiling]   floor: first result {runs['floor'].first:.1f} s, exit {runs['floor'].seconds:.1f} s; on a "
        f"running head {runs['floor_running'].first:.1f} / {runs['floor_running'].seconds:.1f} s; the job on it "
        f"{job.seconds:.1f} s, first result {job.first:.1f} s",
        flush=True,
    )


def floor_goal(w) -> str | None:
    """The goals' line on Ray's floor: what a no-op DAG costs before and after any work."""
    if "floor" not in w.rounds[0]:
        return None
    first, seconds = w.median(lambda r: r["floor"].first), w.median(lambda r: r["floor"].seconds)
    running = w.median(lambda r: r["loop"].seconds / r["running"].seconds)
    return (
        f"- {w.name}: Ray's floor (no-op DAG, the head the CLI starts): first result {first:.1f} s, exit "
        f"{seconds:.1f} s, against the goals' 8 s to the first result and 5 s of fixed overhead; the job on a "
        f"running head: end to end {running:.2f} of the loop's"
    )
