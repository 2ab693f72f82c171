"""The job on a cluster that grows: Ray's own autoscaler (tests/autoscaling.py) starts with a head
only; a worker type at min_workers 0 offers the only "gpu_node" resources, which the inference actors
ask for (--infer-resources), so every inference actor needs a node the autoscaler must launch. The
inference pool must grow past one actor as nodes join, and every key be committed exactly once."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.autoscaling import LocalAutoscalingCluster
from tests.conftest import DEMO_BUCKET, SEGMENT_BUCKET, job_args

pytestmark = pytest.mark.slow

# Ray Data's progress lines: "<time> INFO logging_progress.py:... --   Tasks: 2; Actors: 2 (running=2, ..."
PROGRESS = re.compile(r"^(\S+ \S+)\s+INFO logging_progress\.py:\d+ -- (MapBatches\(\w+\)(?=: )|  Tasks: .*)")


def pool_sizes(log: str, stage: str = "MapBatches(Segmenter)") -> list[tuple[str, int, int]]:
    """(time, running actors, all actors) of ``stage``'s pool at each progress report in ``log``."""
    sizes, current = [], None
    for line in log.splitlines():
        m = PROGRESS.match(line)
        if not m:
            continue
        if m.group(2).startswith("MapBatches"):
            current = m.group(2)
        elif current == stage:
            actors = re.search(r"Actors: (\d+)(?: \(running=(\d+))?", m.group(2))
            if actors:
                total = int(actors.group(1))
                sizes.append((m.group(1), int(actors.group(2) or total), total))
            current = None
    return sizes


@pytest.fixture()
def cluster():
    # A short path of its own: Ray's Unix sockets live under it (108 bytes at most).
    cluster = LocalAutoscalingCluster(
        Path(tempfile.mkdtemp(prefix="ray-as-")),
        head_resources={"CPU": 2},
        worker_node_types={
            "gpu": {
                "resources": {"CPU": 1, "gpu_node": 1},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 2,
            }
        },
    )
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.shutdown()


def test_inference_pool_grows_as_the_autoscaler_adds_nodes(cluster, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": cluster.address}
    proc = subprocess.run(
        [
            *SEGMENT_BUCKET,
            *job_args(DEMO_BUCKET, out, "grow"),
            "--no-crf",
            "--batch-size",
            "1",
            "--scales",
            "0.75,1.0,1.25",
            "--flip",
            "--infer-actors",
            "1-2",
            "--infer-cpus",
            "1",
            "--infer-resources",
            '{"gpu_node": 1}',
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    sizes = pool_sizes(log)
    print("inference pool (time, running, all):", sizes)
    run_dir = out / "run=grow"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    # Two inference nodes launched by the autoscaler, each hosting one actor of the pool.
    assert len(manifest["nodes"]["infer"]) == 2, (manifest["nodes"], sizes)
    assert sizes[0][2] == 1 and max(total for _, _, total in sizes) == 2, sizes
    keys = pq.read_table(run_dir / "masks", columns=["key"]).column("key").to_pylist()
    images = sorted(p.name for p in (DEMO_BUCKET / "images").iterdir())
    assert sorted(keys) == images and len(set(keys)) == len(keys)  # each key exactly once
    assert (run_dir / "_SUCCESS").exists()
