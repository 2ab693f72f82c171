"""Reduced-resolution CRF against the full one: synthetic held-out scenes and the VOC photo."""

from __future__ import annotations

import time

import numpy as np

from memory_budget_parts.photos import soft_probs, voc_photo


def _miou(pred: np.ndarray, label: np.ndarray, classes: int) -> float:
    from pipeline.metrics import image_stats

    return image_stats(pred, label, classes).miou


class _Dataset:
    """Dataset mIoU (intersections and unions summed over images, divided once), as the job reports it."""

    def __init__(self, classes: int) -> None:
        self.classes, self.intersect, self.union = classes, np.zeros(classes), np.zeros(classes)

    def add(self, pred: np.ndarray, label: np.ndarray) -> None:
        from pipeline.metrics import image_stats

        stats = image_stats(pred, label, self.classes)
        self.intersect += stats.intersect
        self.union += stats.union

    @property
    def miou(self) -> float:
        seen = self.union > 0
        return float((self.intersect[seen] / self.union[seen]).mean())


def _synthetic(scenes: int, scales: tuple[float, ...], params) -> None:
    """The held-out synthetic scenes through the demo model, full CRF vs each reduced scale."""
    import torch

    from pipeline.checkpoints import normalisation
    from pipeline.config import InferenceConfig
    from pipeline.crf import dense_crf, reduced_crf
    from pipeline.inference import infer_batch, load_model
    from pipeline.models.deeplabv3plus import DEMO_WEIGHTS as W
    from pipeline.synthetic import SceneSpec, make_scene

    model, _, _ = load_model(W.model, None)
    mean, std = normalisation(W.mean, W.std, torch.device("cpu"))
    rows = {s: {"agree": [], "miou": _Dataset(6), "s": []} for s in (1.0, *scales)}
    pre = _Dataset(6)
    for seed in range(1_000_000, 1_000_000 + scenes):  # the held-out split's seeds
        rgb, label = make_scene(seed, SceneSpec(height=720, width=960))
        probs = infer_batch(model, [rgb], mean=mean, std=std, config=InferenceConfig())[0].numpy()
        encoded = np.round(probs * 255).astype(np.uint8)
        pre.add(probs.argmax(0).astype(np.uint8), label)
        start = time.perf_counter()
        full = dense_crf(rgb, encoded.astype(np.float32) / 255)
        rows[1.0]["s"].append(time.perf_counter() - start)
        rows[1.0]["miou"].add(full, label)
        rows[1.0]["agree"].append(1.0)
        for s in scales:
            start = time.perf_counter()
            reduced = reduced_crf(rgb, encoded.tobytes(), "uint8", 6, s, params)
            rows[s]["s"].append(time.perf_counter() - start)
            rows[s]["agree"].append(float((reduced == full).mean()))
            rows[s]["miou"].add(reduced, label)
    print(f"synthetic held-out, {scenes} scenes 960x720, demo model; pre-CRF dataset mIoU {pre.miou:.4f}")
    print("| crf_scale | label agreement with full CRF | dataset mIoU vs label | CRF s |")
    print("|---:|---:|---:|---:|")
    for s, r in rows.items():
        print(f"| {s} | {np.mean(r['agree']):.4f} | {r['miou'].miou:.4f} | {np.mean(r['s']):.1f} |", flush=True)


def _voc(megapixels: float, scales: tuple[float, ...], params) -> None:
    """The VOC photo at ``megapixels``, its own classes, full CRF vs each scale and the default."""
    from pipeline.crf import dense_crf, reduced_crf

    rgb, label = voc_photo(megapixels)
    present = [int(c) for c in np.unique(label) if c != 255]
    compact = np.full_like(label, 255)
    for i, c in enumerate(present):
        compact[label == c] = i
    classes = len(present)
    encoded = np.round(soft_probs(compact, classes) * 255).astype(np.uint8)
    pre_miou = _miou(encoded.argmax(0).astype(np.uint8), compact, classes)
    print(
        f"\nVOC photo at {rgb.shape[1]}x{rgb.shape[0]}, its {classes} classes, probabilities "
        f"from the blurred, noised label; pre-CRF mIoU {pre_miou:.4f}"
    )
    print("| crf_scale | label agreement with full CRF | mIoU vs label | CRF s |")
    print("|---:|---:|---:|---:|")
    start = time.perf_counter()
    full = dense_crf(rgb, encoded.astype(np.float32) / 255)
    print(f"| 1.0 | 1.0000 | {_miou(full, compact, classes):.4f} | {time.perf_counter() - start:.1f} |", flush=True)
    from pipeline.memory import crf_scale

    default = crf_scale(*rgb.shape[:2], classes, None, params.max_pixels)
    for s in sorted({*scales, default}, reverse=True):
        start = time.perf_counter()
        reduced = reduced_crf(rgb, encoded.tobytes(), "uint8", classes, s, params)
        seconds = time.perf_counter() - start
        print(
            f"| {s}{' (default)' if s == default else ''} | {(reduced == full).mean():.4f} | "
            f"{_miou(reduced, compact, classes):.4f} | {seconds:.1f} |",
            flush=True,
        )


def quality(args) -> None:
    import torch

    from pipeline.config import CRFParams

    torch.set_num_threads(1)
    params = CRFParams()
    _synthetic(args.scenes, args.scales, params)
    if not args.voc_mp:
        return
    _voc(args.voc_mp, args.scales, params)
