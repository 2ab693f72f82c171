"""Placement on a multi-node cluster, simulated on one machine with ray.cluster_utils.Cluster: a
CPU-only head, a "GPU" node (declares a GPU and {"gpu_node": 1}; there is no real GPU, so the
inference actor falls back to CPU inside) and a CPU node for CRF ({"crf_node": ...}). The job runs
through the real CLI with the same resource flags ray_cluster.yaml and k8s/rayjob.yaml use."""

from __future__ import annotations

import json
import os
import subprocess

import pyarrow.parquet as pq
import pytest

from tests.conftest import DEMO_BUCKET, SEGMENT_BUCKET, free_port, job_args

pytestmark = pytest.mark.slow


@pytest.fixture()
def cluster(monkeypatch):
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # Free ports: other Ray instances may run on this machine at the same time.
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "include_dashboard": False, "dashboard_agent_listen_port": free_port()},
    )
    try:
        # Head and GPU node have spare CPUs and Ray Data spreads actors over nodes, so without
        # --crf-resources some of the 3 CRF actors land elsewhere (checked: the assertion then fails).
        gpu = cluster.add_node(num_cpus=2, num_gpus=1, resources={"gpu_node": 1})
        crf = cluster.add_node(num_cpus=3, resources={"crf_node": 3})
        cluster.wait_for_nodes()
        yield cluster, {"head": cluster.head_node.node_id, "gpu": gpu.node_id, "crf": crf.node_id}
    finally:
        cluster.shutdown()


def test_actors_run_on_their_node_types(cluster, tmp_path):
    cluster, nodes = cluster
    out = tmp_path / "out"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [
            *SEGMENT_BUCKET,
            *job_args(DEMO_BUCKET, out, "multinode"),
            "--limit",
            "4",
            "--infer-actors",
            "1-1",
            "--infer-resources",
            '{"gpu_node": 1}',
            "--crf-resources",
            '{"crf_node": 1}',
            "--crf-backend",
            "pydensecrf",  # the GPU plan with a CPU CRF pool (auto would fuse torch into the GPU actor)
            "--ray-address",
            cluster.address,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    run_dir = out / "run=multinode"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["resources"]["use_gpu"] is True  # detected from the GPU node, not forced
    assert manifest["resources"]["cluster"]["gpu_node"] == 1 and manifest["resources"]["cluster"]["crf_node"] == 3
    assert manifest["nodes"] == {"infer": [nodes["gpu"]], "crf": [nodes["crf"]]}
    # The CRF pool's default range grows to the CRF node's 3 CPUs (the only node it may run on);
    # decode may use the CPUs inference leaves anywhere (6 of 0.25), capped at one per CPU (7).
    assert manifest["resources"]["crf_actors"] == [1, 3] and not manifest["resources"]["crf_fused"]
    assert manifest["resources"]["decode_actors"] == [1, 7]
    masks = pq.read_table(run_dir / "masks").to_pylist()
    assert len(masks) == 4 and all(r["crf_ms"] > 0 for r in masks)
    assert (run_dir / "_SUCCESS").exists()
