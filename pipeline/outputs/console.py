"""What the job prints: the resource plan before work, the run summary after it."""

from __future__ import annotations

from pipeline.evaluation.metrics import format_score
from pipeline.outputs.run import RunSummary


def print_summary(summary: RunSummary, categories: tuple[str, ...], uri: str, seconds: float, processed: int) -> None:
    pre = summary.pre
    print("\n=== deeplab-pipeline run summary ===")
    print(
        f"images segmented : {summary.images}   errors: {summary.errors}   labelled: {summary.labelled}"
        + (f"   labels not scored: {summary.label_errors} (masks.label_error)" if summary.label_errors else "")
    )
    if summary.tiled or summary.crf_reduced:
        print(
            f"memory budget    : tiled inference: {summary.tiled} (masks.infer_tile)   "
            f"reduced-resolution CRF: {summary.crf_reduced} (masks.crf_scale)"
        )
    if summary.incremental is not None:
        base = summary.incremental.get("base_run")
        print(
            f"incremental      : {summary.images + summary.errors - summary.carried} segmented, {summary.carried} "
            + (f"carried from run {base}" if base else f"carried (no base run: {summary.incremental.get('reason')})")
        )
    print(f"mIoU             : {format_score(summary.post.miou)} (pre-CRF {format_score(pre.miou if pre else None)})")
    pre_acc = pre.pixel_acc if pre else None
    print(f"pixel accuracy   : {format_score(summary.post.pixel_acc)} (pre-CRF {format_score(pre_acc)})")
    if summary.labelled:
        print(
            "per-class IoU    : "
            + ", ".join(
                f"{name} {'n/a' if v != v else f'{v:.3f}'}"
                for name, v in zip(categories, summary.post.iou, strict=True)
            )
        )
    print(f"throughput       : {processed} inputs in {seconds:.1f}s = {processed / max(seconds, 1e-9):.2f} images/s")
    print(f"outputs          : {uri}/")
    print(f"report           : {uri}/report.html")
    print(
        f"query            : duckdb -c \"SELECT key, miou_pre_crf, miou FROM '{uri}/masks/*.parquet' "
        f'ORDER BY miou LIMIT 5"'
    )


def describe(resources) -> str:
    """One line: where inference and the CRF run, on how many actors and threads."""
    if resources.crf_fused:
        on_gpu = resources.use_gpu and resources.crf_backend == "torch"
        crf = f"{resources.crf_backend} in the inference actors" + (", on the GPU" if on_gpu else "")
    elif resources.crf_actors:
        crf = f"{resources.crf_backend} in {_span(resources.crf_actors)} CPU actors"
    else:
        crf = "off"
    decode = "in the inference actors" if resources.decode_fused else f"in {_span(resources.decode_actors)} CPU actors"
    return (
        f"inference on {'GPU' if resources.use_gpu else 'CPU'}: {_span(resources.infer_actors)} actor(s), "
        f"{resources.infer_cpus:g} CPUs/actor, {resources.infer_threads} torch threads; decode {decode}; CRF {crf}"
    )


def _span(pool: tuple[int, int | None]) -> str:
    """A pool's range as a person reads it: "2", "1-4", or "1 or more" (open-ended)."""
    least, most = pool
    return f"{least} or more" if most is None else str(least) if least == most else f"{least}-{most}"
