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
(``--old-root``, a worktree of the code before this change) has no --rows-per-file: its driver
writes the parts, ``--commit-interval 0.01`` makes it write one per batch.

Start-up (new code): a harness in a fresh interpreter goes through ``pipeline.job.run()`` step by
step with timestamps up to the first part file (rows-per-file 16), while the process tree is
sampled every 0.25 s: Ray worker titles (``ray::MapWorker(MapBatches(Segmenter)).__init__``) tell
when the inference actors were being built and when they were ready, and CPU seconds per process
group tell where the cores went. Fixed overhead = end-to-end seconds - images / steady state.

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
import json  # noqa: E402
import math  # noqa: E402
import multiprocessing as mp  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import LOCK, bench_lock, write_section  # noqa: E402  (benchmarks/common.py)

DOCS = ROOT / "docs" / "benchmarks.md"
PYTHON = sys.executable
DATE = "2026-12-02"
SKIP = 0.10  # steady state: after the first 10 % of the images
SAMPLE_S = 0.25
MODEL = "deeplabv3plus_demo"




# --------------------------------------------------------------------------- measures

def steady_rate(events: list[tuple[float, int]], total: int, skip: float = SKIP) -> float | None:
    """Images/s from the event at which ``skip`` of ``total`` images were done to the last event.

    ``events``: (time, images finished at that time), e.g. one per written image or part file.
    """
    events = sorted(events)
    done = 0
    for i, (t, n) in enumerate(events):
        done += n
        if done >= skip * total and i < len(events) - 1:
            seconds = events[-1][0] - t
            return (total - done) / seconds if seconds > 0 else None
    return None


# --------------------------------------------------------------------------- CPU sampling

def _group(title: str, root: bool) -> str:
    if root:
        return "driver"
    for stage in ("Segmenter", "Decoder", "PartWriter", "CRFRefiner"):
        if stage in title:
            return stage
    if "ray::IDLE" in title or "default_worker.py" in title:
        return "Ray worker (booting/idle)"
    if "loop_worker" in title or "multiprocessing" in title:
        return "loop worker"
    return "ray system"  # gcs, raylet, dashboard + agents, idle workers, Ray Data's own actors


class TreeSampler:
    """Every SAMPLE_S in a thread: each process of ``pid``'s tree (its title and CPU seconds) and
    the host's busy CPU seconds, so a run tells where its cores went and what else ran meanwhile."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, dict[str, float], float]] = []  # (t, CPU s per group, host busy s)
        self.first_seen: dict[tuple[int, str], float] = {}  # (pid, title) → first time seen
        self._cpu: dict[int, float] = {}  # pid → CPU seconds at the last sample
        self._groups: dict[str, float] = {}  # CPU seconds per group so far
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            now = time.time()
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                procs = []
            seen: dict[int, tuple[str, float, float]] = {}
            for p in procs:
                try:
                    title = " ".join(p.cmdline()).strip()[:100]
                    cpu = sum(p.cpu_times()[:2])
                except psutil.Error:
                    continue
                self.first_seen.setdefault((p.pid, title), now)
                seen[p.pid] = (_group(title, p.pid == self.pid), self._cpu.get(p.pid, 0.0), cpu)
                self._cpu[p.pid] = cpu
            for p, (group, before, cpu) in seen.items():  # each CPU second to the group the process was in
                self._groups[group] = self._groups.get(group, 0.0) + max(0.0, cpu - before)
            groups = dict(self._groups)  # exited processes keep what they used
            host = psutil.cpu_times()
            self.samples.append((now, groups, sum(host) - host.idle - getattr(host, "iowait", 0.0)))
            self._stop.wait(SAMPLE_S)

    def __enter__(self) -> "TreeSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _at(self, t: float) -> tuple[dict[str, float], float]:
        best = min(self.samples, key=lambda s: abs(s[0] - t))
        return best[1], best[2]

    def cores(self, start: float, end: float) -> dict[str, float]:
        """Cores busy per group between ``start`` and ``end`` (+ "other": the host's busy cores outside the tree)."""
        if not self.samples or end - start < 2 * SAMPLE_S:
            return {}
        (a, host_a), (b, host_b) = self._at(start), self._at(end)
        seconds = end - start
        out = {g: (b.get(g, 0.0) - a.get(g, 0.0)) / seconds for g in b}
        out = {g: v for g, v in out.items() if v >= 0.005}
        out["other"] = max(0.0, (host_b - host_a) / seconds - sum(out.values()))
        return out

    def titles(self, word: str) -> list[tuple[float, str]]:
        return sorted((t, title) for (_, title), t in self.first_seen.items() if word in title)

    def timeline(self, start: float) -> list[str]:
        """Each process title the first time it was seen, in seconds since ``start``."""
        first: dict[str, float] = {}
        for (_, title), t in self.first_seen.items():
            short = title.split(" ")[0] if not title.startswith("ray::") else title
            short = short.rsplit("/", 1)[-1]
            first[short] = min(t, first.get(short, t))
        return [f"{t - start:6.2f} s  {title}" for title, t in sorted(first.items(), key=lambda kv: kv[1])]

    def actors(self, stage: str = "Segmenter") -> tuple[float | None, float | None]:
        """(first time an actor of ``stage`` was in its constructor, time the last one left it)."""
        building = [t for t, title in self.titles(stage) if title.endswith("__init__")]
        pids_ready: dict[int, float] = {}
        for (pid, title), t in self.first_seen.items():
            if stage in title and not title.endswith("__init__"):
                pids_ready[pid] = min(t, pids_ready.get(pid, t))
        return (min(building) if building else None), (max(pids_ready.values()) if pids_ready else None)


def fmt_cores(cores: dict[str, float]) -> str:
    order = ["loop worker", "Segmenter", "Decoder", "PartWriter", "CRFRefiner", "driver", "Ray worker (booting/idle)",
             "ray system", "other"]
    return ", ".join(f"{g} {cores[g]:.2f}" for g in order if g in cores) or "n/a"


# --------------------------------------------------------------------------- the loop

def loop_worker(paths: list[str], out_dir: str, crf: bool, times_path: str) -> None:
    """One process of the loop: its share of the images, one after another, one torch thread."""
    started = time.time()
    import torch

    torch.set_num_threads(1)
    from pipeline.config import CRFParams, InferenceConfig
    from pipeline.crf import dense_crf
    from pipeline.images import decode_image
    from pipeline.inference import class_map, infer_batch, load_model
    from pipeline.palette import mask_to_png
    from pipeline.probs import decode_probs, encode_probs
    from pipeline.weights import default_weights

    imported = time.time()
    model = load_model(MODEL, None)[0]
    mean, std = default_weights(MODEL).normalisation()
    config, params = InferenceConfig(), CRFParams()
    loaded = time.time()
    done = []
    for path in paths:
        with open(path, "rb") as f:
            rgb = decode_image(f.read()).rgb
        probs = infer_batch(model, [rgb], mean=mean, std=std, config=config)[0]
        if crf:  # as the job: probabilities quantised to uint8 before the CRF
            mask = dense_crf(rgb, decode_probs(encode_probs(probs, "uint8"), "uint8", tuple(probs.shape)), params)
        else:
            mask = class_map(probs).numpy()
        Path(out_dir, Path(path).name + ".png").write_bytes(mask_to_png(mask))
        done.append(time.time())
    Path(times_path).write_text(json.dumps({"started": started, "imported": imported, "loaded": loaded,
                                            "done": done}))


class _Rates:
    """End to end seconds and images/s of a run with ``images``, ``start`` and ``end``."""

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @property
    def rate(self) -> float:
        return self.images / self.seconds


@dataclass
class LoopRun(_Rates):
    images: int
    start: float
    workers: list[dict]
    sampler: TreeSampler

    @property
    def end(self) -> float:
        return max(w["done"][-1] for w in self.workers if w["done"])

    @property
    def steady(self) -> float:
        rates = [steady_rate([(t, 1) for t in w["done"]], len(w["done"])) for w in self.workers]
        return sum(r for r in rates if r)

    @property
    def first(self) -> float:
        return min(w["done"][0] for w in self.workers if w["done"]) - self.start


def run_loop(files: list[Path], procs: int, crf: bool, out_dir: Path) -> LoopRun:
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    context = mp.get_context("spawn")
    shares = [[str(f) for f in files[i::procs]] for i in range(procs)]
    times = [out_dir / f"_times_{i}.json" for i in range(procs)]
    with bench_lock(), TreeSampler(os.getpid()) as sampler:
        start = time.time()
        workers = [context.Process(target=loop_worker, args=(share, str(out_dir), crf, str(t)))
                   for share, t in zip(shares, times)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        time.sleep(2 * SAMPLE_S)  # one more sample after the end
    if any(w.exitcode for w in workers):
        raise RuntimeError(f"a loop process failed: exit codes {[w.exitcode for w in workers]}")
    return LoopRun(len(files), start, [json.loads(t.read_text()) for t in times], sampler)


# --------------------------------------------------------------------------- the job

@dataclass
class JobRun(_Rates):
    name: str
    images: int
    start: float
    end: float
    rc: int
    lines: list[tuple[float, str]]
    parts: list[tuple[float, int]]  # (mtime, rows) of every part file
    sampler: TreeSampler
    run_dir: Path

    @property
    def steady(self) -> float | None:
        return steady_rate(self.parts, self.images) if len(self.parts) > 2 else None

    @property
    def first(self) -> float | None:
        return min(self.parts)[0] - self.start if self.parts else None

    @property
    def last(self) -> float | None:
        return max(self.parts)[0] if self.parts else None

    @property
    def overhead(self) -> float | None:
        """Fixed overhead: what end to end costs beyond images / steady state."""
        return self.seconds - self.images / self.steady if self.steady else None

    def line_time(self, text: str) -> float | None:
        return next((t - self.start for t, line in self.lines if text in line), None)


def part_events(run_dir: Path) -> list[tuple[float, int]]:
    import pyarrow.parquet as pq

    events = []
    for kind in ("masks", "errors"):
        for path in sorted((run_dir / kind).glob("*.parquet")):
            events.append((path.stat().st_mtime, pq.read_metadata(path).num_rows))
    return events


def job_env(code_root: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(code_root))  # Ray workers import this code, not the installed one
    env.pop("RAY_ADDRESS", None)  # always a fresh local Ray, as the CLI starts without an address
    return env


def run_job(name: str, code_root: Path, images_uri: Path, out: Path, run_id: str, images: int, crf: bool,
            extra: list[str]) -> JobRun:
    cmd = [PYTHON, "jobs/segment_bucket.py", str(images_uri), "--output", str(out), "--run-id", run_id,
           *([] if crf else ["--no-crf"]), *extra]
    lines: list[tuple[float, str]] = []
    shutil.rmtree(out / f"run={run_id}", ignore_errors=True)  # a --keep folder from an earlier try
    with bench_lock():
        start = time.time()
        proc = subprocess.Popen(cmd, cwd=code_root, env=job_env(code_root), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        with TreeSampler(proc.pid) as sampler:
            reader = threading.Thread(target=lambda: lines.extend((time.time(), l.rstrip()) for l in proc.stdout),
                                      daemon=True)
            reader.start()
            rc = proc.wait()
            end = time.time()
            reader.join(timeout=5)
    if rc:
        print("\n".join(l for _, l in lines[-30:]), file=sys.stderr)
        raise RuntimeError(f"{name}: {' '.join(cmd)} exited {rc}")
    run_dir = out / f"run={run_id}"
    return JobRun(name, images, start, end, rc, lines, part_events(run_dir), sampler, run_dir)


# --------------------------------------------------------------------------- start-up harness

def harness(images_uri: str, out: str, crf: bool) -> None:
    """In a fresh interpreter: pipeline.job.run()'s steps up to the first part file, timestamped."""
    marks = [("python started", T_MODULE)]
    import pipeline.job as job
    marks.append(("import pipeline.job", time.time()))
    import ray

    from pipeline.outputs import RunOutput
    from pipeline.stages import Resources, build_dataset, cluster_nodes
    from pipeline.storage import list_inputs
    marks.append(("import ray + pipeline.stages (torch)", time.time()))
    parser = job.build_parser()
    config = job.config_from_args(parser.parse_args(
        [images_uri, "--output", out, "--run-id", "harness", "--rows-per-file", "16", *([] if crf else ["--no-crf"])]),
        parser)
    weights, sha256 = job.resolve_weights(config)
    marks.append(("weight check (resolve_weights)", time.time()))
    inputs = list_inputs(config.input_uri, config.labels_uri, storage_options=config.storage_options)
    output = RunOutput(config.output_uri, config.run_id, config.storage_options)
    earlier = output.prepare(resume=False, overwrite=False, num_classes=weights.num_classes)
    todo = inputs.without(earlier.keys)
    marks.append(("listing + output.prepare", time.time()))
    job.init_ray(None)
    marks.append(("Ray start (ray.init)", time.time()))
    resources = Resources.resolve(config, cluster_nodes())
    ds = build_dataset(todo, config, weights, sha256, resources, output.full_uri())
    marks.append(("resources + plan (build_dataset)", time.time()))
    for _ in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        marks.append(("first part file (first result)", time.time()))
        break
    ray.shutdown()
    print("HARNESS " + json.dumps(marks), flush=True)


@dataclass
class Startup:
    crf: bool
    start: float
    marks: list[tuple[str, float]]
    sampler: TreeSampler


def run_harness(images_uri: Path, out: Path, crf: bool) -> Startup:
    cmd = [PYTHON, str(Path(__file__).resolve()), "--startup-harness", str(images_uri), str(out),
           *([] if crf else ["--harness-no-crf"])]
    with bench_lock():
        start = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=job_env(ROOT), stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        with TreeSampler(proc.pid) as sampler:
            stdout, _ = proc.communicate()
    line = next((l for l in stdout.splitlines() if l.startswith("HARNESS ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"start-up harness failed ({proc.returncode}): {stdout[-2000:]}")
    return Startup(crf, start, [tuple(m) for m in json.loads(line[len("HARNESS "):])], sampler)


HEAVY = ("pipeline.job", "torch", "torchvision", "torch._dynamo", "timm", "ray", "pyarrow", "numpy", "PIL", "fsspec",
         "safetensors", "pydensecrf")


def import_profile() -> list[tuple[str, float]]:
    """Cumulative seconds of ``import pipeline.job`` and of the heavy packages it pulls in (python -X importtime,
    each where it is first imported, so nested ones are included in their importer's figure)."""
    with bench_lock():
        err = subprocess.run([PYTHON, "-X", "importtime", "-c", "import pipeline.job"], cwd=ROOT, env=job_env(ROOT),
                             capture_output=True, text=True).stderr
    found = {}
    for line in err.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit() and parts[2].strip() in HEAVY:
            found[parts[2].strip()] = int(parts[1]) / 1e6
    return sorted(found.items(), key=lambda kv: -kv[1])


# --------------------------------------------------------------------------- correctness

def compare_masks(loop_dir: Path, run_dir: Path) -> tuple[int, int, float]:
    """(identical masks, masks compared, share of identical pixels) of the loop's PNGs vs the job's."""
    import numpy as np
    import pyarrow.parquet as pq

    from pipeline.palette import png_to_mask

    same = compared = 0
    pixels = agree = 0
    for path in sorted((run_dir / "masks").glob("*.parquet")):
        table = pq.read_table(path, columns=["key", "mask"])
        for key, png in zip(table.column("key").to_pylist(), table.column("mask").to_pylist()):
            mine = loop_dir / (Path(key).name + ".png")
            if not mine.exists():
                continue
            a, b = png_to_mask(png), png_to_mask(mine.read_bytes())
            compared += 1
            if a.shape == b.shape:
                same += bool(np.array_equal(a, b))
                agree += int((a == b).sum())
            pixels += b.size
    return same, compared, agree / pixels if pixels else float("nan")


# --------------------------------------------------------------------------- the report

@dataclass
class Workload:
    name: str
    crf: bool
    images: int
    loop: LoopRun | None = None
    jobs: dict[str, JobRun] = field(default_factory=dict)  # new16, new, old1, old
    masks: dict[str, tuple[int, int, float]] = field(default_factory=dict)


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "n/a"


def num(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def machine() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor() or "?")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import ray
    import torch

    return (f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, no GPU used; Python {platform.python_version()}, "
            f"torch {torch.__version__}, Ray {ray.__version__}; host shared with other agents: every timed run "
            f"held an exclusive lock on {LOCK}, and 'other' below is CPU used outside the measured processes")


def main_table(works: list[Workload]) -> list[str]:
    out = ["| work | multi-process loop e2e / steady (images/s) | job e2e / steady (images/s) | job/loop e2e | "
           "job/loop steady | old job e2e / steady (images/s) | old/loop e2e | old/loop steady |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for w in works:
        new, new16, old, old1 = (w.jobs.get(k) for k in ("new", "new16", "old", "old1"))
        steady = new16.steady if new16 else None
        old_steady = old1.steady if old1 else None
        out.append(f"| {w.name} | {w.loop.rate:.2f} / {w.loop.steady:.2f} | {new.rate:.2f} / {num(steady, 2)} | "
                   f"{ratio(new.rate, w.loop.rate)} | {ratio(steady, w.loop.steady)} | "
                   + (f"{old.rate:.2f} / {num(old_steady, 2)} | {ratio(old.rate, w.loop.rate)} | "
                      f"{ratio(old_steady, w.loop.steady)} |" if old else "skipped | | |"))
    return out


def detail_table(works: list[Workload]) -> list[str]:
    out = ["| work | run | flags | e2e s | images/s e2e | steady | first result s | fixed overhead s | "
           "last result → exit s | cores busy in steady state | masks identical to the loop's |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for w in works:
        loop = w.loop
        done = sorted(t for wk in loop.workers for t in wk["done"])
        ten = done[math.ceil(SKIP * len(done)) - 1]
        out.append(f"| {w.name} | loop, {len(loop.workers)} processes | | {loop.seconds:.1f} | {loop.rate:.2f} | "
                   f"{loop.steady:.2f} | {loop.first:.1f} | {loop.seconds - loop.images / loop.steady:.1f} | | "
                   f"{fmt_cores(loop.sampler.cores(ten, loop.end))} | |")
        flags = {"new16": "--rows-per-file 16", "new": "defaults", "old1": "--commit-interval 0.01", "old": "defaults"}
        for key, job in w.jobs.items():
            steady_from = None
            if job.parts and len(job.parts) > 2:
                parts = sorted(job.parts)
                cum, steady_from = 0, parts[0][0]
                for t, n in parts:
                    cum += n
                    if cum >= SKIP * job.images:
                        steady_from = t
                        break
            cores = fmt_cores(job.sampler.cores(steady_from, job.last)) if steady_from else "n/a"
            same = w.masks.get(key)
            masks = f"{same[0]}/{same[1]} ({100 * same[0] / same[1]:.1f} %; pixels {100 * same[2]:.4f} %)" \
                if same and same[1] else "n/a"
            out.append(f"| {w.name} | {job.name} | {flags[key]} | {job.seconds:.1f} | {job.rate:.2f} | "
                       f"{num(job.steady, 2)} | {num(job.first)} | {num(job.overhead)} | "
                       f"{num(job.end - job.last if job.last else None)} | {cores} | {masks} |")
    return out


def startup_table(startups: list[Startup], works: list[Workload]) -> list[str]:
    out = ["| step (new code, fresh interpreter, --rows-per-file 16) | " + " | ".join(
        f"{'CRF on' if s.crf else 'CRF off'}: step s / at s" for s in startups) + " |",
           "| --- |" + " --- |" * len(startups)]
    names = [name for name, _ in startups[0].marks]
    for i, name in enumerate(names):
        cells = []
        for s in startups:
            t, before = s.marks[i][1], (s.marks[i - 1][1] if i else s.start)
            cells.append(f"{t - before:.2f} / {t - s.start:.2f}")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    rows = {"inference actors: first in __init__ (sampled)": 0, "inference actors: all ready (sampled)": 1}
    for label, which in rows.items():
        cells = []
        for s in startups:
            t = s.sampler.actors()[which]
            cells.append(f"at {t - s.start:.2f}" if t else "n/a")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    cells = []
    for s in startups:
        first = s.marks[-1][1]
        cells.append(fmt_cores(s.sampler.cores(s.start, first)))
    out.append("| cores busy from the command to the first result | " + " | ".join(cells) + " |")
    return out


def cli_timeline(works: list[Workload]) -> list[str]:
    """When the CLI run (new code, --rows-per-file 16) got where, in seconds since the command."""
    out = ["| CLI, new code, --rows-per-file 16 (s since the command) | " + " | ".join(w.name for w in works) + " |",
           "| --- |" + " --- |" * len(works)]
    rows: dict[str, list[str]] = {}
    for w in works:
        job = w.jobs["new16"]
        building, ready = job.sampler.actors()
        idle = [t for t, _ in job.sampler.titles("ray::IDLE")]
        decode, write = job.sampler.actors("Decoder"), job.sampler.actors("PartWriter")
        since = lambda t: t and t - job.start  # noqa: E731
        marks = {
            "'N inputs under' line (imports, weight check, listing)": job.line_time("inputs under"),
            "'inference on' line (ray.init, resources)": job.line_time("inference on"),
            "first Ray worker process (ray::IDLE, sampled)": since(min(idle)) if idle else None,
            "Ray Data 'Running Dataset' log line": job.line_time("Running Dataset"),
            "decode actor in __init__ / ready (sampled)": f"{num(since(decode[0]))} / {num(since(decode[1]))}",
            "write actor in __init__ / ready (sampled)": f"{num(since(write[0]))} / {num(since(write[1]))}",
            "first inference actor in __init__ (sampled)": since(building),
            "all inference actors ready (sampled)": since(ready),
            "first part file": job.first,
            "last part file": since(job.last),
            "exit": job.seconds,
        }
        on = job.line_time("inference on")
        if on is not None and ready and job.first:
            cuts = [("command → 'inference on'", 0.0, on), ("'inference on' → inference actors ready", on,
                                                            ready - job.start),
                    ("actors ready → first part file", ready - job.start, job.first),
                    ("last part file → exit", job.last - job.start, job.seconds)]
            for name, a, b in cuts:
                marks[f"cores busy: {name}"] = fmt_cores(job.sampler.cores(job.start + a, job.start + b))
        for name, value in marks.items():
            rows.setdefault(name, []).append(value if isinstance(value, str) else num(value))
    return out + [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows.items()]


def goals(works: list[Workload], startups: list[Startup]) -> list[str]:
    out = []
    for w in works:
        new, new16 = w.jobs["new"], w.jobs["new16"]
        steady = ratio(new16.steady, w.loop.steady)
        e2e = ratio(new.rate, w.loop.rate)
        out.append(f"- {w.name}: job steady state {steady} of the loop's (goal >= 0.9: "
                   f"{'met' if steady != 'n/a' and float(steady) >= 0.9 else 'NOT met'}); end to end {e2e} "
                   f"(goal >= 0.8: {'met' if float(e2e) >= 0.8 else 'NOT met'})")
        first = new16.first
        out.append(f"- {w.name}: first result (first part file, CLI with --rows-per-file 16) {num(first)} s after "
                   f"the command (goal <= 8 s: {'met' if first is not None and first <= 8 else 'NOT met'}); "
                   f"fixed overhead {num(new16.overhead)} s (e2e - images / steady; goal <= 5 s: "
                   f"{'met' if new16.overhead is not None and new16.overhead <= 5 else 'NOT met'}; the loop's own: "
                   f"{w.loop.seconds - w.loop.images / w.loop.steady:.1f} s)")
    for s in startups:
        out.append(f"- harness, {'CRF on' if s.crf else 'CRF off'}: first result {s.marks[-1][1] - s.start:.1f} s "
                   f"after the command")
    return out


def report(works: list[Workload], startups: list[Startup], imports: list[tuple[str, float]], command: str) -> str:
    lines = ["## Ceiling: the job vs one process per core (benchmarks/ceiling.py)", "",
             f"{DATE}. {machine()}.", "", f"`{command}`; synthetic scenes (pipeline.synthetic.write_bucket, "
             "160-320 x 200-400 pixels), demo model, scale 1.0, CRF = DeepLab v2 parameters. Loop: one process "
             "per core, 1 torch thread each, end to end from before the processes start to the last PNG written. "
             "Job: the CLI timed from Popen to exit; steady state from part-file mtimes (the --rows-per-file 16 "
             "run; old code: --commit-interval 0.01), images/s after the first 10 % of the images.", ""]
    lines += main_table(works) + [""] + detail_table(works)
    lines += ["", "Fixed overhead = end to end - images / steady state. Cores busy: CPU seconds per second of the "
              "measured process tree, by process group (Segmenter = the inference actors, with the CRF fused in; "
              "Ray worker (booting/idle) = a Ray worker process before it became an actor; ray system = gcs, raylet, dashboard and runtime-env agents, Ray Data's own actors), from "
              "the time 10 % of the images were done to the last result; other = the rest of the host.", ""]
    lines += cli_timeline(works) + [""]
    if startups:
        lines += ["Start-up of the new code, step by step (pipeline.job.run()'s calls in a fresh interpreter; "
                  "'at' = seconds since the command):", ""] + startup_table(startups, works) + [""]
    if imports:
        lines += ["`import pipeline.job` and the heavy packages under it (python -X importtime, cumulative, nested ones counted in their importer too): "
                  + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in imports), ""]
    lines += ["Goals:", ""] + goals(works, startups) + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main

def warm_caches(old_root: Path | None) -> None:
    """Untimed: import what every run imports once, so no run pays for a cold page cache alone."""
    for root in [ROOT] + ([old_root] if old_root else []):
        subprocess.run([PYTHON, "-c", "import ray, ray.data, pipeline.job, pipeline.stages"], cwd=root,
                       env=job_env(root), check=True)


def measure(work: Workload, bucket: Path, tmp: Path, procs: int, old_root: Path | None) -> None:
    images_uri = bucket / "images"
    files = sorted(images_uri.glob("*.jpg"))
    tag = "on" if work.crf else "off"
    print(f"[ceiling] {work.name}: loop, {procs} processes", flush=True)
    work.loop = run_loop(files, procs, work.crf, tmp / f"loop-{tag}")
    runs = [("new16", "job (new)", ROOT, ["--rows-per-file", "16"]), ("new", "job (new)", ROOT, [])]
    if old_root:
        runs += [("old1", "job (old)", old_root, ["--commit-interval", "0.01"]), ("old", "job (old)", old_root, [])]
    for key, name, root, extra in runs:
        print(f"[ceiling] {work.name}: {name} {' '.join(extra) or 'defaults'}", flush=True)
        work.jobs[key] = run_job(name, root, images_uri, tmp / f"out-{tag}", key, work.images, work.crf, extra)
        work.masks[key] = compare_masks(tmp / f"loop-{tag}", work.jobs[key].run_dir)
        job = work.jobs[key]
        print(f"[ceiling]   {job.seconds:.1f} s, {job.rate:.2f} images/s, steady {num(job.steady, 2)}, "
              f"masks identical {work.masks[key][0]}/{work.masks[key][1]}", flush=True)
    print(f"[ceiling]   loop {work.loop.seconds:.1f} s, {work.loop.rate:.2f} images/s, steady {work.loop.steady:.2f}",
          flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images-off", type=int, default=480, help="images of the CRF-off workload (0: skip)")
    parser.add_argument("--images-on", type=int, default=240, help="images of the CRF-on workload (0: skip)")
    parser.add_argument("--procs", type=int, default=os.cpu_count() or 1, help="loop processes")
    parser.add_argument("--old-root", type=Path, default=Path("/work/wt-old"), help="worktree of the old code")
    parser.add_argument("--skip-old", action="store_true", help="don't run the old code")
    parser.add_argument("--skip-startup", action="store_true", help="no start-up harness")
    parser.add_argument("--no-docs", action="store_true", help="print only; don't append to docs/benchmarks.md")
    parser.add_argument("--keep", type=Path, help="write buckets and outputs here and keep them")
    parser.add_argument("--startup-harness", nargs=2, metavar=("IMAGES", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--harness-no-crf", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.startup_harness:
        harness(*args.startup_harness, crf=not args.harness_no_crf)
        return 0
    old_root = None if args.skip_old else args.old_root
    command = "python benchmarks/ceiling.py " + " ".join(sys.argv[1:])

    from pipeline.synthetic import write_bucket

    with contextlib.ExitStack() as stack:
        tmp = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ceiling-")))
        tmp.mkdir(parents=True, exist_ok=True)
        works = [w for w in (Workload(f"{args.images_off} images, CRF off", False, args.images_off),
                             Workload(f"{args.images_on} images, CRF on", True, args.images_on)) if w.images]
        warm_caches(old_root)
        for w in works:
            bucket = tmp / f"bucket-{'on' if w.crf else 'off'}"
            if not (bucket / "images").exists():
                write_bucket(bucket, range(3_000_000, 3_000_000 + w.images))
            measure(w, bucket, tmp, args.procs, old_root)
        startups, imports = [], []
        if not args.skip_startup:
            for w in works:
                print(f"[ceiling] start-up harness, {w.name}", flush=True)
                bucket = tmp / f"bucket-{'on' if w.crf else 'off'}"
                shutil.rmtree(tmp / f"harness-{w.crf}", ignore_errors=True)
                startups.append(run_harness(bucket / "images", tmp / f"harness-{w.crf}", w.crf))
            imports = import_profile()
        text = report(works, startups, imports, command)
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
