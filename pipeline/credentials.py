"""Which storage options carry credentials: refused on the command line, redacted in outputs."""

from __future__ import annotations

_SECRET_WORDS = ("secret", "key", "token", "password", "credential", "session")

# fsspec/s3fs/gcsfs/adlfs option names that carry a credential (compared case-insensitively).
CREDENTIAL_OPTIONS = frozenset(
    [
        "key",
        "secret",
        "token",
        "password",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "access_key",
        "secret_key",
        "session_token",
        "client_secret",
        "account_key",
        "sas_token",
        "credentials",
    ]
)


def credential_options(options: dict, prefix: str = "") -> list[str]:
    """Dotted names of the credential-carrying entries in ``options``, recursively."""
    found = []
    for k, v in options.items():
        if isinstance(v, dict):
            found += credential_options(v, f"{prefix}{k}.")
        elif k.lower() in CREDENTIAL_OPTIONS:
            found.append(prefix + k)
    return found


def redact(options: dict) -> dict:
    """Copy of ``options`` with credential-looking values replaced, recursively."""
    out: dict[str, object] = {}
    for k, v in options.items():
        if isinstance(v, dict):
            out[k] = redact(v)
        elif any(word in k.lower() for word in _SECRET_WORDS):
            out[k] = "***"
        else:
            out[k] = v
    return out
