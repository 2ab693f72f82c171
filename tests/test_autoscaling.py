"""The job on a cluster that grows: Ray's own autoscaler (tests/autoscaling.py) starts with a head
only; a worker type at min_workers 0 offers the only "gpu_node" resources, which the inference actors
ask for (--infer-resources), so every inference actor needs a node the autoscaler must launch. With
the default pools (the autoscaler publishes no maxima: open-ended), the inference pool must grow
past one actor as nodes join, and every key be committed exactly once."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.autoscaling import LocalAutoscalingCluster
from tests.conftest import DEMO_BUCKET, REPO, SEGMENT_BUCKET, job_args

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


@contextmanager
def autoscaling_cluster(*, v2: bool = True, monitor: bool = True):
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
        v2=v2,
        monitor=monitor,
    )
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture()
def cluster():
    with autoscaling_cluster() as cluster:
        yield cluster


# The demo bucket eight times over (256 keys at 12 forward passes each, about 2 minutes for one actor
# here): the pool's growth must not race the run's end, and a node took 10 to over 50 s to join and
# start its actor on this 2-core machine (a run of 32 keys ended first on CI).
COPIES = 8


def bigger_bucket(root: Path) -> Path:
    for part in ("images", "labels"):
        (root / part).mkdir(parents=True)
        for n in range(COPIES):
            for src in sorted((DEMO_BUCKET / part).iterdir()):
                shutil.copyfile(src, root / part / f"c{n}_{src.name}")
    return root


def test_inference_pool_grows_as_the_autoscaler_adds_nodes(cluster, tmp_path):
    out, bucket = tmp_path / "out", bigger_bucket(tmp_path / "bucket")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": cluster.address}
    proc = subprocess.run(
        [
            *SEGMENT_BUCKET,
            *job_args(bucket, out, "grow"),
            "--no-crf",
            "--batch-size",
            "1",
            # DeepLab's own test-time scales and flip: 12 forward passes an image.
            "--scales",
            "0.5,0.75,1.0,1.25,1.5,1.75",
            "--flip",
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
    # The default pool: one actor to start with and no most of its own (nothing published one).
    assert manifest["resources"]["infer_actors"] == [1, None], manifest["resources"]
    assert "1 or more actor(s)" in proc.stdout
    # Two inference nodes launched by the autoscaler, each hosting one actor of the pool.
    assert len(manifest["nodes"]["infer"]) == 2, (manifest["nodes"], sizes)
    assert sizes[0][1] <= 1 and max(running for _, running, _ in sizes) == 2, sizes
    keys = pq.read_table(run_dir / "masks", columns=["key"]).column("key").to_pylist()
    images = sorted(p.name for p in (bucket / "images").iterdir())
    assert sorted(keys) == images and len(set(keys)) == len(keys)  # each key exactly once
    assert (run_dir / "_SUCCESS").exists()


_AUTOSCALES = "import ray; from pipeline.dag.cluster import cluster_autoscales as a; ray.init(); print(a({wait}))"


def autoscales(cluster, wait: float = 15.0) -> subprocess.CompletedProcess:
    """``cluster_autoscales(wait)`` in a driver of its own joined to ``cluster``."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": cluster.address, "PYTHONPATH": str(REPO)}
    code = _AUTOSCALES.format(wait=wait)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_the_v1_autoscaler_is_told_from_a_head_without_one():
    """Ray's v1 monitor publishes its status on every cluster; only one with a real provider grows.
    (v2 is the growth test's own; a local head without an autoscaler: tests/test_resources.py.)"""
    with autoscaling_cluster(v2=False) as cluster:
        proc = autoscales(cluster)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "True", proc.stdout + proc.stderr[-2000:]


def test_a_head_whose_autoscaler_never_reports_is_waited_for_then_planned_as_it_is():
    # KubeRay starts the head with --no-monitor when its autoscaler runs beside it: the plan waits
    # for that autoscaler's first report, and without one plans for the nodes there are.
    with autoscaling_cluster(monitor=False) as cluster:
        started = time.monotonic()
        proc = autoscales(cluster, wait=3.0)
        took = time.monotonic() - started
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "False", proc.stdout + proc.stderr[-2000:]
    assert took >= 3.0
