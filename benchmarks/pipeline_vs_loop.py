"""Ray Data pipeline vs a bare PyTorch loop: same images, model and scales, CRF off.

    python benchmarks/pipeline_vs_loop.py [--images 48] [--scales 1.0] [--flip]

(a) the loop: read, decode, multi-scale forward, argmax, one image after another, with all cores
    for torch; (b) the job's own Ray Data DAG (decode tasks → inference actor pool → result rows),
    consumed by the driver. Prints images/s of each and the ratio, end to end (including Ray and
    actor start-up) and in steady state (after the first result), then peak RSS of the pipeline's
    whole process tree for N and 10×N images, which must stay flat.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import ComputeConfig, InferenceConfig, JobConfig  # noqa: E402
from pipeline.synthetic import write_bucket  # noqa: E402


class PeakRSS:
    """Peak resident memory of this process and all its children (Ray's raylet, workers, plasma)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def bare_loop(files, scales, flip, threads: int) -> tuple[float, int]:
    import torch

    from pipeline.images import decode_image
    from pipeline.inference import infer_batch, load_model
    from pipeline.storage import read_bytes

    torch.set_num_threads(threads)
    model, _, _ = load_model("deeplabv3plus_demo", None)
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    config = InferenceConfig(scales=scales, flip=flip)
    start = time.perf_counter()
    for f in files:
        rgb = decode_image(read_bytes(f.uri)).rgb
        infer_batch(model, [rgb], mean=mean, std=std, config=config)[0].argmax(0)
    return time.perf_counter() - start, len(files)


def pipeline_run(files, scales, flip, batch_size: int) -> tuple[float, float, int]:
    import ray

    from pipeline.job import resolve_weights
    from pipeline.stages import Resources, build_dataset

    config = JobConfig(input_uri="", output_uri="", labels_uri=None, model="deeplabv3plus_demo", weights_uri=None,
                       run_id="bench", inference=InferenceConfig(scales=scales, flip=flip), crf=None,
                       compute=ComputeConfig(batch_size=batch_size))
    weights, sha = resolve_weights(config)
    resources = Resources.resolve(config, ray.cluster_resources())
    start = time.perf_counter()
    first = None
    rows = 0
    for batch in build_dataset(files, config, weights, sha, resources).iter_batches(batch_size=None,
                                                                                    batch_format="pyarrow"):
        rows += batch.num_rows
        if first is None:
            first, first_rows = time.perf_counter(), rows
    end = time.perf_counter()
    steady = (rows - first_rows) / (end - first) if end > first else float("nan")
    return end - start, steady, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--scales", default="1.0")
    parser.add_argument("--flip", action="store_true")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--skip-memory", action="store_true", help="skip the N vs 10xN memory runs")
    args = parser.parse_args()
    scales = tuple(float(s) for s in args.scales.split(","))

    import ray

    from pipeline.storage import list_inputs

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        write_bucket(tmp, range(3_000_000, 3_000_000 + args.images))
        files = list_inputs(str(Path(tmp) / "images"), None)
        loop_s, n = bare_loop(files, scales, args.flip, threads=cores)
        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
        try:
            pipe_s, steady, rows = pipeline_run(files, scales, args.flip, args.batch_size)
        finally:
            ray.shutdown()
    assert rows == n
    loop_rate, pipe_rate = n / loop_s, n / pipe_s
    print(f"\n{n} images, scales {scales}, flip {args.flip}, {cores} cores, CRF off")
    print(f"{'':28} {'images/s':>9} {'ratio':>6}")
    print(f"{'bare PyTorch loop':28} {loop_rate:9.2f} {1.0:6.2f}")
    print(f"{'Ray pipeline, end to end':28} {pipe_rate:9.2f} {pipe_rate / loop_rate:6.2f}")
    print(f"{'Ray pipeline, steady state':28} {steady:9.2f} {steady / loop_rate:6.2f}")

    if args.skip_memory:
        return 0
    peaks = {}
    for count in (args.images, 10 * args.images):
        with tempfile.TemporaryDirectory() as tmp:
            write_bucket(tmp, range(4_000_000, 4_000_000 + count))
            files = list_inputs(str(Path(tmp) / "images"), None)
            ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
            try:
                with PeakRSS() as rss:
                    pipeline_run(files, scales, args.flip, args.batch_size)
            finally:
                ray.shutdown()
            peaks[count] = rss.peak
    small, large = peaks[args.images], peaks[10 * args.images]
    print(f"\npeak RSS of the process tree: {args.images} images {small / 2**20:.0f} MiB, "
          f"{10 * args.images} images {large / 2**20:.0f} MiB, ratio {large / small:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
