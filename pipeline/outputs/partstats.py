"""The small summary of one part file that its writer returns to the driver, and their sum.

A write task turns a few hundred result rows into masks/errors part files and returns only this:
counts, per-class sufficient statistics (mmsegmentation's process step), stage-time histograms,
node ids and the report's candidate images (top-k per section). The driver adds them up (the
compute step) and commits from the sum, so no mask and no per-row list ever reaches it. On
``--resume`` the same function runs on the statistic columns of the parts written before.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.evaluation.metrics import DatasetSummary
from pipeline.observability import STAGE_BUCKETS
from pipeline.rows.flight import DIED
from pipeline.rows.schema import CLASSES_SCHEMA

# Report sections: (column, largest first?). Ties go to the smaller key, so any split into parts
# picks the same images as one sort over all rows.
SECTIONS = {
    "worst": ("miou", False),
    "best": ("miou", True),
    "crf_changed": ("crf_changed_fraction", True),
    "least_confident": ("mean_max_prob", False),
}
TOP_K = 4
TIMED_STAGES = {"infer": "infer_ms", "crf": "crf_ms"}
# What reading an earlier part for its statistics needs: no mask, no image.
STAT_COLUMNS = [
    "key",
    "has_label",
    "label_error",
    "infer_tile",
    "crf_scale",
    "intersect",
    "union",
    "label_area",
    "intersect_pre_crf",
    "union_pre_crf",
    "infer_ms",
    "crf_ms",
    "run_id",
    "computed_in_run",
    *dict.fromkeys(c for c, _ in SECTIONS.values()),
]
ERROR_STAT_COLUMNS = ["key", "stage", "error_type", "run_id", "computed_in_run"]
_SUMS = ("intersect", "union", "label_area", "intersect_pre_crf", "union_pre_crf")


@dataclass(frozen=True)
class PartStats:
    """Additive summary of some result rows; ``PartStats.empty(n) + a + b`` is the run's."""

    num_classes: int
    images: int = 0
    errors: int = 0
    labelled: int = 0
    labelled_pre: int = 0  # labelled rows that also have pre-CRF statistics (CRF ran)
    label_errors: int = 0  # segmented images whose label could not be scored (masks.label_error)
    tiled: int = 0  # images that ran tiled to fit their actor's memory or --tile (masks.infer_tile)
    crf_reduced: int = 0  # images refined at a reduced resolution (masks.crf_scale < 1)
    carried: int = 0  # rows (masks and errors) an --incremental night copied from an earlier run
    died: int = 0  # inputs this run found killing their worker (errors rows of error_type WorkerDied)
    sums: dict[str, list[int]] = field(default_factory=dict)  # _SUMS → per-class totals
    outcomes: dict[str, int] = field(default_factory=dict)  # "stage/status" → inputs
    # stage → bucket counts + [sum]
    histograms: dict[str, list[float]] = field(default_factory=dict)
    nodes: dict[str, list[str]] = field(default_factory=dict)  # stage → Ray node ids
    # section → [[value, key, part], ...]
    candidates: dict[str, list[list]] = field(default_factory=dict)

    @classmethod
    def empty(cls, num_classes: int) -> PartStats:
        return cls(num_classes, sums={name: [0] * num_classes for name in _SUMS})

    @classmethod
    def of(
        cls, part: str, masks: pa.Table, errors: pa.Table, num_classes: int, nodes: dict[str, list[str]] | None = None
    ) -> PartStats:
        """Summary of one part's masks and errors rows (only STAT_COLUMNS of masks are read).
        Outcomes and stage times count only the rows this run computed; carried ones are "carry/*"."""
        labelled = masks.filter(pc.fill_null(masks.column("has_label"), False))
        with_pre = labelled.filter(pc.is_valid(labelled.column("crf_ms")))
        fresh_masks, fresh_errors = masks.filter(_fresh(masks)), errors.filter(_fresh(errors))
        outcomes = {"segment/ok": fresh_masks.num_rows} if fresh_masks.num_rows else {}
        for entry in pc.value_counts(fresh_errors.column("stage")).to_pylist():
            outcomes[f"{entry['values']}/error"] = entry["counts"]
        for status, table, fresh in (("ok", masks, fresh_masks), ("error", errors, fresh_errors)):
            if table.num_rows > fresh.num_rows:
                outcomes[f"carry/{status}"] = table.num_rows - fresh.num_rows
        return cls(
            num_classes,
            images=masks.num_rows,
            errors=errors.num_rows,
            labelled=labelled.num_rows,
            labelled_pre=with_pre.num_rows,
            label_errors=pc.count(masks.column("label_error")).as_py() or 0,
            tiled=pc.count(masks.column("infer_tile")).as_py() or 0,
            crf_reduced=pc.sum(pc.less(masks.column("crf_scale"), 1.0)).as_py() or 0,
            carried=masks.num_rows - fresh_masks.num_rows + errors.num_rows - fresh_errors.num_rows,
            died=_count(fresh_errors, "error_type", DIED),
            sums={name: _column_sum(labelled.column(name), num_classes) for name in _SUMS},
            outcomes=outcomes,
            histograms={stage: _histogram(fresh_masks.column(col)) for stage, col in TIMED_STAGES.items()},
            nodes={stage: sorted(ids) for stage, ids in (nodes or {}).items()},
            candidates={name: _top(masks, column, descending, part) for name, (column, descending) in SECTIONS.items()},
        )

    def __add__(self, other: PartStats) -> PartStats:
        def added(a: dict, b: dict) -> dict:
            return {k: (np.add(a[k], b[k]).tolist() if k in a and k in b else a.get(k, b.get(k))) for k in a | b}

        return PartStats(
            self.num_classes,
            self.images + other.images,
            self.errors + other.errors,
            self.labelled + other.labelled,
            self.labelled_pre + other.labelled_pre,
            self.label_errors + other.label_errors,
            tiled=self.tiled + other.tiled,
            crf_reduced=self.crf_reduced + other.crf_reduced,
            carried=self.carried + other.carried,
            died=self.died + other.died,
            sums=added(self.sums, other.sums),
            outcomes={k: self.outcomes.get(k, 0) + other.outcomes.get(k, 0) for k in self.outcomes | other.outcomes},
            histograms=added(self.histograms, other.histograms),
            nodes={
                k: sorted(set(self.nodes.get(k, [])) | set(other.nodes.get(k, []))) for k in self.nodes | other.nodes
            },
            candidates={
                name: _merge_top(self.candidates.get(name, []) + other.candidates.get(name, []), SECTIONS[name][1])
                for name in SECTIONS
            },
        )

    def total(self, name: str) -> np.ndarray:
        return np.asarray(self.sums.get(name, [0] * self.num_classes), dtype=np.int64)

    def summaries(self) -> tuple[DatasetSummary, DatasetSummary | None]:
        """Dataset metrics after CRF and before it (None when no labelled row ran the CRF)."""
        label_area = self.total("label_area")
        post = DatasetSummary.from_sums(self.total("intersect"), self.total("union"), label_area)
        if not self.labelled_pre:
            return post, None
        pre = DatasetSummary.from_sums(self.total("intersect_pre_crf"), self.total("union_pre_crf"), label_area)
        return post, pre

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> PartStats:
        return cls(**json.loads(text))


def _fresh(table: pa.Table) -> pa.ChunkedArray:
    """Rows this run computed: computed_in_run is its run_id (or absent: parts older than the column)."""
    if "computed_in_run" not in table.column_names or "run_id" not in table.column_names:
        return pa.chunked_array([pa.array([True] * table.num_rows, pa.bool_())])
    same = pc.equal(table.column("computed_in_run"), table.column("run_id"))
    return pc.fill_null(same, True)


def _count(table: pa.Table, column: str, value: str) -> int:
    """Rows whose ``column`` is ``value`` (0 without the column: parts read for other columns)."""
    if column not in table.column_names:
        return 0
    return pc.sum(pc.equal(table.column(column), value)).as_py() or 0


def _column_sum(column: pa.ChunkedArray, num_classes: int) -> list[int]:
    """Per-class sum of a list<int64> column (every row has ``num_classes`` entries), vectorised."""
    column = column.filter(pc.is_valid(column))
    if len(column) == 0:
        return [0] * num_classes
    flat = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.int64)
    return flat.reshape(-1, num_classes).sum(axis=0).tolist()


def _histogram(ms: pa.ChunkedArray) -> list[float]:
    """Prometheus buckets (value <= bound, then +Inf) of per-image seconds, and their sum last."""
    timed = ms.filter(pc.greater(pc.fill_null(ms, 0.0), 0.0))
    seconds = pc.divide(timed, 1000.0).to_numpy(zero_copy_only=False)
    counts = np.bincount(np.searchsorted(STAGE_BUCKETS, seconds, side="left"), minlength=len(STAGE_BUCKETS) + 1)
    return [*counts.astype(float).tolist(), float(seconds.sum())]


def _top(masks: pa.Table, column: str, descending: bool, part: str) -> list[list]:
    valid = masks.filter(pc.is_valid(masks.column(column))).select([column, "key"])
    ordered = valid.sort_by([(column, "descending" if descending else "ascending"), ("key", "ascending")])
    return [[r[column], r["key"], part] for r in ordered.slice(0, TOP_K).to_pylist()]


def _merge_top(rows: list[list], descending: bool) -> list[list]:
    return sorted(rows, key=lambda r: (-r[0] if descending else r[0], r[1]))[:TOP_K]


def classes_table(categories: tuple[str, ...], stats: PartStats) -> pa.Table:
    """classes.parquet: the summed statistics and IoUs per class (null where there is no union)."""
    n = len(categories)
    post, pre = stats.summaries()

    def iou(summary: DatasetSummary | None) -> list[float | None]:
        if summary is None:
            return [None] * n
        return [None if np.isnan(v) else float(v) for v in summary.iou]

    return pa.table(
        {
            "class_id": list(range(n)),
            "class_name": list(categories),
            "intersect": stats.total("intersect").tolist(),
            "union": stats.total("union").tolist(),
            "label_area": stats.total("label_area").tolist(),
            "iou": iou(post),
            "iou_pre_crf": iou(pre),
        },
        schema=CLASSES_SCHEMA,
    )
