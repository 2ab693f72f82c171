"""Joining or starting Ray, and what the connected cluster offers."""

from __future__ import annotations

import os

# Ray Data calls a stage from a thread of its worker, and glibc gives such threads heaps of their
# own that it hands back to the kernel and faults in again, page by page, on every forward pass
# (a sixth of an inference actor's CPU: benchmarks/ceiling.py). One arena keeps those pages
# resident. A local head passes this to every worker it starts; the image sets it (Dockerfile).
WORKER_ENV = {"MALLOC_ARENA_MAX": "1"}


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
        for name, value in WORKER_ENV.items():  # read by each worker's C library as it starts
            os.environ.setdefault(name, value)
        ray.init(include_dashboard=False)


def cluster_nodes() -> list[dict[str, float]]:
    """Resources of each alive node of the connected Ray cluster."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
