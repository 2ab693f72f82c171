"""Inputs that kill or exhaust their worker, through the real CLI and real workers: a native crash
(SIGSEGV) while decoding one image, and an image too large for an inference actor whose address
space is capped (RLIMIT_AS). Each ends as that input's one error row; the run commits every other
key exactly once (pipeline/dag/runner.py; the faults: tests/fault_hooks.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.conftest import job_args, make_bucket, run_job
from tests.fault_hooks import fault_env

pytestmark = pytest.mark.slow


def run_p(bucket: Path, out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return run_job(*job_args(bucket, out, "p", *args), **env)


def outcome(out: Path) -> tuple[dict, dict, dict]:
    run_dir = out / "run=p"
    assert (run_dir / "_SUCCESS").exists()
    masks = {r["key"]: r for r in pq.read_table(run_dir / "masks").to_pylist()}
    errors = {r["key"]: r for r in pq.read_table(run_dir / "errors").to_pylist()}
    assert not masks.keys() & errors.keys()
    return masks, errors, json.loads((run_dir / "manifest.json").read_text())


def listed(bucket: Path) -> list[str]:
    images = bucket / "images"
    return sorted(p.relative_to(images).as_posix() for p in images.rglob("*") if p.suffix in (".jpg", ".png"))


def test_an_input_that_crashes_its_worker_every_time_is_one_error_row(tmp_path):
    bucket = make_bucket(tmp_path / "bucket", n=6)
    poison = "sub/scene_2000001.jpg"
    proc = run_p(bucket, tmp_path / "out", **fault_env(crash_keys=[poison]))
    assert proc.returncode == 0, proc.stderr[-4000:]
    masks, errors, manifest = outcome(tmp_path / "out")
    assert sorted([*masks, *errors]) == listed(bucket)  # every key exactly once
    assert set(errors) == {poison, "corrupt.jpg"}
    died = errors[poison]
    assert (died["stage"], died["error_type"]) == ("decode", "WorkerDied"), died
    assert "died on every retry" in died["message"] and "went on without it" in died["message"]
    assert manifest["counts"]["errors"] == 2 and manifest["counts"]["images"] == len(masks) == 5
    assert "isolated by the actors: 1" in proc.stdout  # from its flight record (pipeline/rows/flight.py)


def test_an_image_too_large_for_a_memory_capped_actor_is_one_error_row(tmp_path):
    bucket = make_bucket(tmp_path / "bucket", n=4, corrupt=False)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (3000, 3000, 3), dtype=np.uint8)).save(bucket / "images" / "huge.png")
    # Budgets off: with them the image would be tiled to fit, and this test needs one that does not.
    proc = run_p(bucket, tmp_path / "out", "--actor-memory-mib", "0", **fault_env(infer_memory_mib=700))
    assert proc.returncode == 0, proc.stderr[-4000:]
    masks, errors, _ = outcome(tmp_path / "out")
    assert sorted([*masks, *errors]) == listed(bucket)
    assert set(errors) == {"huge.png"}, errors
    huge = errors["huge.png"]
    # Either torch's allocation fails (an ordinary error of that image) or the worker dies of it.
    assert huge["stage"] == "infer" and (huge["error_type"] == "WorkerDied" or "alloc" in huge["message"]), huge
