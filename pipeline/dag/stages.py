"""The Ray Data DAG: keys → read+decode (actor pool) → inference (actor pool) → dense CRF (CPU actor
pool: pydensecrf on GPU clusters) → write (part files published by workers). On CPU-only clusters
the inference actor also decodes and refines its own images (one actor per core), and with the
torch backend on GPUs it refines them on the GPU. Every stage passes failed rows through
untouched, so each input key leaves the DAG exactly once, as a mask row or an error row, in exactly
one part file."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import pyarrow as pa
import ray
from ray.util.annotations import RayDeprecationWarning

from pipeline.config.sections import JobConfig
from pipeline.crf.densecrf import CRFRefiner, CRFSpec
from pipeline.evaluation.per_image import result_table
from pipeline.inference.segmenter import InferSpec, Segmenter
from pipeline.io.decode import Decoder, DecodeSpec
from pipeline.io.storage import Inputs
from pipeline.models.weights import Weights
from pipeline.outputs.writer import PartWriter, WriteSpec
from pipeline.rows.flight import RETRIES, isolating

# A pool's range: (least, most) actors; most None: as many as the cluster comes to hold (an
# autoscaler that publishes no maxima), which Ray Data's actor autoscaler caps by what exists.
Pool = tuple[int, int | None]
# What an open-ended pool counts as where a number is needed: the object-store budget.
OPEN_POOL_ACTORS = 16


@dataclass(frozen=True, kw_only=True)
class Resources:
    """Where each stage runs, resolved against the cluster's nodes before any work starts."""

    use_gpu: bool
    infer_cpus: float
    infer_threads: int
    infer_actors: Pool
    object_store_mib: int
    decode_actors: Pool
    crf_actors: Pool | None = None  # the CPU CRF pool; None: no pool (CRF off or fused)
    crf_fused: bool = False  # the inference actor refines its own images
    crf_backend: str | None = None  # "pydensecrf" or "torch" (on the inference device when fused); None: CRF off
    decode_fused: bool = False  # the inference actor reads and decodes its own images; no decode pool
    write_actors: int = 1  # most part writers
    # Result rows (PNG masks, per-image statistics) in CPU tasks of their own, not in the inference
    # actor: with a GPU that actor's host core is what feeds the device (benchmarks/actor_host.py).
    rows_apart: bool = False

    @classmethod
    def resolve(
        cls,
        config: JobConfig,
        cluster: dict[str, float] | list[dict[str, float]],
        *,
        ceiling: list[dict[str, float]] | None = None,
        grows: bool = False,
    ) -> Resources:
        """``cluster``: each alive node's resources (``ray.nodes()``), or one dict for the whole cluster;
        ``ceiling``: the nodes the cluster may grow to (its autoscaler's node types at their most,
        ``pipeline.dag.cluster.cluster_ceiling``), None when unknown; ``grows``: an autoscaler
        manages the cluster (``pipeline.dag.cluster.cluster_autoscales``).

        Each pool is a range: from what the nodes that exist now hold to what the ceiling's nodes
        would hold, so Ray Data grows it as the autoscaler adds nodes. An autoscaler that publishes
        no ceiling leaves the most open, as Ray Data's own default pool does: its actor autoscaler
        adds actors while the nodes there are can hold them, and asks the cluster for more. A
        range given on the command line wins."""
        now = [cluster] if isinstance(cluster, dict) else list(cluster)
        most = now if not ceiling else list(ceiling)
        open_ended = grows and not ceiling
        compute = config.compute
        gpus_now, gpus_most = (sum(n.get("GPU", 0.0) for n in nodes) for nodes in (now, most))
        use_gpu = compute.use_gpu if compute.use_gpu is not None else max(gpus_now, gpus_most) > 0
        backend = _crf_backend(config, use_gpu)
        # Without GPUs the CRF runs in the inference actor, one per core: no probabilities through
        # the object store and no CPU split between two pools (benchmarks/pipeline_vs_loop.py). With
        # GPUs the torch backend runs there too, on the GPU, right after the forward pass.
        fused = backend is not None and (not use_gpu or backend == "torch")
        # Without GPUs decoding joins them: a decode pool held a process and a CPU share of its own
        # and sent every decoded image through the object store (benchmarks/ceiling.py). A GPU
        # actor keeps its own CPU pool of decoders, which overlap reads with its forward passes.
        decode_fused = not use_gpu
        # A writer is a process of its own: Ray Data added a second one mid-run on 2 cores, a
        # core-second of start-up for no throughput (benchmarks/ceiling.py); one per 8 CPUs.
        writers = max(1, min(WRITE_ACTORS, int(_cpus(most) // 8)))
        plan_now = _Plan.of(config, now, use_gpu, decode_fused, fused, WRITER_CPUS * writers)
        plan_most = _Plan.of(config, most, use_gpu, decode_fused, fused, WRITER_CPUS * writers, cpus=plan_now.cpus)

        def most_of(now: int, *most: int) -> int | None:
            return None if open_ended else max(now, *most)

        actors = compute.infer_actors or (plan_now.actors, most_of(plan_now.actors, plan_most.actors))
        crf_actors = None
        if config.crf is not None and not fused:
            # By default the pool may grow into every CPU that inference leaves on the nodes that
            # may run it; Ray Data's autoscaler adds actors while CRF is the bottleneck.
            crf_actors = compute.crf_actors or (1, most_of(1, plan_now.crf_room, plan_most.crf_room))
        crf_max = _most(crf_actors) if crf_actors else 0
        # Blocks in flight: a GPU actor eats its input an order of magnitude faster than a CPU one.
        budget = compute.object_store_mib or (256 if use_gpu else 64) * _most(actors) + 64 * min(crf_max, 16)
        decoders = (0, 0) if decode_fused else (1, most_of(plan_now.decoders, plan_most.decoders))
        return cls(
            use_gpu=use_gpu,
            infer_cpus=plan_now.cpus,
            infer_threads=plan_now.threads,
            infer_actors=actors,
            object_store_mib=budget,
            decode_actors=decoders,
            crf_actors=crf_actors,
            crf_fused=fused,
            crf_backend=backend,
            decode_fused=decode_fused,
            write_actors=writers,
            rows_apart=use_gpu and crf_actors is None,
        )


def _most(pool: Pool) -> int:
    """A pool's most actors, an open-ended one counted as ``OPEN_POOL_ACTORS``."""
    return OPEN_POOL_ACTORS if pool[1] is None else pool[1]


def capped(pool: Pool, limit: int) -> tuple[int, int]:
    """``pool`` for a stage with ``limit`` units of work: never more actors than units."""
    least, most = pool
    return min(least, limit), min(limit if most is None else most, limit)


def _cpus(nodes: list[dict[str, float]]) -> float:
    return sum(n.get("CPU", 0.0) for n in nodes) or 1.0


@dataclass(frozen=True, kw_only=True)
class _Plan:
    """The pools one set of nodes holds: inference actors, their CPUs, CRF and decode room."""

    actors: int
    cpus: float
    threads: int
    crf_room: int
    decoders: int

    @classmethod
    def of(cls, config: JobConfig, nodes, use_gpu, decode_fused, fused, writer_cpus, *, cpus: float | None = None):
        """``cpus``: CPUs per inference actor decided elsewhere (the ceiling keeps the actors' size of now)."""
        compute = config.compute
        total = _cpus(nodes)
        gpus = sum(n.get("GPU", 0.0) for n in nodes)
        if use_gpu:
            size = _gpu_actors(compute, gpus)
        else:
            # The part writers reserve a CPU share too (never on a head that offers none); the
            # inference actors take the rest.
            size = _cpu_actors(compute, max(0.5, total - writer_cpus), decode_fused, cpus)
        actors, cpus = size.actors, size.cpus
        # CPUs each node keeps after the inference actors it may host (GPU nodes host one per GPU).
        left = [
            n.get("CPU", 0.0) - (_eligible(n, compute.infer_resources) and use_gpu) * n.get("GPU", 0.0) * cpus
            for n in nodes
        ]
        if not use_gpu:
            left = [max(0.0, total - writer_cpus - actors * cpus)]
            nodes = [{}]
        room = sum(
            math.floor(cpu / compute.crf_cpus + 1e-9)
            for cpu, n in zip(left, nodes, strict=True)
            if _eligible(n, compute.crf_resources)
        )
        decoders = _decoders(compute.decode_cpus, max(0.0, sum(left) - writer_cpus), total)
        return cls(actors=actors, cpus=cpus, threads=size.threads, crf_room=room, decoders=decoders)


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


class _ActorSize(NamedTuple):
    """How many inference actors, the CPUs each reserves and the torch threads each runs."""

    actors: int
    cpus: float
    threads: int


def _gpu_actors(compute, gpus: float) -> _ActorSize:
    """With GPUs: one actor per GPU (one at least)."""
    cpus = compute.infer_cpus or 1.0
    return _ActorSize(actors=max(1, int(gpus)), cpus=cpus, threads=max(1, int(cpus)))


def _cpu_actors(compute, cpus_left: float, decode_fused: bool, fixed: float | None) -> _ActorSize:
    """Without GPUs: one single-threaded actor per core by default. ``fixed``: the actors' CPUs
    already decided (how many of that size fit)."""
    spare = cpus_left - (0.0 if decode_fused else compute.decode_cpus)
    if fixed is not None:
        cpus = fixed
        actors = max(1, math.floor(spare / cpus + 1e-9))
    elif compute.infer_actors is not None:
        actors = compute.infer_actors[1]
        cpus = compute.infer_cpus or max(0.5, spare / actors)
    elif compute.infer_cpus is not None:
        cpus = compute.infer_cpus
        actors = max(1, math.floor(spare / cpus + 1e-9))
    else:
        actors = max(1, round(spare))
        cpus = max(0.5, spare / actors)
    return _ActorSize(actors=actors, cpus=cpus, threads=max(1, math.floor(cpus + 0.5)))


def _eligible(node: dict[str, float], required: dict) -> bool:
    """Whether a node offers every custom resource an actor asks for."""
    return all(node.get(name, 0.0) >= amount for name, amount in required.items())


# A worker that dies mid-batch (node preempted, OOM-killed, segfault in native code) loses no
# rows: Ray re-runs the batch on a restarted actor / another worker, and Ray Data keeps only one
# result per batch, so every key still leaves the DAG once. Ray Data 2.60 defaults are unbounded
# (max_restarts=-1, max_task_retries=-1): an input that kills its worker every time would loop
# forever. So actors may restart without limit (one per death, a long run on spot nodes sees
# many), but one batch is retried 3 times: enough for the restarted actor to isolate the input that
# killed it from its flight record (pipeline/rows/flight.py). A batch that still dies is dropped
# (max_errored_blocks) and pipeline/dag/runner.py isolates its culprits (docs/faults.md).
TASK_RETRIES = RETRIES


def _fault_tolerance(retries: int) -> dict:
    return {"max_restarts": -1, "max_task_retries": retries}


WRITE_ACTORS = 4  # most writers on any cluster: they encode Parquet and PUT
# A CPU share each writer reserves: with none, Ray places it on a head that declares num-cpus 0
# (ray-project/ray#41824), which runs the driver and Ray's control plane only.
WRITER_CPUS = 0.25
# Keys per block, hence per task of each compute stage: one batch while a run has fewer than
# TARGET_BLOCKS batches, up to MAX_BATCHES_PER_TASK batches beyond that (fewer blocks for the
# driver to track at 10^6-10^7 keys, docs/scale.md). Bounded at any bucket size: a retry, a
# poison input's isolation and a run's tail all redo at most this many keys.
TARGET_BLOCKS = 200
MAX_BATCHES_PER_TASK = 4
# Ray Data fails an execution after this long without any operator taking or emitting a block.
# A task holds at most MAX_BATCHES_PER_TASK batches (minutes even on CPU with the CRF, where an
# image takes 1-7 s), so only waiting for nodes is long: a GPU worker group at zero replicas
# takes minutes to start (image pull, driver); an hour of that is an outage, not a slow night.
NO_PROGRESS_TIMEOUT_S = 3600.0
# Actor __init__ failures retried in the same actor before it counts as dead (Ray Data's
# actor_init_retry_on_errors): the weights come from the driver, so what remains is transient
# (a node's first CUDA context, a slow disk); then Ray Data replaces the dead actor this many
# times in a row (max_consecutive_actor_init_deaths) before failing the run.
ACTOR_INIT_RETRIES = 2
ACTOR_INIT_DEATHS = 3


def keys_per_block(keys: int, batch_size: int, max_blocks: int | None = None) -> int:
    """Keys in each block of the run's input (the most any compute task holds); ``max_blocks``: at
    least that many blocks (the runner's isolation passes: one key each)."""
    if max_blocks is not None:
        return max(1, math.ceil(keys / max_blocks))
    batches = math.ceil(keys / batch_size)
    return batch_size * min(MAX_BATCHES_PER_TASK, max(1, math.ceil(batches / TARGET_BLOCKS)))


def plan(config: JobConfig, resources: Resources, *, inputs: int, todo: int) -> dict:
    """The resource plan as data: what --dry-run prints and manifest.json keeps."""
    per_block = keys_per_block(todo, config.compute.batch_size)
    pools = {"infer": list(resources.infer_actors), "write": [1, resources.write_actors]}
    if not resources.decode_fused:
        pools["decode"] = list(resources.decode_actors)
    if resources.crf_actors is not None:
        pools["crf"] = list(resources.crf_actors)
    return {
        "inputs": inputs,
        "todo": todo,
        "batch_size": config.compute.batch_size,
        "blocks": math.ceil(todo / per_block) if todo else 0,
        "keys_per_task_max": per_block if todo else 0,
        "pools": pools,
        "object_store_mib": resources.object_store_mib,
        "use_gpu": resources.use_gpu,
        "infer_cpus": resources.infer_cpus,
        "crf_backend": resources.crf_backend,
        "crf_fused": resources.crf_fused,
        "decode_fused": resources.decode_fused,
        "rows_apart": resources.rows_apart,  # result rows as Ray Data tasks (no pool: as many as CPUs free)
        "no_progress_timeout_s": NO_PROGRESS_TIMEOUT_S,
    }


@dataclass(frozen=True, kw_only=True)
class DagSpec:
    """What every stage of one run's DAG is built from: the configuration, the checked weights
    record, the resolved resources and where the part files go."""

    config: JobConfig
    weights: Weights
    resources: Resources
    run_uri: str
    # The checkpoint's bytes in the object store, put there once by the driver; the inference actors
    # read them instead of the weights URI (None: each actor reads the URI).
    weights_data: ray.ObjectRef | None = None


def build_dataset(
    dag: DagSpec,
    inputs: Inputs,
    *,
    retries: int = TASK_RETRIES,
    max_blocks: int | None = None,
    tolerate: bool | int = True,
    upto: str = "write",
) -> ray.data.Dataset:
    """The whole DAG from listed keys to one WRITE_SCHEMA row per part file written under ``dag.run_uri``.

    A batch whose worker died ``retries`` + 1 times is dropped, not fatal (``tolerate``: True, or
    at most that many such batches, False for none): the caller reconciles
    the keys that reached no part file (pipeline/dag/runner.py). ``upto`` ends the DAG after that stage
    (decode, infer, crf), which is how the runner learns where an input kills its worker."""
    resources = dag.resources
    per_block = keys_per_block(len(inputs), dag.config.compute.batch_size, max_blocks)
    blocks = math.ceil(len(inputs) / per_block)
    stage = _Stage(dag=dag, blocks=blocks, fault_tolerance=_fault_tolerance(retries))
    ds = _keys(inputs, per_block, resources, tolerate)
    # The compute stages isolate the inputs that kill their worker themselves (pipeline/rows/flight.py),
    # each named by its first step; the writer publishes files named by its batch's keys, so a retried
    # write must hold the same keys, and is not split.
    decodes = upto == "decode" or not resources.decode_fused  # the runner probes decoding on its own
    if decodes:
        ds = map_batches(ds, isolating(Decoder, "decode"), stage.decode(inputs))
    if upto == "decode":
        return ds
    ds = map_batches(ds, isolating(Segmenter, "infer" if decodes else "decode"), stage.infer(inputs))
    if upto == "infer":
        return ds
    if resources.crf_actors is not None:
        ds = map_batches(ds, isolating(CRFRefiner, "crf"), stage.crf(len(inputs)))
    if upto == "crf":
        return ds
    if resources.rows_apart:
        ds = map_batches(ds, result_table, stage.rows())
    # Workers write: each call publishes one part file of up to --rows-per-file rows.
    return map_batches(ds, PartWriter, stage.write())


def dataset_stats(ds: ray.data.Dataset) -> list[dict]:
    """Ray Data's statistics of each stage of an executed ``ds``: tasks, blocks and rows out, the
    stage's wall time, and its tasks' summed wall and CPU seconds."""

    def total(summary, digits: int = 3):
        return round(summary.sum, digits) if summary is not None else None

    return [
        {
            "stage": op.operator_name,
            "tasks": op.task_rows.count if op.task_rows is not None else None,
            "rows_per_task_max": op.task_rows.max if op.task_rows is not None else None,
            "blocks": op.output_num_rows.count if op.output_num_rows is not None else None,
            "rows": op.output_num_rows.sum if op.output_num_rows is not None else None,
            "wall_s": round(op.time_total_s, 3),
            "task_wall_s": total(op.wall_time),
            "task_cpu_s": total(op.cpu_time),
        }
        for op in _operators(ds.get_stats_summary())
    ]


def _operators(summary) -> list:
    """Every operator's summary in DAG order: Ray Data keeps the earlier ones in the parents."""
    return [op for parent in summary.parents for op in _operators(parent)] + list(summary.operators_stats)


def map_batches(ds: ray.data.Dataset, fn, options: dict) -> ray.data.Dataset:
    """``ds.map_batches(fn, **options)``. Ray 2.60's map_batches names no parameter for an actor's
    max_restarts / max_task_retries, only ``**ray_remote_args``, deprecated for removal in 2.64:
    pyproject.toml pins ray below that, so its warning says nothing new and is not printed."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args. is deprecated", category=RayDeprecationWarning)
        return ds.map_batches(fn, **options)


def _keys(inputs: Inputs, step: int, resources: Resources, tolerate: bool | int) -> ray.data.Dataset:
    """The listed keys in blocks of ``step``, with the run's object-store budget, error tolerance,
    no-progress timeout and actor start-up retries."""
    keys = pa.table({"key": inputs.keys})
    # from_blocks, not from_arrow: the driver knows each block's size, and from_arrow would ask a
    # remote task per block and wait, on a worker that must start first (benchmarks/ceiling.py).
    ds = ray.data.from_blocks([keys.slice(i, step) for i in range(0, keys.num_rows, step)])
    # Every later stage's Dataset copies this context, so the budget covers the whole DAG.
    limits = ds.context.execution_options.resource_limits
    ds.context.execution_options.resource_limits = limits.copy(object_store_memory=resources.object_store_mib * 2**20)
    ds.context.max_errored_blocks = -1 if tolerate is True else int(tolerate)
    ds.context.execution_no_progress_timeout_s = NO_PROGRESS_TIMEOUT_S
    ds.context.actor_init_retry_on_errors = True
    ds.context.actor_init_max_retries = ACTOR_INIT_RETRIES
    ds.context.max_consecutive_actor_init_deaths = ACTOR_INIT_DEATHS if tolerate else 0
    # Ray Data's per-task USS sampling (a thread reading /proc/self/smaps every second) only feeds
    # its own memory statistics, and costs each inference call CPU (benchmarks/ceiling.py).
    ds.context.memory_usage_poll_interval_s = None
    return ds


@dataclass(frozen=True, kw_only=True)
class _Stage:
    """Each stage's ``map_batches`` arguments: its callable's spec, batch size and resources."""

    dag: DagSpec
    blocks: int
    fault_tolerance: dict

    def decoder(self, inputs: Inputs) -> DecodeSpec:
        """The ``Decoder``'s spec (its own pool's, or the fused inference actor's)."""
        config = self.dag.config
        # Tiled inference bounds network memory, so the pixel guard only applies to whole-image runs.
        max_pixels = None if config.inference.tile else config.inference.max_pixels
        return DecodeSpec(
            locator=inputs.locator(),
            storage_options=config.storage_options,
            num_classes=self.dag.weights.num_classes,
            max_pixels=max_pixels,
        )

    def decode(self, inputs: Inputs) -> dict:
        compute = self.dag.config.compute
        return dict(
            fn_constructor_kwargs={"spec": self.decoder(inputs)},
            batch_size=compute.batch_size,
            num_cpus=compute.decode_cpus,
            compute=ray.data.ActorPoolStrategy(
                min_size=1, max_size=max(1, capped(self.dag.resources.decode_actors, self.blocks)[1])
            ),
            **self.fault_tolerance,
        )

    def infer(self, inputs: Inputs) -> dict:
        config, resources = self.dag.config, self.dag.resources
        # A small run has fewer batches than the pool has actors: don't start (and load the model on)
        # actors that would get no batch.
        infer_min, infer_max = capped(resources.infer_actors, self.blocks)
        spec = InferSpec(
            weights=self.dag.weights,
            inference=config.inference,
            storage_options=config.storage_options,
            run_id=config.run_id,
            use_gpu=resources.use_gpu,
            threads=resources.infer_threads,
            actor_memory_mib=config.compute.actor_memory_mib,
            crf_follows=resources.crf_actors is not None,
            rows_follow=resources.rows_apart,
            crf=config.crf if resources.crf_fused else None,
            crf_backend=resources.crf_backend or "pydensecrf",
            decode=self.decoder(inputs) if resources.decode_fused else None,
        )
        return dict(
            # A reference, not the bytes: the constructor's arguments stay small (ray-project/ray#53727).
            fn_constructor_kwargs={"spec": spec, "weights_data": self.dag.weights_data},
            batch_size=config.compute.batch_size,
            compute=ray.data.ActorPoolStrategy(min_size=infer_min, max_size=infer_max),
            num_gpus=1 if resources.use_gpu else 0,
            num_cpus=resources.infer_cpus,
            resources=config.compute.infer_resources or None,
            **self.fault_tolerance,
        )

    def rows(self) -> dict:
        """Result rows as Ray Data tasks: stateless CPU work that Ray Data spreads over every core free."""
        config, weights = self.dag.config, self.dag.weights
        return dict(
            fn_kwargs={
                "num_classes": weights.num_classes,
                "model": weights.model,
                "weights_sha256": weights.sha256 or "",
                "run_id": config.run_id,
            },
            batch_size=config.compute.batch_size,
            num_cpus=1,
            max_retries=self.fault_tolerance.get("max_task_retries", TASK_RETRIES),
        )

    def crf(self, images: int) -> dict:
        config, pool = self.dag.config, self.dag.resources.crf_actors
        assert config.crf is not None and pool is not None, "a CRF pool runs only with the CRF on"
        spec = CRFSpec(
            params=config.crf,
            weights=self.dag.weights,
            run_id=config.run_id,
            probs_encoding=config.inference.probs_encoding,
            actor_memory_mib=config.compute.actor_memory_mib,
        )
        least, most = capped(pool, images)
        return dict(
            fn_constructor_kwargs={"spec": spec},
            batch_size=1,  # one image per call keeps CRF actors evenly loaded
            compute=ray.data.ActorPoolStrategy(min_size=least, max_size=most),
            num_cpus=config.compute.crf_cpus,
            resources=config.compute.crf_resources or None,
            **self.fault_tolerance,
        )

    def write(self) -> dict:
        config = self.dag.config
        spec = WriteSpec(
            run_uri=self.dag.run_uri, storage_options=config.storage_options, num_classes=self.dag.weights.num_classes
        )
        return dict(
            fn_constructor_kwargs={"spec": spec},
            batch_size=config.rows_per_file,
            batch_format="pyarrow",
            num_cpus=WRITER_CPUS,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=self.dag.resources.write_actors),
            **self.fault_tolerance,
        )
