"""Train the bundled demo checkpoint from scratch on the synthetic dataset (CPU, minutes).

    python jobs/train_demo.py           # writes pipeline/demo/assets/deeplabv3plus_demo.safetensors
    python jobs/train_demo.py --steps 200 --out /tmp/ckpt.safetensors   # a quick smoke run

Prints the held-out mIoU (synthetic seeds disjoint from training and from the demo bucket) and
the checkpoint's sha256, which go into ``DEMO_WEIGHTS`` beside the builder (``pipeline/models/deeplabv3plus.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.demo.synthetic import CLASS_NAMES, SceneSpec, make_scene, varied_spec
from pipeline.evaluation.metrics import DatasetSummary, image_stats, summarise
from pipeline.io.palette import IGNORE_INDEX
from pipeline.models import build_model
from pipeline.models.deeplabv3plus import DEMO_WEIGHTS
from pipeline.models.weights import IMAGENET_MEAN, normalisation

HELD_OUT_SEEDS = range(1_000_000, 1_000_200)  # the demo bucket uses 2_000_000+


def to_tensor(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean, std = normalisation()
    return (x - mean) / std


def make_split(seeds, spec: SceneSpec) -> tuple[np.ndarray, np.ndarray]:
    pairs = [make_scene(s, spec) for s in seeds]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def random_crops(
    scenes: list[tuple[np.ndarray, np.ndarray]],
    rng: np.random.Generator,
    n: int,
    crop: int,
    scale_range: tuple[float, float] = (1.0, 1.0),
):
    """``n`` random square crops (and their labels) from scenes of varied size, randomly mirrored.

    With a ``scale_range`` other than (1, 1) each scene is first resized by a random factor in it
    (DeepLab's random-scale augmentation is 0.5-2.0) and padded where it became smaller than the
    crop (image: the mean colour; label: ignore). The bundled checkpoint was trained without it
    (README, "Benchmarks", says what it changes)."""
    xs, ys = [], []
    mean_rgb = np.round(np.array(IMAGENET_MEAN) * 255).astype(np.uint8)
    for i in rng.integers(0, len(scenes), n):
        image, label = scenes[i]
        # No draw at (1, 1): the random stream, and so the bundled checkpoint, stay reproducible.
        scale = rng.uniform(*scale_range) if scale_range != (1.0, 1.0) else 1.0
        if scale != 1.0:
            size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
            image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
            label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
        pad_h, pad_w = max(0, crop - image.shape[0]), max(0, crop - image.shape[1])
        if pad_h or pad_w:
            right = np.broadcast_to(mean_rgb, (image.shape[0], pad_w, 3))
            image = np.concatenate([image, right], axis=1)
            image = np.concatenate([image, np.broadcast_to(mean_rgb, (pad_h, image.shape[1], 3))], axis=0)
            label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=IGNORE_INDEX)
        top = rng.integers(0, image.shape[0] - crop + 1)
        left = rng.integers(0, image.shape[1] - crop + 1)
        window = (slice(top, top + crop), slice(left, left + crop))
        x, y = image[window], label[window]
        if rng.random() < 0.5:
            x, y = x[:, ::-1], y[:, ::-1]
        xs.append(x)
        ys.append(y)
    return np.ascontiguousarray(np.stack(xs)), np.ascontiguousarray(np.stack(ys))


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, batch: int = 10) -> DatasetSummary:
    model.eval()
    n = len(CLASS_NAMES)

    def stats():
        for i in range(0, len(images), batch):
            pred = model(to_tensor(images[i : i + batch])).argmax(1).numpy()
            yield from (image_stats(p, t, n) for p, t in zip(pred, labels[i : i + batch], strict=True))

    return summarise(stats(), n)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps (default: 3000)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--crop", type=int, default=160, help="square training crop size in pixels")
    parser.add_argument(
        "--scale-min",
        type=float,
        default=1.0,
        help="random-scale augmentation, smallest factor (DeepLab: 0.5; default: off)",
    )
    parser.add_argument(
        "--scale-max",
        type=float,
        default=1.0,
        help="random-scale augmentation, largest factor (DeepLab: 2.0; default: off)",
    )
    parser.add_argument("--train-scenes", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=DEMO_WEIGHTS.uri)
    args = parser.parse_args(argv)
    if not 0 < args.scale_min <= args.scale_max:
        parser.error(f"--scale-min/--scale-max must satisfy 0 < MIN <= MAX, got {args.scale_min} and {args.scale_max}")
    return args


def train(model: torch.nn.Module, scenes: list, rng: np.random.Generator, args: argparse.Namespace) -> float:
    """Optimise ``model`` on random crops of ``scenes``; returns the seconds it took."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    # Poly decay as in the DeepLab papers, with a short linear warm-up.
    warmup = max(1, args.steps // 30)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (1 - s / args.steps) ** 0.9
    )
    t0 = time.time()
    model.train()
    for step in range(args.steps):
        x, y = random_crops(scenes, rng, args.batch_size, args.crop, (args.scale_min, args.scale_max))
        logits = model(to_tensor(x))
        loss = F.cross_entropy(logits, torch.from_numpy(y).long(), ignore_index=IGNORE_INDEX)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == args.steps - 1:
            rate = (step + 1) / (time.time() - t0)
            eta = (args.steps - step - 1) / rate
            print(
                f"step {step:5d}/{args.steps} loss {loss.item():.4f} "
                f"lr {schedule.get_last_lr()[0]:.2e} {rate:.2f} it/s eta {eta / 60:.1f} min",
                flush=True,
            )
    return time.time() - t0


def save(model: torch.nn.Module, summary: DatasetSummary, args: argparse.Namespace) -> Path:
    """The checkpoint with its metadata (model, classes, held-out mIoU, training settings)."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "model": DEMO_WEIGHTS.model,
        "categories": json.dumps(CLASS_NAMES),
        "held_out_miou": f"{summary.miou:.4f}",
        "steps": str(args.steps),
    }
    if (args.scale_min, args.scale_max) != (1.0, 1.0):
        metadata["scale_augmentation"] = f"{args.scale_min}-{args.scale_max}"
    save_file(state, str(out), metadata=metadata)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    # Training scenes have the demo bucket's varied sizes (objects scale with the scene), so the
    # network sees the object scales it meets at inference time; it trains on square crops.
    scenes = [make_scene(s, varied_spec(s)) for s in range(args.train_scenes)]
    val_x, val_y = make_split(HELD_OUT_SEEDS, SceneSpec())
    print(f"generated {len(scenes)} training and {len(val_x)} held-out scenes in {time.time() - t0:.0f}s", flush=True)

    model = build_model(DEMO_WEIGHTS.model, num_classes=len(CLASS_NAMES))
    train_s = train(model, scenes, rng, args)
    summary = evaluate(model, val_x, val_y)
    out = save(model, summary, args)
    print(
        json.dumps(
            {
                "checkpoint": str(out),
                "bytes": out.stat().st_size,
                "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
                "train_minutes": round(train_s / 60, 1),
                "held_out_miou": round(summary.miou, 4),
                "held_out_pixel_acc": round(summary.pixel_acc, 4),
                "per_class_iou": {c: round(float(v), 4) for c, v in zip(CLASS_NAMES, summary.iou, strict=True)},
            },
            indent=2,
        )
    )
    return 0 if math.isfinite(summary.miou) else 1


if __name__ == "__main__":
    raise SystemExit(main())
