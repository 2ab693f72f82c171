"""Synthetic committed runs: part files with MASKS_SCHEMA's columns drawn from a pool of scenes."""

from __future__ import annotations

import json
from pathlib import Path

from scale_parts import CATEGORIES, CHANGED_PERCENT, ERROR_EVERY, NUM_CLASSES, POOL, ROWS_PER_PART
from scale_parts.steps import manifest_for

_COUNT_STATS = ("class_pixels", "intersect", "union", "label_area", "intersect_pre_crf", "union_pre_crf")
_SCORE_STATS = ("pixel_acc", "miou", "pixel_acc_pre_crf", "miou_pre_crf")


def _scene(i: int, spec, rng, stats: dict[str, list]) -> tuple[bytes, bytes, bytes, bytes]:
    """Scene ``i``'s mask, pre-CRF mask, JPEG and label PNGs; its statistics appended to ``stats``."""
    import numpy as np

    from pipeline.metrics import image_stats
    from pipeline.palette import mask_to_png
    from pipeline.synthetic import encode_jpeg, make_scene

    image, label = make_scene(7_000_000 + i, spec)
    clean = np.where(label == 255, 0, label).astype(np.uint8) % NUM_CLASSES
    pre = clean.copy()
    flip = rng.random(pre.shape) < 0.03  # the model's errors, about 3% of pixels
    pre[flip] = rng.integers(0, NUM_CLASSES, int(flip.sum()))
    post = clean.copy()  # the CRF fixes most of them
    kept = flip & (rng.random(pre.shape) < 0.3)
    post[kept] = pre[kept]
    s_post, s_pre = image_stats(post, label, NUM_CLASSES), image_stats(pre, label, NUM_CLASSES)
    stats["class_pixels"].append(np.bincount(post.ravel(), minlength=NUM_CLASSES)[:NUM_CLASSES])
    for name, st in (("", s_post), ("_pre_crf", s_pre)):
        stats["intersect" + name].append(st.intersect)
        stats["union" + name].append(st.union)
        stats["pixel_acc" + name].append(st.pixel_acc)
        stats["miou" + name].append(st.miou)
    stats["label_area"].append(s_post.label_area)
    return mask_to_png(post), mask_to_png(pre), encode_jpeg(image), mask_to_png(label)


class Pool:
    """POOL distinct 64x64 scenes: mask PNGs (after and before CRF), their per-class statistics and JPEGs."""

    def __init__(self, size: int = 64) -> None:
        import numpy as np
        import pyarrow as pa

        from pipeline.synthetic import SceneSpec

        spec = SceneSpec(height=size, width=size)
        masks, pres, jpegs, labels = [], [], [], []
        stats = {k: [] for k in (*_COUNT_STATS, *_SCORE_STATS)}
        rng = np.random.default_rng(0)
        for i in range(POOL):
            mask, pre, jpeg, label = _scene(i, spec, rng, stats)
            masks.append(mask)
            pres.append(pre)
            jpegs.append(jpeg)
            labels.append(label)
        self.mask = pa.array(masks, pa.binary())
        self.mask_pre = pa.array(pres, pa.binary())
        self.jpegs, self.labels = jpegs, labels
        self.stats = {k: np.asarray(v, dtype=np.int64 if k in _COUNT_STATS else float) for k, v in stats.items()}


def _keys(start: int, stop: int) -> list[str]:
    return [f"img/{i:07d}.jpg" for i in range(start, stop)]


def _scenes(start: int, n: int, changed: bool):
    """The pool scene of each of ``n`` rows from key ``start`` on."""
    import numpy as np

    i = np.arange(start, start + n, dtype=np.int64)
    which = (i * 2654435761) % POOL
    if changed:  # the second night: 5% of the masks come out different
        which = np.where((i * 40503 + 7) % 100 < CHANGED_PERCENT, (which + 1) % POOL, which)
    return i, which


def _label_columns(pool: Pool, which, labelled, rng) -> dict:
    """The label statistics columns of the rows' pool scenes (null where unlabelled), scores with noise."""
    import numpy as np
    import pyarrow as pa

    n, unlabelled = len(which), ~labelled

    def lists(name: str, null: np.ndarray | None = None):
        values = pool.stats[name][which]
        offsets = pa.array(np.arange(0, (n + 1) * NUM_CLASSES, NUM_CLASSES, dtype=np.int32))
        mask = pa.array(null) if null is not None else None
        return pa.ListArray.from_arrays(offsets, pa.array(values.ravel()), pa.list_(pa.int64()), mask=mask)

    def score(name: str):
        noisy = np.clip(pool.stats[name][which] + rng.normal(0, 0.005, n), 0, 1)
        return pa.array(noisy, pa.float64(), mask=unlabelled)

    out = {
        "class_pixels": lists("class_pixels"),
        "has_label": pa.array(labelled),
        "label_error": pa.nulls(n, pa.string()),
    }
    out |= {name: lists(name, unlabelled) for name in _COUNT_STATS[1:]}
    return out | {name: score(name) for name in _SCORE_STATS}


def _columns(pool: Pool, which, labelled, ok_keys: list[str], uris: list[str], run_id: str, rng) -> dict:
    """MASKS_SCHEMA's columns, each row's masks and statistics those of its pool scene."""
    import pyarrow as pa

    n = len(ok_keys)

    def floats(low: float, high: float):
        return pa.array(rng.uniform(low, high, n), pa.float64())

    const = lambda v, t=pa.string(): pa.array([v] * n, t)  # noqa: E731
    out = {
        "key": pa.array(ok_keys, pa.string()),
        "uri": pa.array([uris[w % len(uris)] for w in which], pa.string()),
        "height": const(64, pa.int32()),
        "width": const(64, pa.int32()),
        "exif_orientation": pa.nulls(n, pa.int32()),
        "mask": pool.mask.take(pa.array(which)),
        "mask_pre_crf": pool.mask_pre.take(pa.array(which)),
    }
    out |= _label_columns(pool, which, labelled, rng)
    out |= {"model": const("deeplabv3plus_demo"), "weights_sha256": const("0" * 64)}
    out |= {"infer_ms": floats(15, 40), "crf_ms": floats(80, 200), "crf_scale": const(1.0, pa.float64())}
    out |= {"infer_tile": pa.nulls(n, pa.int32()), "crf_changed_fraction": floats(0, 0.05)}
    out |= {"mean_max_prob": floats(0.6, 0.99), "mean_entropy": floats(0.05, 1.0)}
    out |= {"mean_entropy_norm": floats(0.02, 0.6), "low_conf_fraction": floats(0, 0.3)}
    return out | {"run_id": const(run_id)}


def build_part(pool: Pool, start: int, stop: int, run_id: str, uris: list[str], changed: bool):
    """(masks, errors) tables for keys start..stop of a run, MASKS_SCHEMA / ERRORS_SCHEMA."""
    import numpy as np
    import pyarrow as pa

    from pipeline.schema import ERRORS_SCHEMA, MASKS_SCHEMA

    keys = _keys(start, stop)
    n_err = 2 if (start // ROWS_PER_PART) % ERROR_EVERY == 0 and stop - start > 2 else 0
    ok_keys, err_keys = keys[: len(keys) - n_err], keys[len(keys) - n_err :]
    i, which = _scenes(start, len(ok_keys), changed)
    rng = np.random.default_rng(start + (1 if changed else 0))
    columns = _columns(pool, which, (i % 10) != 9, ok_keys, uris, run_id, rng)
    masks = pa.Table.from_arrays([columns[f.name] for f in MASKS_SCHEMA], schema=MASKS_SCHEMA)
    failures = [("decode", "UnidentifiedImageError"), ("read", "FileNotFoundError")]
    errors = pa.Table.from_pylist(
        [
            {
                "key": k,
                "uri": uris[0],
                "stage": stage,
                "error_type": etype,
                "message": f"{etype} on {k}",
                "run_id": run_id,
            }
            for k, (stage, etype) in zip(err_keys, failures, strict=True)
        ],
        schema=ERRORS_SCHEMA,
    )
    return masks, errors


def parquet_bytes(table) -> bytes:
    """As write_parquet_atomic writes parts (zstd); masks are unique in real runs, so no dictionary for them."""
    import io

    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(
        table,
        buffer,
        compression="zstd",
        use_dictionary=[c for c in table.column_names if c not in ("mask", "mask_pre_crf")],
    )
    return buffer.getvalue()


def write_run(
    pool: Pool, out: Path, run_id: str, n_keys: int, uris: list[str], stats_file: Path, *, changed: bool
) -> None:
    """A committed run dir OUT/run=<id>/ (masks/, errors/, classes.parquet, _SUCCESS) and its parts' stats."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.partstats import PartStats, classes_table
    from pipeline.writer import part_name

    run = out / f"run={run_id}"
    (run / "masks").mkdir(parents=True)
    (run / "errors").mkdir()
    total = PartStats.empty(NUM_CLASSES)
    with open(stats_file, "w") as sidecar:
        for start in range(0, n_keys, ROWS_PER_PART):
            masks, errors = build_part(pool, start, min(n_keys, start + ROWS_PER_PART), run_id, uris, changed)
            name = part_name(pa.chunked_array([masks.column("key"), errors.column("key")]))
            (run / "masks" / name).write_bytes(parquet_bytes(masks))
            if errors.num_rows:
                (run / "errors" / name).write_bytes(parquet_bytes(errors))
            stats = PartStats.of(name, masks, errors, NUM_CLASSES)
            sidecar.write(stats.to_json() + "\n")
            total += stats
    pq.write_table(classes_table(CATEGORIES, total), run / "classes.parquet")
    (run / "manifest.json").write_text(json.dumps(manifest_for(run_id)))
    committed_at = f"2026-12-0{1 if not changed else 2}T02:00:00+00:00"
    (run / "_SUCCESS").write_text(json.dumps({"images": total.images, "committed_at": committed_at}))


def thumbnail_uris(work: Path, pool: Pool) -> list[str]:
    """A few real small JPEGs the report's thumbnails read."""
    folder = work / "thumbs"
    folder.mkdir(parents=True, exist_ok=True)
    uris = []
    for i, data in enumerate(pool.jpegs[:8]):
        (folder / f"scene-{i}.jpg").write_bytes(data)
        uris.append(str(folder / f"scene-{i}.jpg"))
    return uris
