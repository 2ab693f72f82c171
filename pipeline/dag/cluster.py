"""Joining or starting Ray, what the connected cluster offers, and the command's stderr without
Ray's known false alarms."""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# Lines Ray 2.60 prints on the driver's stderr that say nothing about a run. "Actor ... has
# constructor arguments in the object store and max_restarts > 0" is logged by its C++ core worker
# (once per process) for any Ray Data actor pool with restarts: Ray Data hands each pool actor refs of
# its own, the DataContext and the map transformer (ray-project/ray#53727). Those refs belong to the
# driver, which outlives every restart, so the warning cannot come true; Ray's own driver log
# (logs/python-core-driver-*.log) keeps the line.
FALSE_ALARMS = (b"ray-project/ray/issues/53727",)


@contextmanager
def stderr_without(markers: tuple[bytes, ...] = FALSE_ALARMS) -> Iterator[None]:
    """File descriptor 2, where Ray's C++ logs, through a pipe whose lines a thread passes on to the
    real stderr, less those holding one of ``markers``. For a command that owns its process's stderr
    (``pipeline.cli.script``), not for a library call."""
    sys.stderr.flush()
    try:
        real = os.dup(2)
    except OSError:  # no stderr at all (a closed descriptor): nothing to filter
        yield
        return
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)
    if faulthandler.is_enabled():  # a crash's traceback straight to the real stderr, not via the thread
        faulthandler.enable(file=real)
    thread = threading.Thread(target=_forward, args=(read, real, markers), name="stderr", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(real, 2)  # the pipe's only writer gone: the thread passes on what is left, then ends
        thread.join(timeout=10)
        if faulthandler.is_enabled():
            faulthandler.enable(file=sys.stderr)


def _forward(read: int, real: int, markers: tuple[bytes, ...]) -> None:
    held = b""  # the start of a line that may be a C++ log line (they begin with "["), until its end
    while chunk := os.read(read, 1 << 16):
        lines = (held + chunk).split(b"\n")
        last = lines.pop()
        # Longer than PIPE_BUF, it is no single atomic write of Ray's logger: never held.
        held = last if last.startswith(b"[") and len(last) < 1 << 12 else b""
        text = b"".join(line + b"\n" for line in lines if not any(m in line for m in markers))
        _write(real, text + (b"" if held else last))  # other partial lines (progress bars) go on now
    _write(real, held)


def _write(fd: int, data: bytes) -> None:
    while data:
        try:
            data = data[os.write(fd, data) :]
        except OSError:
            return  # the real stderr is gone: keep draining the pipe so writers never block


def init_ray(address: str | None) -> None:
    """Join ``address`` (or $RAY_ADDRESS); without one, start a local Ray head."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
    else:
        # A local head for the embedded run; token auth would need a shared secret nobody set up.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(include_dashboard=False)


def cluster_nodes() -> list[dict[str, float]]:
    """Resources of each alive node of the connected Ray cluster."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


# A node type the autoscaler may add without limit (max_count -1) counts as this many nodes.
UNBOUNDED_NODES = 16


def cluster_ceiling() -> list[dict[str, float]] | None:
    """Resources of each node the cluster may grow to: the autoscaler's node types, each at its
    most (``max_workers`` / KubeRay's ``maxReplicas``), as an autoscaler publishes them in the GCS
    (what Ray Data's own cluster autoscaler reads); None when none published any. Ray's open-source
    autoscalers (v1 and v2, KubeRay's included) publish none: see ``cluster_autoscales``."""
    import ray._private.state

    config = ray._private.state.state.get_cluster_config()
    if config is None or not config.node_group_configs:
        return None
    nodes = []
    for group in config.node_group_configs:
        count = UNBOUNDED_NODES if group.max_count < 0 else group.max_count
        nodes += [{k: float(v) for k, v in group.resources.items()}] * count
    return nodes or None


# How long the plan waits for a first report from an autoscaler that runs beside the head (KubeRay's
# sidecar starts the head with --no-monitor): a head's own monitor has reported before ray.init returns.
AUTOSCALER_REPORT_WAIT_S = 15.0


def cluster_autoscales(wait_s: float = AUTOSCALER_REPORT_WAIT_S) -> bool:
    """Whether an autoscaler may add nodes to the connected cluster. Ray's v2 autoscaler reports a
    state version to the GCS. v1's monitor publishes its status on every cluster, but a head started
    without an autoscaling config runs it with Ray's read-only provider, which names each node's
    type after the node itself. A cluster with neither report yet is given ``wait_s`` to make one."""
    import json
    import time

    import ray
    from ray._private import ray_constants
    from ray.autoscaler._private.util import format_readonly_node_type
    from ray.autoscaler.v2.sdk import get_cluster_status
    from ray.experimental.internal_kv import _internal_kv_get

    deadline = time.monotonic() + wait_s
    while True:
        try:
            if int(get_cluster_status(ray.get_runtime_context().gcs_address).stats.autoscaler_version or 0) > 0:
                return True
            status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        except Exception:  # a GCS that cannot say: plan for the nodes there are
            return False
        if status or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    report = (json.loads(status) if status else {}).get("autoscaler_report") or {}
    types = (report.get("node_type_mapping") or {}).items()
    return any(kind != format_readonly_node_type(node) for node, kind in types)
