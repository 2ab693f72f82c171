"""What multi-scale + flip inference buys, and which batching of mixed sizes is faster.

    python benchmarks/multiscale.py [--images 60] [--weights URI ...]

1. Held-out synthetic mIoU (seeds disjoint from training and the demo bucket; varied scene sizes)
   of the demo checkpoint for scales {1.0}, DeepLab's {0.5 ... 1.75}, and that plus flip, with
   probabilities and with logits averaged, for each checkpoint given (default: the bundled one).
   Statistics are summed over images, divided once.
2. images/s of "bucket" batching (same-size images share a forward; exact) vs "pad" batching
   (a batch zero-padded to its largest image; one forward) on the first 32 held-out scenes' mixed sizes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.checkpoints import normalisation
from pipeline.config import InferenceConfig
from pipeline.inference import class_map, infer_batch, load_model
from pipeline.metrics import DatasetSummary, image_stats, trimap_accuracy
from pipeline.synthetic import make_scene, varied_spec

EVAL_SEEDS_START = 1_500_000  # disjoint from training (0..), held-out (1_000_000..) and demo (2_000_000..)
DEEPLAB_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--weights", nargs="+", metavar="URI", help="demo-model checkpoints to compare (default: the bundled one)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    mean, std = normalisation()
    scenes = [make_scene(s, varied_spec(s)) for s in range(EVAL_SEEDS_START, EVAL_SEEDS_START + args.images)]
    for uri in args.weights or [None]:
        model, sha, categories = load_model("deeplabv3plus_demo", uri)
        n = len(categories)
        print(
            f"\nheld-out synthetic mIoU, {len(scenes)} scenes of varied size, checkpoint {uri or 'bundled'} "
            f"(sha256 {sha[:12]})"
        )
        print(f"{'setting':36} {'mIoU':>7} {'pix acc':>8} {'trimap':>7} {'s/img':>7}")
        for name, config in (
            ("scale 1.0", InferenceConfig()),
            ("scale 1.0 + flip", InferenceConfig(flip=True)),
            ("scales 0.5-1.75", InferenceConfig(scales=DEEPLAB_SCALES)),
            ("scales 0.5-1.75 + flip", InferenceConfig(scales=DEEPLAB_SCALES, flip=True)),
            ("scales 0.5-1.75 + flip, logits avg", InferenceConfig(scales=DEEPLAB_SCALES, flip=True, average="logits")),
        ):
            totals = np.zeros((3, n), np.int64)
            correct = total = 0
            start = time.perf_counter()
            for image, label in scenes:
                pred = class_map(infer_batch(model, [image], mean=mean, std=std, config=config)[0]).numpy()
                s = image_stats(pred, label, n)
                totals += np.stack([s.intersect, s.union, s.label_area])
                c, t = trimap_accuracy(pred, label)
                correct, total = correct + c, total + t
            seconds = (time.perf_counter() - start) / len(scenes)
            summary = DatasetSummary.from_sums(*totals)
            print(f"{name:36} {summary.miou:7.4f} {summary.pixel_acc:8.4f} {correct / total:7.4f} {seconds:7.3f}")

    images = [image for image, _ in scenes[:32]]
    print(f"\nbatching of mixed sizes ({len(images)} images, batch 8, scale 1.0)")
    for batching in ("bucket", "pad"):
        config = InferenceConfig(batching=batching)
        infer_batch(model, images[:2], mean=mean, std=std, config=config)  # warm-up
        start = time.perf_counter()
        for i in range(0, len(images), 8):
            infer_batch(model, images[i : i + 8], mean=mean, std=std, config=config)
        print(f"{batching:8} {len(images) / (time.perf_counter() - start):7.2f} images/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
