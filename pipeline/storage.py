"""Object storage through fsspec: listing inputs, pairing labels, reading and writing bytes.

Any fsspec URI works (``s3://``, ``gs://``, ``file://``, plain paths). Endpoint and credentials
come from the standard environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...) or from
``storage_options``; they are never logged.
"""

from __future__ import annotations

import posixpath
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
from fsspec.core import url_to_fs

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class InputError(ValueError):
    """The input location cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class InputFile:
    key: str  # path relative to the input root, '/'-separated
    uri: str  # full URI to read the image from
    label_uri: str  # full URI of the paired label PNG, '' when no labels were given


def open_fs(uri: str, storage_options: dict | None = None):
    """(filesystem, path-without-protocol) for ``uri``."""
    return url_to_fs(uri, **(storage_options or {}))


def _join(fs, root: str, key: str) -> str:
    return fs.unstrip_protocol(posixpath.join(root, key)) if root else fs.unstrip_protocol(key)


def iter_image_keys(fs, root: str) -> Iterator[str]:
    """Relative keys of image files under ``root``, recursively, in lexical order.

    ``fs.find`` pages through the listing (S3 ListObjectsV2 returns 1000 keys a page).
    """
    root = root.rstrip("/")
    for path in sorted(fs.find(root)):
        if path.lower().endswith(IMAGE_EXTENSIONS):
            yield posixpath.relpath(path, root) if root else path


def list_inputs(input_uri: str, labels_uri: str | None, *, storage_options: dict | None = None,
                limit: int | None = None) -> list[InputFile]:
    """List the images to segment and pair each with ``<labels>/<key without ext>.png``."""
    try:
        fs, root = open_fs(input_uri, storage_options)
        if not fs.exists(root):
            raise InputError(f"input {input_uri} does not exist (check the path/bucket and credentials)")
        keys = iter_image_keys(fs, root)
        files = []
        label_fs, label_root = open_fs(labels_uri, storage_options) if labels_uri else (None, "")
        for key in keys:
            label = ""
            if label_fs is not None:
                label = _join(label_fs, label_root.rstrip("/"), posixpath.splitext(key)[0] + ".png")
            files.append(InputFile(key=key, uri=_join(fs, root.rstrip("/"), key), label_uri=label))
            if limit is not None and len(files) >= limit:
                break
    except InputError:
        raise
    except Exception as exc:  # credentials, DNS, endpoint: say it in one line
        raise InputError(f"cannot list {input_uri}: {type(exc).__name__}: {exc}") from None
    if not files:
        raise InputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {input_uri}")
    return files


def read_bytes(uri: str, storage_options: dict | None = None) -> bytes:
    with fsspec.open(uri, "rb", **(storage_options or {})) as f:
        return f.read()


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
    if "file" in _protocols(fs):
        tmp = posixpath.join(parent, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)


def _protocols(fs) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)
