"""Running a measured step, parent side: a fresh subprocess per step, watched for RSS and time."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import bench_lock

from scale_parts import MIB, SCRIPT


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

    def __init__(
        self, work: Path, trees: dict[str, Path], *, rss_limit_gb: float, timeout_min: float, env: dict | None = None
    ) -> None:
        self.work, self.trees = work, trees
        self.rss_limit, self.timeout = rss_limit_gb * 2**30, timeout_min * 60
        self.env = env or {}
        (work / "logs").mkdir(parents=True, exist_ok=True)

    def measure(self, side: str, step: str, label: str, params: dict, *, tree_pss: bool = False) -> Result:
        import psutil

        tree = self.trees[side]
        result_file = self.work / "logs" / f"{label}-{side}.json"
        result_file.unlink(missing_ok=True)
        env = {
            **os.environ,
            **self.env,
            "PYTHONPATH": str(tree),
            "PYTHONDONTWRITEBYTECODE": "1",
            "RAY_AUTH_MODE": "disabled",
        }
        env.pop("RAY_ADDRESS", None)
        cmd = [
            sys.executable,
            str(SCRIPT),
            "--step",
            step,
            "--params",
            json.dumps(params),
            "--result",
            str(result_file),
        ]
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
