"""Command-line flags: the value types the jobs share and config fields that are their own flags."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import MISSING, Field, field, fields
from typing import Any, TypedDict, Unpack


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
        raise argparse.ArgumentTypeError('must be a JSON object, e.g. \'{"endpoint_url": "http://..."}\'')
    return value


# --------------------------------------------------------------------------- config fields as flags
# A config field declared with ``option(...)`` is its own command-line flag: the dataclass holds its
# default, help text, allowed values and bounds, and ``add_flags`` / ``values_from`` derive the
# parser and the mapping back from it, so a field cannot be forgotten in either.


class FlagSpec(TypedDict, total=False):
    """``option``'s flag keywords: ``lo``/``hi`` inclusive bounds, ``above``/``below`` exclusive ones,
    all checked by ``check_fields`` (``note`` is appended to that message); ``flag`` defaults to
    ``--<prefix><name>`` with the class's ``FLAG_PREFIX``, ``group`` to its ``FLAG_GROUP``."""

    flag: str | None
    group: str | None
    type: Callable[[str], Any] | None
    choices: Collection | None
    lo: float | None
    above: float | None
    hi: float | None
    below: float | None
    metavar: str | None
    check_choices: bool
    note: str


# Every FlagSpec key, in the order field metadata lists them.
_FLAG_DEFAULTS: FlagSpec = {
    "flag": None,
    "group": None,
    "type": None,
    "choices": None,
    "lo": None,
    "above": None,
    "hi": None,
    "below": None,
    "metavar": None,
    "check_choices": True,
    "note": "",
}


def option(
    default: Any = MISSING, *, help: str, factory: Callable[[], Any] | None = None, **spec: Unpack[FlagSpec]
) -> Any:
    """A dataclass field that is also a flag, described by ``help`` and ``spec`` (``FlagSpec``);
    ``factory`` makes its default instead of ``default``."""
    unknown = set(spec) - set(_FLAG_DEFAULTS)
    if unknown:  # **spec takes any name at run time; a misspelt keyword must still fail
        raise TypeError(f"option() got unexpected keyword arguments: {', '.join(sorted(unknown))}")
    meta = {"help": help, **_FLAG_DEFAULTS, **spec}
    if factory is not None:
        return field(default_factory=factory, hash=False, metadata=meta)
    return field(default=default, metadata=meta)


def section(cls, *, toggle: str | None = None, group: str | None = None) -> Any:
    """A field holding a whole config class, whose fields are flags too. ``toggle``: the help of a
    ``--<name>/--no-<name>`` flag that turns the section off (the field is then None)."""
    return field(default=cls(), metadata={"section": cls, "toggle": toggle, "group": group})


def _flagged(cls) -> list[Field]:
    return [f for f in fields(cls) if "help" in f.metadata]


def check_fields(config) -> None:
    """Raise ValueError, saying what to fix, for a field outside its declared choices or bounds."""
    label = getattr(config, "FLAG_LABEL", None)
    for f in _flagged(config):
        value, meta = getattr(config, f.name), f.metadata
        if value is None:
            continue
        if meta["choices"] is not None and meta["check_choices"] and value not in meta["choices"]:
            raise ValueError(f"{f.name} must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
        flag = flag_name(type(config), f)
        name = flag if label is None else f"{label}{f.name.replace('_', ' ')}"
        for bound, fails, words in (
            ("lo", lambda v, b: v < b, ">="),
            ("above", lambda v, b: v <= b, ">"),
            ("hi", lambda v, b: v > b, "<="),
            ("below", lambda v, b: v >= b, "<"),
        ):
            if meta[bound] is not None and fails(value, meta[bound]):
                where = "" if label is None else f" ({flag})"
                raise ValueError(f"{name} must be {words} {meta[bound]:g}{meta['note']}, got {value}{where}")


def flag_name(cls, f: Field) -> str:
    return f.metadata["flag"] or f"--{getattr(cls, 'FLAG_PREFIX', '')}{f.name}".replace("_", "-")


def _dest(cls, f: Field) -> str:
    return flag_name(cls, f).lstrip("-").replace("-", "_")


def add_flags(parser: argparse.ArgumentParser, groups: Mapping[str, argparse._ActionsContainer], cls) -> None:
    """One argument per ``option`` field of ``cls`` and of its sections, in ``groups[group]`` (the
    parser itself for None)."""
    for f in fields(cls):
        meta = f.metadata
        if "section" in meta:
            if meta["toggle"]:
                groups[meta["group"]].add_argument(
                    f"--{f.name}", action=argparse.BooleanOptionalAction, default=True, help=meta["toggle"]
                )
            add_flags(parser, groups, meta["section"])
            continue
        if "help" not in meta:
            continue
        group = meta["group"] if meta["group"] is not None else getattr(cls, "FLAG_GROUP", "")
        target = groups[group] if group else parser
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        kwargs: dict[str, Any] = {"help": meta["help"], "default": None if default is MISSING else default}
        if f.type in (bool, "bool", "bool | None"):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update({k: meta[k] for k in ("type", "choices", "metavar") if meta[k] is not None})
            if meta["choices"] is not None and not isinstance(meta["choices"], (tuple, list)):
                kwargs["choices"] = sorted(meta["choices"])
        name = flag_name(cls, f)
        if name.startswith("-"):
            target.add_argument(name, dest=_dest(cls, f), **kwargs)
        else:
            target.add_argument(name, nargs="?", **kwargs)


def values_from(args: argparse.Namespace, cls) -> dict[str, Any]:
    """The ``option`` fields and sections of ``cls`` as parsed into ``args`` (keyword arguments for ``cls``)."""
    values = {f.name: getattr(args, _dest(cls, f)) for f in _flagged(cls)}
    for f in fields(cls):
        if "section" in f.metadata:
            on = getattr(args, f.name) if f.metadata["toggle"] else True
            values[f.name] = f.metadata["section"](**values_from(args, f.metadata["section"])) if on else None
    return values
