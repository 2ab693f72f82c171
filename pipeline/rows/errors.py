"""The error protocol every stage follows: a failed row carries ``error_stage`` (``Rows.fail`` in
pipeline/rows/batch.py sets it), later stages pass it through, and the write stage splits masks rows
from errors rows."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.rows.schema import ERRORS_SCHEMA, MASKS_SCHEMA

ERROR_COLUMNS = ("error_stage", "error_type", "error_message")  # a failed row's stream columns


def storable(text: str) -> str:
    """``text`` as a valid UTF-8 string (a file name's undecodable bytes escaped): an Arrow string
    column refuses lone surrogates, which would fail the whole batch's table."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:  # a file name's bytes as the OS gave them, then escaped (as storage.escaped_name does)
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def split_results(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """A RESULT_SCHEMA table → (masks rows, errors rows) with their own schemas."""
    ok = pc.fill_null(pc.equal(table.column("error_stage"), ""), True)
    masks = table.filter(ok).select(MASKS_SCHEMA.names).cast(MASKS_SCHEMA)
    failed = table.filter(pa.compute.invert(ok))
    errors = pa.table(
        {
            "key": failed.column("key"),
            "uri": failed.column("uri"),
            "stage": failed.column("error_stage"),
            "error_type": failed.column("error_type"),
            "message": failed.column("error_message"),
            "run_id": failed.column("run_id"),
            "computed_in_run": failed.column("computed_in_run"),
        }
    ).cast(ERRORS_SCHEMA)
    return masks, errors
