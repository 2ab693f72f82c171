"""Throughput against the bare loop: the job's CLI, end to end and in steady state, vs the best a
plain script gets from the same machine, CRF off and on, and Ray's own floor.

    python benchmarks/ceiling.py                                  # CPU: 480 images CRF off, 240 CRF on, 3 rounds
    python benchmarks/ceiling.py --images-on 0 --images-off 3000 --rounds 2      # GPU machine (the loop: DataLoader)
    python benchmarks/ceiling.py --images-off 16 --images-on 8 --rounds 1       # a dry run of this script
    python benchmarks/ceiling.py --model deeplabv3_mobilenet_v3_large --images-on 0   # a model of real size

The bare loop (``--loop``, default: dataloader with CUDA, per-core without), in a fresh interpreter
(its imports and model load count), on a synthetic bucket (160-320 x 200-400 scenes), demo model
(``--model``: another builder on a made checkpoint, for both),
default InferenceConfig, DeepLab v2 CRF on uint8-quantised probabilities, as the job:

- per-core: one process per core (``--procs``), one torch thread each, a strided share of the
  images each: read → decode_image → infer_batch → class_map, or the CRF (pydensecrf) → PNG file.
- dataloader: one process; a torch DataLoader's workers decode batches of the job's batch size,
  the main process runs infer_batch (and the torch CRF, merged) on the device, a thread pool writes PNGs.

The job: ``jobs/segment_bucket.py IMAGES --rows-per-file 16 [--no-crf]`` on the Ray head it starts.
Steady state: images/s after the first 10 % of the images (the loop: each PNG's time; the job: part
files' mtimes). Ray's floor: the job's CPU plan (keys in blocks → one 1-CPU actor per loop process →
a writer actor) with stages that return their batch untouched, through the job's own ``init_ray``:
what Ray costs with no work. Rounds are interleaved (loop, job, floor) and each ratio is the
median of the ratios within a round; masks are compared key by key (the loop's PNG vs the job's).
Results: benchmarks/results/ceiling-<time>.json (harness.save).
"""

from __future__ import annotations

import time

T_MODULE = time.time()  # "python started" for the floor: before any other import

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

NAME = "ceiling"


# ---------------------------------------------------------------------------------------- the loops


def _model(device: str, name: str, weights: str | None):
    """The model the job runs (``name``, ``weights``; None: its published weights) and its normalisation."""
    from pipeline.inference.multiscale import load_model
    from pipeline.models import default_weights
    from pipeline.models.weights import normalisation

    model = load_model(name, weights)[0].to(device)
    return model, *(default_weights(name).normalisation(device) if weights is None else normalisation(device=device))


def made_checkpoint(name: str, folder: Path) -> Path:
    """A checkpoint of ``name`` (the demo's 6 classes, seeded initialisation) for a model with no
    published weights here: what the forward costs, not what it predicts, is measured."""
    import torch
    from safetensors.torch import save_file

    from pipeline.models import build_model, default_weights

    path = folder / f"{name}.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        categories = default_weights(harness.MODEL).categories
        state = build_model(name, num_classes=len(categories)).state_dict()
        tensors = {k: v.contiguous() for k, v in state.items()}
        save_file(tensors, str(path), metadata={"categories": json.dumps(categories)})
    return path


def per_core_worker(paths: list[str], out_dir: str, crf: bool, name: str, weights: str | None) -> list[float]:
    """One process of the per-core loop: its images one after another, one torch thread."""
    import torch

    torch.set_num_threads(1)
    from pipeline.config.sections import CRFParams, InferenceConfig
    from pipeline.crf.densecrf import dense_crf
    from pipeline.inference.multiscale import class_map, infer_batch
    from pipeline.io.images import decode_image
    from pipeline.io.palette import mask_to_png
    from pipeline.rows.probs import quantise_probs

    model, mean, std = _model("cpu", name, weights)
    config, params, done = InferenceConfig(), CRFParams(), []
    for path in paths:
        rgb = decode_image(Path(path).read_bytes()).rgb
        probs = infer_batch(model, [rgb], mean=mean, std=std, config=config)[0]
        if crf:  # as the job: the CRF refines the probabilities quantised to --probs-encoding
            mask = dense_crf(rgb, quantise_probs(probs, config.probs_encoding).numpy(), params)
        else:
            mask = class_map(probs).numpy()
        Path(out_dir, Path(path).name + ".png").write_bytes(mask_to_png(mask))
        done.append(time.time())
    return done


class _Decoded:
    """DataLoader dataset: item i is (path, decoded RGB) of ``paths[i]``, made in a worker process."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from pipeline.io.images import decode_image

        return self.paths[i], decode_image(Path(self.paths[i]).read_bytes()).rgb


def dataloader_loop(paths: list[str], out_dir: str, crf: bool, name: str, weights: str | None) -> list[float]:
    """The GPU loop: DataLoader workers decode, the device infers (and refines), threads write PNGs."""
    import torch

    from pipeline.config.sections import ComputeConfig, CRFParams, InferenceConfig
    from pipeline.crf.torch_port import dense_crf_torch_batch
    from pipeline.inference.multiscale import class_map, infer_batch
    from pipeline.io.palette import mask_to_png
    from pipeline.rows.probs import quantise_probs

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, mean, std = _model(device, name, weights)
    config, params, done = InferenceConfig(), CRFParams(), []
    workers = max(1, min(16, (os.cpu_count() or 2) - 1))
    batch = ComputeConfig().batch_size
    loader = torch.utils.data.DataLoader(
        _Decoded(paths), batch_size=batch, num_workers=workers, collate_fn=list, prefetch_factor=4
    )

    def write(path: str, mask) -> None:
        Path(out_dir, Path(path).name + ".png").write_bytes(mask_to_png(mask))
        done.append(time.time())

    with ThreadPoolExecutor(4) as pool:
        for items in loader:
            probs = infer_batch(model, [rgb for _, rgb in items], mean=mean, std=std, config=config)
            if crf:
                quantised = [quantise_probs(p, config.probs_encoding) for p in probs]
                masks = dense_crf_torch_batch([rgb for _, rgb in items], quantised, params)
            else:
                masks = [class_map(p) for p in probs]
            for (path, _), mask in zip(items, masks, strict=True):
                pool.submit(write, path, mask.cpu().numpy())
    return sorted(done)


def loop_main(kind: str, images: str, out_dir: str, procs: int, crf: bool, name: str, weights: str | None) -> None:
    """The loop's process (sampled by the parent): writes each PNG's time to out_dir/_times.json."""
    import multiprocessing as mp

    paths = sorted(str(p) for p in Path(images).glob("*.jpg"))
    if kind == "dataloader":
        done = dataloader_loop(paths, out_dir, crf, name, weights)
    else:
        with mp.get_context("spawn").Pool(procs) as pool:
            shares = [(paths[i::procs], out_dir, crf, name, weights) for i in range(procs)]
            done = sorted(t for times in pool.starmap(per_core_worker, shares) for t in times)
    Path(out_dir, "_times.json").write_text(json.dumps(done))


def run_loop(kind: str, images: Path, out: Path, count: int, procs: int, crf: bool, model: list[str]) -> dict:
    """The loop in a fresh interpreter; ``model``: the job's ``--model``/``--weights`` flags, if any."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = [harness.PYTHON, __file__, "--loop-main", kind, str(images), str(out), str(procs), *model] + ["--crf"] * crf
    run = harness.run(cmd)
    events = [(t, 1) for t in json.loads((out / "_times.json").read_text())]
    window = harness.steady_window(events, count)
    steady = harness.steady_rate(events, count)
    return {
        "images_per_s": round(count / run.seconds, 3),
        "steady_images_per_s": steady and round(steady, 3),
        "first_result_s": round(events[0][0] - run.start, 2),
        "fixed_overhead_s": steady and round(run.seconds - count / steady, 2),
        "steady_cores": run.sampler.cores(window[0], window[2]) if window else {},
        "steady_gpu": run.sampler.gpu_mean(window[0], window[2]) if window else None,
        **run.summary(),
    }


# ---------------------------------------------------------------------------------------- Ray's floor


def floor_main(images: int, procs: int) -> None:
    """In a fresh interpreter: the job's CPU plan with stages that do nothing; prints its marks."""
    import pyarrow as pa
    import ray

    from pipeline.config.sections import ComputeConfig
    from pipeline.dag.cluster import init_ray

    class Idle:  # defined here: pickled by value, so the workers import nothing of the benchmark
        def __call__(self, batch):
            return batch

    batch = ComputeConfig().batch_size
    imported = time.time()
    init_ray(None)
    started = time.time()
    keys = pa.table({"key": [f"k{i}" for i in range(images)]})
    ds = ray.data.from_blocks([keys.slice(i, batch) for i in range(0, images, batch)])
    ds.context.memory_usage_poll_interval_s = None  # as the job's DAG
    pool = ray.data.ActorPoolStrategy
    ds = ds.map_batches(Idle, batch_size=batch, num_cpus=1, compute=pool(min_size=procs, max_size=procs))
    ds = ds.map_batches(Idle, batch_size=batch, num_cpus=0, compute=pool(min_size=1, max_size=1))
    first = None
    for _ in ds.iter_batches(batch_size=None):
        first = first or time.time()
    marks = {"python_started": T_MODULE, "imported": imported, "ray_started": started, "first": first}
    ray.shutdown()
    print("FLOOR " + json.dumps(marks | {"last": time.time()}), flush=True)


def run_floor(images: int, procs: int) -> dict:
    run = harness.run([harness.PYTHON, __file__, "--floor-main", str(images), str(procs)])
    line = next(ln for _, ln in run.lines if ln.startswith("FLOOR "))
    marks = json.loads(line[len("FLOOR ") :])
    return {
        "first_result_s": round(marks["first"] - run.start, 2),
        "ray_init_s": round(marks["ray_started"] - marks["imported"], 2),
        **run.summary(),
    }


# ------------------------------------------------------------------------------------------- measure


def measure(args, tmp: Path, crf: bool, count: int) -> dict:
    tag = "crf-on" if crf else "crf-off"
    images = harness.synthetic_bucket(tmp / f"bucket-{count}", count, 3_000_000)
    made = args.model != harness.MODEL
    model = ["--model", args.model, "--weights", str(made_checkpoint(args.model, tmp))] if made else []
    rounds = []
    for r in range(args.rounds):
        harness.log(NAME, f"{count} images, CRF {'on' if crf else 'off'}, round {r + 1}/{args.rounds}: loop")
        loop = run_loop(args.loop, images, tmp / f"loop-{tag}", count, args.procs, crf, model)
        harness.log(NAME, f"  loop {loop['seconds']:.1f} s, steady {loop['steady_images_per_s']}; the job")
        flags = ["--rows-per-file", "16", *model] + ([] if crf else ["--no-crf"]) + args.job_flags
        job = harness.run_cli(images, tmp / f"out-{tag}", f"r{r}", count, *flags)
        summary = job.summary() | {"masks_vs_loop": harness.compare_masks(tmp / f"loop-{tag}", job.run_dir)}
        harness.log(NAME, f"  job {summary['seconds']:.1f} s, steady {summary['steady_images_per_s']}")
        row = {"loop": loop, "job": summary}
        if not args.skip_floor:
            row["floor"] = run_floor(count, args.procs)
            harness.log(NAME, f"  Ray's floor: first result {row['floor']['first_result_s']} s")
        row["job_vs_loop"] = {
            "end_to_end": harness.ratio(summary["images_per_s"], loop["images_per_s"]),
            "steady": harness.ratio(summary["steady_images_per_s"], loop["steady_images_per_s"]),
        }
        rounds.append(row)
    medians = {
        f"{side}_{key}": harness.median(r[side].get(key) for r in rounds)
        for side in ("loop", "job", "floor")
        for key in ("images_per_s", "steady_images_per_s", "first_result_s", "seconds")
        if side in rounds[0]
    }
    ratios = {k: harness.median(r["job_vs_loop"][k] for r in rounds) for k in ("end_to_end", "steady")}
    return {
        "images": count,
        "crf": crf,
        "model": args.model,
        "loop": args.loop,
        "rounds": rounds,
        "medians": medians,
        "ratios": ratios,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--images-off", type=int, default=480, help="images of the CRF-off workload (0: skip)")
    add("--images-on", type=int, default=240, help="images of the CRF-on workload (0: skip)")
    add("--procs", type=int, default=os.cpu_count() or 1, help="per-core loop: processes; the floor: actors")
    add("--rounds", type=int, default=3)
    add("--loop", choices=("auto", "per-core", "dataloader"), default="auto", help="auto: dataloader with CUDA")
    add("--skip-floor", action="store_true", help="no Ray floor runs")
    add("--model", default=harness.MODEL, help="the loop's and the job's model; not the demo: on a made checkpoint")
    add("--job-flags", nargs=argparse.REMAINDER, default=[], help="more CLI flags for the job (last)")
    add("--keep", type=Path, help="write buckets and outputs here and keep them")
    add("--loop-main", nargs=4, metavar=("KIND", "IMAGES", "OUT", "PROCS"), help=argparse.SUPPRESS)
    add("--weights", help=argparse.SUPPRESS)  # the loop's: a made checkpoint of --model
    add("--crf", action="store_true", help=argparse.SUPPRESS)
    add("--floor-main", nargs=2, type=int, help=argparse.SUPPRESS)
    harness.add_results_arg(parser)
    args = parser.parse_args()
    if args.loop_main:
        kind, images, out, procs = args.loop_main
        loop_main(kind, images, out, int(procs), args.crf, args.model, args.weights)
        return 0
    if args.floor_main:
        floor_main(*args.floor_main)
        return 0
    if args.loop == "auto":
        import torch

        args.loop = "dataloader" if torch.cuda.is_available() else "per-core"
    results = []
    with tempfile.TemporaryDirectory(prefix="ceiling-") as scratch:
        tmp = args.keep or Path(scratch)
        for crf, count in ((False, args.images_off), (True, args.images_on)):
            if count:
                results.append(measure(args, tmp, crf, count))
    for w in results:
        print(f"{w['images']} images, CRF {'on' if w['crf'] else 'off'}: job / loop {w['ratios']}; {w['medians']}")
    harness.save(NAME, args, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
