"""Explicit Arrow schemas of the output tables (see DESIGN.md).

The last compute stage emits one ``RESULT_SCHEMA`` table per batch holding both successful and
failed rows (``error_stage`` is empty on success); the write stage splits it into ``masks`` and
``errors``. Keeping one schema through the stream keeps every input key in exactly one place.
"""

from __future__ import annotations

import pyarrow as pa

_COUNTS = pa.list_(pa.int64())
UNCERTAINTY_COLUMNS = ("mean_max_prob", "mean_entropy", "mean_entropy_norm", "low_conf_fraction")

MASKS_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("uri", pa.string()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("exif_orientation", pa.int32()),  # EXIF orientation applied before segmenting (1-8), null if none
    ("mask", pa.binary()),
    ("mask_pre_crf", pa.binary()),
    ("class_pixels", _COUNTS),
    ("has_label", pa.bool_()),
    ("label_error", pa.string()),  # why the paired label was not scored (the image still was); null if fine
    ("intersect", _COUNTS),
    ("union", _COUNTS),
    ("label_area", _COUNTS),
    ("intersect_pre_crf", _COUNTS),
    ("union_pre_crf", _COUNTS),
    ("pixel_acc", pa.float64()),
    ("miou", pa.float64()),
    ("pixel_acc_pre_crf", pa.float64()),
    ("miou_pre_crf", pa.float64()),
    ("model", pa.string()),
    ("weights_sha256", pa.string()),
    ("infer_ms", pa.float64()),
    ("crf_ms", pa.float64()),
    ("crf_scale", pa.float64()),  # resolution the CRF ran at (1.0 full; < 1 over the memory budget); null without CRF
    ("infer_tile", pa.int32()),  # sliding-window tile size inference used; null for whole-image inference
    ("crf_changed_fraction", pa.float64()),  # share of pixels whose label CRF changed; null without CRF
    ("mean_max_prob", pa.float64()),  # confidence summaries of the pre-CRF probabilities (probs.py)
    ("mean_entropy", pa.float64()),
    ("mean_entropy_norm", pa.float64()),
    ("low_conf_fraction", pa.float64()),
    ("run_id", pa.string()),
])

ERRORS_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("uri", pa.string()),
    ("stage", pa.string()),  # read|decode|infer|crf (a bad label is masks.label_error, not an error)
    ("error_type", pa.string()),
    ("message", pa.string()),
    ("run_id", pa.string()),
])

CLASSES_SCHEMA = pa.schema([
    ("class_id", pa.int32()),
    ("class_name", pa.string()),
    ("intersect", pa.int64()),
    ("union", pa.int64()),
    ("label_area", pa.int64()),
    ("iou", pa.float64()),
    ("iou_pre_crf", pa.float64()),
])

# masks columns + the error columns, all nullable: one row per input key.
RESULT_SCHEMA = pa.schema(list(MASKS_SCHEMA) + [
    pa.field("error_stage", pa.string()),
    pa.field("error_type", pa.string()),
    pa.field("error_message", pa.string()),
    pa.field("infer_node", pa.string()),  # Ray node ids, collected into manifest.json
    pa.field("crf_node", pa.string()),
])
