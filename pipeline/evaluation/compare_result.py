"""What a comparison of two runs found: the additive stats its workers return and the result."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline.evaluation.compare_errors import NewError

STATUSES = ("both", "added", "removed")


@dataclass(frozen=True)
class ChangedImage:
    """One of the most changed images, with both masks, for the report."""

    key: str
    uri: str
    disagreement: float
    mask_old: bytes
    mask_new: bytes


@dataclass
class ComparisonStats:
    """Additive summary of some compared rows (what a comparison worker returns)."""

    statuses: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))
    changed: int = 0
    disagreement_sum: float = 0.0
    # predicted pixels per class, over the keys in both runs
    pixels_old: list[int] = field(default_factory=list)
    pixels_new: list[int] = field(default_factory=list)
    examples: list[ChangedImage] = field(default_factory=list)  # most changed first
    limit: int = 0  # how many examples are kept

    def __add__(self, other: ComparisonStats) -> ComparisonStats:
        limit = max(self.limit, other.limit)
        return ComparisonStats(
            {s: self.statuses[s] + other.statuses[s] for s in STATUSES},
            self.changed + other.changed,
            self.disagreement_sum + other.disagreement_sum,
            _add(self.pixels_old, other.pixels_old),
            _add(self.pixels_new, other.pixels_new),
            most_changed(self.examples + other.examples, limit),
            limit,
        )


def _add(a: list[int], b: list[int]) -> list[int]:
    n = max(len(a), len(b))
    return (
        np.pad(np.asarray(a, np.int64), (0, n - len(a))) + np.pad(np.asarray(b, np.int64), (0, n - len(b)))
    ).tolist()


def most_changed(examples: list[ChangedImage], k: int) -> list[ChangedImage]:
    return sorted(examples, key=lambda e: (-e.disagreement, e.key))[:k]


@dataclass(frozen=True)
class Comparison:
    run_id: str
    against: str
    statuses: dict[str, int]
    changed_images: int  # keys in both runs whose masks differ in at least one pixel
    mean_disagreement: float | None
    classes: pa.Table  # COMPARISON_CLASSES_SCHEMA
    miou_new: float | None
    miou_old: float | None
    new_errors: tuple[NewError, ...]
    examples: tuple[ChangedImage, ...]  # largest disagreement first

    @property
    def miou_delta(self) -> float | None:
        if self.miou_new is None or self.miou_old is None:
            return None
        return self.miou_new - self.miou_old

    def count(self, status: str) -> int:
        return self.statuses[status]

    def regressions(self, threshold: float) -> list[str]:
        """The mIoU and class IoUs that dropped by more than ``threshold``, worst class first."""
        reasons = []
        if self.miou_delta is not None and -self.miou_delta > threshold:
            reasons.append(f"mIoU {self.miou_old:.4f} -> {self.miou_new:.4f} ({self.miou_delta:+.4f})")
        rows = [r for r in self.classes.to_pylist() if r["iou_delta"] is not None and -r["iou_delta"] > threshold]
        for r in sorted(rows, key=lambda r: r["iou_delta"]):
            reasons.append(f"IoU of {r['class_name']} {r['iou_old']:.4f} -> {r['iou_new']:.4f} ({r['iou_delta']:+.4f})")
        return reasons

    def to_json(self) -> dict:
        return {
            "run_id": self.run_id,
            "against_run_id": self.against,
            "miou_new": self.miou_new,
            "miou_old": self.miou_old,
            "miou_delta": self.miou_delta,
            "images": dict(self.statuses),
            "changed_images": self.changed_images,
            "mean_disagreement": self.mean_disagreement,
            "new_errors": [e.__dict__ for e in self.new_errors],
        }
