"""The night-over-night comparison of two committed runs as a Ray Data job.

Both runs' masks are read by workers and joined by key (Ray Data's hash join); comparison workers
decode both masks of each key, write ``comparison/part-*.parquet`` and return one small
``ComparisonStats`` each; error kinds are grouped by workers too. The driver adds up the stats,
reads the two ``classes.parquet`` files and writes ``comparison_classes.parquet`` and
``comparison.json``: its memory does not grow with the number of images.
"""

from __future__ import annotations

import math
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipeline.evaluation.compare import MASK_COLUMNS, compare_batch, finish
from pipeline.evaluation.compare_errors import ERROR_COLUMNS, error_kinds, merge_error_kinds
from pipeline.evaluation.compare_result import Comparison, ComparisonStats
from pipeline.io.storage import arrow_filesystem, write_parquet_atomic
from pipeline.outputs.run import RunOutput
from pipeline.outputs.writer import part_name
from pipeline.rows.schema import ERRORS_SCHEMA, MASKS_SCHEMA

ROWS_PER_PARTITION = 20_000  # join partitions: about this many keys each


def compare_part(
    joined: pa.Table, *, run_uri: str | None, storage_options: dict, run_id: str, against: str, examples: int
) -> pa.Table:
    """Ray Data task: joined rows in, comparison part written, one row of pickled stats out."""
    rows, stats = compare_batch(joined, run_id=run_id, against=against, examples=examples)
    if run_uri is not None and rows.num_rows:
        name = part_name(rows.column("key").combine_chunks())
        write_parquet_atomic(f"{run_uri}/comparison/{name}", rows, storage_options)
    return pa.table({"stats": [pickle.dumps(stats)]})


def _read(output: RunOutput, kind: str, columns: list[str]) -> ray.data.Dataset:
    paths = [output.path(kind, name) for name in output.part_names(kind)]
    schema = MASKS_SCHEMA if kind == "masks" else ERRORS_SCHEMA
    if not paths:
        return ray.data.from_arrow(schema.empty_table().select(columns))
    return ray.data.read_parquet(paths, columns=columns, filesystem=arrow_filesystem(output.fs))


def _masks(output: RunOutput, side: str) -> ray.data.Dataset:
    names = {c: f"{c}_{side}" for c in MASK_COLUMNS[1:]}
    return _read(output, "masks", list(MASK_COLUMNS)).rename_columns(names)


def _kinds(output: RunOutput) -> pa.Table:
    ds = _read(output, "errors", ERROR_COLUMNS).map_batches(error_kinds, batch_format="pyarrow", batch_size=None)
    return merge_error_kinds(list(ds.iter_batches(batch_size=None, batch_format="pyarrow")))


def _classes(output: RunOutput) -> pa.Table:
    with output.fs.open(output.path("classes.parquet"), "rb") as f:
        return pq.read_table(f)


def compare_outputs(old: RunOutput, new: RunOutput, *, write: bool = True, examples: int = 5) -> Comparison:
    """Compare two committed runs (``new`` may be committing: its classes.parquet is written)."""
    old_masks, new_masks = _masks(old, "old"), _masks(new, "new")
    parts = len(old.part_names("masks")) + len(new.part_names("masks"))
    partitions = max(1, min(256, math.ceil(parts * 1000 / ROWS_PER_PARTITION)))
    joined = old_masks.join(new_masks, "full_outer", num_partitions=partitions, on=("key",))
    if write:
        new.remove("comparison")
    writer = {
        "run_uri": new.full_uri() if write else None,
        "storage_options": new.storage_options,
        "run_id": new.run_id,
        "against": old.run_id,
        "examples": examples,
    }
    # Ray's annotations cannot say that fn_kwargs supplies compare_part's keyword-only arguments.
    results = joined.map_batches(compare_part, fn_kwargs=writer, batch_format="pyarrow", batch_size=None)  # type: ignore[arg-type]
    stats = ComparisonStats()
    for batch in results.iter_batches(batch_size=None, batch_format="pyarrow"):
        for blob in batch.column("stats").to_pylist():  # type: ignore[union-attr]  # batch_format="pyarrow": a Table
            stats = stats + pickle.loads(blob)
    comparison = finish(
        stats,
        run_id=new.run_id,
        against=old.run_id,
        old_classes=_classes(old),
        new_classes=_classes(new),
        old_error_kinds=_kinds(old),
        new_error_kinds=_kinds(new),
    )
    if write:
        new.write_table("comparison_classes.parquet", comparison.classes)
        new.write_json("comparison.json", comparison.to_json())
    return comparison
