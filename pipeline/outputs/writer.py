"""The write stage: Ray workers publish the result rows as part files and return only their summary.

Each call receives ``--rows-per-file`` result rows (Ray Data bundles the blocks), splits them into
``masks`` and ``errors`` rows and writes ``masks/<name>`` and ``errors/<name>``, each atomically.
The name is a hash of the keys it holds, so a write that Ray retries (its worker died, the node
was preempted) replaces its own file instead of adding a second copy. The driver only sees one
small row per part: the part's name and its ``PartStats``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.io.storage import write_parquet_atomic
from pipeline.outputs.partstats import PartStats
from pipeline.rows.errors import split_results

WRITE_SCHEMA = pa.schema([("part", pa.string()), ("stats", pa.string())])


def part_name(keys: pa.Array | pa.ChunkedArray) -> str:
    """Deterministic file name for the rows with these keys (in the order given)."""
    digest = hashlib.sha256()
    for chunk in pa.chunked_array(keys).chunks:
        digest.update(chunk.buffers()[1] or b"")  # offsets: the keys' lengths
        digest.update(chunk.buffers()[2] or b"")  # the keys' bytes, concatenated
    return f"part-{digest.hexdigest()[:24]}.parquet"


def _nodes(batch: pa.Table) -> dict[str, list[str]]:
    return {stage: [v for v in pc.unique(batch.column(f"{stage}_node")).to_pylist() if v] for stage in ("infer", "crf")}


@dataclass(frozen=True, kw_only=True)
class WriteSpec:
    """What a ``PartWriter`` needs: the run folder's URI, how to reach it, the classes it counts."""

    run_uri: str
    storage_options: dict
    num_classes: int


class PartWriter:
    """Ray Data callable class: RESULT_SCHEMA rows in, one WRITE_SCHEMA row (name + summary) out."""

    def __init__(self, spec: WriteSpec) -> None:
        self.run_uri = spec.run_uri.rstrip("/")
        self.storage_options = spec.storage_options
        self.num_classes = spec.num_classes

    def __call__(self, batch: pa.Table) -> pa.Table:
        batch = batch.sort_by("key")  # the same rows give the same file, whatever order they came in
        name = part_name(batch.column("key").combine_chunks())
        masks, errors = split_results(batch)
        for kind, table in (("masks", masks), ("errors", errors)):
            if table.num_rows:
                write_parquet_atomic(f"{self.run_uri}/{kind}/{name}", table, self.storage_options)
        stats = PartStats.of(name, masks, errors, self.num_classes, nodes=_nodes(batch))
        return pa.Table.from_pylist([{"part": name, "stats": stats.to_json()}], schema=WRITE_SCHEMA)
