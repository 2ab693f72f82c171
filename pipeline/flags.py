"""Command-line value types shared by the jobs (``--scales``, ``--infer-actors``, ``--storage-options``)."""

from __future__ import annotations

import argparse
import json


def parse_range(text: str) -> tuple[int, int]:
    """``N`` or ``MIN-MAX`` → (MIN, MAX)."""
    try:
        lo, _, hi = text.partition("-")
        return int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX, got {text!r}") from None


def parse_scales(text: str) -> tuple[float, ...]:
    """``0.5,1.0,1.5`` → (0.5, 1.0, 1.5)."""
    try:
        return tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.5,1.0,1.5, got {text!r}") from None


def json_object(text: str) -> dict:
    """Options given as a JSON object (e.g. --storage-options)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"endpoint_url\": \"http://...\"}'")
    return value
