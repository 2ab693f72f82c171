"""Credentials stay out of the command line, the logs and the outputs.

Storage options are allow-listed: ``ALLOWED`` names the fsspec/s3fs/gcsfs/adlfs options known to
carry no secret (nested dicts by their own allow-lists); anything else (``key``, ``secret``, an
``Authorization`` header in ``client_kwargs``, an Azure ``connection_string``, a name nobody
reviewed) is refused on the command line and redacted wherever options are persisted. URIs lose
their userinfo (``user:password@``) and query string (a presigned URL's signature) wherever they
are printed, logged or persisted (``public_uri``).
"""

from __future__ import annotations

import re
from typing import overload
from urllib.parse import urlsplit, urlunsplit

REDACTED = "***"
_SCALAR = (str, int, float, bool, type(None))
_LEAF = True

# Option names (exact, case-sensitive as the libraries read them) → True for a scalar value, or the
# allow-list of a nested dict. What is not here is refused: an unknown name may carry a secret.
ALLOWED: dict = {
    **dict.fromkeys(
        "endpoint_url anon requester_pays default_block_size default_fill_cache default_cache_type version_aware "
        "cache_regions use_ssl profile use_listings_cache listings_expiry_time max_concurrency skip_instance_cache "
        "fixed_upload_size region_name project access consistency default_location account_name "
        "block_size cache_timeout".split(),
        _LEAF,
    ),
    "client_kwargs": dict.fromkeys("region_name endpoint_url verify use_ssl api_version".split(), _LEAF),
    "config_kwargs": {
        **dict.fromkeys(
            "connect_timeout read_timeout max_pool_connections signature_version region_name tcp_keepalive "
            "request_checksum_calculation response_checksum_validation parameter_validation".split(),
            _LEAF,
        ),
        "retries": dict.fromkeys("mode total_max_attempts max_attempts".split(), _LEAF),
        "s3": dict.fromkeys("addressing_style use_accelerate_endpoint payload_signing_enabled".split(), _LEAF),
    },
    "s3_additional_kwargs": dict.fromkeys(
        "ServerSideEncryption SSEKMSKeyId ACL StorageClass RequestPayer ChecksumAlgorithm".split(), _LEAF
    ),
}

_URL_OPTION = re.compile(r"^[a-z][a-z0-9+.-]*://", re.I)


def refused_options(options: dict, allowed: dict | None = None, prefix: str = "") -> list[str]:
    """Dotted names of the entries of ``options`` not allowed (or not of the allowed shape), and of
    URL values carrying userinfo or a query string; names only, never values."""
    allowed = ALLOWED if allowed is None else allowed
    refused = []
    for name, value in options.items():
        spec = allowed.get(name) if isinstance(name, str) else None
        dotted = f"{prefix}{name}"
        if isinstance(spec, dict) and isinstance(value, dict):
            refused += refused_options(value, spec, f"{dotted}.")
        elif spec is _LEAF and isinstance(value, _SCALAR):
            if isinstance(value, str) and _URL_OPTION.match(value) and public_uri(value) != value:
                refused.append(f"{dotted} (userinfo or query string in the URL)")
        else:
            refused.append(dotted)
    return refused


def credential_options(options: dict, prefix: str = "") -> list[str]:
    """The entries ``refused_options`` names (kept for callers of the deny-list era)."""
    return refused_options(options, prefix=prefix)


def redact(options: dict, allowed: dict | None = None) -> dict:
    """Copy of ``options`` in which every value outside the allow-list is ``REDACTED``, recursively."""
    allowed = ALLOWED if allowed is None else allowed
    out: dict = {}
    for name, value in options.items():
        spec = allowed.get(name) if isinstance(name, str) else None
        if isinstance(spec, dict) and isinstance(value, dict):
            out[name] = redact(value, spec)
        elif spec is _LEAF and isinstance(value, _SCALAR):
            out[name] = public_uri(value) if isinstance(value, str) and _URL_OPTION.match(value) else value
        else:
            out[name] = REDACTED
    return out


@overload
def public_uri(uri: str) -> str: ...
@overload
def public_uri(uri: None) -> None: ...
def public_uri(uri: str | None) -> str | None:
    """``uri`` without userinfo and query string (``https://u:p@h/x?sig=..#f`` → ``https://h/x#f``);
    plain paths and ``None`` unchanged. For printing, logging and persisting, never for reading."""
    if not uri or "://" not in uri:
        return uri
    try:
        parts = urlsplit(uri)
    except ValueError:  # unparseable: show only the scheme
        return uri.split("://", 1)[0] + "://" + REDACTED
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", parts.fragment))


def public_text(text: str, uris: list[str | None]) -> str:
    """``text`` with each of ``uris`` (as given) replaced by its ``public_uri``."""
    for uri in uris:
        if uri and public_uri(uri) != uri:
            text = text.replace(uri, public_uri(uri))
    return text
