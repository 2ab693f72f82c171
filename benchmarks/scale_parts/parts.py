"""The three parts: synthetic runs (commit, compare), list + resume on S3, the CLI end to end."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from scale_parts import MIB, POOL, ROWS_PER_PART
from scale_parts.runner import Runner
from scale_parts.synthetic import Pool, _keys, build_part, parquet_bytes, thumbnail_uris, write_run


def part_runs(runner: Runner, pool: Pool, sizes: list[int], sides: list[str], before_max: int | None) -> list[dict]:
    """commit + report, and the comparison of two runs, per size."""
    rows = []
    uris = thumbnail_uris(runner.work, pool)
    for n in sizes:
        folder = runner.work / f"runs-{n}"
        shutil.rmtree(folder, ignore_errors=True)
        out = folder / "out"
        started = time.perf_counter()
        for run_id, changed in (("night1", False), ("night2", True)):
            write_run(pool, out, run_id, n, uris, folder / f"stats-{run_id}.jsonl", changed=changed)
        print(
            f"{n} keys: two runs written in {time.perf_counter() - started:.0f} s ({_du(out) / MIB:.0f} MiB on disk)",
            flush=True,
        )
        todo = [s for s in sides if s == "after" or before_max is None or n <= before_max]
        commit = {
            "out": str(out),
            "run_id": "night1",
            "stats_file": str(folder / "stats-night1.jsonl"),
            "input_uri": str(runner.work / "thumbs"),
        }
        rows.append(
            {
                "step": "commit + report",
                "n": n,
                **{s: runner.measure(s, f"commit_{s}", f"commit-{n}", commit) for s in todo},
            }
        )
        compare = {"out": str(out), "old_id": "night1", "new_id": "night2"}
        rows.append(
            {
                "step": "compare two runs",
                "n": n,
                **{s: runner.measure(s, f"compare_{s}", f"compare-{n}", compare, tree_pss=s == "after") for s in todo},
            }
        )
        shutil.rmtree(folder)
    return rows


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server(work: Path):
    port = _free_port()
    log = open(work / "logs" / "moto.log", "w")  # noqa: SIM115 (the server writes it while it runs)
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def _put_all(client, bucket: str, items: list[tuple[str, bytes]]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: client.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), items))


def part_listing(runner: Runner, pool: Pool, sizes: list[int], sides: list[str]) -> list[dict]:
    """list_inputs + resume against S3 (moto): N objects, a run holding the first half of the keys."""
    import boto3
    import pyarrow as pa
    from botocore.config import Config

    from pipeline.writer import part_name

    rows = []
    creds = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    with moto_server(runner.work) as url:
        os.environ.update(creds)
        runner.env = {**creds, "AWS_ENDPOINT_URL": url}
        client = boto3.client("s3", endpoint_url=url, config=Config(max_pool_connections=32))
        for n in sizes:
            started = time.perf_counter()
            bucket, out_bucket = f"in-{n}", f"out-{n}"
            client.create_bucket(Bucket=bucket)
            client.create_bucket(Bucket=out_bucket)
            _put_all(client, bucket, [(f"images/{k}", b"\xff\xd8\xff") for k in _keys(0, n)])
            parts = []
            for start in range(0, n // 2, ROWS_PER_PART):
                masks, errors = build_part(pool, start, min(n // 2, start + ROWS_PER_PART), "resume", ["x"], False)
                name = part_name(pa.chunked_array([masks.column("key"), errors.column("key")]))
                parts.append((f"out/run=resume/masks/{name}", parquet_bytes(masks)))
                if errors.num_rows:
                    parts.append((f"out/run=resume/errors/{name}", parquet_bytes(errors)))
            _put_all(client, out_bucket, parts)
            print(
                f"{n} objects + {len(parts)} part files uploaded in {time.perf_counter() - started:.0f} s", flush=True
            )
            params = {"input_uri": f"s3://{bucket}/images", "out": f"s3://{out_bucket}/out", "run_id": "resume"}
            rows.append(
                {
                    "step": "list + resume (S3)",
                    "n": n,
                    **{s: runner.measure(s, f"resume_{s}", f"resume-{n}", params) for s in sides},
                }
            )
        runner.env = {}
    return rows


def write_images(folder: Path, pool: Pool, count: int) -> tuple[Path, Path]:
    images, labels = folder / "images", folder / "labels"
    images.mkdir(parents=True)
    labels.mkdir()
    for i in range(count):
        (images / f"img-{i:06d}.jpg").write_bytes(pool.jpegs[i % POOL])
        (labels / f"img-{i:06d}.png").write_bytes(pool.labels[i % POOL])
    return images, labels


def part_e2e(runner: Runner, pool: Pool, sizes: list[int], sides: list[str]) -> list[dict]:
    """The CLI end to end, CRF off, over 64x64 JPEGs."""
    rows = []
    for n in sizes:
        folder = runner.work / f"e2e-{n}"
        shutil.rmtree(folder, ignore_errors=True)
        images, labels = write_images(folder, pool, n)
        row = {"step": "end to end (CLI, --no-crf)", "n": n}
        for side in sides:
            params = {
                "tree": str(runner.trees[side]),
                "images": str(images),
                "labels": str(labels),
                "out": str(folder / f"out-{side}"),
                "run_id": "e2e",
            }
            row[side] = runner.measure(side, "e2e", f"e2e-{n}", params, tree_pss=True)
        rows.append(row)
        shutil.rmtree(folder)
    return rows
