"""The job's command line: complete --help and fail-fast configuration errors before any work."""

import subprocess
import sys

import pytest

from pipeline.cli import build_parser, config_from_args, main
from tests.conftest import REPO


def test_help_lists_every_option():
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "segment_bucket.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for flag in ("--output", "--labels", "--model", "--weights", "--scales", "--flip", "--crf", "--no-crf",
                 "--crf-bilateral-srgb", "--output-stride", "--infer-actors", "--crf-actors", "--batch-size",
                 "--run-id", "--resume", "--overwrite", "--limit", "--storage-options", "--crf-backend"):
        assert flag in proc.stdout, flag


def test_demo_defaults_need_no_arguments():
    config = config_from_args(build_parser().parse_args([]), build_parser())
    assert config.input_uri.endswith("demo_bucket/images") and config.labels_uri.endswith("demo_bucket/labels")
    assert config.output_uri == "outputs" and config.crf is not None
    assert config.compute.crf_backend == "auto"


@pytest.mark.parametrize("backend", ["auto", "pydensecrf", "torch"])
def test_crf_backend_flag(backend):
    args = build_parser().parse_args(["x", "--output", "o", "--crf-backend", backend])
    assert config_from_args(args, build_parser()).compute.crf_backend == backend


def test_crf_backend_is_validated_in_the_config_too():
    from pipeline.config import ComputeConfig

    with pytest.raises(ValueError, match="crf_backend must be one of auto, pydensecrf, torch"):
        ComputeConfig(crf_backend="densecrf")


@pytest.mark.parametrize("argv, message", [
    (["s3://b/in"], "--output is required"),
    (["x", "--output", "o", "--scales", "0.5,a"], "comma-separated"),
    (["x", "--output", "o", "--infer-actors", "3-1"], "infer_actors must be MIN-MAX"),
    (["x", "--output", "o", "--storage-options", "[1]"], "JSON object"),
    (["x", "--output", "o", "--crf-iterations", "0"], "iterations must be >= 1"),
    (["x", "--output", "o", "--model", "nope"], "invalid choice"),
    (["x", "--output", "o", "--crf-backend", "cuda"], "--crf-backend: invalid choice"),
    (["x", "--output", "o", "--resume"], "--resume needs the --run-id"),
])
def test_bad_arguments_exit_2_with_a_reason(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_inputs_fail_before_any_work(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    assert main([str(empty), "--output", str(tmp_path / "o")]) == 2
    assert "no images" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([str(empty), "--output", str(tmp_path / "o"), "--weights", f"{REPO}/pipeline/assets/deeplabv3plus_demo.safetensors#sha256={'1' * 64}"]) == 2
    assert "checksum mismatch" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing was written
