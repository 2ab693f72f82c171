"""Committing a run, in this order: classes.parquet → manifest.json → the comparison with the
previous run → report.html → ``_SUCCESS``. The comparison reads classes.parquet, the report shows
the comparison, and ``_SUCCESS`` comes last: a run folder without it is incomplete. The folder's
reads and writes are ``RunOutput``'s (pipeline/outputs/run.py); the analysis takes tables."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace

from pipeline.evaluation.compare import COMPARISON_FILES
from pipeline.evaluation.compare_result import Comparison
from pipeline.evaluation.metrics import DatasetSummary
from pipeline.evaluation.report import render_report
from pipeline.outputs.partstats import PartStats, classes_table
from pipeline.outputs.run import SUCCESS, RunOutput, RunSummary

CLASSES = "classes.parquet"
MANIFEST = "manifest.json"
REPORT = "report.html"
REPORT_ERRORS = 50  # error rows the report lists


def commit(
    output: RunOutput,
    stats: PartStats,
    categories: tuple[str, ...],
    manifest: dict,
    *,
    compare: Callable[[], Comparison] | None = None,
) -> RunSummary:
    """Write classes.parquet, manifest.json, the comparison (``compare`` runs it) and report.html
    from the summed part stats, then _SUCCESS; the run's summary."""
    post, pre = stats.summaries()
    classes = classes_table(categories, stats)
    output.write_table(CLASSES, classes)
    summary = RunSummary(
        images=stats.images,
        errors=stats.errors,
        labelled=stats.labelled,
        post=post,
        pre=pre,
        label_errors=stats.label_errors,
        tiled=stats.tiled,
        crf_reduced=stats.crf_reduced,
        carried=stats.carried,
        incremental=manifest.get("incremental"),
    )
    counts = _counts(summary)
    manifest = {**manifest, "counts": counts, "metrics": _metrics(post, pre)}
    output.write_json(MANIFEST, manifest)
    for name in COMPARISON_FILES:  # an earlier commit's: they describe other masks
        output.remove(name)
    comparison = None
    if compare is not None:
        # Reads classes.parquet (written above); the report shows it, _SUCCESS covers it.
        comparison = compare()
        summary = replace(summary, comparison=comparison)
    page = render_report(
        manifest=manifest,
        classes=classes,
        candidates=stats.candidates,
        rows=output.rows_for(stats.candidates),
        errors=output.first_errors(REPORT_ERRORS),
        error_count=stats.errors,
        comparison=comparison,
    )
    output.write_bytes(REPORT, page.encode())
    success = {**counts, "committed_at": manifest.get("finished_at")}
    output.write_bytes(SUCCESS, json.dumps(success).encode())
    return summary


def _counts(summary: RunSummary) -> dict[str, int]:
    """manifest.json's and _SUCCESS's counts."""
    return {
        "images": summary.images,
        "errors": summary.errors,
        "labelled": summary.labelled,
        "label_errors": summary.label_errors,
        "tiled": summary.tiled,
        "crf_reduced": summary.crf_reduced,
        "inputs": summary.images + summary.errors,
        "segmented": summary.images + summary.errors - summary.carried,
        "carried": summary.carried,
    }


def _metrics(post: DatasetSummary, pre: DatasetSummary | None) -> dict[str, float | None]:
    """manifest.json's metrics: after CRF, then before CRF (null when the CRF did not run)."""
    before = pre.scores() if pre else dict.fromkeys(post.scores())
    return {**post.scores(), **{f"{name}_pre_crf": value for name, value in before.items()}}
