"""Peak memory of the job over a small and a 10x larger bucket: it must stay (nearly) flat.

    python benchmarks/memory.py [--counts 200,2000] [--size 64] [--crf] [--batch-size 8]

Writes ``count`` tiny synthetic PNGs (``pipeline.synthetic.make_scene``), runs the real CLI
(``jobs/segment_bucket.py``, its own local Ray) over each bucket and samples every 0.2 s:
the driver's RSS, and the whole process tree's (driver + raylet, GCS, object store, workers) RSS
and PSS. Tree RSS counts shared pages (the object store's shared memory, mapped libraries) once
per process that touched them; PSS splits them between those processes, so it is the honest
total. Ray Data's streaming executor bounds the blocks in flight (backpressure and the object store
limit), so memory should not grow with the bucket; what does grow is the driver's list of input
keys and Ray Data's per-block metadata, about a kilobyte per image.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.synthetic import SceneSpec, make_scene  # noqa: E402


def write_pngs(folder: Path, count: int, size: int) -> None:
    folder.mkdir(parents=True)
    spec = SceneSpec(height=size, width=size)
    for i in range(count):
        buffer = io.BytesIO()
        Image.fromarray(make_scene(5_000_000 + i, spec)[0]).save(buffer, format="PNG")
        (folder / f"img-{i:06d}.png").write_bytes(buffer.getvalue())


class Peaks:
    """Samples a process and its descendants every ``interval`` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.root = psutil.Process(pid)
        self.driver_rss = self.tree_rss = self.tree_pss = 0
        self.processes = 0
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = pss = 0
            procs = [self.root, *self.root.children(recursive=True)] if self.root.is_running() else []
            for p in procs:
                try:
                    info = p.memory_full_info()
                except psutil.Error:
                    continue  # exited between listing and sampling
                rss, pss = rss + info.rss, pss + info.pss
                if p.pid == self.root.pid:
                    self.driver_rss = max(self.driver_rss, info.rss)
            self.tree_rss, self.tree_pss = max(self.tree_rss, rss), max(self.tree_pss, pss)
            self.processes = max(self.processes, len(procs))
            self._stop.wait(self._interval)

    def stop(self) -> Peaks:
        self._stop.set()
        self._thread.join()
        return self


def run_job(images: Path, out: Path, args) -> tuple[Peaks, float]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    cmd = [
        sys.executable,
        str(REPO / "jobs" / "segment_bucket.py"),
        str(images),
        "--output",
        str(out),
        "--run-id",
        "mem",
        "--batch-size",
        str(args.batch_size),
        "--crf-actors",
        "1-1",
        "--crf" if args.crf else "--no-crf",
    ]
    started = time.perf_counter()
    job = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = Peaks(job.pid)
    output, _ = job.communicate()
    seconds = time.perf_counter() - started
    peaks.stop()
    if job.returncode != 0:
        raise SystemExit(f"job failed ({job.returncode}):\n{output[-3000:]}")
    return peaks, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="200,2000", help="bucket sizes to compare, small first")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crf", action="store_true", help="also run the CRF stage (1 actor)")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]

    results = {}
    for count in counts:
        with tempfile.TemporaryDirectory() as tmp:
            write_pngs(Path(tmp) / "images", count, args.size)
            results[count] = run_job(Path(tmp) / "images", Path(tmp) / "out", args)
            peaks, seconds = results[count]
            print(f"{count} images: {seconds:.0f}s, up to {peaks.processes} processes", flush=True)

    mib = 2**20
    print(
        f"\n{args.size}x{args.size} PNGs, CRF {'on (1 actor)' if args.crf else 'off'}, batch size "
        f"{args.batch_size}, {os.cpu_count()} cores; peak memory in MiB"
    )
    print(f"| {'images':>7} | {'driver RSS':>10} | {'tree RSS':>9} | {'tree PSS':>9} | {'seconds':>7} |")
    print(f"|{'-' * 9}|{'-' * 12}|{'-' * 11}|{'-' * 11}|{'-' * 9}|")
    for count, (peaks, seconds) in results.items():
        print(
            f"| {count:>7} | {peaks.driver_rss / mib:>10.0f} | {peaks.tree_rss / mib:>9.0f} | "
            f"{peaks.tree_pss / mib:>9.0f} | {seconds:>7.0f} |"
        )
    (small, _), (large, _) = results[counts[0]], results[counts[-1]]
    print(
        f"| {'ratio':>7} | {large.driver_rss / small.driver_rss:>10.2f} | {large.tree_rss / small.tree_rss:>9.2f} | "
        f"{large.tree_pss / small.tree_pss:>9.2f} | {'':>7} |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
