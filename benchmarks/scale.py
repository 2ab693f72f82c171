"""Driver scale, before and after "the driver coordinates": one table per part, both codes side by side.

    .venv/bin/python benchmarks/scale.py                       # 10k/100k/1M keys, S3 10k/100k, e2e 1k/10k
    .venv/bin/python benchmarks/scale.py --sizes 2000 --list-sizes 2000 --e2e-sizes 200   # quick check
    .venv/bin/python benchmarks/scale.py --skip-before --skip-e2e --keep

"Before" is the code of the previous commit, checked out at ``--old-tree`` (default /work/wt-old);
"after" is this working tree. Every measured step runs in a fresh subprocess with
``PYTHONPATH=<tree>`` and ``cwd=<tree>`` (the cwd matters: the venv's editable install would
otherwise map ``pipeline`` to this tree), under ``flock /tmp/bench.lock``, and reports its driver's
peak RSS (``VmHWM``: that process only, never its Ray children), the step's CPU seconds
(user + sys of that process) and wall seconds. The parent also samples the whole process tree's PSS
for the steps that start Ray, and kills a step past ``--rss-limit-gb`` or ``--timeout-min``.

1. ``commit`` (commit + report) and ``compare`` over synthetic committed runs of N keys: part files
   of 1000 rows with MASKS_SCHEMA's columns (64x64 mask PNGs drawn from 256 pre-encoded scenes,
   6 classes, CRF columns filled as with the default CRF on, 10% unlabelled rows, 2 error rows in
   every 50th part). The second run of a size has 5% of its masks changed. The ``PartStats`` the
   write workers would have returned are computed while generating and kept in a side file; the
   after-commit step sums them as the driver does (``PartStats.from_json`` and ``+``).
   before: ``RunOutput.commit(categories, manifest)`` / ``compare_runs(load_run(a), load_run(b))`` +
   ``write_comparison``; after: ``RunOutput.commit(stats, ...)`` / ``compare_outputs`` on a 2-CPU
   local Ray (``ray.init`` is not timed, its seconds are printed).
2. ``list + resume`` against a moto S3 server on loopback: N tiny objects, and a run on S3 holding
   part files (full MASKS_SCHEMA) for the first half of the keys. before: ``list_inputs`` +
   ``done_keys`` + the old job's list comprehension; after: ``list_inputs(...).without(earlier.keys)``.
3. ``end to end``: the CLI (``jobs/segment_bucket.py IMAGES --labels LABELS --output OUT --no-crf``)
   over N 64x64 JPEGs (256 distinct ``pipeline.synthetic`` scenes). The CLI process is the measured
   driver; its whole-life CPU and RSS are reported, images/s from manifest.json.

Tables go to stdout and to docs/benchmarks.md (section "Scale: the driver coordinates"), the raw
numbers to WORK/results.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # also as a child step: its cwd is the measured tree
from common import LOCK, bench_lock, write_section  # noqa: E402
OLD_TREE = Path("/work/wt-old")
ROWS_PER_PART = 1000
NUM_CLASSES = 6
CATEGORIES = ("background", "disc", "box", "triangle", "ring", "bar")  # the demo checkpoint's
POOL = 256  # distinct mask PNGs / scenes reused by the synthetic data
CHANGED_PERCENT = 5  # masks that differ in the second run of a size
ERROR_EVERY = 50  # every 50th part has 2 error rows
SECTION = "## Scale: the driver coordinates (benchmarks/scale.py)"
MIB = 2**20


# ----------------------------------------------------------------------------- measured steps (child side)

class Clock:
    """The timed part of a step: wall and CPU (user + sys) of this process between start and stop."""

    def __init__(self) -> None:
        self.start()
        self.wall = self.cpu = None

    @staticmethod
    def _cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def start(self) -> None:
        self._wall0, self._cpu0 = time.perf_counter(), self._cpu()

    def stop(self) -> None:
        if self.wall is None:
            self.wall, self.cpu = time.perf_counter() - self._wall0, self._cpu() - self._cpu0


def _vm_hwm_mib() -> float:
    """Peak RSS of this process since exec (unlike ru_maxrss, not inherited from a forking parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def manifest_for(run_id: str) -> dict:
    """The manifest fields commit and the report read (job.py writes more)."""
    return {"run_id": run_id, "model": "deeplabv3plus_demo", "weights": {"uri": "demo", "sha256": "0" * 64},
            "config": {"inference": {"low_conf_threshold": 0.5}}, "categories": list(CATEGORIES),
            "timings": {"segment_s": 1.0, "processed": 0, "images_per_s": 0.0, "total_s": 1.0},
            "finished_at": "2026-12-02T00:00:00+00:00"}


def step_commit_before(clock: Clock, out: str, run_id: str, **_) -> dict:
    from pipeline.outputs import RunOutput

    summary = RunOutput(out, run_id).commit(CATEGORIES, manifest_for(run_id), labels_uri=None, previous=None)
    return {"images": summary.images, "errors": summary.errors, "miou": summary.post.miou}


def step_commit_after(clock: Clock, out: str, run_id: str, stats_file: str, input_uri: str, **_) -> dict:
    from pipeline.outputs import RunOutput
    from pipeline.partstats import PartStats
    from pipeline.storage import Locator

    stats = PartStats.empty(NUM_CLASSES)
    with open(stats_file) as f:  # what the write workers returned, one line per part
        for line in f:
            stats += PartStats.from_json(line)
    summed_s = time.perf_counter() - clock._wall0
    summary = RunOutput(out, run_id).commit(stats, CATEGORIES, manifest_for(run_id),
                                            locator=Locator(input_uri, None))
    return {"images": summary.images, "errors": summary.errors, "miou": summary.post.miou, "sum_stats_s": summed_s}


def step_compare_before(clock: Clock, out: str, old_id: str, new_id: str, **_) -> dict:
    from pipeline.compare import compare_runs, load_run, write_comparison
    from pipeline.outputs import RunOutput

    old, new = RunOutput(out, old_id), RunOutput(out, new_id)
    comparison = compare_runs(load_run(old), load_run(new))
    write_comparison(new, comparison)
    return {"both": comparison.count("both"), "changed": comparison.changed_images}


def step_compare_after(clock: Clock, out: str, old_id: str, new_id: str, **_) -> dict:
    import ray

    from pipeline.compare_stage import compare_outputs
    from pipeline.outputs import RunOutput

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray_init_s = time.perf_counter() - clock._wall0
    clock.start()  # ray.init is a fixed cost, not what grows with the run
    comparison = compare_outputs(RunOutput(out, old_id), RunOutput(out, new_id), write=True)
    clock.stop()
    ray.shutdown()
    return {"both": comparison.count("both"), "changed": comparison.changed_images, "ray_init_s": ray_init_s}


def step_resume_before(clock: Clock, input_uri: str, out: str, run_id: str, **_) -> dict:
    from pipeline.outputs import RunOutput
    from pipeline.storage import list_inputs

    files = list_inputs(input_uri, None)
    listed_s = time.perf_counter() - clock._wall0
    done = RunOutput(out, run_id).done_keys()
    todo = [f for f in files if f.key not in done]  # as the old job.py did
    return {"inputs": len(files), "done": len(done), "todo": len(todo), "list_s": listed_s}


def step_resume_after(clock: Clock, input_uri: str, out: str, run_id: str, **_) -> dict:
    from pipeline.outputs import RunOutput
    from pipeline.storage import list_inputs

    inputs = list_inputs(input_uri, None)
    listed_s = time.perf_counter() - clock._wall0
    earlier = RunOutput(out, run_id).earlier(NUM_CLASSES)
    todo = inputs.without(earlier.keys)
    return {"inputs": len(inputs), "done": len(earlier.keys), "todo": len(todo), "list_s": listed_s}


def step_e2e(clock: Clock, tree: str, images: str, labels: str, out: str, run_id: str, **_) -> dict:
    """This process is the CLI: the job's own main(), as `python jobs/segment_bucket.py ...` runs it."""
    import runpy

    script = str(Path(tree) / "jobs" / "segment_bucket.py")
    sys.argv = [script, images, "--labels", labels, "--output", out, "--no-crf", "--run-id", run_id]
    try:
        runpy.run_path(script, run_name="__main__")
        rc = 0
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    if rc:
        raise RuntimeError(f"segment_bucket.py exited {rc}")
    manifest = json.loads((Path(out) / f"run={run_id}" / "manifest.json").read_text())
    return {"images_per_s": manifest["timings"]["images_per_s"], "segment_s": manifest["timings"]["segment_s"],
            "images": manifest["counts"]["images"], "errors": manifest["counts"]["errors"]}


STEPS = {name.removeprefix("step_"): fn for name, fn in globals().items() if name.startswith("step_")}


def child_main(step: str, params: dict, result: str) -> None:
    clock = Clock()
    extra = STEPS[step](clock, **params)
    clock.stop()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    Path(result).write_text(json.dumps({
        "rss_mib": _vm_hwm_mib(), "cpu_s": clock.cpu, "wall_s": clock.wall,
        "process_cpu_s": usage.ru_utime + usage.ru_stime, "extra": extra,
        "pipeline": sys.modules["pipeline"].__file__ if "pipeline" in sys.modules else None}))


# ----------------------------------------------------------------------------- running a step (parent side)

@dataclass
class Result:
    status: str = "ok"  # ok | "OOM at N GB" | "> N min" | failed
    rss_mib: float | None = None  # the driver's peak RSS
    cpu_s: float | None = None
    wall_s: float | None = None
    tree_pss_mib: float | None = None  # peak PSS of the driver and every descendant (Ray), sampled
    sampled_rss_mib: float | None = None  # the driver's RSS, sampled every 0.2 s (cross-check)
    process_cpu_s: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"




def _tree(proc) -> list:
    import psutil

    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return []


def _kill_tree(pid: int) -> None:
    """The step process and the processes it started (Ray's), by pid."""
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.Error:
        return
    procs = _tree(root)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=30)


class Runner:
    """Runs measured steps in fresh subprocesses of ``before`` (old tree) or ``after`` (this tree)."""

    def __init__(self, work: Path, trees: dict[str, Path], *, rss_limit_gb: float, timeout_min: float,
                 env: dict | None = None) -> None:
        self.work, self.trees = work, trees
        self.rss_limit, self.timeout = rss_limit_gb * 2**30, timeout_min * 60
        self.env = env or {}
        (work / "logs").mkdir(parents=True, exist_ok=True)

    def measure(self, side: str, step: str, label: str, params: dict, *, tree_pss: bool = False) -> Result:
        import psutil

        tree = self.trees[side]
        result_file = self.work / "logs" / f"{label}-{side}.json"
        result_file.unlink(missing_ok=True)
        env = {**os.environ, **self.env, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1",
               "RAY_AUTH_MODE": "disabled"}
        env.pop("RAY_ADDRESS", None)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--step", step, "--params", json.dumps(params),
               "--result", str(result_file)]
        log = self.work / "logs" / f"{label}-{side}.log"
        print(f"  {label} {side} ...", end="", flush=True)
        with bench_lock(), open(log, "w") as out:
            started = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT)
            status, rss, pss = self._watch(psutil.Process(proc.pid), proc, started, tree_pss)
        if status == "ok" and (proc.returncode != 0 or not result_file.exists()):
            status = "failed"
            print(f" failed (rc {proc.returncode}); log {log}:\n" + log.read_text()[-3000:], flush=True)
        res = Result(status=status, sampled_rss_mib=rss / MIB, tree_pss_mib=pss / MIB if tree_pss else None)
        if status == "ok":
            data = json.loads(result_file.read_text())
            expected = str(tree / "pipeline")
            if not str(data["pipeline"]).startswith(expected):
                raise SystemExit(f"{label} {side} imported {data['pipeline']}, not {expected}")
            res.rss_mib, res.cpu_s, res.wall_s = data["rss_mib"], data["cpu_s"], data["wall_s"]
            res.process_cpu_s, res.extra = data["process_cpu_s"], data["extra"]
            print(f" {res.rss_mib:.0f} MiB, {res.cpu_s:.1f} CPU-s, {res.wall_s:.1f} s {res.extra}", flush=True)
        elif status != "failed":
            print(f" {status}", flush=True)
        return res

    def _watch(self, root, proc, started: float, tree_pss: bool) -> tuple[str, int, int]:
        """Sample the driver's RSS every 0.2 s (and the tree's PSS every 1 s); kill past the limits."""
        import psutil

        peak_rss = peak_pss = 0
        tick = 0
        while proc.poll() is None:
            try:
                rss = root.memory_info().rss
            except psutil.Error:
                rss = 0
            peak_rss = max(peak_rss, rss)
            if tree_pss and tick % 5 == 0:
                total = 0
                for p in _tree(root):
                    with contextlib.suppress(psutil.Error):
                        total += p.memory_full_info().pss
                peak_pss = max(peak_pss, total)
            status = None
            if rss > self.rss_limit:
                status = f"OOM at {self.rss_limit / 2**30:.0f} GB"
            elif time.perf_counter() - started > self.timeout:
                status = f"> {self.timeout / 60:.0f} min"
            if status:
                _kill_tree(proc.pid)
                proc.wait()
                return status, peak_rss, peak_pss
            tick += 1
            time.sleep(0.2)
        return "ok", peak_rss, peak_pss


# ----------------------------------------------------------------------------- synthetic runs

class Pool:
    """POOL distinct 64x64 scenes: mask PNGs (after and before CRF), their per-class statistics and JPEGs."""

    def __init__(self, size: int = 64) -> None:
        import numpy as np
        import pyarrow as pa

        from pipeline.metrics import image_stats
        from pipeline.palette import mask_to_png
        from pipeline.synthetic import SceneSpec, encode_jpeg, make_scene

        spec = SceneSpec(height=size, width=size)
        masks, pres, jpegs, labels = [], [], [], []
        stats = {k: [] for k in ("class_pixels", "intersect", "union", "label_area", "intersect_pre_crf",
                                 "union_pre_crf", "pixel_acc", "miou", "pixel_acc_pre_crf", "miou_pre_crf")}
        rng = np.random.default_rng(0)
        for i in range(POOL):
            image, label = make_scene(7_000_000 + i, spec)
            clean = np.where(label == 255, 0, label).astype(np.uint8) % NUM_CLASSES
            pre = clean.copy()
            flip = rng.random(pre.shape) < 0.03  # the model's errors, about 3% of pixels
            pre[flip] = rng.integers(0, NUM_CLASSES, int(flip.sum()))
            post = clean.copy()  # the CRF fixes most of them
            kept = flip & (rng.random(pre.shape) < 0.3)
            post[kept] = pre[kept]
            masks.append(mask_to_png(post))
            pres.append(mask_to_png(pre))
            jpegs.append(encode_jpeg(image))
            labels.append(mask_to_png(label))
            s_post, s_pre = image_stats(post, label, NUM_CLASSES), image_stats(pre, label, NUM_CLASSES)
            stats["class_pixels"].append(np.bincount(post.ravel(), minlength=NUM_CLASSES)[:NUM_CLASSES])
            for name, s in (("", s_post), ("_pre_crf", s_pre)):
                stats["intersect" + name].append(s.intersect)
                stats["union" + name].append(s.union)
                stats["pixel_acc" + name].append(s.pixel_acc)
                stats["miou" + name].append(s.miou)
            stats["label_area"].append(s_post.label_area)
        self.mask = pa.array(masks, pa.binary())
        self.mask_pre = pa.array(pres, pa.binary())
        self.jpegs, self.labels = jpegs, labels
        self.stats = {k: np.asarray(v, dtype=np.int64 if k in ("class_pixels", "intersect", "union", "label_area",
                                                                 "intersect_pre_crf", "union_pre_crf") else float)
                      for k, v in stats.items()}


def _keys(start: int, stop: int) -> list[str]:
    return [f"img/{i:07d}.jpg" for i in range(start, stop)]


def build_part(pool: Pool, start: int, stop: int, run_id: str, uris: list[str], changed: bool):
    """(masks, errors) tables for keys start..stop of a run, MASKS_SCHEMA / ERRORS_SCHEMA."""
    import numpy as np
    import pyarrow as pa

    from pipeline.schema import ERRORS_SCHEMA, MASKS_SCHEMA

    keys = _keys(start, stop)
    n_err = 2 if (start // ROWS_PER_PART) % ERROR_EVERY == 0 and stop - start > 2 else 0
    ok_keys, err_keys = keys[:len(keys) - n_err], keys[len(keys) - n_err:]
    i = np.arange(start, start + len(ok_keys), dtype=np.int64)
    which = (i * 2654435761) % POOL
    if changed:  # the second night: 5% of the masks come out different
        which = np.where((i * 40503 + 7) % 100 < CHANGED_PERCENT, (which + 1) % POOL, which)
    rng = np.random.default_rng(start + (1 if changed else 0))
    n = len(ok_keys)
    labelled = (i % 10) != 9
    unlabelled = ~labelled

    def lists(name: str, null: np.ndarray | None = None):
        values = pool.stats[name][which]
        offsets = pa.array(np.arange(0, (n + 1) * NUM_CLASSES, NUM_CLASSES, dtype=np.int32))
        return pa.ListArray.from_arrays(offsets, pa.array(values.ravel()), pa.list_(pa.int64()),
                                        mask=pa.array(null) if null is not None else None)

    def floats(values: np.ndarray, null: np.ndarray | None = None):
        return pa.array(values, pa.float64(), mask=null)

    def score(name: str):
        return floats(np.clip(pool.stats[name][which] + rng.normal(0, 0.005, n), 0, 1), unlabelled)

    const = lambda v, t=pa.string(): pa.array([v] * n, t)  # noqa: E731
    columns = {
        "key": pa.array(ok_keys, pa.string()), "uri": pa.array([uris[w % len(uris)] for w in which], pa.string()),
        "height": const(64, pa.int32()), "width": const(64, pa.int32()),
        "exif_orientation": pa.nulls(n, pa.int32()),
        "mask": pool.mask.take(pa.array(which)), "mask_pre_crf": pool.mask_pre.take(pa.array(which)),
        "class_pixels": lists("class_pixels"), "has_label": pa.array(labelled), "label_error": pa.nulls(n, pa.string()),
        "intersect": lists("intersect", unlabelled), "union": lists("union", unlabelled),
        "label_area": lists("label_area", unlabelled), "intersect_pre_crf": lists("intersect_pre_crf", unlabelled),
        "union_pre_crf": lists("union_pre_crf", unlabelled),
        "pixel_acc": score("pixel_acc"), "miou": score("miou"),
        "pixel_acc_pre_crf": score("pixel_acc_pre_crf"), "miou_pre_crf": score("miou_pre_crf"),
        "model": const("deeplabv3plus_demo"), "weights_sha256": const("0" * 64),
        "infer_ms": floats(rng.uniform(15, 40, n)), "crf_ms": floats(rng.uniform(80, 200, n)),
        "crf_changed_fraction": floats(rng.uniform(0, 0.05, n)),
        "mean_max_prob": floats(rng.uniform(0.6, 0.99, n)), "mean_entropy": floats(rng.uniform(0.05, 1.0, n)),
        "mean_entropy_norm": floats(rng.uniform(0.02, 0.6, n)), "low_conf_fraction": floats(rng.uniform(0, 0.3, n)),
        "run_id": const(run_id),
    }
    masks = pa.Table.from_arrays([columns[f.name] for f in MASKS_SCHEMA], schema=MASKS_SCHEMA)
    errors = pa.Table.from_pylist([
        {"key": k, "uri": uris[0], "stage": stage, "error_type": etype, "message": f"{etype} on {k}", "run_id": run_id}
        for k, (stage, etype) in zip(err_keys, [("decode", "UnidentifiedImageError"), ("read", "FileNotFoundError")])],
        schema=ERRORS_SCHEMA)
    return masks, errors


def parquet_bytes(table) -> bytes:
    """As write_parquet_atomic writes parts (zstd); masks are unique in real runs, so no dictionary for them."""
    import io

    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd",
                   use_dictionary=[c for c in table.column_names if c not in ("mask", "mask_pre_crf")])
    return buffer.getvalue()


def write_run(pool: Pool, out: Path, run_id: str, n_keys: int, uris: list[str], stats_file: Path, *,
              changed: bool) -> None:
    """A committed run dir OUT/run=<id>/ (masks/, errors/, classes.parquet, _SUCCESS) and its parts' stats."""
    from pipeline.outputs import classes_table
    from pipeline.partstats import PartStats
    from pipeline.writer import part_name
    import pyarrow as pa
    import pyarrow.parquet as pq

    run = out / f"run={run_id}"
    (run / "masks").mkdir(parents=True)
    (run / "errors").mkdir()
    total = PartStats.empty(NUM_CLASSES)
    with open(stats_file, "w") as sidecar:
        for start in range(0, n_keys, ROWS_PER_PART):
            masks, errors = build_part(pool, start, min(n_keys, start + ROWS_PER_PART), run_id, uris, changed)
            name = part_name(pa.chunked_array([masks.column("key"), errors.column("key")]))
            (run / "masks" / name).write_bytes(parquet_bytes(masks))
            if errors.num_rows:
                (run / "errors" / name).write_bytes(parquet_bytes(errors))
            stats = PartStats.of(name, masks, errors, NUM_CLASSES)
            sidecar.write(stats.to_json() + "\n")
            total += stats
    pq.write_table(classes_table(CATEGORIES, total), run / "classes.parquet")
    (run / "manifest.json").write_text(json.dumps(manifest_for(run_id)))
    committed_at = f"2026-12-0{1 if not changed else 2}T02:00:00+00:00"
    (run / "_SUCCESS").write_text(json.dumps({"images": total.images, "committed_at": committed_at}))


def thumbnail_uris(work: Path, pool: Pool) -> list[str]:
    """A few real small JPEGs the report's thumbnails read."""
    folder = work / "thumbs"
    folder.mkdir(parents=True, exist_ok=True)
    uris = []
    for i, data in enumerate(pool.jpegs[:8]):
        (folder / f"scene-{i}.jpg").write_bytes(data)
        uris.append(str(folder / f"scene-{i}.jpg"))
    return uris


# ----------------------------------------------------------------------------- the three parts

SIDES = ("before", "after")


def part_runs(runner: Runner, pool: Pool, sizes: list[int], sides: list[str], before_max: int | None) -> list[dict]:
    """commit + report, and the comparison of two runs, per size."""
    rows = []
    uris = thumbnail_uris(runner.work, pool)
    for n in sizes:
        folder = runner.work / f"runs-{n}"
        shutil.rmtree(folder, ignore_errors=True)
        out = folder / "out"
        started = time.perf_counter()
        for run_id, changed in (("night1", False), ("night2", True)):
            write_run(pool, out, run_id, n, uris, folder / f"stats-{run_id}.jsonl", changed=changed)
        print(f"{n} keys: two runs written in {time.perf_counter() - started:.0f} s "
              f"({_du(out) / MIB:.0f} MiB on disk)", flush=True)
        todo = [s for s in sides if s == "after" or before_max is None or n <= before_max]
        commit = {"out": str(out), "run_id": "night1", "stats_file": str(folder / "stats-night1.jsonl"),
                  "input_uri": str(runner.work / "thumbs")}
        rows.append({"step": "commit + report", "n": n,
                     **{s: runner.measure(s, f"commit_{s}", f"commit-{n}", commit) for s in todo}})
        compare = {"out": str(out), "old_id": "night1", "new_id": "night2"}
        rows.append({"step": "compare two runs", "n": n,
                     **{s: runner.measure(s, f"compare_{s}", f"compare-{n}", compare, tree_pss=s == "after")
                        for s in todo}})
        shutil.rmtree(folder)
    return rows


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server(work: Path):
    port = _free_port()
    log = open(work / "logs" / "moto.log", "w")
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def _put_all(client, bucket: str, items: list[tuple[str, bytes]]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: client.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), items))


def part_listing(runner: Runner, pool: Pool, sizes: list[int], sides: list[str]) -> list[dict]:
    """list_inputs + resume against S3 (moto): N objects, a run holding the first half of the keys."""
    import boto3
    from botocore.config import Config

    import pyarrow as pa

    from pipeline.writer import part_name

    rows = []
    creds = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    with moto_server(runner.work) as url:
        os.environ.update(creds)
        runner.env = {**creds, "AWS_ENDPOINT_URL": url}
        client = boto3.client("s3", endpoint_url=url, config=Config(max_pool_connections=32))
        for n in sizes:
            started = time.perf_counter()
            bucket, out_bucket = f"in-{n}", f"out-{n}"
            client.create_bucket(Bucket=bucket)
            client.create_bucket(Bucket=out_bucket)
            _put_all(client, bucket, [(f"images/{k}", b"\xff\xd8\xff") for k in _keys(0, n)])
            parts = []
            for start in range(0, n // 2, ROWS_PER_PART):
                masks, errors = build_part(pool, start, min(n // 2, start + ROWS_PER_PART), "resume", ["x"], False)
                name = part_name(pa.chunked_array([masks.column("key"), errors.column("key")]))
                parts.append((f"out/run=resume/masks/{name}", parquet_bytes(masks)))
                if errors.num_rows:
                    parts.append((f"out/run=resume/errors/{name}", parquet_bytes(errors)))
            _put_all(client, out_bucket, parts)
            print(f"{n} objects + {len(parts)} part files uploaded in {time.perf_counter() - started:.0f} s", flush=True)
            params = {"input_uri": f"s3://{bucket}/images", "out": f"s3://{out_bucket}/out", "run_id": "resume"}
            rows.append({"step": "list + resume (S3)", "n": n,
                         **{s: runner.measure(s, f"resume_{s}", f"resume-{n}", params) for s in sides}})
        runner.env = {}
    return rows


def write_images(folder: Path, pool: Pool, count: int) -> tuple[Path, Path]:
    images, labels = folder / "images", folder / "labels"
    images.mkdir(parents=True)
    labels.mkdir()
    for i in range(count):
        (images / f"img-{i:06d}.jpg").write_bytes(pool.jpegs[i % POOL])
        (labels / f"img-{i:06d}.png").write_bytes(pool.labels[i % POOL])
    return images, labels


def part_e2e(runner: Runner, pool: Pool, sizes: list[int], sides: list[str]) -> list[dict]:
    """The CLI end to end, CRF off, over 64x64 JPEGs."""
    rows = []
    for n in sizes:
        folder = runner.work / f"e2e-{n}"
        shutil.rmtree(folder, ignore_errors=True)
        images, labels = write_images(folder, pool, n)
        row = {"step": "end to end (CLI, --no-crf)", "n": n}
        for side in sides:
            params = {"tree": str(runner.trees[side]), "images": str(images), "labels": str(labels),
                      "out": str(folder / f"out-{side}"), "run_id": "e2e"}
            row[side] = runner.measure(side, "e2e", f"e2e-{n}", params, tree_pss=True)
        rows.append(row)
        shutil.rmtree(folder)
    return rows


# ----------------------------------------------------------------------------- tables and the reading

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


def table(rows: list[dict], *, unit: str = "keys", e2e: bool = False) -> str:
    head = ["step", unit, "before RSS MiB", "after RSS MiB", "before CPU s", "after CPU s", "before wall s",
            "after wall s", "after/before RSS", "after/before wall"]
    if e2e:
        head += ["before ms CPU/img", "after ms CPU/img", "before img/s e2e", "after img/s e2e",
                 "before img/s segmenting", "after img/s segmenting"]
    head += ["after tree PSS MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        b, a = r.get("before"), r.get("after")
        cells = [r["step"], _keys_label(r["n"]), _cell(b, "rss_mib", ".0f"), _cell(a, "rss_mib", ".0f"),
                 _cell(b, "cpu_s", ".1f"), _cell(a, "cpu_s", ".1f"), _cell(b, "wall_s", ".1f"), _cell(a, "wall_s", ".1f"),
                 _ratio(b, a, "rss_mib"), _ratio(b, a, "wall_s")]
        if e2e:
            per = [None if x is None or not x.ok else 1000 * x.cpu_s / r["n"] for x in (b, a)]
            e2e_ips = [None if x is None or not x.ok else r["n"] / x.wall_s for x in (b, a)]
            ips = [None if x is None or not x.ok else x.extra["images_per_s"] for x in (b, a)]
            cells += [_num(per[0], ".2f"), _num(per[1], ".2f"), _num(e2e_ips[0], ".1f"), _num(e2e_ips[1], ".1f"),
                      _num(ips[0], ".1f"), _num(ips[1], ".1f")]
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


def reading(runs: list[dict], listing: list[dict], e2e: list[dict], sizes: list[int], e2e_sizes: list[int]) -> str:
    """One paragraph: every goal, met or not, with its numbers."""
    out = []
    if len(sizes) >= 2:
        big, mid, small = sizes[-1], sizes[-2], sizes[0]
        a_big, a_mid = _get(runs, "commit + report", big, "after"), _get(runs, "commit + report", mid, "after")
        if a_big and a_mid:
            limit = 1.1 * a_mid.rss_mib + 100
            out.append(f"Commit + report, after: peak driver RSS {a_big.rss_mib:.0f} MiB at {_keys_label(big)} keys "
                       f"against {a_mid.rss_mib:.0f} MiB at {_keys_label(mid)} (goal ≤ 1.1x + 100 MB = {limit:.0f} MiB): "
                       f"{_verdict(a_big.rss_mib <= limit)}; {a_big.wall_s:.1f} s at {_keys_label(big)} "
                       f"(goal ≤ 60 s): {_verdict(a_big.wall_s <= 60)}.")
        b_big = _get(runs, "commit + report", big, "before")
        if b_big and a_big:
            out.append(f"Before, the same commit took {b_big.rss_mib:.0f} MiB and {b_big.wall_s:.1f} s at "
                       f"{_keys_label(big)}.")
        c_big, c_small = _get(runs, "compare two runs", big, "after"), _get(runs, "compare two runs", small, "after")
        if c_big and c_small:
            flat = c_big.rss_mib <= 1.1 * c_small.rss_mib + 100
            out.append(f"Comparison, after: driver RSS {c_small.rss_mib:.0f} MiB at {_keys_label(small)} and "
                       f"{c_big.rss_mib:.0f} MiB at {_keys_label(big)} (flat, ≤ 1.1x + 100 MB: {_verdict(flat)}); "
                       f"{c_big.wall_s:.0f} s at {_keys_label(big)} on 2 CPUs, tree PSS up to "
                       f"{c_big.tree_pss_mib:.0f} MiB.")
        for r in runs:
            if r["step"] == "compare two runs" and r.get("before") is not None:
                res = r["before"]
                desc = f"{res.rss_mib:.0f} MiB, {res.wall_s:.0f} s" if res.ok else res.status
                out.append(f"Comparison, before, {_keys_label(r['n'])}: {desc}.")
    if len(listing) >= 2:
        s, l = listing[0]["n"], listing[-1]["n"]
        for side in SIDES:
            rs, rl = _get(listing, "list + resume (S3)", s, side), _get(listing, "list + resume (S3)", l, side)
            if rs and rl:
                out.append(f"List + resume {side}: {rs.rss_mib:.0f} → {rl.rss_mib:.0f} MiB and {rs.cpu_s:.1f} → "
                           f"{rl.cpu_s:.1f} CPU-s from {_keys_label(s)} to {_keys_label(l)} keys.")
    if len(e2e_sizes) >= 2:
        s, l = e2e_sizes[0], e2e_sizes[-1]
        step = "end to end (CLI, --no-crf)"
        a_s, a_l = _get(e2e, step, s, "after"), _get(e2e, step, l, "after")
        b_l = _get(e2e, step, l, "before")
        if a_s and a_l:
            marginal = 1000 * (a_l.cpu_s - a_s.cpu_s) / (l - s)
            out.append(f"End to end, after: driver peak RSS {a_s.rss_mib:.0f} MiB at {_keys_label(s)} images and "
                       f"{a_l.rss_mib:.0f} MiB at {_keys_label(l)} (goal ≤ 1.1x = {1.1 * a_s.rss_mib:.0f}): "
                       f"{_verdict(a_l.rss_mib <= 1.1 * a_s.rss_mib)}; driver CPU {1000 * a_l.cpu_s / l:.2f} ms per "
                       f"image over the whole CLI process at {_keys_label(l)}, {marginal:.2f} ms per extra image "
                       f"between {_keys_label(s)} and {_keys_label(l)} (goal ≤ 0.5 ms): "
                       f"{_verdict(marginal <= 0.5)} on the marginal, "
                       f"{_verdict(1000 * a_l.cpu_s / l <= 0.5)} on the total.")
        if a_l and b_l:
            before, after = l / b_l.wall_s, l / a_l.wall_s
            out.append(f"Throughput at {_keys_label(l)}, end to end (images / the CLI's wall time): "
                       f"{before:.1f} images/s before, {after:.1f} after (goal: not lower): "
                       f"{_verdict(after >= before)}; while segmenting (manifest images_per_s, from the "
                       f"DAG's start to its last part): {b_l.extra['images_per_s']:.1f} before, "
                       f"{a_l.extra['images_per_s']:.1f} after.")
    return " ".join(out)


def render(args, runs, listing, e2e, command: str) -> str:
    parts = [SECTION, "",
             f"Measured {args.date} on {args.machine}, one run of `{command}` "
             f"(before = the previous commit's code, after = this tree; each step a fresh process, "
             f"under `flock {LOCK}`). RSS is the driver process's peak (VmHWM; Ray's own processes are "
             f"not in it, their sum is the last column, PSS sampled every second). CPU and wall are the "
             f"step's own; for the comparison after, `ray.init` is not included; end to end counts the "
             f"whole CLI process (imports, model load, Ray start).", ""]
    if runs:
        parts += ["Synthetic committed runs, 1000-row part files, 64x64 mask PNGs (CRF columns filled), "
                  "second run with 5% of masks changed:", "", table(runs), ""]
    if listing:
        parts += ["Listing + resume against a moto S3 server on loopback; the run holds part files for half "
                  "the keys:", "", table(listing), ""]
    if e2e:
        parts += ["End to end, `jobs/segment_bucket.py IMAGES --labels LABELS --output OUT --no-crf`, "
                  "64x64 JPEGs (ms CPU/img = the CLI process's CPU over the images):", "",
                  table(e2e, unit="images", e2e=True), ""]
    parts += [reading(runs, listing, e2e, args.sizes, args.e2e_sizes if not args.skip_e2e else []), ""]
    return "\n".join(parts)


def merge(args) -> int:
    """One section from several runs of this script (e.g. the driver-side parts and the end-to-end part)."""
    groups: dict[str, list[dict]] = {"runs": [], "listing": [], "e2e": []}
    commands = []
    for path in args.merge:
        raw = json.loads(path.read_text())
        commands.append(raw["command"])
        for row in raw["rows"]:
            row = {**row, **{side: Result(**row[side]) for side in SIDES if side in row}}
            kind = "listing" if row["step"].startswith("list") else "e2e" if row["step"].startswith("end") else "runs"
            groups[kind].append(row)
    args.sizes = sorted({r["n"] for r in groups["runs"]})
    args.skip_e2e = not groups["e2e"]
    args.e2e_sizes = sorted({r["n"] for r in groups["e2e"]})
    section = render(args, groups["runs"], groups["listing"], groups["e2e"], "` and `".join(commands))
    print(section)
    if args.docs:
        write_section(Path(args.docs), SECTION, section)
    return 0


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=_ints, default=[10_000, 100_000, 1_000_000], help="keys per synthetic run")
    p.add_argument("--list-sizes", type=_ints, default=[10_000, 100_000], help="objects on the S3 server")
    p.add_argument("--e2e-sizes", type=_ints, default=[1000, 10_000], help="images end to end")
    p.add_argument("--skip-runs", action="store_true", help="skip commit/compare")
    p.add_argument("--skip-listing", action="store_true", help="skip list + resume on S3")
    p.add_argument("--skip-e2e", action="store_true", help="skip the end-to-end CLI runs")
    p.add_argument("--skip-before", action="store_true", help="measure the new code only")
    p.add_argument("--before-max-keys", type=int, help="run the old commit/compare only up to this many keys")
    p.add_argument("--keep", action="store_true", help="keep WORK (otherwise its big files are removed)")
    p.add_argument("--work", type=Path, default=Path("/tmp/scale-bench"))
    p.add_argument("--old-tree", type=Path, default=OLD_TREE, help="checkout of the code before")
    p.add_argument("--rss-limit-gb", type=float, default=16, help="kill a step whose driver RSS passes this")
    p.add_argument("--timeout-min", type=float, default=15, help="kill a step running longer")
    p.add_argument("--docs", default=str(REPO / "docs" / "benchmarks.md"), help="'' to not write")
    p.add_argument("--date", default=dt.date.today().isoformat())
    p.add_argument("--machine", default=f"{os.cpu_count()} cores, "
                                        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB")
    p.add_argument("--merge", nargs="+", type=Path, metavar="RESULTS_JSON",
                   help="render one section from the results.json of earlier runs (each part measured once)")
    p.add_argument("--step", help=argparse.SUPPRESS)
    p.add_argument("--params", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.step:  # a measured step, in its own process: imports `pipeline` from PYTHONPATH
        child_main(args.step, json.loads(args.params), args.result)
        return 0

    if args.merge:
        return merge(args)
    sys.path.insert(0, str(REPO))  # generation uses this tree's pipeline (PartStats.of, part_name)
    command = "python benchmarks/scale.py " + " ".join(sys.argv[1:])
    sides = ["after"] if args.skip_before else list(SIDES)
    args.work.mkdir(parents=True, exist_ok=True)
    runner = Runner(args.work, {"before": args.old_tree.resolve(), "after": REPO},
                    rss_limit_gb=args.rss_limit_gb, timeout_min=args.timeout_min)
    pool = Pool()
    runs = [] if args.skip_runs else part_runs(runner, pool, args.sizes, sides, args.before_max_keys)
    listing = [] if args.skip_listing else part_listing(runner, pool, args.list_sizes, sides)
    e2e = [] if args.skip_e2e else part_e2e(runner, pool, args.e2e_sizes, sides)

    section = render(args, runs, listing, e2e, command)
    print("\n" + section)
    raw = {"command": command, "date": args.date, "machine": args.machine,
           "rows": [{**{k: v for k, v in r.items() if k not in SIDES},
                     **{s: asdict(r[s]) for s in SIDES if s in r}} for r in runs + listing + e2e]}
    (args.work / "results.json").write_text(json.dumps(raw, indent=2))
    if args.docs:
        write_section(Path(args.docs), SECTION, section)
        print(f"\nwrote {args.docs}")
    if not args.keep:
        for child in args.work.iterdir():
            if child.name not in ("logs", "results.json"):
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
