"""Three real nights over one small bucket, then every view of them: the uncertainty columns against
a direct numpy computation, the comparison against numpy on the mask PNGs, the regression gate
(job and compare_runs.py), the Pushgateway gauges, the report, and docs/uncertainty.md's queries.

night-1: default CRF. night-2: --crf-bilateral-srgb 30 (masks change, nothing else does).
night-3: as night-2 with a noise-degraded checkpoint and one new kind of bad input.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
import urllib.request
from types import SimpleNamespace

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.cli import main
from pipeline.inference.multiscale import load_model, predict_probs
from pipeline.io.images import decode_image
from pipeline.models.deeplabv3plus import DEMO_WEIGHTS
from pipeline.rows.schema import COMPARISON_CLASSES_SCHEMA, COMPARISON_SCHEMA
from tests.conftest import REPO, free_port, make_bucket, sql_block

pytestmark = pytest.mark.slow

# make_bucket(n=4) puts odd scenes under sub/; blank.png is a uniform image, on which the bilateral
# kernel cannot depend on colour, so its CRF mask is the same for every --crf-bilateral-srgb.
UNLABELLED = ("blank.png", "scene_2000002.jpg", "sub/scene_2000003.jpg")


def degraded_checkpoint(path) -> str:
    """The demo checkpoint with Gaussian noise (half each kernel's std) on every conv/linear kernel."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(DEMO_WEIGHTS.uri, "pt") as f:
        metadata = f.metadata()  # keeps 'categories', so class names match the healthy runs
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, tensor in load_file(DEMO_WEIGHTS.uri).items():
        if name.endswith("weight") and tensor.ndim >= 2:
            tensor = tensor + 0.5 * tensor.std() * torch.randn(tensor.shape, generator=generator)
        state[name] = tensor.contiguous()
    save_file(state, str(path), metadata=metadata)
    return str(path)


def run_job(argv: list[str]) -> SimpleNamespace:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return SimpleNamespace(rc=rc, stdout=out.getvalue(), stderr=err.getvalue())


def compare_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / "compare_runs.py"), *args], capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def nights(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("nights")
    bucket = make_bucket(root / "bucket", n=4)
    for key in UNLABELLED[1:]:
        (bucket / "labels" / key.replace(".jpg", ".png")).unlink()
    Image.fromarray(np.full((64, 96, 3), 128, np.uint8)).save(bucket / "images" / "blank.png")
    out = root / "out"
    port = free_port()
    gateway = subprocess.Popen(
        [
            shutil.which("prometheus-pushgateway") or "/usr/bin/prometheus-pushgateway",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    common = [
        str(bucket / "images"),
        "--labels",
        str(bucket / "labels"),
        "--output",
        str(out),
        "--compare-previous",
        "--pushgateway",
        f"http://127.0.0.1:{port}",
    ]
    try:
        night1 = run_job([*common, "--run-id", "night-1"])
        night2 = run_job([*common, "--run-id", "night-2", "--crf-bilateral-srgb", "30", "--fail-on-regression", "0.5"])
        pushed = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        # A new kind of bad input: an empty image (corrupt.jpg, truncated, fails every night).
        (bucket / "images" / "extra.jpg").write_bytes(b"")
        night3 = run_job(
            [
                *common,
                "--run-id",
                "night-3",
                "--crf-bilateral-srgb",
                "30",
                "--fail-on-regression",
                "0.02",
                "--weights",
                degraded_checkpoint(root / "degraded.safetensors"),
            ]
        )
    finally:
        gateway.terminate()
        gateway.wait(timeout=10)
    return SimpleNamespace(
        bucket=bucket, out=out, pushed=pushed, jobs={"night-1": night1, "night-2": night2, "night-3": night3}
    )


def masks_of(nights, run_id: str) -> dict[str, dict]:
    return {r["key"]: r for r in pq.read_table(nights.out / f"run={run_id}" / "masks").to_pylist()}


def ids(png: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(png)))


def test_uncertainty_columns_match_numpy(nights):
    assert nights.jobs["night-1"].rc == 0, nights.jobs["night-1"].stderr[-3000:]
    rows = masks_of(nights, "night-1")
    assert len(rows) == 5
    model, _, categories = load_model(DEMO_WEIGHTS.model, None)
    num_classes = len(categories)
    mean, std = DEMO_WEIGHTS.normalisation()
    for key, row in rows.items():
        assert 1 / num_classes <= row["mean_max_prob"] <= 1
        assert 0 <= row["mean_entropy"] <= np.log(num_classes) and 0 <= row["mean_entropy_norm"] <= 1
        assert 0 <= row["low_conf_fraction"] <= 1 and 0 <= row["crf_changed_fraction"] <= 1
        pre, post = ids(row["mask_pre_crf"]), ids(row["mask"])
        assert row["crf_changed_fraction"] == (pre != post).mean()

        # The job ran --scales 1.0 without flip (the defaults): the same probabilities, recomputed here.
        rgb = decode_image((nights.bucket / "images" / key).read_bytes()).rgb
        probs = predict_probs(model, rgb, mean=mean, std=std, scales=(1.0,), flip=False).double().numpy()
        top = probs.max(axis=0)
        entropy = -(probs * np.log(np.clip(probs, 1e-12, None))).sum(axis=0)
        assert row["mean_max_prob"] == pytest.approx(top.mean(), abs=1e-5)
        assert row["mean_entropy"] == pytest.approx(entropy.mean(), abs=1e-5)
        assert row["mean_entropy_norm"] == pytest.approx(entropy.mean() / np.log(num_classes), abs=1e-5)
        # A pixel whose top probability sits within float noise of 0.5 may fall on either side.
        assert row["low_conf_fraction"] == pytest.approx((top < 0.5).mean(), abs=1e-3)
        assert (probs.argmax(axis=0) == pre).mean() > 0.999


def test_comparison_finds_exactly_the_changed_masks(nights):
    job1, job2 = nights.jobs["night-1"], nights.jobs["night-2"]
    assert job1.rc == 0 and job2.rc == 0, job2.stderr[-3000:]
    assert "no earlier committed run" in job1.stdout
    assert not (nights.out / "run=night-1" / "comparison").exists()
    assert "=== comparison: run night-2 against run night-1 ===" in job2.stdout

    run_dir = nights.out / "run=night-2"
    images = pq.read_table(run_dir / "comparison")
    assert images.schema.equals(COMPARISON_SCHEMA, check_metadata=False)
    old, new = masks_of(nights, "night-1"), masks_of(nights, "night-2")
    expected = {key: float((ids(old[key]["mask"]) != ids(new[key]["mask"])).mean()) for key in new}
    rows = {r["key"]: r for r in images.to_pylist()}
    assert {k: (r["status"], r["disagreement"]) for k, r in rows.items()} == {
        k: ("both", d) for k, d in expected.items()
    }
    changed = {k for k, d in expected.items() if d > 0}
    assert changed and "blank.png" not in changed, "a 10x colour bandwidth changes the CRF masks of real scenes"
    assert {k for k, r in rows.items() if r["disagreement"] > 0} == changed
    # The unrefined masks did not change: the CRF setting is the only difference.
    assert all(old[k]["mask_pre_crf"] == new[k]["mask_pre_crf"] for k in new)

    classes = pq.read_table(run_dir / "comparison_classes.parquet")
    assert classes.schema.equals(COMPARISON_CLASSES_SCHEMA, check_metadata=False)
    iou_old = pq.read_table(nights.out / "run=night-1" / "classes.parquet").column("iou").to_pylist()
    iou_new = pq.read_table(run_dir / "classes.parquet").column("iou").to_pylist()
    assert classes.column("iou_old").to_pylist() == iou_old and classes.column("iou_new").to_pylist() == iou_new
    summary = json.loads((run_dir / "comparison.json").read_text())
    manifests = [json.loads((nights.out / f"run={r}" / "manifest.json").read_text()) for r in ("night-1", "night-2")]
    miou_delta = manifests[1]["metrics"]["miou"] - manifests[0]["metrics"]["miou"]
    assert summary["miou_delta"] == pytest.approx(miou_delta, abs=1e-12)
    assert summary["changed_images"] == len(changed) and summary["new_errors"] == []

    # The night's Pushgateway summary carries the comparison.
    def gauge(name: str) -> float:
        line = next(ln for ln in nights.pushed.splitlines() if ln.startswith(name + "{"))
        assert 'against="night-1"' in line and 'run_id="night-2"' in line
        return float(line.split()[-1])

    assert gauge("deeplab_pipeline_miou_delta") == pytest.approx(miou_delta, abs=1e-9)
    assert gauge("deeplab_pipeline_changed_images") == len(changed)

    # The report: previous vs current masks for the most changed images, least confident images.
    report = (run_dir / "report.html").read_text()
    section = report.split("Biggest changes since run night-1")[1]
    most_changed = max(changed, key=lambda k: (expected[k], k))
    assert re.search(r"<h4>(.*?)</h4>", section).group(1).startswith(most_changed)
    assert section.count("previous run</figcaption>") == min(len(changed), 4)
    assert not re.search(r'src="(?!data:)', report)
    least = report.split("Least confident images")[1]
    assert re.search(r"<h4>(.*?)</h4>", least).group(1).startswith(min(new, key=lambda k: new[k]["mean_max_prob"]))
    assert "Biggest changes" not in (nights.out / "run=night-1" / "report.html").read_text()


def test_degraded_model_trips_the_regression_gate(nights):
    job = nights.jobs["night-3"]
    assert job.rc == 3, job.stderr[-3000:]
    reasons = [ln for ln in job.stderr.splitlines() if ln.startswith("segment_bucket.py:")]
    assert len(reasons) == 1 and reasons[0].startswith(
        "segment_bucket.py: regression against run night-2 (threshold 0.02): mIoU"
    )
    run_dir = nights.out / "run=night-3"
    assert (run_dir / "_SUCCESS").exists()  # committed first: the exit code is the alarm, the outputs stay
    summary = json.loads((run_dir / "comparison.json").read_text())
    assert summary["miou_delta"] < -0.02
    assert [(e["stage"], e["error_type"], e["example_key"]) for e in summary["new_errors"]] == [
        ("decode", "ValueError", "extra.jpg")
    ]
    assert summary["images"] == {"both": 5, "added": 0, "removed": 0}
    written = pq.read_table(run_dir / "comparison").sort_by("key")

    cli = compare_cli(str(nights.out), "--fail-on-regression", "0.02")  # default: latest vs the one before
    assert cli.returncode == 3, cli.stderr
    # Ray's own log lines share stderr now that the comparison runs on Ray Data; ours are prefixed.
    ours = [line for line in cli.stderr.splitlines() if line.startswith("compare_runs.py:")]
    assert ours == [reasons[0].replace("segment_bucket.py", "compare_runs.py")]
    assert "=== comparison: run night-3 against run night-2 ===" in cli.stdout
    assert pq.read_table(run_dir / "comparison").sort_by("key").equals(written)

    ok = compare_cli(str(nights.out), "--run", "night-2", "--fail-on-regression", "0.5", "--no-write")
    assert ok.returncode == 0 and "run night-2 against run night-1" in ok.stdout, ok.stderr
    missing = compare_cli(str(nights.out), "--run", "night-9")
    assert missing.returncode == 2 and "night-9" in missing.stderr


def docs_queries() -> list[str]:
    return sql_block(REPO / "docs" / "uncertainty.md")


def test_docs_queries(nights):
    con = duckdb.connect()
    queue, classes, changes, deltas, trend = [
        con.execute(q.replace("outputs/", f"{nights.out}/").replace("<id>", "night-2")).fetchall()
        for q in docs_queries()
    ]
    masks = masks_of(nights, "night-2")

    assert [r[0] for r in queue] == sorted(UNLABELLED, key=lambda k: masks[k]["mean_max_prob"])
    assert [r[2] for r in queue] == [masks[r[0]]["mean_max_prob"] for r in queue]

    # Per class: image confidence weighted by the class's predicted pixels, recomputed with numpy.
    names = pq.read_table(nights.out / "run=night-2" / "classes.parquet").to_pylist()
    pixels = np.array([m["class_pixels"] for m in masks.values()], dtype=float)
    confidence = np.array([m["mean_max_prob"] for m in masks.values()])
    present = pixels.sum(axis=0) > 0
    expected = (pixels * confidence[:, None]).sum(axis=0)[present] / pixels.sum(axis=0)[present]
    got = {r[0]: r for r in classes}
    assert sorted(got) == sorted(c["class_name"] for c, p in zip(names, present, strict=True) if p)
    for c, value in zip([c for c, p in zip(names, present, strict=True) if p], expected, strict=True):
        assert got[c["class_name"]][2] == pytest.approx(value) and got[c["class_name"]][4] == c["iou"]
    assert [r[2] for r in classes] == sorted(r[2] for r in classes)

    comparison = pq.read_table(nights.out / "run=night-2" / "comparison").to_pylist()
    assert sorted((r[0], r[1]) for r in changes) == sorted(
        (r["key"], r["disagreement"]) for r in comparison if r["disagreement"]
    )
    assert len(deltas) == len(names)
    assert [(r[0], r[1]) for r in trend] == [("night-1", 5), ("night-2", 5), ("night-3", 5)]
    assert all(1 / len(names) <= r[2] <= 1 for r in trend)


def test_compare_runs_on_s3(nights, s3_env, s3_server):
    """The same three nights copied to a real S3 API: listing, commit order, reading and writing."""
    import os

    from tests.conftest import S3_ENV

    fs = s3_env
    fs.mkdir("cmp")
    fs.put(str(nights.out) + "/", "cmp/out/", recursive=True)
    fs.rm([p for p in fs.find("cmp/out/run=night-3") if "/comparison" in p])
    env = {**os.environ, **S3_ENV, "AWS_ENDPOINT_URL": s3_server}
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "compare_runs.py"), "s3://cmp/out"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "run night-3 against run night-2" in proc.stdout
    assert "s3://cmp/out/run=night-3/comparison/" in proc.stdout
    fs.invalidate_cache()
    parts = [pq.read_table(fs.open(p, "rb")) for p in sorted(fs.glob("cmp/out/run=night-3/comparison/*.parquet"))]
    local = pq.read_table(nights.out / "run=night-3" / "comparison")
    assert pa.concat_tables(parts).sort_by("key").equals(local.sort_by("key"))
