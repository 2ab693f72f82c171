"""Models: size and speed of every DeepLab builder, and what multi-scale inference buys the demo model.

    python benchmarks/models.py                                     # every model (slow on CPU)
    python benchmarks/models.py --models deeplabv3_mobilenet_v3_large,deeplabv3plus_demo --parts sizes
    python benchmarks/models.py --parts multiscale [--images 40] [--weights URI ...]
    python benchmarks/models.py --models deeplabv3plus_demo --size 129 --repeats 1 --images 2   # dry run

sizes: parameters, GFLOPs (torch's FlopCounterMode, which counts a multiply-add as 2 FLOPs) for one
  ``--size`` image (513: the papers' PASCAL VOC crop), CPU latency at batch 1 with ``--threads``
  threads (median of ``--repeats`` after one warm-up), and with CUDA the GPU latency and throughput
  at batch 8 under bf16 autocast (fp16 where bf16 is unsupported). Each builder's defaults.
multiscale: held-out synthetic mIoU, pixel and trimap accuracy of the demo checkpoint (or each
  ``--weights``) at scale 1.0, DeepLab's 0.5-1.75, each with flip, and logits averaged; seconds per
  image; then images/s of "bucket" batching (same-size images share a forward) vs "pad" (a batch
  zero-padded to its largest image) on 32 scenes of mixed sizes.
Results: benchmarks/results/models-<time>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

from pipeline.models import MODEL_BUILDERS

NAME = "models"
HELD_OUT = 1_500_000  # scene seeds disjoint from training (0..), held-out (1_000_000..) and the demo (2_000_000..)
DEEPLAB_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def gflops(model: torch.nn.Module, size: int) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def timed(fn, repeats: int, sync=lambda: None) -> float:
    """Median seconds of ``repeats`` calls after one untimed warm-up call."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_ms(model: torch.nn.Module, size: int, repeats: int) -> float:
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        return timed(lambda: model(x), repeats) * 1000


def gpu_cell(model: torch.nn.Module, size: int, batch: int, repeats: int) -> dict | None:
    if not torch.cuda.is_available():
        return None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    model = model.cuda().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device="cuda").contiguous(memory_format=torch.channels_last)

    def run():
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
            model(x)

    run()  # cudnn picks its algorithms on the first call of each shape
    seconds = timed(run, max(repeats, 10), torch.cuda.synchronize)
    model.cpu()
    torch.cuda.empty_cache()
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    return {"ms_per_image": seconds / batch * 1000, "images_per_s": batch / seconds, "precision": name, "batch": batch}


def sizes(args, names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        torch.manual_seed(0)
        model = MODEL_BUILDERS[name]().eval()
        row = {
            "model": name,
            "output_stride": model.output_stride,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "gflops": gflops(model, args.size),
            "cpu_ms": cpu_ms(model, args.size, args.repeats),
            "cpu_threads": args.threads,
            "gpu": gpu_cell(model, args.size, args.gpu_batch, args.repeats),
        }
        harness.log(NAME, str(row))
        rows.append(row)
    return rows


def multiscale(args) -> dict:
    import numpy as np

    from pipeline.config.sections import InferenceConfig
    from pipeline.demo.synthetic import make_scene, varied_spec
    from pipeline.evaluation.metrics import DatasetSummary, image_stats, trimap_accuracy
    from pipeline.inference.multiscale import class_map, infer_batch, load_model
    from pipeline.models import default_weights

    mean, std = default_weights(harness.MODEL).normalisation()
    scenes = [make_scene(s, varied_spec(s)) for s in range(HELD_OUT, HELD_OUT + args.images)]
    settings = {
        "scale 1.0": InferenceConfig(),
        "scale 1.0 + flip": InferenceConfig(flip=True),
        "scales 0.5-1.75": InferenceConfig(scales=DEEPLAB_SCALES),
        "scales 0.5-1.75 + flip": InferenceConfig(scales=DEEPLAB_SCALES, flip=True),
        "scales 0.5-1.75 + flip, logits averaged": InferenceConfig(scales=DEEPLAB_SCALES, flip=True, average="logits"),
    }
    out: dict = {"checkpoints": {}}
    for uri in args.weights or [None]:
        model, sha, categories = load_model(harness.MODEL, uri)
        rows = {}
        for name, config in settings.items():
            totals, correct, total = np.zeros((3, len(categories)), np.int64), 0, 0
            start = time.perf_counter()
            for image, label in scenes:
                pred = class_map(infer_batch(model, [image], mean=mean, std=std, config=config)[0]).numpy()
                s = image_stats(pred, label, len(categories))
                totals += np.stack([s.intersect, s.union, s.label_area])
                c, t = trimap_accuracy(pred, label)
                correct, total = correct + c, total + t
            summary = DatasetSummary.from_sums(*totals)
            rows[name] = {"miou": summary.miou, "pixel_acc": summary.pixel_acc, "trimap_acc": correct / total,
                          "s_per_image": (time.perf_counter() - start) / len(scenes)}  # fmt: skip
            harness.log(NAME, f"{uri or 'bundled'} {name}: {rows[name]}")
        out["checkpoints"][uri or f"bundled (sha256 {sha[:12]})"] = rows
    images = [image for image, _ in scenes[:32]]
    for batching in ("bucket", "pad"):
        config = InferenceConfig(batching=batching)
        infer_batch(model, images[:2], mean=mean, std=std, config=config)  # warm-up
        start = time.perf_counter()
        for i in range(0, len(images), 8):
            infer_batch(model, images[i : i + 8], mean=mean, std=std, config=config)
        out[f"batching_{batching}_images_per_s"] = len(images) / (time.perf_counter() - start)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="sizes,multiscale", help="comma-separated: sizes, multiscale")
    parser.add_argument("--models", default=",".join(MODEL_BUILDERS), help="sizes: comma-separated builder names")
    parser.add_argument("--size", type=int, default=513)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch (default: 2)")
    parser.add_argument("--repeats", type=int, default=2, help="timed CPU runs per model (default: 2)")
    parser.add_argument("--gpu-batch", type=int, default=8)
    parser.add_argument("--images", type=int, default=40, help="multiscale: held-out scenes")
    parser.add_argument("--weights", nargs="+", metavar="URI", help="multiscale: demo-model checkpoints")
    harness.add_results_arg(parser)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = sorted(set(names) - set(MODEL_BUILDERS))
    if unknown:
        parser.error(f"unknown models {', '.join(unknown)}; choose from {', '.join(MODEL_BUILDERS)}")
    torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True
    results = {}
    for part in args.parts.split(","):
        results[part] = sizes(args, names) if part == "sizes" else multiscale(args)
    harness.save(NAME, args, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
