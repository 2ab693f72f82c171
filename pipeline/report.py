"""``report.html``: one self-contained page (images inlined as data URIs, chart as inline SVG).

Run summary, per-class IoU before vs after CRF, and overlays (image | pre-CRF | post-CRF | label)
for the worst and best labelled images, the images the CRF changed most and the least confident
images, plus the errors. With a comparison (pipeline/compare.py): what changed since the previous
run, with the most changed images' previous and current masks side by side.
"""

from __future__ import annotations

import base64
import html
import io
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.images import decode_thumbnail
from pipeline.palette import IGNORE_INDEX, png_to_mask, voc_palette
from pipeline.storage import Locator, read_bytes

if TYPE_CHECKING:
    from pipeline.compare import Comparison

_PALETTE = voc_palette()
THUMB_WIDTH = 240
PER_SECTION = 4


def _data_uri(rgb: np.ndarray) -> str:
    image = Image.fromarray(rgb)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _overlay(image: np.ndarray, ids: np.ndarray) -> np.ndarray:
    colours = _PALETTE[ids].astype(np.float32)
    blend = 0.45 * image.astype(np.float32) + 0.55 * colours
    blend[ids == 0] = image[ids == 0]  # leave background as the photo
    blend[ids == IGNORE_INDEX] = colours[ids == IGNORE_INDEX]
    return blend.astype(np.uint8)


def _png_ids(data: bytes | None, shape: tuple[int, int] | None = None) -> np.ndarray | None:
    """Class ids of a mask/label PNG, resized (nearest) to ``shape`` (h, w) when given."""
    if data is None:
        return None
    return _resized(png_to_mask(data), shape)


def _resized(ids: np.ndarray, shape: tuple[int, int] | None) -> np.ndarray:
    if shape is None or ids.shape == shape:
        return ids
    return np.asarray(Image.fromarray(ids).resize((shape[1], shape[0]), Image.NEAREST))


def _thumb(uri: str, storage_options: dict) -> np.ndarray:
    return decode_thumbnail(read_bytes(uri, storage_options), THUMB_WIDTH)


def _bar_chart(names: list[str], iou: list[float | None], iou_pre: list[float | None]) -> str:
    """Horizontal bars: grey = before CRF, blue = after CRF, one pair per class."""
    row, width, left = 26, 360, 110
    height = row * len(names) + 30
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 120}" height="{height}" '
             f'font-family="sans-serif" font-size="12">']
    for i, (name, post, pre) in enumerate(zip(names, iou, iou_pre)):
        y = 10 + i * row
        parts.append(f'<text x="{left - 6}" y="{y + 14}" text-anchor="end">{html.escape(name)}</text>')
        for j, (value, colour) in enumerate(((pre, "#b0b0b0"), (post, "#2f6db5"))):
            if value is not None:
                parts.append(f'<rect x="{left}" y="{y + j * 10}" width="{value * width:.1f}" height="9" fill="{colour}"/>')
        label = "n/a" if post is None else f"{post:.3f}" + ("" if pre is None else f" ({post - pre:+.3f})")
        parts.append(f'<text x="{left + width + 6}" y="{y + 14}">{label}</text>')
    parts.append(f'<text x="{left}" y="{height - 4}" fill="#555">grey: before CRF, blue: after CRF</text></svg>')
    return "".join(parts)


def _panels(title: str, panels: list[tuple[str, np.ndarray]]) -> str:
    cells = "".join(f'<figure><img src="{_data_uri(p)}" alt="{t}"><figcaption>{t}</figcaption></figure>' for t, p in panels)
    return f'<div class="fig"><h4>{html.escape(title)}</h4><div class="row">{cells}</div></div>'


def _figure(row: dict, label_uri: str | None, storage_options: dict, note: str = "") -> str:
    try:
        image = _thumb(row["uri"], storage_options)
    except Exception as exc:  # the input may have changed since the run; the report still renders
        return f'<div class="fig"><p>{html.escape(row["key"])}: cannot read image ({html.escape(str(exc))})</p></div>'
    size = image.shape[:2]
    panels = [("image", image)]
    pre = _png_ids(row["mask_pre_crf"], size)
    if pre is not None:
        panels.append(("before CRF", _overlay(image, pre)))
    panels.append(("after CRF" if pre is not None else "mask", _overlay(image, _png_ids(row["mask"], size))))
    if label_uri:
        try:
            panels.append(("label", _overlay(image, _png_ids(read_bytes(label_uri, storage_options), size))))
        except Exception:
            pass  # unlabelled image
    score = "" if row["miou"] is None else f" mIoU {row['miou']:.3f}"
    if row["miou_pre_crf"] is not None:
        score += f" (pre-CRF {row['miou_pre_crf']:.3f})"
    if row["crf_changed_fraction"] is not None:
        score += f", CRF changed {100 * row['crf_changed_fraction']:.1f}% of pixels"
    score += note
    return _panels(row["key"] + score, panels)


def _change_figure(example, storage_options: dict) -> str:
    """Previous vs current mask over the image, and the pixels that changed (red)."""
    old, new = _png_ids(example.mask_old), _png_ids(example.mask_new)
    same_size = old.shape == new.shape
    try:
        image = _thumb(example.uri, storage_options)
    except Exception:  # the input may be gone since; the masks alone still show the change
        width = min(THUMB_WIDTH, new.shape[1])
        image = np.zeros((max(1, round(new.shape[0] * width / new.shape[1])), width, 3), dtype=np.uint8)
    size = image.shape[:2]
    changed_ids = _resized((old != new).astype(np.uint8), size) if same_size else None
    if not same_size:  # the previous mask at thumbnail width, in its own aspect ratio
        width = min(THUMB_WIDTH, old.shape[1])
        old = _resized(old, (max(1, round(old.shape[0] * width / old.shape[1])), width))
    old, new = _resized(old, size) if same_size else old, _resized(new, size)
    panels = [("image", image), ("previous run", _overlay(image, old) if same_size else _PALETTE[old]),
              ("this run", _overlay(image, new))]
    if same_size:
        changed = (image.astype(np.float32) * 0.35).astype(np.uint8)
        changed[changed_ids > 0] = (230, 30, 30)
        panels.append(("changed pixels", changed))
    return _panels(f"{example.key}: {100 * example.disagreement:.2f}% of pixels changed", panels)


def _comparison_html(c: Comparison, storage_options: dict) -> str:
    def fmt(v, spec=".4f"):
        return "n/a" if v is None else format(v, spec)

    rows = [("compared with run", c.against),
            ("images in both / changed / added / removed",
             f"{c.count('both')} / {c.changed_images} / {c.count('added')} / {c.count('removed')}"),
            ("mIoU previous → this run", f"{fmt(c.miou_old)} → {fmt(c.miou_new)} ({fmt(c.miou_delta, '+.4f')})")]
    rows += [("new error type", f"{e.stage}/{e.error_type} ×{e.count}, e.g. {e.example_key}: {e.example_message}")
             for e in c.new_errors]
    summary = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    deltas = sorted((r for r in c.classes.to_pylist() if r["iou_delta"] is not None), key=lambda r: r["iou_delta"])
    class_rows = "".join(f"<tr><td>{html.escape(r['class_name'])}</td><td>{r['iou_old']:.4f}</td>"
                         f"<td>{r['iou_new']:.4f}</td><td>{r['iou_delta']:+.4f}</td></tr>" for r in deltas)
    classes = (f"<table><tr><th>class</th><th>IoU previous</th><th>IoU now</th><th>delta</th></tr>{class_rows}</table>"
               if deltas else "")
    figures = "".join(_change_figure(e, storage_options) for e in c.examples[:PER_SECTION]) or "<p>no mask changed</p>"
    return (f"<h2>Biggest changes since run {html.escape(c.against)}</h2><table>{summary}</table>{classes}"
            f"{figures}")


def render_report(*, manifest: dict, classes: pa.Table, candidates: dict[str, list[list]], rows: dict[str, dict],
                  errors: pa.Table, error_count: int, locator: Locator, storage_options: dict,
                  comparison: Comparison | None = None) -> str:
    """HTML for a committed run: ``candidates`` are the summed PartStats' sections
    ([value, key, part] per image), ``rows`` their masks rows by key, ``errors`` the first rows."""
    worst, best, changed, least_confident = ([key for _, key, _ in candidates.get(name, [])][:PER_SECTION]
                                             for name in ("worst", "best", "crf_changed", "least_confident"))

    def label_for(key: str) -> str | None:
        return locator.label_uri(key) or None

    low_conf = manifest["config"]["inference"]["low_conf_threshold"]

    def section(title: str, keys: list[str], confidence: bool = False) -> str:
        if not keys:
            return ""

        def note(row: dict) -> str:
            return (f", mean max prob {row['mean_max_prob']:.3f}, {100 * row['low_conf_fraction']:.1f}% of pixels "
                    f"below {low_conf:g}") if confidence else ""

        return f"<h2>{title}</h2>" + "".join(_figure(rows[k], label_for(k), storage_options, note(rows[k]))
                                             for k in keys if k in rows)

    metrics, counts, timings = manifest["metrics"], manifest["counts"], manifest["timings"]

    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"

    summary_rows = [
        ("run", manifest["run_id"]), ("model", manifest["model"]),
        ("weights sha256", manifest["weights"]["sha256"]),
        ("images / errors / labelled", f"{counts['images']} / {counts['errors']} / {counts['labelled']}"),
        ("labels not scored (masks.label_error)", counts.get("label_errors", 0)),
        ("tiled inference / reduced-resolution CRF (memory budget)",
         f"{counts.get('tiled', 0)} / {counts.get('crf_reduced', 0)}"),
        ("mIoU after CRF", fmt(metrics["miou"])), ("mIoU before CRF", fmt(metrics["miou_pre_crf"])),
        ("pixel accuracy (after / before)", f"{fmt(metrics['pixel_acc'])} / {fmt(metrics['pixel_acc_pre_crf'])}"),
        ("throughput", f"{timings['images_per_s']} images/s over {timings['segment_s']} s"),
    ]
    summary_html = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in summary_rows)
    chart = _bar_chart(classes.column("class_name").to_pylist(), classes.column("iou").to_pylist(),
                       classes.column("iou_pre_crf").to_pylist())
    error_rows = "".join(
        f"<tr><td>{html.escape(r['key'])}</td><td>{html.escape(r['stage'])}</td><td>{html.escape(r['error_type'])}</td>"
        f"<td>{html.escape(r['message'])}</td></tr>" for r in errors.slice(0, 50).to_pylist())
    errors_html = (f"<h2>Errors ({error_count})</h2><table><tr><th>key</th><th>stage</th><th>type</th>"
                   f"<th>message</th></tr>{error_rows}</table>") if error_count else "<h2>Errors</h2><p>none</p>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>deeplab-pipeline run {html.escape(manifest['run_id'])}</title>
<style>
body {{ font-family: sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; }} th, td {{ text-align: left; padding: 3px 10px; border-bottom: 1px solid #ddd; }}
.row {{ display: flex; gap: 8px; flex-wrap: wrap; }} figure {{ margin: 0; }}
figcaption {{ font-size: 12px; color: #555; text-align: center; }} h4 {{ margin: 14px 0 4px; font-weight: normal; }}
</style></head><body>
<h1>deeplab-pipeline run {html.escape(manifest['run_id'])}</h1>
<table>{summary_html}</table>
<h2>Per-class IoU, before vs after CRF</h2>{chart}
{section("Worst images (lowest mIoU)", worst)}
{section("Best images (highest mIoU)", best)}
{section("Images the CRF changed most", changed)}
{section("Least confident images (lowest mean max probability)", least_confident, confidence=True)}
{_comparison_html(comparison, storage_options) if comparison is not None else ""}
{errors_html}
</body></html>"""
