"""Fault hooks for the test suite: real crashes and real memory limits in real workers.

Honoured only while pytest runs (``PYTEST_CURRENT_TEST`` is set in the environment the worker
inherited), so a production environment that happens to carry the variables is unaffected.
"""

from __future__ import annotations

import os

CRASH_KEYS = "DEEPLAB_PIPELINE_TEST_CRASH_KEYS"  # comma-separated keys whose decode segfaults
MEMORY_LIMIT = "DEEPLAB_PIPELINE_TEST_INFER_MEMORY_MIB"  # address space an inference actor may add
PAUSE = "DEEPLAB_PIPELINE_TEST_PAUSE"  # "stage=seconds": each call of that stage takes this long


def _active(name: str) -> str:
    return os.environ.get(name, "") if "PYTEST_CURRENT_TEST" in os.environ else ""


def crash_if_asked(key: str) -> None:
    """A real native crash (SIGSEGV: a read of address 0) while this worker handles ``key``."""
    if key in _active(CRASH_KEYS).split(","):
        import ctypes

        ctypes.string_at(0)


def pause_if_asked(stage: str) -> None:
    """Make this call of ``stage`` last the given seconds: a test can then kill its actor mid-batch."""
    asked, _, seconds = _active(PAUSE).partition("=")
    if asked == stage:
        import time

        time.sleep(float(seconds))


def limit_memory_if_asked() -> None:
    """Cap this process's address space at its current size plus the given MiB (RLIMIT_AS)."""
    extra = _active(MEMORY_LIMIT)
    if extra:
        import resource

        with open("/proc/self/status") as f:
            size_kib = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
        limit = (size_kib * 1024) + int(extra) * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
