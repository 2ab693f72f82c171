"""jobs/tune_crf.py: a real (small) search over the demo bucket, as Ray tasks."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_tune_crf_prints_table_and_flags_to_pass_back(tmp_path):
    out = tmp_path / "tune.json"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "tune_crf.py"), "--limit", "3", "--sxy", "30,80",
                           "--srgb", "3,13", "--compat", "4", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no CRF" in proc.stdout and "pass back: --crf-bilateral-sxy" in proc.stdout
    result = json.loads(out.read_text())
    assert len(result["results"]) == 4  # 2 x 2 x 1 settings, each evaluated
    mious = [r["miou"] for r in result["results"]]
    assert mious == sorted(mious, reverse=True) and len(set(mious)) > 1  # srgb/sxy really change results
    best = result["results"][0]
    flags = proc.stdout.split("pass back: ")[1].split()
    assert flags == ["--crf-bilateral-sxy", f"{best['bilateral_sxy']:g}", "--crf-bilateral-srgb",
                     f"{best['bilateral_srgb']:g}", "--crf-bilateral-compat", f"{best['bilateral_compat']:g}"]
    from pipeline.cli import build_parser

    args = build_parser().parse_args(flags)  # the flags are accepted by the job as printed
    assert args.crf_bilateral_sxy == best["bilateral_sxy"]
