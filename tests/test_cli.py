"""The job's command line: complete --help and fail-fast configuration errors before any work."""

import subprocess
import sys

import pytest

from pipeline.cli import build_parser, config_from_args, main
from tests.conftest import REPO


def test_help_lists_every_option():
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "segment_bucket.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0
    for flag in (
        "--output",
        "--labels",
        "--model",
        "--weights",
        "--scales",
        "--flip",
        "--crf",
        "--no-crf",
        "--crf-bilateral-srgb",
        "--output-stride",
        "--infer-actors",
        "--crf-actors",
        "--batch-size",
        "--run-id",
        "--resume",
        "--overwrite",
        "--limit",
        "--storage-options",
        "--crf-backend",
    ):
        assert flag in proc.stdout, flag


def test_the_command_imports_no_torch_before_ray_starts():
    """torch (1.5-2 s of CPU) loads on the driver's prepare thread while Ray starts (pipeline/job.py),
    never on the command's import path, where it delayed Ray's start by as much (benchmarks/ceiling.py)."""
    code = "import sys, pipeline.cli, pipeline.job; print(sorted({'torch', 'timm'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


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
    from pipeline.config.sections import ComputeConfig

    with pytest.raises(ValueError, match="crf_backend must be one of auto, pydensecrf, torch"):
        ComputeConfig(crf_backend="densecrf")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["s3://b/in"], "--output is required"),
        (["x", "--output", "o", "--scales", "0.5,a"], "comma-separated"),
        (["x", "--output", "o", "--infer-actors", "3-1"], "infer_actors must be MIN-MAX"),
        (["x", "--output", "o", "--storage-options", "[1]"], "JSON object"),
        (["x", "--output", "o", "--crf-iterations", "0"], "iterations must be >= 1"),
        (["x", "--output", "o", "--model", "nope"], "invalid choice"),
        (["x", "--output", "o", "--crf-backend", "cuda"], "--crf-backend: invalid choice"),
        (["x", "--output", "o", "--resume"], "--resume needs the --run-id"),
    ],
)
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
    assert (
        main(
            [
                str(empty),
                "--output",
                str(tmp_path / "o"),
                "--weights",
                f"{REPO}/pipeline/demo/assets/deeplabv3plus_demo.safetensors#sha256={'1' * 64}",
            ]
        )
        == 2
    )
    assert "checksum mismatch" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing was written


def _config_classes():
    from pipeline.config.sections import ComputeConfig, CRFParams, InferenceConfig, JobConfig

    return (JobConfig, InferenceConfig, CRFParams, ComputeConfig)


@pytest.mark.parametrize("cls", _config_classes(), ids=lambda c: c.__name__)
def test_every_config_field_is_a_flag_with_help(cls):
    """A field is its own flag (pipeline/config/flags.py option): none can be left out of the CLI."""
    from dataclasses import fields

    help_text = build_parser().format_help()
    for f in fields(cls):
        if "section" in f.metadata:
            continue
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} is not declared with option(...)"
        from pipeline.config.flags import flag_name

        name = flag_name(cls, f)
        assert (name if name.startswith("-") else name.upper() + "_URI") in help_text, name


def test_flags_reach_the_config_they_name():
    argv = [
        "s3://b/in",
        "--output",
        "s3://b/out",
        "--run-id",
        "r1",
        "--crf-min-prob",
        "0.001",
        "--crf-iterations",
        "5",
        "--decode-cpus",
        "0.5",
        "--precision",
        "bf16",
        "--scales",
        "0.5,1",
        "--no-gpu",
        "--infer-actors",
        "1-3",
        "--ray-address",
        "ray://head:10001",
        "--limit",
        "7",
        "--crf-backend",
        "torch",
        "--storage-options",
        '{"anon": true}',
    ]
    config = config_from_args(build_parser().parse_args(argv), build_parser())
    assert (config.input_uri, config.output_uri, config.run_id) == ("s3://b/in", "s3://b/out", "r1")
    assert config.crf.min_prob == 0.001 and config.crf.iterations == 5
    assert config.compute.decode_cpus == 0.5 and config.compute.use_gpu is False
    assert config.compute.infer_actors == (1, 3) and config.compute.crf_backend == "torch"
    assert config.inference.precision == "bf16" and config.inference.scales == (0.5, 1.0)
    assert config.ray_address == "ray://head:10001" and config.limit == 7
    assert config.storage_options == {"anon": True}


def test_unset_flags_give_the_config_defaults():
    from pipeline.config.sections import JobConfig
    from pipeline.models import DEFAULT_MODEL

    config = config_from_args(build_parser().parse_args(["in", "--output", "out", "--run-id", "r"]), build_parser())
    assert config == JobConfig(
        input_uri="in", output_uri="out", labels_uri=None, model=DEFAULT_MODEL, weights_uri=None, run_id="r"
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["x", "--output", "o", "--crf-min-prob", "1.5"], "CRF min prob must be < 1"),
        (["x", "--output", "o", "--decode-cpus", "0"], "--decode-cpus must be > 0"),
        (["x", "--output", "o", "--resume", "--overwrite", "--run-id", "r"], "--resume and --overwrite exclude"),
    ],
)
def test_declared_bounds_are_checked_with_the_flag_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_the_command_drops_rays_false_alarm_from_stderr_and_nothing_else():
    # fd 2 as Ray's C++ logger writes it (whole lines, one write each), Python's stderr, a progress
    # bar's partial line, and a crash's last words after the filter is gone.
    code = """
import os, sys
from pipeline.dag.cluster import stderr_without
with stderr_without():
    os.write(2, b"[2026-12-05 10:00:00,000 I 1 1] core_worker.cc:1: fine\\n")
    os.write(2, b"[2026-12-05 10:00:00,001 E 1 1] core_worker.cc:2465: Actor ... see "
                b"https://github.com/ray-project/ray/issues/53727 for more details.\\n")
    print("python line", file=sys.stderr, flush=True)
    os.write(2, b"\\rprogress 50%")
    os.write(2, b"\\rprogress 100%\\n[no end")
print("after", file=sys.stderr, flush=True)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == (
        b"[2026-12-05 10:00:00,000 I 1 1] core_worker.cc:1: fine\n"
        b"python line\n\rprogress 50%\rprogress 100%\n[no endafter\n"
    )
