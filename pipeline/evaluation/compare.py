"""What changed between two runs over the same bucket: the night-over-night comparison.

Pure analysis on tables: ``compare_batch`` takes rows of the two runs' masks joined by key
(``JOINED_COLUMNS``) and returns the comparison rows plus a small additive ``ComparisonStats``;
``finish`` turns the summed stats, both runs' ``classes.parquet`` and their error kinds into a
``Comparison``. ``pipeline/dag/compare.py`` runs this over whole runs on Ray Data (join in
workers, rows written by workers); ``compare_tables`` runs it on in-memory tables. Error kinds
are in ``pipeline/evaluation/compare_errors.py``, the console text in ``pipeline/evaluation/compare_text.py``. The
outputs live under the newer run:

    run=<new>/comparison/*.parquet        one row per key with a mask in either run
                                          (COMPARISON_SCHEMA)
    run=<new>/comparison_classes.parquet  one row per class (COMPARISON_CLASSES_SCHEMA)
    run=<new>/comparison.json             run-level numbers: mIoU delta, counts, new error types

Masks are compared as class ids per pixel (the final ``mask`` column), so a new model, new
weights, new CRF parameters or a re-encoded input all show up the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.evaluation.compare_errors import error_kinds, new_error_types
from pipeline.evaluation.compare_result import STATUSES, ChangedImage, Comparison, ComparisonStats, most_changed
from pipeline.evaluation.metrics import mean_of_classes
from pipeline.io.palette import png_to_mask
from pipeline.rows.schema import COMPARISON_CLASSES_SCHEMA, COMPARISON_SCHEMA

MASK_COLUMNS = ("key", "uri", "mask", "miou", "mean_max_prob", "class_pixels")
JOINED_COLUMNS = ("key", *(f"{c}_{side}" for side in ("old", "new") for c in MASK_COLUMNS[1:]))
COMPARISON_FILES = ("comparison", "comparison_classes.parquet", "comparison.json")


@dataclass(frozen=True)
class RunTables:
    """What a comparison reads of one run, in memory (tests, small runs)."""

    run_id: str
    masks: pa.Table  # MASK_COLUMNS of masks/
    errors: pa.Table  # errors/ (ERRORS_SCHEMA)
    classes: pa.Table  # classes.parquet (CLASSES_SCHEMA)


def mask_disagreement(old_png: bytes, new_png: bytes) -> float:
    """Share of pixels whose class id differs between two mask PNGs."""
    if old_png == new_png:  # same encoder, same ids: skip decoding the common case
        return 0.0
    old, new = png_to_mask(old_png), png_to_mask(new_png)
    if old.shape != new.shape:
        return 1.0  # the input itself changed size: no pixel can be matched
    return float((old != new).mean())


def dataset_miou(classes: pa.Table) -> float | None:
    """Mean IoU over the classes that have one (union > 0), as in classes.parquet and
    manifest.json."""
    return mean_of_classes(classes.column("iou").to_pylist())


def compare_batch(
    joined: pa.Table, *, run_id: str, against: str, examples: int = 5
) -> tuple[pa.Table, ComparisonStats]:
    """Comparison rows (sorted by key) and their summary for rows of both runs joined by key."""
    joined = joined.sort_by("key")
    in_old, in_new = pc.is_valid(joined.column("mask_old")), pc.is_valid(joined.column("mask_new"))
    status = pc.if_else(pc.and_(in_old, in_new), "both", pc.if_else(in_new, "added", "removed"))
    both = joined.filter(pc.equal(status, "both"))
    values = [
        mask_disagreement(o, n)
        for o, n in zip(both.column("mask_old").to_pylist(), both.column("mask_new").to_pylist(), strict=True)
    ]
    rows = _comparison_rows(joined, status, values, run_id=run_id, against=against)
    counts = {s: 0 for s in STATUSES} | {e["values"]: e["counts"] for e in pc.value_counts(status).to_pylist()}
    changed = [
        ChangedImage(k, u, d, o, n)
        for k, u, d, o, n in zip(
            both.column("key").to_pylist(),
            both.column("uri_new").to_pylist(),
            values,
            both.column("mask_old").to_pylist(),
            both.column("mask_new").to_pylist(),
            strict=False,
        )
        if d > 0
    ]
    stats = ComparisonStats(
        counts,
        len(changed),
        float(sum(values)),
        _pixel_sum(both.column("class_pixels_old")),
        _pixel_sum(both.column("class_pixels_new")),
        most_changed(changed, examples),
        examples,
    )
    return rows, stats


def _comparison_rows(joined: pa.Table, status: pa.Array, values: list[float], *, run_id: str, against: str) -> pa.Table:
    """COMPARISON_SCHEMA rows; ``values``: the disagreement of the rows whose status is both, in order."""
    disagreement = pa.array([None] * joined.num_rows, pa.float64())
    if values:
        both_index = pc.indices_nonzero(pc.equal(status, "both"))
        dense = np.full(joined.num_rows, np.nan)
        dense[both_index.to_numpy()] = values
        disagreement = pa.array(dense, mask=~np.isfinite(dense))
    columns = {"key": joined.column("key"), "status": status, "disagreement": disagreement}
    for name in ("miou_new", "miou_old", "mean_max_prob_new", "mean_max_prob_old"):
        columns[name] = joined.column(name)
    columns["run_id"] = pa.array([run_id] * joined.num_rows, pa.string())
    columns["against_run_id"] = pa.array([against] * joined.num_rows, pa.string())
    return pa.table(columns).cast(COMPARISON_SCHEMA)


def _pixel_sum(column: pa.ChunkedArray) -> list[int]:
    """Per-class sum of a list<int64> column whose rows may differ in length (pads with zeros)."""
    if len(column) == 0:
        return []
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.int64)
    positions = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    sums = np.bincount(positions, weights=flat, minlength=int(lengths.max(initial=0)))
    return sums.astype(np.int64).tolist()


def _share(pixels: list[int], num_classes: int) -> np.ndarray:
    counts = np.zeros(num_classes, dtype=np.int64)
    counts[: min(len(pixels), num_classes)] = pixels[:num_classes]
    total = counts.sum()
    return counts / total if total else np.full(num_classes, np.nan)


def _compare_classes(
    old_classes: pa.Table, new_classes: pa.Table, stats: ComparisonStats, run_id: str, against: str
) -> pa.Table:
    """Classes are matched by (id, name): runs with different class lists never mix two classes."""
    old_iou = {(r["class_id"], r["class_name"]): r["iou"] for r in old_classes.to_pylist()}
    new_iou = {(r["class_id"], r["class_name"]): r["iou"] for r in new_classes.to_pylist()}
    share_old = _share(stats.pixels_old, old_classes.num_rows)
    share_new = _share(stats.pixels_new, new_classes.num_rows)

    def share(values: np.ndarray, class_id: int, present: bool) -> float | None:
        return float(values[class_id]) if present and not np.isnan(values[class_id]) else None

    rows = []
    for class_id, name in sorted(old_iou.keys() | new_iou.keys()):
        iou_old, iou_new = old_iou.get((class_id, name)), new_iou.get((class_id, name))
        rows.append(
            {
                "class_id": class_id,
                "class_name": name,
                "iou_new": iou_new,
                "iou_old": iou_old,
                "iou_delta": None if iou_new is None or iou_old is None else iou_new - iou_old,
                "pixel_share_new": share(share_new, class_id, (class_id, name) in new_iou),
                "pixel_share_old": share(share_old, class_id, (class_id, name) in old_iou),
                "run_id": run_id,
                "against_run_id": against,
            }
        )
    return pa.Table.from_pylist(rows, schema=COMPARISON_CLASSES_SCHEMA)


def finish(
    stats: ComparisonStats,
    *,
    run_id: str,
    against: str,
    old_classes: pa.Table,
    new_classes: pa.Table,
    old_error_kinds: pa.Table,
    new_error_kinds: pa.Table,
) -> Comparison:
    """The comparison from the summed stats of all compared rows."""
    both = stats.statuses["both"]
    return Comparison(
        run_id=run_id,
        against=against,
        statuses=dict(stats.statuses),
        changed_images=stats.changed,
        mean_disagreement=stats.disagreement_sum / both if both else None,
        classes=_compare_classes(old_classes, new_classes, stats, run_id, against),
        miou_new=dataset_miou(new_classes),
        miou_old=dataset_miou(old_classes),
        new_errors=new_error_types(old_error_kinds, new_error_kinds),
        examples=tuple(stats.examples),
    )


def join_by_key(old: pa.Table, new: pa.Table) -> pa.Table:
    """Full outer join of two runs' MASK_COLUMNS on key, in memory (JOINED_COLUMNS)."""
    keys = pc.unique(pa.chunked_array([old.column("key"), new.column("key")]))
    out = {"key": keys}
    for side, table in (("old", old), ("new", new)):
        index = pc.index_in(keys, value_set=table.column("key").combine_chunks())
        for c in MASK_COLUMNS[1:]:
            out[f"{c}_{side}"] = table.column(c).take(index)
    return pa.table(out)


def compare_tables(old: RunTables, new: RunTables, *, examples: int = 5) -> tuple[Comparison, pa.Table]:
    """Compare ``new`` against ``old`` in memory; returns the comparison and its rows."""
    rows, stats = compare_batch(
        join_by_key(old.masks, new.masks), run_id=new.run_id, against=old.run_id, examples=examples
    )
    comparison = finish(
        stats,
        run_id=new.run_id,
        against=old.run_id,
        old_classes=old.classes,
        new_classes=new.classes,
        old_error_kinds=error_kinds(old.errors),
        new_error_kinds=error_kinds(new.errors),
    )
    return comparison, rows
