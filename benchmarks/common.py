"""What the benchmark scripts share: the lock their timed steps hold, and where their tables go.

The host is shared with other agents: each timed run takes ``LOCK`` exclusively; commands that
only need quiet (tests, builds) can wait for it with ``flock -s /tmp/bench.lock CMD``.
"""

from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path

LOCK = "/tmp/bench.lock"


@contextlib.contextmanager
def bench_lock():
    with open(LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_section(path: Path, title: str, section: str) -> None:
    """Replace the ``## title`` section of a markdown file (or append it), keeping the other sections."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    start = text.find(title)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        nxt = text.find("\n## ", start + len(title))
        text = text[:start] + section.rstrip("\n") + "\n" + (text[nxt:] if nxt >= 0 else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip("\n") + "\n")
