"""The flight recorder: which inputs a stage actor was working on when its worker died, so that an
input that kills its worker is isolated inside the actor, for about one restart of the actor each.

Before each step that can kill its worker (decoding an image, a forward pass, refining an image,
writing a part) a stage writes the step and the keys it works on into a small file of its node
named after its actor (``record``: one ``pwrite``). Ray keeps an actor's id when it restarts it
after a death (``max_restarts``) and retries the batch on it (``max_task_retries``), on the node
where it died; the new incarnation reads what its predecessor left, and the keys in it were in
flight at a death.

A key is a *culprit* once it was in flight at two deaths, the last time alone: a retry alone tells
a transient failure (an OOM kill caused by a neighbour, a killed process) from an input that kills
its worker every time, as the runner's passes decide (pipeline/dag/runner.py). A retried batch runs
its suspects one at a time, so that the next death says which one it was; a suspect of the decode
step is first decoded alone in a throwaway process (the stage's ``probe``, a Ray task) instead, so
the actor, its model loaded, does not die a second time for it. A culprit leaves the stage as an
error row (``WorkerDied``, the step that killed the worker) that every later stage passes through.

What this cannot see (an actor restarted on another node, more culprits in a batch than its
retries), Ray Data drops and the runner's isolation passes find.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.observability import stage_metrics
from pipeline.rows.errors import ERROR_COLUMNS, storable

# A batch whose worker died runs again this many times (Ray's max_task_retries): enough to isolate
# one culprit from a death in a batch, a probe or a death alone, and the batch without it.
RETRIES = 3
FOLDER = "deeplab-flight"  # in the node's Ray session folder: one record (and deaths) file per actor
DIED = "WorkerDied"


def worker_died_message(stage: str, cause: str = "") -> str:
    """The message of a ``WorkerDied`` error row."""
    return (
        f"the {stage} worker died on every retry while processing this input, also alone (a native crash "
        f"or the worker's memory limit: an image too large for its node, a file that crashes a decoder, a "
        f"bug in a native library); the run went on without it. {cause}"
    ).strip()[:1000]


@dataclass
class Deaths:
    """How often a key was in flight when the actor's worker died, and in which step the last time."""

    stage: str
    times: int = 0
    last_alone: bool = False

    @property
    def culprit(self) -> bool:
        return self.times >= 2 and self.last_alone


class FlightRecorder:
    """One actor's record of the keys in flight (``path``) and of the deaths they were at (``path``.deaths)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.deaths: dict[str, Deaths] = {}  # keys in flight at a death, not yet cleared by running alone
        self.died_in: set[str] = set()  # every step this actor's workers died in
        try:
            with open(f"{path}.deaths") as f:
                saved = json.load(f)
            self.deaths = {k: Deaths(*v) for k, v in saved["deaths"].items()}
            self.died_in = set(saved["died_in"])
        except (OSError, ValueError, TypeError, KeyError):
            pass
        left = self._left()
        if left is not None:  # this actor's worker died with these keys in flight
            stage, keys = left
            self.died_in.add(stage)
            for key in keys:
                death = self.deaths.setdefault(key, Deaths(stage))
                death.stage, death.times, death.last_alone = stage, death.times + 1, len(keys) == 1
            self._save()
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self.clear()

    @classmethod
    def for_this_actor(cls) -> FlightRecorder | None:
        """The recorder of the Ray actor this process runs (None outside one: tests, the driver)."""
        try:
            import ray

            if not ray.is_initialized():
                return None
            context = ray.get_runtime_context()
            actor = context.get_actor_id()
            if not actor:
                return None
            folder = os.path.join(context.get_temp_dir(), context.get_session_name(), FOLDER)
            os.makedirs(folder, exist_ok=True)
            return cls(os.path.join(folder, actor))
        except (OSError, RuntimeError, AssertionError):
            return None  # no record: the runner's passes isolate what this actor cannot

    def _left(self) -> tuple[str, list[str]] | None:
        """What the previous incarnation had in flight when it died (None: nothing)."""
        try:
            with open(self.path, "rb") as f:
                line = f.readline()
            stage, keys = json.loads(line)
            return (str(stage), [str(k) for k in keys]) if keys else None
        except (OSError, ValueError, TypeError):
            return None  # no file (a new actor), an empty record, or one cut short

    def _save(self) -> None:
        tmp = f"{self.path}.deaths.tmp"
        with open(tmp, "w") as f:
            deaths = {k: [d.stage, d.times, d.last_alone] for k, d in self.deaths.items()}
            json.dump({"deaths": deaths, "died_in": sorted(self.died_in)}, f)
        os.replace(tmp, f"{self.path}.deaths")

    def record(self, stage: str, keys: Sequence[str]) -> None:
        """``keys`` are in flight in ``stage`` from now on (the first line of the file; a longer earlier
        line's tail after it is never read)."""
        os.pwrite(self.fd, (json.dumps([stage, list(keys)]) + "\n").encode(), 0)

    def clear(self) -> None:
        os.pwrite(self.fd, b"\n", 0)

    def run(self, stage: _Stage, batch: Any, first: str) -> Any:
        """``stage(batch)`` with its keys recorded in flight in ``first`` (the stage's first step). A batch
        holding keys that were in flight at a death runs carefully: suspects probed (``stage.probe``)
        or run alone, the rest together, and culprits never reach the stage's work again: they become
        error rows that ``stage.failed`` passes through. The outputs are concatenated."""
        call, probe = stage.call, stage.probe
        keys = [str(k) for k in _column(batch, "key")]
        if not self.deaths or not self.deaths.keys() & set(keys):
            self.record(first, keys)
            out = call(batch)
            self.clear()
            return out
        changed = False
        for key in keys:
            death = self.deaths.get(key)
            if death is None or death.culprit or probe is None:
                continue
            killed = probe(death.stage, key)
            if killed is True:  # it killed a process of its own too, alone: the death's culprit
                death.times, death.last_alone = death.times + 1, True
                # The others in flight with it only (never alone) are forgiven, unprobed: a probe
                # costs a process start once one has died, and another culprit among them dies again.
                for other in keys:
                    suspect = self.deaths.get(other) if other != key else None
                    if suspect is not None and suspect.times == 1 and not suspect.last_alone:
                        del self.deaths[other]
                changed = True
            elif killed is False:  # it did not: an innocent that was in flight at a transient death
                del self.deaths[key]
                changed = True
        if changed:
            self._save()
        culprits = {k: self.deaths[k].stage for k in keys if k in self.deaths and self.deaths[k].culprit}
        died = [i for i, k in enumerate(keys) if k in culprits]
        alone = [i for i, k in enumerate(keys) if k in self.deaths and k not in culprits]
        together = [i for i, k in enumerate(keys) if k not in self.deaths]
        outs = [stage.failed(mark_died(_take(batch, died), culprits))] if died else []
        for i in alone:
            self.record(first, [keys[i]])
            outs.append(call(_take(batch, [i])))
            del self.deaths[keys[i]]  # it ran alone and its worker lived: an innocent
            self._save()
        if together:
            self.record(first, [keys[i] for i in together])
            outs.append(call(_take(batch, together)))
        self.clear()
        return concat(outs)


# --- the process's recorder: one actor per Ray worker process ---

_recorder: FlightRecorder | None = None


def install() -> FlightRecorder | None:
    """Start this actor's recorder (reading what its predecessor left); stages then ``record``."""
    global _recorder
    _recorder = FlightRecorder.for_this_actor()
    return _recorder


def current() -> FlightRecorder | None:
    """This actor's recorder (``install``), None outside an isolating actor."""
    return _recorder


def record(stage: str, keys: Sequence[str]) -> None:
    """``keys`` are in flight in ``stage`` (a step inside a stage's call); nothing outside an actor."""
    if _recorder is not None:
        _recorder.record(stage, [str(k) for k in keys])


class _Stage:
    """A stage instance's calls as the recorder makes them: the class's own ``__call__``, ``failed``
    (the rows of inputs that arrive failed, passed through without any work) and ``probe``, if any."""

    def __init__(self, cls: Any, instance: Any) -> None:
        self.call = partial(cls.__call__, instance)
        self.failed = partial(cls.failed, instance)
        self.probe = partial(cls.probe, instance) if hasattr(cls, "probe") else None


def isolating(cls: Any, first: str) -> type:
    """``cls`` (a Ray Data callable class with a ``failed`` method) whose calls run through the actor's
    flight recorder; ``first``: its first step. Same name: Ray's operator and process names stay the class's."""

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        self._flight = install()
        cls.__init__(self, *args, **kwargs)

    def __call__(self: Any, batch: Any) -> Any:
        if self._flight is None:
            return cls.__call__(self, batch)
        return self._flight.run(_Stage(cls, self), batch, first)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__call__": __call__, "__qualname__": cls.__qualname__})


# --- batches: Ray Data's numpy dicts and Arrow tables ---


def _column(batch: Any, name: str) -> list:
    return batch.column(name).to_pylist() if isinstance(batch, pa.Table) else list(batch[name])


def _take(batch: Any, rows: list[int]) -> Any:
    if isinstance(batch, pa.Table):
        return batch.take(rows)
    return {k: np.asarray(v)[rows] for k, v in batch.items()}


def mark_died(batch: Any, culprits: dict[str, str]) -> Any:
    """``batch`` with each culprit key's row an error row (``WorkerDied``, its step): the stages pass
    it through, as any failed row."""
    if not culprits:
        return batch
    keys = [str(k) for k in _column(batch, "key")]
    columns = {c: _column(batch, c) if _has(batch, c) else [""] * len(keys) for c in ERROR_COLUMNS}
    for i, key in enumerate(keys):
        if key in culprits:
            stage = culprits[key]
            stage_metrics(stage).error()
            columns["error_stage"][i], columns["error_type"][i] = stage, DIED
            columns["error_message"][i] = storable(worker_died_message(stage))
    if isinstance(batch, pa.Table):
        for name, values in columns.items():
            batch = batch.set_column(batch.schema.get_field_index(name), name, pa.array(values, pa.string()))
        return batch
    return {**batch, **{name: np.array(values, dtype=object) for name, values in columns.items()}}


def _has(batch: Any, name: str) -> bool:
    return name in (batch.column_names if isinstance(batch, pa.Table) else batch)


def concat(outs: list[Any]) -> Any:
    """One stage output from the outputs of its calls on parts of a batch."""
    if len(outs) == 1:
        return outs[0]
    if isinstance(outs[0], pa.Table):
        return pa.concat_tables(outs)
    joined = {}
    for name in outs[0]:
        parts = [np.asarray(o[name]) for o in outs]
        try:
            joined[name] = np.concatenate(parts)
        except ValueError:  # rows of different shapes: one object array of the rows
            rows = [row for part in parts for row in part]
            joined[name] = np.empty(len(rows), dtype=object)
            joined[name][:] = rows
    return joined
