"""What pipeline_vs_loop.py measures: a process tree's memory, the bare loop, the job's DAG."""

from __future__ import annotations

import contextlib
import math
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil

from pipeline.config import ComputeConfig, CRFParams, InferenceConfig, JobConfig

if TYPE_CHECKING:  # pipeline.stages imports ray and torch; imported where they are used
    from pipeline.stages import Resources


class Sampler:
    """Every 0.5 s in a thread: peak memory of this process tree (RSS and PSS; see below), and
    GPU utilisation when there is one.

    RSS counts a shared page (the object store's shared memory, mapped libraries) once per
    process that touched it, so it grows as workers touch more of the object store without
    using more memory; PSS splits shared pages between the processes sharing them: the sum over
    the tree is the honest total.
    """

    def __init__(self) -> None:
        self.peak_rss = self.peak_pss = 0
        self.pss: list[int] = []  # every sample, to see growth within a run
        self.gpu_util: list[float] = []
        self._smi = shutil.which("nvidia-smi")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            rss = pss = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    info = p.memory_full_info()
                except psutil.Error:
                    continue
                rss, pss = rss + info.rss, pss + info.pss
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.pss.append(pss)
            if self._smi:
                out = subprocess.run(
                    [self._smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                ).stdout.split()
                if out:
                    self.gpu_util.append(float(out[0]))
            time.sleep(0.5)

    def gpu_summary(self) -> str:
        if not self.gpu_util:
            return "n/a"
        busy = sorted(self.gpu_util)
        return f"mean {sum(busy) / len(busy):.0f} %, median {busy[len(busy) // 2]:.0f} %"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


@dataclass
class Result:
    name: str
    images: int
    seconds: float
    first_s: float | None = None  # time to the first result
    steady: float | None = None  # images/s after the first result
    gpu: str = "n/a"
    threads: int = 0  # torch threads of a CPU loop

    @property
    def rate(self) -> float:
        return self.images / self.seconds


def bare_loop(inputs, scales, flip, threads: int, device: str) -> Result:
    import torch

    from pipeline.checkpoints import normalisation
    from pipeline.images import decode_image
    from pipeline.inference import class_map, infer_batch, load_model
    from pipeline.storage import read_bytes

    torch.set_num_threads(threads)
    model, _, _ = load_model("deeplabv3plus_demo", None)
    model.to(device)
    mean, std = normalisation(device=device)
    config = InferenceConfig(scales=scales, flip=flip)
    uris = [inputs.locator().image_uri(k) for k in inputs.keys.to_pylist()]
    for uri in uris[:4]:  # warm-up, as the pipeline's actors warm up on their first batch
        infer_batch(model, [decode_image(read_bytes(uri)).rgb], mean=mean, std=std, config=config)
    with Sampler() as sampler:
        start = time.perf_counter()
        for uri in uris:
            rgb = decode_image(read_bytes(uri)).rgb
            class_map(infer_batch(model, [rgb], mean=mean, std=std, config=config)[0]).cpu()
        seconds = time.perf_counter() - start
    where = device if device == "cuda" else f"{threads} thread{'s' if threads > 1 else ''}"
    return Result(f"bare loop, {where}", len(uris), seconds, gpu=sampler.gpu_summary(), threads=threads)


def consume(ds, name: str) -> tuple[Result, Sampler]:
    """Iterate ``ds`` to the end in the driver: images/s end to end, first result, steady state."""
    first = None
    rows = first_rows = 0
    with Sampler() as sampler:
        start = time.perf_counter()
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            # The job's DAG ends in its write stage (one row per part file, with its PartStats);
            # the hand-written script's in result rows.
            rows += (
                sum(_images(s) for s in batch.column("stats").to_pylist())
                if "stats" in batch.column_names
                else batch.num_rows
            )
            if first is None:
                first, first_rows = time.perf_counter(), rows
        end = time.perf_counter()
    steady = (rows - first_rows) / (end - first) if end > first else float("nan")
    return Result(name, rows, end - start, first - start, steady, sampler.gpu_summary()), sampler


def _images(stats: str) -> int:
    from pipeline.partstats import PartStats

    part = PartStats.from_json(stats)
    return part.images + part.errors


def pipeline_run(
    inputs, scales, flip, compute: ComputeConfig, name: str | None = None, crf: CRFParams | None = None
) -> tuple[Result, Sampler, Resources]:
    from pipeline.cluster import cluster_nodes
    from pipeline.job import resolve_weights
    from pipeline.stages import Resources, build_dataset

    config = JobConfig(
        input_uri="",
        output_uri="",
        labels_uri=None,
        model="deeplabv3plus_demo",
        weights_uri=None,
        run_id="bench",
        inference=InferenceConfig(scales=scales, flip=flip),
        crf=crf,
        compute=compute,
        rows_per_file=compute.batch_size,
    )  # a part per batch: the driver sees every batch land
    weights, sha = resolve_weights(config)
    resources = Resources.resolve(config, cluster_nodes())
    lo, hi = resources.infer_actors
    name = name or "Ray pipeline"
    name += f", {lo if lo == hi else f'{lo}-{hi}'}x{'GPU' if resources.use_gpu else f'{resources.infer_threads}t'}"
    with tempfile.TemporaryDirectory() as out:  # the job's workers write their part files here
        return (*consume(build_dataset(inputs, config, weights, sha, resources, out), name), resources)


@contextlib.contextmanager
def fresh_ray(cores: int):
    import ray

    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def breakeven(run: Result, loop_rate: float, goal: float) -> str:
    """Images from which ``run``'s end-to-end rate, N / (first_s + N / steady), reaches goal x the loop."""
    if run.steady is None or run.steady <= goal * loop_rate:
        return "never (steady state is below the goal)"
    return f"{math.ceil(goal * loop_rate * run.first_s / (1 - goal * loop_rate / run.steady))}"
