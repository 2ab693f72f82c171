"""`ray job submit` (the CLI) against a real local head with its job server on loopback, both ways of
shipping the code: uploaded with `--working-dir`, or already installed where the head runs (the
container-image way the RayJob uses, where the entrypoint resolves against the head's working dir)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import DEMO_BUCKET, REPO, free_port, job_args

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))


@dataclass
class Head:
    address: str  # the job server (dashboard) URL that `ray job submit --address` takes
    temp_dir: Path
    env: dict


def _session_pids(sid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid:
            pids.append(int(stat.parent.name))
    return pids


def _stop_session(sid: int) -> None:
    """Stop every process of the session our `ray start` leads. Not `ray stop --force`: that kills
    every Ray process of this user on the machine, including other test runs' clusters."""
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        for pid in _session_pids(sid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + grace
        while _session_pids(sid) and time.time() < deadline:
            time.sleep(0.2)
        if not _session_pids(sid):
            return


@pytest.fixture(scope="module")
def ray_head():
    # A short temp dir: Ray's unix sockets live under it and must stay under 108 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="rayhead", dir="/tmp"))
    dashboard = free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        # the cluster's `python` is the one with the project's dependencies, as in the job image
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_ADDRESS", None)
    ports = {
        "--port": free_port(),
        "--dashboard-port": dashboard,
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(),
        "--ray-client-server-port": free_port(),
    }
    cmd = [
        RAY,
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        "--include-dashboard=true",
        "--num-cpus=2",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        *(f"{flag}={port}" for flag, port in ports.items()),
    ]
    log = open(temp_dir / "ray_start.log", "w")  # noqa: SIM115 (ray start writes it while it runs)
    # cwd=REPO plays the container's WORKDIR: a job without --working-dir runs there.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(
                        "ray start --head failed:\n" + (temp_dir / "ray_start.log").read_text()[-3000:]
                    ) from None
                time.sleep(0.5)
        yield Head(address, temp_dir, env)
    finally:
        _stop_session(proc.pid)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(head: Head, submission_id: str, args: list[str], *, working_dir: Path | None, cwd: Path) -> str:
    cmd = [RAY, "job", "submit", "--address", head.address, "--submission-id", submission_id]
    if working_dir is not None:
        cmd += ["--working-dir", str(working_dir)]
    cmd += ["--", "python", "jobs/segment_bucket.py", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=head.env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    with urllib.request.urlopen(f"{head.address}/api/jobs/{submission_id}", timeout=30) as resp:
        assert json.load(resp)["status"] == "SUCCEEDED"
    return proc.stdout


def check_outputs(run_dir: Path, expected_keys: list[str]) -> None:
    assert (run_dir / "_SUCCESS").exists()
    masks = pq.read_table(run_dir / "masks").to_pylist()
    assert sorted(r["key"] for r in masks) == expected_keys
    assert all(r["crf_ms"] > 0 and r["has_label"] for r in masks)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["counts"]["images"] == len(expected_keys) and manifest["counts"]["errors"] == 0


def demo_keys(n: int) -> list[str]:
    return sorted(p.name for p in (DEMO_BUCKET / "images").glob("*.jpg"))[:n]


def demo_job_args(out: Path, run_id: str, limit: int) -> list[str]:
    return job_args(DEMO_BUCKET, out, run_id, "--limit", str(limit))


def test_submit_with_working_dir(ray_head, tmp_path):
    out = tmp_path / "out"
    # Submitted from elsewhere: only --working-dir brings jobs/ and pipeline/ to the cluster.
    logs = submit(ray_head, "deeplab-working-dir", demo_job_args(out, "submit", 4), working_dir=REPO, cwd=tmp_path)
    assert "deeplab-pipeline run summary" in logs and f"{out}/run=submit" in logs
    check_outputs(out / "run=submit", demo_keys(4))

    packages = [
        p for p in ray_head.temp_dir.glob("session_latest/runtime_resources/working_dir_files/_ray_pkg_*") if p.is_dir()
    ]
    assert len(packages) == 1, packages
    shipped = {p.relative_to(packages[0]).parts[0] for p in packages[0].rglob("*")}
    assert {"jobs", "pipeline"} <= shipped
    assert not shipped & {".venv", ".git", "outputs", "deeplab_pipeline.egg-info"}, shipped
    size = sum(p.stat().st_size for p in packages[0].rglob("*") if p.is_file())
    assert size < 50 * 2**20, f"working_dir upload is {size / 2**20:.1f} MiB"  # Ray's hard limit is 512 MiB


def test_submit_to_installed_environment(ray_head, tmp_path):
    out = tmp_path / "out"
    submit(ray_head, "deeplab-installed", demo_job_args(out, "installed", 2), working_dir=None, cwd=tmp_path)
    check_outputs(out / "run=installed", demo_keys(2))
