"""The Ray Data DAG: keys → read+decode (actor pool) → inference (actor pool) → dense CRF (CPU actor
pool: pydensecrf on GPU clusters) → write (part files published by workers). On CPU-only clusters
the inference actor also decodes and refines its own images (one actor per core), and with the
torch backend on GPUs it refines them on the GPU. Every stage passes failed rows through
untouched, so each input key leaves the DAG exactly once, as a mask row or an error row, in exactly
one part file."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyarrow as pa
import ray

from pipeline.config import JobConfig
from pipeline.crf import CRFRefiner
from pipeline.decode import Decoder
from pipeline.segmenter import Segmenter
from pipeline.storage import Inputs
from pipeline.weights import Weights
from pipeline.writer import PartWriter


@dataclass(frozen=True)
class Resources:
    """Where each stage runs, resolved against the cluster's nodes before any work starts."""

    use_gpu: bool
    infer_cpus: float
    infer_threads: int
    infer_actors: tuple[int, int]
    object_store_mib: int
    decode_actors: tuple[int, int]
    crf_actors: tuple[int, int] | None = None  # the CPU CRF pool; None: no pool (CRF off or fused)
    crf_fused: bool = False  # the inference actor refines its own images
    crf_backend: str | None = None  # "pydensecrf" or "torch" (on the inference device when fused); None: CRF off
    decode_fused: bool = False  # the inference actor reads and decodes its own images; no decode pool
    write_actors: int = 1  # most part writers

    @classmethod
    def resolve(cls, config: JobConfig, cluster: dict[str, float] | list[dict[str, float]]) -> Resources:
        """``cluster``: each alive node's resources (``ray.nodes()``), or one dict for the whole cluster."""
        nodes = [cluster] if isinstance(cluster, dict) else list(cluster)
        compute = config.compute
        total_cpus = sum(n.get("CPU", 0.0) for n in nodes) or 1.0
        gpus = sum(n.get("GPU", 0.0) for n in nodes)
        use_gpu = compute.use_gpu if compute.use_gpu is not None else gpus > 0
        backend = _crf_backend(config, use_gpu)
        # Without GPUs the CRF runs in the inference actor, one per core: no probabilities through
        # the object store and no CPU split between two pools (benchmarks/pipeline_vs_loop.py). With
        # GPUs the torch backend runs there too, on the GPU, right after the forward pass.
        fused = backend is not None and (not use_gpu or backend == "torch")
        # Without GPUs decoding joins them: a decode pool held a process and a CPU share of its own
        # and sent every decoded image through the object store (benchmarks/ceiling.py). A GPU
        # actor keeps its own CPU pool of decoders, which overlap reads with its forward passes.
        decode_fused = not use_gpu
        actors, cpus, threads = _inference_actors(compute, use_gpu, gpus, total_cpus, decode_fused)
        # CPUs each node keeps after the inference actors it may host (GPU nodes host one per GPU).
        left = [
            n.get("CPU", 0.0) - (_eligible(n, compute.infer_resources) and use_gpu) * n.get("GPU", 0.0) * cpus
            for n in nodes
        ]
        if not use_gpu:
            left = [max(0.0, total_cpus - actors[1] * cpus)]
        crf_actors = None
        if config.crf is not None and not fused:
            # By default the pool may grow into every CPU that inference leaves on the nodes that
            # may run it; Ray Data's autoscaler adds actors while CRF is the bottleneck.
            room = sum(
                math.floor(cpu / compute.crf_cpus + 1e-9)
                for cpu, n in zip(left, nodes, strict=False)
                if _eligible(n, compute.crf_resources)
            )
            crf_actors = compute.crf_actors or (1, max(1, room))
        crf_max = crf_actors[1] if crf_actors else 0
        # Blocks in flight: a GPU actor eats its input an order of magnitude faster than a CPU one.
        budget = compute.object_store_mib or (256 if use_gpu else 64) * actors[1] + 64 * min(crf_max, 16)
        decoders = (0, 0) if decode_fused else (1, _decoders(compute.decode_cpus, sum(left), total_cpus))
        # A writer is a process of its own: Ray Data added a second one mid-run on 2 cores, a
        # core-second of start-up for no throughput (benchmarks/ceiling.py); one per 8 CPUs.
        writers = max(1, min(WRITE_ACTORS, int(total_cpus // 8)))
        return cls(use_gpu, cpus, threads, actors, budget, decoders, crf_actors, fused, backend, decode_fused, writers)


def _decoders(decode_cpus: float, left: float, total_cpus: float) -> int:
    """Most decode actors: they may fill the CPUs inference leaves (one at least), one per CPU at
    most; Ray Data adds them only while decoding is what inference waits for."""
    return max(1, min(math.floor(left / decode_cpus + 1e-9), int(total_cpus)))


def _crf_backend(config: JobConfig, use_gpu: bool) -> str | None:
    """The dense CRF that runs; None: CRF off."""
    if config.crf is None:
        return None
    compute = config.compute
    if compute.crf_backend != "auto":
        return compute.crf_backend
    # auto: on GPUs the torch backend (same labels as pydensecrf, and a CPU pool would need many
    # cores per GPU at pydensecrf's speed) unless a CPU pool is asked for; on a CPU core
    # pydensecrf is the faster one.
    asks_pool = compute.crf_actors is not None or bool(compute.crf_resources)
    return "torch" if use_gpu and not asks_pool else "pydensecrf"


def _inference_actors(compute, use_gpu: bool, gpus: float, total_cpus: float, decode_fused: bool):
    """(actor range, CPUs per actor, torch threads per actor) of the inference pool."""
    if use_gpu:
        cpus = compute.infer_cpus or 1.0
        return compute.infer_actors or (max(1, int(gpus)),) * 2, cpus, max(1, int(cpus))
    spare = total_cpus - (0.0 if decode_fused else compute.decode_cpus)
    if compute.infer_actors is not None:
        actors = compute.infer_actors
        cpus = compute.infer_cpus or max(0.5, spare / actors[1])
    elif compute.infer_cpus is not None:
        cpus = compute.infer_cpus
        actors = (max(1, math.floor(spare / cpus)),) * 2
    else:
        actors = (max(1, round(spare)),) * 2
        cpus = max(0.5, spare / actors[1])
    return actors, cpus, max(1, math.floor(cpus + 0.5))


def _eligible(node: dict[str, float], required: dict) -> bool:
    """Whether a node offers every custom resource an actor asks for."""
    return all(node.get(name, 0.0) >= amount for name, amount in required.items())


# A worker that dies mid-batch (node preempted, OOM-killed, segfault in native code) loses no
# rows: Ray re-runs the batch on a restarted actor / another worker, and Ray Data keeps only one
# result per batch, so every key still leaves the DAG once. Ray Data 2.60 defaults are unbounded
# (max_restarts=-1, max_task_retries=-1): an input that kills its worker every time would loop
# forever. So actors may restart without limit (one per death, a long run on spot nodes sees
# many), but one batch is retried 3 times; then Ray Data drops that batch (max_errored_blocks)
# and pipeline/runner.py isolates the input that killed it (docs/faults.md).
TASK_RETRIES = 3


def _fault_tolerance(retries: int) -> dict:
    return {"max_restarts": -1, "max_task_retries": retries}


WRITE_ACTORS = 4  # most writers on any cluster: they encode Parquet and PUT, and hold no CPU


def build_dataset(
    inputs: Inputs,
    config: JobConfig,
    weights: Weights,
    weights_sha256: str,
    resources: Resources,
    run_uri: str,
    *,
    retries: int = TASK_RETRIES,
    max_blocks: int = 200,
    tolerate: bool = True,
    upto: str = "write",
) -> ray.data.Dataset:
    """The whole DAG from listed keys to one WRITE_SCHEMA row per part file written under ``run_uri``.

    A batch whose worker died ``retries`` + 1 times is dropped, not fatal: the caller reconciles
    the keys that reached no part file (pipeline/runner.py). ``upto`` ends the DAG after that stage
    (decode, infer, crf), which is how the runner learns where an input kills its worker."""
    blocks = max(1, min(math.ceil(len(inputs) / config.compute.batch_size), max_blocks))
    stage = _Stage(config, weights, resources, blocks, _fault_tolerance(retries))
    ds = _keys(inputs, blocks, resources, tolerate)
    if upto == "decode" or not resources.decode_fused:  # the runner probes decoding on its own
        ds = ds.map_batches(Decoder, **stage.decode(inputs))
    if upto == "decode":
        return ds
    ds = ds.map_batches(Segmenter, **stage.infer(weights_sha256, inputs))
    if upto == "infer":
        return ds
    if resources.crf_actors is not None:
        ds = ds.map_batches(CRFRefiner, **stage.crf(weights_sha256, len(inputs)))
    if upto == "crf":
        return ds
    # Workers write: each call publishes one part file of up to --rows-per-file rows.
    return ds.map_batches(PartWriter, **stage.write(run_uri))


def _keys(inputs: Inputs, blocks: int, resources: Resources, tolerate: bool) -> ray.data.Dataset:
    """The listed keys in ``blocks`` blocks, with the run's object-store budget and error tolerance."""
    keys = pa.table({"key": inputs.keys})
    step = math.ceil(keys.num_rows / blocks)
    # from_blocks, not from_arrow: the driver knows each block's size, and from_arrow would ask a
    # remote task per block and wait, on a worker that must start first (benchmarks/ceiling.py).
    ds = ray.data.from_blocks([keys.slice(i, step) for i in range(0, keys.num_rows, step)])
    # Every later stage's Dataset copies this context, so the budget covers the whole DAG.
    limits = ds.context.execution_options.resource_limits
    ds.context.execution_options.resource_limits = limits.copy(object_store_memory=resources.object_store_mib * 2**20)
    ds.context.max_errored_blocks = -1 if tolerate else 0
    # Ray Data's per-task USS sampling (a thread reading /proc/self/smaps every second) only feeds
    # its own memory statistics, and costs each inference call CPU (benchmarks/ceiling.py).
    ds.context.memory_usage_poll_interval_s = None
    return ds


@dataclass(frozen=True)
class _Stage:
    """Each stage's ``map_batches`` arguments: its callable's constructor, batch size and resources."""

    config: JobConfig
    weights: Weights
    resources: Resources
    blocks: int
    fault_tolerance: dict

    def decoder(self, inputs: Inputs) -> dict:
        """The ``Decoder``'s constructor arguments (its own pool's, or the fused inference actor's)."""
        # Tiled inference bounds network memory, so the pixel guard only applies to whole-image runs.
        max_pixels = None if self.config.inference.tile else self.config.inference.max_pixels
        return {
            "locator": inputs.locator(),
            "storage_options": self.config.storage_options,
            "num_classes": self.weights.num_classes,
            "max_pixels": max_pixels,
        }

    def decode(self, inputs: Inputs) -> dict:
        compute = self.config.compute
        return dict(
            fn_constructor_kwargs=self.decoder(inputs),
            batch_size=compute.batch_size,
            num_cpus=compute.decode_cpus,
            compute=ray.data.ActorPoolStrategy(
                min_size=1, max_size=max(1, min(self.resources.decode_actors[1], self.blocks))
            ),
            **self.fault_tolerance,
        )

    def infer(self, weights_sha256: str, inputs: Inputs) -> dict:
        config, weights, resources = self.config, self.weights, self.resources
        # A small run has fewer batches than the pool has actors: don't start (and load the model on)
        # actors that would get no batch.
        infer_min, infer_max = (min(n, self.blocks) for n in resources.infer_actors)
        return dict(
            fn_constructor_kwargs={
                "model": config.model,
                "weights_uri": config.weights_uri,
                "storage_options": config.storage_options,
                "inference": config.inference,
                "weights_sha256": weights_sha256,
                "num_classes": weights.num_classes,
                "use_gpu": resources.use_gpu,
                "threads": resources.infer_threads,
                "crf_follows": resources.crf_actors is not None,
                "run_id": config.run_id,
                "mean": weights.mean,
                "std": weights.std,
                "crf": config.crf if resources.crf_fused else None,
                "crf_backend": resources.crf_backend or "pydensecrf",
                "actor_memory_mib": config.compute.actor_memory_mib,
                "decode": self.decoder(inputs) if resources.decode_fused else None,
            },
            batch_size=config.compute.batch_size,
            compute=ray.data.ActorPoolStrategy(min_size=infer_min, max_size=infer_max),
            num_gpus=1 if resources.use_gpu else 0,
            num_cpus=resources.infer_cpus,
            resources=config.compute.infer_resources or None,
            **self.fault_tolerance,
        )

    def crf(self, weights_sha256: str, images: int) -> dict:
        config, pool = self.config, self.resources.crf_actors
        assert pool is not None, "a CRF pool stage is planned only with crf_actors"
        return dict(
            fn_constructor_kwargs={
                "params": config.crf,
                "num_classes": self.weights.num_classes,
                "model": config.model,
                "weights_sha256": weights_sha256,
                "run_id": config.run_id,
                "probs_encoding": config.inference.probs_encoding,
                "actor_memory_mib": config.compute.actor_memory_mib,
            },
            batch_size=1,  # one image per call keeps CRF actors evenly loaded
            compute=ray.data.ActorPoolStrategy(min_size=min(pool[0], images), max_size=min(pool[1], images)),
            num_cpus=config.compute.crf_cpus,
            resources=config.compute.crf_resources or None,
            **self.fault_tolerance,
        )

    def write(self, run_uri: str) -> dict:
        return dict(
            fn_constructor_kwargs={
                "run_uri": run_uri,
                "storage_options": self.config.storage_options,
                "num_classes": self.weights.num_classes,
            },
            batch_size=self.config.rows_per_file,
            batch_format="pyarrow",
            num_cpus=0,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=self.resources.write_actors),
            **self.fault_tolerance,
        )
