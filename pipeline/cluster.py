"""Joining or starting Ray, and what the connected cluster offers."""

from __future__ import annotations

import os


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
