"""The error types a run has that the run before it had not: the comparison's "new errors".

``error_kinds`` groups errors rows by (stage, error type) with a count and the smallest key as the
example; it is additive (``merge_error_kinds`` sums the tables of a run's parts), so workers group
their parts and the driver only merges small tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

ERROR_COLUMNS = ["key", "stage", "error_type", "message"]
_KIND_COLUMNS = ["stage", "error_type", "count", "example_key", "example_message"]


@dataclass(frozen=True)
class NewError:
    """An (error stage, error type) pair the older run did not have."""

    stage: str
    error_type: str
    count: int
    example_key: str
    example_message: str


def error_kinds(errors: pa.Table) -> pa.Table:
    """(stage, error_type) → count and the smallest key with its message; additive via
    ``merge_error_kinds``."""
    grouped = errors.select(ERROR_COLUMNS).sort_by("key").group_by(["stage", "error_type"], use_threads=False)
    return grouped.aggregate([("key", "count"), ("key", "first"), ("message", "first")]).rename_columns(_KIND_COLUMNS)


def merge_error_kinds(tables: list[pa.Table]) -> pa.Table:
    """Sum of ``error_kinds`` tables from parts of one run."""
    merged = (
        pa.concat_tables(tables)
        if tables
        else error_kinds(pa.table({c: pa.array([], pa.string()) for c in ERROR_COLUMNS}))
    )
    merged = merged.sort_by("example_key").group_by(["stage", "error_type"], use_threads=False)
    return merged.aggregate([("count", "sum"), ("example_key", "first"), ("example_message", "first")]).rename_columns(
        _KIND_COLUMNS
    )


def new_error_types(old_kinds: pa.Table, new_kinds: pa.Table) -> tuple[NewError, ...]:
    seen = set(zip(old_kinds.column("stage").to_pylist(), old_kinds.column("error_type").to_pylist(), strict=True))
    found = [
        NewError(r["stage"], r["error_type"], r["count"], r["example_key"], r["example_message"][:200])
        for r in new_kinds.to_pylist()
        if (r["stage"], r["error_type"]) not in seen
    ]
    return tuple(sorted(found, key=lambda e: (e.stage, e.error_type)))
