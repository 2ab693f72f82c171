"""The job against a bare GPU loop: images/s end to end and in steady state, and GPU utilisation.

    python benchmarks/gpu_ceiling.py [--images 3000] [--rounds 2] [--table-out t.md]   # needs CUDA
    python benchmarks/gpu_ceiling.py --images 48 --rounds 1 --allow-cpu              # this script, on a CPU

The GPU side of benchmarks/ceiling.py (which is the CPU one: one process per core). Both sides do
the same work on a synthetic bucket (pipeline.synthetic.write_bucket, 160-320 x 200-400 scenes;
demo model, default InferenceConfig, CRF off):

- bare loop: one process, in a fresh interpreter (its imports, CUDA start and model load count):
  a torch DataLoader whose worker processes (one per core but one, 16 at most) read and decode
  (``pipeline.images.decode_image``) batches of 16 images; the main process runs ``infer_batch``
  on the GPU and a thread pool encodes and writes each mask PNG.
- the job: ``jobs/segment_bucket.py IMAGES --no-crf --rows-per-file 16`` (its own local Ray head,
  the GPU plan: a GPU actor and the CPU decode pool), timed from Popen to exit.

End to end: command to the last mask; steady state: images/s after the first 10 % of the images
(loop: each PNG written; job: the part files' mtimes). GPU utilisation: nvidia-smi sampled every
200 ms, the mean over each run's steady window. Rounds are interleaved (loop, job, loop, job) and
each ratio is the median of the within-round ratios. Without CUDA it refuses to run unless
--allow-cpu: then both sides run on the CPU, a check of this script, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ceiling_parts import MODEL, PYTHON  # noqa: E402  (benchmarks/ceiling_parts/)
from ceiling_parts.report import num  # noqa: E402
from ceiling_parts.runs import compare_masks, run_job  # noqa: E402
from ceiling_parts.sampler import steady_rate, steady_window  # noqa: E402
from common import bench_lock  # noqa: E402

from pipeline.config import ComputeConfig  # noqa: E402

BATCH = ComputeConfig().batch_size  # images per DataLoader batch: the job's default Ray batch
GOAL = 0.95  # the job's steady state against the bare GPU loop's


class _Images:
    """DataLoader dataset: item i is the decoded RGB array of ``paths[i]`` (in a worker process)."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from pipeline.images import decode_image

        with open(self.paths[i], "rb") as f:
            return self.paths[i], decode_image(f.read()).rgb


def loop_main(images_dir: str, out_dir: str, times_path: str) -> None:
    """The bare loop, in this (fresh) process; each written mask's time goes to ``times_path``."""
    import torch

    from pipeline.config import InferenceConfig
    from pipeline.inference import class_map, infer_batch, load_model
    from pipeline.palette import mask_to_png
    from pipeline.weights import default_weights

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(MODEL, None)[0].to(device)
    mean, std = default_weights(MODEL).normalisation(device)
    config = InferenceConfig()
    paths = sorted(str(p) for p in Path(images_dir).glob("*.jpg"))
    workers = max(1, min(16, (os.cpu_count() or 2) - 1))
    loader = torch.utils.data.DataLoader(
        _Images(paths), batch_size=BATCH, num_workers=workers, collate_fn=list, prefetch_factor=4
    )
    done: list[float] = []

    def write(path: str, mask) -> None:
        Path(out_dir, Path(path).name + ".png").write_bytes(mask_to_png(mask))
        done.append(time.time())

    with ThreadPoolExecutor(4) as pool:
        for batch in loader:
            probs = infer_batch(model, [rgb for _, rgb in batch], mean=mean, std=std, config=config)
            for (path, _), p in zip(batch, probs, strict=True):
                pool.submit(write, path, class_map(p).cpu().numpy())
    Path(times_path).write_text(json.dumps(sorted(done)))


class GpuSampler:
    """nvidia-smi's utilisation.gpu every 200 ms, as (time, percent); nothing without nvidia-smi."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self.proc = None

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            cmd = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200"]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.samples.append((time.time(), float(line.split(",")[0])))
            except ValueError:
                continue

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()

    def mean(self, events: list[tuple[float, int]], total: int) -> float | None:
        """Mean utilisation over the steady window of ``events`` (``steady_window``); None without one."""
        window = steady_window(events, total)
        used = [u for t, u in self.samples if window and window[0] <= t <= window[2]]
        return sum(used) / len(used) if used else None


def run_loop(images: Path, out: Path, images_total: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    times = out / "_times.json"
    cmd = [PYTHON, __file__, "--loop-main", str(images), str(out), str(times)]
    with bench_lock(), GpuSampler() as gpu:
        start = time.time()
        subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    events = [(t, 1) for t in json.loads(times.read_text())]
    return {
        "e2e": events[-1][0] - start,
        "first": events[0][0] - start,
        "steady": steady_rate(events, images_total),
        "gpu": gpu.mean(events, images_total),
    }


def run_cli(images: Path, out: Path, run_id: str, images_total: int) -> dict:
    with GpuSampler() as gpu:
        job = run_job("job", ROOT, images, out, run_id, images_total, False, ["--rows-per-file", str(BATCH)])
    return {
        "e2e": job.seconds,
        "first": job.first,
        "steady": job.steady,
        "gpu": gpu.mean(job.parts, images_total),
        "run_dir": job.run_dir,
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def median(values: list[float | None]) -> float | None:
    """The median of the values that exist; None if none does."""
    known = [v for v in values if v]
    return statistics.median(known) if known else None


def report(rounds: list[dict], images: int, device: str, command: str) -> str:
    rows = []
    for i, r in enumerate(rounds, 1):
        for side in ("loop", "job"):
            s = r[side]
            rows.append(
                f"| {i} | {side} | {s['e2e']:.1f} | {images / s['e2e']:.1f} | {num(s['steady'], 1)} "
                f"| {s['first']:.1f} | {num(s['gpu'], 0)} |"
            )
    median_steady = median([ratio(r["job"]["steady"], r["loop"]["steady"]) for r in rounds])
    median_e2e = median([ratio(r["loop"]["e2e"], r["job"]["e2e"]) for r in rounds])
    met = "met" if median_steady and median_steady >= GOAL else "NOT met"
    masks = rounds[-1]["masks"]
    return "\n".join(
        [
            f"`{command}` on {device}: {images} synthetic scenes, demo model, scale 1.0, CRF off.",
            "",
            "| round | side | e2e s | images/s e2e | steady images/s | first result s | GPU util % (steady) |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
            f"- job / bare loop, steady state: {num(median_steady, 2)} (median of {len(rounds)} rounds; "
            f"goal >= {GOAL}: {met}); end to end: {num(median_e2e, 2)}",
            f"- masks identical to the loop's (last round): {masks[0]}/{masks[1]} (pixels {100 * masks[2]:.4f} %)",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--table-out", type=Path, help="also write the table here (markdown)")
    parser.add_argument("--allow-cpu", action="store_true", help="without CUDA, run both sides on the CPU")
    parser.add_argument("--loop-main", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loop_main:
        loop_main(*args.loop_main)
        return 0
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("CUDA is not available (--allow-cpu runs both sides on the CPU: a check of this script)")
        return 1
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (--allow-cpu: not a measurement)"
    from pipeline.synthetic import write_bucket

    rounds = []
    with tempfile.TemporaryDirectory(prefix="gpu-ceiling-") as tmp:
        bucket = Path(tmp, "bucket")
        write_bucket(bucket, range(4_000_000, 4_000_000 + args.images))
        for r in range(args.rounds):
            loop = run_loop(bucket / "images", Path(tmp, "loop"), args.images)
            job = run_cli(bucket / "images", Path(tmp, "out"), f"r{r}", args.images)
            masks = compare_masks(Path(tmp, "loop"), job.pop("run_dir"))
            rounds.append({"loop": loop, "job": job, "masks": masks})
            print(f"[gpu-ceiling] round {r + 1}: loop {loop}, job {job}, masks {masks}", flush=True)
    text = report(rounds, args.images, device, "python benchmarks/gpu_ceiling.py " + " ".join(sys.argv[1:]))
    print("\n" + text)
    if args.table_out:
        args.table_out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
