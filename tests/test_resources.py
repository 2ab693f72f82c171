"""How the pools are sized against the cluster (the nodes there now, and the nodes its autoscaler may
add), and that the inference actors' torch threads are really used."""

import json
import math
import os
import subprocess
import sys

import pytest

from pipeline.config.sections import ComputeConfig, CRFParams
from pipeline.dag.stages import Resources, capped
from pipeline.outputs.console import describe
from tests.conftest import DEMO_BUCKET, REPO, demo_config


def resolve(cluster: dict, *, crf: bool = True, ceiling: list | None = None, grows=False, **compute) -> Resources:
    config = demo_config(crf=CRFParams() if crf else None, compute=ComputeConfig(**compute))
    return Resources.resolve(config, cluster, ceiling=ceiling, grows=grows)


def test_cpu_default_is_one_single_threaded_actor_per_core_that_decodes_and_refines_its_own_images():
    # 2 cores: 2 actors of 1 thread each, and no decode pool: each inference actor reads and
    # decodes its own batch and, with CRF on, refines its own images (nothing through the store).
    # The part writer reserves a quarter CPU (never on a head with num-cpus 0); the actors share the rest.
    cpu2 = dict(use_gpu=False, infer_cpus=0.875, infer_threads=1, infer_actors=(2, 2), object_store_mib=128)
    cpu2 |= dict(decode_actors=(0, 0), crf_actors=None, decode_fused=True)
    assert resolve({"CPU": 2.0}, crf=False) == Resources(**cpu2, crf_fused=False, crf_backend=None)
    assert resolve({"CPU": 2.0}) == Resources(**cpu2, crf_fused=True, crf_backend="pydensecrf")
    r = resolve({"CPU": 16.0})
    assert r.infer_actors == (16, 16) and r.infer_threads == 1 and r.infer_cpus == (16 - 2 * 0.25) / 16
    assert r.crf_fused and r.crf_actors is None and r.decode_fused and r.decode_actors == (0, 0)
    # One part writer per 8 CPUs, 4 at most: on 2 cores a second writer was a process to start
    # mid-run for no throughput.
    assert resolve({"CPU": 2.0}).write_actors == 1 and r.write_actors == 2
    assert resolve({"CPU": 32.0, "GPU": 4.0}).write_actors == resolve({"CPU": 640.0}).write_actors == 4
    # An explicit --crf-actors does not bring a pool back where there is no GPU: the CRF is fused.
    assert resolve({"CPU": 16.0}, crf_actors=(1, 2)).crf_actors is None


def test_cpu_explicit_sizes_win():
    # 4 CPUs per actor on 16 CPUs: 3 actors (each decodes its own batch), 4 threads each; a fourth
    # would leave the two writers' half CPU no room, and the run would wait for them forever.
    no_pools = dict(
        decode_actors=(0, 0), crf_actors=None, crf_fused=False, crf_backend=None, decode_fused=True, write_actors=2
    )
    assert resolve({"CPU": 16.0}, crf=False, infer_cpus=4.0) == Resources(
        use_gpu=False, infer_cpus=4.0, infer_threads=4, infer_actors=(3, 3), object_store_mib=192, **no_pools
    )
    assert resolve({"CPU": 16.0}, crf=False, infer_actors=(1, 3)).infer_threads == 5  # 15.5 / 3 CPUs each
    assert resolve({"CPU": 16.0}, crf=False, infer_actors=(2, 4), infer_cpus=2.0) == Resources(
        use_gpu=False, infer_cpus=2.0, infer_threads=2, infer_actors=(2, 4), object_store_mib=256, **no_pools
    )


def test_gpu_default_is_one_actor_per_gpu_and_pools_that_grow_with_the_cluster():
    # One dict = the whole cluster: 4 GPU actors x 1 CPU leave 28 CPUs, which the CRF pool may grow
    # into (from 1 actor) and the decode pool too (capped at one per CPU).
    r = resolve({"CPU": 32.0, "GPU": 4.0}, crf_backend="pydensecrf")
    assert r == Resources(
        use_gpu=True,
        infer_cpus=1.0,
        infer_threads=1,
        infer_actors=(4, 4),
        object_store_mib=256 * 4 + 64 * 16,
        decode_actors=(1, 32),
        crf_actors=(1, 28),
        crf_fused=False,
        crf_backend="pydensecrf",
        decode_fused=False,
        write_actors=4,
    )
    assert resolve({"CPU": 32.0, "GPU": 4.0}, infer_actors=(1, 8)).infer_actors == (1, 8)
    assert resolve({"CPU": 32.0, "GPU": 4.0}, crf_backend="pydensecrf", crf_actors=(2, 6)).crf_actors == (2, 6)
    assert resolve({"CPU": 32.0, "GPU": 4.0}, object_store_mib=100).object_store_mib == 100
    # --gpu on a cluster that cannot grow and has no GPU: one actor.
    assert resolve({"CPU": 4.0}, use_gpu=True).infer_actors == (1, 1)
    # Per node: a CPU head and two 64-CPU nodes with 8 GPUs each; every node may run CRF actors.
    nodes = [{"CPU": 8.0}, {"CPU": 64.0, "GPU": 8.0}, {"CPU": 64.0, "GPU": 8.0}]
    r = resolve(nodes, crf_backend="pydensecrf")
    assert r.infer_actors == (16, 16) and r.crf_actors == (1, 8 + 56 + 56) and r.decode_actors == (1, 136)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_gpu_with_the_torch_backend_refines_in_the_gpu_actors_and_starts_no_crf_pool(backend):
    # The CRF runs on the GPU right after the forward pass: no CPU CRF pool, no probabilities in the
    # object store (so no object-store budget for them), and an explicit --crf-actors starts no pool.
    r = resolve({"CPU": 32.0, "GPU": 4.0}, crf_backend=backend)
    # The GPU actor keeps only device work: its result rows are Ray Data tasks on the CPUs.
    assert r == Resources(
        use_gpu=True,
        infer_cpus=1.0,
        infer_threads=1,
        infer_actors=(4, 4),
        object_store_mib=256 * 4,
        decode_actors=(1, 32),
        crf_actors=None,
        crf_fused=True,
        crf_backend="torch",
        decode_fused=False,
        write_actors=4,
        rows_apart=True,
    )
    assert resolve({"CPU": 4.0}, use_gpu=True, crf_backend=backend).crf_backend == "torch"
    nodes = [{"CPU": 8.0}, {"CPU": 64.0, "GPU": 8.0}, {"CPU": 64.0, "GPU": 8.0, "crf_node": 64.0}]
    pooled = [
        resolve({"CPU": 32.0, "GPU": 4.0}, crf_backend=backend, crf_actors=(2, 6)),
        resolve(nodes, crf_backend=backend, crf_resources={"crf_node": 1}),
    ]
    if backend == "torch":  # asked for by name: it runs on the GPU, and --crf-actors starts no pool
        assert all(r.crf_fused and r.crf_actors is None for r in pooled)
    else:  # auto, with a CPU pool asked for (--crf-actors / --crf-resources): that pool, pydensecrf
        assert [(r.crf_backend, r.crf_fused, r.crf_actors) for r in pooled] == [
            ("pydensecrf", False, (2, 6)),
            ("pydensecrf", False, (1, 56)),
        ]  # 64 CPUs - 8 GPU actors
        assert not any(r.rows_apart for r in pooled)  # the CRF pool, on CPUs, makes the rows


def test_cpu_backend_choice_and_crf_off():
    # Without GPUs auto is pydensecrf (the faster one on a core, docs/benchmarks.md); torch if asked,
    # fused either way. With the CRF off there is no backend at all.
    assert resolve({"CPU": 2.0}, crf_backend="torch") == Resources(
        use_gpu=False,
        infer_cpus=0.875,
        infer_threads=1,
        infer_actors=(2, 2),
        object_store_mib=128,
        decode_actors=(0, 0),
        crf_actors=None,
        crf_fused=True,
        crf_backend="torch",
        decode_fused=True,
    )
    assert resolve({"CPU": 2.0}, crf_backend="pydensecrf").crf_backend == "pydensecrf"
    assert resolve({"CPU": 32.0, "GPU": 4.0}, crf=False, crf_backend="torch").crf_backend is None
    assert resolve({"CPU": 32.0, "GPU": 4.0}, crf=False).crf_actors is None


def test_crf_pool_grows_only_on_the_nodes_that_may_run_it():
    nodes = [
        {"CPU": 2.0},
        {"CPU": 8.0, "GPU": 1.0, "gpu_node": 1.0},
        {"CPU": 16.0, "crf_node": 16.0},
        {"CPU": 16.0, "crf_node": 16.0},
    ]
    pool = {"crf_backend": "pydensecrf"}
    r = resolve(nodes, infer_resources={"gpu_node": 1}, crf_resources={"crf_node": 1}, **pool)
    assert r.infer_actors == (1, 1) and r.crf_actors == (1, 32)
    assert resolve(nodes, crf_resources={"crf_node": 1}, crf_cpus=2.0, **pool).crf_actors == (1, 16)
    # No node offers the resource and the cluster cannot grow: one actor.
    assert resolve(nodes[:2], crf_resources={"crf_node": 1}, **pool).crf_actors == (1, 1)


# The shipped KubeRay cluster as its autoscaler publishes it: a CPU head (num-cpus 0), GPU workers
# (3 CPUs, 1 GPU, gpu_node) and CRF workers (8 CPUs, crf_node 8), each group at most 4 replicas.
HEAD = {"CPU": 0.0}
GPU_NODE = {"CPU": 3.0, "GPU": 1.0, "gpu_node": 1.0}
CRF_NODE = {"CPU": 8.0, "crf_node": 8.0}
KUBERAY = [HEAD, *[GPU_NODE] * 4, *[CRF_NODE] * 4]


def test_pools_are_ranges_from_the_nodes_there_now_to_the_nodes_the_autoscaler_may_add():
    pinned = dict(infer_resources={"gpu_node": 1}, crf_resources={"crf_node": 1}, crf_backend="pydensecrf")
    # Both worker groups at zero replicas: one actor each to start with, as many as the groups hold
    # at maxReplicas to grow into; and GPUs are planned for without --gpu, since the groups have them.
    r = resolve([HEAD], ceiling=KUBERAY, **pinned)
    assert r.use_gpu and r.infer_actors == (1, 4) and r.crf_actors == (1, 32)
    assert r.decode_actors[1] > 1 and r.write_actors == 4
    # One GPU node up: the pool starts at what exists and still grows to the groups' maximum.
    r = resolve([HEAD, GPU_NODE], ceiling=KUBERAY, **pinned)
    assert r.infer_actors == (1, 4) and r.crf_actors == (1, 32)
    r = resolve([HEAD, GPU_NODE, GPU_NODE], ceiling=KUBERAY, **pinned)
    assert r.infer_actors == (2, 4)
    # A range given on the command line is honoured as it is.
    r = resolve([HEAD], ceiling=KUBERAY, infer_actors=(1, 2), crf_actors=(2, 6), **pinned)
    assert r.infer_actors == (1, 2) and r.crf_actors == (2, 6)
    # Without GPUs the CPU actors keep the size they have now and grow in number with the CPU nodes.
    now = [{"CPU": 2.0}]
    r = resolve(now, ceiling=[{"CPU": 2.0}, {"CPU": 4.0}, {"CPU": 4.0}])
    assert not r.use_gpu and r.infer_cpus == 0.875 and r.infer_actors == (2, math.floor((10 - 0.25) / 0.875))
    # A cluster that cannot grow (no autoscaler): the nodes there are, as before.
    assert resolve(now, ceiling=None) == resolve(now)
    # A published ceiling decides the most even where the cluster is known to grow.
    assert resolve([HEAD], ceiling=KUBERAY, grows=True, **pinned) == resolve([HEAD], ceiling=KUBERAY, **pinned)


def test_an_autoscaler_that_publishes_no_maxima_leaves_the_pools_open_ended():
    # Ray's open-source autoscalers (KubeRay's v1 and v2) publish no node maxima: each pool starts at
    # what the nodes there now hold and has no most of its own, so Ray Data grows it as nodes join.
    pinned = dict(infer_resources={"gpu_node": 1}, crf_resources={"crf_node": 1}, crf_backend="pydensecrf")
    r = resolve([HEAD], grows=True, use_gpu=True, **pinned)
    assert r.use_gpu and r.infer_actors == (1, None) and r.crf_actors == (1, None) and r.decode_actors == (1, None)
    # The object-store budget counts an open-ended pool as 16 actors (256 MiB each on GPUs) and 16 CRF actors.
    assert r.object_store_mib == 256 * 16 + 64 * 16
    r = resolve([HEAD, GPU_NODE, GPU_NODE], grows=True, use_gpu=True, **pinned)
    assert r.infer_actors == (2, None)
    # Without GPUs: the CPU actors of now, as many more as the cluster comes to hold.
    r = resolve([{"CPU": 2.0}], grows=True)
    assert r.infer_actors == (2, None) and r.infer_cpus == 0.875 and r.decode_fused
    # A range given on the command line is honoured as it is.
    r = resolve([HEAD], grows=True, infer_actors=(1, 2), crf_actors=(2, 6), use_gpu=True, **pinned)
    assert r.infer_actors == (1, 2) and r.crf_actors == (2, 6)
    # What each stage's Ray Data pool gets: never more actors than the stage has units of work.
    assert capped((1, None), 500) == (1, 500) and capped((2, 4), 3) == (2, 3) and capped((4, None), 2) == (2, 2)
    shown = describe(resolve([HEAD], grows=True, use_gpu=True, **pinned))
    assert shown.startswith("inference on GPU: 1 or more actor(s)") and "decode in 1 or more CPU actors" in shown


_THREADS_PROBE = """
import json, re, threading, torch
from pipeline.config.sections import InferenceConfig
from pipeline.io.decode import decode_batch
from pipeline.inference.segmenter import InferSpec, Segmenter
from pipeline.models.deeplabv3plus import DEMO_WEIGHTS as W
import numpy as np

seg = Segmenter(InferSpec(weights=W, inference=InferenceConfig(), storage_options={}, run_id="t",
                          use_gpu=False, threads=2, crf_follows=False))
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
    out = subprocess.run(
        [sys.executable, "-c", f"IMAGE = {image!r}\n" + _THREADS_PROBE],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [2]


def test_object_store_budget_reaches_the_last_stage(ray_local):
    from pipeline.dag.stages import DagSpec, build_dataset
    from pipeline.io.storage import list_inputs
    from pipeline.job import resolve_weights

    config = demo_config(input_uri=str(DEMO_BUCKET / "images"), compute=ComputeConfig(object_store_mib=300))
    weights = resolve_weights(config)
    resources = Resources.resolve(config, {"CPU": 2.0})
    dag = DagSpec(config=config, weights=weights, resources=resources, run_uri="/tmp/unused")
    ds = build_dataset(dag, list_inputs(config.input_uri, None))
    assert ds.context.execution_options.resource_limits.object_store_memory == 300 * 2**20


def test_no_task_holds_more_than_four_batches_of_keys(ray_local, monkeypatch):
    """Blocks grow from one batch to four as a run outgrows TARGET_BLOCKS batches, never beyond; Ray
    Data's own statistics of the real DAG (the decode pool; its keys name no file, so each becomes a
    read error row) show it. TARGET_BLOCKS is lowered to 10 so that 100 keys stand for 10^5+."""
    import pyarrow as pa

    from pipeline.dag import stages
    from pipeline.dag.stages import DagSpec, build_dataset, dataset_stats, keys_per_block
    from pipeline.io.storage import Inputs
    from pipeline.job import resolve_weights

    assert [keys_per_block(n, 16) for n in (32, 3_200, 10_000, 200_000, 10_000_000)] == [16, 16, 64, 64, 64]
    monkeypatch.setattr(stages, "TARGET_BLOCKS", 10)
    config = demo_config(input_uri=str(DEMO_BUCKET / "images"), crf=None, compute=ComputeConfig(batch_size=1))
    weights = resolve_weights(config)
    resources = Resources.resolve(config, {"CPU": 2.0})
    inputs = Inputs(config.input_uri, None, pa.chunked_array([[f"missing/{i:03d}.jpg" for i in range(100)]]))
    dag = DagSpec(config=config, weights=weights, resources=resources, run_uri="/tmp/unused")
    ds = build_dataset(dag, inputs, upto="decode")
    assert sum(len(b["key"]) for b in ds.iter_batches(batch_size=None)) == 100
    (decode,) = [s for s in dataset_stats(ds) if s["stage"] == "MapBatches(Decoder)"]
    assert decode["rows"] == 100 and decode["tasks"] == 25 and decode["rows_per_task_max"] == 4


def test_a_local_head_has_no_autoscaler_and_no_ceiling(ray_local):
    # ray.init's own head runs Ray's monitor with the read-only provider: nothing may join.
    from pipeline.dag.cluster import cluster_autoscales, cluster_ceiling

    assert cluster_autoscales() is False and cluster_ceiling() is None
