"""The read + decode stage: concurrent fetches keep order and per-object errors; no torch import."""

import subprocess
import sys

from pipeline.io.decode import fetch_all
from tests.conftest import REPO


def test_fetch_all_keeps_order_and_returns_each_failure(tmp_path):
    uris = []
    for i in range(40):
        (tmp_path / f"{i}.bin").write_bytes(bytes([i]) * (i + 1))
        uris.append(str(tmp_path / f"{i}.bin"))
    got = fetch_all([*uris[:20], str(tmp_path / "missing.bin"), "", *uris[20:]], {})
    assert got[:20] == [bytes([i]) * (i + 1) for i in range(20)]
    assert isinstance(got[20], FileNotFoundError) and got[21] is None
    assert got[22:] == [bytes([i]) * (i + 1) for i in range(20, 40)]


def test_task_side_modules_do_not_import_torch():
    """Decode and CRF actors import these; torch would cost each new worker ~1.5-3 s and ~1 GB."""
    code = "import sys, pipeline.io.decode, pipeline.crf.densecrf; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
