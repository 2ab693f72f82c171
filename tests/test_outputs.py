"""Outputs people rely on: resume after a SIGKILLed driver (S3), overwrite protection, the README's
DuckDB queries (local and S3 through fsspec), the Pushgateway summary, Ray's metrics endpoint and
the HTML report rendered in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.cli import build_parser, config_from_args, main
from pipeline.job import run
from tests.conftest import (
    REPO,
    S3_ENV,
    SEGMENT_BUCKET,
    free_port,
    job_env,
    kill_when,
    make_bucket,
    put_bucket,
    run_job,
    sql_block,
)

pytestmark = pytest.mark.slow


def run_queries(con, base: str, run_id: str) -> list[list[tuple]]:
    return [
        con.execute(q.replace("outputs/", f"{base}/").replace("<id>", run_id)).fetchall()
        for q in sql_block(REPO / "README.md")
    ]


def test_resume_after_sigkill_on_s3_and_queries(s3_env, s3_server, tmp_path):
    fs = s3_env
    bucket = make_bucket(tmp_path / "bucket", n=8)
    put_bucket(fs, bucket, "resume")
    s3 = {**S3_ENV, "AWS_ENDPOINT_URL": s3_server}
    common = [
        "s3://resume/in/images",
        "--labels",
        "s3://resume/in/labels",
        "--output",
        "s3://resume/out",
        "--batch-size",
        "1",
        "--infer-actors",
        "1-1",
    ]

    clean = run_job(*common, "--run-id", "clean", timeout=600, **s3)
    assert clean.returncode == 0, clean.stderr[-3000:]

    def two_parts() -> bool:
        fs.invalidate_cache()
        parts = fs.glob("resume/out/run=killed/masks/*.parquet") if fs.exists("resume/out/run=killed/masks") else []
        return len(parts) >= 2

    # Kill the whole driver process group (driver + its local Ray) once some rows are committed.
    cmd = [*SEGMENT_BUCKET, *common, "--run-id", "killed", "--rows-per-file", "1"]
    kill_when(cmd, job_env(**s3), two_parts, waiting_for="two masks part files", timeout=300)
    fs.invalidate_cache()
    assert not fs.exists("resume/out/run=killed/_SUCCESS")

    again = run_job(*common, "--run-id", "killed", timeout=120, **s3)
    assert again.returncode == 2 and "incomplete run" in again.stderr and "--resume" in again.stderr

    resumed = run_job(*common, "--run-id", "killed", "--resume", timeout=600, **s3)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    done = int(re.search(r"(\d+) already done", resumed.stdout).group(1))
    assert 2 <= done < 9

    committed = run_job(*common, "--run-id", "killed", timeout=120, **s3)
    assert committed.returncode == 2 and "committed run" in committed.stderr

    fs.invalidate_cache()

    def table(run_id: str, name: str):
        paths = fs.glob(f"resume/out/run={run_id}/{name}")
        return [pq.read_table(fs.open(p, "rb")) for p in sorted(paths)]

    keys = [
        k
        for t in table("killed", "masks/*.parquet") + table("killed", "errors/*.parquet")
        for k in t.column("key").to_pylist()
    ]
    expected = sorted(p[len("resume/in/images/") :] for p in fs.find("resume/in/images") if p.endswith(".jpg"))
    assert sorted(keys) == expected  # exactly once, nothing lost, nothing duplicated
    clean_classes, resumed_classes = table("clean", "classes.parquet")[0], table("killed", "classes.parquet")[0]
    assert resumed_classes.equals(clean_classes)

    # The README's queries, on S3 through fsspec (no DuckDB extension download needed).
    con = duckdb.connect()
    con.register_filesystem(fs)
    results = run_queries(con, "s3://resume/out", "killed")
    assert all(results)
    runs = dict((r[0], r[1]) for r in results[2])
    assert runs == {"clean": 8, "killed": 8}


def test_local_run_report_pushgateway_and_ray_metrics(tmp_path):
    """In a fresh local Ray with a metrics export port: run, then read every observer's view."""
    gateway_bin = shutil.which("prometheus-pushgateway") or "/usr/bin/prometheus-pushgateway"
    gw_port, metrics_port = free_port(), free_port()
    gateway = subprocess.Popen(
        [gateway_bin, f"--web.listen-address=127.0.0.1:{gw_port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    bucket = make_bucket(tmp_path / "bucket", n=4)
    out = tmp_path / "out"
    code = f"""
import os, sys, urllib.request, time
os.environ["RAY_AUTH_MODE"] = "disabled"
import ray
ray.init(num_cpus=2, include_dashboard=False, _metrics_export_port={metrics_port})
from pipeline.cli import main
rc = main([{str(bucket / "images")!r}, "--labels", {str(bucket / "labels")!r}, "--output", {str(out)!r},
           "--run-id", "night-1", "--pushgateway", "http://127.0.0.1:{gw_port}"])
text = ""
for _ in range(60):  # Ray's agent exports application metrics every few seconds
    text = urllib.request.urlopen("http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    if "ray_deeplab_pipeline_images_total" in text and "ray_deeplab_pipeline_stage_seconds" in text:
        break
    time.sleep(1)
open({str(tmp_path / "ray_metrics.txt")!r}, "w").write(text)
sys.exit(rc)
"""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
            env=job_env(),
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        pushed = urllib.request.urlopen(f"http://127.0.0.1:{gw_port}/metrics", timeout=10).read().decode()
    finally:
        gateway.terminate()
        gateway.wait(timeout=10)

    run_dir = out / "run=night-1"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    # The README's queries on the local output (the S3 test runs them through fsspec).
    results = run_queries(duckdb.connect(), str(out), "night-1")
    assert (
        len(results[0]) == 4 and len(results[1]) == len(manifest["categories"]) and results[2][0][:2] == ("night-1", 4)
    )
    miou = manifest["metrics"]["miou"]
    line = next(ln for ln in pushed.splitlines() if ln.startswith("deeplab_pipeline_miou{") and 'crf="true"' in ln)
    assert 'run_id="night-1"' in line and float(line.split()[-1]) == pytest.approx(miou)
    assert re.search(r'deeplab_pipeline_images_total\{.*stage="segment".*status="ok".*\} 4', pushed)
    assert re.search(r'deeplab_pipeline_images_total\{.*stage="decode".*status="error".*\} 1', pushed)
    assert "deeplab_pipeline_stage_seconds_count{" in pushed and 'stage="crf"' in pushed

    ray_metrics = (tmp_path / "ray_metrics.txt").read_text()
    assert re.search(r'ray_deeplab_pipeline_images_total\{[^}]*stage="crf"[^}]*status="ok"', ray_metrics)
    assert "ray_deeplab_pipeline_stage_seconds_bucket" in ray_metrics

    # The report: self-contained, with every section, and it renders in headless Chromium.
    report = (run_dir / "report.html").read_text()
    assert "<svg" in report and report.count("data:image/webp;base64,") >= 8
    for title in ("Worst images", "Best images", "Images the CRF changed most", "Errors (1)", "corrupt.jpg"):
        assert title in report
    assert not re.search(r'src="(?!data:)', report)  # nothing loaded from outside the file
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is needed to check the report (installed by .ci/system-packages.sh)"
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'chrome'}",
            "--window-size=1100,1800",
            f"--screenshot={shot}",
            f"file://{run_dir / 'report.html'}",
        ],
        capture_output=True,
        timeout=120,
    )
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[0] >= 1000 and pixels.std() > 20  # a rendered page, not a blank one
    if os.environ.get("REPORT_SCREENSHOT"):
        shutil.copy(shot, os.environ["REPORT_SCREENSHOT"])


def test_overwrite_replaces_a_committed_run(ray_local, tmp_path):
    bucket = make_bucket(tmp_path / "bucket", n=2, corrupt=False)
    argv = [str(bucket / "images"), "--output", str(tmp_path / "out"), "--run-id", "r", "--no-crf"]
    run(config_from_args(build_parser().parse_args(argv), build_parser()))
    masks = tmp_path / "out" / "run=r" / "masks"
    first = sorted(masks.iterdir())
    assert main(argv) == 2  # no accidental overwrite
    stale = masks / "part-from-an-older-run.parquet"  # a part the new run would never write
    shutil.copy(first[0], stale)
    written = first[0].stat().st_mtime_ns
    run(config_from_args(build_parser().parse_args([*argv, "--overwrite"]), build_parser()))
    second = sorted(masks.iterdir())
    assert not stale.exists() and second == first  # part names are a hash of their keys
    assert second[0].stat().st_mtime_ns != written
    rows = pq.read_table(second[0])
    assert rows.num_rows == 2 and rows.column("mask_pre_crf").null_count == 2  # --no-crf: no pre-CRF copy
