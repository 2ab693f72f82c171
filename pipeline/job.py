"""One run of the job: check and list before any work, run the DAG, commit, report (the CLI is
``pipeline/cli.py``)."""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NamedTuple

from pipeline.config.sections import JobConfig
from pipeline.dag.cluster import cluster_autoscales, cluster_ceiling, cluster_nodes, init_ray
from pipeline.dag.incremental import dry_run_carry, incremental_night
from pipeline.dag.runner import run_dag
from pipeline.evaluation.compare_text import format_comparison, regression_message
from pipeline.io.credentials import public_text, public_uri
from pipeline.io.storage import InputError, Inputs, list_inputs
from pipeline.models import default_weights
from pipeline.models.weights import Weights, WeightsError, read_verified
from pipeline.observability import RunMetrics, push_summary
from pipeline.outputs.carry import fingerprint, listing_table
from pipeline.outputs.console import describe, print_summary
from pipeline.outputs.manifest import RunFacts, build_manifest
from pipeline.outputs.run import LISTING, Earlier, OutputError, RunOutput, RunSummary, committed_runs, run_before

if TYPE_CHECKING:  # the DAG's modules (torch) load on the prepare thread, not at import
    from pipeline.dag.stages import Resources

# What a user can fix (a bad URI, run folder or checkpoint): exit 2 with the message, no traceback.
JOB_ERRORS = (InputError, OutputError, WeightsError)


class WeightsRead(NamedTuple):
    """The checked weights record (its ``sha256`` the file's) and the checkpoint's bytes."""

    weights: Weights
    data: bytes


def resolve_weights(config: JobConfig) -> Weights:
    """``read_weights`` without the bytes."""
    return read_weights(config).weights


def read_weights(config: JobConfig) -> WeightsRead:
    """Check the weights on the driver, so bad weights fail before any work, and keep the bytes the
    inference actors will load (handed to them through the object store, not read once per actor
    and per restart): a checkpoint of one's own is loaded into the model once; a published weight
    set (no --weights) is its record's file when the checksum matches, and its layout is its
    builder's (tests/test_models.py), so the driver only reads and hashes it and starts Ray
    without building the model."""
    if config.weights_uri is None:
        return _published(config)
    from pipeline.inference.multiscale import load_model

    data, digest = read_verified(config.weights_uri, storage_options=config.storage_options)
    loaded = load_model(
        config.model,
        config.weights_uri,
        storage_options=config.storage_options,
        output_stride=config.inference.output_stride,
        num_classes=config.num_classes,
        expected_sha256=digest,
        data=data,
    )
    weights = Weights(model=config.model, uri=config.weights_uri, sha256=loaded.sha256, categories=loaded.categories)
    return WeightsRead(weights, data)


def _published(config: JobConfig) -> WeightsRead:
    record = default_weights(config.model)
    if config.num_classes not in (None, record.num_classes):
        raise WeightsError(
            f"the published weights of {config.model} have {record.num_classes} classes, not "
            f"{config.num_classes} (--num-classes); pass --weights for a checkpoint with {config.num_classes}"
        )
    data, sha256 = read_verified(record.uri, expected_sha256=record.sha256, storage_options=config.storage_options)
    return WeightsRead(replace(record, sha256=sha256), data)


@dataclass(frozen=True, kw_only=True)
class Prepared:
    """What the driver checks and reads before any work (``_prepare``)."""

    weights: Weights  # checked; its sha256 is the file's
    weights_data: bytes  # the checkpoint, for the object store
    inputs: Inputs
    output: RunOutput
    earlier: Earlier  # what the run folder holds already (--resume)


def _prepare(config: JobConfig) -> Prepared:
    """What the driver checks and reads before any work: weights, the inputs, the run folder."""
    weights, data = read_weights(config)
    inputs = list_inputs(
        config.input_uri, config.labels_uri, storage_options=config.storage_options, limit=config.limit
    )
    output = RunOutput(config.output_uri, config.run_id, config.storage_options)
    earlier = output.prepare(
        resume=config.resume, overwrite=config.overwrite, num_classes=weights.num_classes, dry_run=config.dry_run
    )
    import pipeline.dag.stages  # noqa: F401  (the DAG's modules and torch, loaded while Ray starts on the other thread)

    return Prepared(weights=weights, weights_data=data, inputs=inputs, output=output, earlier=earlier)


def _start(config: JobConfig) -> Prepared:
    """``_prepare`` in a thread while Ray starts (seconds of subprocesses) on this one; a bad
    checkpoint or URI still fails before any image is read, and leaves no Ray behind it started."""
    import ray  # before the thread starts: the two threads then import disjoint packages

    connected = ray.is_initialized()
    with ThreadPoolExecutor(1, thread_name_prefix="deeplab-prepare") as pool:
        prepared = pool.submit(_prepare, config)
        try:
            init_ray(config.ray_address)
            return prepared.result()
        except BaseException:
            if not connected and ray.is_initialized():
                ray.shutdown()  # a bad flag or URI leaves no Ray behind in a process that goes on (tests, notebooks)
            raise


def _comparison(config: JobConfig, output: RunOutput):
    """The comparison with the previous committed run to make at commit time, or None."""
    if not config.compare_previous:
        return None
    previous_id = run_before(committed_runs(config.output_uri, config.storage_options), config.run_id)
    if previous_id is None:
        shown = public_uri(config.output_uri)
        print(f"[deeplab-pipeline] no earlier committed run under {shown} to compare with", flush=True)
        return None
    from pipeline.dag.compare import compare_outputs

    previous = RunOutput(config.output_uri, previous_id, config.storage_options)
    return lambda: compare_outputs(previous, output)


def _push(config: JobConfig, stats, summary: RunSummary) -> None:
    assert config.pushgateway, "pushed only when a gateway is set"
    comparison = summary.comparison
    metrics = RunMetrics(
        run_id=config.run_id,
        outcomes=stats.outcomes,
        histograms=stats.histograms,
        miou=summary.post.miou,
        miou_pre_crf=summary.pre.miou if summary.pre else None,
        images=summary.images,
        errors=summary.errors,
        against=comparison.against if comparison else None,
        miou_delta=comparison.miou_delta if comparison else None,
        changed_images=comparison.changed_images if comparison else None,
    )
    try:
        push_summary(config.pushgateway, metrics)
    except Exception as exc:  # the run is committed; a monitoring outage must not turn it red
        shown = f"{public_uri(config.pushgateway)}: {public_text(str(exc), [config.pushgateway])}"
        print(f"[deeplab-pipeline] warning: could not push to {shown}", file=sys.stderr)


@dataclass(frozen=True, kw_only=True)
class Planned:
    """What the driver knows before any work (``_planned``): what it prepared, the inputs left to
    segment, the resolved resources and the plan as data."""

    prepared: Prepared
    todo: Inputs
    resources: Resources
    plan: dict


def _planned(config: JobConfig) -> Planned:
    """Everything before the work: checks, listing, what is done already, the resource plan."""
    prepared = _start(config)
    from pipeline.dag.stages import Resources, plan  # already imported by _prepare

    inputs, output = prepared.inputs, prepared.output
    todo = inputs.without(prepared.earlier.keys)
    print(
        f"[deeplab-pipeline] {len(inputs)} inputs under {public_uri(config.input_uri)}; "
        f"{len(prepared.earlier.keys)} already done; {len(todo)} to segment → {public_uri(output.uri)}",
        flush=True,
    )
    resources = Resources.resolve(config, cluster_nodes(), ceiling=cluster_ceiling(), grows=cluster_autoscales())
    print(f"[deeplab-pipeline] {describe(resources)}", flush=True)
    planned = plan(config, resources, inputs=len(inputs), todo=len(todo))
    return Planned(prepared=prepared, todo=todo, resources=resources, plan=planned)


def dry_run(config: JobConfig) -> dict:
    """--dry-run: the checks and the plan of ``run``, printed as the last line of stdout; writes nothing.
    With --incremental the plan's "incremental" is the base run (or why there is none) and how many
    inputs the night would carry and segment, decided as the night decides it (``choose``)."""
    planned = _planned(config)
    shown = planned.plan
    if config.incremental:
        listing = listing_table(planned.prepared.inputs)
        fp = fingerprint(config, planned.prepared.weights, planned.resources)
        shown = shown | {"incremental": dry_run_carry(config, todo=planned.todo, listing=listing, fp=fp)}
    print(json.dumps(shown, sort_keys=True), flush=True)
    return shown


def run(config: JobConfig) -> RunSummary:
    """Segment what ``config`` names that the run does not hold yet, then commit and report."""
    import ray

    started = time.time()
    planned = _planned(config)
    prepared, resources = planned.prepared, planned.resources
    weights, inputs, output = prepared.weights, prepared.inputs, prepared.output
    weights_ref = ray.put(prepared.weights_data)  # once per run; every inference actor (and restart) reads it
    from pipeline.dag.commit import commit
    from pipeline.dag.stages import DagSpec, build_dataset, dataset_stats  # already imported by _prepare

    run_started = time.time()
    todo, stats, processed = planned.todo, prepared.earlier.stats, 0

    built = []  # the datasets run, for Ray Data's per-stage statistics in manifest.json

    def build(inputs, *, batch_size: int | None = None, **options):
        # The isolation passes (pipeline/dag/runner.py) run the same DAG with one input per batch.
        same = config if batch_size is None else replace(config, compute=replace(config.compute, batch_size=batch_size))
        dag = DagSpec(
            config=same, weights=weights, resources=resources, run_uri=output.full_uri(), weights_data=weights_ref
        )
        built.append(build_dataset(dag, inputs, **options))
        return built[-1]

    # --- incremental nights (issue 30): listing.parquet and the fingerprint (every run, so any
    # committed run can be a base), then the carry stage before segmenting what is left.
    listing, fp = listing_table(inputs), fingerprint(config, weights, resources)
    if not (config.resume and output.has(LISTING)):  # a resumed run keeps the listing it started from
        output.write_listing(listing)
    incremental = {"base_run": None, "reason": "not asked for (--incremental)"}
    if config.incremental:
        night = incremental_night(
            config,
            todo=todo,
            listing=listing,
            fp=fp,
            output=output,
            num_classes=weights.num_classes,
            writers=resources.write_actors,
        )
        todo, incremental = night.todo, night.manifest
        stats += night.carried
    # --- end incremental
    if len(todo):
        new, processed = run_dag(todo, build, output, weights.num_classes, run_id=config.run_id)
        stats += new
    run_seconds = time.time() - run_started
    facts = RunFacts(
        started=started,
        run_seconds=run_seconds,
        processed=processed,
        cluster=ray.cluster_resources(),
        finished=time.time(),
        plan=planned.plan,
        ray_data=dataset_stats(built[0]) if built else None,
    )
    manifest = build_manifest(config, weights, resources, stats, facts)
    manifest |= {"fingerprint": fp, "incremental": incremental}  # issue 30: what the next night compares
    summary = commit(output, stats, weights.categories, manifest, compare=_comparison(config, output))
    if config.pushgateway:
        _push(config, stats, summary)
    print_summary(summary, weights.categories, public_uri(output.uri), run_seconds, processed)
    if summary.comparison is not None:
        print(format_comparison(summary.comparison))
    return summary


def regression_exit(config: JobConfig, summary: RunSummary) -> int:
    """3 when --fail-on-regression is set and the comparison found a regression beyond it, else 0."""
    if config.fail_on_regression is not None and summary.comparison is not None:
        reason = regression_message(summary.comparison, config.fail_on_regression)
        if reason:  # the run is committed; the exit code is the nightly's alarm
            print(f"segment_bucket.py: {reason}", file=sys.stderr)
            return 3
    return 0
