"""The result rows of a batch: per-image PNG masks and metric statistics, and the error protocol
every stage follows (a failed row carries ``error_stage``; later stages pass it through)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.metrics import image_stats
from pipeline.observability import stage_metrics
from pipeline.palette import mask_to_png
from pipeline.schema import ERRORS_SCHEMA, MASKS_SCHEMA, RESULT_SCHEMA, UNCERTAINTY_COLUMNS


def mark_error(out: dict[str, list], i: int, stage: str, exc: BaseException | None, message: str) -> None:
    """Turn row ``i`` of a stage's columns into an error row; later stages pass it through."""
    stage_metrics(stage).error()
    out["error_stage"][i] = stage
    out["error_type"][i] = type(exc).__name__ if exc is not None else "InvalidInput"
    out["error_message"][i] = message[:1000]


def split_results(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """A RESULT_SCHEMA table → (masks rows, errors rows) with their own schemas."""
    ok = pc.fill_null(pc.equal(table.column("error_stage"), ""), True)
    masks = table.filter(ok).select(MASKS_SCHEMA.names).cast(MASKS_SCHEMA)
    failed = table.filter(pa.compute.invert(ok))
    errors = pa.table({
        "key": failed.column("key"),
        "uri": failed.column("uri"),
        "stage": failed.column("error_stage"),
        "error_type": failed.column("error_type"),
        "message": failed.column("error_message"),
        "run_id": failed.column("run_id"),
    }).cast(ERRORS_SCHEMA)
    return masks, errors


def result_table(batch: dict[str, np.ndarray], *, num_classes: int, model: str, weights_sha256: str,
                 run_id: str) -> pa.Table:
    """Per-image PNG masks and metric statistics for a batch that went through inference (+CRF).

    Expects the stream's columns: key, uri, height, width, label, has_label, mask_pre, mask
    (raw uint8 bytes; ``mask`` empty when CRF is off), infer_ms, crf_ms, infer_node, crf_node and the
    error columns.
    """
    rows = []
    for i in range(len(batch["key"])):
        row = {"key": str(batch["key"][i]), "uri": str(batch["uri"][i]), "model": model,
               "weights_sha256": weights_sha256, "run_id": run_id,
               "infer_node": batch["infer_node"][i] or None, "crf_node": batch["crf_node"][i] or None}
        if batch["error_stage"][i]:
            row.update(error_stage=str(batch["error_stage"][i]), error_type=str(batch["error_type"][i]),
                       error_message=str(batch["error_message"][i]))
            rows.append(row)
            continue
        h, w = int(batch["height"][i]), int(batch["width"][i])
        pre = np.frombuffer(batch["mask_pre"][i], dtype=np.uint8).reshape(h, w)
        crf_bytes = batch["mask"][i]
        post = np.frombuffer(crf_bytes, dtype=np.uint8).reshape(h, w) if len(crf_bytes) else pre
        row.update(
            height=h, width=w, mask=mask_to_png(post), exif_orientation=int(batch["exif_orientation"][i]) or None,
            mask_pre_crf=mask_to_png(pre) if len(crf_bytes) else None,
            class_pixels=np.bincount(post.ravel(), minlength=num_classes)[:num_classes].tolist(),
            has_label=bool(batch["has_label"][i]), label_error=str(batch["label_error"][i]) or None,
            infer_ms=float(batch["infer_ms"][i]),
            crf_ms=float(batch["crf_ms"][i]) if len(crf_bytes) else None,
            crf_scale=float(batch["crf_scale"][i]) if len(crf_bytes) else None,
            infer_tile=int(batch["infer_tile"][i]) or None,
            crf_changed_fraction=float((pre != post).mean()) if len(crf_bytes) else None,
            **{name: float(batch[name][i]) for name in UNCERTAINTY_COLUMNS},
        )
        if row["has_label"]:
            label = np.frombuffer(batch["label"][i], dtype=np.uint8).reshape(h, w)
            post_stats, pre_stats = image_stats(post, label, num_classes), image_stats(pre, label, num_classes)
            row.update(
                intersect=post_stats.intersect.tolist(), union=post_stats.union.tolist(),
                label_area=post_stats.label_area.tolist(),
                intersect_pre_crf=pre_stats.intersect.tolist(), union_pre_crf=pre_stats.union.tolist(),
                pixel_acc=post_stats.pixel_acc, miou=post_stats.miou,
                pixel_acc_pre_crf=pre_stats.pixel_acc, miou_pre_crf=pre_stats.miou,
            )
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)
