"""A stage's batch as Python columns, and the one way a stage changes it: ``Rows.set`` fills a row's
columns, ``Rows.fail`` turns a row into an error row (the protocol in pipeline/rows/errors.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pipeline.observability import stage_metrics
from pipeline.rows.errors import storable
from pipeline.rows.schema import add_columns, to_stream

MAX_MESSAGE = 1000  # characters of an error message a row keeps


class Rows:
    """Columns of equal length (name → list), read by name and changed only through ``set``,
    ``fill``, ``fail`` and ``add_stage``: no stage writes another module's columns by index."""

    def __init__(self, columns: dict[str, list]) -> None:
        self.columns = columns

    @classmethod
    def of(cls, batch: Mapping[str, Sequence | np.ndarray], stage: str) -> Rows:
        """A Ray batch's columns as lists, plus ``stage``'s own columns at their empty values."""
        return cls(add_columns({k: list(v) for k, v in batch.items()}, stage, len(batch["key"])))

    def __len__(self) -> int:
        return len(self.columns["key"])

    def __contains__(self, name: str) -> bool:
        return name in self.columns

    def __getitem__(self, name: str) -> Sequence:
        """Column ``name``, to read: a Sequence, so type checkers refuse writes that bypass ``set``."""
        return self.columns[name]

    def failed(self, i: int) -> bool:
        return bool(self.columns["error_stage"][i])

    def pending(self) -> list[int]:
        """The rows no stage failed yet, in order."""
        return [i for i in range(len(self)) if not self.failed(i)]

    def set(self, i: int, **values: Any) -> None:
        """Row ``i``'s columns; a name no stage added is a KeyError, never a new column."""
        for name, value in values.items():
            self.columns[name][i] = value

    def fill(self, **columns: list) -> None:
        """Whole columns at once (one value per row)."""
        for name, values in columns.items():
            if len(values) != len(self) or name not in self.columns:
                raise ValueError(f"column {name!r}: {len(values)} values for {len(self)} rows")
            self.columns[name] = values

    def add_stage(self, stage: str) -> None:
        """``stage``'s own columns, at their empty values (a stage that runs inside another one's actor)."""
        add_columns(self.columns, stage, len(self))

    def fail(self, i: int, stage: str, exc: BaseException | None, message: str) -> None:
        """Turn row ``i`` into an error row of ``stage``; later stages pass it through."""
        stage_metrics(stage).error()
        self.set(
            i,
            error_stage=stage,
            error_type=type(exc).__name__ if exc is not None else "InvalidInput",
            error_message=storable(message)[:MAX_MESSAGE],
        )

    def stream(self) -> dict[str, np.ndarray]:
        """The columns as the numpy batch Ray Data carries to the next stage."""
        return to_stream(self.columns)
