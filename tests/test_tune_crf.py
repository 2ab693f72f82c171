"""jobs/tune_crf.py: a real (small) search over the demo bucket, as Ray tasks; its normalisation."""

import json

import pytest

from tests.conftest import REPO, run_job


@pytest.mark.slow
def test_tune_crf_prints_table_and_flags_to_pass_back(tmp_path):
    out = tmp_path / "tune.json"
    args = ["--limit", "3", "--sxy", "30,80", "--srgb", "3,13", "--compat", "4", "--json", str(out)]
    proc = run_job(*args, script="tune_crf.py", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no CRF" in proc.stdout and "pass back: --crf-bilateral-sxy" in proc.stdout
    result = json.loads(out.read_text())
    assert len(result["results"]) == 4  # 2 x 2 x 1 settings, each evaluated
    mious = [r["miou"] for r in result["results"]]
    assert mious == sorted(mious, reverse=True) and len(set(mious)) > 1  # srgb/sxy really change results
    best = result["results"][0]
    flags = proc.stdout.split("pass back: ")[1].split()
    assert flags == [
        "--crf-bilateral-sxy",
        f"{best['bilateral_sxy']:g}",
        "--crf-bilateral-srgb",
        f"{best['bilateral_srgb']:g}",
        "--crf-bilateral-compat",
        f"{best['bilateral_compat']:g}",
    ]
    from pipeline.cli import build_parser

    args = build_parser().parse_args(flags)  # the flags are accepted by the job as printed
    assert args.crf_bilateral_sxy == best["bilateral_sxy"]


def test_tune_crf_normalises_with_the_weights_of_the_model_it_runs(monkeypatch):
    import importlib.util

    from pipeline.models.deeplabv3plus import DEMO_WEIGHTS
    from pipeline.models.weights import IMAGENET_MEAN, IMAGENET_STD, Weights

    spec = importlib.util.spec_from_file_location("tune_crf", REPO / "jobs" / "tune_crf.py")
    tune_crf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune_crf)
    other = Weights(model="other", uri="x", sha256=None, categories=("a",), mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    known = {"other": other, DEMO_WEIGHTS.model: DEMO_WEIGHTS}
    monkeypatch.setattr(tune_crf, "default_weights", known.get)
    assert tune_crf.weights_used("other", None).mean == (0.1, 0.2, 0.3)
    assert tune_crf.weights_used(DEMO_WEIGHTS.model, None) == DEMO_WEIGHTS
    mean, std = tune_crf.weights_used("other", None).normalisation()
    assert mean.flatten().tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert std.flatten().tolist() == pytest.approx([0.4, 0.5, 0.6])
    custom = tune_crf.weights_used("other", "s3://b/own.pth")  # one's own file: as the job does
    assert (custom.mean, custom.std) == (IMAGENET_MEAN, IMAGENET_STD)
