"""The markdown of benchmarks/ceiling.py's section: tables, timelines and goals."""

from __future__ import annotations

import math
import os
import platform
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from common import LOCK

from ceiling_parts import DATE, SKIP
from ceiling_parts.floor import floor_goal, floor_table
from ceiling_parts.runs import JobRun, LoopRun
from ceiling_parts.sampler import fmt_cores
from ceiling_parts.startup import Startup, startup_table


@dataclass
class Workload:
    name: str
    crf: bool
    images: int
    loop: LoopRun | None = None  # the median run of each kind (by end-to-end seconds), for the details
    jobs: dict[str, JobRun] = field(default_factory=dict)  # new16, new, old1, old
    masks: dict[str, tuple[int, int, float]] = field(default_factory=dict)
    rounds: list[dict] = field(default_factory=list)  # each round's loop and job runs, by key

    def pick_median(self) -> None:
        self.loop = _median_run([r["loop"] for r in self.rounds])
        jobs = [key for key in self.rounds[0] if key not in ("loop", "floor", "floor_running")]
        self.jobs = {key: _median_run([r[key] for r in self.rounds]) for key in jobs}

    def median(self, value) -> float | None:
        """The median over rounds of ``value(round)`` (None where a round has no value)."""
        values = sorted(v for v in (value(r) for r in self.rounds) if v is not None)
        return statistics.median(values) if values else None

    def ratio(self, key: str, rate: str) -> float | None:
        """Median over rounds of the job run ``key``'s ``rate`` ("rate" or "steady") / the loop's, in
        the same round."""

        def one(r):
            job, loop = getattr(r[key], rate), getattr(r["loop"], rate)
            return job / loop if job and loop else None

        return self.median(one) if all(key in r for r in self.rounds) else None


def _median_run(runs: list):
    return sorted(runs, key=lambda run: run.seconds)[(len(runs) - 1) // 2]


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "n/a"


def num(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def machine() -> str:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor() or "?",
    )
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import ray
    import torch

    return (
        f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, no GPU used; Python {platform.python_version()}, "
        f"torch {torch.__version__}, Ray {ray.__version__}; host shared with other agents: every timed run "
        f"held an exclusive lock on {LOCK}, and 'other' below is CPU used outside the measured processes"
    )


def main_table(works: list[Workload]) -> list[str]:
    """Medians over the rounds: rates, and ratios taken within each round."""
    out = [
        "| work | multi-process loop e2e / steady (images/s) | job e2e / steady (images/s) | job/loop e2e | "
        "job/loop steady | old job e2e / steady (images/s) | old/loop e2e | old/loop steady |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for w in works:
        med = lambda key, rate: w.median(lambda r: getattr(r[key], rate) if key in r else None)  # noqa: E731, B023 (used in this iteration only)
        old = "old" in w.jobs
        out.append(
            f"| {w.name} | {num(med('loop', 'rate'), 2)} / {num(med('loop', 'steady'), 2)} | "
            f"{num(med('new', 'rate'), 2)} / {num(med('new16', 'steady'), 2)} | "
            f"{num(w.ratio('new', 'rate'), 2)} | {num(w.ratio('new16', 'steady'), 2)} | "
            + (
                f"{num(med('old', 'rate'), 2)} / {num(med('old1', 'steady'), 2)} | "
                f"{num(w.ratio('old', 'rate'), 2)} | {num(w.ratio('old1', 'steady'), 2)} |"
                if old
                else "skipped | | |"
            )
        )
    return out


def rounds_table(works: list[Workload]) -> list[str]:
    """Each round's images/s (e2e / steady) of every run: the spread the medians come from."""
    keys = [("loop", "loop"), ("new", "job (new), e2e"), ("new16", "job (new), steady"), ("old", "job (old), e2e")]
    keys.append(("old1", "job (old), steady"))
    out = ["| work | round | " + " | ".join(name for _, name in keys) + " |", "| --- | --- |" + " --- |" * len(keys)]
    for w in works:
        for i, r in enumerate(w.rounds, 1):
            cells = [
                f"{r['loop'].rate:.2f} / {r['loop'].steady:.2f}",
                *(
                    num(getattr(r[key], "rate" if key in ("new", "old") else "steady"), 2) if key in r else "n/a"
                    for key, _ in keys[1:]
                ),
            ]
            out.append(f"| {w.name} | {i} | " + " | ".join(cells) + " |")
    return out


def detail_table(works: list[Workload]) -> list[str]:
    out = [
        "| work | run | flags | e2e s | images/s e2e | steady | first result s | fixed overhead s | "
        "last result → exit s | cores busy in steady state | masks identical to the loop's |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for w in works:
        loop = w.loop
        done = sorted(t for wk in loop.workers for t in wk["done"])
        ten = done[math.ceil(SKIP * len(done)) - 1]
        out.append(
            f"| {w.name} | loop, {len(loop.workers)} processes | | {loop.seconds:.1f} | {loop.rate:.2f} | "
            f"{loop.steady:.2f} | {loop.first:.1f} | {loop.seconds - loop.images / loop.steady:.1f} | | "
            f"{fmt_cores(loop.sampler.cores(ten, loop.end))} | |"
        )
        for key, job in w.jobs.items():
            steady_from = None
            if job.parts and len(job.parts) > 2:
                parts = sorted(job.parts)
                cum, steady_from = 0, parts[0][0]
                for t, n in parts:
                    cum += n
                    if cum >= SKIP * job.images:
                        steady_from = t
                        break
            cores = fmt_cores(job.sampler.cores(steady_from, job.last)) if steady_from else "n/a"
            same = w.masks.get(key)
            masks = (
                f"{same[0]}/{same[1]} ({100 * same[0] / same[1]:.1f} %; pixels {100 * same[2]:.4f} %)"
                if same and same[1]
                else "n/a"
            )
            out.append(
                f"| {w.name} | {job.name} | {job.flags} | {job.seconds:.1f} | {job.rate:.2f} | "
                f"{num(job.steady, 2)} | {num(job.first)} | {num(job.overhead)} | "
                f"{num(job.end - job.last if job.last else None)} | {cores} | {masks} |"
            )
    return out


def cli_timeline(works: list[Workload]) -> list[str]:
    """When the CLI run (new code, --rows-per-file 16) got where, in seconds since the command."""
    out = [
        "| CLI, new code, --rows-per-file 16 (s since the command) | " + " | ".join(w.name for w in works) + " |",
        "| --- |" + " --- |" * len(works),
    ]
    rows: dict[str, list[str]] = {}
    for w in works:
        job = w.jobs["new16"]
        building, ready = job.sampler.actors()
        idle = [t for t, _ in job.sampler.titles("ray::IDLE")]
        decode, write = job.sampler.actors("Decoder"), job.sampler.actors("PartWriter")
        since = lambda t: t and t - job.start  # noqa: E731, B023 (used in this iteration only)
        marks = {
            "'N inputs under' line (imports, weight check, listing)": job.line_time("inputs under"),
            "'inference on' line (ray.init, resources)": job.line_time("inference on"),
            "first Ray worker process (ray::IDLE, sampled)": since(min(idle)) if idle else None,
            "Ray Data 'Running Dataset' log line": job.line_time("Running Dataset"),
            "decode actor in __init__ / ready (sampled)": f"{num(since(decode[0]))} / {num(since(decode[1]))}",
            "write actor in __init__ / ready (sampled)": f"{num(since(write[0]))} / {num(since(write[1]))}",
            "first inference actor in __init__ (sampled)": since(building),
            "all inference actors ready (sampled)": since(ready),
            "first part file": job.first,
            "last part file": since(job.last),
            "exit": job.seconds,
        }
        on = job.line_time("inference on")
        if on is not None and ready and job.first:
            cuts = [
                ("command → 'inference on'", 0.0, on),
                ("'inference on' → inference actors ready", on, ready - job.start),
                ("actors ready → first part file", ready - job.start, job.first),
                ("last part file → exit", job.last - job.start, job.seconds),
            ]
            for name, a, b in cuts:
                marks[f"cores busy: {name}"] = fmt_cores(job.sampler.cores(job.start + a, job.start + b))
        for name, value in marks.items():
            rows.setdefault(name, []).append(value if isinstance(value, str) else num(value))
    return out + [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows.items()]


def goals(works: list[Workload], startups: list[Startup]) -> list[str]:
    out = []
    for w in works:
        steady, e2e = w.ratio("new16", "steady"), w.ratio("new", "rate")
        out.append(
            f"- {w.name}: job steady state {num(steady, 2)} of the loop's (median of {len(w.rounds)} rounds; goal "
            f">= 0.9: {'met' if steady and steady >= 0.9 else 'NOT met'}); end to end {num(e2e, 2)} "
            f"(goal >= 0.8: {'met' if e2e and e2e >= 0.8 else 'NOT met'})"
        )
        first = w.median(lambda r: r["new16"].first)
        overhead = w.median(lambda r: r["new16"].overhead)
        loop_overhead = w.median(lambda r: r["loop"].seconds - r["loop"].images / r["loop"].steady)
        out.append(
            f"- {w.name}: first result (first part file, CLI with --rows-per-file 16) {num(first)} s after "
            f"the command (goal <= 8 s: {'met' if first is not None and first <= 8 else 'NOT met'}); "
            f"fixed overhead {num(overhead)} s (e2e - images / steady; goal <= 5 s: "
            f"{'met' if overhead is not None and overhead <= 5 else 'NOT met'}; the loop's own: "
            f"{num(loop_overhead)} s)"
        )
        if floor_goal(w):
            out.append(floor_goal(w))
    for s in startups:
        out.append(
            f"- harness, {'CRF on' if s.crf else 'CRF off'}: first result {s.marks[-1][1] - s.start:.1f} s "
            f"after the command"
        )
    return out


def report(works: list[Workload], startups: list[Startup], imports: list[tuple[str, float]], command: str) -> str:
    lines = [
        "## Ceiling: the job vs one process per core (benchmarks/ceiling.py)",
        "",
        f"{DATE}. {machine()}.",
        "",
        f"`{command}`; synthetic scenes (pipeline.synthetic.write_bucket, "
        "160-320 x 200-400 pixels), demo model, scale 1.0, CRF = DeepLab v2 parameters. Loop: one process "
        "per core, 1 torch thread each, end to end from before the processes start to the last PNG written. "
        "Job: the CLI timed from Popen to exit; steady state from part-file mtimes (the --rows-per-file 16 "
        "run; the old code is an earlier commit, run alike), images/s after the first 10 % of the images. "
        "Every run is repeated in interleaved rounds (loop, new, old, then again): the first table gives "
        "medians, each ratio the median of the ratios within a round; masks: the round with the fewest identical.",
        "",
    ]
    lines += [*main_table(works), "", *rounds_table(works), ""]
    lines += ["The median run of each kind (by end-to-end seconds):", "", *detail_table(works)]
    lines += [
        "",
        "Fixed overhead = end to end - images / steady state. Cores busy: CPU seconds per second of the "
        "measured process tree, by process group (Segmenter = the inference actors, with the CRF fused in; "
        "Ray worker (booting/idle) = a Ray worker process before it became an actor; ray system = gcs, raylet, "
        "dashboard and runtime-env agents, Ray Data's own actors), from "
        "the time 10 % of the images were done to the last result; other = the rest of the host.",
        "",
    ]
    floor = floor_table(works)
    if len(floor) > 2:
        lines += ["Ray's own floor: the same CPU plan with stages that do nothing (medians over the rounds):", ""]
        lines += [*floor, ""]
    lines += [*cli_timeline(works), ""]
    if startups:
        lines += [
            "Start-up of the new code, step by step (pipeline.job.run()'s calls in a fresh interpreter; "
            "'at' = seconds since the command):",
            "",
            *startup_table(startups),
            "",
        ]
    if imports:
        lines += [
            "`import pipeline.job` and the heavy packages under it (python -X importtime, cumulative, "
            "nested ones counted in their importer too): "
            + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in imports),
            "",
        ]
    lines += ["Goals:", "", *goals(works, startups), ""]
    return "\n".join(lines)
