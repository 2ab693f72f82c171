"""Security: credentials never reach outputs, logs or Ray's job metadata; input keys cannot steer
where outputs go (or which object is read); run ids cannot name a folder outside the output."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.config.sections import JobConfig
from tests.conftest import DEMO_BUCKET, REPO, S3_ENV, free_port
from tests.faulty_s3 import FaultyS3
from tests.test_ray_submit import RAY, _stop_session

SCENE = (DEMO_BUCKET / "images" / "scene_2000000.jpg").read_bytes()


def job_cmd(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "jobs" / "segment_bucket.py"), *args]


@pytest.mark.parametrize("run_id", ["../evil", "a/b", "..", "x..y", ".hidden", "-rf", "a b", "r" * 129])
def test_run_ids_that_leave_the_output_folder_are_rejected_before_any_work(run_id, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([str(DEMO_BUCKET / "images"), "--output", str(tmp_path / "out"), f"--run-id={run_id}"])
    assert exit_.value.code == 2
    assert "run id" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_ordinary_run_ids_are_accepted():
    for run_id in ("2026-11-24T02-00-00Z", "night-1", "v1.2_ab"):
        JobConfig(input_uri="in", output_uri="out", labels_uri=None, model="m", weights_uri=None, run_id=run_id)


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_odd_local_names_write_only_under_the_run_folder(tmp_path):
    images = tmp_path / "in" / "images"
    for name in ("..evil.jpg", "...jpg", "..dir/x.jpg", "-rf.jpg", "ok.jpg"):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        (images / name).write_bytes(SCENE)
    before = files_under(tmp_path)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        job_cmd(str(images), "--output", str(tmp_path / "out"), "--run-id", "p", "--no-crf"),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    new = files_under(tmp_path) - before
    assert new and all(path.startswith("out/run=p/") for path in new), sorted(new)
    keys = pq.read_table(tmp_path / "out" / "run=p" / "masks").column("key").to_pylist()
    assert sorted(keys) == ["-rf.jpg", "...jpg", "..dir/x.jpg", "..evil.jpg", "ok.jpg"]


@pytest.mark.slow
def test_traversal_keys_on_s3_read_their_own_object_and_write_only_under_the_run(s3_env, s3_server, tmp_path):
    client = boto3.client(
        "s3",
        endpoint_url=s3_server,
        region_name="us-east-1",
        aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
    )
    client.create_bucket(Bucket="traversal")
    # Literal object names: S3 does not resolve "..", and a double slash makes a key start with "/".
    keys = ["../../evil.jpg", "a/../../b.jpg", "/abs.jpg", "ok.jpg"]
    for key in keys:
        client.put_object(Bucket="traversal", Key=f"in/images/{key}", Body=SCENE)
    decoy = b"not the input: reading this would mean the key steered the read"
    for other in ("evil.jpg", "b.jpg", "abs.jpg", "in/b.jpg"):
        client.put_object(Bucket="traversal", Key=other, Body=decoy)
    before = {o["Key"] for o in client.list_objects_v2(Bucket="traversal")["Contents"]}
    env = {**os.environ, **S3_ENV, "AWS_ENDPOINT_URL": s3_server, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        job_cmd("s3://traversal/in/images", "--output", "s3://traversal/out", "--run-id", "t", "--no-crf"),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = {o["Key"] for o in client.list_objects_v2(Bucket="traversal")["Contents"]}
    assert (after - before) and all(k.startswith("out/run=t/") for k in after - before), sorted(after - before)
    masks = [
        r
        for k in sorted(after - before)
        if k.startswith("out/run=t/masks/")
        for r in pq.read_table(s3_env.open(f"traversal/{k}", "rb")).to_pylist()
    ]
    assert sorted(r["key"] for r in masks) == sorted(keys)  # each decoded from its own object, no errors
    assert {r["uri"] for r in masks} == {f"s3://traversal/in/images/{k}" for k in keys}


# --- credentials -------------------------------------------------------------------------------

ENV_SECRET = "envSECRETzq81xk"  # distinctive: found anywhere means leaked
API_SECRET = "apiSECRETmm07tr"
SECRETS = (ENV_SECRET, API_SECRET)


def test_credentials_on_the_command_line_are_refused_without_echoing_them(tmp_path, capsys):
    # The command line is visible to `ps`, and Ray records it as the driver's entrypoint in its
    # job table (`ray list jobs`, the dashboard): a secret there has leaked whatever the job does.
    secret = "optSECRETvw52jd"
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                str(tmp_path / "in"),
                "--output",
                str(tmp_path / "out"),
                "--storage-options",
                json.dumps({"key": "id", "secret": secret, "endpoint_url": "http://x"}),
            ]
        )
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--storage-options" in err and "credentials" in err
    assert secret not in err
    assert not (tmp_path / "out").exists()


LEAK = "leakSECRETq3k9"


@pytest.mark.parametrize(
    "options",
    [
        {"client_kwargs": {"headers": {"Authorization": f"Bearer {LEAK}"}}},
        {"connection_string": f"DefaultEndpointsProtocol=https;AccountName=a;AccountKey={LEAK}"},
        {"endpoint_url": f"http://user:{LEAK}@minio:9000"},
        {"endpoint_url": f"https://minio:9000/?X-Amz-Signature={LEAK}"},
        {"a_name_nobody_reviewed": LEAK},
        {"config_kwargs": {"proxies": {"https": f"http://u:{LEAK}@proxy"}}},
        {"anon": {"nested": LEAK}},
        {"token": LEAK},
    ],
)
def test_storage_options_outside_the_allow_list_are_refused_without_echoing_them(options, tmp_path, capsys):
    argv = [str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--storage-options", json.dumps(options)]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--storage-options" in err and "refused" in err, err
    assert LEAK not in err
    compare = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "compare_runs.py"), str(tmp_path / "out"), "--storage-options", argv[-1]],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert compare.returncode == 2 and "refused" in compare.stderr and LEAK not in compare.stderr + compare.stdout
    assert not (tmp_path / "out").exists()


def test_known_storage_options_pass_and_persisted_config_holds_no_userinfo_or_query():
    from pipeline.cli import build_parser, config_from_args
    from pipeline.io.credentials import redact

    options = {
        "anon": False,
        "endpoint_url": "http://minio:9000",
        "client_kwargs": {"region_name": "eu-west-1"},
        "config_kwargs": {"retries": {"mode": "standard"}, "s3": {"addressing_style": "path"}},
    }
    argv = ["s3://b/in", "--output", "s3://b/out", "--storage-options", json.dumps(options)]
    argv += ["--weights", f"https://host/w.pth?X-Amz-Signature={LEAK}#sha256={'0' * 64}"]
    argv += ["--pushgateway", f"http://ops:{LEAK}@push:9091"]
    parser = build_parser()
    config = config_from_args(parser.parse_args(argv), parser)
    public = json.dumps(config.to_public_dict())
    assert LEAK not in public and config.to_public_dict()["storage_options"] == options
    assert "https://host/w.pth#sha256=" in public and "http://push:9091" in public
    # Options set through the Python API (never the command line) are redacted when persisted.
    assert redact({"key": "k", "client_kwargs": {"headers": {"Authorization": LEAK}}}) == {
        "key": "***",
        "client_kwargs": {"headers": "***"},
    }


@pytest.fixture(scope="module")
def secure_cluster(s3_server):
    """A Ray head whose processes hold the S3 credentials in their environment (as a Kubernetes
    Secret puts them on every pod), in front of it an S3 endpoint that denies one object."""
    client = boto3.client(
        "s3",
        endpoint_url=s3_server,
        region_name="us-east-1",
        aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=ENV_SECRET,
    )
    client.create_bucket(Bucket="secure")
    for name in ("a.jpg", "b.jpg", "denied.jpg"):
        client.put_object(Bucket="secure", Key=f"in/{name}", Body=SCENE)
    with FaultyS3(s3_server) as proxy:
        proxy.fail("403", r"^/secure/in/denied\.jpg$", method="GET")
        temp_dir = Path(tempfile.mkdtemp(prefix="raysec", dir="/tmp"))  # short: Ray's sockets live here
        env = {
            **os.environ,
            **S3_ENV,
            "AWS_SECRET_ACCESS_KEY": ENV_SECRET,
            "AWS_ENDPOINT_URL": proxy.endpoint,
            "RAY_AUTH_MODE": "disabled",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        env.pop("RAY_ADDRESS", None)
        port = free_port()
        ports = {
            "--port": port,
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(),
            "--metrics-export-port": free_port(),
            "--ray-client-server-port": free_port(),
        }
        log = open(temp_dir / "ray_start.log", "w")  # noqa: SIM115 (ray start writes it while it runs)
        head = subprocess.Popen(
            [
                RAY,
                "start",
                "--head",
                "--block",
                "--node-ip-address=127.0.0.1",
                "--num-cpus=2",
                "--include-dashboard=false",
                f"--temp-dir={temp_dir}",
                "--disable-usage-stats",
                *(f"{flag}={value}" for flag, value in ports.items()),
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
            deadline = time.time() + 120
            while (
                subprocess.run(
                    [RAY, "status", f"--address={env['RAY_ADDRESS']}"], env=env, capture_output=True
                ).returncode
                != 0
            ):
                assert head.poll() is None and time.time() < deadline, (temp_dir / "ray_start.log").read_text()
                time.sleep(1)
            yield env, temp_dir, client
        finally:
            _stop_session(head.pid)
            log.close()
            shutil.rmtree(temp_dir, ignore_errors=True)


def output_texts(client, prefix: str) -> dict[str, str]:
    """Every object under the output prefix as searchable text (Parquet decoded: it is compressed)."""
    texts = {}
    for obj in client.list_objects_v2(Bucket="secure", Prefix=prefix)["Contents"]:
        body = client.get_object(Bucket="secure", Key=obj["Key"])["Body"].read()
        if obj["Key"].endswith(".parquet"):
            texts[obj["Key"]] = repr(pq.read_table(io.BytesIO(body)).to_pylist())
        else:
            texts[obj["Key"]] = body.decode("utf-8", "replace")
    return texts


def leaks_in_ray(env: dict, temp_dir: Path) -> list[str]:
    """Where Ray kept a secret: any file of the head's session (logs included), or the GCS job
    table (each driver's recorded entrypoint, as `ray list jobs` and the dashboard show it)."""
    found = [
        f"{path}: {secret}"
        for path in temp_dir.rglob("*")
        if path.is_file() and not path.is_symlink()
        for secret in SECRETS
        if secret.encode() in path.read_bytes()
    ]
    jobs = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, ray; ray.init(log_to_driver=False); "
            "print(json.dumps(ray._private.state.state.job_table(), default=str))",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert jobs.returncode == 0, jobs.stderr[-2000:]
    found += [f"job table: {secret}" for secret in SECRETS if secret in jobs.stdout]
    return found


@pytest.mark.slow
def test_credentials_never_reach_outputs_logs_or_ray_metadata(secure_cluster):
    env, temp_dir, client = secure_cluster
    common = ["s3://secure/in", "--no-crf", "--batch-size", "2"]

    # 1. Credentials from the environment (the supported way), with one object the job may not read.
    cli = subprocess.run(
        job_cmd(*common, "--output", "s3://secure/out", "--run-id", "env"),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    (errors_part,) = client.list_objects_v2(Bucket="secure", Prefix="out/run=env/errors/")["Contents"]
    errors = pq.read_table(io.BytesIO(client.get_object(Bucket="secure", Key=errors_part["Key"])["Body"].read()))
    assert [(e["key"], e["stage"]) for e in errors.to_pylist()] == [("denied.jpg", "read")]

    # 2. The Python API with credentials in storage_options: they travel to Ray workers as task
    # arguments and must still stay out of logs and outputs. This driver takes them from its
    # environment, not its command line (Ray records that: see the test above).
    api_env = {**env, "API_SECRET": API_SECRET}
    script = (
        "import os; from pipeline.cli import build_parser, config_from_args; "
        "from pipeline.job import run; from dataclasses import replace; "
        "p = build_parser(); c = config_from_args(p.parse_args(['s3://secure/in', '--output', 's3://secure/out', "
        "'--run-id', 'api', '--no-crf']), p); "
        "run(replace(c, storage_options={'key': 'testing-key-id', 'secret': os.environ['API_SECRET'], "
        "'endpoint_url': os.environ['AWS_ENDPOINT_URL']}))"
    )
    api = subprocess.run(
        [sys.executable, "-c", script], env=api_env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert api.returncode == 0, api.stderr[-3000:]
    manifest = json.loads(client.get_object(Bucket="secure", Key="out/run=api/manifest.json")["Body"].read())
    assert manifest["config"]["storage_options"]["secret"] == "***"

    for proc in (cli, api):
        assert not [s for s in SECRETS if s in proc.stdout + proc.stderr]
    texts = output_texts(client, "out/")
    assert {"out/run=env/_SUCCESS", "out/run=env/manifest.json", "out/run=env/report.html"} <= set(texts)
    assert not [(key, s) for key, text in texts.items() for s in SECRETS if s in text]
    assert not leaks_in_ray(env, temp_dir)


# --- weights -----------------------------------------------------------------------------------


def _demo_with_categories(tmp_path: Path, categories) -> str:
    from safetensors import safe_open
    from safetensors.torch import save_file

    from pipeline.demo import ASSETS

    source = ASSETS / "deeplabv3plus_demo.safetensors"
    with safe_open(str(source), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has keys(), no __iter__)
        metadata = dict(f.metadata() or {})
    metadata["categories"] = json.dumps(categories)
    path = tmp_path / "demo.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return str(path)


@pytest.mark.parametrize(
    "categories, message",
    [
        (list(range(6)), "non-empty strings"),
        (["a", "b", "a", "c", "d", "e"], "twice"),
        (["x" * 65, "b", "c", "d", "e", "f"], "at most 64"),
        ({"not": "a list"}, "JSON list"),
    ],
)
def test_bad_checkpoint_categories_exit_2_before_any_work(categories, message, tmp_path, capsys):
    weights = _demo_with_categories(tmp_path, categories)
    argv = [str(DEMO_BUCKET / "images"), "--output", str(tmp_path / "out"), "--weights", weights, "--limit", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "categories" in err and message in err, err
    assert not (tmp_path / "out" / "run=x").exists() and not list((tmp_path / "out").glob("run=*/masks/*"))


def test_a_checksum_prefix_is_refused_and_published_records_carry_full_digests(tmp_path, capsys):
    from pipeline.demo import ASSETS
    from pipeline.models import DEFAULT_WEIGHTS
    from pipeline.models.weights import checked_digest

    demo = ASSETS / "deeplabv3plus_demo.safetensors"
    prefix = hashlib.sha256(demo.read_bytes()).hexdigest()[:8]
    argv = [str(DEMO_BUCKET / "images"), "--output", str(tmp_path / "out"), "--weights", f"{demo}#sha256={prefix}"]
    assert main(argv) == 2
    assert "full 64-hex-digit digest" in capsys.readouterr().err
    # Every published record names its file by the full digest (torchvision's: its file's sha256,
    # whose first 8 digits torch.hub put in the file name).
    for weights in DEFAULT_WEIGHTS.values():
        assert weights.sha256 and checked_digest(weights.sha256) == weights.sha256, weights.model
