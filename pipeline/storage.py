"""Object storage through fsspec: listing inputs, pairing labels, reading and writing bytes.

Any fsspec URI works (``s3://``, ``gs://``, ``file://``, plain paths). Endpoint and credentials
come from the standard environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...) or from
``storage_options``; they are never logged.
"""

from __future__ import annotations

import io
import os
import posixpath
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.core import split_protocol, url_to_fs

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# Transient S3 failures (5xx, throttling, connection resets) are retried by botocore, in one
# place, with jittered exponential backoff; 403/404 are never retried and reach the caller as
# PermissionError/FileNotFoundError (an error row with stage "read"). botocore's default ("legacy",
# 5 attempts) gives up after ~8 s of backoff, which turns a short S3 brownout into error rows in a
# nightly run, so we ask for "standard" mode (capped backoff and a client-wide retry quota, so a
# real outage still fails fast) with 10 attempts (about a minute). An operator's own choice wins:
# ``config_kwargs.retries`` in --storage-options, or AWS_RETRY_MODE / AWS_MAX_ATTEMPTS.
# See docs/faults.md for what was measured.
S3_RETRIES = {"mode": "standard", "total_max_attempts": 10}


class InputError(ValueError):
    """The input location cannot be used; the message says what to fix."""


def open_fs(uri: str, storage_options: dict | None = None):
    """(filesystem, path-without-protocol) for ``uri``."""
    options = dict(storage_options or {})
    if split_protocol(uri)[0] in ("s3", "s3a"):
        if not {"AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS"} & set(os.environ):
            config = options.get("config_kwargs") or {}
            options["config_kwargs"] = {"retries": dict(S3_RETRIES), **config}  # botocore edits it
        if "endpoint_url" not in options and os.environ.get("AWS_ENDPOINT_URL"):
            # fsspec caches filesystems by their arguments, not by the environment: naming the
            # endpoint keeps a process from reusing a client made for another endpoint.
            options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    return url_to_fs(uri, **options)


def _join(fs, root: str, key: str) -> str:
    # Concatenated, not posixpath.join: the S3 object "in//x.jpg" has the key "/x.jpg", and join
    # would drop the root for it (reading s3:///x.jpg, or another bucket's object for "/b/x.jpg").
    return fs.unstrip_protocol(f"{root}/{key}" if root else key)


def iter_image_keys(fs, root: str) -> Iterator[str]:
    """Relative keys of image files under ``root``, recursively, in lexical order, lazily.

    On S3 we page through ListObjectsV2 ourselves: it returns keys in UTF-8 byte order (= Python's
    str order), so nothing needs sorting, nothing is held beyond one page of 1000 keys, and a
    caller that stops early (--limit) stops the listing. ``fs.find`` would build the whole list
    and also keep every key's info dict in s3fs's listings cache for the life of the process.
    Other filesystems (local, GCS, ...) go through ``fs.find``.
    """
    root = root.rstrip("/")
    paths = _iter_s3_objects(fs, root) if "s3" in protocols(fs) else iter(sorted(fs.find(root)))
    for path in paths:
        if path.lower().endswith(IMAGE_EXTENSIONS):
            # Sliced, not normalised: a key like "a/../b.jpg" is a literal object name on S3.
            yield path[len(root) + 1 :] if root else path


def _iter_s3_objects(fs, root: str) -> Iterator[str]:
    bucket, _, prefix = root.partition("/")
    request = {"Bucket": bucket, "Prefix": f"{prefix}/" if prefix else "", **fs.req_kw}
    while True:
        page = fs.call_s3("list_objects_v2", **request)  # s3fs retries each page like any call
        for obj in page.get("Contents", []):
            yield f"{bucket}/{obj['Key']}"
        if not page.get("IsTruncated"):
            return
        request["ContinuationToken"] = page["NextContinuationToken"]


@dataclass(frozen=True)
class Inputs:
    """What a run segments: the listed keys as one Arrow column, and where each key's image and
    label live. Nothing per key is held in Python: URIs are derived from a key where needed."""

    input_uri: str
    labels_uri: str | None
    keys: pa.ChunkedArray  # string, lexical order
    storage_options: dict = field(default_factory=dict, hash=False)

    def __len__(self) -> int:
        return len(self.keys)

    def locator(self) -> Locator:
        return Locator(self.input_uri, self.labels_uri, self.storage_options)

    def without(self, done: pa.Array | pa.ChunkedArray) -> Inputs:
        """The keys not in ``done`` (an Arrow anti-join, for --resume)."""
        if len(done) == 0:
            return self
        keep = pc.invert(pc.is_in(self.keys, value_set=pa.chunked_array(done).combine_chunks()))
        return replace(self, keys=self.keys.filter(keep))


@dataclass(frozen=True)
class Locator:
    """Key → image URI and paired label URI (``<labels>/<key without extension>.png``)."""

    input_uri: str
    labels_uri: str | None
    storage_options: dict = field(default_factory=dict, hash=False)

    def image_uri(self, key: str) -> str:
        fs, root = open_fs(self.input_uri, self.storage_options)
        return _join(fs, root.rstrip("/"), key)

    def label_uri(self, key: str) -> str:
        if not self.labels_uri:
            return ""
        fs, root = open_fs(self.labels_uri, self.storage_options)
        return _join(fs, root.rstrip("/"), posixpath.splitext(key)[0] + ".png")


LIST_CHUNK = 10_000  # keys per Arrow chunk while listing: Python holds at most this many at once


def list_inputs(
    input_uri: str, labels_uri: str | None, *, storage_options: dict | None = None, limit: int | None = None
) -> Inputs:
    """List the images to segment (keys streamed into Arrow chunks, lexical order, ``limit`` stops early)."""
    storage_options = storage_options or {}
    try:
        fs, root = open_fs(input_uri, storage_options)
        if not fs.exists(root):
            raise InputError(f"input {input_uri} does not exist (check the path/bucket and credentials)")
        chunks, pending, count = [], [], 0
        for key in iter_image_keys(fs, root):
            pending.append(key)
            count += 1
            if len(pending) >= LIST_CHUNK:
                chunks.append(pa.array(pending, pa.string()))
                pending = []
            if limit is not None and count >= limit:
                break
        chunks.append(pa.array(pending, pa.string()))
    except InputError:
        raise
    except Exception as exc:  # credentials, DNS, endpoint: say it in one line
        raise InputError(f"cannot list {input_uri}: {type(exc).__name__}: {exc}") from None
    if not count:
        raise InputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {input_uri}")
    return Inputs(input_uri, labels_uri, pa.chunked_array(chunks, pa.string()), storage_options)


def read_bytes(uri: str, storage_options: dict | None = None) -> bytes:
    """The whole object in one GET (no HEAD first); FileNotFoundError/PermissionError on 404/403."""
    fs, path = open_fs(uri, storage_options)
    return fs.cat_file(path)


def exists(uri: str, storage_options: dict | None = None) -> bool:
    fs, path = open_fs(uri, storage_options)
    return fs.exists(path)


def write_bytes_atomic(uri: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write so that readers never see a partial object.

    Object stores publish a PUT atomically; on local/POSIX filesystems we write a hidden
    temporary name next to the target and rename it into place.
    """
    fs, path = open_fs(uri, storage_options)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if "file" in protocols(fs):
        tmp = posixpath.join(parent, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)


def write_parquet_atomic(uri: str, table: pa.Table, storage_options: dict | None = None) -> None:
    """One Parquet file (zstd), published atomically: the one way the project writes Parquet."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    write_bytes_atomic(uri, buffer.getvalue(), storage_options)


def arrow_filesystem(fs):
    """A pyarrow filesystem over an fsspec one, for readers that take pyarrow's (Ray Data's read_parquet)."""
    import pyarrow.fs

    if "file" in protocols(fs):
        return pyarrow.fs.LocalFileSystem()
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def protocols(fs) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)
