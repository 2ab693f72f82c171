"""Hostile inputs on a real S3 server: every key ends exactly once in masks ∪ errors, valid but
unusual images are segmented, broken ones are error rows with a clear stage and reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.evaluation.per_image import result_table
from pipeline.io.decode import decode_batch
from pipeline.io.images import MAX_IMAGE_BYTES
from pipeline.io.storage import ObjectTooLarge, list_inputs, open_fs, read_object
from pipeline.rows.errors import split_results
from tests.conftest import S3_ENV, run_job, run_rows
from tests.hostile import NOT_LISTED, write_hostile_bucket, write_local_hostile_folder


def decoded_rows(images: str, labels: str | None) -> dict[str, tuple[str, str]]:
    """{key: (stage or "mask", error message or label_error)} after the real read + decode step."""
    inputs = list_inputs(images, labels)
    keys, locator = inputs.keys.to_pylist(), inputs.locator()
    batch = {
        "key": np.array(keys, dtype=object),
        "uri": np.array([locator.image_uri(k) for k in keys], dtype=object),
        "label_uri": np.array([locator.label_uri(k) for k in keys], dtype=object),
    }
    out = decode_batch(batch, storage_options={}, num_classes=21, max_pixels=50_000_000, locator=locator)
    return {
        k: (out["error_stage"][i] or "mask", out["error_message"][i] or out["label_error"][i])
        for i, k in enumerate(keys)
    }


def test_every_hostile_input_is_its_own_row_before_any_pixel_is_decoded(tmp_path):
    expected = write_hostile_bucket(tmp_path)
    got = decoded_rows(str(tmp_path / "images"), str(tmp_path / "labels"))
    assert sorted(got) == sorted(expected)
    for key, (outcome, part) in expected.items():
        stage, message = got[key]
        assert stage == outcome, (key, got[key])
        assert (part or "").lower() in message.lower() and (part is not None or not message), (key, got[key])


def test_local_listing_holds_regular_files_under_the_root_and_escapes_odd_names(tmp_path):
    expected = write_local_hostile_folder(tmp_path / "in", outside=tmp_path / "outside")
    got = decoded_rows(str(tmp_path / "in" / "images"), None)  # a FIFO would hang here, /dev/zero never end
    assert sorted(got) == sorted(expected), NOT_LISTED
    for key, (outcome, part) in expected.items():
        assert got[key][0] == outcome and (part or "") in got[key][1], (key, got[key])


def put_objects(endpoint: str, bucket: str, objects: dict[str, bytes]) -> None:
    """Upload with boto3: s3fs would read ``?versionId=`` in a key as a version and store another key."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    if bucket not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=bucket)
    for key, data in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=data)


def test_reads_are_exact_and_bounded_on_s3(s3_env, s3_server):
    objects = {"a.jpg": b"A", "a.jpg?versionId=null.jpg": b"B", "x::a.jpg": b"C", "empty.jpg": b""}
    put_objects(s3_server, "exact", {f"in/{k}": v for k, v in objects.items()} | {"in/big.jpg": b"x" * 5000})
    s3, _ = open_fs("s3://exact/in")
    assert read_object(s3, "exact/in/a.jpg?versionId=null.jpg", 10) == b"B"
    assert read_object(s3, "exact/in/x::a.jpg", 10) == b"C"
    assert read_object(s3, "exact/in/empty.jpg", 10) == b""
    assert read_object(s3, "exact/in/big.jpg", 5000) == b"x" * 5000
    with pytest.raises(ObjectTooLarge, match="object size limit"):
        read_object(s3, "exact/in/big.jpg", 4999)
    with pytest.raises(FileNotFoundError):
        read_object(s3, "exact/in/missing.jpg", 10)


def test_a_sparse_local_object_over_the_limit_is_refused_unread(tmp_path):
    path = tmp_path / "huge.jpg"
    with open(path, "wb") as f:
        f.truncate(10 * MAX_IMAGE_BYTES)
    local, root = open_fs(str(tmp_path))
    with pytest.raises(ObjectTooLarge, match="object size limit"):
        read_object(local, str(path), MAX_IMAGE_BYTES, root=root)


def test_a_value_that_cannot_be_stored_is_its_rows_error_not_its_batchs():
    n = 3
    batch = {
        "key": np.array(["a", "b\udcff", "c"], dtype=object),
        "uri": np.array(["u"] * n, dtype=object),
        "height": np.array([2, 2, 2]),
        "width": np.array([2, 2, 2]),
        "has_label": np.zeros(n, bool),
        "label_error": np.array([""] * n, dtype=object),
        "error_stage": np.array([""] * n, dtype=object),
        "error_type": np.array([""] * n, dtype=object),
        "error_message": np.array([""] * n, dtype=object),
        "mask_pre": np.array([bytes(4)] * n, dtype=object),
    }
    batch["exif_orientation"] = np.array([1, 2**40, 0], dtype=np.int64)  # an int32 column
    table = result_table(batch, num_classes=2, model="m", weights_sha256="s", run_id="r")
    masks, errors = split_results(table)
    assert masks.column("key").to_pylist() == ["a", "c"]
    assert errors.column("key").to_pylist() == ["b\\xff"] and errors.column("stage").to_pylist() == ["write"]
    assert isinstance(table, pa.Table)


@pytest.mark.slow
def test_hostile_bucket_on_s3(s3_env, s3_server, tmp_path):
    fs = s3_env
    expected = write_hostile_bucket(tmp_path / "hostile")
    files = [p for p in sorted((tmp_path / "hostile").rglob("*")) if p.is_file()]
    put_objects(
        s3_server, "hostile", {f"in/{p.relative_to(tmp_path / 'hostile').as_posix()}": p.read_bytes() for p in files}
    )
    args = ["s3://hostile/in/images", "--labels", "s3://hostile/in/labels", "--output", "s3://hostile/out"]
    proc = run_job(*args, "--run-id", "h", "--scales", "0.5,1.0", "--flip", **S3_ENV, AWS_ENDPOINT_URL=s3_server)
    assert proc.returncode == 0, proc.stderr[-4000:]
    fs.invalidate_cache()
    assert fs.exists("hostile/out/run=h/_SUCCESS")

    masks, errors = run_rows(fs, "hostile/out/run=h", "masks"), run_rows(fs, "hostile/out/run=h", "errors")
    keys = [r["key"] for r in masks] + [r["key"] for r in errors]
    assert sorted(keys) == sorted(expected)  # exactly once each
    by_key = {r["key"]: r for r in masks}
    for r in errors:
        stage, part = expected[r["key"]]
        assert stage == r["stage"], (r["key"], r)
        assert part.lower() in r["message"].lower(), (r["key"], r["message"])
        assert r["error_type"] and len(r["message"]) < 1000
    for key, (outcome, label_problem) in expected.items():
        if outcome == "mask":
            assert key in by_key, (key, [e for e in errors if e["key"] == key])
            row = by_key[key]
            if label_problem:  # segmented, its label not scored and never counted in the metrics
                assert label_problem in row["label_error"] and not row["has_label"], row["label_error"]
                assert row["miou"] is None and row["intersect"] is None and row["mask"]
            else:
                assert row["label_error"] is None, (key, row["label_error"])
    manifest = json.loads(fs.cat("hostile/out/run=h/manifest.json"))
    label_errors = sum(1 for outcome, part in expected.values() if outcome == "mask" and part)
    assert manifest["counts"]["label_errors"] == label_errors and manifest["counts"]["labelled"] == 1
    assert f"labels not scored: {label_errors}" in proc.stdout
    rotated = by_key["exif-rotated.jpg"]
    assert (rotated["height"], rotated["width"], rotated["exif_orientation"]) == (128, 96, 6)
    assert (by_key["tiny-1x1.png"]["height"], by_key["tiny-1x1.png"]["width"]) == (1, 1)
    assert by_key["ok.jpg"]["has_label"] and by_key["ok.jpg"]["miou"] is not None


@pytest.mark.slow
def test_hostile_local_folder_commits_with_one_row_per_listed_file(tmp_path):
    expected = write_local_hostile_folder(tmp_path / "in", outside=tmp_path / "outside")
    args = [str(tmp_path / "in" / "images"), "--output", str(tmp_path / "out"), "--run-id", "l", "--scales", "1.0"]
    proc = run_job(*args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    import fsspec

    fs = fsspec.filesystem("file")
    run = str(tmp_path / "out" / "run=l")
    assert fs.exists(f"{run}/_SUCCESS")
    masks, errors = run_rows(fs, run, "masks"), run_rows(fs, run, "errors")
    assert sorted([r["key"] for r in masks] + [r["key"] for r in errors]) == sorted(expected)
    for r in errors:
        stage, part = expected[r["key"]]
        assert stage == r["stage"] and part in r["message"], r


@pytest.mark.slow
def test_thirty_poison_inputs_in_a_thousand_commit_with_thirty_error_rows(tmp_path):
    """Systemic failure counts culprits: 30 inputs that crash their worker, spread so that each
    batch holds one, are 30 error rows, not the 480 keys of their batches. The actors isolate them
    from their flight records (pipeline/rows/flight.py), about one worker restart each: minutes, where
    the runner's passes alone took over 30 (docs/faults.md)."""
    from PIL import Image

    from tests.fault_hooks import fault_env

    images = tmp_path / "in" / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(29)
    keys = [f"{i:04d}.jpg" for i in range(1000)]
    for key in keys:
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(images / key, quality=80)
    poison = keys[5::33][:30]
    args = [str(images), "--output", str(tmp_path / "out"), "--run-id", "p", "--scales", "1.0", "--no-crf"]
    proc = run_job(*args, **fault_env(crash_keys=poison))
    assert proc.returncode == 0, proc.stderr[-4000:]
    import pyarrow.parquet as pq

    run = tmp_path / "out" / "run=p"
    assert (run / "_SUCCESS").exists()
    masks = pq.read_table(run / "masks", columns=["key"]).column("key").to_pylist()
    errors = pq.read_table(run / "errors").to_pylist()
    assert (len(masks), len(errors)) == (970, 30)
    assert sorted(masks + [r["key"] for r in errors]) == keys  # every key exactly once
    assert sorted(r["key"] for r in errors) == sorted(poison)
    assert {r["error_type"] for r in errors} == {"WorkerDied"}
    assert {r["stage"] for r in errors} == {"decode"}
    assert "isolated by the actors: 30" in proc.stdout  # no input needed the runner's passes


def test_workers_make_the_reports_thumbnails_and_the_report_reads_no_input(tmp_path):
    """The driver never decodes an input: the decode step stores a small WebP thumbnail (and the
    label's ids at its size) with the row, and pipeline/evaluation/report.py has no way to read storage."""
    import io

    from PIL import Image

    import pipeline.evaluation.report

    expected = write_hostile_bucket(tmp_path)
    inputs = list_inputs(str(tmp_path / "images"), str(tmp_path / "labels"))
    keys = ["ok.jpg", "exif-rotated.jpg", "elongated-10000x8.png", "bomb.png"]
    locator = inputs.locator()
    batch = {
        "key": np.array(keys, dtype=object),
        "uri": np.array([locator.image_uri(k) for k in keys], dtype=object),
        "label_uri": np.array([locator.label_uri(k) for k in keys], dtype=object),
    }
    out = decode_batch(batch, storage_options={}, num_classes=21, max_pixels=50_000_000, locator=locator)
    sizes = {}
    for i, key in enumerate(keys[:3]):
        with Image.open(io.BytesIO(out["thumbnail"][i]), formats=["WEBP"]) as thumb:
            sizes[key] = thumb.size
        assert len(out["thumbnail"][i]) < 20_000
    assert sizes["ok.jpg"] == (128, 96) and sizes["exif-rotated.jpg"] == (96, 128)  # upright, never enlarged
    assert sizes["elongated-10000x8.png"][0] == 240
    assert out["label_thumbnail"][0] and not out["label_thumbnail"][1]  # only ok.jpg has a usable label
    assert out["thumbnail"][3] == b"" and expected["bomb.png"][0] == "decode"  # a refused input has none
    source = Path(pipeline.evaluation.report.__file__).read_text()
    assert "pipeline.io.storage" not in source and "read_bytes" not in source and "read_object" not in source
