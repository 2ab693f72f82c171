"""Real faults injected into the job's Ray workers from the outside: a native crash (SIGSEGV) while a
worker decodes given keys, a pause in a stage's call (so a test can kill that actor mid-batch), and an
address-space cap (RLIMIT_AS) on each inference actor.

A test runs the job with ``fault_env(...)`` in its environment. That is the job config a driver's
``ray.init`` merges into its runtime env (``RAY_JOB_CONFIG_JSON_ENV_VAR``, what ``ray job submit
--runtime-env-json`` sets): ``setup`` as every worker's ``worker_process_setup_hook``, the faults in its
``env_vars``. ``setup`` wraps the stage classes' ``__call__`` when the worker imports their module, so
nothing under pipeline/ knows about tests, and workers that never import a stage module are untouched.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from functools import wraps
from types import ModuleType
from typing import Any

FAULTS = "DEEPLAB_PIPELINE_TEST_FAULTS"  # JSON: {"crash_keys": [...], "pause": {stage: seconds}, "infer_memory_mib": n}
JOB_CONFIG = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # ray._private.runtime_env.constants: the job's config, read by ray.init
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fault_env(
    *, crash_keys: Sequence[str] = (), pause: dict[str, float] | None = None, infer_memory_mib: int | None = None
) -> dict[str, str]:
    """Environment variables for a job process whose Ray workers get these faults.

    ``crash_keys``: decoding any of them segfaults the worker. ``pause``: stage ("decode" or "write")
    to the seconds each of its calls sleeps first. ``infer_memory_mib``: the address space an inference
    actor may add once its fetch threads exist."""
    faults = {"crash_keys": list(crash_keys), "pause": pause or {}, "infer_memory_mib": infer_memory_mib}
    runtime_env = {"worker_process_setup_hook": f"{__name__}.setup", "env_vars": {FAULTS: json.dumps(faults)}}
    # The hook is imported before the worker learns the driver's sys.path: the checkout must be on PYTHONPATH.
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p)
    return {JOB_CONFIG: json.dumps({"runtime_env": runtime_env}), "PYTHONPATH": path}


def setup() -> None:
    """The worker process setup hook: arm the faults of $DEEPLAB_PIPELINE_TEST_FAULTS in this worker."""
    faults = json.loads(os.environ.get(FAULTS) or "{}")
    crash_keys, pause = set(faults.get("crash_keys") or ()), faults.get("pause") or {}
    patches: dict[str, Callable[[ModuleType], None]] = {}
    if crash_keys or "decode" in pause:
        patches["pipeline.io.decode"] = lambda m: _before_call(m.Decoder, crash_keys, pause.get("decode", 0.0))
    if "write" in pause:
        patches["pipeline.outputs.writer"] = lambda m: _before_call(m.PartWriter, set(), pause["write"])
    if faults.get("infer_memory_mib"):
        cap = int(faults["infer_memory_mib"])
        patches["pipeline.inference.segmenter"] = lambda m: _cap_on_first_call(m.Segmenter, cap)
    for name, patch in patches.items():
        if name in sys.modules:
            patch(sys.modules[name])
        else:
            sys.meta_path.insert(0, _AfterImport(name, patch))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds module ``name`` as usual and runs ``patch`` on it right after it is executed."""

    def __init__(self, name: str, patch: Callable[[ModuleType], None]) -> None:
        self.name, self.patch = name, patch

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        loader, patch = spec.loader, self.patch

        def exec_module(module: ModuleType) -> None:
            type(loader).exec_module(loader, module)
            patch(module)

        loader.exec_module = exec_module  # this module's loader instance only
        return spec


def crash() -> None:
    """A real native crash: read address 0 (SIGSEGV)."""
    import ctypes

    ctypes.string_at(0)


def _before_call(cls: type, crash_keys: set[str], seconds: float) -> None:
    """``cls.__call__`` first segfaults if its batch holds one of ``crash_keys``, then sleeps ``seconds``."""
    call = cls.__call__

    @wraps(call)
    def faulty(self: Any, batch: Any) -> Any:
        if crash_keys and crash_keys.intersection(str(k) for k in batch["key"]):
            crash()
        time.sleep(seconds)
        return call(self, batch)

    cls.__call__ = faulty


def limit_address_space(extra_mib: int) -> None:
    """Cap this process's address space at its current size plus ``extra_mib`` (RLIMIT_AS)."""
    import resource

    with open("/proc/self/status") as f:
        size_kib = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
    limit = size_kib * 1024 + extra_mib * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _cap_on_first_call(cls: type, extra_mib: int) -> None:
    """Cap the inference actor's address space on its first call, once it has decoded that batch when it
    decodes itself: its fetch threads' stacks and heaps are address space too."""
    call = cls.__call__

    @wraps(call)
    def first_call(self: Any, batch: Any) -> Any:
        cls.__call__ = call  # one actor per worker process: cap it once
        decoder = self.decoder
        if decoder is None:
            limit_address_space(extra_mib)
            return call(self, batch)

        def decode_then_cap(keys: Any) -> Any:
            self.decoder = decoder
            decoded = decoder(keys)
            limit_address_space(extra_mib)
            return decoded

        self.decoder = decode_then_cap
        return call(self, batch)

    cls.__call__ = first_call
