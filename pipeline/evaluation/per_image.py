"""The result row of each image that went through inference (+CRF): the stream's masks columns,
PNG masks and the per-image sufficient statistics (``metrics.image_stats``) the run sums once."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa

from pipeline.evaluation.metrics import image_stats
from pipeline.io.palette import mask_to_png
from pipeline.rows.errors import storable
from pipeline.rows.schema import RESULT_COLUMNS, RESULT_SCHEMA, Col


def _value(col: Col, value):
    """A stream value as the row's Python value; ``col.null`` (e.g. 0 for "none") becomes null."""
    if col.null is not None and value == col.null:
        return None
    return _PYTHON[col.type.id](value)


_PYTHON = {pa.string().id: str, pa.int32().id: int, pa.float64().id: float, pa.bool_().id: bool, pa.binary().id: bytes}
_PASSED = [c for c in RESULT_COLUMNS if c.passed]
_ON_ERROR = [c for c in _PASSED if c.kept_on_error]


def result_table(
    batch: Mapping[str, Sequence | np.ndarray], *, num_classes: int, model: str, weights_sha256: str, run_id: str
) -> pa.Table:
    """Per-image PNG masks and metric statistics for a batch that went through inference (+CRF).

    The stream's masks columns (pipeline/rows/schema.py) are copied; those of a stage that did not run
    (the CRF's when it is off) are null. ``mask_pre`` and ``mask_crf`` are raw uint8 labels.
    """
    passed = [c for c in _PASSED if c.name in batch]
    on_error = [c for c in _ON_ERROR if c.name in batch]
    rows = []
    for i in range(len(batch["key"])):
        failed = bool(batch["error_stage"][i])
        row = {c.name: _value(c, batch[c.name][i]) for c in (on_error if failed else passed)}
        row.update(model=model, weights_sha256=weights_sha256, run_id=run_id, computed_in_run=run_id)
        if not failed:
            row.update(_computed(batch, i, num_classes))
        rows.append(row)
    try:
        return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)
    except (pa.ArrowException, ValueError, TypeError, OverflowError):
        # One row's value that cannot be stored is that row's error, never its batch's.
        return pa.concat_tables([_one_row(row) for row in rows])


def _one_row(row: dict) -> pa.Table:
    try:
        return pa.Table.from_pylist([row], schema=RESULT_SCHEMA)
    except (pa.ArrowException, ValueError, TypeError, OverflowError) as exc:
        failed = {c.name: row.get(c.name) for c in _ON_ERROR}
        failed = {k: storable(v) if isinstance(v, str) else v for k, v in failed.items()}
        failed.update(
            {name: row.get(name) for name in ("model", "weights_sha256", "run_id")},
            error_stage="write",
            error_type=type(exc).__name__,
            error_message=storable(f"a value of this row cannot be stored: {exc}")[:1000],
        )
        return pa.Table.from_pylist([failed], schema=RESULT_SCHEMA)


def _computed(batch: Mapping[str, Sequence | np.ndarray], i: int, num_classes: int) -> dict:
    """The ``stage="result"`` columns of row ``i``: PNG masks, class pixels and metric statistics."""
    h, w = int(batch["height"][i]), int(batch["width"][i])
    pre = np.frombuffer(batch["mask_pre"][i], dtype=np.uint8).reshape(h, w)
    refined = "mask_crf" in batch
    post = np.frombuffer(batch["mask_crf"][i], dtype=np.uint8).reshape(h, w) if refined else pre
    row = {
        "mask": mask_to_png(post),
        "mask_pre_crf": mask_to_png(pre) if refined else None,
        "class_pixels": np.bincount(post.ravel(), minlength=num_classes)[:num_classes].tolist(),
        "crf_changed_fraction": float((pre != post).mean()) if refined else None,
    }
    if batch["has_label"][i]:
        label = np.frombuffer(batch["label"][i], dtype=np.uint8).reshape(h, w)
        post_stats = image_stats(post, label, num_classes)
        pre_stats = image_stats(pre, label, num_classes) if refined else post_stats  # no CRF: the same mask
        row.update(
            intersect=post_stats.intersect.tolist(),
            union=post_stats.union.tolist(),
            label_area=post_stats.label_area.tolist(),
            intersect_pre_crf=pre_stats.intersect.tolist(),
            union_pre_crf=pre_stats.union.tolist(),
            pixel_acc=post_stats.pixel_acc,
            miou=post_stats.miou,
            pixel_acc_pre_crf=pre_stats.pixel_acc,
            miou_pre_crf=pre_stats.miou,
        )
    return row
