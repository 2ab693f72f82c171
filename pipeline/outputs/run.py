"""A run's output directory: part files written by the workers, then an atomic commit.

``OUTPUT/run=<id>/masks/part-*.parquet`` and ``errors/part-*.parquet`` are published by the
write stage (pipeline/outputs/writer.py) while the run goes, so a driver killed midway keeps what its
workers finished and ``--resume`` skips those keys. ``classes.parquet``, ``manifest.json`` and
``report.html`` are derived from the parts' summed ``PartStats``, and ``_SUCCESS`` is written
last: a run without it is incomplete. This module is the run directory's I/O only; the commit's
order and what it writes are pipeline/dag/commit.py's.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.evaluation.compare_result import Comparison
from pipeline.evaluation.metrics import DatasetSummary
from pipeline.io.storage import open_fs, protocols, write_bytes_atomic, write_parquet_atomic
from pipeline.outputs.partstats import ERROR_STAT_COLUMNS, STAT_COLUMNS, PartStats
from pipeline.rows.schema import ERRORS_SCHEMA, MASKS_SCHEMA

SUCCESS = "_SUCCESS"
LISTING = "listing.parquet"
REPORT_COLUMNS = [
    "key",
    "uri",
    "thumbnail",
    "label_thumbnail",
    "mask",
    "mask_pre_crf",
    "miou",
    "miou_pre_crf",
    "crf_changed_fraction",
    "mean_max_prob",
    "low_conf_fraction",
]


class OutputError(ValueError):
    """The output location cannot be used as asked; the message says what to fix."""


@dataclass(frozen=True)
class RunSummary:
    images: int
    errors: int
    labelled: int
    post: DatasetSummary
    pre: DatasetSummary | None
    label_errors: int = 0  # segmented images whose label was not scored (masks.label_error)
    tiled: int = 0  # images whose inference ran tiled (masks.infer_tile)
    crf_reduced: int = 0  # images whose CRF ran at a reduced resolution (masks.crf_scale < 1)
    comparison: Comparison | None = None  # against the previous committed run, when asked for
    carried: int = 0  # inputs an --incremental night copied from its base run (masks + errors)
    incremental: dict | None = None  # manifest.json's "incremental": base_run, or the reason for none


@dataclass(frozen=True)
class Earlier:
    """What a resumed run already holds: its keys (one Arrow column) and its parts' summed stats."""

    keys: pa.ChunkedArray
    stats: PartStats


class RunOutput:
    def __init__(self, output_uri: str, run_id: str, storage_options: dict | None = None) -> None:
        self.storage_options = storage_options or {}
        self.run_id = run_id
        self.fs, root = open_fs(output_uri, self.storage_options)
        self.run_dir = posixpath.join(root.rstrip("/"), f"run={run_id}")
        # Local runs print as plain paths, so they paste into duckdb/pandas as they are.
        local = "file" in protocols(self.fs)
        self.uri = self.run_dir if local else self.fs.unstrip_protocol(self.run_dir)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.run_dir, *parts)

    def full_uri(self, *parts: str) -> str:
        """``path`` with its protocol: what workers and write helpers open."""
        return self.fs.unstrip_protocol(self.path(*parts))

    def prepare(self, *, resume: bool, overwrite: bool, num_classes: int, dry_run: bool = False) -> Earlier:
        """Check the target before any work; return what a resumed run already holds. ``dry_run``:
        the same checks and answer, changing nothing."""
        nothing = Earlier(pa.chunked_array([], pa.string()), PartStats.empty(num_classes))
        if not self.fs.exists(self.run_dir):
            return nothing
        committed = self.fs.exists(self.path(SUCCESS))
        if overwrite:
            if not dry_run:
                self.fs.rm(self.run_dir, recursive=True)
            return nothing
        if not resume:
            state = "a committed run" if committed else "an incomplete run"
            raise OutputError(
                f"{self.uri} already holds {state}; pass --resume to continue it "
                f"(same --run-id) or --overwrite to replace it"
            )
        if committed and not dry_run:
            # The run is being changed: readers must not see it complete.
            self.fs.rm(self.path(SUCCESS))
        return self.earlier(num_classes)

    def earlier(self, num_classes: int) -> Earlier:
        """Keys and stats of the parts already written, reading only their statistic columns."""
        keys, stats = [], PartStats.empty(num_classes)
        names = sorted(set(self.part_names("masks")) | set(self.part_names("errors")))
        for name in names:
            masks = self.read_part("masks", name, STAT_COLUMNS)
            errors = self.read_part("errors", name, ERROR_STAT_COLUMNS)
            keys += [masks.column("key"), errors.column("key")]
            stats += PartStats.of(name, masks, errors, num_classes)
        return Earlier(pa.chunked_array([c for k in keys for c in k.chunks], pa.string()), stats)

    def written_keys(self) -> pa.ChunkedArray:
        """Every key in the part files (the key columns only), to reconcile with the listing."""
        chunks = [
            c
            for kind in ("masks", "errors")
            for name in self.part_names(kind)
            for c in self.read_part(kind, name, ["key"]).column("key").chunks
        ]
        return pa.chunked_array(chunks, pa.string())

    def write_part(self, kind: str, name: str, table: pa.Table) -> None:
        write_parquet_atomic(self.full_uri(kind, name), table, self.storage_options)

    def part_names(self, kind: str) -> list[str]:
        folder = self.path(kind)
        self.fs.invalidate_cache(folder)  # workers wrote there since this process last listed it
        if not self.fs.exists(folder):
            return []
        names = (posixpath.basename(p) for p in self.fs.ls(folder, detail=False) if p.endswith(".parquet"))
        return sorted(n for n in names if not n.startswith((".", "_")))

    def read_part(
        self, kind: str, name: str, columns: list[str] | None = None, keys: list[str] | None = None
    ) -> pa.Table:
        """One part file (an empty table if it does not exist), only ``keys`` when given: the key
        filter is pushed into the Parquet scan."""
        schema = MASKS_SCHEMA if kind == "masks" else ERRORS_SCHEMA
        path = self.path(kind, name)
        if not self.fs.exists(path):
            empty = schema.empty_table()
            return empty.select(columns) if columns else empty
        with self.fs.open(path, "rb") as f:
            return pq.read_table(f, columns=columns, filters=[("key", "in", keys)] if keys else None)

    def rows_for(self, candidates: dict[str, list[list]]) -> dict[str, dict]:
        """The report's rows, by key: only the parts that hold them, only those keys."""
        by_part: dict[str, set[str]] = {}
        for entries in candidates.values():
            for _, key, part in entries:
                by_part.setdefault(part, set()).add(key)
        return {
            r["key"]: r
            for part, keys in sorted(by_part.items())
            for r in self.read_part("masks", part, REPORT_COLUMNS, sorted(keys)).to_pylist()
        }

    def first_errors(self, limit: int) -> pa.Table:
        tables, n = [], 0
        for name in self.part_names("errors"):
            if n >= limit:
                break
            tables.append(self.read_part("errors", name))
            n += tables[-1].num_rows
        return pa.concat_tables(tables).slice(0, limit) if tables else ERRORS_SCHEMA.empty_table()

    def write_listing(self, identities: pa.Table) -> None:
        """listing.parquet: the identity of every input this run listed (key, size, version and the
        label's), what the next --incremental night compares its own listing with."""
        self.write_table(LISTING, identities)

    def read_listing(self) -> pa.Table:
        """This run's listing.parquet; FileNotFoundError when the run has none."""
        with self.fs.open(self.path(LISTING), "rb") as f:
            return pq.read_table(f)

    def has(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def read_json(self, name: str) -> dict:
        with self.fs.open(self.path(name), "rb") as f:
            return json.loads(f.read())

    def write_table(self, name: str, table: pa.Table) -> None:
        write_parquet_atomic(self.full_uri(name), table, self.storage_options)

    def write_json(self, name: str, data: dict) -> None:
        write_bytes_atomic(self.full_uri(name), json.dumps(data, indent=2, default=str).encode(), self.storage_options)

    def remove(self, name: str) -> None:
        if self.fs.exists(self.path(name)):
            self.fs.rm(self.path(name), recursive=True)

    def write_bytes(self, name: str, data: bytes) -> None:
        write_bytes_atomic(self.full_uri(name), data, self.storage_options)


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
        run_id = posixpath.basename(posixpath.dirname(path)).removeprefix("run=")
        runs.append((committed_at, run_id))
    return [run_id for _, run_id in sorted(runs)]


def run_before(runs: list[str], run_id: str) -> str | None:
    """The committed run just before ``run_id`` in ``runs`` (oldest first); the latest one when
    ``run_id`` is not committed yet, which is the case while a run commits."""
    if run_id in runs:
        i = runs.index(run_id)
        return runs[i - 1] if i > 0 else None
    return runs[-1] if runs else None
