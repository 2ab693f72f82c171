"""``segment-bucket``: segment every image under a URI with DeepLab (+dense CRF) on Ray Data.

Run with no arguments for the embedded demo (local Ray, bundled bucket and checkpoint).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from importlib import metadata
from pathlib import Path

from pipeline.config import CRF_BACKENDS, ComputeConfig, CRFParams, InferenceConfig, JobConfig, credential_options
from pipeline.flags import json_object, parse_range, parse_scales
from pipeline.models import DEFAULT_MODEL, MODEL_BUILDERS
from pipeline.compare import format_comparison, regression_message, run_before
from pipeline.observability import push_summary
from pipeline.outputs import OutputError, RunOutput, RunSummary, committed_runs
from pipeline.runner import SystemicFailure, run_dag
from pipeline.storage import InputError, list_inputs
from pipeline.weights import Weights, WeightsError, default_weights

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_BUCKET = ASSETS / "demo_bucket"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ones: their help says what happens when the option is unset."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    crf = CRFParams()
    compute = ComputeConfig()
    inference = InferenceConfig()
    p = argparse.ArgumentParser(
        prog="segment_bucket.py",
        description=__doc__,
        formatter_class=_HelpFormatter,
        epilog="Outputs: OUTPUT/run=<run_id>/{masks/,errors/,classes.parquet,manifest.json,_SUCCESS}. "
               "Credentials come from the standard AWS/GCS environment and are never printed.",
    )
    p.add_argument("input", nargs="?", metavar="INPUT_URI",
                   help="images to segment: any fsspec URI or path, listed recursively (default: the bundled demo bucket)")
    p.add_argument("--output", metavar="URI", help="where run=<run_id>/ is written (default for the demo: ./outputs)")
    p.add_argument("--labels", metavar="URI", help="label PNGs paired by key (extension → .png); 255 = ignore")
    io_ = p.add_argument_group("model")
    io_.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(MODEL_BUILDERS), help="model architecture")
    io_.add_argument("--weights", metavar="URI", help="checkpoint URI (safetensors or torch), optionally "
                     "'URI#sha256=<hex>' (default: the model's published weights; the bundled "
                     "checkpoint for deeplabv3plus_demo)")
    io_.add_argument("--num-classes", type=int, help="classes in the checkpoint (default: read from the checkpoint)")
    inf = p.add_argument_group("inference")
    inf.add_argument("--scales", type=parse_scales, default=(1.0,),
                     help="comma-separated input scales, e.g. 0.5,0.75,1.0,1.25,1.5,1.75 (DeepLab's eval set)")
    inf.add_argument("--flip", action=argparse.BooleanOptionalAction, default=False,
                     help="also run horizontally flipped inputs and average")
    inf.add_argument("--output-stride", type=int, choices=(8, 16), help="backbone output stride (default: model's)")
    inf.add_argument("--average", choices=("probs", "logits"), default=inference.average,
                     help="average softmax probabilities (DeepLab v3) or logits over scales/flips")
    inf.add_argument("--tile", type=int, metavar="PIXELS",
                     help="sliding-window inference on PIXELS x PIXELS tiles (very large images, fixed memory)")
    inf.add_argument("--tile-overlap", type=int, default=inference.tile_overlap, metavar="PIXELS",
                     help="overlap between neighbouring tiles")
    inf.add_argument("--max-pixels", type=int, default=inference.max_pixels,
                     help="images declaring more pixels become error rows before decoding, unless --tile")
    inf.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default=inference.precision,
                     help="autocast precision for GPU inference (CPU runs fp32)")
    inf.add_argument("--batching", choices=("bucket", "pad"), default=inference.batching,
                     help="bucket: batch same-size images (exact); pad: zero-pad a batch to its largest image")
    inf.add_argument("--max-batch-pixels", type=int, default=inference.max_batch_pixels, metavar="PIXELS",
                     help="at most this many (padded) pixels per forward pass; a batch runs as several if needed")
    inf.add_argument("--probs-encoding", choices=("float32", "float16", "uint8"), default=inference.probs_encoding,
                     help="precision of the probabilities sent to the CRF stage")
    inf.add_argument("--low-conf-threshold", type=float, default=inference.low_conf_threshold,
                     help="pixels whose top-class probability is below this count as low-confidence")
    c = p.add_argument_group("dense CRF (defaults: DeepLab v2's published values)")
    c.add_argument("--crf", action=argparse.BooleanOptionalAction, default=True, help="refine masks with dense CRF")
    c.add_argument("--crf-backend", choices=CRF_BACKENDS, default=compute.crf_backend,
                   help="pydensecrf (CPU) or torch (pipeline/crf_torch.py: the same labels, on the inference device); "
                        "auto: torch inside the GPU inference actors when inference runs on GPUs (no CPU CRF pool), "
                        "else pydensecrf, the faster one on a CPU core")
    c.add_argument("--crf-iterations", type=int, default=crf.iterations, help="mean-field iterations")
    c.add_argument("--crf-gaussian-sxy", type=float, default=crf.gaussian_sxy, help="smoothness kernel θγ (pixels)")
    c.add_argument("--crf-gaussian-compat", type=float, default=crf.gaussian_compat, help="smoothness weight w2")
    c.add_argument("--crf-bilateral-sxy", type=float, default=crf.bilateral_sxy, help="appearance kernel θα (pixels)")
    c.add_argument("--crf-bilateral-srgb", type=float, default=crf.bilateral_srgb, help="appearance kernel θβ (colour)")
    c.add_argument("--crf-bilateral-compat", type=float, default=crf.bilateral_compat, help="appearance weight w1")
    c.add_argument("--crf-max-pixels", type=int, default=crf.max_pixels, metavar="PIXELS",
                   help="refine larger images at a reduced resolution (masks.crf_scale), which bounds CRF "
                        "seconds per image; 0: no limit")
    r = p.add_argument_group("compute")
    r.add_argument("--infer-actors", type=parse_range, default=compute.infer_actors, metavar="MIN-MAX",
                   help="inference actor pool size; a range lets Ray autoscale it (default: one per GPU in "
                        "the cluster, or without GPUs one single-threaded actor per core left after CRF)")
    r.add_argument("--crf-actors", type=parse_range, default=compute.crf_actors, metavar="MIN-MAX",
                   help="CPU CRF actor pool size on GPU clusters (asking for it makes --crf-backend auto "
                        "pydensecrf; default: 1 up to every CPU the inference actors leave on the nodes that "
                        "may run it; without GPUs or with --crf-backend torch the CRF runs in the inference actors)")
    r.add_argument("--batch-size", type=int, default=compute.batch_size,
                   help="images per Ray batch (larger amortises Ray's per-batch cost; --max-batch-pixels bounds memory)")
    r.add_argument("--infer-cpus", type=float, help="CPUs (= torch threads) per inference actor (default: 1 with GPUs, "
                   "else the cores left after the CRF pool divided between the actors)")
    r.add_argument("--crf-cpus", type=float, default=compute.crf_cpus, help="CPUs per CRF actor")
    r.add_argument("--infer-resources", type=json_object, default={}, metavar="JSON",
                   help="custom Ray resources each inference actor needs, e.g. '{\"gpu_node\": 1}'")
    r.add_argument("--crf-resources", type=json_object, default={}, metavar="JSON",
                   help="custom Ray resources each CRF actor needs, e.g. '{\"crf_node\": 1}'")
    r.add_argument("--object-store-mib", type=int, metavar="MIB",
                   help="object-store memory Ray Data may fill with blocks in flight (default: 256 per GPU "
                        "inference actor, 64 per CPU inference or CRF actor)")
    r.add_argument("--actor-memory-mib", type=int, default=compute.actor_memory_mib, metavar="MIB",
                   help="memory each inference and CRF actor may use: an image that would exceed it runs tiled "
                        "(masks.infer_tile) and its CRF at a reduced resolution (masks.crf_scale); 0: no budget")
    r.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="run inference on GPUs (default: when the cluster has GPUs)")
    r.add_argument("--ray-address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    run = p.add_argument_group("run")
    run.add_argument("--run-id", help="run partition name (default: UTC timestamp like 2026-11-24T02-00-00Z)")
    run.add_argument("--resume", action="store_true", help="continue run --run-id: skip keys it already holds")
    run.add_argument("--overwrite", action="store_true", help="replace an existing run with the same id")
    run.add_argument("--limit", type=int, help="segment at most N images (after sorting keys)")
    run.add_argument("--rows-per-file", type=int, default=JobConfig.rows_per_file, metavar="N",
                     help="rows per part file, written by the workers as they finish them; a killed run "
                          "loses at most the part files in flight")
    run.add_argument("--pushgateway", metavar="URL", help="push the run summary to this Prometheus Pushgateway")
    run.add_argument("--compare-previous", action="store_true",
                     help="compare with the previous committed run under --output: comparison*.parquet and "
                          "comparison.json in this run, a report section, a printed table (docs/uncertainty.md)")
    run.add_argument("--fail-on-regression", type=float, metavar="DELTA",
                     help="with --compare-previous: exit 3 after committing when the mIoU or any class IoU "
                          "dropped by more than DELTA (e.g. 0.02)")
    run.add_argument("--storage-options", type=json_object, default={}, metavar="JSON",
                     help="fsspec storage options, e.g. '{\"endpoint_url\": \"http://127.0.0.1:9000\"}'")
    return p


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> JobConfig:
    demo = args.input is None
    if not demo and not args.output:
        parser.error("--output is required when INPUT_URI is given")
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other")
    if args.resume and not args.run_id:
        parser.error("--resume needs the --run-id of the run to continue")
    if credential_options(args.storage_options):
        parser.error(f"--storage-options must not carry credentials ({', '.join(credential_options(args.storage_options))}): "
                     "the command line is visible to `ps` and Ray records it as the job's entrypoint; set "
                     "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (e.g. from a Kubernetes Secret) or use a credentials file")
    if args.fail_on_regression is not None and not args.compare_previous:
        parser.error("--fail-on-regression needs --compare-previous")
    if args.fail_on_regression is not None and args.fail_on_regression < 0:
        parser.error(f"--fail-on-regression must be >= 0, got {args.fail_on_regression}")
    try:
        crf = CRFParams(iterations=args.crf_iterations, gaussian_sxy=args.crf_gaussian_sxy,
                        gaussian_compat=args.crf_gaussian_compat, bilateral_sxy=args.crf_bilateral_sxy,
                        bilateral_srgb=args.crf_bilateral_srgb, bilateral_compat=args.crf_bilateral_compat,
                        max_pixels=args.crf_max_pixels)
        return JobConfig(
            input_uri=str(DEMO_BUCKET / "images") if demo else args.input,
            output_uri=args.output or "outputs",
            labels_uri=args.labels or (str(DEMO_BUCKET / "labels") if demo else None),
            model=args.model,
            weights_uri=args.weights,
            run_id=args.run_id or dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H-%M-%SZ"),
            inference=InferenceConfig(
                scales=args.scales, flip=args.flip, output_stride=args.output_stride, average=args.average,
                tile=args.tile, tile_overlap=args.tile_overlap, max_pixels=args.max_pixels,
                precision=args.precision, batching=args.batching, max_batch_pixels=args.max_batch_pixels,
                probs_encoding=args.probs_encoding,
                low_conf_threshold=args.low_conf_threshold),
            crf=crf if args.crf else None,
            compute=ComputeConfig(infer_actors=args.infer_actors, crf_actors=args.crf_actors, batch_size=args.batch_size,
                                  infer_cpus=args.infer_cpus, crf_cpus=args.crf_cpus, use_gpu=args.gpu,
                                  object_store_mib=args.object_store_mib, actor_memory_mib=args.actor_memory_mib,
                                  infer_resources=args.infer_resources, crf_resources=args.crf_resources,
                                  crf_backend=args.crf_backend),
            num_classes=args.num_classes,
            limit=args.limit,
            resume=args.resume,
            overwrite=args.overwrite,
            storage_options=args.storage_options,
            rows_per_file=args.rows_per_file,
            pushgateway=args.pushgateway,
            compare_previous=args.compare_previous,
            fail_on_regression=args.fail_on_regression,
        )
    except ValueError as exc:
        parser.error(str(exc))


def resolve_weights(config: JobConfig) -> tuple[Weights, str]:
    """Load the checkpoint into the model once on the driver, so bad weights fail before any work."""
    from pipeline.inference import load_model

    model, sha256, categories = load_model(config.model, config.weights_uri, storage_options=config.storage_options,
                                           output_stride=config.inference.output_stride,
                                           num_classes=config.num_classes)
    del model
    base = default_weights(config.model) if config.weights_uri is None else Weights(
        model=config.model, uri=config.weights_uri, sha256=sha256, categories=categories)
    return replace(base, categories=categories, sha256=sha256), sha256


def init_ray(address: str | None) -> None:
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
    else:
        # A local head for the embedded run; token auth would need a shared secret nobody set up.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(include_dashboard=False)


def _versions() -> dict[str, str]:
    out = {}
    for name in ("ray", "torch", "torchvision", "timm", "pyarrow", "fsspec", "s3fs", "pydensecrf2", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    from pipeline import __version__
    out["deeplab-pipeline"] = __version__
    return out


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def print_summary(summary: RunSummary, categories: tuple[str, ...], uri: str, seconds: float, processed: int) -> None:
    print("\n=== deeplab-pipeline run summary ===")
    print(f"images segmented : {summary.images}   errors: {summary.errors}   labelled: {summary.labelled}"
          + (f"   labels not scored: {summary.label_errors} (masks.label_error)" if summary.label_errors else ""))
    if summary.tiled or summary.crf_reduced:
        print(f"memory budget    : tiled inference: {summary.tiled} (masks.infer_tile)   "
              f"reduced-resolution CRF: {summary.crf_reduced} (masks.crf_scale)")
    pre = summary.pre.miou if summary.pre else None
    print(f"mIoU             : {_fmt(summary.post.miou)} (pre-CRF {_fmt(pre)})")
    print(f"pixel accuracy   : {_fmt(summary.post.pixel_acc)} (pre-CRF {_fmt(summary.pre.pixel_acc if summary.pre else None)})")
    if summary.labelled:
        print("per-class IoU    : " + ", ".join(
            f"{name} {'n/a' if v != v else f'{v:.3f}'}" for name, v in zip(categories, summary.post.iou)))
    print(f"throughput       : {processed} inputs in {seconds:.1f}s = {processed / max(seconds, 1e-9):.2f} images/s")
    print(f"outputs          : {uri}/")
    print(f"report           : {uri}/report.html")
    print(f"query            : duckdb -c \"SELECT key, miou_pre_crf, miou FROM '{uri}/masks/*.parquet' ORDER BY miou LIMIT 5\"")


def _prepare(config: JobConfig):
    """What the driver checks and reads before any work: weights, the inputs, the run folder."""
    weights, sha256 = resolve_weights(config)
    inputs = list_inputs(config.input_uri, config.labels_uri, storage_options=config.storage_options,
                         limit=config.limit)
    output = RunOutput(config.output_uri, config.run_id, config.storage_options)
    earlier = output.prepare(resume=config.resume, overwrite=config.overwrite, num_classes=weights.num_classes)
    return weights, sha256, inputs, output, earlier


def run(config: JobConfig, *, ray_address: str | None = None) -> RunSummary:
    import ray  # before the thread starts: the two threads then import disjoint packages

    started = time.time()
    # Ray starts (seconds of subprocesses) while this process loads torch, checks the weights and
    # lists the bucket; a bad checkpoint or URI still fails before any image is read.
    connected = ray.is_initialized()
    with ThreadPoolExecutor(1, thread_name_prefix="deeplab-prepare") as pool:
        prepared = pool.submit(_prepare, config)
        try:
            init_ray(ray_address)
            weights, sha256, inputs, output, earlier = prepared.result()
        except BaseException:
            if not connected and ray.is_initialized():
                ray.shutdown()  # a bad flag or URI leaves no Ray behind in a process that goes on (tests, notebooks)
            raise
    todo = inputs.without(earlier.keys)
    print(f"[deeplab-pipeline] {len(inputs)} inputs under {config.input_uri}; {len(earlier.keys)} already done; "
          f"{len(todo)} to segment → {output.uri}", flush=True)

    from pipeline.stages import Resources, build_dataset, cluster_nodes

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
    manifest = {
        "run_id": config.run_id, "config": config.to_public_dict(), "model": config.model,
        "weights": {"uri": weights.uri.split("#")[0], "sha256": sha256},
        "categories": list(weights.categories), "versions": _versions(),
        "nodes": {stage: stats.nodes.get(stage, []) for stage in ("infer", "crf")},
        "resources": {"use_gpu": resources.use_gpu, "infer_cpus": resources.infer_cpus,
                      "infer_threads": resources.infer_threads, "infer_actors": list(resources.infer_actors),
                      "crf_actors": list(resources.crf_actors) if resources.crf_actors else None,
                      "crf_fused": resources.crf_fused, "crf_backend": resources.crf_backend,
                      "decode_actors": list(resources.decode_actors),
                      "object_store_mib": resources.object_store_mib,
                      "cluster": {k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")}},
        "timings": {"segment_s": round(run_seconds, 3), "processed": processed,
                    "images_per_s": round(processed / run_seconds, 3) if run_seconds > 0 else None,
                    "total_s": round(time.time() - started, 3)},
        "started_at": dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat(),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
    }
    compare = None
    if config.compare_previous:
        previous_id = run_before(committed_runs(config.output_uri, config.storage_options), config.run_id)
        if previous_id is None:
            print(f"[deeplab-pipeline] no earlier committed run under {config.output_uri} to compare with", flush=True)
        else:
            from pipeline.compare_stage import compare_outputs

            previous = RunOutput(config.output_uri, previous_id, config.storage_options)
            compare = lambda: compare_outputs(previous, output)  # noqa: E731
    summary = output.commit(stats, weights.categories, manifest, locator=inputs.locator(), compare=compare)
    comparison = summary.comparison
    if config.pushgateway:
        try:
            push_summary(config.pushgateway, outcomes=stats.outcomes, histograms=stats.histograms,
                         run_id=config.run_id, miou=summary.post.miou,
                         miou_pre_crf=summary.pre.miou if summary.pre else None,
                         images=summary.images, errors=summary.errors,
                         against=comparison.against if comparison else None,
                         miou_delta=comparison.miou_delta if comparison else None,
                         changed_images=comparison.changed_images if comparison else None)
        except Exception as exc:  # the run is committed; a monitoring outage must not turn it red
            print(f"[deeplab-pipeline] warning: could not push to {config.pushgateway}: {exc}", file=sys.stderr)
    print_summary(summary, weights.categories, output.uri, run_seconds, processed)
    if comparison is not None:
        print(format_comparison(comparison))
    return summary


def describe(resources) -> str:
    lo, hi = resources.infer_actors
    if resources.crf_fused:
        on_gpu = resources.use_gpu and resources.crf_backend == "torch"
        crf = f"{resources.crf_backend} in the inference actors" + (", on the GPU" if on_gpu else "")
    elif resources.crf_actors:
        crf = f"{resources.crf_backend} in {resources.crf_actors[0]}-{resources.crf_actors[1]} CPU actors"
    else:
        crf = "off"
    return (f"inference on {'GPU' if resources.use_gpu else 'CPU'}: {lo if lo == hi else f'{lo}-{hi}'} actor(s), "
            f"{resources.infer_cpus:g} CPUs/actor, {resources.infer_threads} torch threads; CRF {crf}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = config_from_args(args, parser)
    try:
        summary = run(config, ray_address=args.ray_address)
    except (InputError, OutputError, WeightsError) as exc:
        print(f"segment_bucket.py: error: {exc}", file=sys.stderr)
        return 2
    except SystemicFailure as exc:
        print(f"segment_bucket.py: error: {exc}", file=sys.stderr)
        return 1
    if config.fail_on_regression is not None and summary.comparison is not None:
        reason = regression_message(summary.comparison, config.fail_on_regression)
        if reason:  # the run is committed; the exit code is the nightly's alarm
            print(f"segment_bucket.py: {reason}", file=sys.stderr)
            return 3
    return 0
