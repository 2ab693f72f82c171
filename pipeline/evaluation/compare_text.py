"""A comparison for people: the console table and the one-line regression message."""

from __future__ import annotations

from pipeline.evaluation.compare_result import Comparison
from pipeline.evaluation.metrics import format_score


def regression_message(comparison: Comparison, threshold: float) -> str | None:
    """One line naming what regressed by more than ``threshold``, or None."""
    reasons = comparison.regressions(threshold)
    if not reasons:
        return None
    shown = "; ".join(reasons[:4]) + (f"; and {len(reasons) - 4} more" if len(reasons) > 4 else "")
    return f"regression against run {comparison.against} (threshold {threshold:g}): {shown}"


def format_comparison(comparison: Comparison, *, top: int = 5) -> str:
    """A short plain-text table for the console."""
    c = comparison
    lines = [
        f"\n=== comparison: run {c.run_id} against run {c.against} ===",
        f"images           : {c.count('both')} in both runs, {c.changed_images} changed, "
        f"{c.count('added')} added, {c.count('removed')} removed",
        f"mIoU             : {format_score(c.miou_old)} -> {format_score(c.miou_new)} "
        f"({format_score(c.miou_delta, '+.4f')})",
    ]
    classes = [r for r in c.classes.to_pylist() if r["iou_delta"] is not None]
    if classes:
        lines.append(f"{'class':<16} {'IoU old':>8} {'IoU new':>8} {'delta':>8}")
        for r in sorted(classes, key=lambda r: r["iou_delta"])[:top]:
            lines.append(
                f"{r['class_name'][:16]:<16} {r['iou_old']:>8.4f} {r['iou_new']:>8.4f} {r['iou_delta']:>+8.4f}"
            )
    if c.changed_images:
        lines.append(f"{'most changed image':<40} {'pixels changed':>14}")
        for e in c.examples[:top]:
            lines.append(f"{e.key[-40:]:<40} {100 * e.disagreement:>13.2f}%")
    for n in c.new_errors:
        lines.append(
            f"new error        : {n.stage}/{n.error_type} x{n.count}, e.g. {n.example_key}: {n.example_message}"
        )
    return "\n".join(lines)
