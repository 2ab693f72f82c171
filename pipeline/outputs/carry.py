"""What an --incremental night carries: the base run, the plan (which keys' rows are copied) and
the ``Carrier`` that copies them; the stage and the night's flow are ``pipeline.dag.incremental``.

The *base* is the latest committed run under the same --output whose fingerprint (everything that
can change a row: model and weights, inference and CRF settings, classes, the input and labels
URIs, ``RESULTS_VERSION``) equals this run's. An input is carried when its image and its label
have the same identity in this night's listing as in the base's ``listing.parquet`` (an S3 ETag
and size, a local mtime_ns and size, whatever else a backend lists; never the bytes). An object
without a usable identity is segmented. Error rows are carried only when the error was about the
object's content (``CONTENT_ERROR_STAGES``). The driver plans in Arrow (keys only) and the
workers copy the rows, so no mask passes through the driver.
"""

from __future__ import annotations

import json
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.io.storage import Inputs, list_label_identities
from pipeline.outputs.partstats import PartStats
from pipeline.outputs.run import RunOutput, committed_runs
from pipeline.outputs.writer import WRITE_SCHEMA, part_name
from pipeline.rows.schema import ERRORS_SCHEMA, MASKS_SCHEMA

# Bump when the same inputs, model and settings give different rows (a fix in the maths, the PNG
# encoding, a statistic): every earlier run then stops being a base, and the next night is full.
RESULTS_VERSION = 1
# Errors that the same bytes give again (an undecodable file, one over the pixel guard): carried
# while the object is unchanged. Read errors (403, 404, timeouts) and worker deaths are retried.
CONTENT_ERROR_STAGES = ("decode",)
NOT_CONTENT_ERRORS = ("MemoryError", "WorkerDied")
NO_LABEL = "absent"  # label_id of a key with no label object (or no --labels)


class BaseRefused(RuntimeError):
    """The base run cannot be carried from (a part file missing or unreadable)."""


def fingerprint(config, weights, resources) -> dict:
    """Everything that can change a row of this run, as JSON data (manifest.json's "fingerprint")."""
    data = {
        "results_version": RESULTS_VERSION,
        "model": config.model,
        "weights": weights.sha256,
        "num_classes": weights.num_classes,
        "categories": list(weights.categories),
        "input": config.input_uri.rstrip("/"),
        "labels": config.labels_uri.rstrip("/") if config.labels_uri else None,
        "inference": asdict(config.inference),
        "crf": asdict(config.crf) if config.crf is not None else None,
        "crf_backend": resources.crf_backend,
        "device": "gpu" if resources.use_gpu else "cpu",
        "actor_memory_mib": config.compute.actor_memory_mib,  # decides tiling and the CRF's resolution
    }
    return json.loads(json.dumps(data))  # tuples as lists: equal to what manifest.json reads back


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'<field> changed: <old> -> <new>' for each fingerprint field that differs."""
    out = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{name}.")
        elif a != b:
            out.append(f"{prefix}{name} changed: {_short(a)} -> {_short(b)}")
    return out


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class Base:
    """The run to carry from, or why there is none."""

    run: RunOutput | None
    reason: str | None = None

    def manifest(self) -> dict:
        """manifest.json's "incremental"."""
        return {"base_run": self.run.run_id if self.run else None, "reason": self.reason}


def find_base(output_uri: str, run_id: str, fp: dict, storage_options: dict | None = None) -> Base:
    """The latest committed run (other than ``run_id``) whose fingerprint equals ``fp``."""
    runs = [r for r in committed_runs(output_uri, storage_options) if r != run_id]
    if not runs:
        return Base(None, "no committed run")
    latest_reason = None
    for candidate in reversed(runs):
        run = RunOutput(output_uri, candidate, storage_options)
        try:
            theirs = run.read_json("manifest.json").get("fingerprint")
        except (OSError, ValueError) as exc:
            theirs, why = None, f"run {candidate} has no readable manifest.json ({type(exc).__name__})"
        else:
            why = f"run {candidate} has no fingerprint (older than --incremental)"
        if theirs == fp:
            return Base(run)
        if theirs is not None:
            why = f"{'; '.join(differences(theirs, fp)[:3])} (since run {candidate})"
        latest_reason = latest_reason or why
    return Base(None, latest_reason)


def label_keys(keys: pa.ChunkedArray) -> pa.ChunkedArray:
    """Each image key's label key, as ``Locator.label_uri`` pairs them (extension → .png)."""
    return pa.chunked_array(
        [pa.array([posixpath.splitext(k)[0] + ".png" for k in c.to_pylist()], pa.string()) for c in keys.chunks],
        pa.string(),
    )


def listing_table(inputs: Inputs) -> pa.Table:
    """listing.parquet: key, size, version, label_size, label_version, and the two identities
    compared night over night (``image_id``, ``label_id``; null: none usable, never carried)."""
    table = inputs.identities()
    image_id = _identity(table.column("version"), table.column("size"))
    if not inputs.labels_uri:
        n = table.num_rows
        labels = pa.table({"label_size": pa.nulls(n, pa.int64()), "label_version": pa.nulls(n, pa.string())})
        present = pa.array([False] * n)
    else:
        listed = list_label_identities(inputs.labels_uri, inputs.storage_options)
        wanted = pa.table({"label_key": label_keys(table.column("key")), "row": pa.array(range(table.num_rows))})
        labels = wanted.join(listed, "label_key", join_type="left outer").sort_by("row")
        present = pc.is_in(labels.column("label_key"), value_set=listed.column("label_key").combine_chunks())
    label_id = pc.if_else(
        present, _identity(labels.column("label_version"), labels.column("label_size")), pa.scalar(NO_LABEL)
    )
    return (
        table.append_column("label_size", labels.column("label_size"))
        .append_column("label_version", labels.column("label_version"))
        .append_column("image_id", image_id)
        .append_column("label_id", label_id)
    )


def _identity(version, size) -> pa.ChunkedArray:
    """'<version>|<size>', null when the version is unknown."""
    return pc.binary_join_element_wise(version, pc.cast(pc.fill_null(size, -1), pa.string()), "|")


@dataclass(frozen=True)
class Plan:
    """What to carry from the base: one row per base part file (``part``, its carried ``keys``)."""

    base: Base
    parts: pa.Table  # part: string, keys: list<string>
    keys: pa.ChunkedArray  # every carried key

    def __len__(self) -> int:
        return len(self.keys)


def plan(todo: Inputs, current: pa.Table, base: Base) -> Plan:
    """Which of ``todo``'s keys to carry from ``base`` (``current``: this night's listing_table).
    Raises BaseRefused when the base's listing or part files are missing or unreadable."""
    run = base.run
    assert run is not None
    try:
        theirs = run.read_listing().select(["key", "image_id", "label_id"])
        held = _part_keys(run)
    except Exception as exc:  # a missing or corrupt file: say which run, carry nothing
        raise BaseRefused(f"base run {run.run_id} is unreadable ({type(exc).__name__}: {exc})") from None
    if held.num_rows != theirs.num_rows:
        raise BaseRefused(
            f"base run {run.run_id} is incomplete: its part files hold {held.num_rows} of the "
            f"{theirs.num_rows} inputs it listed (a part file is missing)"
        )
    ours = current.filter(pc.is_in(current.column("key"), value_set=todo.keys.combine_chunks()))
    ours = ours.select(["key", "image_id", "label_id"])
    joined = ours.join(theirs, "key", right_suffix="_base", join_type="inner")
    same = pc.and_(
        pc.equal(joined.column("image_id"), joined.column("image_id_base")),
        pc.equal(joined.column("label_id"), joined.column("label_id_base")),
    )
    unchanged = joined.filter(pc.fill_null(same, False)).select(["key"])
    names = json.loads(held.schema.metadata[b"names"])
    carried = unchanged.join(held, "key", join_type="inner").filter(pc.field("carry"))
    grouped = carried.group_by("part").aggregate([("key", "list")]).sort_by("part")
    part_names = pa.array([names[i] for i in grouped.column("part").to_pylist()], pa.string())
    parts = pa.table({"part": part_names, "keys": grouped.column("key_list")})
    return Plan(base, parts, carried.column("key"))


def _part_keys(run: RunOutput) -> pa.Table:
    """key, part (an index into the sorted part names: one int per row, not one string), carry
    (mask rows, and error rows about the object's content) of every base part. The key columns are
    read concurrently: a night of 10^4 part files on S3 is 10^4 GETs."""
    names = sorted(set(run.part_names("masks")) | set(run.part_names("errors")))
    jobs = [("masks", i, name) for i, name in enumerate(names)] + [("errors", i, name) for i, name in enumerate(names)]
    with ThreadPoolExecutor(READ_THREADS) as pool:
        tables = list(pool.map(lambda job: _keys_of(run, *job), jobs))
    tables = [t for t in tables if t.num_rows]
    return (pa.concat_tables(tables) if tables else _PART_KEYS.empty_table()).replace_schema_metadata(
        {"names": json.dumps(names)}
    )


def _keys_of(run: RunOutput, kind: str, index: int, name: str) -> pa.Table:
    if kind == "masks":
        keys = run.read_part("masks", name, ["key"]).column("key")
        carry = pa.array([True] * len(keys))
    else:
        errors = run.read_part("errors", name, ["key", "stage", "error_type"])
        keys = errors.column("key")
        carry = pc.and_(
            pc.is_in(errors.column("stage"), value_set=pa.array(CONTENT_ERROR_STAGES)),
            pc.invert(pc.is_in(errors.column("error_type"), value_set=pa.array(NOT_CONTENT_ERRORS))),
        )
    return pa.table({"key": keys, "part": pa.array([index] * len(keys), pa.int32()), "carry": carry}, schema=_PART_KEYS)


READ_THREADS = 16
_PART_KEYS = pa.schema([("key", pa.string()), ("part", pa.int32()), ("carry", pa.bool_())])


def new_part_names(parts: pa.Table) -> list[str]:
    """The part names the carry writes in the new run (one per base part), as ``Carrier`` names them."""
    return [part_name(pa.array(sorted(keys), pa.string())) for keys in parts.column("keys").to_pylist()]


class Carrier:
    """Ray Data callable class: (part, keys) rows in, one WRITE_SCHEMA row per part file written.

    Each base part's carried rows become one part file of the new run, named like the writer names
    them (a hash of the keys), so a retried or resumed copy replaces its own file."""

    def __init__(self, *, output_uri: str, base_run: str, run_id: str, storage_options: dict, num_classes: int):
        self.base = RunOutput(output_uri, base_run, storage_options)
        self.out = RunOutput(output_uri, run_id, storage_options)
        self.run_id, self.num_classes = run_id, num_classes

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for part, keys in zip(batch.column("part").to_pylist(), batch.column("keys").to_pylist(), strict=True):
            masks = self._rows("masks", part, keys, MASKS_SCHEMA)
            errors = self._rows("errors", part, keys, ERRORS_SCHEMA)
            if masks.num_rows + errors.num_rows != len(keys):
                raise BaseRefused(f"base run {self.base.run_id}'s part {part} no longer holds the rows to carry")
            name = part_name(pa.array(sorted(keys), pa.string()))
            for kind, table in (("masks", masks), ("errors", errors)):
                if table.num_rows:
                    self.out.write_part(kind, name, table)
            rows.append({"part": name, "stats": PartStats.of(name, masks, errors, self.num_classes).to_json()})
        return pa.Table.from_pylist(rows, schema=WRITE_SCHEMA)

    def _rows(self, kind: str, part: str, keys: list[str], schema: pa.Schema) -> pa.Table:
        """The base part's rows for ``keys`` in this run's schema: run_id is this run's, and
        computed_in_run the run that computed them (the base's run_id for parts older than it)."""
        if not self.base.fs.exists(self.base.path(kind, part)):
            return schema.empty_table()
        table = self.base.read_part(kind, part, keys=keys).sort_by("key")
        n = table.num_rows
        computed = table.column("run_id")
        if "computed_in_run" in table.column_names:
            computed = pc.coalesce(table.column("computed_in_run"), computed)
        columns = {name: table.column(name) for name in schema.names if name in table.column_names}
        columns |= {"run_id": pa.array([self.run_id] * n, pa.string()), "computed_in_run": computed}
        return pa.table(
            [columns.get(f.name, pa.nulls(n, f.type)) for f in schema], schema=schema
        )  # masks columns copied as they are: byte-identical PNGs
