"""Tune the dense CRF's appearance kernel on a labelled subset, as the DeepLab authors did on val.

    python jobs/tune_crf.py                       # demo bucket, demo checkpoint, default grid
    python jobs/tune_crf.py s3://b/val/images --labels s3://b/val/labels --model ... \
        --weights ... --limit 50 --random 40

The network runs once per image (multi-scale as given); every CRF setting is then a Ray task over
the whole subset, so settings run in parallel across the cluster. Prints the mIoU / boundary
(trimap) accuracy table and the flags that pass the best setting back to segment_bucket.py.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config.flags import parse_scales
from pipeline.config.sections import CRFParams
from pipeline.dag.cluster import init_ray
from pipeline.demo import DEMO_BUCKET
from pipeline.evaluation.metrics import format_score, image_stats, summarise, trimap_accuracy
from pipeline.io.images import MAX_IMAGE_BYTES, MAX_LABEL_BYTES, decode_image
from pipeline.io.palette import label_to_mask
from pipeline.io.storage import list_inputs
from pipeline.models import DEFAULT_MODEL, default_weights
from pipeline.models.weights import Weights

# DeepLab v1's search ranges (Sec. 4.1): w1 in [3:6], θα in [30:10:100], θβ in [3:6]; widened on
# θβ because JPEG noise in real buckets is larger than in PASCAL's originals.
DEFAULT_GRID = {
    "bilateral_sxy": (30.0, 50.0, 67.0, 80.0),
    "bilateral_srgb": (3.0, 5.0, 8.0, 13.0),
    "bilateral_compat": (3.0, 4.0, 6.0, 10.0),
}


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def evaluate(samples: list, params: CRFParams, num_classes: int, band: int) -> dict:
    """mIoU and trimap accuracy of one CRF setting over the subset (stats summed, divided once)."""
    from pipeline.crf.densecrf import dense_crf

    stats = []
    correct = total = 0
    start = time.perf_counter()
    for image, probs, label in samples:
        pred = dense_crf(image, probs, params) if params is not None else probs.argmax(0).astype(np.uint8)
        stats.append(image_stats(pred, label, num_classes))
        c, t = trimap_accuracy(pred, label, band)
        correct, total = correct + c, total + t
    summary = summarise(stats, num_classes)
    return {
        "miou": summary.miou,
        "pixel_acc": summary.pixel_acc,
        "trimap_acc": correct / max(total, 1),
        "ms_per_image": 1000 * (time.perf_counter() - start) / len(samples),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", nargs="?", help="images (default: the bundled demo bucket)")
    parser.add_argument("--labels", help="label PNGs paired by key (default: the demo bucket's)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--weights", help="checkpoint URI (default: the model's published weights)")
    parser.add_argument("--scales", type=parse_scales, default=(1.0,))
    parser.add_argument("--flip", action="store_true")
    parser.add_argument("--limit", type=int, default=12, help="labelled images to tune on")
    for flag, name, symbol in (
        ("--sxy", "bilateral_sxy", "θα"),
        ("--srgb", "bilateral_srgb", "θβ"),
        ("--compat", "bilateral_compat", "w1"),
    ):
        parser.add_argument(flag, type=_floats, default=DEFAULT_GRID[name], help=f"bilateral {symbol} values")
    parser.add_argument("--random", type=int, metavar="N", help="sample N settings from the grid instead of all")
    parser.add_argument("--iterations", type=int, default=CRFParams().iterations)
    parser.add_argument("--band", type=int, default=4, help="trimap band width in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ray-address")
    parser.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    return parser


def weights_used(model: str, weights_uri: str | None) -> Weights:
    """The weight set the segmentation job takes for ``--model``/``--weights``: the model's
    default one, else the given file (ImageNet statistics, as ``pipeline.job`` assumes)."""
    if weights_uri is None:
        return default_weights(model)
    return Weights(model=model, uri=weights_uri, sha256=None, categories=())


def load_samples(args: argparse.Namespace, input_uri: str, labels_uri: str) -> tuple[list, tuple[str, ...]]:
    """(image, averaged probabilities, label) for up to ``--limit`` labelled images, and the
    class names: the network runs once per image, normalised as its weights were trained."""
    from pipeline.inference.multiscale import load_model, predict_probs

    model, _, categories = load_model(args.model, args.weights)
    mean, std = weights_used(args.model, args.weights).normalisation()
    inputs = list_inputs(input_uri, labels_uri)
    locator = inputs.locator()
    samples = []
    for key in inputs.keys.to_pylist():
        try:  # exact reads, bounded decoding: the job's own rules (pipeline/io/images.py)
            label_bytes = locator.read_label(key, MAX_LABEL_BYTES)
        except FileNotFoundError:
            continue
        image = decode_image(locator.read_image(key, MAX_IMAGE_BYTES)).rgb
        label = label_to_mask(label_bytes, image.shape[:2])
        probs = predict_probs(model, image, mean=mean, std=std, scales=args.scales, flip=args.flip).numpy()
        samples.append((image, probs, label))
        if len(samples) >= args.limit:
            break
    return samples, categories


def settings_to_try(args: argparse.Namespace) -> list[CRFParams]:
    """The grid of appearance-kernel settings, or ``--random`` of them."""
    settings = [
        replace(CRFParams(iterations=args.iterations), bilateral_sxy=a, bilateral_srgb=b, bilateral_compat=c)
        for a, b, c in itertools.product(args.sxy, args.srgb, args.compat)
    ]
    if args.random and args.random < len(settings):
        pick = np.random.default_rng(args.seed).choice(len(settings), args.random, replace=False)
        settings = [settings[i] for i in sorted(pick)]
    return settings


def print_table(baseline: dict, rows: list[tuple[CRFParams, dict]]) -> None:
    """The results, best mIoU first, and the flags that pass the best setting back."""
    print(f"\n{'sxy':>6} {'srgb':>6} {'compat':>6} | {'mIoU':>7} {'trimap':>7} {'ms/img':>7}")
    print(f"{'no CRF':>20} | {baseline['miou']:7.4f} {baseline['trimap_acc']:7.4f}")
    for p, r in rows:
        print(
            f"{p.bilateral_sxy:6g} {p.bilateral_srgb:6g} {p.bilateral_compat:6g} | "
            f"{r['miou']:7.4f} {r['trimap_acc']:7.4f} {r['ms_per_image']:7.1f}"
        )
    best, result = rows[0]
    print(
        f"\nbest: mIoU {format_score(result['miou'])} (no CRF {format_score(baseline['miou'])}), "
        f"trimap {result['trimap_acc']:.4f} (no CRF {baseline['trimap_acc']:.4f})"
    )
    print(
        f"pass back: --crf-bilateral-sxy {best.bilateral_sxy:g} "
        f"--crf-bilateral-srgb {best.bilateral_srgb:g} "
        f"--crf-bilateral-compat {best.bilateral_compat:g}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import ray

    input_uri = args.input or str(DEMO_BUCKET / "images")
    labels_uri = args.labels or (str(DEMO_BUCKET / "labels") if args.input is None else None)
    if not labels_uri:
        parser.error("--labels is required: tuning needs ground truth")
    samples, categories = load_samples(args, input_uri, labels_uri)
    if not samples:
        parser.error(f"no labelled images under {input_uri}")
    print(f"tuning on {len(samples)} labelled images ({len(categories)} classes)", flush=True)
    settings = settings_to_try(args)

    init_ray(args.ray_address)
    shared = ray.put(samples)
    task = ray.remote(num_cpus=1)(evaluate)
    baseline = evaluate(samples, None, len(categories), args.band)
    results = ray.get([task.remote(shared, p, len(categories), args.band) for p in settings])

    rows = sorted(zip(settings, results, strict=True), key=lambda r: -(r[1]["miou"] or 0))
    print_table(baseline, rows)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"baseline": baseline, "results": [{**asdict(p), **r} for p, r in rows]}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
