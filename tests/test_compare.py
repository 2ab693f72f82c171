"""The run comparison on small hand-made tables: statuses, pixel disagreement, IoU deltas,
regressions, new error types, and finding committed runs in commit order."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from pipeline.evaluation.compare import RunTables, compare_batch, compare_tables, join_by_key, mask_disagreement
from pipeline.evaluation.compare_text import regression_message
from pipeline.io.palette import mask_to_png
from pipeline.outputs.run import committed_runs, run_before
from pipeline.rows.schema import CLASSES_SCHEMA, COMPARISON_CLASSES_SCHEMA, COMPARISON_SCHEMA, ERRORS_SCHEMA

NAMES = ("background", "disc", "box")


def masks_table(rows: dict[str, np.ndarray], miou: dict[str, float] | None = None) -> pa.Table:
    keys = sorted(rows)
    return pa.table(
        {
            "key": keys,
            "uri": [f"file:///in/{k}" for k in keys],
            "mask": [mask_to_png(rows[k]) for k in keys],
            "miou": [(miou or {}).get(k) for k in keys],
            "mean_max_prob": [0.5 + i / 10 for i in range(len(keys))],
            "class_pixels": [np.bincount(rows[k].ravel(), minlength=len(NAMES)).tolist() for k in keys],
        }
    )


def classes_table(iou: list[float | None]) -> pa.Table:
    return pa.table(
        {
            "class_id": range(len(NAMES)),
            "class_name": NAMES,
            "intersect": [0] * len(NAMES),
            "union": [0] * len(NAMES),
            "label_area": [0] * len(NAMES),
            "iou": iou,
            "iou_pre_crf": iou,
        },
        schema=CLASSES_SCHEMA,
    )


def errors_table(rows: list[tuple[str, str, str]]) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {"key": k, "uri": k, "stage": s, "error_type": t, "message": f"{t} in {k}", "run_id": "x"}
            for k, s, t in rows
        ],
        schema=ERRORS_SCHEMA,
    )


@pytest.fixture()
def two_runs():
    rng = np.random.default_rng(0)
    same = rng.integers(0, 3, (10, 10), dtype=np.uint8)
    changed_old = rng.integers(0, 3, (10, 10), dtype=np.uint8)
    changed_new = changed_old.copy()
    changed_new[0, :7] = (changed_new[0, :7] + 1) % 3  # exactly 7 of 100 pixels
    resized = np.zeros((10, 10), np.uint8)
    old = RunTables(
        "night-1",
        masks_table(
            {"a.jpg": same, "same.jpg": same, "changed.jpg": changed_old, "resized.jpg": resized}, {"same.jpg": 0.7}
        ),
        errors_table([("bad.jpg", "decode", "UnidentifiedImageError")]),
        classes_table([0.9, 0.8, None]),
    )
    new = RunTables(
        "night-2",
        masks_table(
            {"same.jpg": same, "changed.jpg": changed_new, "d.jpg": same, "resized.jpg": np.zeros((12, 10), np.uint8)},
            {"same.jpg": 0.6},
        ),
        errors_table(
            [
                ("bad.jpg", "decode", "UnidentifiedImageError"),
                ("x.jpg", "label", "InvalidInput"),
                ("y.jpg", "label", "InvalidInput"),
            ]
        ),
        classes_table([0.85, 0.5, None]),
    )
    return old, new, {"same": same, "changed_old": changed_old, "changed_new": changed_new}


def compare_runs(old, new, **kwargs):
    return compare_tables(old, new, **kwargs)[0]


def test_images_classes_and_errors(two_runs):
    old, new, masks = two_runs
    c, images = compare_tables(old, new, examples=4)
    assert images.schema.equals(COMPARISON_SCHEMA) and c.classes.schema.equals(COMPARISON_CLASSES_SCHEMA)
    rows = {r["key"]: r for r in images.to_pylist()}
    assert {k: r["status"] for k, r in rows.items()} == {
        "a.jpg": "removed",
        "d.jpg": "added",
        "same.jpg": "both",
        "changed.jpg": "both",
        "resized.jpg": "both",
    }
    assert rows["same.jpg"]["disagreement"] == 0.0
    assert rows["changed.jpg"]["disagreement"] == pytest.approx(0.07)
    assert rows["resized.jpg"]["disagreement"] == 1.0  # a resized input matches nowhere
    assert rows["a.jpg"]["disagreement"] is None and rows["d.jpg"]["disagreement"] is None
    assert (rows["same.jpg"]["miou_old"], rows["same.jpg"]["miou_new"]) == (0.7, 0.6)
    assert (c.count("both"), c.count("added"), c.count("removed"), c.changed_images) == (3, 1, 1, 2)
    assert [e.key for e in c.examples] == ["resized.jpg", "changed.jpg"]
    changed = c.examples[1]
    assert changed.mask_old == mask_to_png(masks["changed_old"]) and changed.mask_new == mask_to_png(
        masks["changed_new"]
    )
    assert changed.uri == "file:///in/changed.jpg" and changed.disagreement == pytest.approx(0.07)

    assert c.miou_old == pytest.approx(0.85) and c.miou_new == pytest.approx(0.675)
    assert c.miou_delta == pytest.approx(-0.175)
    classes = c.classes.to_pylist()
    assert [r["iou_delta"] for r in classes[:2]] == pytest.approx([-0.05, -0.3]) and classes[2]["iou_delta"] is None
    # Predicted pixel share over the keys both runs segmented, recomputed here.
    common_old = np.stack([masks["same"], masks["changed_old"], np.zeros((10, 10), np.uint8)])
    common_new = [masks["same"], masks["changed_new"], np.zeros((12, 10), np.uint8)]
    share_old = np.bincount(common_old.ravel(), minlength=3) / common_old.size
    pixels_new = np.concatenate([m.ravel() for m in common_new])
    share_new = np.bincount(pixels_new, minlength=3) / pixels_new.size
    np.testing.assert_allclose([r["pixel_share_old"] for r in classes], share_old)
    np.testing.assert_allclose([r["pixel_share_new"] for r in classes], share_new)

    assert [(e.stage, e.error_type, e.count, e.example_key) for e in c.new_errors] == [
        ("label", "InvalidInput", 2, "x.jpg")
    ]


def test_regressions(two_runs):
    old, new, _ = two_runs
    c = compare_runs(old, new)
    assert c.regressions(0.02) == [
        "mIoU 0.8500 -> 0.6750 (-0.1750)",
        "IoU of disc 0.8000 -> 0.5000 (-0.3000)",
        "IoU of background 0.9000 -> 0.8500 (-0.0500)",
    ]
    assert c.regressions(0.1) == c.regressions(0.02)[:2]  # background's -0.05 is within 0.1
    assert c.regressions(0.31) == [] and regression_message(c, 0.31) is None
    line = regression_message(c, 0.02)
    assert line.startswith("regression against run night-1 (threshold 0.02): mIoU") and "\n" not in line
    # Improvements are never regressions; runs without labels have nothing to regress.
    assert compare_runs(new, old).regressions(0.0) == []
    unlabelled = RunTables("u", old.masks, old.errors, classes_table([None, None, None]))
    assert compare_runs(unlabelled, new).miou_delta is None and compare_runs(unlabelled, new).regressions(0.0) == []


def test_mask_disagreement_decodes_when_bytes_differ():
    a = np.zeros((4, 5), np.uint8)
    b = a.copy()
    b[1, 2] = 2
    assert mask_disagreement(mask_to_png(a), mask_to_png(a)) == 0.0
    assert mask_disagreement(mask_to_png(a), mask_to_png(b)) == pytest.approx(1 / 20)
    # Same ids, different encoding (no palette, other compression): still no disagreement.
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    Image.fromarray(a, mode="L").save(buffer, format="PNG", compress_level=1)
    assert buffer.getvalue() != mask_to_png(a) and mask_disagreement(buffer.getvalue(), mask_to_png(a)) == 0.0


def _commit(out, run_id: str, committed_at: str | None) -> None:
    run_dir = out / f"run={run_id}"
    run_dir.mkdir(parents=True)
    (run_dir / "_SUCCESS").write_text(json.dumps({"committed_at": committed_at}))


def test_any_split_into_parts_sums_to_the_whole(two_runs):
    """What the Ray job does: compare parts of the joined rows separately, then add the stats."""
    old, new, _ = two_runs
    joined = join_by_key(old.masks, new.masks)
    whole_rows, whole = compare_batch(joined, run_id="n", against="o", examples=4)
    first, second = (
        compare_batch(t, run_id="n", against="o", examples=4) for t in (joined.slice(0, 2), joined.slice(2))
    )
    summed = first[1] + second[1]
    assert summed.statuses == whole.statuses and summed.changed == whole.changed
    assert summed.disagreement_sum == pytest.approx(whole.disagreement_sum)
    assert summed.pixels_old == whole.pixels_old and summed.pixels_new == whole.pixels_new
    assert [e.key for e in summed.examples] == [e.key for e in whole.examples]
    assert pa.concat_tables([first[0], second[0]]).sort_by("key").equals(whole_rows)


def test_committed_runs_in_commit_order_and_run_before(tmp_path):
    out = tmp_path / "out"
    _commit(out, "b-first", "2026-11-24T02:00:00+00:00")
    _commit(out, "a-second", "2026-11-25T02:00:00+00:00")
    _commit(out, "c-third", "2026-11-26T02:00:00+00:00")
    (out / "run=incomplete").mkdir()  # no _SUCCESS: never compared with
    runs = committed_runs(str(out))
    assert runs == ["b-first", "a-second", "c-third"]
    assert run_before(runs, "c-third") == "a-second" and run_before(runs, "b-first") is None
    assert run_before(runs, "incomplete") == "c-third"  # a run that is committing compares with the latest
    assert committed_runs(str(tmp_path / "missing")) == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--fail-on-regression", "0.02"], "--fail-on-regression needs --compare-previous"),
        (["--compare-previous", "--fail-on-regression", "-1"], "--fail-on-regression must be >= 0"),
    ],
)
def test_job_regression_flags_are_checked_before_any_work(argv, message, tmp_path, capsys):
    from pipeline.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["in", "--output", str(tmp_path / "o"), *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
