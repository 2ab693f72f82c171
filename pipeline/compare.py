"""What changed between two runs over the same bucket: the night-over-night comparison.

``compare_runs`` is a pure function of the two runs' tables; ``load_run`` and
``write_comparison`` are the I/O around it. The comparison lives under the newer run:

    run=<new>/comparison.parquet          one row per key with a mask in either run (COMPARISON_SCHEMA)
    run=<new>/comparison_classes.parquet  one row per class (COMPARISON_CLASSES_SCHEMA)
    run=<new>/comparison.json             run-level numbers: mIoU delta, counts, new error types

Masks are compared as class ids per pixel (the final ``mask`` column), so a new model, new
weights, new CRF parameters or a re-encoded input all show up the same way.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.palette import png_to_mask
from pipeline.storage import write_bytes_atomic

if TYPE_CHECKING:
    from pipeline.outputs import RunOutput

MASK_COLUMNS = ("key", "uri", "mask", "miou", "mean_max_prob", "class_pixels")
COMPARISON_FILES = ("comparison.parquet", "comparison_classes.parquet", "comparison.json")
STATUSES = ("both", "added", "removed")

COMPARISON_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("status", pa.string()),  # both | added (mask only in the newer run) | removed (only in the older run)
    ("disagreement", pa.float64()),  # share of pixels whose class differs; null unless status = both
    ("miou_new", pa.float64()),  # per-image mIoU, null without a label
    ("miou_old", pa.float64()),
    ("mean_max_prob_new", pa.float64()),
    ("mean_max_prob_old", pa.float64()),
    ("run_id", pa.string()),  # the newer run
    ("against_run_id", pa.string()),  # the older run
])

COMPARISON_CLASSES_SCHEMA = pa.schema([
    ("class_id", pa.int32()),
    ("class_name", pa.string()),
    ("iou_new", pa.float64()),  # dataset IoU from classes.parquet, null where the class has no union
    ("iou_old", pa.float64()),
    ("iou_delta", pa.float64()),  # iou_new - iou_old
    ("pixel_share_new", pa.float64()),  # share of predicted pixels, over the keys both runs segmented
    ("pixel_share_old", pa.float64()),
    ("run_id", pa.string()),
    ("against_run_id", pa.string()),
])


@dataclass(frozen=True)
class RunTables:
    """What a comparison reads of one run."""

    run_id: str
    masks: pa.Table  # MASK_COLUMNS of masks/
    errors: pa.Table  # errors/ (ERRORS_SCHEMA)
    classes: pa.Table  # classes.parquet (CLASSES_SCHEMA)


@dataclass(frozen=True)
class ChangedImage:
    """One of the most changed images, with both masks, for the report."""

    key: str
    uri: str
    disagreement: float
    mask_old: bytes
    mask_new: bytes


@dataclass(frozen=True)
class NewError:
    """An (error stage, error type) pair the older run did not have."""

    stage: str
    error_type: str
    count: int
    example_key: str
    example_message: str


@dataclass(frozen=True)
class Comparison:
    run_id: str
    against: str
    images: pa.Table  # COMPARISON_SCHEMA
    classes: pa.Table  # COMPARISON_CLASSES_SCHEMA
    miou_new: float | None
    miou_old: float | None
    new_errors: tuple[NewError, ...]
    examples: tuple[ChangedImage, ...]  # largest disagreement first

    @property
    def miou_delta(self) -> float | None:
        return None if self.miou_new is None or self.miou_old is None else self.miou_new - self.miou_old

    def count(self, status: str) -> int:
        return self.images.column("status").to_pylist().count(status)

    @property
    def changed_images(self) -> int:
        """Keys in both runs whose masks differ in at least one pixel."""
        return sum(1 for d in self.images.column("disagreement").to_pylist() if d)

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
        disagreement = [d for d in self.images.column("disagreement").to_pylist() if d is not None]
        return {
            "run_id": self.run_id, "against_run_id": self.against,
            "miou_new": self.miou_new, "miou_old": self.miou_old, "miou_delta": self.miou_delta,
            "images": {status: self.count(status) for status in STATUSES},
            "changed_images": self.changed_images,
            "mean_disagreement": float(np.mean(disagreement)) if disagreement else None,
            "new_errors": [e.__dict__ for e in self.new_errors],
        }


def mask_disagreement(old_png: bytes, new_png: bytes) -> float:
    """Share of pixels whose class id differs between two mask PNGs."""
    if old_png == new_png:  # same encoder, same ids: skip decoding the common case
        return 0.0
    old, new = png_to_mask(old_png), png_to_mask(new_png)
    if old.shape != new.shape:
        return 1.0  # the input itself changed size: no pixel can be matched
    return float((old != new).mean())


def dataset_miou(classes: pa.Table) -> float | None:
    """Mean IoU over the classes that have one (union > 0), as in classes.parquet and manifest.json."""
    iou = [v for v in classes.column("iou").to_pylist() if v is not None]
    return float(np.mean(iou)) if iou else None


def new_error_types(old_errors: pa.Table, new_errors: pa.Table) -> tuple[NewError, ...]:
    seen = set(zip(old_errors.column("stage").to_pylist(), old_errors.column("error_type").to_pylist()))
    found: dict[tuple[str, str], list] = {}
    for row in new_errors.to_pylist():
        kind = (row["stage"], row["error_type"])
        if kind in seen:
            continue
        if kind not in found:
            found[kind] = [0, row["key"], row["message"]]
        found[kind][0] += 1
    return tuple(NewError(stage, error_type, n, key, message[:200])
                 for (stage, error_type), (n, key, message) in sorted(found.items()))


def _pixel_share(masks: pa.Table, rows: list[int], num_classes: int) -> np.ndarray:
    counts = np.zeros(num_classes, dtype=np.int64)
    column = masks.column("class_pixels")
    for i in rows:
        pixels = np.asarray(column[i].as_py(), dtype=np.int64)[:num_classes]
        counts[: len(pixels)] += pixels
    total = counts.sum()
    return counts / total if total else np.full(num_classes, np.nan)


def _compare_classes(old: RunTables, new: RunTables, old_rows: list[int], new_rows: list[int]) -> pa.Table:
    """Classes are matched by (id, name), so runs with different class lists never mix two classes."""
    old_iou = {(r["class_id"], r["class_name"]): r["iou"] for r in old.classes.to_pylist()}
    new_iou = {(r["class_id"], r["class_name"]): r["iou"] for r in new.classes.to_pylist()}
    share_old = _pixel_share(old.masks, old_rows, old.classes.num_rows)
    share_new = _pixel_share(new.masks, new_rows, new.classes.num_rows)

    def share(values: np.ndarray, class_id: int, present: bool) -> float | None:
        return float(values[class_id]) if present and not np.isnan(values[class_id]) else None

    rows = []
    for class_id, name in sorted(old_iou.keys() | new_iou.keys()):
        iou_old, iou_new = old_iou.get((class_id, name)), new_iou.get((class_id, name))
        rows.append({
            "class_id": class_id, "class_name": name, "iou_new": iou_new, "iou_old": iou_old,
            "iou_delta": None if iou_new is None or iou_old is None else iou_new - iou_old,
            "pixel_share_new": share(share_new, class_id, (class_id, name) in new_iou),
            "pixel_share_old": share(share_old, class_id, (class_id, name) in old_iou),
            "run_id": new.run_id, "against_run_id": old.run_id,
        })
    return pa.Table.from_pylist(rows, schema=COMPARISON_CLASSES_SCHEMA)


def compare_runs(old: RunTables, new: RunTables, *, examples: int = 4) -> Comparison:
    """Compare ``new`` against ``old``; ``examples`` most changed images keep both masks for the report."""
    old_index = {k: i for i, k in enumerate(old.masks.column("key").to_pylist())}
    new_index = {k: i for i, k in enumerate(new.masks.column("key").to_pylist())}
    miou = {"old": old.masks.column("miou").to_pylist(), "new": new.masks.column("miou").to_pylist()}
    conf = {"old": old.masks.column("mean_max_prob").to_pylist(), "new": new.masks.column("mean_max_prob").to_pylist()}
    old_masks, new_masks = old.masks.column("mask"), new.masks.column("mask")
    rows, both = [], []
    for key in sorted(old_index.keys() | new_index.keys()):
        i, j = old_index.get(key), new_index.get(key)
        disagreement = None
        if i is not None and j is not None:
            disagreement = mask_disagreement(old_masks[i].as_py(), new_masks[j].as_py())
            both.append((disagreement, key, i, j))
        rows.append({
            "key": key, "status": "both" if disagreement is not None else ("added" if i is None else "removed"),
            "disagreement": disagreement,
            "miou_new": None if j is None else miou["new"][j], "miou_old": None if i is None else miou["old"][i],
            "mean_max_prob_new": None if j is None else conf["new"][j],
            "mean_max_prob_old": None if i is None else conf["old"][i],
            "run_id": new.run_id, "against_run_id": old.run_id,
        })
    changed = sorted((b for b in both if b[0] > 0), key=lambda b: (-b[0], b[1]))[:examples]
    return Comparison(
        run_id=new.run_id, against=old.run_id,
        images=pa.Table.from_pylist(rows, schema=COMPARISON_SCHEMA),
        classes=_compare_classes(old, new, [b[2] for b in both], [b[3] for b in both]),
        miou_new=dataset_miou(new.classes), miou_old=dataset_miou(old.classes),
        new_errors=new_error_types(old.errors, new.errors),
        examples=tuple(ChangedImage(key, new.masks.column("uri")[j].as_py(), d, old_masks[i].as_py(),
                                    new_masks[j].as_py()) for d, key, i, j in changed),
    )


def run_before(runs: list[str], run_id: str) -> str | None:
    """The committed run just before ``run_id`` in ``runs`` (oldest first); the latest one when
    ``run_id`` is not committed yet, which is the case while a run commits."""
    if run_id in runs:
        i = runs.index(run_id)
        return runs[i - 1] if i > 0 else None
    return runs[-1] if runs else None


def regression_message(comparison: Comparison, threshold: float) -> str | None:
    """One line naming what regressed by more than ``threshold``, or None."""
    reasons = comparison.regressions(threshold)
    if not reasons:
        return None
    shown = "; ".join(reasons[:4]) + (f"; and {len(reasons) - 4} more" if len(reasons) > 4 else "")
    return f"regression against run {comparison.against} (threshold {threshold:g}): {shown}"


def load_run(output: RunOutput) -> RunTables:
    """The tables of one run; reads only the mask columns a comparison needs."""
    with output.fs.open(output.path("classes.parquet"), "rb") as f:
        classes = pq.read_table(f)
    return RunTables(run_id=output.run_id, masks=output.read("masks", list(MASK_COLUMNS)),
                     errors=output.read("errors"), classes=classes)


def write_comparison(output: RunOutput, comparison: Comparison) -> None:
    for name, table in (("comparison.parquet", comparison.images), ("comparison_classes.parquet", comparison.classes)):
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        write_bytes_atomic(output.fs.unstrip_protocol(output.path(name)), buffer.getvalue(), output.storage_options)
    write_bytes_atomic(output.fs.unstrip_protocol(output.path("comparison.json")),
                       json.dumps(comparison.to_json(), indent=2).encode(), output.storage_options)


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def format_comparison(comparison: Comparison, *, top: int = 5) -> str:
    """A short plain-text table for the console."""
    c = comparison
    both = c.images.filter(pc.equal(c.images.column("status"), "both"))
    lines = [
        f"\n=== comparison: run {c.run_id} against run {c.against} ===",
        f"images           : {c.count('both')} in both runs, {c.changed_images} changed, "
        f"{c.count('added')} added, {c.count('removed')} removed",
        f"mIoU             : {_fmt(c.miou_old)} -> {_fmt(c.miou_new)} ({_fmt(c.miou_delta, '+.4f')})",
    ]
    classes = [r for r in c.classes.to_pylist() if r["iou_delta"] is not None]
    if classes:
        lines.append(f"{'class':<16} {'IoU old':>8} {'IoU new':>8} {'delta':>8}")
        for r in sorted(classes, key=lambda r: r["iou_delta"])[:top]:
            lines.append(f"{r['class_name'][:16]:<16} {r['iou_old']:>8.4f} {r['iou_new']:>8.4f} "
                         f"{r['iou_delta']:>+8.4f}")
    if c.changed_images:
        lines.append(f"{'most changed image':<40} {'pixels changed':>14}")
        for r in both.sort_by([("disagreement", "descending"), ("key", "ascending")]).slice(0, top).to_pylist():
            if r["disagreement"] > 0:
                lines.append(f"{r['key'][-40:]:<40} {100 * r['disagreement']:>13.2f}%")
    for e in c.new_errors:
        lines.append(f"new error        : {e.stage}/{e.error_type} x{e.count}, "
                     f"e.g. {e.example_key}: {e.example_message}")
    return "\n".join(lines)
