"""Start-up of the new code: pipeline.job.run()'s steps timed in a fresh interpreter; imports."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from common import bench_lock

from ceiling_parts import PYTHON, ROOT, SCRIPT
from ceiling_parts.runs import job_env
from ceiling_parts.sampler import TreeSampler, fmt_cores


def harness(t_module: float, images_uri: str, out: str, crf: bool) -> None:
    """In a fresh interpreter: pipeline.job.run()'s steps up to the first part file, timestamped.

    ``t_module``: when the entry script started, before any import but ``time``.
    """
    marks = [("python started", t_module)]
    import pipeline.cli as cli
    import pipeline.job as job

    marks.append(("import pipeline.job", time.time()))
    import ray

    from pipeline.cluster import cluster_nodes, init_ray
    from pipeline.outputs import RunOutput
    from pipeline.stages import Resources, build_dataset
    from pipeline.storage import list_inputs

    marks.append(("import ray + pipeline.stages (torch)", time.time()))
    parser = cli.build_parser()
    argv = [images_uri, "--output", out, "--run-id", "harness", "--rows-per-file", "16", *([] if crf else ["--no-crf"])]
    config = cli.config_from_args(parser.parse_args(argv), parser)
    weights, sha256 = job.resolve_weights(config)
    marks.append(("weight check (resolve_weights)", time.time()))
    inputs = list_inputs(config.input_uri, config.labels_uri, storage_options=config.storage_options)
    output = RunOutput(config.output_uri, config.run_id, config.storage_options)
    earlier = output.prepare(resume=False, overwrite=False, num_classes=weights.num_classes)
    todo = inputs.without(earlier.keys)
    marks.append(("listing + output.prepare", time.time()))
    init_ray(None)
    marks.append(("Ray start (ray.init)", time.time()))
    resources = Resources.resolve(config, cluster_nodes())
    ds = build_dataset(todo, config, weights, sha256, resources, output.full_uri())
    marks.append(("resources + plan (build_dataset)", time.time()))
    for _ in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        marks.append(("first part file (first result)", time.time()))
        break
    ray.shutdown()
    print("HARNESS " + json.dumps(marks), flush=True)


@dataclass
class Startup:
    crf: bool
    start: float
    marks: list[tuple[str, float]]
    sampler: TreeSampler


def run_harness(images_uri: Path, out: Path, crf: bool) -> Startup:
    cmd = [PYTHON, str(SCRIPT), "--startup-harness", str(images_uri), str(out), *([] if crf else ["--harness-no-crf"])]
    with bench_lock():
        start = time.time()
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=job_env(ROOT), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        with TreeSampler(proc.pid) as sampler:
            stdout, _ = proc.communicate()
    line = next((ln for ln in stdout.splitlines() if ln.startswith("HARNESS ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"start-up harness failed ({proc.returncode}): {stdout[-2000:]}")
    return Startup(crf, start, [tuple(m) for m in json.loads(line[len("HARNESS ") :])], sampler)


HEAVY = (
    "pipeline.job",
    "torch",
    "torchvision",
    "torch._dynamo",
    "timm",
    "ray",
    "pyarrow",
    "numpy",
    "PIL",
    "fsspec",
    "safetensors",
    "pydensecrf",
)


def import_profile() -> list[tuple[str, float]]:
    """Cumulative seconds of ``import pipeline.job`` and of the heavy packages it pulls in (python -X importtime,
    each where it is first imported, so nested ones are included in their importer's figure)."""
    with bench_lock():
        err = subprocess.run(
            [PYTHON, "-X", "importtime", "-c", "import pipeline.job"],
            cwd=ROOT,
            env=job_env(ROOT),
            capture_output=True,
            text=True,
        ).stderr
    found = {}
    for line in err.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit() and parts[2].strip() in HEAVY:
            found[parts[2].strip()] = int(parts[1]) / 1e6
    return sorted(found.items(), key=lambda kv: -kv[1])


def startup_table(startups: list[Startup]) -> list[str]:
    """Each harness step: its seconds and when it ended, since the command; actors; cores busy."""
    out = [
        "| step (new code, fresh interpreter, --rows-per-file 16) | "
        + " | ".join(f"{'CRF on' if s.crf else 'CRF off'}: step s / at s" for s in startups)
        + " |",
        "| --- |" + " --- |" * len(startups),
    ]
    names = [name for name, _ in startups[0].marks]
    for i, name in enumerate(names):
        cells = []
        for s in startups:
            t, before = s.marks[i][1], (s.marks[i - 1][1] if i else s.start)
            cells.append(f"{t - before:.2f} / {t - s.start:.2f}")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    rows = {"inference actors: first in __init__ (sampled)": 0, "inference actors: all ready (sampled)": 1}
    for label, which in rows.items():
        cells = []
        for s in startups:
            t = s.sampler.actors()[which]
            cells.append(f"at {t - s.start:.2f}" if t else "n/a")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    cells = []
    for s in startups:
        first = s.marks[-1][1]
        cells.append(fmt_cores(s.sampler.cores(s.start, first)))
    out.append("| cores busy from the command to the first result | " + " | ".join(cells) + " |")
    return out
