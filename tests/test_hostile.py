"""Hostile inputs on a real S3 server: every key ends exactly once in masks ∪ errors, valid but
unusual images are segmented, broken ones are error rows with a clear stage and reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, S3_ENV, run_rows
from tests.hostile import write_hostile_bucket

pytestmark = pytest.mark.slow


def test_hostile_bucket_on_s3(s3_env, s3_server, tmp_path):
    fs = s3_env
    expected = write_hostile_bucket(tmp_path / "hostile")
    fs.mkdir("hostile")
    for path in sorted((tmp_path / "hostile").rglob("*")):
        if path.is_file():
            fs.pipe(f"hostile/in/{path.relative_to(tmp_path / 'hostile').as_posix()}", path.read_bytes())
    env = {**os.environ, **S3_ENV, "AWS_ENDPOINT_URL": s3_server, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "jobs" / "segment_bucket.py"),
            "s3://hostile/in/images",
            "--labels",
            "s3://hostile/in/labels",
            "--output",
            "s3://hostile/out",
            "--run-id",
            "h",
            "--scales",
            "0.5,1.0",
            "--flip",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
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
    assert manifest["counts"]["label_errors"] == 3 and manifest["counts"]["labelled"] == 1
    assert "labels not scored: 3" in proc.stdout
    rotated = by_key["exif-rotated.jpg"]
    assert (rotated["height"], rotated["width"], rotated["exif_orientation"]) == (128, 96, 6)
    assert (by_key["tiny-1x1.png"]["height"], by_key["tiny-1x1.png"]["width"]) == (1, 1)
    assert by_key["ok.jpg"]["has_label"] and by_key["ok.jpg"]["miou"] is not None
