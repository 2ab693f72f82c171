"""--incremental: listing identities, the fingerprint, the base run, and nights that segment only
what changed (real Ray, real files, moto S3 for ETags) while every run stays complete."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io.storage import list_inputs
from pipeline.outputs.carry import Base, BaseRefused, differences, find_base, listing_table, plan
from pipeline.outputs.run import SUCCESS, RunOutput
from pipeline.rows.schema import ERRORS_SCHEMA, MASKS_SCHEMA
from tests.conftest import REPO, S3_ENV, SEGMENT_BUCKET, job_args, job_env, kill_when, make_bucket, put_bucket, run_job
from tests.fault_hooks import fault_env

# --- the listing's identities and the base run (no Ray) ---


def test_local_listing_has_size_and_mtime_ns(tmp_path):
    bucket = make_bucket(tmp_path / "b", n=3)
    inputs = list_inputs(str(bucket / "images"), None)
    rows = inputs.identities().to_pylist()
    assert [r["key"] for r in rows] == inputs.keys.to_pylist()
    for r in rows:
        stat = os.stat(bucket / "images" / r["key"])
        assert r["size"] == stat.st_size and r["version"] == f"mtime:{stat.st_mtime_ns}"
    # --resume's anti-join keeps the identities aligned with the keys
    rest = inputs.without(pa.array([rows[0]["key"]]))
    assert rest.identities().to_pylist() == rows[1:]


def test_s3_listing_has_etag_and_size(s3_env):
    fs = s3_env
    fs.mkdir("ids")
    fs.pipe({"ids/in/a.jpg": b"one", "ids/in/sub/b.png": b"second", "ids/in/c.txt": b"no"})
    inputs = list_inputs("s3://ids/in", None)
    rows = {r["key"]: r for r in inputs.identities().to_pylist()}
    assert set(rows) == {"a.jpg", "sub/b.png"}
    for key, r in rows.items():
        info = fs.info(f"ids/in/{key}")
        assert r["size"] == info["size"] and r["version"] == f"etag:{info['ETag'].strip(chr(34))}"


def test_fingerprint_difference_says_what_changed():
    old = {"weights": "aa", "crf": {"iterations": 10, "gaussian_sxy": 3.0}, "labels": "x"}
    new = {"weights": "bb", "crf": {"iterations": 5, "gaussian_sxy": 3.0}, "labels": "x"}
    assert differences(old, new) == ["crf.iterations changed: 10 -> 5", "weights changed: aa -> bb"]
    assert differences(old, old) == []


def _fake_run(out: Path, run_id: str, keys: list[str], fp: dict, bucket: Path) -> RunOutput:
    """A committed run written by hand: its listing, one masks part, manifest and _SUCCESS."""
    run = RunOutput(str(out), run_id)
    run.write_listing(listing_table(list_inputs(str(bucket / "images"), str(bucket / "labels"))))
    rows = [{"key": k, "run_id": run_id, "computed_in_run": run_id, "mask": b"png"} for k in keys]
    run.write_part("masks", "part-0.parquet", pa.Table.from_pylist(rows, schema=MASKS_SCHEMA))
    run.write_json("manifest.json", {"fingerprint": fp})
    run.write_json(SUCCESS, {"committed_at": f"2026-01-0{len(run_id)}"})
    return run


def test_base_is_latest_run_with_same_fingerprint_and_a_changed_one_says_why(tmp_path):
    bucket = make_bucket(tmp_path / "b", n=2, corrupt=False)
    out = tmp_path / "out"
    assert find_base(str(out), "new", {"weights": "x"}).reason == "no committed run"
    keys = list_inputs(str(bucket / "images"), None).keys.to_pylist()
    _fake_run(out, "r", keys, {"weights": "x"}, bucket)
    _fake_run(out, "rr", keys, {"weights": "y"}, bucket)
    assert find_base(str(out), "new", {"weights": "x"}).run.run_id == "r"
    base = find_base(str(out), "new", {"weights": "z"})
    assert base.run is None and base.reason == "weights changed: y -> z (since run rr)"


def test_unidentified_objects_and_incomplete_bases_are_never_carried(tmp_path):
    bucket = make_bucket(tmp_path / "b", n=3, corrupt=False)
    out = tmp_path / "out"
    inputs = list_inputs(str(bucket / "images"), str(bucket / "labels"))
    run = _fake_run(out, "r", inputs.keys.to_pylist(), {}, bucket)
    current = listing_table(inputs)
    assert len(plan(inputs, current, Base(run))) == 3  # nothing changed: everything carried
    # an object whose backend offers no identity is segmented, never assumed unchanged
    blind = replace(inputs, versions=pa.chunked_array([pa.nulls(3, pa.string())]))
    assert len(plan(blind, listing_table(blind), Base(run))) == 0
    # a changed label: its image is segmented again
    label = bucket / "labels" / (inputs.keys[0].as_py().rsplit(".", 1)[0] + ".png")
    label.write_bytes(label.read_bytes() + b"\0")
    assert plan(inputs, listing_table(inputs), Base(run)).keys.to_pylist() == inputs.keys.to_pylist()[1:]
    # a base whose part files lost rows is refused, with the run named
    run.write_part("masks", "part-0.parquet", MASKS_SCHEMA.empty_table())
    with pytest.raises(BaseRefused, match="base run r is incomplete: its part files hold 0 of the 3"):
        plan(inputs, current, Base(run))
    (out / "run=r" / "listing.parquet").write_bytes(b"not parquet")
    with pytest.raises(BaseRefused, match="base run r is unreadable"):
        plan(inputs, current, Base(run))


# --- whole nights (real Ray, the demo model, pydensecrf) ---


def _rows(run_dir: Path, kind: str) -> dict[str, dict]:
    folder = run_dir / kind
    parts = sorted(folder.glob("*.parquet")) if folder.exists() else []
    rows = [r for p in parts for r in pq.read_table(p).to_pylist()]
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)), "a key in two part files"
    for p in parts:
        schema = MASKS_SCHEMA if kind == "masks" else ERRORS_SCHEMA
        assert pq.read_schema(p).equals(schema, check_metadata=False)
    return {r["key"]: r for r in rows}


def _keys(images: Path) -> list[str]:
    return sorted(p.relative_to(images).as_posix() for p in images.rglob("*.jpg"))


def _manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def _change_night(bucket: Path) -> set[str]:
    """2 new images, 1 changed image, 1 deleted image, 1 changed label; returns the 4 keys to segment."""
    images, labels = bucket / "images", bucket / "labels"
    shutil.copy(images / "scene_2000000.jpg", images / "new_a.jpg")
    shutil.copy(images / "sub" / "scene_2000001.jpg", images / "sub" / "new_b.jpg")
    changed = images / "scene_2000002.jpg"
    changed.write_bytes((images / "scene_2000004.jpg").read_bytes())
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 1_000_000))  # a rewrite: a new mtime
    (images / "sub" / "scene_2000003.jpg").unlink()
    shutil.copy(labels / "scene_2000004.png", labels / "scene_2000000.png")
    return {"new_a.jpg", "sub/new_b.jpg", "scene_2000002.jpg", "scene_2000000.jpg"}


def _run(ray_local, bucket: Path, out: Path, run_id: str, *extra: str):
    from pipeline.cli import build_parser, config_from_args
    from pipeline.job import run

    parser = build_parser()
    return run(config_from_args(parser.parse_args(job_args(bucket, out, run_id, "--batch-size", "2", *extra)), parser))


def _check_night(out: Path, base: str, night: str, segmented: set[str], images: Path) -> None:
    """Exactly ``segmented`` computed in ``night``, the rest carried byte-identical from ``base``,
    every listed key once and nothing else."""
    old = {**_rows(out / f"run={base}", "masks"), **_rows(out / f"run={base}", "errors")}
    masks, errors = _rows(out / f"run={night}", "masks"), _rows(out / f"run={night}", "errors")
    new = {**masks, **errors}
    assert sorted(new) == _keys(images) and len(new) == len(masks) + len(errors)
    assert {k for k, r in new.items() if r["computed_in_run"] == night} == segmented
    for key, row in new.items():
        assert row["run_id"] == night
        if key not in segmented:
            assert row["computed_in_run"] == base
            assert row == {**old[key], "run_id": night}  # masks byte-identical, every column carried
    manifest = _manifest(out / f"run={night}")
    assert manifest["counts"]["segmented"] == len(segmented)
    assert manifest["counts"]["carried"] == len(new) - len(segmented)
    assert manifest["incremental"] == {"base_run": base, "reason": None}
    assert (out / f"run={night}" / "_SUCCESS").exists()


def _dry_run(bucket: Path, out: Path, run_id: str, *extra: str, capsys) -> dict:
    """The plan ``segment_bucket.py --dry-run`` prints as its last stdout line (on the session's Ray)."""
    from pipeline.cli import main

    capsys.readouterr()
    assert main(job_args(bucket, out, run_id, "--batch-size", "2", "--dry-run", *extra)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def test_dry_run_says_what_the_night_would_carry_and_writes_nothing(ray_local, tmp_path, capsys):
    from pipeline.cli import build_parser, config_from_args
    from pipeline.job import _planned
    from pipeline.outputs.carry import fingerprint

    bucket = make_bucket(tmp_path / "bucket", n=6)
    out = tmp_path / "out"
    first = _dry_run(bucket, out, "a", "--incremental", capsys=capsys)
    assert first["incremental"] == {"base_run": None, "reason": "no committed run", "carried": 0, "segmented": 7}
    assert not out.exists()
    # Run a, committed by hand with this configuration's fingerprint; then a night's changes.
    parser = build_parser()
    config = config_from_args(parser.parse_args(job_args(bucket, out, "a")), parser)
    planned = _planned(config)
    fp = fingerprint(config, planned.prepared.weights, planned.resources)
    _fake_run(out, "a", planned.prepared.inputs.keys.to_pylist(), fp, bucket)
    _change_night(bucket)
    before = _files(out)
    night = _dry_run(bucket, out, "b", "--incremental", capsys=capsys)
    assert night["incremental"] == {"base_run": "a", "reason": None, "carried": 4, "segmented": 4}
    assert night["inputs"] == night["todo"] == 8
    changed = _dry_run(bucket, out, "b", "--incremental", "--crf-iterations", "5", capsys=capsys)
    reason = "crf.iterations changed: 10 -> 5 (since run a)"
    assert changed["incremental"] == {"base_run": None, "reason": reason, "carried": 0, "segmented": 8}
    assert "incremental" not in _dry_run(bucket, out, "b", capsys=capsys)
    assert _files(out) == before  # no run=b, nothing of run a touched


@pytest.mark.slow
def test_incremental_night_segments_only_what_changed(ray_local, tmp_path, capsys):
    bucket = make_bucket(tmp_path / "bucket", n=6)
    out = tmp_path / "out"
    _run(ray_local, bucket, out, "a", "--incremental")
    assert _manifest(out / "run=a")["incremental"] == {"base_run": None, "reason": "no committed run"}
    segmented = _change_night(bucket)
    predicted = _dry_run(bucket, out, "b", "--incremental", "--compare-previous", capsys=capsys)["incremental"]
    capsys.readouterr()
    summary = _run(ray_local, bucket, out, "b", "--incremental", "--compare-previous")
    printed = capsys.readouterr().out
    assert "incremental: 4 of 8 inputs carried from run a, 4 to segment" in printed
    assert "incremental      : 4 segmented, 4 carried from run a" in printed
    _check_night(out, "a", "b", segmented, bucket / "images")
    counts = _manifest(out / "run=b")["counts"]  # the dry run said what the night did
    assert predicted == {**_manifest(out / "run=b")["incremental"], **{k: counts[k] for k in ("carried", "segmented")}}
    assert summary.carried == 4 and _rows(out / "run=b", "errors")["corrupt.jpg"]["computed_in_run"] == "a"
    # The comparison covers the whole run: every key of the night against run a (carried ones agree).
    comparison = pq.read_table(out / "run=b" / "comparison").to_pylist()
    assert {r["key"] for r in comparison if r["status"] != "removed"} == set(_rows(out / "run=b", "masks"))
    assert all(r["disagreement"] == 0 for r in comparison if r["key"] in {"scene_2000004.jpg", "sub/scene_2000005.jpg"})
    # classes.parquet and the metrics are the whole night's: the same as a full run of it.
    _run(ray_local, bucket, out, "full")
    assert _manifest(out / "run=full")["incremental"]["base_run"] is None
    assert pq.read_table(out / "run=b" / "classes.parquet").equals(pq.read_table(out / "run=full" / "classes.parquet"))
    assert _manifest(out / "run=b")["metrics"] == _manifest(out / "run=full")["metrics"]
    # A changed CRF parameter carries nothing, and says why.
    _run(ray_local, bucket, out, "crf", "--incremental", "--crf-iterations", "5")
    manifest = _manifest(out / "run=crf")
    assert manifest["counts"]["carried"] == 0 and manifest["counts"]["segmented"] == 8
    assert manifest["incremental"]["base_run"] is None
    assert manifest["incremental"]["reason"] == "crf.iterations changed: 10 -> 5 (since run full)"


@pytest.mark.slow
def test_base_with_a_missing_part_is_refused_and_the_night_is_full(ray_local, tmp_path, capsys):
    bucket = make_bucket(tmp_path / "bucket", n=4)
    out = tmp_path / "out"
    _run(ray_local, bucket, out, "a", "--rows-per-file", "2")
    next(iter(sorted((out / "run=a" / "masks").glob("*.parquet")))).unlink()
    capsys.readouterr()
    _run(ray_local, bucket, out, "b", "--incremental")
    assert "no base run (base run a is incomplete" in capsys.readouterr().out
    manifest = _manifest(out / "run=b")
    assert manifest["counts"]["carried"] == 0 and manifest["counts"]["segmented"] == 5
    assert re.match(r"base run a is incomplete: its part files hold [34] of the 5", manifest["incremental"]["reason"])
    assert sorted({**_rows(out / "run=b", "masks"), **_rows(out / "run=b", "errors")}) == _keys(bucket / "images")


def _s3_job(s3: dict, run_id: str, *extra: str) -> subprocess.CompletedProcess:
    args = ["s3://inc/in/images", "--labels", "s3://inc/in/labels", "--output", "s3://inc/out", "--run-id", run_id]
    return run_job(*args, "--batch-size", "2", *extra, **s3)


@pytest.mark.slow
def test_incremental_night_on_s3_compares_etags(s3_env, s3_server, tmp_path):
    fs = s3_env
    bucket = make_bucket(tmp_path / "bucket", n=6)
    put_bucket(fs, bucket, "inc")
    env = {**S3_ENV, "AWS_ENDPOINT_URL": s3_server}
    first = _s3_job(env, "a", "--incremental")
    assert first.returncode == 0, first.stderr[-3000:]
    segmented = _change_night(bucket)  # the same changes, then mirrored: new ETags only where bytes changed
    fs.rm("inc/in/images/sub/scene_2000003.jpg")
    for key in ("images/new_a.jpg", "images/sub/new_b.jpg", "images/scene_2000002.jpg", "labels/scene_2000000.png"):
        fs.put(str(bucket / key), f"inc/in/{key}")
    fs.put(str(bucket / "images" / "scene_2000004.jpg"), "inc/in/images/scene_2000004.jpg")  # same bytes: same ETag
    second = _s3_job(env, "b", "--incremental")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "incremental: 4 of 8 inputs carried from run a, 4 to segment" in second.stdout
    local = tmp_path / "mirror"
    fs.get("inc/out", str(local), recursive=True)
    _check_night(local, "a", "b", segmented, bucket / "images")


@pytest.mark.slow
def test_killed_incremental_night_resumed_is_exactly_once(tmp_path):
    bucket = make_bucket(tmp_path / "bucket", n=8)
    out = tmp_path / "out"
    common = ("--incremental", "--batch-size", "1", "--rows-per-file", "1")
    first = run_job(*job_args(bucket, out, "a", *common), PYTHONPATH=str(REPO))
    assert first.returncode == 0, first.stderr[-3000:]
    segmented = _change_night(bucket)
    for name in ("scene_2000006.jpg", "sub/scene_2000005.jpg"):  # two more changed images: more to kill
        path = bucket / "images" / name
        path.write_bytes(path.read_bytes() + b"\0")
        segmented.add(name)

    def a_segmented_part() -> bool:
        rows = [r for p in (out / "run=b" / "masks").glob("*.parquet") for r in _read(p)]
        return any(r["computed_in_run"] == "b" for r in rows)

    # Kill the driver's process group once the carry is done and one segmented part is written; each
    # write pauses 2 s (tests/fault_hooks.py), so that the night is still running then.
    cmd = [*SEGMENT_BUCKET, *job_args(bucket, out, "b", *common)]
    kill_when(cmd, job_env(**fault_env(pause={"write": 2.0})), a_segmented_part, waiting_for="a segmented part")
    assert not (out / "run=b" / "_SUCCESS").exists()
    resumed = run_job(*job_args(bucket, out, "b", *common, "--resume"), PYTHONPATH=str(REPO))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _check_night(out, "a", "b", segmented, bucket / "images")


def _read(path: Path) -> list[dict]:
    try:
        return pq.read_table(path, columns=["key", "computed_in_run"]).to_pylist()
    except OSError:  # published atomically, but the glob may see a name an instant before it is whole
        return []


def test_docs_force_a_full_night_renders_a_run_without_incremental():
    """docs/kubernetes.md's command, run on k8s/rayjob.yaml: a new run id, no --incremental."""
    import yaml

    docs = (REPO / "docs" / "kubernetes.md").read_text()
    command = re.search(r"\*\*Forcing a full night\.\*\*.*?```sh\n(.*?)```", docs, re.S).group(1)
    sed = next(line for line in command.replace("\\\n", "").splitlines() if line.startswith("sed "))
    rendered = subprocess.run(
        ["bash", "-c", sed.split("|")[0]],
        cwd=REPO,
        env={**os.environ, "D": "2026-01-01"},
        capture_output=True,
        text=True,
    )
    entrypoint = yaml.safe_load(rendered.stdout)["spec"]["entrypoint"]
    assert "--run-id 2026-01-01-full --resume" in entrypoint and "--incremental" not in entrypoint
    assert "--incremental" in yaml.safe_load((REPO / "k8s" / "rayjob.yaml").read_text())["spec"]["entrypoint"]
