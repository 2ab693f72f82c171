"""One run of the job: check and list before any work, run the DAG, commit, report (the CLI is
``pipeline/cli.py``)."""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from pipeline.cluster import cluster_nodes, init_ray
from pipeline.compare_text import format_comparison, regression_message
from pipeline.config import JobConfig
from pipeline.console import describe, print_summary
from pipeline.manifest import build_manifest
from pipeline.observability import push_summary
from pipeline.outputs import OutputError, RunOutput, RunSummary, committed_runs, run_before
from pipeline.runner import run_dag
from pipeline.storage import InputError, list_inputs
from pipeline.weights import Weights, WeightsError, default_weights, read_verified

# What a user can fix (a bad URI, run folder or checkpoint): exit 2 with the message, no traceback.
JOB_ERRORS = (InputError, OutputError, WeightsError)


def resolve_weights(config: JobConfig) -> tuple[Weights, str]:
    """Check the weights on the driver, so bad weights fail before any work: a checkpoint of one's
    own is loaded into the model once; a published weight set (no --weights) is its record's file
    when the checksum matches, and its layout is its builder's (tests/test_models.py), so the
    driver only reads and hashes it and starts Ray without building the model."""
    if config.weights_uri is None:
        return _published(config)
    from pipeline.inference import load_model

    model, sha256, categories = load_model(
        config.model,
        config.weights_uri,
        storage_options=config.storage_options,
        output_stride=config.inference.output_stride,
        num_classes=config.num_classes,
    )
    del model
    base = Weights(model=config.model, uri=config.weights_uri, sha256=sha256, categories=categories)
    return base, sha256


def _published(config: JobConfig) -> tuple[Weights, str]:
    record = default_weights(config.model)
    if config.num_classes not in (None, record.num_classes):
        raise WeightsError(
            f"the published weights of {config.model} have {record.num_classes} classes, not "
            f"{config.num_classes} (--num-classes); pass --weights for a checkpoint with {config.num_classes}"
        )
    _, sha256 = read_verified(record.uri, expected_sha256=record.sha256, storage_options=config.storage_options)
    return replace(record, sha256=sha256), sha256


def _prepare(config: JobConfig):
    """What the driver checks and reads before any work: weights, the inputs, the run folder."""
    weights, sha256 = resolve_weights(config)
    inputs = list_inputs(
        config.input_uri, config.labels_uri, storage_options=config.storage_options, limit=config.limit
    )
    output = RunOutput(config.output_uri, config.run_id, config.storage_options)
    earlier = output.prepare(resume=config.resume, overwrite=config.overwrite, num_classes=weights.num_classes)
    import pipeline.stages  # noqa: F401  (the DAG's modules and torch, loaded while Ray starts on the other thread)

    return weights, sha256, inputs, output, earlier


def _start(config: JobConfig):
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
        print(f"[deeplab-pipeline] no earlier committed run under {config.output_uri} to compare with", flush=True)
        return None
    from pipeline.compare_stage import compare_outputs

    previous = RunOutput(config.output_uri, previous_id, config.storage_options)
    return lambda: compare_outputs(previous, output)


def _push(config: JobConfig, stats, summary: RunSummary) -> None:
    assert config.pushgateway, "pushed only when a gateway is set"
    comparison = summary.comparison
    try:
        push_summary(
            config.pushgateway,
            outcomes=stats.outcomes,
            histograms=stats.histograms,
            run_id=config.run_id,
            miou=summary.post.miou,
            miou_pre_crf=summary.pre.miou if summary.pre else None,
            images=summary.images,
            errors=summary.errors,
            against=comparison.against if comparison else None,
            miou_delta=comparison.miou_delta if comparison else None,
            changed_images=comparison.changed_images if comparison else None,
        )
    except Exception as exc:  # the run is committed; a monitoring outage must not turn it red
        print(f"[deeplab-pipeline] warning: could not push to {config.pushgateway}: {exc}", file=sys.stderr)


def run(config: JobConfig) -> RunSummary:
    """Segment what ``config`` names that the run does not hold yet, then commit and report."""
    import ray

    started = time.time()
    weights, sha256, inputs, output, earlier = _start(config)
    from pipeline.stages import Resources, build_dataset  # already imported by _prepare

    todo = inputs.without(earlier.keys)
    print(
        f"[deeplab-pipeline] {len(inputs)} inputs under {config.input_uri}; {len(earlier.keys)} already done; "
        f"{len(todo)} to segment → {output.uri}",
        flush=True,
    )
    resources = Resources.resolve(config, cluster_nodes())
    print(f"[deeplab-pipeline] {describe(resources)}", flush=True)
    run_started = time.time()
    stats, processed = earlier.stats, 0

    def build(inputs, *, batch_size: int | None = None, **options):
        # The isolation passes (pipeline/runner.py) run the same DAG with one input per batch.
        same = config if batch_size is None else replace(config, compute=replace(config.compute, batch_size=batch_size))
        return build_dataset(inputs, same, weights, sha256, resources, output.full_uri(), **options)

    if len(todo):
        new, processed = run_dag(todo, build, output, weights.num_classes, run_id=config.run_id)
        stats += new
    run_seconds = time.time() - run_started
    manifest = build_manifest(
        config,
        weights,
        sha256,
        resources,
        stats,
        ray.cluster_resources(),
        started=started,
        run_seconds=run_seconds,
        processed=processed,
        finished=time.time(),
    )
    summary = output.commit(
        stats, weights.categories, manifest, locator=inputs.locator(), compare=_comparison(config, output)
    )
    if config.pushgateway:
        _push(config, stats, summary)
    print_summary(summary, weights.categories, output.uri, run_seconds, processed)
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
