"""The columns of the stream between stages, by the stage that adds them, and the output tables.

Every column is one ``Col`` entry in ``COLUMNS`` naming the stage that fills it; each stage adds
only its own stream columns (``add_columns``), the result rows copy the stream's masks columns
(``evaluation.per_image.result_table``) and compute the ``stage="result"`` ones. The last compute
stage emits one ``RESULT_SCHEMA`` table per batch holding both successful and failed rows
(``error_stage`` is empty on success); the write stage splits it into ``masks`` and ``errors``.
Keeping one schema through the stream keeps every input key in exactly one place (DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

NAN = float("nan")
UNCERTAINTY_COLUMNS = ("mean_max_prob", "mean_entropy", "mean_entropy_norm", "low_conf_fraction")
STAGES = ("decode", "infer", "crf")  # the stages that add stream columns, in DAG order
_EMPTY = {pa.binary().id: b"", pa.string().id: "", pa.int32().id: 0, pa.float64().id: 0.0, pa.bool_().id: False}


@dataclass(frozen=True)
class Col:
    """One column: its Arrow type and the stage that fills it — a stream stage (``STAGES``: the stage
    writes the stream column of this name and the result rows copy it), ``read`` (the listed key) or
    ``result`` (computed by the result rows). ``table``: "masks" (a masks column), "result" (only in
    the result rows: the error protocol, node ids) or "" (stream only). ``null``: the stream value
    written as null (0 for "none" in an int column, "" in a string one); ``empty``: the stream value
    before the stage filled it (default: the type's zero)."""

    name: str
    type: pa.DataType
    stage: str
    null: Any = None
    empty: Any = None
    table: str = "masks"
    kept_on_error: bool = False  # also set on a failed row (which carries no masks columns otherwise)

    @property
    def passed(self) -> bool:
        """Copied from the stream column of the same name (else computed by the result rows)."""
        return self.stage in STAGES or self.stage == "read"

    @property
    def empty_value(self) -> Any:
        return _EMPTY[self.type.id] if self.empty is None else self.empty


_COUNTS = pa.list_(pa.int64())
_F64 = pa.float64()

# Masks columns in the table's order, then the result rows' own and the stream-only columns.
COLUMNS = (
    Col("key", pa.string(), "read", kept_on_error=True),
    Col("uri", pa.string(), "decode", kept_on_error=True),
    Col("height", pa.int32(), "decode"),
    Col("width", pa.int32(), "decode"),
    Col("exif_orientation", pa.int32(), "decode", null=0),  # EXIF orientation applied (1-8), null if none
    Col("mask", pa.binary(), "result"),  # PNG, after CRF when it ran
    Col("mask_pre_crf", pa.binary(), "result"),  # PNG; null without CRF
    Col("class_pixels", _COUNTS, "result"),
    Col("has_label", pa.bool_(), "decode"),
    Col("label_error", pa.string(), "decode", null=""),  # why the label was not scored; null if fine
    # The report's pictures, made by the decode worker (the driver never decodes an input):
    Col("thumbnail", pa.binary(), "decode", null=b""),  # the upright image, WebP, at most images.THUMB_WIDTH wide
    Col("label_thumbnail", pa.binary(), "decode", null=b""),  # PNG class ids at the thumbnail's size; null if none
    Col("intersect", _COUNTS, "result"),
    Col("union", _COUNTS, "result"),
    Col("label_area", _COUNTS, "result"),
    Col("intersect_pre_crf", _COUNTS, "result"),
    Col("union_pre_crf", _COUNTS, "result"),
    Col("pixel_acc", _F64, "result"),
    Col("miou", _F64, "result"),
    Col("pixel_acc_pre_crf", _F64, "result"),
    Col("miou_pre_crf", _F64, "result"),
    Col("model", pa.string(), "result"),
    Col("weights_sha256", pa.string(), "result"),
    Col("infer_ms", _F64, "infer"),
    Col("crf_ms", _F64, "crf"),  # null without CRF
    Col("crf_scale", _F64, "crf", empty=1.0),  # resolution the CRF ran at (< 1 over the memory budget)
    Col("infer_tile", pa.int32(), "infer", null=0),  # sliding-window tile size; null for whole images
    Col("crf_changed_fraction", _F64, "result"),  # share of pixels CRF relabelled; null without CRF
    # Confidence of the pre-CRF probabilities (pipeline/evaluation/metrics.py uncertainty).
    *(Col(name, _F64, "infer", empty=NAN) for name in UNCERTAINTY_COLUMNS),
    Col("run_id", pa.string(), "result"),
    # The run that computed the row: run_id, or the earlier run an --incremental night carried it from.
    Col("computed_in_run", pa.string(), "result"),
    Col("error_stage", pa.string(), "decode", null="", table="result", kept_on_error=True),
    Col("error_type", pa.string(), "decode", null="", table="result", kept_on_error=True),
    Col("error_message", pa.string(), "decode", null="", table="result", kept_on_error=True),
    # Ray node ids, collected into manifest.json.
    Col("infer_node", pa.string(), "infer", null="", table="result", kept_on_error=True),
    Col("crf_node", pa.string(), "crf", null="", table="result", kept_on_error=True),
    Col("image", pa.binary(), "decode", table=""),  # RGB uint8 pixels
    Col("label", pa.binary(), "decode", table=""),  # class ids, uint8
    Col("mask_pre", pa.binary(), "infer", table=""),  # pre-CRF class ids, uint8
    Col("probs", pa.binary(), "infer", table=""),  # probabilities for the CRF (inference.probs_encoding)
    Col("mask_crf", pa.binary(), "crf", table=""),  # class ids after CRF, uint8
)

# The stream's columns by the stage that adds them, each with its value before the stage filled it.
STREAM: dict[str, dict[str, Any]] = {
    stage: {c.name: c.empty_value for c in COLUMNS if c.stage == stage} for stage in STAGES
}
_BYTES = {c.name for c in COLUMNS if c.type.id == pa.binary().id}


def add_columns(out: dict[str, list], stage: str, n: int) -> dict[str, list]:
    """Add ``stage``'s stream columns to ``out`` (n rows), each at its empty value; returns ``out``."""
    for name, empty in STREAM[stage].items():
        out[name] = [empty] * n
    return out


def to_stream(out: dict[str, list]) -> dict[str, np.ndarray]:
    """A stage's columns as the numpy batch Ray Data carries (bytes columns as object arrays)."""
    return {k: np.array(v, dtype=object) if k in _BYTES else np.array(v) for k, v in out.items()}


MASKS_COLUMNS = tuple(c for c in COLUMNS if c.table == "masks")
RESULT_COLUMNS = MASKS_COLUMNS + tuple(c for c in COLUMNS if c.table == "result")


def _schema(columns: tuple[Col, ...]) -> pa.Schema:
    return pa.schema([(c.name, c.type) for c in columns])


MASKS_SCHEMA = _schema(MASKS_COLUMNS)
RESULT_SCHEMA = _schema(RESULT_COLUMNS)

ERRORS_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("uri", pa.string()),
        ("stage", pa.string()),  # read|decode|infer|crf (a bad label is masks.label_error, not an error)
        ("error_type", pa.string()),
        ("message", pa.string()),
        ("run_id", pa.string()),
        ("computed_in_run", pa.string()),  # as masks.computed_in_run
    ]
)

CLASSES_SCHEMA = pa.schema(
    [
        ("class_id", pa.int32()),
        ("class_name", pa.string()),
        ("intersect", pa.int64()),
        ("union", pa.int64()),
        ("label_area", pa.int64()),
        ("iou", pa.float64()),
        ("iou_pre_crf", pa.float64()),
    ]
)

# The night-over-night comparison's tables (pipeline/evaluation/compare.py).
COMPARISON_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        # both | added (mask only in the newer run) | removed (only in the older run)
        ("status", pa.string()),
        # share of pixels whose class differs; null unless status = both
        ("disagreement", pa.float64()),
        ("miou_new", pa.float64()),  # per-image mIoU, null without a label
        ("miou_old", pa.float64()),
        ("mean_max_prob_new", pa.float64()),
        ("mean_max_prob_old", pa.float64()),
        ("run_id", pa.string()),  # the newer run
        ("against_run_id", pa.string()),  # the older run
    ]
)

COMPARISON_CLASSES_SCHEMA = pa.schema(
    [
        ("class_id", pa.int32()),
        ("class_name", pa.string()),
        # dataset IoU from classes.parquet, null where the class has no union
        ("iou_new", pa.float64()),
        ("iou_old", pa.float64()),
        ("iou_delta", pa.float64()),  # iou_new - iou_old
        # share of predicted pixels, over the keys both runs segmented
        ("pixel_share_new", pa.float64()),
        ("pixel_share_old", pa.float64()),
        ("run_id", pa.string()),
        ("against_run_id", pa.string()),
    ]
)
