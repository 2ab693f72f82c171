"""The columns of the stream between stages, by the stage that adds them, and the output tables.

Each stage adds only its own stream columns (``add_columns``); a masks column is one ``Col`` entry
naming the stage that fills it: a stream column of the same name copied into the row
(``results.result_table``), or one the result rows compute (``stage="result"``). The last compute
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

# The stream's columns by the stage that adds them, each with its value before the stage filled it
# (and for a row that failed). Bytes columns hold raw buffers: uint8 pixels, encoded probabilities.
STREAM: dict[str, dict[str, Any]] = {
    "decode": {"uri": "", "image": b"", "height": 0, "width": 0, "exif_orientation": 0, "label": b"",
               "has_label": False, "label_error": "", "error_stage": "", "error_type": "", "error_message": ""},
    "infer": {"mask_pre": b"", "probs": b"", "infer_ms": 0.0, "infer_node": "", "infer_tile": 0,
              **dict.fromkeys(UNCERTAINTY_COLUMNS, NAN)},
    "crf": {"mask": b"", "crf_ms": 0.0, "crf_node": "", "crf_scale": 1.0},
}


def add_columns(out: dict[str, list], stage: str, n: int) -> dict[str, list]:
    """Add ``stage``'s stream columns to ``out`` (n rows), each at its empty value; returns ``out``."""
    for name, empty in STREAM[stage].items():
        out[name] = [empty] * n
    return out


def to_stream(out: dict[str, list]) -> dict[str, np.ndarray]:
    """A stage's columns as the numpy batch Ray Data carries (bytes columns as object arrays)."""
    return {k: np.array(v, dtype=object) if isinstance(_empty(k), bytes) else np.array(v) for k, v in out.items()}


def _empty(name: str) -> Any:
    return next((cols[name] for cols in STREAM.values() if name in cols), None)


@dataclass(frozen=True)
class Col:
    """One output column: its Arrow type and the stage that fills it. ``null``: the stream value
    that is written as null (0 for "none" in an int column, "" in a string one)."""

    name: str
    type: pa.DataType
    stage: str  # read | decode | infer | crf | result
    null: Any = None
    kept_on_error: bool = False  # also set on a failed row (which carries no masks columns otherwise)

    @property
    def passed(self) -> bool:
        """Copied from the stream column of the same name (else computed by the result rows)."""
        return self.stage in STREAM


_COUNTS = pa.list_(pa.int64())

MASKS_COLUMNS = (
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
    Col("intersect", _COUNTS, "result"),
    Col("union", _COUNTS, "result"),
    Col("label_area", _COUNTS, "result"),
    Col("intersect_pre_crf", _COUNTS, "result"),
    Col("union_pre_crf", _COUNTS, "result"),
    Col("pixel_acc", pa.float64(), "result"),
    Col("miou", pa.float64(), "result"),
    Col("pixel_acc_pre_crf", pa.float64(), "result"),
    Col("miou_pre_crf", pa.float64(), "result"),
    Col("model", pa.string(), "result"),
    Col("weights_sha256", pa.string(), "result"),
    Col("infer_ms", pa.float64(), "infer"),
    Col("crf_ms", pa.float64(), "crf"),  # null without CRF
    Col("crf_scale", pa.float64(), "crf"),  # resolution the CRF ran at (1.0 full; < 1 over the memory budget)
    Col("infer_tile", pa.int32(), "infer", null=0),  # sliding-window tile size; null for whole images
    Col("crf_changed_fraction", pa.float64(), "result"),  # share of pixels CRF relabelled; null without CRF
    Col("mean_max_prob", pa.float64(), "infer"),  # confidence of the pre-CRF probabilities (metrics.py)
    Col("mean_entropy", pa.float64(), "infer"),
    Col("mean_entropy_norm", pa.float64(), "infer"),
    Col("low_conf_fraction", pa.float64(), "infer"),
    Col("run_id", pa.string(), "result"),
)

# masks columns + the error columns, all nullable: one row per input key.
RESULT_COLUMNS = MASKS_COLUMNS + (
    Col("error_stage", pa.string(), "decode", null="", kept_on_error=True),
    Col("error_type", pa.string(), "decode", null="", kept_on_error=True),
    Col("error_message", pa.string(), "decode", null="", kept_on_error=True),
    Col("infer_node", pa.string(), "infer", null="", kept_on_error=True),  # Ray node ids, collected into manifest.json
    Col("crf_node", pa.string(), "crf", null="", kept_on_error=True),
)


def _schema(columns: tuple[Col, ...]) -> pa.Schema:
    return pa.schema([(c.name, c.type) for c in columns])


MASKS_SCHEMA = _schema(MASKS_COLUMNS)
RESULT_SCHEMA = _schema(RESULT_COLUMNS)

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
