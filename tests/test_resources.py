"""How the inference pool is sized against the cluster, and that its torch threads are really used."""

import json
import os
import subprocess
import sys

import pytest

from pipeline.config import ComputeConfig, CRFParams, JobConfig
from pipeline.stages import Resources

from tests.conftest import DEMO_BUCKET, REPO


def resolve(cluster: dict, *, crf: bool = True, **compute) -> Resources:
    config = JobConfig(input_uri="in", output_uri="out", labels_uri=None, model="deeplabv3plus_demo",
                       weights_uri=None, run_id="r", crf=CRFParams() if crf else None,
                       compute=ComputeConfig(**compute))
    return Resources.resolve(config, cluster)


def test_cpu_default_is_one_single_threaded_actor_per_spare_core():
    # 2 cores, no CRF: 2 - 0.25 (decode) = 1.75 CPUs for inference -> 2 actors of 0.875, 1 thread each.
    assert resolve({"CPU": 2.0}, crf=False) == Resources(False, 0.875, 1, (2, 2), 128, (1, 1))
    # 16 cores, CRF pool of at most 2 x 1 CPU: 13.75 spare -> 14 actors.
    r = resolve({"CPU": 16.0}, crf_actors=(1, 2))
    assert r.infer_actors == (14, 14) and r.infer_threads == 1 and r.infer_cpus == pytest.approx(13.75 / 14)
    assert r.decode_actors == (1, 1)  # the 0.25 CPU left
    # The demo on 2 cores: the CRF pool takes both, inference still gets one small actor.
    assert resolve({"CPU": 2.0}) == Resources(False, 0.5, 1, (1, 1), 192, (1, 1))


def test_cpu_explicit_sizes_win():
    # 3 actors x 4 CPUs leave 4 CPUs: up to 16 decode actors of 0.25, capped at one per CPU of the cluster.
    assert resolve({"CPU": 16.0}, crf=False, infer_cpus=4.0) == Resources(False, 4.0, 4, (3, 3), 192, (1, 16))
    assert resolve({"CPU": 16.0}, crf=False, infer_actors=(1, 3)).infer_threads == 5  # 15.75 / 3 CPUs each
    assert resolve({"CPU": 16.0}, crf=False, infer_actors=(2, 4), infer_cpus=2.0) == Resources(False, 2.0, 2, (2, 4), 256, (1, 16))


def test_gpu_default_is_one_actor_per_gpu():
    # 4 GPU actors x 1 CPU and 2 CRF actors leave 26 CPUs for decode actors, capped at 32.
    assert resolve({"CPU": 32.0, "GPU": 4.0}) == Resources(True, 1.0, 1, (4, 4), 1152, (1, 32))
    assert resolve({"CPU": 32.0, "GPU": 4.0}, infer_actors=(1, 8)).infer_actors == (1, 8)
    assert resolve({"CPU": 32.0, "GPU": 4.0}, object_store_mib=100).object_store_mib == 100
    # --gpu on a cluster whose GPU nodes are still scaled to zero: one actor, the autoscaler adds a node.
    assert resolve({"CPU": 4.0}, use_gpu=True).infer_actors == (1, 1)


_THREADS_PROBE = """
import json, re, threading, torch
from pipeline.config import InferenceConfig
from pipeline.decode import decode_batch
from pipeline.inference import Segmenter
from pipeline.weights import DEMO_WEIGHTS as W
import numpy as np

seg = Segmenter(model=W.model, weights_uri=None, storage_options={}, inference=InferenceConfig(),
                weights_sha256=W.sha256, num_classes=len(W.categories), use_gpu=False, threads=2,
                crf_follows=False, run_id="t", mean=W.mean, std=W.std)
seen = []
seg.model.register_forward_pre_hook(lambda module, args: seen.append(
    int(re.search(r"omp_get_max_threads\\(\\) : (\\d+)", torch.__config__.parallel_info()).group(1))))
batch = decode_batch({"key": np.array(["a"]), "uri": np.array([IMAGE]), "label_uri": np.array([""])},
                     storage_options={}, num_classes=len(W.categories), max_pixels=None)
worker = threading.Thread(target=seg, args=(batch,))  # Ray Data calls actors from another thread
worker.start()
worker.join()
print(json.dumps(seen))
"""


def test_segmenter_runs_its_threads_when_called_from_another_thread():
    """Ray starts workers with OMP_NUM_THREADS=1 and calls the callable class from a thread other
    than the constructor's; OpenMP's thread count is per thread, so threads set only in __init__
    left oneDNN's convolutions on one core."""
    image = str(sorted((DEMO_BUCKET / "images").iterdir())[0])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", f"IMAGE = {image!r}\n" + _THREADS_PROBE], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [2]


def test_object_store_budget_reaches_the_last_stage(ray_local):
    from pipeline.job import resolve_weights
    from pipeline.stages import build_dataset
    from pipeline.storage import list_inputs

    config = JobConfig(input_uri=str(DEMO_BUCKET / "images"), output_uri="out", labels_uri=None,
                       model="deeplabv3plus_demo", weights_uri=None, run_id="r",
                       compute=ComputeConfig(object_store_mib=300))
    weights, sha = resolve_weights(config)
    resources = Resources.resolve(config, {"CPU": 2.0})
    ds = build_dataset(list_inputs(config.input_uri, None), config, weights, sha, resources)
    assert ds.context.execution_options.resource_limits.object_store_memory == 300 * 2**20
