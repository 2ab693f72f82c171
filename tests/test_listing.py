"""Listing inputs on a real S3 server: paginated, in lexical order, lazy (--limit stops the listing
early), and without a second copy of the listing left behind in s3fs's cache."""

from __future__ import annotations

import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import boto3
import botocore.config
import pyarrow as pa
import pytest
import s3fs

from pipeline.io.storage import list_inputs
from tests.conftest import S3_ENV
from tests.faulty_s3 import FaultyS3

LIST = r"^/listing/?$"  # ListObjectsV2 is a GET on the bucket


@pytest.fixture()
def s3_client(s3_env, s3_server):
    client = boto3.client(
        "s3",
        endpoint_url=s3_server,
        aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
        config=botocore.config.Config(max_pool_connections=16),
    )
    if "listing" not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket="listing")
    return client


def put_many(client, keys: list[str]) -> None:
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: client.put_object(Bucket="listing", Key=k, Body=b"x"), keys))


def test_listing_order_prefix_and_labels(s3_client, s3_server, monkeypatch):
    keys = [
        "small/b.jpg",
        "small/a/z.PNG",
        "small/a.jpg",
        "small/a b/ü.webp",
        "small/notes.txt",
        "small/dir/",
        "small/a//double.jpg",
        "small-sibling/not-mine.jpg",
    ]
    put_many(s3_client, keys)
    inputs = list_inputs("s3://listing/small", "s3://listing/labels")
    got = inputs.keys.to_pylist()
    assert got == sorted(got) == ["a b/ü.webp", "a.jpg", "a//double.jpg", "a/z.PNG", "b.jpg"]
    assert inputs.keys.type == pa.string()  # one Arrow column, no Python object per key
    locator = inputs.locator()
    assert locator.image_uri(got[3]) == "s3://listing/small/a/z.PNG"
    assert locator.label_uri(got[3]) == "s3://listing/labels/a/z.png"
    # Resume: an Arrow anti-join drops the keys already done, order kept.
    assert inputs.without(pa.array(["a.jpg", "b.jpg", "gone.jpg"])).keys.to_pylist() == [
        "a b/ü.webp",
        "a//double.jpg",
        "a/z.PNG",
    ]


@pytest.mark.slow
def test_twenty_thousand_keys_paginate_in_order_and_limit_stops_early(s3_client, s3_server, monkeypatch, capsys):
    n = 20_000
    keys = [f"big/{i % 7}/img-{i:06d}.jpg" for i in range(n)]
    started = time.perf_counter()
    put_many(s3_client, keys)
    put_s = time.perf_counter() - started
    with FaultyS3(s3_server) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        s3fs.S3FileSystem.clear_instance_cache()  # cached instances keep the endpoint they were made with
        tracemalloc.start()
        started = time.perf_counter()
        inputs = list_inputs("s3://listing/big", None)
        list_s = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert inputs.keys.to_pylist() == sorted(k.removeprefix("big/") for k in keys)
        # one request per page of 1000 keys, plus the "does the input exist" check before listing
        assert proxy.count("GET", LIST) == n // 1000 + 1

        before = proxy.count("GET", LIST)
        assert len(list_inputs("s3://listing/big", None, limit=5)) == 5
        assert proxy.count("GET", LIST) - before == 2  # the check and the first page: no more

    from pipeline.io.storage import open_fs

    fs, _ = open_fs("s3://listing/big")
    assert not any(path.startswith("listing/big") for path in fs.dircache)  # no cached second copy
    with capsys.disabled():
        print(
            f"\n[listing] put {n} keys in {put_s:.1f}s; listed in {list_s:.2f}s "
            f"({n / list_s:.0f} keys/s), Python peak {peak / 2**20:.1f} MiB "
            f"({peak / n:.0f} B/key, the Arrow key column included)"
        )
