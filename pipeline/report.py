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
import posixpath
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from pipeline.palette import IGNORE_INDEX, voc_palette
from pipeline.images import decode_image
from pipeline.storage import read_bytes

if TYPE_CHECKING:
    from pipeline.compare import Comparison

_PALETTE = voc_palette()
THUMB_WIDTH = 240
PER_SECTION = 4


def _data_uri(rgb: np.ndarray) -> str:
    image = Image.fromarray(rgb)
    if image.width > THUMB_WIDTH:
        image = image.resize((THUMB_WIDTH, max(1, round(image.height * THUMB_WIDTH / image.width))), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _overlay(image: np.ndarray, ids: np.ndarray) -> np.ndarray:
    colours = _PALETTE[ids].astype(np.float32)
    blend = 0.45 * image.astype(np.float32) + 0.55 * colours
    blend[ids == 0] = image[ids == 0]  # leave background as the photo
    blend[ids == IGNORE_INDEX] = colours[ids == IGNORE_INDEX]
    return blend.astype(np.uint8)


def _png_ids(data: bytes | None) -> np.ndarray | None:
    return None if data is None else np.array(Image.open(io.BytesIO(data)))


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


def _rows_for(masks_reader, keys: list[str]) -> dict[str, dict]:
    if not keys:
        return {}
    table = masks_reader(["key", "uri", "mask", "mask_pre_crf", "miou", "miou_pre_crf", "crf_changed_fraction",
                          "mean_max_prob", "low_conf_fraction"])
    table = table.filter(pc.is_in(table.column("key"), value_set=pa.array(keys)))
    return {r["key"]: r for r in table.to_pylist()}


def _panels(title: str, panels: list[tuple[str, np.ndarray]]) -> str:
    cells = "".join(f'<figure><img src="{_data_uri(p)}" alt="{t}"><figcaption>{t}</figcaption></figure>' for t, p in panels)
    return f'<div class="fig"><h4>{html.escape(title)}</h4><div class="row">{cells}</div></div>'


def _figure(row: dict, label_uri: str | None, storage_options: dict, note: str = "") -> str:
    try:
        image = decode_image(read_bytes(row["uri"], storage_options)).rgb
    except Exception as exc:  # the input may have changed since the run; the report still renders
        return f'<div class="fig"><p>{html.escape(row["key"])}: cannot read image ({html.escape(str(exc))})</p></div>'
    panels = [("image", image)]
    pre = _png_ids(row["mask_pre_crf"])
    if pre is not None:
        panels.append(("before CRF", _overlay(image, pre)))
    panels.append(("after CRF" if pre is not None else "mask", _overlay(image, _png_ids(row["mask"]))))
    if label_uri:
        try:
            panels.append(("label", _overlay(image, _png_ids(read_bytes(label_uri, storage_options)))))
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
    try:
        image = decode_image(read_bytes(example.uri, storage_options)).rgb
    except Exception:  # the input may be gone since; the masks alone still show the change
        image = np.zeros((*new.shape, 3), dtype=np.uint8)
    panels = [("image", image), ("previous run", _overlay(image, old) if old.shape == new.shape else _PALETTE[old]),
              ("this run", _overlay(image, new))]
    if old.shape == new.shape:
        changed = (image.astype(np.float32) * 0.35).astype(np.uint8)
        changed[old != new] = (230, 30, 30)
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
    figures = "".join(_change_figure(e, storage_options) for e in c.examples) or "<p>no mask changed</p>"
    return (f"<h2>Biggest changes since run {html.escape(c.against)}</h2><table>{summary}</table>{classes}"
            f"{figures}")


def render_report(*, manifest: dict, classes: pa.Table, masks_reader, errors: pa.Table,
                  labels_uri: str | None, storage_options: dict, comparison: Comparison | None = None) -> str:
    """HTML for a committed run. ``masks_reader(columns)`` returns the masks table with those columns."""
    stats = masks_reader(["key", "has_label", "miou", "crf_changed_fraction", "mean_max_prob"])
    labelled = stats.filter(pc.and_(stats.column("has_label"), pc.is_valid(stats.column("miou"))))
    by_miou = labelled.sort_by([("miou", "ascending")]).column("key").to_pylist()
    worst, best = by_miou[:PER_SECTION], by_miou[::-1][:PER_SECTION]
    changed_tbl = stats.filter(pc.is_valid(stats.column("crf_changed_fraction")))
    changed = changed_tbl.sort_by([("crf_changed_fraction", "descending")]).column("key").to_pylist()[:PER_SECTION]
    confident = stats.filter(pc.is_valid(stats.column("mean_max_prob")))
    least_confident = confident.sort_by([("mean_max_prob", "ascending")]).column("key").to_pylist()[:PER_SECTION]
    rows = _rows_for(masks_reader, sorted(set(worst + best + changed + least_confident)))

    def label_for(key: str) -> str | None:
        if not labels_uri:
            return None
        return posixpath.join(labels_uri.rstrip("/"), posixpath.splitext(key)[0] + ".png")

    low_conf = manifest["config"]["inference"]["low_conf_threshold"]

    def section(title: str, keys: list[str], confidence: bool = False) -> str:
        if not keys:
            return ""

        def note(row: dict) -> str:
            return (f", mean max prob {row['mean_max_prob']:.3f}, {100 * row['low_conf_fraction']:.1f}% of pixels "
                    f"below {low_conf:g}") if confidence else ""

        return f"<h2>{title}</h2>" + "".join(_figure(rows[k], label_for(k), storage_options, note(rows[k]))
                                             for k in keys)

    metrics, counts, timings = manifest["metrics"], manifest["counts"], manifest["timings"]

    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"

    summary_rows = [
        ("run", manifest["run_id"]), ("model", manifest["model"]),
        ("weights sha256", manifest["weights"]["sha256"]),
        ("images / errors / labelled", f"{counts['images']} / {counts['errors']} / {counts['labelled']}"),
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
    errors_html = (f"<h2>Errors ({errors.num_rows})</h2><table><tr><th>key</th><th>stage</th><th>type</th>"
                   f"<th>message</th></tr>{error_rows}</table>") if errors.num_rows else "<h2>Errors</h2><p>none</p>"
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
