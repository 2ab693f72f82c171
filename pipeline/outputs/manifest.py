"""``manifest.json``: what a run was (config, weights, versions), where it ran and how long it took."""

from __future__ import annotations

import contextlib
import datetime as dt
from dataclasses import dataclass
from importlib import metadata

from pipeline.io.credentials import public_uri

PACKAGES = ("ray", "torch", "torchvision", "timm", "pyarrow", "fsspec", "s3fs", "pydensecrf2", "numpy")


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    from pipeline import __version__

    out["deeplab-pipeline"] = __version__
    return out


def _utc(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat()


@dataclass(frozen=True, kw_only=True)
class RunFacts:
    """What manifest.json records of a run beyond its configuration: when it started and finished,
    how long it segmented, how many inputs it segmented, the cluster it saw, the plan it made
    (what --dry-run prints) and Ray Data's per-stage statistics of its DAG."""

    started: float
    finished: float
    run_seconds: float
    processed: int
    cluster: dict[str, float]
    plan: dict | None = None
    ray_data: list[dict] | None = None


def build_manifest(config, weights, resources, stats, facts: RunFacts) -> dict:
    """The manifest of a run of ``config`` with the checked ``weights`` record, its ``resources``
    and the summed part ``stats``."""
    run_seconds = facts.run_seconds
    return {
        "run_id": config.run_id,
        "config": config.to_public_dict(),
        "model": config.model,
        "weights": {"uri": public_uri(weights.uri.split("#")[0]), "sha256": weights.sha256},
        "categories": list(weights.categories),
        "versions": versions(),
        "nodes": {stage: stats.nodes.get(stage, []) for stage in ("infer", "crf")},
        "resources": {
            "use_gpu": resources.use_gpu,
            "infer_cpus": resources.infer_cpus,
            "infer_threads": resources.infer_threads,
            "infer_actors": list(resources.infer_actors),
            "crf_actors": list(resources.crf_actors) if resources.crf_actors else None,
            "crf_fused": resources.crf_fused,
            "crf_backend": resources.crf_backend,
            "decode_actors": list(resources.decode_actors),
            "decode_fused": resources.decode_fused,
            "write_actors": resources.write_actors,
            "object_store_mib": resources.object_store_mib,
            "cluster": {k: v for k, v in facts.cluster.items() if not k.startswith("node:")},
        },
        "timings": {
            "segment_s": round(run_seconds, 3),
            "processed": facts.processed,
            "images_per_s": round(facts.processed / run_seconds, 3) if run_seconds > 0 else None,
            "total_s": round(facts.finished - facts.started, 3),
        },
        "plan": facts.plan,
        "ray_data": facts.ray_data,
        "started_at": _utc(facts.started),
        "finished_at": _utc(facts.finished),
    }
