"""Object storage through fsspec: listing inputs, pairing labels, reading and writing bytes.

Any fsspec URI works (``s3://``, ``gs://``, ``file://``, plain paths). Endpoint and credentials
come from the standard environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...) or from
``storage_options``; they are never logged.
"""

from __future__ import annotations

import io
import os
import posixpath
import stat
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.core import split_protocol, url_to_fs

from pipeline.io.credentials import public_text, public_uri

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
    """The URI shown for ``key`` (never read: ``Locator.read_*`` read exact paths): the root without
    userinfo or query string, then the key as it is."""
    # Concatenated, not posixpath.join: the S3 object "in//x.jpg" has the key "/x.jpg", and join
    # would drop the root for it (showing s3:///x.jpg, or another bucket's object for "/b/x.jpg").
    return f"{public_uri(fs.unstrip_protocol(root))}/{key}" if root else fs.unstrip_protocol(key)


def iter_image_keys(fs, root: str) -> Iterator[str]:
    """Relative keys of image files under ``root``, recursively, in lexical order, lazily."""
    for key, _, _ in iter_image_objects(fs, root):
        yield key


def iter_image_objects(fs, root: str) -> Iterator[tuple[str, int | None, str | None]]:
    """(relative key, size, identity) of the image files under ``root``, recursively, in lexical
    order, lazily. The identity is the listing's own token of the object's content (``object_identity``).

    On S3 we page through ListObjectsV2 ourselves: it returns keys in UTF-8 byte order (= Python's
    str order), so nothing needs sorting, nothing is held beyond one page of 1000 keys, and a
    caller that stops early (--limit) stops the listing. ``fs.find`` would build the whole list
    and also keep every key's info dict in s3fs's listings cache for the life of the process.
    Local folders hold only their regular files (``_iter_local``). Other filesystems (GCS, ...)
    go through ``fs.find``.
    """
    root = root.rstrip("/")
    if "s3" in protocols(fs):
        objects = _iter_s3_objects(fs, root)
    elif "file" in protocols(fs):
        for key, size, identity in _iter_local(root):
            if key.lower().endswith(IMAGE_EXTENSIONS):
                yield key, size, identity
        return
    else:
        objects = ((path, object_identity(fs, path, info)) for path, info in sorted(fs.find(root, detail=True).items()))
    for path, (size, identity) in objects:
        if path.lower().endswith(IMAGE_EXTENSIONS):
            # Sliced, not normalised: a key like "a/../b.jpg" is a literal object name on S3.
            yield (path[len(root) + 1 :] if root else path), size, identity


ESCAPED_MARK = "\\x"  # how an undecodable byte shows in an escaped key (backslashreplace)


def escaped_name(name: str) -> str:
    """A file name as the OS gave it (undecodable bytes as surrogates) → a valid string with those
    bytes written as ``\\xNN``: such a name becomes an error row under this key, never a listing failure."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def undecodable(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _iter_local(root: str) -> Iterator[tuple[str, int | None, str | None]]:
    """(key, size, identity) of the regular files under ``root`` (sorted by key): FIFOs, devices,
    sockets, directories and symlinks that leave ``root`` or name no regular file are not inputs (a
    FIFO would hang a read, /dev/zero never ends). Undecodable names come escaped (``escaped_name``)
    and without an identity (never carried); the identity is st_mtime_ns, which a rewrite changes."""
    real_root = os.path.realpath(root)
    rows: list[tuple[str, int | None, str | None]] = []  # (key, size, version); None: an undecodable name
    for folder, _, files in os.walk(root):  # symlinked folders are not walked into
        for name in files:
            path = os.path.join(folder, name)
            if not regular_under(path, real_root):
                continue
            key = os.path.relpath(path, root).replace(os.sep, "/")
            if undecodable(key):
                rows.append((escaped_name(key), None, None))
                continue
            info = os.stat(path)
            rows.append((key, info.st_size, f"mtime:{info.st_mtime_ns}"))
    return iter(sorted(rows))


def regular_under(path: str, real_root: str) -> bool:
    """Whether ``path`` is (or links to) a regular file inside ``real_root``."""
    try:
        real = os.path.realpath(path)
        return real.startswith(real_root.rstrip("/") + "/") and stat.S_ISREG(os.stat(real).st_mode)
    except (OSError, ValueError):
        return False


def _iter_s3_objects(fs, root: str) -> Iterator[tuple[str, tuple[int | None, str | None]]]:
    bucket, _, prefix = root.partition("/")
    request = {"Bucket": bucket, "Prefix": f"{prefix}/" if prefix else "", **fs.req_kw}
    while True:
        page = fs.call_s3("list_objects_v2", **request)  # s3fs retries each page like any call
        for obj in page.get("Contents", []):
            etag = obj.get("ETag")
            yield f"{bucket}/{obj['Key']}", (obj.get("Size"), f"etag:{etag.strip(chr(34))}" if etag else None)
        if not page.get("IsTruncated"):
            return
        request["ContinuationToken"] = page["NextContinuationToken"]


# What an fsspec backend's info dict may say about an object's content, most specific first: a
# version id or generation names one immutable content; an ETag or hash derives from it.
_INFO_IDENTITIES = (
    ("VersionId", "version"),
    ("version_id", "version"),
    ("generation", "generation"),
    ("ETag", "etag"),
    ("etag", "etag"),
    ("md5Hash", "md5"),
    ("crc32c", "crc32c"),
    ("content_md5", "md5"),
    ("sha256", "sha256"),
)


def object_identity(fs, path: str, info: dict) -> tuple[int | None, str | None]:
    """(size, identity token) of one listed object; token None when the backend offers nothing
    that changes with the content (such an object is never assumed unchanged)."""
    size = info.get("size")
    if "file" in protocols(fs):
        # st_mtime_ns, not fsspec's float seconds: a rewrite within the same microsecond still shows.
        stat = os.stat(path)
        return stat.st_size, f"mtime:{stat.st_mtime_ns}"
    for field_name, kind in _INFO_IDENTITIES:
        value = info.get(field_name)
        if value not in (None, ""):
            return size, f"{kind}:{str(value).strip(chr(34))}"
    for field_name in ("mtime", "LastModified", "last_modified", "updated", "modified"):
        if info.get(field_name) not in (None, ""):
            return size, f"mtime:{info[field_name]}"
    return size, None


@dataclass(frozen=True)
class Inputs:
    """What a run segments: the listed keys as one Arrow column, and where each key's image and
    label live. Nothing per key is held in Python: URIs are derived from a key where needed."""

    input_uri: str
    labels_uri: str | None
    keys: pa.ChunkedArray  # string, lexical order
    storage_options: dict = field(default_factory=dict, hash=False)
    # Per-key identity from the listing, aligned with ``keys`` (pipeline/outputs/carry.py compares them):
    # int64 bytes, and a token such as "etag:<etag>" / "version:<id>" / "mtime:<ns>" (null: none).
    sizes: pa.ChunkedArray | None = field(default=None, hash=False)
    versions: pa.ChunkedArray | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        # ``replace(inputs, keys=...)`` (the runner's isolation passes) keeps no stale identities:
        # identities that do not line up with the keys are dropped, and no identity is never "unchanged".
        for name in ("sizes", "versions"):
            column = getattr(self, name)
            if column is not None and len(column) != len(self.keys):
                object.__setattr__(self, name, None)

    def __len__(self) -> int:
        return len(self.keys)

    def locator(self) -> Locator:
        return Locator(self.input_uri, self.labels_uri, self.storage_options)

    def without(self, done: pa.Array | pa.ChunkedArray) -> Inputs:
        """The keys not in ``done`` (an Arrow anti-join, for --resume)."""
        if len(done) == 0:
            return self
        keep = pc.invert(pc.is_in(self.keys, value_set=pa.chunked_array(done).combine_chunks()))
        aligned = {n: getattr(self, n).filter(keep) for n in ("sizes", "versions") if getattr(self, n) is not None}
        return replace(self, keys=self.keys.filter(keep), **aligned)

    def identities(self) -> pa.Table:
        """key, size, version: the listing's identity of each key (nulls where none was listed)."""
        n = len(self.keys)
        sizes = self.sizes if self.sizes is not None else pa.nulls(n, pa.int64())
        versions = self.versions if self.versions is not None else pa.nulls(n, pa.string())
        return pa.table({"key": self.keys, "size": sizes, "version": versions})


@dataclass(frozen=True)
class Locator:
    """Key → image URI and paired label URI (``<labels>/<key without extension>.png``).

    ``*_uri`` are for display; reads go through ``read_image`` / ``read_label``, which address the
    listed object's exact path on the listed filesystem: a key is never re-parsed as a URI, so
    ``::`` or ``?versionId=`` in a key are part of its name."""

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
        return _join(fs, root.rstrip("/"), label_key(key))

    def read_image(self, key: str, limit: int) -> bytes:
        fs, root = open_fs(self.input_uri, self.storage_options)
        path = _under(root, key)
        if ESCAPED_MARK in key and "file" in protocols(fs) and not os.path.lexists(path):
            # Only a local listing escapes names (object store keys are UTF-8 by definition).
            raise UndecodableName(f"the file name is not valid UTF-8 (shown with its bytes escaped: {key}); rename it")
        return read_object(fs, path, limit, root=root)

    def read_label(self, key: str, limit: int) -> bytes | None:
        """The label's bytes, or None without a labels folder."""
        if not self.labels_uri:
            return None
        fs, root = open_fs(self.labels_uri, self.storage_options)
        return read_object(fs, _under(root, label_key(key)), limit, root=root)


class UndecodableName(ValueError):
    """A listed file whose name is not valid UTF-8 (its key is the escaped name)."""


def label_key(key: str) -> str:
    return posixpath.splitext(key)[0] + ".png"


def _under(root: str, key: str) -> str:
    root = root.rstrip("/")
    return f"{root}/{key}" if root else key


class ObjectTooLarge(ValueError):
    """The object is larger than the limit its reader set (nothing beyond limit+1 bytes was read)."""


def read_object(fs, path: str, limit: int, *, root: str = "") -> bytes:
    """At most ``limit`` bytes of the object at exactly ``path`` on ``fs`` (no URI parsing);
    ``ObjectTooLarge`` when it is larger, after reading at most ``limit`` + 1 bytes (none where
    the size is known first: a local file's stat, S3's Content-Range)."""
    kinds = protocols(fs)
    if "s3" in kinds:
        data = _read_s3(fs, path, limit)
    elif "file" in kinds:
        data = _read_local(path, limit, root)
    else:
        data = fs.cat_file(path, start=0, end=limit + 1)
    if len(data) > limit:
        raise ObjectTooLarge(_too_large(len(data), limit, exact=False))
    return data


def _too_large(size: int, limit: int, *, exact: bool) -> str:
    shown = f"{size / 2**20:.1f} MiB" if exact else "more than that"
    return f"refused before decoding: the object is over the {limit / 2**20:.0f} MiB object size limit ({shown})"


def _read_local(path: str, limit: int, root: str) -> bytes:
    """A regular file inside ``root`` only: never a FIFO (it would block), a device, or a link out."""
    real = os.path.realpath(path)
    if root and not real.startswith(os.path.realpath(root).rstrip("/") + "/"):
        raise PermissionError(f"{path} resolves outside the input folder")
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(real, flags)
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise PermissionError(f"{path} is not a regular file")
        if info.st_size > limit:
            raise ObjectTooLarge(_too_large(info.st_size, limit, exact=True))
        return f.read(limit + 1)


def _read_s3(fs, path: str, limit: int) -> bytes:
    """One ranged GET of exactly bucket/key (s3fs's own path parsing would take ``?versionId=``
    in a key as a version); the total size in Content-Range refuses before the body is read."""
    from fsspec.asyn import sync

    bucket, _, key = path.partition("/")

    async def get() -> bytes:
        try:
            resp = await fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes=0-{limit}")
        except Exception as exc:
            if "InvalidRange" in repr(exc.__cause__) or "range is not satisfiable" in str(exc):  # 0 bytes
                return b""
            raise
        body = resp["Body"]
        try:
            total = str(resp.get("ContentRange", "")).rpartition("/")[2]
            if total.isdigit() and int(total) > limit:
                raise ObjectTooLarge(_too_large(int(total), limit, exact=True))
            return await body.read()
        finally:
            body.close()

    return sync(fs.loop, get)


LIST_CHUNK = 10_000  # keys per Arrow chunk while listing: Python holds at most this many at once


def list_inputs(
    input_uri: str, labels_uri: str | None, *, storage_options: dict | None = None, limit: int | None = None
) -> Inputs:
    """List the images to segment (keys streamed into Arrow chunks, lexical order, ``limit`` stops
    early), with each object's size and identity from the listing's own detail."""
    storage_options = storage_options or {}
    try:
        fs, root = open_fs(input_uri, storage_options)
        if not fs.exists(root):
            raise InputError(f"input {public_uri(input_uri)} does not exist (check the path/bucket and credentials)")
        keys, sizes, versions = _listed(iter_image_objects(fs, root), limit)
    except InputError:
        raise
    except Exception as exc:  # credentials, DNS, endpoint: say it in one line
        shown = public_text(f"{type(exc).__name__}: {exc}", [input_uri])
        raise InputError(f"cannot list {public_uri(input_uri)}: {shown}") from None
    if not len(keys):
        raise InputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {public_uri(input_uri)}")
    return Inputs(input_uri, labels_uri, keys, storage_options, sizes=sizes, versions=versions)


def _listed(objects, limit: int | None) -> tuple[pa.ChunkedArray, pa.ChunkedArray, pa.ChunkedArray]:
    """(key, size, identity) tuples as three aligned Arrow columns, LIST_CHUNK rows per chunk."""
    columns: tuple[list, list, list] = ([], [], [])
    types = (pa.string(), pa.int64(), pa.string())
    pending: tuple[list, list, list] = ([], [], [])
    for count, row in enumerate(objects, 1):
        for column, value in zip(pending, row, strict=True):
            column.append(value)
        if len(pending[0]) >= LIST_CHUNK:
            for out, column, type_ in zip(columns, pending, types, strict=True):
                out.append(pa.array(column, type_))
                column.clear()
        if limit is not None and count >= limit:
            break
    for out, column, type_ in zip(columns, pending, types, strict=True):
        out.append(pa.array(column, type_))
    keys, sizes, versions = (pa.chunked_array(out, type_) for out, type_ in zip(columns, types, strict=True))
    return keys, sizes, versions


def list_label_identities(labels_uri: str, storage_options: dict | None = None) -> pa.Table:
    """label_key, label_size, label_version of every PNG under ``labels_uri`` (empty when it does
    not exist): the labels' identities, listed like the images' (pipeline/outputs/carry.py)."""
    fs, root = open_fs(labels_uri, storage_options or {})
    keys, sizes, versions = pa.chunked_array([], pa.string()), None, None
    if fs.exists(root):
        keys, sizes, versions = _listed(
            ((k, s, v) for k, s, v in iter_image_objects(fs, root) if k.lower().endswith(".png")), None
        )
    n = len(keys)
    return pa.table(
        {
            "label_key": keys,
            "label_size": sizes if sizes is not None else pa.nulls(n, pa.int64()),
            "label_version": versions if versions is not None else pa.nulls(n, pa.string()),
        }
    )


def read_bytes(uri: str, storage_options: dict | None = None, *, limit: int | None = None) -> bytes:
    """The whole object in one GET (no HEAD first); FileNotFoundError/PermissionError on 404/403.
    With ``limit``: at most that many bytes (``read_object``), ``ObjectTooLarge`` beyond."""
    fs, path = open_fs(uri, storage_options)
    return fs.cat_file(path) if limit is None else read_object(fs, path, limit)


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
