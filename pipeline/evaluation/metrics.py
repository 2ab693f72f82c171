"""Segmentation metrics as per-image sufficient statistics (mmsegmentation / PASCAL VOC).

Per image we keep, for every class, the intersection, union and label area over the pixels whose
label is not ``ignore_index``. Those add up over a dataset; dataset IoU per class is
sum(intersect) / sum(union), and mIoU is the mean over classes with union > 0. We never average
per-image mIoUs (that over-weights small images and classes absent from most images).

``image_stats`` is the per-image step, ``summarise`` the one reduce (sum, then divide once in
``DatasetSummary.from_sums``); ``uncertainty`` is the per-image confidence summary before CRF and
``format_score`` how a score prints.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pipeline.io.palette import IGNORE_INDEX

if TYPE_CHECKING:  # the CRF and write actors score masks and never need torch
    import torch


@dataclass(frozen=True)
class ImageStats:
    """Per-class pixel counts for one image (int64 arrays of length num_classes)."""

    intersect: np.ndarray
    union: np.ndarray
    label_area: np.ndarray
    pred_area: np.ndarray

    @property
    def pixel_acc(self) -> float | None:
        total = int(self.label_area.sum())
        return float(self.intersect.sum()) / total if total else None

    @property
    def miou(self) -> float | None:
        return mean_iou(self.intersect, self.union)


def image_stats(pred: np.ndarray, label: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX) -> ImageStats:
    """Sufficient statistics of one prediction against its label (same HxW shape)."""
    if pred.shape != label.shape:
        raise ValueError(f"prediction {pred.shape} and label {label.shape} differ in size")
    valid = label != ignore_index
    p = pred[valid].astype(np.int64)
    t = label[valid].astype(np.int64)
    hits = p[p == t]
    intersect = np.bincount(hits, minlength=num_classes)[:num_classes]
    pred_area = np.bincount(p, minlength=num_classes)[:num_classes]
    label_area = np.bincount(t, minlength=num_classes)[:num_classes]
    union = pred_area + label_area - intersect
    return ImageStats(intersect, union, label_area, pred_area)


def per_class_iou(intersect: np.ndarray, union: np.ndarray) -> np.ndarray:
    """IoU per class, NaN where the class is absent from both prediction and label."""
    intersect = np.asarray(intersect, dtype=np.float64)
    union = np.asarray(union, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, intersect / union, np.nan)


def mean_iou(intersect: np.ndarray, union: np.ndarray) -> float | None:
    return mean_of_classes(per_class_iou(intersect, union))


def mean_of_classes(iou: Sequence[float | None] | np.ndarray) -> float | None:
    """Mean of per-class IoUs over the classes that have one (None or NaN: no union), or None."""
    iou = np.asarray(iou, dtype=np.float64)  # None becomes NaN
    present = ~np.isnan(iou)
    return float(iou[present].mean()) if present.any() else None


@dataclass(frozen=True)
class DatasetSummary:
    """Dataset-level metrics from summed statistics."""

    miou: float | None
    pixel_acc: float | None
    mean_acc: float | None
    fw_iou: float | None
    iou: np.ndarray  # per class, NaN where union == 0

    def scores(self) -> dict[str, float | None]:
        """The dataset-level numbers by name, as manifest.json holds them."""
        return {"miou": self.miou, "pixel_acc": self.pixel_acc, "mean_acc": self.mean_acc, "fw_iou": self.fw_iou}

    @classmethod
    def from_sums(cls, intersect: np.ndarray, union: np.ndarray, label_area: np.ndarray) -> DatasetSummary:
        """The division step: metrics of per-class sums of ``ImageStats``."""
        intersect = np.asarray(intersect, dtype=np.float64)
        union = np.asarray(union, dtype=np.float64)
        label_area = np.asarray(label_area, dtype=np.float64)
        iou = per_class_iou(intersect, union)
        total = label_area.sum()
        labelled = label_area > 0
        return cls(
            miou=mean_iou(intersect, union),
            pixel_acc=float(intersect.sum() / total) if total else None,
            mean_acc=(float((intersect[labelled] / label_area[labelled]).mean()) if labelled.any() else None),
            fw_iou=float(np.nansum(label_area / total * np.nan_to_num(iou))) if total else None,
            iou=iou,
        )


def summarise(stats: Iterable[ImageStats], num_classes: int) -> DatasetSummary:
    """Dataset metrics of per-image statistics: summed per class, then divided once."""
    totals = np.zeros((3, num_classes), np.int64)
    for s in stats:
        totals += np.stack([s.intersect, s.union, s.label_area])
    return DatasetSummary.from_sums(*totals)


def format_score(value: float | None, spec: str = ".4f") -> str:
    """A score as printed in summaries, tables and the report: "n/a" when there is none."""
    return "n/a" if value is None else format(value, spec)


def boundary_band(label: np.ndarray, width: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Pixels within ``width`` of a label boundary (the DeepLab papers' "trimap" band).

    VOC labels mark borders with a 255 band, so both class changes and ignore pixels count as
    boundaries; the ignore pixels themselves are never scored.
    """
    from PIL import Image, ImageFilter

    edge = np.zeros(label.shape, dtype=bool)
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    edge[1:, :] |= label[1:, :] != label[:-1, :]
    edge |= label == ignore_index
    grown = Image.fromarray(edge.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(2 * width + 1))
    return (np.asarray(grown) > 0) & (label != ignore_index)


def trimap_accuracy(pred: np.ndarray, label: np.ndarray, width: int = 4) -> tuple[int, int]:
    """(correct, total) pixels inside the boundary band; sum over images, then divide."""
    band = boundary_band(label, width)
    return int((pred[band] == label[band]).sum()), int(band.sum())


def uncertainty(
    probs: torch.Tensor, low_conf_threshold: float = 0.5, top: torch.Tensor | None = None
) -> dict[str, float]:
    """Per-image confidence summaries of (C, H, W) probabilities, before CRF.

    mean_max_prob: mean over pixels of the top-class probability; mean_entropy: mean pixel entropy
    in nats, and divided by log C (0 = certain, 1 = uniform); low_conf_fraction: share of pixels
    whose top-class probability is below the threshold. ``top``: the top-class probabilities, if
    the caller has them (``inference.top_class``).
    """
    p = probs.float()
    top = p.max(dim=0).values if top is None else top.float()
    entropy = -float((p * p.clamp_min(1e-12).log()).sum()) / top.numel()  # one sum over all: no (H, W) temporary
    low = float((top < low_conf_threshold).float().mean())
    return uncertainty_summary(float(top.mean()), entropy, low, p.shape[0])


def uncertainty_summary(
    mean_max_prob: float, mean_entropy: float, low_conf_fraction: float, num_classes: int
) -> dict[str, float]:
    """The UNCERTAINTY_COLUMNS of one image from its means (``uncertainty``; tiled inference sums
    them by band)."""
    return {
        "mean_max_prob": mean_max_prob,
        "mean_entropy": mean_entropy,
        "mean_entropy_norm": mean_entropy / float(np.log(num_classes)) if num_classes > 1 else 0.0,
        "low_conf_fraction": low_conf_fraction,
    }
