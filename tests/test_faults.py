"""Faults during a run, through the real CLI: an actor's worker process SIGKILLed mid-run, and an
S3 endpoint that answers 503, resets connections or denies access (tests/faulty_s3.py in front of
moto). In every case the run commits and every key is exactly once in masks ∪ errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, S3_ENV, SEGMENT_BUCKET, job_args, job_env, make_bucket, put_bucket, run_job, run_rows
from tests.fault_hooks import fault_env
from tests.faulty_s3 import FaultyS3

pytestmark = pytest.mark.slow


def input_keys(images: Path) -> list[str]:
    return sorted(p.relative_to(images).as_posix() for p in images.rglob("*") if p.suffix == ".jpg")


def rows(run_dir: Path, kind: str) -> list[dict]:
    folder = run_dir / kind
    return pq.read_table(folder).to_pylist() if folder.exists() and any(folder.iterdir()) else []


def find_workers(job: subprocess.Popen, title: str) -> list[psutil.Process]:
    """Ray worker processes of *this* job whose process title starts with ``title``. Only the job's
    descendants: other Ray clusters on the machine must not be touched."""
    found = []
    for child in psutil.Process(job.pid).children(recursive=True):
        try:
            if " ".join(child.cmdline()).startswith(title):
                found.append(child)
        except psutil.Error:
            pass
    return found


# The job in a Ray that declares a (fake) GPU: the GPU plan with pydensecrf, whose decode and CRF run
# in CPU pools of their own.
_FAKE_GPU_JOB = """
import os, sys
os.environ["RAY_AUTH_MODE"] = "disabled"
import ray
ray.init(num_cpus=3, num_gpus=1, include_dashboard=False)
from pipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("udf", ["Decoder", "Segmenter", "PartWriter", "CRFRefiner"])
def test_actor_killed_mid_run_loses_and_duplicates_nothing(udf, tmp_path):
    """Every pool of both plans: the CPU plan (inference that decodes and refines its own images,
    write) and the GPU plan's CPU pools (decode, CRF). A killed writer's part is rewritten under the
    same name."""
    bucket = make_bucket(tmp_path / "bucket", n=8)
    out = tmp_path / "out"
    args = job_args(bucket, out, "killed", "--batch-size", "1", "--rows-per-file", "2")
    if udf in ("Decoder", "CRFRefiner"):
        cmd = [sys.executable, "-c", _FAKE_GPU_JOB, *args, "--crf-backend", "pydensecrf"]
    else:
        cmd = [*SEGMENT_BUCKET, *args]
    # Decoding 64x64 JPEGs or writing 2 rows takes milliseconds: too short to find that actor busy.
    pause = {"Decoder": {"decode": 0.5}, "PartWriter": {"write": 0.5}}.get(udf)
    job = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=job_env(**(fault_env(pause=pause) if pause else {"PYTHONPATH": str(REPO)})),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    title = f"ray::MapWorker(MapBatches({udf}))"
    try:
        # Ray titles a busy actor "ray::<class>.<method>": wait until this one works on a batch.
        deadline = time.time() + 600
        while not (busy := [w for w in find_workers(job, title) if ".submit" in " ".join(w.cmdline())]):
            assert job.poll() is None, "the run ended before the actor could be killed:\n" + job.stdout.read()[-3000:]
            assert time.time() < deadline, f"no busy {title} worker appeared"
            time.sleep(0.1)
        victim = busy[0]
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        assert not (out / "run=killed" / "_SUCCESS").exists(), "killed after the run had committed"
        output, _ = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode == 0, output[-4000:]
    run_dir = out / "run=killed"
    assert (run_dir / "_SUCCESS").exists()
    masks, errors = rows(run_dir, "masks"), rows(run_dir, "errors")
    keys = [r["key"] for r in masks] + [r["key"] for r in errors]
    assert sorted(keys) == input_keys(bucket / "images")  # nothing lost, nothing duplicated
    assert [r["key"] for r in errors] == ["corrupt.jpg"]  # the kill itself produced no error rows
    assert all(r["crf_ms"] > 0 for r in masks)


def test_transient_s3_faults_are_retried_and_denied_objects_become_read_errors(s3_env, s3_server, tmp_path):
    fs = s3_env
    bucket = make_bucket(tmp_path / "bucket", n=5, corrupt=False)
    (bucket / "images" / "denied.jpg").write_bytes((bucket / "images" / "scene_2000000.jpg").read_bytes())
    (bucket / "images" / "vanished.jpg").write_bytes((bucket / "images" / "scene_2000000.jpg").read_bytes())
    put_bucket(fs, bucket, "flaky")
    keys = input_keys(bucket / "images")

    with FaultyS3(s3_server) as proxy:
        # Transient: 503s and connection resets on image reads and on the first writes of a masks
        # part file (the PUT), each fewer than the configured attempts. Five 503s in a row are
        # more than botocore's default (5 attempts) survives: pipeline/io/storage.py's S3_RETRIES does.
        flaky_503 = proxy.fail("503", r"^/flaky/in/images/scene_2000000\.jpg$", method="GET", times=5)
        flaky_reset = proxy.fail("reset", r"^/flaky/in/images/sub/scene_2000001\.jpg$", method="GET", times=2)
        part_503 = proxy.fail("503", r"^/flaky/out/run=f/masks/part-.*\.parquet$", method="PUT", times=2)
        part_reset = proxy.fail("reset", r"^/flaky/out/run=f/masks/part-.*\.parquet$", method="PUT", times=1)
        # Permanent: one object the credentials may not read, one that is gone when it is read.
        proxy.fail("403", r"^/flaky/in/images/denied\.jpg$", method="GET")
        proxy.fail("404", r"^/flaky/in/images/vanished\.jpg$", method="GET")
        started = time.time()
        args = ["s3://flaky/in/images", "--labels", "s3://flaky/in/labels", "--output", "s3://flaky/out"]
        proc = run_job(
            *args, "--run-id", "f", "--no-crf", "--batch-size", "2", **S3_ENV, AWS_ENDPOINT_URL=proxy.endpoint
        )
        elapsed = time.time() - started
        assert proc.returncode == 0, proc.stderr[-4000:]
        for rule in (flaky_503, flaky_reset, part_503, part_reset):
            assert rule.hits == rule.times, rule  # the faults really happened
        # Denials are final: one GET each, no retries.
        assert proxy.count("GET", r"^/flaky/in/images/denied\.jpg$") == 1
        assert proxy.count("GET", r"^/flaky/in/images/vanished\.jpg$") == 1

    fs.invalidate_cache()
    assert fs.exists("flaky/out/run=f/_SUCCESS")

    masks, errors = run_rows(fs, "flaky/out/run=f", "masks"), run_rows(fs, "flaky/out/run=f", "errors")
    assert sorted([r["key"] for r in masks] + [r["key"] for r in errors]) == keys
    assert sorted(r["key"] for r in masks) == [k for k in keys if k not in ("denied.jpg", "vanished.jpg")]
    by_key = {r["key"]: r for r in errors}
    assert set(by_key) == {"denied.jpg", "vanished.jpg"}
    for key, error_type, reason in (
        ("denied.jpg", "PermissionError", "Access Denied"),
        ("vanished.jpg", "FileNotFoundError", "does not exist"),
    ):
        error = by_key[key]
        assert error["stage"] == "read" and error["error_type"] == error_type, error
        assert error["message"].startswith(f"cannot read s3://flaky/in/images/{key}: ") and reason in error["message"]
    print(f"\n[faults] run with injected S3 faults took {elapsed:.0f}s")
