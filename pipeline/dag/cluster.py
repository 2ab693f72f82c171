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


# A node type the autoscaler may add without limit (max_count -1) counts as this many nodes.
UNBOUNDED_NODES = 16


def cluster_ceiling() -> list[dict[str, float]] | None:
    """Resources of each node the cluster may grow to: the autoscaler's node types, each at its
    most (``max_workers`` / KubeRay's ``maxReplicas``), as the autoscaler publishes them in the GCS
    (what Ray Data's own cluster autoscaler reads); None when no autoscaler published any."""
    import ray._private.state

    config = ray._private.state.state.get_cluster_config()
    if config is None or not config.node_group_configs:
        return None
    nodes = []
    for group in config.node_group_configs:
        count = UNBOUNDED_NODES if group.max_count < 0 else group.max_count
        nodes += [{k: float(v) for k, v in group.resources.items()}] * count
    return nodes or None
