"""The carry stage of an --incremental night: rows of inputs unchanged since the base run are copied
from its part files by Ray workers (``pipeline.outputs.carry.Carrier``), and only the rest is segmented."""

from __future__ import annotations

from typing import NamedTuple

import pyarrow as pa
import ray

from pipeline.dag.runner import consume
from pipeline.io.storage import Inputs
from pipeline.outputs.carry import Base, BaseRefused, Carrier, Plan, find_base, new_part_names, plan
from pipeline.outputs.partstats import PartStats
from pipeline.outputs.run import RunOutput


def carry(plan_: Plan, *, output: RunOutput, output_uri: str, num_classes: int, storage_options: dict, writers: int):
    """The Ray Data stage that copies the planned rows (one call per base part file)."""
    from pipeline.dag.stages import WRITER_CPUS, map_batches  # here: the DAG's modules import torch

    parts = plan_.parts
    assert plan_.base.run is not None, "a plan copies from a base run"
    blocks = max(1, min(parts.num_rows, 64))
    step = -(-parts.num_rows // blocks)
    ds = ray.data.from_blocks([parts.slice(i, step) for i in range(0, parts.num_rows, step)])
    ds.context.max_errored_blocks = 0  # a copy that fails fails the carry: never half-carried
    options = dict(
        fn_constructor_kwargs={
            "output_uri": output_uri,
            "base_run": plan_.base.run.run_id,
            "run_id": output.run_id,
            "storage_options": storage_options,
            "num_classes": num_classes,
        },
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=WRITER_CPUS,  # copies write part files: never on a head that declares num-cpus: 0
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, writers)),
        max_restarts=-1,
        max_task_retries=3,
    )
    return map_batches(ds, Carrier, options)


class Night(NamedTuple):
    """What an --incremental night leaves to segment, the carried parts' summed stats and
    manifest.json's "incremental"."""

    todo: Inputs
    carried: PartStats
    manifest: dict


def choose(config, *, todo: Inputs, listing: pa.Table, fp: dict) -> tuple[Base, Plan | None]:
    """The base run of an --incremental night and what to carry from it (None: no base, or one that
    cannot be read), read before anything is copied or written: the night and --dry-run both ask this."""
    base = find_base(config.output_uri, config.run_id, fp, config.storage_options)
    if base.run is None:
        return base, None
    try:
        return base, plan(todo, listing, base)
    except BaseRefused as exc:
        return Base(None, f"{exc}; segmenting every input"), None


def dry_run_carry(config, *, todo: Inputs, listing: pa.Table, fp: dict) -> dict:
    """What --dry-run --incremental prints: manifest.json's "incremental" (the base run, or why there
    is none) and how many of ``todo`` the night would carry and segment, as ``choose`` decides."""
    base, chosen = choose(config, todo=todo, listing=listing, fp=fp)
    carried = len(chosen) if chosen is not None else 0
    return {**base.manifest(), "carried": carried, "segmented": len(todo) - carried}


def incremental_night(
    config, *, todo: Inputs, listing: pa.Table, fp: dict, output: RunOutput, num_classes: int, writers: int
) -> Night:
    """Carry what is unchanged since the base run. A base that cannot be read, or a copy that
    fails, carries nothing: its copied parts are removed and every input is segmented."""
    base, chosen = choose(config, todo=todo, listing=listing, fp=fp)
    stats, total = PartStats.empty(num_classes), len(todo)
    base_run = base.run  # the base this night copies from, named if the copy fails
    if base_run is not None and chosen is not None:
        options = dict(output_uri=config.output_uri, storage_options=config.storage_options, writers=writers)
        try:
            if len(chosen):
                stats = consume(carry(chosen, output=output, num_classes=num_classes, **options), num_classes, None)
        except Exception as exc:  # any failure of the copy: carry nothing
            _remove(output, new_part_names(chosen.parts))
            cause = next((line for line in str(exc).splitlines() if line.strip()), "")[:200]
            base = Base(None, f"copying from base run {base_run.run_id} failed ({type(exc).__name__}: {cause}); "
                        "segmenting every input")  # fmt: skip
            stats = PartStats.empty(num_classes)
        else:
            todo = todo.without(chosen.keys)
    if base.run is not None:
        line = f"{stats.carried} of {total} inputs carried from run {base.run.run_id}, {len(todo)} to segment"
    else:
        line = f"no base run ({base.reason}); {len(todo)} to segment"
    print(f"[deeplab-pipeline] incremental: {line}", flush=True)
    return Night(todo=todo, carried=stats, manifest=base.manifest())


def _remove(output: RunOutput, names: list[str]) -> None:
    for kind in ("masks", "errors"):
        for name in names:
            if output.fs.exists(output.path(kind, name)):
                output.fs.rm(output.path(kind, name))
