"""``report.html``: one self-contained page (images inlined as data URIs, chart as inline SVG).

The report never reads or decodes an input: its pictures are the thumbnails the decode workers
made and stored with each row (``masks.thumbnail``, ``masks.label_thumbnail``), so an object
replaced since, or a huge image read with --tile, cannot reach the driver. Panels are WebP.

Run summary, per-class IoU before vs after CRF, and overlays (image | pre-CRF | post-CRF | label)
for the worst and best labelled images, the images the CRF changed most and the least confident
images, plus the errors. With a comparison (pipeline/evaluation/compare.py): what changed since the previous
run, with the most changed images' previous and current masks side by side.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.evaluation.metrics import format_score
from pipeline.io.images import THUMB_WIDTH, thumbnail_size
from pipeline.io.palette import IGNORE_INDEX, png_to_mask, voc_palette

if TYPE_CHECKING:
    from pipeline.evaluation.compare_result import Comparison

_PALETTE = voc_palette()
PER_SECTION = 4
PANEL_QUALITY = 80
_MAX_THUMB_BYTES = 4 * 2**20  # a stored thumbnail is a few KB; anything larger is not ours


def _data_uri(rgb: np.ndarray) -> str:
    image = Image.fromarray(rgb)
    buffer = io.BytesIO()
    image.save(buffer, format="WEBP", quality=PANEL_QUALITY, method=4)
    return "data:image/webp;base64," + base64.b64encode(buffer.getvalue()).decode()


def _stored_thumbnail(data: bytes | None) -> np.ndarray | None:
    """A row's stored thumbnail (WebP the workers wrote, at most THUMB_WIDTH wide) as RGB, or None."""
    if not data or len(data) > _MAX_THUMB_BYTES:
        return None
    with Image.open(io.BytesIO(data), formats=["WEBP"]) as image:
        if image.width > THUMB_WIDTH or image.height > 16 * THUMB_WIDTH:
            return None
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _overlay(image: np.ndarray, ids: np.ndarray) -> np.ndarray:
    colours = _PALETTE[ids].astype(np.float32)
    blend = 0.45 * image.astype(np.float32) + 0.55 * colours
    blend[ids == 0] = image[ids == 0]  # leave background as the photo
    blend[ids == IGNORE_INDEX] = colours[ids == IGNORE_INDEX]
    return blend.astype(np.uint8)


def _resized(ids: np.ndarray, shape: tuple[int, int] | None) -> np.ndarray:
    if shape is None or ids.shape == shape:
        return ids
    return np.asarray(Image.fromarray(ids).resize((shape[1], shape[0]), Image.Resampling.NEAREST))


def _table_rows(rows: Sequence[tuple[str, object]]) -> str:
    return "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)


def _bar_chart(names: list[str], iou: list[float | None], iou_pre: list[float | None]) -> str:
    """Horizontal bars: grey = before CRF, blue = after CRF, one pair per class."""
    row, width, left = 26, 360, 110
    height = row * len(names) + 30
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 120}" '
        f'height="{height}" font-family="sans-serif" font-size="12">'
    ]
    for i, (name, post, pre) in enumerate(zip(names, iou, iou_pre, strict=True)):
        y = 10 + i * row
        parts.append(f'<text x="{left - 6}" y="{y + 14}" text-anchor="end">{html.escape(name)}</text>')
        for j, (value, colour) in enumerate(((pre, "#b0b0b0"), (post, "#2f6db5"))):
            if value is not None:
                parts.append(
                    f'<rect x="{left}" y="{y + j * 10}" width="{value * width:.1f}" height="9" fill="{colour}"/>'
                )
        delta = "" if post is None or pre is None else f" ({post - pre:+.3f})"
        parts.append(f'<text x="{left + width + 6}" y="{y + 14}">{format_score(post, ".3f")}{delta}</text>')
    parts.append(f'<text x="{left}" y="{height - 4}" fill="#555">grey: before CRF, blue: after CRF</text></svg>')
    return "".join(parts)


def _panels(title: str, panels: list[tuple[str, np.ndarray]]) -> str:
    cells = "".join(
        f'<figure><img src="{_data_uri(p)}" alt="{t}"><figcaption>{t}</figcaption></figure>' for t, p in panels
    )
    return f'<div class="fig"><h4>{html.escape(title)}</h4><div class="row">{cells}</div></div>'


def _figure(row: dict, note: str = "") -> str:
    image = _stored_thumbnail(row.get("thumbnail"))
    post = png_to_mask(row["mask"])
    if image is None:  # a row written before thumbnails existed: the masks alone
        image = np.zeros((*thumbnail_size(post.shape), 3), dtype=np.uint8)
    size = image.shape[:2]
    panels = [("image", image)]
    pre = None if row["mask_pre_crf"] is None else _resized(png_to_mask(row["mask_pre_crf"]), size)
    if pre is not None:
        panels.append(("before CRF", _overlay(image, pre)))
    panels.append(("after CRF" if pre is not None else "mask", _overlay(image, _resized(post, size))))
    if row.get("label_thumbnail"):
        panels.append(("label", _overlay(image, _resized(png_to_mask(row["label_thumbnail"]), size))))
    score = "" if row["miou"] is None else f" mIoU {row['miou']:.3f}"
    if row["miou_pre_crf"] is not None:
        score += f" (pre-CRF {row['miou_pre_crf']:.3f})"
    if row["crf_changed_fraction"] is not None:
        score += f", CRF changed {100 * row['crf_changed_fraction']:.1f}% of pixels"
    score += note
    return _panels(row["key"] + score, panels)


def _change_figure(example, thumbnail: bytes | None) -> str:
    """Previous vs current mask over the image (its stored thumbnail, when the report's rows hold
    it), and the pixels that changed (red)."""
    old, new = png_to_mask(example.mask_old), png_to_mask(example.mask_new)
    same_size = old.shape == new.shape
    image = _stored_thumbnail(thumbnail)
    if image is None:  # the masks alone still show the change
        image = np.zeros((*thumbnail_size(new.shape), 3), dtype=np.uint8)
    size = image.shape[:2]
    changed_ids = _resized((old != new).astype(np.uint8), size) if same_size else None
    if not same_size:  # the previous mask at thumbnail width, in its own aspect ratio
        old = _resized(old, thumbnail_size(old.shape))
    old, new = _resized(old, size) if same_size else old, _resized(new, size)
    previous = _overlay(image, old) if same_size else _PALETTE[old]
    panels = [("image", image), ("previous run", previous), ("this run", _overlay(image, new))]
    if changed_ids is not None:  # the masks have the same size
        changed = (image.astype(np.float32) * 0.35).astype(np.uint8)
        changed[changed_ids > 0] = (230, 30, 30)
        panels.append(("changed pixels", changed))
    return _panels(f"{example.key}: {100 * example.disagreement:.2f}% of pixels changed", panels)


def _comparison_html(c: Comparison, masks: dict[str, dict]) -> str:
    rows = [
        ("compared with run", c.against),
        (
            "images in both / changed / added / removed",
            f"{c.count('both')} / {c.changed_images} / {c.count('added')} / {c.count('removed')}",
        ),
        (
            "mIoU previous → this run",
            f"{format_score(c.miou_old)} → {format_score(c.miou_new)} ({format_score(c.miou_delta, '+.4f')})",
        ),
    ]
    rows += [
        ("new error type", f"{e.stage}/{e.error_type} ×{e.count}, e.g. {e.example_key}: {e.example_message}")
        for e in c.new_errors
    ]
    deltas = sorted((r for r in c.classes.to_pylist() if r["iou_delta"] is not None), key=lambda r: r["iou_delta"])
    class_rows = "".join(
        f"<tr><td>{html.escape(r['class_name'])}</td><td>{r['iou_old']:.4f}</td>"
        f"<td>{r['iou_new']:.4f}</td><td>{r['iou_delta']:+.4f}</td></tr>"
        for r in deltas
    )
    classes = (
        f"<table><tr><th>class</th><th>IoU previous</th><th>IoU now</th><th>delta</th></tr>{class_rows}</table>"
        if deltas
        else ""
    )
    figures = (
        "".join(_change_figure(e, masks.get(e.key, {}).get("thumbnail")) for e in c.examples[:PER_SECTION])
        or "<p>no mask changed</p>"
    )
    return (
        f"<h2>Biggest changes since run {html.escape(c.against)}</h2>"
        f"<table>{_table_rows(rows)}</table>{classes}{figures}"
    )


def _summary_html(manifest: dict) -> str:
    """The run's numbers: counts, mIoU and pixel accuracy before and after CRF, throughput."""
    metrics, counts, timings = manifest["metrics"], manifest["counts"], manifest["timings"]
    pixel_acc = f"{format_score(metrics['pixel_acc'])} / {format_score(metrics['pixel_acc_pre_crf'])}"
    return _table_rows(
        [
            ("run", manifest["run_id"]),
            ("model", manifest["model"]),
            ("weights sha256", manifest["weights"]["sha256"]),
            ("images / errors / labelled", f"{counts['images']} / {counts['errors']} / {counts['labelled']}"),
            ("labels not scored (masks.label_error)", counts.get("label_errors", 0)),
            (
                "tiled inference / reduced-resolution CRF (memory budget)",
                f"{counts.get('tiled', 0)} / {counts.get('crf_reduced', 0)}",
            ),
            ("mIoU after CRF", format_score(metrics["miou"])),
            ("mIoU before CRF", format_score(metrics["miou_pre_crf"])),
            ("pixel accuracy (after / before)", pixel_acc),
            ("throughput", f"{timings['images_per_s']} images/s over {timings['segment_s']} s"),
        ]
    )


def _errors_html(errors: pa.Table, error_count: int) -> str:
    if not error_count:
        return "<h2>Errors</h2><p>none</p>"
    rows = "".join(
        f"<tr><td>{html.escape(r['key'])}</td><td>{html.escape(r['stage'])}</td>"
        f"<td>{html.escape(r['error_type'])}</td><td>{html.escape(r['message'])}</td></tr>"
        for r in errors.slice(0, 50).to_pylist()
    )
    return (
        f"<h2>Errors ({error_count})</h2><table><tr><th>key</th><th>stage</th><th>type</th>"
        f"<th>message</th></tr>{rows}</table>"
    )


def _image_sections(manifest: dict, candidates: dict[str, list[list]], rows: dict[str, dict]) -> list[str]:
    """The overlay sections: worst, best, most changed by the CRF, least confident images."""
    low_conf = manifest["config"]["inference"]["low_conf_threshold"]

    def note(row: dict, confidence: bool) -> str:
        if not confidence:
            return ""
        return (
            f", mean max prob {row['mean_max_prob']:.3f}, "
            f"{100 * row['low_conf_fraction']:.1f}% of pixels below {low_conf:g}"
        )

    def section(title: str, name: str, confidence: bool = False) -> str:
        keys = [key for _, key, _ in candidates.get(name, [])][:PER_SECTION]
        if not keys:
            return ""
        return f"<h2>{title}</h2>" + "".join(_figure(rows[k], note(rows[k], confidence)) for k in keys if k in rows)

    return [
        section("Worst images (lowest mIoU)", "worst"),
        section("Best images (highest mIoU)", "best"),
        section("Images the CRF changed most", "crf_changed"),
        section("Least confident images (lowest mean max probability)", "least_confident", confidence=True),
    ]


_STYLE = (
    "body { font-family: sans-serif; margin: 24px; color: #222; }\n"
    "table { border-collapse: collapse; } "
    "th, td { text-align: left; padding: 3px 10px; border-bottom: 1px solid #ddd; }\n"
    ".row { display: flex; gap: 8px; flex-wrap: wrap; } figure { margin: 0; }\n"
    "figcaption { font-size: 12px; color: #555; text-align: center; } "
    "h4 { margin: 14px 0 4px; font-weight: normal; }\n"
)


def render_report(
    *,
    manifest: dict,
    classes: pa.Table,
    candidates: dict[str, list[list]],
    rows: dict[str, dict],
    errors: pa.Table,
    error_count: int,
    comparison: Comparison | None = None,
) -> str:
    """HTML for a committed run: ``candidates`` are the summed PartStats' sections
    ([value, key, part] per image), ``rows`` their masks rows by key (with the stored thumbnails),
    ``errors`` the first rows. Nothing here reads an input."""
    worst, best, changed, least_confident = _image_sections(manifest, candidates, rows)
    chart = _bar_chart(
        classes.column("class_name").to_pylist(),
        classes.column("iou").to_pylist(),
        classes.column("iou_pre_crf").to_pylist(),
    )
    compared = _comparison_html(comparison, rows) if comparison is not None else ""
    run_id = html.escape(manifest["run_id"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>deeplab-pipeline run {run_id}</title>
<style>
{_STYLE}</style></head><body>
<h1>deeplab-pipeline run {run_id}</h1>
<table>{_summary_html(manifest)}</table>
<h2>Per-class IoU, before vs after CRF</h2>{chart}
{worst}
{best}
{changed}
{least_confident}
{compared}
{_errors_html(errors, error_count)}
</body></html>"""
