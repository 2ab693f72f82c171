"""Where a run's cores went: its process tree sampled in a thread, CPU seconds per process group."""

from __future__ import annotations

import threading
import time

from ceiling_parts import SAMPLE_S, SKIP


def steady_window(events: list[tuple[float, int]], total: int, skip: float = SKIP) -> tuple[float, int, float] | None:
    """(time, images done by then, last event's time) from the event at which ``skip`` of ``total``
    images were done; None when only the last event gets there.

    ``events``: (time, images finished at that time), e.g. one per written image or part file.
    """
    events = sorted(events)
    done = 0
    for i, (t, n) in enumerate(events):
        done += n
        if done >= skip * total and i < len(events) - 1:
            return t, done, events[-1][0]
    return None


def steady_rate(events: list[tuple[float, int]], total: int, skip: float = SKIP) -> float | None:
    """Images/s over ``steady_window``: the images done after it starts, over its seconds."""
    window = steady_window(events, total, skip)
    if window is None or window[2] <= window[0]:
        return None
    start, done, end = window
    return (total - done) / (end - start)


def _group(title: str, root: bool) -> str:
    if root:
        return "driver"
    for stage in ("Segmenter", "Decoder", "PartWriter", "CRFRefiner"):
        if stage in title:
            return stage
    if "ray::IDLE" in title or "default_worker.py" in title:
        return "Ray worker (booting/idle)"
    if "loop_worker" in title or "multiprocessing" in title:
        return "loop worker"
    return "ray system"  # gcs, raylet, dashboard + agents, idle workers, Ray Data's own actors


class TreeSampler:
    """Every SAMPLE_S in a thread: each process of ``pid``'s tree (its title and CPU seconds) and
    the host's busy CPU seconds, so a run tells where its cores went and what else ran meanwhile."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, dict[str, float], float]] = []  # (t, CPU s per group, host busy s)
        self.first_seen: dict[tuple[int, str], float] = {}  # (pid, title) → first time seen
        self._cpu: dict[int, float] = {}  # pid → CPU seconds at the last sample
        self._groups: dict[str, float] = {}  # CPU seconds per group so far
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            now = time.time()
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                procs = []
            seen: dict[int, tuple[str, float, float]] = {}
            for p in procs:
                try:
                    title = " ".join(p.cmdline()).strip()[:100]
                    cpu = sum(p.cpu_times()[:2])
                except psutil.Error:
                    continue
                self.first_seen.setdefault((p.pid, title), now)
                seen[p.pid] = (_group(title, p.pid == self.pid), self._cpu.get(p.pid, 0.0), cpu)
                self._cpu[p.pid] = cpu
            for group, before, cpu in seen.values():  # each CPU second to the group the process was in
                self._groups[group] = self._groups.get(group, 0.0) + max(0.0, cpu - before)
            groups = dict(self._groups)  # exited processes keep what they used
            host = psutil.cpu_times()
            self.samples.append((now, groups, sum(host) - host.idle - getattr(host, "iowait", 0.0)))
            self._stop.wait(SAMPLE_S)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _at(self, t: float) -> tuple[dict[str, float], float]:
        best = min(self.samples, key=lambda s: abs(s[0] - t))
        return best[1], best[2]

    def cores(self, start: float, end: float) -> dict[str, float]:
        """Cores busy per group between ``start`` and ``end`` (+ "other": the host's busy cores outside the tree)."""
        if not self.samples or end - start < 2 * SAMPLE_S:
            return {}
        (a, host_a), (b, host_b) = self._at(start), self._at(end)
        seconds = end - start
        out = {g: (b.get(g, 0.0) - a.get(g, 0.0)) / seconds for g in b}
        out = {g: v for g, v in out.items() if v >= 0.005}
        out["other"] = max(0.0, (host_b - host_a) / seconds - sum(out.values()))
        return out

    def titles(self, word: str) -> list[tuple[float, str]]:
        return sorted((t, title) for (_, title), t in self.first_seen.items() if word in title)

    def timeline(self, start: float) -> list[str]:
        """Each process title the first time it was seen, in seconds since ``start``."""
        first: dict[str, float] = {}
        for (_, title), t in self.first_seen.items():
            short = title.split(" ")[0] if not title.startswith("ray::") else title
            short = short.rsplit("/", 1)[-1]
            first[short] = min(t, first.get(short, t))
        return [f"{t - start:6.2f} s  {title}" for title, t in sorted(first.items(), key=lambda kv: kv[1])]

    def actors(self, stage: str = "Segmenter") -> tuple[float | None, float | None]:
        """(first time an actor of ``stage`` was in its constructor, time the last one left it)."""
        building = [t for t, title in self.titles(stage) if title.endswith("__init__")]
        pids_ready: dict[int, float] = {}
        for (pid, title), t in self.first_seen.items():
            if stage in title and not title.endswith("__init__"):
                pids_ready[pid] = min(t, pids_ready.get(pid, t))
        return (min(building) if building else None), (max(pids_ready.values()) if pids_ready else None)


def fmt_cores(cores: dict[str, float]) -> str:
    order = [
        "loop worker",
        "Segmenter",
        "Decoder",
        "PartWriter",
        "CRFRefiner",
        "driver",
        "Ray worker (booting/idle)",
        "ray system",
        "other",
    ]
    return ", ".join(f"{g} {cores[g]:.2f}" for g in order if g in cores) or "n/a"
