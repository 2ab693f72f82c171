"""A run's output directory: part files as the stream produces them, then an atomic commit.

``OUTPUT/run=<id>/masks/part-*.parquet`` and ``errors/part-*.parquet`` are written while the
run goes (each file published atomically), so a driver killed midway keeps what it finished and
``--resume`` skips those keys. ``classes.parquet`` and ``manifest.json`` are derived from the
committed part files, and ``_SUCCESS`` is written last: a run without it is incomplete.
"""

from __future__ import annotations

import io
import json
import posixpath
import time
import uuid
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.compare import COMPARISON_FILES, Comparison, compare_runs, load_run, write_comparison
from pipeline.metrics import DatasetSummary
from pipeline.report import render_report
from pipeline.storage import protocols, open_fs, write_bytes_atomic
from pipeline.tables import CLASSES_SCHEMA, ERRORS_SCHEMA, MASKS_SCHEMA

SUCCESS = "_SUCCESS"


class OutputError(ValueError):
    """The output location cannot be used as asked; the message says what to fix."""


@dataclass(frozen=True)
class RunSummary:
    images: int
    errors: int
    labelled: int
    post: DatasetSummary
    pre: DatasetSummary | None
    comparison: Comparison | None = None  # against the previous committed run, when asked for


class RunOutput:
    def __init__(self, output_uri: str, run_id: str, storage_options: dict | None = None) -> None:
        self.storage_options = storage_options or {}
        self.run_id = run_id
        self.fs, root = open_fs(output_uri, self.storage_options)
        self.run_dir = posixpath.join(root.rstrip("/"), f"run={run_id}")
        # Local runs print as plain paths, so they paste into duckdb/pandas as they are.
        self.uri = self.run_dir if "file" in protocols(self.fs) else self.fs.unstrip_protocol(self.run_dir)
        self._seq = 0

    def path(self, *parts: str) -> str:
        return posixpath.join(self.run_dir, *parts)

    def prepare(self, *, resume: bool, overwrite: bool) -> set[str]:
        """Check the target before any work; return the keys a resumed run already holds."""
        if not self.fs.exists(self.run_dir):
            return set()
        committed = self.fs.exists(self.path(SUCCESS))
        if overwrite:
            self.fs.rm(self.run_dir, recursive=True)
            return set()
        if not resume:
            state = "a committed run" if committed else "an incomplete run"
            raise OutputError(f"{self.uri} already holds {state}; pass --resume to continue it (same --run-id) "
                              f"or --overwrite to replace it")
        if committed:
            self.fs.rm(self.path(SUCCESS))  # the run is being changed: readers must not see it complete
        return self.done_keys()

    def _part_files(self, kind: str) -> list[str]:
        folder = self.path(kind)
        if not self.fs.exists(folder):
            return []
        return sorted(p for p in self.fs.ls(folder, detail=False)
                      if p.endswith(".parquet") and not posixpath.basename(p).startswith((".", "_")))

    def read(self, kind: str, columns: list[str] | None = None) -> pa.Table:
        schema = MASKS_SCHEMA if kind == "masks" else ERRORS_SCHEMA
        tables = []
        for path in self._part_files(kind):
            with self.fs.open(path, "rb") as f:
                tables.append(pq.read_table(f, columns=columns))
        if not tables:
            return schema.empty_table().select(columns) if columns else schema.empty_table()
        return pa.concat_tables(tables)

    def done_keys(self) -> set[str]:
        keys: set[str] = set()
        for kind in ("masks", "errors"):
            keys.update(self.read(kind, ["key"]).column("key").to_pylist())
        return keys

    def write_part(self, kind: str, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        self._seq += 1
        name = f"part-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{self._seq:05d}-{uuid.uuid4().hex[:8]}.parquet"
        write_bytes_atomic(self.fs.unstrip_protocol(self.path(kind, name)), buffer.getvalue(), self.storage_options)

    def commit(self, categories: tuple[str, ...], manifest: dict, *, labels_uri: str | None = None,
               previous: RunOutput | None = None) -> RunSummary:
        """Write classes.parquet, manifest.json, the comparison with ``previous`` (a committed run)
        and report.html from the part files, then _SUCCESS."""
        masks = self.read("masks", ["key", "has_label", "intersect", "union", "label_area",
                                    "intersect_pre_crf", "union_pre_crf", "mask_pre_crf"])
        errors = self.read("errors", ["key"])
        n = len(categories)
        labelled = masks.filter(pa.compute.equal(masks.column("has_label"), True))
        has_pre = labelled.num_rows > 0 and labelled.column("mask_pre_crf").null_count < labelled.num_rows

        def total(column: str) -> np.ndarray:
            values = labelled.column(column).to_pylist()
            return np.asarray(values, dtype=np.int64).reshape(-1, n).sum(axis=0) if values else np.zeros(n, np.int64)

        intersect, union, label_area = total("intersect"), total("union"), total("label_area")
        post = DatasetSummary.from_sums(intersect, union, label_area)
        pre = DatasetSummary.from_sums(total("intersect_pre_crf"), total("union_pre_crf"), label_area) if has_pre else None
        classes = pa.table({
            "class_id": list(range(n)),
            "class_name": list(categories),
            "intersect": intersect.tolist(),
            "union": union.tolist(),
            "label_area": label_area.tolist(),
            "iou": [None if np.isnan(v) else float(v) for v in post.iou],
            "iou_pre_crf": [None] * n if pre is None else [None if np.isnan(v) else float(v) for v in pre.iou],
        }, schema=CLASSES_SCHEMA)
        buffer = io.BytesIO()
        pq.write_table(classes, buffer)
        write_bytes_atomic(self.fs.unstrip_protocol(self.path("classes.parquet")), buffer.getvalue(), self.storage_options)

        summary = RunSummary(images=masks.num_rows, errors=errors.num_rows, labelled=labelled.num_rows, post=post, pre=pre)
        counts = {"images": summary.images, "errors": summary.errors, "labelled": summary.labelled,
                  "inputs": summary.images + summary.errors}
        metrics = {"miou": post.miou, "pixel_acc": post.pixel_acc, "mean_acc": post.mean_acc, "fw_iou": post.fw_iou,
                   "miou_pre_crf": pre.miou if pre else None, "pixel_acc_pre_crf": pre.pixel_acc if pre else None,
                   "mean_acc_pre_crf": pre.mean_acc if pre else None, "fw_iou_pre_crf": pre.fw_iou if pre else None}
        manifest = {**manifest, "counts": counts, "metrics": metrics}
        write_bytes_atomic(self.fs.unstrip_protocol(self.path("manifest.json")),
                           json.dumps(manifest, indent=2, default=str).encode(), self.storage_options)
        for name in COMPARISON_FILES:  # from an earlier commit of this run: they describe other masks
            if self.fs.exists(self.path(name)):
                self.fs.rm(self.path(name))
        comparison = None
        if previous is not None:
            # Needs this run's classes.parquet (written above); the report shows it, _SUCCESS covers it.
            comparison = compare_runs(load_run(previous), load_run(self))
            write_comparison(self, comparison)
            summary = replace(summary, comparison=comparison)
        page = render_report(manifest=manifest, classes=classes, masks_reader=lambda cols: self.read("masks", cols),
                             errors=self.read("errors"), labels_uri=labels_uri, storage_options=self.storage_options,
                             comparison=comparison)
        write_bytes_atomic(self.fs.unstrip_protocol(self.path("report.html")), page.encode(), self.storage_options)
        write_bytes_atomic(self.fs.unstrip_protocol(self.path(SUCCESS)),
                           json.dumps({**counts, "committed_at": manifest.get("finished_at")}).encode(),
                           self.storage_options)
        return summary


def committed_runs(output_uri: str, storage_options: dict | None = None) -> list[str]:
    """Ids of the runs under ``output_uri`` that have ``_SUCCESS``, oldest commit first.

    Ordered by the commit time ``_SUCCESS`` records, then by id: run ids are free-form
    (``--run-id``), and a resumed run commits when it finishes, not when it started.
    """
    fs, root = open_fs(output_uri, storage_options or {})
    root = root.rstrip("/")
    fs.invalidate_cache(root)  # this process may have listed OUTPUT before other runs committed
    paths = fs.glob(posixpath.join(root, "run=*", SUCCESS))
    if not paths:
        return []
    runs = []
    for path, data in fs.cat(list(paths)).items():  # concurrent requests on object stores
        try:
            committed_at = str(json.loads(data).get("committed_at") or "")
        except (ValueError, AttributeError):
            committed_at = ""  # an empty or foreign _SUCCESS still marks a committed run
        runs.append((committed_at, posixpath.basename(posixpath.dirname(path)).removeprefix("run=")))
    return [run_id for _, run_id in sorted(runs)]
