"""Prometheus metrics, named per DESIGN.md with the ``deeplab_pipeline_`` prefix and base units.

- Actors record ``deeplab_pipeline_images_total{stage,status}``,
  ``deeplab_pipeline_stage_seconds{stage}`` and ``deeplab_pipeline_fallbacks_total{stage,fallback}``
  (images the torch CRF could not allocate for, refined by pydensecrf) through Ray's metrics API,
  so Ray's own metrics endpoint (scraped by Prometheus) exposes them live; Ray prepends its
  ``ray_`` namespace there.
- The driver pushes the run summary (the same counters and histograms over the whole run, plus
  ``deeplab_pipeline_miou{run_id,crf}``) to a Pushgateway with ``--pushgateway URL``: the
  nightly case, where the cluster is gone before Prometheus would scrape it. With
  ``--compare-previous`` it adds ``deeplab_pipeline_miou_delta{run_id,against}`` and
  ``deeplab_pipeline_changed_images{run_id,against}`` (images whose mask changed at all).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
JOB_NAME = "deeplab_pipeline"


class StageMetrics:
    """Ray metrics for one stage, recorded inside an actor or task; a no-op outside Ray."""

    def __init__(self, stage: str) -> None:
        import ray

        self.stage = stage
        self._enabled = ray.is_initialized()
        if self._enabled:
            from ray.util.metrics import Counter, Histogram

            self._images = Counter(
                "deeplab_pipeline_images_total", "Images through a stage, by outcome", tag_keys=("stage", "status")
            )
            self._seconds = Histogram(
                "deeplab_pipeline_stage_seconds",
                "Per-image stage time",
                boundaries=list(STAGE_BUCKETS),
                tag_keys=("stage",),
            )
            self._fallbacks = Counter(
                "deeplab_pipeline_fallbacks_total",
                "Images a stage handed to its fallback (e.g. torch CRF out of memory)",
                tag_keys=("stage", "fallback"),
            )

    def ok(self, seconds: float) -> None:
        if self._enabled:
            self._images.inc(1.0, tags={"stage": self.stage, "status": "ok"})
            self._seconds.observe(seconds, tags={"stage": self.stage})

    def error(self) -> None:
        if self._enabled:
            self._images.inc(1.0, tags={"stage": self.stage, "status": "error"})

    def fallback(self, to: str) -> None:
        if self._enabled:
            self._fallbacks.inc(1.0, tags={"stage": self.stage, "fallback": to})


@functools.cache
def stage_metrics(stage: str) -> StageMetrics:
    """One StageMetrics per process and stage (Ray metrics must not be re-registered per batch)."""
    return StageMetrics(stage)


class _StageHistograms:
    """A collector for histograms that were already bucketed by the write workers (PartStats)."""

    def __init__(self, histograms: dict[str, list[float]]) -> None:
        self.histograms = histograms

    def collect(self):
        from prometheus_client.core import HistogramMetricFamily

        family = HistogramMetricFamily(
            "deeplab_pipeline_stage_seconds", "Per-image stage time in the last run", labels=["stage"]
        )
        bounds = [*(str(b) for b in STAGE_BUCKETS), "+Inf"]
        for stage, values in sorted(self.histograms.items()):
            counts, total = values[:-1], values[-1]
            if sum(counts):
                cumulative = [float(sum(counts[: i + 1])) for i in range(len(counts))]
                family.add_metric([stage], list(zip(bounds, cumulative, strict=True)), total)
        yield family


def _comparison_gauges(
    registry, run_id: str, against: str, miou_delta: float | None, changed_images: int | None
) -> None:
    from prometheus_client import Gauge

    labels = ["run_id", "against"]
    if miou_delta is not None:
        Gauge(
            "deeplab_pipeline_miou_delta", "Dataset mIoU change since the previous run", labels, registry=registry
        ).labels(run_id, against).set(miou_delta)
    Gauge(
        "deeplab_pipeline_changed_images",
        "Images whose mask differs from the previous run's",
        labels,
        registry=registry,
    ).labels(run_id, against).set(changed_images or 0)


@dataclass(frozen=True, kw_only=True)
class RunMetrics:
    """What the driver pushes of a committed run. ``outcomes`` ("stage/status" → inputs) and
    ``histograms`` come from the summed PartStats; ``against`` names the previous run when a
    comparison was made; ``miou_delta`` is None when either run had no labels."""

    run_id: str
    outcomes: dict[str, int]
    histograms: dict[str, list[float]]
    miou: float | None
    miou_pre_crf: float | None
    images: int
    errors: int
    against: str | None = None
    miou_delta: float | None = None
    changed_images: int | None = None


def push_summary(url: str, run: RunMetrics) -> None:
    """Push the run summary to a Pushgateway (grouped by job, so each night replaces the last)."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, push_to_gateway

    registry = CollectorRegistry()
    counter = Counter(
        "deeplab_pipeline_images", "Inputs by stage and outcome in the last run", ["stage", "status"], registry=registry
    )
    for outcome, n in sorted(run.outcomes.items()):
        counter.labels(*outcome.split("/", 1)).inc(n)
    registry.register(_StageHistograms(run.histograms))
    gauge = Gauge("deeplab_pipeline_miou", "Dataset mIoU of the last run", ["run_id", "crf"], registry=registry)
    if run.miou is not None:
        gauge.labels(run.run_id, "true" if run.miou_pre_crf is not None else "false").set(run.miou)
    if run.miou_pre_crf is not None:
        gauge.labels(run.run_id, "false").set(run.miou_pre_crf)
    totals = Gauge("deeplab_pipeline_run_inputs", "Inputs of the last run by table", ["table"], registry=registry)
    totals.labels("masks").set(run.images)
    totals.labels("errors").set(run.errors)
    Gauge(
        "deeplab_pipeline_last_success_timestamp_seconds", "When the last run committed", registry=registry
    ).set_to_current_time()
    if run.against is not None:
        _comparison_gauges(registry, run.run_id, run.against, run.miou_delta, run.changed_images)
    push_to_gateway(url, job=JOB_NAME, registry=registry, timeout=30)
