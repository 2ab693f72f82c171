"""The benchmark harness every script in benchmarks/ uses.

- ``run_cli`` runs ``jobs/segment_bucket.py`` (or any command, ``run``) as a subprocess, timed from
  Popen to exit, its output lines time-stamped, while a ``Sampler`` thread reads its process tree
  every 0.25 s: CPU seconds per process group (driver, the inference actors, the writer, Ray's own
  processes, ...), each process's peak RSS (``VmHWM``, exact), the tree's RSS and PSS, the host's
  busy CPU outside the tree, and the GPU through ``nvidia-smi`` where there is one.
- ``steady_rate``: images/s after the first 10 % of the images (from part-file mtimes or per-image
  times), so start-up and the tail do not hide the rate the machine keeps.
- ``ratio``/``median``: ratios of known values; rounds are interleaved and ratios taken within a round.
- ``save``: one JSON file per run under benchmarks/results/ (or ``--results``) with the command, the
  machine (CPU, cores, memory, GPU, versions, git commit) and the script's results. Nothing here
  writes docs/: docs/benchmarks.md is written by people from these files.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
RESULTS = ROOT / "benchmarks" / "results"
MODEL = "deeplabv3plus_demo"
SKIP = 0.10  # steady state: after the first 10 % of the images
SAMPLE_S = 0.25
PSS_EVERY = 4  # samples: tree PSS once a second
MIB = 2**20


# --------------------------------------------------------------------------------------------- rates


def steady_window(events: list[tuple[float, int]], total: int, skip: float = SKIP) -> tuple[float, int, float] | None:
    """(time, images done by then, last event's time) from the event at which ``skip`` of ``total``
    images were done; None when only the last event gets there. ``events``: (time, images finished)."""
    events = sorted(events)
    done = 0
    for i, (t, n) in enumerate(events):
        done += n
        if done >= skip * total and i < len(events) - 1:
            return t, done, events[-1][0]
    return None


def steady_rate(events: list[tuple[float, int]], total: int, skip: float = SKIP) -> float | None:
    """Images/s over ``steady_window``: the images done after it starts, over its seconds."""
    window = steady_window(events, total, skip)
    if window is None or window[2] <= window[0]:
        return None
    start, done, end = window
    return (total - done) / (end - start)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def median(values) -> float | None:
    """The median of the values that exist; None if none does."""
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


# ------------------------------------------------------------------------------------------ sampling


def group(title: str, root: bool) -> str:
    """The process group a CPU second or a byte is counted in, from the process's title."""
    if root:
        return "driver"
    for stage in ("Segmenter", "Decoder", "PartWriter", "CRFRefiner"):
        if stage in title:
            return stage
    if "ray::IDLE" in title or "default_worker.py" in title:
        return "Ray worker (booting/idle)"
    if "--loop-main" in title or "multiprocessing" in title:
        return "loop worker"
    return "ray system"  # gcs, raylet, dashboard + agents, Ray Data's own actors


def _hwm_mib(pid: int) -> float:
    """The process's peak RSS so far (VmHWM), exact where a sampled RSS would miss short peaks."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Sampler:
    """Every SAMPLE_S in a thread: ``pid``'s process tree (titles, CPU seconds, peak RSS, RSS and
    optionally PSS once a second, which reads smaps and costs more) and the host's busy CPU seconds; with
    nvidia-smi, the GPU's utilisation and memory every 200 ms."""

    def __init__(self, pid: int, *, pss: bool = False) -> None:
        self.pid, self.pss = pid, pss
        self.samples: list[tuple[float, dict[str, float], float]] = []  # (t, CPU s per group so far, host busy s)
        self.first_seen: dict[tuple[int, str], float] = {}  # (pid, title) → first time seen
        self.peak_mib: dict[str, float] = {}  # group → the largest VmHWM of its processes
        self.tree_rss_mib = self.tree_pss_mib = 0.0
        self.gpu: list[tuple[float, float, float]] = []  # (t, utilisation %, memory used MiB)
        self._cpu: dict[int, float] = {}
        self._groups: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._smi = None

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            now = time.time()
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                procs = []
            rss = pss = 0.0
            with_pss = self.pss and len(self.samples) % PSS_EVERY == 0  # smaps is costly: once a second
            for p in procs:
                try:
                    title = " ".join(p.cmdline()).strip()[:120]
                    cpu = sum(p.cpu_times()[:2])
                    mem = p.memory_full_info() if with_pss else p.memory_info()
                except psutil.Error:
                    continue  # exited between listing and reading
                name = group(title, p.pid == self.pid)
                self.first_seen.setdefault((p.pid, title), now)
                self._groups[name] = self._groups.get(name, 0.0) + max(0.0, cpu - self._cpu.get(p.pid, 0.0))
                self._cpu[p.pid] = cpu
                self.peak_mib[name] = max(self.peak_mib.get(name, 0.0), _hwm_mib(p.pid), mem.rss / MIB)
                rss += mem.rss / MIB
                pss += getattr(mem, "pss", 0) / MIB
            self.tree_rss_mib, self.tree_pss_mib = max(self.tree_rss_mib, rss), max(self.tree_pss_mib, pss)
            host = psutil.cpu_times()
            self.samples.append((now, dict(self._groups), sum(host) - host.idle - getattr(host, "iowait", 0.0)))
            self._stop.wait(SAMPLE_S)

    def _read_smi(self) -> None:
        for line in self._smi.stdout:
            try:
                util, mem = (float(v) for v in line.split(",")[:2])
            except ValueError:
                continue
            self.gpu.append((time.time(), util, mem))

    def __enter__(self) -> Sampler:
        self._thread.start()
        if shutil.which("nvidia-smi"):
            query = "--query-gpu=utilization.gpu,memory.used"
            cmd = ["nvidia-smi", query, "--format=csv,noheader,nounits", "-lms", "200"]
            self._smi = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read_smi, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self._smi is not None:
            self._smi.terminate()
            self._smi.wait()

    def cores(self, start: float, end: float) -> dict[str, float]:
        """Cores busy per group between ``start`` and ``end``, and "other": the host outside the tree."""
        if len(self.samples) < 2 or end - start < 2 * SAMPLE_S:
            return {}

        def at(t):
            return min(self.samples, key=lambda s: abs(s[0] - t))

        (_, a, host_a), (_, b, host_b) = at(start), at(end)
        out = {g: round((b.get(g, 0.0) - a.get(g, 0.0)) / (end - start), 3) for g in b}
        out = {g: v for g, v in out.items() if v >= 0.005}
        out["other"] = round(max(0.0, (host_b - host_a) / (end - start) - sum(out.values())), 3)
        return out

    def gpu_mean(self, start: float, end: float) -> dict[str, float] | None:
        """Mean GPU utilisation % and peak memory MiB between ``start`` and ``end``; None without nvidia-smi."""
        inside = [(u, m) for t, u, m in self.gpu if start <= t <= end]
        if not inside:
            return None
        return {"util_pct": sum(u for u, _ in inside) / len(inside), "mem_peak_mib": max(m for _, m in inside)}

    def timeline(self, start: float) -> dict[str, float]:
        """Each process title, shortened, with the first time it was seen, in seconds since ``start``."""
        first: dict[str, float] = {}
        for (_, title), t in self.first_seen.items():
            short = title if title.startswith("ray::") else title.split(" ")[0].rsplit("/", 1)[-1]
            first[short] = round(min(t - start, first.get(short, t - start)), 2)
        return dict(sorted(first.items(), key=lambda kv: kv[1]))

    def actors_ready(self, stage: str = "Segmenter") -> float | None:
        """The time the last actor of ``stage`` was first seen out of its constructor."""
        ready: dict[int, float] = {}
        for (pid, title), t in self.first_seen.items():
            if stage in title and not title.endswith("__init__"):
                ready[pid] = min(t, ready.get(pid, t))
        return max(ready.values()) if ready else None


# --------------------------------------------------------------------------------------------- runs


@dataclass
class Run:
    """One sampled subprocess: its command, wall clock, exit status, time-stamped output lines."""

    cmd: list[str]
    start: float
    end: float
    rc: int
    lines: list[tuple[float, str]]
    sampler: Sampler

    @property
    def seconds(self) -> float:
        return self.end - self.start

    def line_time(self, text: str) -> float | None:
        """Seconds from the start to the first output line containing ``text``."""
        return next((t - self.start for t, line in self.lines if text in line), None)

    def summary(self) -> dict:
        return {
            "seconds": round(self.seconds, 3),
            "cores": self.sampler.cores(self.start, self.end),
            "cpu_s": {g: round(v, 2) for g, v in (self.sampler.samples[-1][1] if self.sampler.samples else {}).items()},
            "peak_rss_mib": {g: round(v) for g, v in self.sampler.peak_mib.items()},
            "tree_rss_mib": round(self.sampler.tree_rss_mib),
            "tree_pss_mib": round(self.sampler.tree_pss_mib) or None,
            "gpu": self.sampler.gpu_mean(self.start, self.end),
        }


def env(address: str | None = None, **extra: str) -> dict[str, str]:
    """This checkout first on the path (Ray workers inherit it), a fresh local Ray unless ``address``."""
    out = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    out.setdefault("RAY_AUTH_MODE", "disabled")
    out.pop("RAY_ADDRESS", None)
    return out | ({"RAY_ADDRESS": address} if address else {}) | extra


def run(
    cmd: list[str],
    *,
    environ: dict[str, str] | None = None,
    pss: bool = False,
    check: bool = True,
    cwd: Path = ROOT,
) -> Run:
    """``cmd`` from the repository root (or ``cwd``: Ray's workers import from the driver's working
    directory too), sampled from Popen to exit."""
    lines: list[tuple[float, str]] = []
    start = time.time()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=environ or env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    with Sampler(proc.pid, pss=pss) as sampler:
        reader = threading.Thread(target=lambda: lines.extend((time.time(), ln.rstrip()) for ln in proc.stdout))
        reader.start()
        rc = proc.wait()
        end = time.time()
        reader.join(timeout=5)
        time.sleep(SAMPLE_S)  # one more sample after the end
    if rc and check:
        print("\n".join(ln for _, ln in lines[-40:]), file=sys.stderr)
        raise RuntimeError(f"{' '.join(cmd)} exited {rc}")
    return Run(cmd, start, end, rc, lines, sampler)


@dataclass
class JobRun:
    """The CLI's run: the sampled process, its run folder, the part files' (mtime, rows)."""

    run: Run
    images: int
    run_dir: Path
    parts: list[tuple[float, int]] = field(default_factory=list)

    @property
    def manifest(self) -> dict:
        path = self.run_dir / "manifest.json"
        return json.loads(path.read_text()) if path.exists() else {}

    @property
    def steady(self) -> float | None:
        return steady_rate(self.parts, self.images) if len(self.parts) > 2 else None

    @property
    def first(self) -> float | None:
        return min(self.parts)[0] - self.run.start if self.parts else None

    def summary(self) -> dict:
        """End to end, steady state, first result, fixed overhead, cores in steady state, memory, GPU."""
        s = self.run.sampler
        window = steady_window(self.parts, self.images)
        steady_cores = s.cores(window[0], window[2]) if window else {}
        steady_gpu = s.gpu_mean(window[0], window[2]) if window else None
        ready = s.actors_ready()
        return {
            "images": self.images,
            "images_per_s": round(self.images / self.run.seconds, 3),
            "steady_images_per_s": self.steady and round(self.steady, 3),
            "first_result_s": self.first and round(self.first, 2),
            "fixed_overhead_s": self.steady and round(self.run.seconds - self.images / self.steady, 2),
            "actors_ready_s": ready and round(ready - self.run.start, 2),
            "steady_cores": steady_cores,
            "steady_gpu": steady_gpu,
            "manifest_images_per_s": self.manifest.get("timings", {}).get("images_per_s"),
            **self.run.summary(),
        }


def part_events(run_dir: Path) -> list[tuple[float, int]]:
    """(mtime, rows) of every part file of a run: what the steady state is timed from."""
    import pyarrow.parquet as pq

    return [
        (path.stat().st_mtime, pq.read_metadata(path).num_rows)
        for kind in ("masks", "errors")
        for path in sorted((run_dir / kind).glob("*.parquet"))
    ]


def run_cli(images: Path, out: Path, run_id: str, count: int, *flags: str, **kwargs) -> JobRun:
    """``jobs/segment_bucket.py IMAGES --output OUT --run-id RUN_ID FLAGS`` in a fresh interpreter."""
    shutil.rmtree(out / f"run={run_id}", ignore_errors=True)
    cmd = [PYTHON, "jobs/segment_bucket.py", str(images), "--output", str(out), "--run-id", run_id, *flags]
    job = JobRun(run(cmd, **kwargs), count, out / f"run={run_id}")
    job.parts = part_events(job.run_dir)
    return job


# ---------------------------------------------------------------------------------------- data, masks


def synthetic_bucket(path: Path, count: int, seed: int) -> Path:
    """``count`` synthetic scenes (160-320 x 200-400, labels beside them); the images folder."""
    from pipeline.demo.synthetic import write_bucket

    if not (path / "images").exists():
        write_bucket(path, range(seed, seed + count))
    return path / "images"


def tiny_bucket(folder: Path, count: int, size: int, fmt: str = "PNG") -> Path:
    """``count`` images of ``size`` x ``size`` pixels (256 distinct synthetic scenes, repeated)."""
    import io

    from PIL import Image

    from pipeline.demo.synthetic import SceneSpec, make_scene

    folder.mkdir(parents=True, exist_ok=True)
    pool = []
    for i in range(min(count, 256)):
        buffer = io.BytesIO()
        Image.fromarray(make_scene(5_000_000 + i, SceneSpec(height=size, width=size))[0]).save(buffer, format=fmt)
        pool.append(buffer.getvalue())
    for i in range(count):
        (folder / f"img-{i:07d}.{fmt.lower()}").write_bytes(pool[i % len(pool)])
    return folder


def compare_masks(png_dir: Path, run_dir: Path) -> dict:
    """The loop's PNGs (``<key name>.png``) against the job's ``mask`` column, key by key."""
    import numpy as np
    import pyarrow.parquet as pq

    from pipeline.io.palette import png_to_mask

    same = compared = pixels = agree = 0
    for path in sorted((run_dir / "masks").glob("*.parquet")):
        table = pq.read_table(path, columns=["key", "mask"])
        for key, png in zip(table.column("key").to_pylist(), table.column("mask").to_pylist(), strict=True):
            mine = png_dir / (Path(key).name + ".png")
            if not mine.exists():
                continue
            a, b = png_to_mask(png), png_to_mask(mine.read_bytes())
            compared += 1
            if a.shape == b.shape:
                same += bool(np.array_equal(a, b))
                agree += int((a == b).sum())
            pixels += b.size
    return {"identical": same, "compared": compared, "pixel_agreement": agree / pixels if pixels else None}


# ------------------------------------------------------------------------------------------- results


def machine() -> dict:
    """What the figures depend on: CPU, cores, memory, GPU, versions, the commit measured."""
    import psutil

    info = {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    for name in ("torch", "ray", "pyarrow", "pydensecrf"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "installed")
        except ImportError:
            info[name] = None
    import torch

    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True)
    info["commit"] = git.stdout.strip() or None
    info["dirty"] = bool(dirty.stdout.strip())
    return info


def add_results_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for the JSON results")


def save(name: str, args: argparse.Namespace, results) -> Path:
    """``RESULTS/<name>-<UTC time>.json``: the command, the machine and ``results``; its path printed."""
    folder: Path = args.results
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = folder / f"{name}-{stamp}.json"
    body = {
        "benchmark": name,
        "command": " ".join(["python", *[os.path.relpath(a, ROOT) if a == sys.argv[0] else a for a in sys.argv]]),
        "machine": machine(),
        "results": results,
    }
    path.write_text(json.dumps(body, indent=2, default=str) + "\n")
    print(f"[{name}] results in {path}", flush=True)
    return path


def log(name: str, message: str) -> None:
    print(f"[{name}] {message}", flush=True)
