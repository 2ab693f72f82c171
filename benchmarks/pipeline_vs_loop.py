"""Ray Data pipeline vs a bare PyTorch loop: same images, model and scales, CRF off.

    python benchmarks/pipeline_vs_loop.py [--images 480] [--scales 1.0] [--flip] [--memory-images 960] [--skip-memory]

(a) The loop: read, decode, multi-scale forward, argmax, one image after another, in this
    process. On CPU it runs with 1 torch thread and with all cores; the faster is the baseline,
    so the pipeline is compared with the best a hand-written loop gets from this machine.
(b) A hand-written Ray Data script as Ray's batch-inference docs write one (read_images → an
    actor pool running forward + argmax), with the job's default actors: what Ray itself costs.
(c) The job's own Ray Data DAG (decode actor pool → inference actor pool → result rows with PNG
    masks and confidence summaries), consumed by the driver, twice: with the job's default
    resources, and as one actor with the loop's best thread count (the loop's compute).
Each Ray run starts on a fresh local Ray (ray.init not timed) and prints images/s end to end
(Ray Data start-up and actor start included), the time to the first result, and steady state
(after the first result), with ratios to the loop, then the bucket size from which the
pipeline's end-to-end rate reaches the goal. On a GPU machine every variant runs on the GPU and
its utilisation is sampled. Then peak memory of the pipeline's whole process tree for N and
10×N images (N = --memory-images), which must stay flat, and within the 10×N run its peak in
the first and the second half. N should be large enough for its run to reach steady state:
with a few hundred images the decode actor finishes within seconds and is gone by the time the
inference actors' memory peaks, so the small run lacks one process that every longer run has.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline_vs_loop_parts.measure import (
    Result,
    bare_loop,
    breakeven,
    consume,
    fresh_ray,
    pipeline_run,
)

from pipeline.config import ComputeConfig, InferenceConfig
from pipeline.synthetic import write_bucket


class Predictor:
    """The hand-written script's actor, as Ray's batch-inference docs write one: model loaded
    once, forward + argmax per image, masks returned as arrays. No error rows, no PNGs, no
    confidence columns, no labels: the least a Ray Data script can do."""

    def __init__(self, scales, flip, threads: int, device: str) -> None:
        from pipeline.checkpoints import normalisation
        from pipeline.inference import load_model

        self.threads, self.device = threads, device
        self.model = load_model("deeplabv3plus_demo", None)[0].to(device)
        self.mean, self.std = normalisation(device=device)
        self.config = InferenceConfig(scales=scales, flip=flip)

    def __call__(self, batch):
        import torch

        from pipeline.inference import class_map, infer_batch

        torch.set_num_threads(self.threads)  # OpenMP threads are per calling thread
        probs = infer_batch(self.model, list(batch["image"]), mean=self.mean, std=self.std, config=self.config)
        return {"mask": [class_map(p).cpu().numpy().ravel() for p in probs]}


def ray_script_run(inputs, scales, flip, actors: int, threads: int, gpu: bool, batch_size: int) -> Result:
    """(c) A hand-written Ray Data script: read_images → one actor pool → masks."""
    import ray

    # Read tasks get the pipeline's decode resources: read_images' default of 1 CPU a task leaves
    # too little for the actor pool on a small machine, and the run stalls.
    uris = [inputs.locator().image_uri(k) for k in inputs.keys.to_pylist()]
    ds = ray.data.read_images(
        uris,
        mode="RGB",
        num_cpus=ComputeConfig().decode_cpus,
        override_num_blocks=max(1, math.ceil(len(uris) / batch_size)),
    )
    ds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"scales": scales, "flip": flip, "threads": threads, "device": "cuda" if gpu else "cpu"},
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if gpu else 0,
        num_cpus=1 if gpu else threads * 0.875,
    )
    return consume(ds, f"hand-written Ray Data script, {actors}x{'GPU' if gpu else f'{threads}t'}")[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=480)
    parser.add_argument("--scales", default="1.0")
    parser.add_argument("--flip", action="store_true")
    parser.add_argument("--batch-size", type=int, default=ComputeConfig().batch_size)
    parser.add_argument("--object-store-mib", type=int, help="the job's --object-store-mib (default: its default)")
    parser.add_argument("--memory-images", type=int, default=960, help="N of the N vs 10xN memory runs")
    parser.add_argument("--skip-memory", action="store_true", help="skip the N vs 10xN memory runs")
    parser.add_argument("--only-memory", action="store_true", help="only the N vs 10xN memory runs")
    args = parser.parse_args()
    scales = tuple(float(s) for s in args.scales.split(","))

    import torch

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cores = os.cpu_count() or 1
    gpu = torch.cuda.is_available()
    compute = ComputeConfig(batch_size=args.batch_size, object_store_mib=args.object_store_mib)
    best = None if args.only_memory else throughput(args, scales, cores, gpu, compute)
    if not args.skip_memory:
        memory(args, scales, cores, compute, best)
    return 0


def _print_throughput(args, scales, cores: int, gpu: bool, best: Result, loops, script, default, matched) -> None:
    print(
        f"\n{args.images} images ({'GPU' if gpu else f'{cores} CPU cores'}), demo model, scales {scales}, "
        f"flip {args.flip}, CRF off, batch {args.batch_size}; ratios are to the best loop"
    )
    print(f"{'':44} {'e2e img/s':>10} {'ratio':>6} {'1st s':>6} {'steady':>8} {'ratio':>6}  GPU util")
    for r in [*loops, script, default, matched]:
        steady = r.steady if r.steady is not None else r.rate
        first = f"{r.first_s:6.2f}" if r.first_s is not None else f"{'':6}"
        print(
            f"{r.name:44} {r.rate:10.2f} {r.rate / best.rate:6.2f} {first} {steady:8.2f} "
            f"{steady / best.rate:6.2f}  {r.gpu}"
        )
    print(
        f"\nRay pipeline / hand-written Ray Data script, same actors: end to end {default.rate / script.rate:.2f}, "
        f"steady state {default.steady / max(script.steady, 1e-9):.2f}"
    )
    print(
        f"Ray pipeline steady state / best loop: {default.steady / best.rate:.2f} (goal >= "
        f"{0.95 if gpu else 0.85}); start-up (first result) {default.first_s:.1f} s, so end to end reaches "
        f"{0.95 if gpu else 0.85:.2f} of the loop from {breakeven(default, best.rate, 0.95 if gpu else 0.85)} images"
    )


def throughput(args, scales, cores: int, gpu: bool, compute: ComputeConfig) -> Result:
    """The side-by-side table; returns the best loop."""
    from pipeline.storage import list_inputs

    with tempfile.TemporaryDirectory() as tmp:
        write_bucket(tmp, range(3_000_000, 3_000_000 + args.images))
        inputs = list_inputs(str(Path(tmp) / "images"), None)
        if gpu:
            loops = [bare_loop(inputs, scales, args.flip, cores, "cuda")]
        else:
            loops = [bare_loop(inputs, scales, args.flip, t, "cpu") for t in sorted({1, cores})]
        best = max(loops, key=lambda r: r.rate)
        # Each Ray variant gets a fresh local Ray (not timed: a submitted job joins a running
        # cluster), so each pays the same Ray Data start-up and actor start in its end-to-end time.
        with fresh_ray(cores):
            default, _, resources = pipeline_run(inputs, scales, args.flip, compute, "Ray pipeline (job defaults)")
        with fresh_ray(cores):
            script = ray_script_run(
                inputs, scales, args.flip, resources.infer_actors[1], resources.infer_threads, gpu, args.batch_size
            )
        # One actor with the loop's threads. Its Ray CPUs leave room for the decode actor, which
        # holds its share for the whole run: a 2-CPU actor on 2 cores waited for decoding to end.
        # Threads are CPUs rounded, so 1.75 CPUs still run 2 threads.
        cpus = min(float(best.threads), cores - compute.decode_cpus)
        with fresh_ray(cores):
            matched, _, _ = pipeline_run(
                inputs,
                scales,
                args.flip,
                ComputeConfig(batch_size=args.batch_size, infer_actors=(1, 1), infer_cpus=None if gpu else cpus),
                "Ray pipeline (loop's compute)",
            )
    _print_throughput(args, scales, cores, gpu, best, loops, script, default, matched)
    return best


def memory(args, scales, cores: int, compute: ComputeConfig, best: Result | None) -> None:
    """Peak memory of the process tree for N and 10 x N images, the job's defaults."""
    from pipeline.storage import list_inputs

    n = args.memory_images
    peaks, runs = {}, {}
    for count in (n, 10 * n):
        with tempfile.TemporaryDirectory() as tmp:
            write_bucket(tmp, range(4_000_000, 4_000_000 + count))
            inputs = list_inputs(str(Path(tmp) / "images"), None)
            with fresh_ray(cores):
                runs[count], peaks[count], _ = pipeline_run(inputs, scales, args.flip, compute)
    small, large = peaks[n], peaks[10 * n]
    print("\npeak memory of the pipeline's process tree, job defaults (PSS splits shared pages)")
    print(f"{'images':>8} {'PSS MiB':>9} {'RSS MiB':>9}")
    for count, sampler in peaks.items():
        print(f"{count:8d} {sampler.peak_pss / 2**20:9.0f} {sampler.peak_rss / 2**20:9.0f}")
    print(f"{'ratio':>8} {large.peak_pss / small.peak_pss:9.3f} {large.peak_rss / small.peak_rss:9.3f}")
    half = len(large.pss) // 2
    print(
        f"within the {10 * n}-image run: peak PSS {max(large.pss[:half]) / 2**20:.0f} MiB in its first half, "
        f"{max(large.pss[half:]) / 2**20:.0f} MiB in its second ({max(large.pss[half:]) / max(large.pss[:half]):.3f})"
    )
    big = runs[10 * n]
    line = f"{10 * n} images end to end: {big.rate:.2f} images/s, steady {big.steady:.2f}"
    if best is not None:
        line += f" ({big.rate / best.rate:.2f} and {big.steady / best.rate:.2f} of the best loop)"
    print(line)


if __name__ == "__main__":
    raise SystemExit(main())
