"""The two sides: the loop (one process per core) and the job's CLI; masks checked key by key."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from common import bench_lock

from ceiling_parts import MODEL, PYTHON, SAMPLE_S
from ceiling_parts.sampler import TreeSampler, steady_rate


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
    Path(times_path).write_text(json.dumps({"started": started, "imported": imported, "loaded": loaded, "done": done}))


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
        workers = [
            context.Process(target=loop_worker, args=(share, str(out_dir), crf, str(t)))
            for share, t in zip(shares, times, strict=True)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        time.sleep(2 * SAMPLE_S)  # one more sample after the end
    if any(w.exitcode for w in workers):
        raise RuntimeError(f"a loop process failed: exit codes {[w.exitcode for w in workers]}")
    return LoopRun(len(files), start, [json.loads(t.read_text()) for t in times], sampler)


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
    flags: str = "defaults"  # the flags the run had beyond the workload's

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


def job_env(code_root: Path, address: str | None = None) -> dict[str, str]:
    """The environment of a job or harness run: a fresh local Ray, as the CLI starts without an
    address, or with ``address`` the running head there."""
    env = dict(os.environ, PYTHONPATH=str(code_root))  # Ray workers import this code, not the installed one
    env.pop("RAY_ADDRESS", None)
    return env | ({"RAY_ADDRESS": address} if address else {})


def run_job(
    name: str,
    code_root: Path,
    images_uri: Path,
    out: Path,
    run_id: str,
    images: int,
    crf: bool,
    extra: list[str],
    address: str | None = None,
) -> JobRun:
    """The CLI in a fresh interpreter, on a Ray head it starts, or with ``address`` on a running one."""
    cmd = [
        PYTHON,
        "jobs/segment_bucket.py",
        str(images_uri),
        "--output",
        str(out),
        "--run-id",
        run_id,
        *([] if crf else ["--no-crf"]),
        *extra,
    ]
    lines: list[tuple[float, str]] = []
    shutil.rmtree(out / f"run={run_id}", ignore_errors=True)  # a --keep folder from an earlier try
    with bench_lock():
        start = time.time()
        proc = subprocess.Popen(
            cmd,
            cwd=code_root,
            env=job_env(code_root, address),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        with TreeSampler(proc.pid) as sampler:
            reader = threading.Thread(
                target=lambda: lines.extend((time.time(), ln.rstrip()) for ln in proc.stdout), daemon=True
            )
            reader.start()
            rc = proc.wait()
            end = time.time()
            reader.join(timeout=5)
    if rc:
        print("\n".join(ln for _, ln in lines[-30:]), file=sys.stderr)
        raise RuntimeError(f"{name}: {' '.join(cmd)} exited {rc}")
    run_dir = out / f"run={run_id}"
    return JobRun(name, images, start, end, rc, lines, part_events(run_dir), sampler, run_dir)


def compare_masks(loop_dir: Path, run_dir: Path) -> tuple[int, int, float]:
    """(identical masks, masks compared, share of identical pixels) of the loop's PNGs vs the job's."""
    import numpy as np
    import pyarrow.parquet as pq

    from pipeline.palette import png_to_mask

    same = compared = 0
    pixels = agree = 0
    for path in sorted((run_dir / "masks").glob("*.parquet")):
        table = pq.read_table(path, columns=["key", "mask"])
        for key, png in zip(table.column("key").to_pylist(), table.column("mask").to_pylist(), strict=True):
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
