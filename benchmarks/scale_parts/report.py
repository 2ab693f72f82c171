"""The tables and the reading of benchmarks/scale.py's section."""

from __future__ import annotations

from common import LOCK

from scale_parts import SECTION, SIDES
from scale_parts.runner import Result


def _num(value: float | None, spec: str = ".0f") -> str:
    return "—" if value is None else format(value, spec)


def _cell(res: Result | None, attr: str, spec: str) -> str:
    if res is None:
        return "—"
    if not res.ok:
        return res.status if attr == "rss_mib" else "—"
    return _num(getattr(res, attr), spec)


def _ratio(a: Result | None, b: Result | None, attr: str) -> str:
    if a is None or b is None or not a.ok or not b.ok or not getattr(a, attr):
        return "—"
    return f"{getattr(b, attr) / getattr(a, attr):.2f}"


def _keys_label(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


_HEAD = ("step", "before RSS MiB", "after RSS MiB", "before CPU s", "after CPU s", "before wall s", "after wall s",
         "after/before RSS", "after/before wall")  # fmt: skip
_E2E_HEAD = ("before ms CPU/img", "after ms CPU/img", "before img/s e2e", "after img/s e2e",
             "before img/s segmenting", "after img/s segmenting")  # fmt: skip


def _e2e_cells(r: dict, b: Result | None, a: Result | None) -> list[str]:
    per = [None if x is None or not x.ok else 1000 * x.cpu_s / r["n"] for x in (b, a)]
    e2e_ips = [None if x is None or not x.ok else r["n"] / x.wall_s for x in (b, a)]
    ips = [None if x is None or not x.ok else x.extra["images_per_s"] for x in (b, a)]
    return [_num(per[0], ".2f"), _num(per[1], ".2f"), _num(e2e_ips[0], ".1f"), _num(e2e_ips[1], ".1f"),
            _num(ips[0], ".1f"), _num(ips[1], ".1f")]  # fmt: skip


def table(rows: list[dict], *, unit: str = "keys", e2e: bool = False) -> str:
    head = [_HEAD[0], unit, *_HEAD[1:], *(_E2E_HEAD if e2e else ()), "after tree PSS MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        b, a = r.get("before"), r.get("after")
        cells = [r["step"], _keys_label(r["n"])]
        for key, spec in (("rss_mib", ".0f"), ("cpu_s", ".1f"), ("wall_s", ".1f")):
            cells += [_cell(b, key, spec), _cell(a, key, spec)]
        cells += [_ratio(b, a, "rss_mib"), _ratio(b, a, "wall_s")]
        if e2e:
            cells += _e2e_cells(r, b, a)
        cells.append(_cell(a, "tree_pss_mib", ".0f") if a is not None and a.tree_pss_mib else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _get(rows: list[dict], step: str, n: int, side: str) -> Result | None:
    for r in rows:
        if r["step"] == step and r["n"] == n:
            res = r.get(side)
            return res if res is not None and res.ok else None
    return None


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("**met**" if ok else "**not met**")


def _reading_runs(runs: list[dict], sizes: list[int]) -> list[str]:
    """The commit and comparison goals, over the synthetic runs."""
    out = []
    big, mid, small = sizes[-1], sizes[-2], sizes[0]
    a_big = _get(runs, "commit + report", big, "after")
    a_mid = _get(runs, "commit + report", mid, "after")
    if a_big and a_mid:
        limit = 1.1 * a_mid.rss_mib + 100
        out.append(
            f"Commit + report, after: peak driver RSS {a_big.rss_mib:.0f} MiB at "
            f"{_keys_label(big)} keys against {a_mid.rss_mib:.0f} MiB at {_keys_label(mid)} "
            f"(goal ≤ 1.1x + 100 MB = {limit:.0f} MiB): "
            f"{_verdict(a_big.rss_mib <= limit)}; {a_big.wall_s:.1f} s at {_keys_label(big)} "
            f"(goal ≤ 60 s): {_verdict(a_big.wall_s <= 60)}."
        )
    b_big = _get(runs, "commit + report", big, "before")
    if b_big and a_big:
        out.append(
            f"Before, the same commit took {b_big.rss_mib:.0f} MiB and {b_big.wall_s:.1f} s at {_keys_label(big)}."
        )
    c_big = _get(runs, "compare two runs", big, "after")
    c_small = _get(runs, "compare two runs", small, "after")
    if c_big and c_small:
        flat = c_big.rss_mib <= 1.1 * c_small.rss_mib + 100
        out.append(
            f"Comparison, after: driver RSS {c_small.rss_mib:.0f} MiB at {_keys_label(small)} "
            f"and {c_big.rss_mib:.0f} MiB at {_keys_label(big)} "
            f"(flat, ≤ 1.1x + 100 MB: {_verdict(flat)}); "
            f"{c_big.wall_s:.0f} s at {_keys_label(big)} on 2 CPUs, tree PSS up to "
            f"{c_big.tree_pss_mib:.0f} MiB."
        )
    for r in runs:
        if r["step"] == "compare two runs" and r.get("before") is not None:
            res = r["before"]
            desc = f"{res.rss_mib:.0f} MiB, {res.wall_s:.0f} s" if res.ok else res.status
            out.append(f"Comparison, before, {_keys_label(r['n'])}: {desc}.")
    return out


def _reading_listing(listing: list[dict]) -> list[str]:
    """How listing + resume grew from the smallest to the largest bucket, per side."""
    out = []
    small, large = listing[0]["n"], listing[-1]["n"]
    for side in SIDES:
        rs = _get(listing, "list + resume (S3)", small, side)
        rl = _get(listing, "list + resume (S3)", large, side)
        if rs and rl:
            out.append(
                f"List + resume {side}: {rs.rss_mib:.0f} → {rl.rss_mib:.0f} MiB and "
                f"{rs.cpu_s:.1f} → {rl.cpu_s:.1f} CPU-s from {_keys_label(small)} to "
                f"{_keys_label(large)} keys."
            )
    return out


def _reading_e2e(e2e: list[dict], e2e_sizes: list[int]) -> list[str]:
    """The end-to-end goals: flat driver RSS, driver CPU per image, throughput not lower."""
    out = []
    small, large = e2e_sizes[0], e2e_sizes[-1]
    step = "end to end (CLI, --no-crf)"
    a_s, a_l = _get(e2e, step, small, "after"), _get(e2e, step, large, "after")
    b_l = _get(e2e, step, large, "before")
    if a_s and a_l:
        marginal = 1000 * (a_l.cpu_s - a_s.cpu_s) / (large - small)
        out.append(
            f"End to end, after: driver peak RSS {a_s.rss_mib:.0f} MiB at {_keys_label(small)} "
            f"images and {a_l.rss_mib:.0f} MiB at {_keys_label(large)} "
            f"(goal ≤ 1.1x = {1.1 * a_s.rss_mib:.0f}): "
            f"{_verdict(a_l.rss_mib <= 1.1 * a_s.rss_mib)}; driver CPU "
            f"{1000 * a_l.cpu_s / large:.2f} ms per image over the whole CLI process at "
            f"{_keys_label(large)}, {marginal:.2f} ms per extra image between {_keys_label(small)} "
            f"and {_keys_label(large)} (goal ≤ 0.5 ms): {_verdict(marginal <= 0.5)} on the "
            f"marginal, {_verdict(1000 * a_l.cpu_s / large <= 0.5)} on the total."
        )
    if a_l and b_l:
        before, after = large / b_l.wall_s, large / a_l.wall_s
        out.append(
            f"Throughput at {_keys_label(large)}, end to end (images / the CLI's wall time): "
            f"{before:.1f} images/s before, {after:.1f} after (goal: not lower): "
            f"{_verdict(after >= before)}; while segmenting (manifest images_per_s, from the "
            f"DAG's start to its last part): {b_l.extra['images_per_s']:.1f} before, "
            f"{a_l.extra['images_per_s']:.1f} after."
        )
    return out


def reading(runs: list[dict], listing: list[dict], e2e: list[dict], sizes: list[int], e2e_sizes: list[int]) -> str:
    """One paragraph: every goal, met or not, with its numbers."""
    out = []
    if len(sizes) >= 2:
        out += _reading_runs(runs, sizes)
    if len(listing) >= 2:
        out += _reading_listing(listing)
    if len(e2e_sizes) >= 2:
        out += _reading_e2e(e2e, e2e_sizes)
    return " ".join(out)


def render(args, runs, listing, e2e, command: str) -> str:
    parts = [
        SECTION,
        "",
        f"Measured {args.date} on {args.machine}, one run of `{command}` "
        f"(before = the previous commit's code, after = this tree; each step a fresh process, "
        f"under `flock {LOCK}`). RSS is the driver process's peak (VmHWM; Ray's own processes are "
        f"not in it, their sum is the last column, PSS sampled every second). CPU and wall are the "
        f"step's own; for the comparison after, `ray.init` is not included; end to end counts the "
        f"whole CLI process (imports, model load, Ray start).",
        "",
    ]
    if runs:
        parts += [
            "Synthetic committed runs, 1000-row part files, 64x64 mask PNGs (CRF columns filled), "
            "second run with 5% of masks changed:",
            "",
            table(runs),
            "",
        ]
    if listing:
        parts += [
            "Listing + resume against a moto S3 server on loopback; the run holds part files for half the keys:",
            "",
            table(listing),
            "",
        ]
    if e2e:
        parts += [
            "End to end, `jobs/segment_bucket.py IMAGES --labels LABELS --output OUT --no-crf`, "
            "64x64 JPEGs (ms CPU/img = the CLI process's CPU over the images):",
            "",
            table(e2e, unit="images", e2e=True),
            "",
        ]
    parts += [reading(runs, listing, e2e, args.sizes, args.e2e_sizes if not args.skip_e2e else []), ""]
    return "\n".join(parts)
