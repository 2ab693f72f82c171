"""The flight recorder's verdicts (pipeline/rows/flight.py), on its real files: a worker's death is a
record the call never cleared, and a restart is a new recorder on the same file. The crashes
themselves, in real Ray actors, are tests/test_poison.py's and tests/test_hostile.py's."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.rows.flight import DIED, FlightRecorder, _Stage, mark_died


class Died(BaseException):
    """The worker's death: nothing after it in the call runs, and nothing catches it."""


class Stage:
    """A stage whose call dies while its batch holds a key of ``kills`` (``times`` deaths each at most)."""

    def __init__(self, kills: set[str], times: int = 99, probe_kills: set[str] | None = None) -> None:
        self.kills, self.times, self.probe_kills, self.probed = kills, times, probe_kills, []
        self.calls: list[list[str]] = []

    def __call__(self, batch):
        keys = [str(k) for k in batch["key"]]
        self.calls.append(keys)
        for key in self.kills.intersection(keys):
            if self.times > 0:
                self.times -= 1
                raise Died(key)
        return {"key": np.array(keys, dtype=object), "error_type": np.array([""] * len(keys), dtype=object)}

    def failed(self, batch):
        return {"key": np.asarray(batch["key"], dtype=object), "error_type": np.asarray(batch["error_type"])}

    def probe(self, stage: str, key: str) -> bool | None:
        self.probed.append(key)
        return None if self.probe_kills is None else key in self.probe_kills


def keys(*names: str) -> dict:
    return {"key": np.array(names, dtype=object)}


def run_until_done(path: str, stage: Stage, batch: dict, *, probe: bool = False) -> tuple[dict, int]:
    """Ray's retries of one batch on a restarted actor: (the output, the deaths it took)."""
    deaths = 0
    while True:
        recorder = FlightRecorder(path)  # the (re)started actor reads what its predecessor left
        calls = _Stage(Stage, stage)
        if not probe:
            calls.probe = None
        try:
            return recorder.run(calls, batch, "decode"), deaths
        except Died:
            deaths += 1
            assert deaths < 10


def test_a_key_in_flight_at_two_deaths_the_last_alone_is_its_error_row(tmp_path):
    stage = Stage(kills={"b"})
    out, deaths = run_until_done(str(tmp_path / "actor"), stage, keys("a", "b", "c"))
    assert deaths == 2  # in its batch, then alone
    # each suspect alone (a's output died with the worker: it runs again), then b never again
    assert stage.calls == [["a", "b", "c"], ["a"], ["b"], ["c"], ["a"]]
    rows = dict(zip(out["key"], out["error_type"], strict=True))
    assert rows == {"a": "", "b": DIED, "c": ""}


def test_a_transient_death_costs_a_retry_and_no_row(tmp_path):
    stage = Stage(kills={"b"}, times=1)  # the worker died once while b was in flight, never again
    out, deaths = run_until_done(str(tmp_path / "actor"), stage, keys("a", "b", "c"))
    assert deaths == 1 and sorted(out["key"]) == ["a", "b", "c"] and set(out["error_type"]) == {""}
    assert FlightRecorder(str(tmp_path / "actor")).deaths == {}  # running alone cleared every suspect


def test_a_probe_that_dies_too_names_the_culprit_for_one_restart(tmp_path):
    stage = Stage(kills={"b"}, probe_kills={"b"})
    out, deaths = run_until_done(str(tmp_path / "actor"), stage, keys("a", "b", "c"), probe=True)
    assert deaths == 1
    assert stage.probed == ["a", "b"]  # c was in flight with b only: forgiven, unprobed
    assert stage.calls[-1] == ["a", "c"]  # the rest together, once
    assert dict(zip(out["key"], out["error_type"], strict=True)) == {"b": DIED, "a": "", "c": ""}


def test_a_culprit_is_marked_in_an_arrow_batch_too():
    errors = {"error_stage": ["", None], "error_type": ["", None], "error_message": ["", ""]}
    table = pa.table({"key": ["a", "b"], **errors})
    marked = mark_died(table, {"b": "infer"})
    assert marked.column("error_stage").to_pylist() == ["", "infer"]
    assert marked.column("error_type").to_pylist() == ["", DIED]
    assert "died on every retry" in marked.column("error_message")[1].as_py()
