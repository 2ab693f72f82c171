"""Shared fixtures: a local Ray, a real S3 server (moto_server) on loopback, small input buckets."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_BUCKET = REPO / "pipeline" / "demo" / "assets" / "demo_bucket"
SEGMENT_BUCKET = [sys.executable, str(REPO / "jobs" / "segment_bucket.py")]


def job_args(bucket: Path, out: Path, run_id: str, *extra: str) -> list[str]:
    """segment_bucket.py's arguments for BUCKET/images and BUCKET/labels, written to OUT as run RUN_ID."""
    return [
        str(bucket / "images"),
        "--labels",
        str(bucket / "labels"),
        "--output",
        str(out),
        "--run-id",
        run_id,
        *extra,
    ]


def demo_config(**fields):
    """A run's configuration: the demo model on its published weights, no labels, run "r" from "in"
    to "out", with ``fields`` over those (``pipeline.config.sections.JobConfig``'s own)."""
    from pipeline.config.sections import JobConfig

    base = dict(input_uri="in", output_uri="out", labels_uri=None, model="deeplabv3plus_demo", weights_uri=None)
    return JobConfig(**(base | {"run_id": "r"} | fields))


def job_env(**extra: str) -> dict[str, str]:
    """The environment of a job started as a subprocess: this one's, with ``extra``, token auth off
    and no RAY_ADDRESS, so that it starts a local Ray of its own (a child of the job process)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def run_job(*args: str, script: str = "segment_bucket.py", timeout: float = 900, **env: str):
    """``jobs/<script> ARGS`` in a fresh interpreter and ``job_env(**env)``, its output captured."""
    cmd = [sys.executable, str(REPO / "jobs" / script), *args]
    return subprocess.run(cmd, env=job_env(**env), capture_output=True, text=True, timeout=timeout)


def kill_when(cmd: list[str], env: dict[str, str], ready, *, waiting_for: str, timeout: float = 600) -> None:
    """Start ``cmd`` in a process group of its own and SIGKILL the whole group (the driver and its
    local Ray) as soon as ``ready()``; fails if the run ends first or ``waiting_for`` never happens."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ready():
                break
            assert proc.poll() is None, f"the run finished before it could be killed (waiting for {waiting_for})"
            time.sleep(0.2)
        else:
            pytest.fail(f"{waiting_for}: not within {timeout:.0f} s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def demo_segmenter(**kwargs):
    """The inference actor's class on the bundled demo weights: one CPU thread, result rows out;
    ``kwargs`` replace fields of its ``InferSpec``."""
    from dataclasses import replace

    from pipeline.config.sections import InferenceConfig
    from pipeline.inference.segmenter import InferSpec, Segmenter
    from pipeline.models import default_weights

    spec = InferSpec(weights=default_weights("deeplabv3plus_demo"), inference=InferenceConfig(), storage_options={},
                     run_id="t", use_gpu=False, threads=1, crf_follows=False)  # fmt: skip
    return Segmenter(replace(spec, **kwargs))


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the in-process tests (2 CPUs, like the machine), shut down at the end."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API server (moto_server) on a free loopback port; yields its endpoint URL."""
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.2)
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture()
def s3_env(s3_server, monkeypatch):
    """Standard AWS environment pointing at the loopback S3 server; returns an s3fs filesystem."""
    import s3fs

    for k, v in {**S3_ENV, "AWS_ENDPOINT_URL": s3_server}.items():
        monkeypatch.setenv(k, v)
    fs = s3fs.S3FileSystem(
        key=S3_ENV["AWS_ACCESS_KEY_ID"],
        secret=S3_ENV["AWS_SECRET_ACCESS_KEY"],
        endpoint_url=s3_server,
        skip_instance_cache=True,
    )
    return fs


def make_bucket(root: Path, n: int = 6, *, corrupt: bool = True) -> Path:
    """Copy ``n`` demo scenes (images + labels) under ``root`` and add one corrupt JPEG."""
    (root / "images" / "sub").mkdir(parents=True)
    (root / "labels" / "sub").mkdir(parents=True)
    images = sorted((DEMO_BUCKET / "images").glob("*.jpg"))[:n]
    for i, image in enumerate(images):
        sub = "sub/" if i % 2 else ""  # exercise recursive listing and key pairing
        shutil.copy(image, root / "images" / f"{sub}{image.name}")
        shutil.copy(DEMO_BUCKET / "labels" / f"{image.stem}.png", root / "labels" / f"{sub}{image.stem}.png")
    if corrupt:
        (root / "images" / "corrupt.jpg").write_bytes(images[0].read_bytes()[:300])
        (root / "images" / "notes.txt").write_text("not an image, must not be listed")
    return root


def put_bucket(fs, bucket: Path, name: str) -> None:
    """A local bucket folder (images/, labels/) as s3://NAME/in/ on the test S3 server (``fs``: s3_env's)."""
    fs.mkdir(name)
    fs.put(str(bucket) + "/", f"{name}/in/", recursive=True)


@pytest.fixture()
def local_bucket(tmp_path) -> Path:
    return make_bucket(tmp_path / "bucket")


def sql_block(path: Path) -> list[str]:
    """The statements of the first ```sql block in a Markdown file, comment lines dropped: tests run
    exactly the queries the docs show."""
    block = re.search(r"```sql\n(.*?)```", path.read_text(), re.S).group(1)
    queries = []
    for chunk in block.split(";"):
        sql = "\n".join(line for line in chunk.splitlines() if not line.strip().startswith("--")).strip()
        if sql:
            queries.append(sql)
    return queries


def run_rows(fs, run_dir: str, kind: str) -> list[dict]:
    """All rows of a run's ``masks`` or ``errors`` part files, read through filesystem ``fs``."""
    import pyarrow.parquet as pq

    return [
        r for p in sorted(fs.glob(f"{run_dir}/{kind}/*.parquet")) for r in pq.read_table(fs.open(p, "rb")).to_pylist()
    ]
