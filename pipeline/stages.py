"""The Ray Data DAG: inputs → read+decode (actor pool) → inference (actor pool) → dense CRF (CPU actor
pool) → one result table per batch. Every stage passes failed rows through untouched, so each
input key leaves the DAG exactly once, as a mask row or an error row."""

from __future__ import annotations

import math
from dataclasses import dataclass

import ray

from pipeline.config import JobConfig
from pipeline.crf import CRFRefiner
from pipeline.decode import Decoder
from pipeline.inference import Segmenter
from pipeline.storage import InputFile
from pipeline.weights import Weights


@dataclass(frozen=True)
class Resources:
    """Where each stage runs, resolved against the cluster before any work starts."""

    use_gpu: bool
    infer_cpus: float
    infer_threads: int
    infer_actors: tuple[int, int]
    object_store_mib: int
    decode_actors: tuple[int, int]

    @classmethod
    def resolve(cls, config: JobConfig, cluster: dict[str, float]) -> "Resources":
        compute = config.compute
        use_gpu = compute.use_gpu if compute.use_gpu is not None else cluster.get("GPU", 0) > 0
        crf_max = compute.crf_actors[1] if config.crf is not None else 0
        if use_gpu:
            gpus = max(1, int(cluster.get("GPU", 0)))
            actors = compute.infer_actors or (gpus, gpus)
            cpus = compute.infer_cpus or 1.0
            threads = max(1, int(cpus))
        else:
            # CPU fallback: leave room for the CRF pool at its maximum and for a decode actor, and
            # split the rest between inference actors, torch threads = actor CPUs, so cores are
            # never oversubscribed. By default one single-threaded actor per spare core: for batch
            # throughput processes beat intra-op threads (benchmarks/pipeline_vs_loop.py, 2 cores,
            # demo model: 2 actors x 1 thread 27.0 images/s; a loop with 2 threads 12.1, with 1 17.5).
            spare = cluster.get("CPU", 1.0) - crf_max * compute.crf_cpus - compute.decode_cpus
            if compute.infer_actors is not None:
                actors = compute.infer_actors
                cpus = compute.infer_cpus or max(0.5, spare / actors[1])
            elif compute.infer_cpus is not None:
                cpus = compute.infer_cpus
                actors = (max(1, math.floor(spare / cpus)),) * 2
            else:
                actors = (max(1, round(spare)),) * 2
                cpus = max(0.5, spare / actors[1])
            threads = max(1, math.floor(cpus + 0.5))
        # Blocks in flight: a GPU actor eats its input an order of magnitude faster than a CPU one.
        budget = compute.object_store_mib or (256 if use_gpu else 64) * actors[1] + 64 * crf_max
        # Decode actors may fill the CPUs the other pools leave at their maximum, one at least;
        # Ray Data adds them only while decoding is what inference waits for.
        free = cluster.get("CPU", 1.0) - actors[1] * cpus - crf_max * compute.crf_cpus
        decoders = max(1, min(math.floor(free / compute.decode_cpus + 1e-9), int(cluster.get("CPU", 1.0))))
        return cls(use_gpu, cpus, threads, actors, budget, (1, decoders))


# A worker that dies mid-batch (node preempted, OOM-killed, segfault in native code) loses no
# rows: Ray re-runs the batch on a restarted actor / another worker, and Ray Data keeps only one
# result per batch, so every key still leaves the DAG once. Ray Data 2.60 defaults are unbounded
# (max_restarts=-1, max_task_retries=-1, tasks max_retries=-1): an input that kills its worker
# every time would then loop forever instead of failing the run. So actors may restart without
# limit (one per death, a long run on spot nodes sees many), but one batch is retried 3 times;
# after that the run fails with the worker's death as the reason and --resume continues it.
TASK_RETRIES = 3
ACTOR_FAULT_TOLERANCE = {"max_restarts": -1, "max_task_retries": TASK_RETRIES}


def build_dataset(files: list[InputFile], config: JobConfig, weights: Weights, weights_sha256: str,
                  resources: Resources) -> ray.data.Dataset:
    """The whole DAG from listed inputs to RESULT_SCHEMA tables, one readable function."""
    compute = config.compute
    blocks = max(1, min(math.ceil(len(files) / compute.batch_size), 200))
    ds = ray.data.from_items([{"key": f.key, "uri": f.uri, "label_uri": f.label_uri} for f in files],
                             override_num_blocks=blocks)
    # Every later stage's Dataset copies this context, so the budget covers the whole DAG.
    limits = ds.context.execution_options.resource_limits
    ds.context.execution_options.resource_limits = limits.copy(object_store_memory=resources.object_store_mib * 2**20)
    # A small run has fewer batches than the pool has actors: don't start (and load the model on)
    # actors that would get no batch.
    infer_min, infer_max = (min(n, blocks) for n in resources.infer_actors)
    # Tiled inference bounds network memory, so the pixel guard only applies to whole-image runs.
    max_pixels = None if config.inference.tile else config.inference.max_pixels
    ds = ds.map_batches(Decoder, fn_constructor_kwargs={"storage_options": config.storage_options,
                                                        "num_classes": weights.num_classes, "max_pixels": max_pixels},
                        batch_size=compute.batch_size, num_cpus=compute.decode_cpus,
                        compute=ray.data.ActorPoolStrategy(min_size=resources.decode_actors[0],
                                                           max_size=min(resources.decode_actors[1], blocks)),
                        **ACTOR_FAULT_TOLERANCE)
    ds = ds.map_batches(
        Segmenter,
        fn_constructor_kwargs={
            "model": config.model, "weights_uri": config.weights_uri, "storage_options": config.storage_options,
            "inference": config.inference, "weights_sha256": weights_sha256, "num_classes": weights.num_classes,
            "use_gpu": resources.use_gpu, "threads": resources.infer_threads,
            "crf_follows": config.crf is not None, "run_id": config.run_id,
            "mean": weights.mean, "std": weights.std,
        },
        batch_size=compute.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=infer_min, max_size=infer_max),
        num_gpus=1 if resources.use_gpu else 0,
        num_cpus=resources.infer_cpus,
        resources=compute.infer_resources or None,
        **ACTOR_FAULT_TOLERANCE,
    )
    if config.crf is not None:
        ds = ds.map_batches(
            CRFRefiner,
            fn_constructor_kwargs={"params": config.crf, "num_classes": weights.num_classes, "model": config.model,
                                   "weights_sha256": weights_sha256, "run_id": config.run_id,
                                   "probs_encoding": config.inference.probs_encoding},
            batch_size=1,  # one image per call keeps CRF actors evenly loaded
            compute=ray.data.ActorPoolStrategy(min_size=compute.crf_actors[0], max_size=compute.crf_actors[1]),
            num_cpus=compute.crf_cpus,
            resources=compute.crf_resources or None,
            **ACTOR_FAULT_TOLERANCE,
        )
    return ds
