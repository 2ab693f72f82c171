"""Running the DAG from the driver: stream the parts' summaries, then make sure every key landed.

The driver receives one small ``PartStats`` per part file the workers wrote, prints progress and
adds them up. An input that kills its worker (a native crash, an OOM kill) is isolated by the stage
actor itself, from its flight record (pipeline/rows/flight.py): it costs about one restart of the
actor and leaves the DAG as its ``WorkerDied`` error row. What the actors cannot isolate (an actor
restarted on another node, more culprits in a batch than its retries) is a batch whose worker died
on every retry: Ray Data drops it instead of failing the night, and its keys are in no part file.
``run_dag`` finds them with an Arrow anti-join against the part files' key columns and isolates
the culprits by bisection: the missing keys run again in batches of ``ISOLATION_BATCH``, then the
keys of the batches that failed again in batches ``SHRINK`` times smaller, down to one per batch
(the innocent ones are segmented on the way, the actors isolate what they can, and each pass reruns
only the failed batches' keys). Each key that still kills its worker alone runs once more, to learn
the stage, and becomes its ``WorkerDied`` row.

A systemic failure counts culprits, not lost keys: each ``WorkerDied`` row the actors wrote is one,
and the batches of a pass are disjoint, so each batch that fails again holds at least one more.
More than ``SYSTEMIC_KEYS`` (and ``SYSTEMIC_SHARE`` of the run) is not a few poison inputs but a
failing cluster or store; Ray Data stops a pass at the first batch over the limit.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import pyarrow as pa

from pipeline.io.storage import Inputs
from pipeline.outputs.partstats import PartStats
from pipeline.outputs.run import RunOutput
from pipeline.outputs.writer import part_name
from pipeline.rows.flight import DIED, worker_died_message
from pipeline.rows.schema import ERRORS_SCHEMA, MASKS_SCHEMA

PROGRESS_SECONDS = 10.0
ALONE_AT_MOST = 20  # keys run alone to learn their stage; more than that share one message
# More distinct culprits than this (and than SYSTEMIC_SHARE of the run) is not a few poison inputs
# but a failing cluster or store: the run stops, and --resume continues it once that is fixed.
SYSTEMIC_KEYS, SYSTEMIC_SHARE = 200, 0.05
# The isolation passes' batch sizes: each failed batch's keys run again in batches SHRINK times
# smaller. Every pass costs each culprit at least one more worker crash (and restart), so few passes
# (8, then 1) beat halving. A pass's batches are retried twice: enough for an actor to isolate one
# culprit itself (a death, then a probe or a death alone, then the batch without it).
ISOLATION_BATCH, SHRINK, ISOLATION_RETRIES = 8, 8, 2
STAGES = ("decode", "infer", "crf", "write")  # stages.build_dataset's ``upto``, in DAG order


class SystemicFailure(RuntimeError):
    """Too many batches failed for poison inputs to explain it."""


def run_dag(todo: Inputs, build, output: RunOutput, num_classes: int, *, run_id: str) -> tuple[PartStats, int]:
    """Segment ``todo`` with ``build(inputs, **options)`` (a ``stages.build_dataset`` partial);
    returns the new parts' summed stats and the number of inputs they hold."""
    stats = consume(build(todo), num_classes, Progress(len(todo)))
    limit = int(max(SYSTEMIC_KEYS, SYSTEMIC_SHARE * len(todo)))
    if stats.died:
        print(f"[deeplab-pipeline] inputs that killed their worker, isolated by the actors: {stats.died}", flush=True)
    if stats.died > limit:
        raise _systemic(f"{stats.died} distinct inputs killed their workers", run_id)
    missing = todo.without(output.written_keys())
    if not len(missing):
        return stats, stats.images + stats.errors
    print(
        f"[deeplab-pipeline] {len(missing)} inputs were in batches whose worker died on every retry; "
        f"isolating the inputs that kill it by bisection",
        flush=True,
    )
    culprits, isolated = _bisect(missing, build, output, num_classes, limit - stats.died, run_id)
    stats += isolated
    errors = []
    for key in culprits.keys.to_pylist()[:ALONE_AT_MOST]:
        alone = replace(culprits, keys=pa.chunked_array([[key]], pa.string()))
        stage, exc, new = _probe(alone, build, num_classes)
        stats += new
        if stage is not None:
            errors.append(_worker_died(key, alone.locator().image_uri(key), run_id, stage, exc))
    for key in culprits.keys.to_pylist()[ALONE_AT_MOST:]:
        errors.append(_worker_died(key, culprits.locator().image_uri(key), run_id, "unknown", None))
    if errors:
        table = pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA)
        name = part_name(table.column("key"))
        output.write_part("errors", name, table)
        stats += PartStats.of(name, MASKS_SCHEMA.empty_table(), table, num_classes)
    return stats, stats.images + stats.errors


def _bisect(
    missing: Inputs, build, output: RunOutput, num_classes: int, limit: int, run_id: str
) -> tuple[Inputs, PartStats]:
    """The keys that kill their worker alone, found by running the failed batches' keys again in
    shrinking batch sizes; SystemicFailure as soon as a pass proves more than ``limit`` culprits
    (the actors' ``WorkerDied`` rows and the batches that failed again)."""
    stats, pending, size = PartStats.empty(num_classes), missing, ISOLATION_BATCH
    while len(pending):
        size = max(1, min(size, len(pending) // 2))  # at least two batches
        if size == 1:
            print(f"[deeplab-pipeline] {len(pending)} inputs left: running them one per batch", flush=True)
        blocks = math.ceil(len(pending) / size)
        tolerate = max(0, limit - stats.died)
        try:  # more failed batches than the limit stop the pass: each holds a distinct culprit
            ds = build(pending, batch_size=size, retries=ISOLATION_RETRIES, max_blocks=blocks, tolerate=tolerate)
            stats += consume(ds, num_classes, None)
        except Exception as exc:
            what = f"more than {limit} inputs killed their workers while isolating culprits (batches of {size})"
            raise _systemic(what, run_id) from exc
        pending = pending.without(output.written_keys())
        at_least = stats.died + math.ceil(len(pending) / size)
        if at_least > limit:
            raise _systemic(f"at least {at_least} distinct inputs killed their workers", run_id)
        if size == 1:
            return pending, stats
        size = max(1, size // SHRINK)
    return pending, stats


def _systemic(what: str, run_id: str) -> SystemicFailure:
    return SystemicFailure(
        f"{what}: over the limit of {SYSTEMIC_KEYS} (or {SYSTEMIC_SHARE:.0%} of the run) for poison inputs. "
        f"That is not a few bad inputs (see Ray Data's errors above); fix the cause, then run again with "
        f"--resume --run-id {run_id}"
    )


def _probe(alone: Inputs, build, num_classes: int) -> tuple[str | None, BaseException | None, PartStats]:
    """Run one key alone through longer and longer prefixes of the DAG: the first that fails names
    the stage that kills the worker. None if the whole DAG passes (the key is then written)."""
    options = {"batch_size": 1, "retries": 0, "max_blocks": 1, "tolerate": False}
    for stage in STAGES:
        try:
            ds = build(alone, upto=stage, **options)
            if stage == "write":
                return None, None, consume(ds, num_classes, None)
            for _ in ds.iter_batches(batch_size=None):
                pass
        except Exception as exc:  # the worker died again, in this stage
            return stage, exc, PartStats.empty(num_classes)
    raise AssertionError("unreachable: the write stage returns")


def _worker_died(key: str, uri: str, run_id: str, stage: str, exc: BaseException | None) -> dict:
    text = str(exc) if exc is not None else ""
    cause = next((line.strip() for line in text.splitlines() if line.strip()), "")[:300]
    return {
        "key": key,
        "uri": uri,
        "stage": stage,
        "error_type": DIED,
        "message": worker_died_message(stage, cause),
        "run_id": run_id,
        "computed_in_run": run_id,
    }


def consume(ds, num_classes: int, progress: Progress | None) -> PartStats:
    """Iterate the write stage's rows: one PartStats per part file written."""
    stats = PartStats.empty(num_classes)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for text in batch.column("stats").to_pylist():
            stats += PartStats.from_json(text)
        if progress is not None:
            progress.update(stats.images + stats.errors)
    return stats


class Progress:
    """done/total, images/s and ETA on one line, at most every PROGRESS_SECONDS (and at the end)."""

    def __init__(self, total: int) -> None:
        self.total, self.started, self.last = total, time.time(), 0.0

    def update(self, done: int) -> None:
        now = time.time()
        if now - self.last < PROGRESS_SECONDS and done < self.total:
            return
        self.last = now
        rate = done / max(now - self.started, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        print(
            f"[deeplab-pipeline] {done}/{self.total} images written ({rate:.2f} images/s, ETA {_duration(eta)})",
            flush=True,
        )


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "unknown"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
