"""pipeline/crf/permutohedral.py against densecrf's own C++ lattice, bit for bit.

pydensecrf exposes only whole inferences, whose softmax (Eigen's exp) differs from torch's by ulps, so
tests/test_crf_torch.py compares within a tolerance. Here densecrf's permutohedral.cpp (from the
pydensecrf2 1.1 sdist, fetched with pip from PyPI) is compiled into a small harness with the flags pip's
build uses (-O3, no -march: the SSE2 code path), and the barycentric weights, the lattice size and the
filter output must be identical. Needs g++ and PyPI (skipped, saying which, without them); slow: a build.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.crf.permutohedral import PermutohedralLattice
from pipeline.crf.torch_port import _features

pytestmark = pytest.mark.slow

HARNESS = r"""
#include "permutohedral.h"
#include <cstdio>
#include <vector>
struct Open : Permutohedral {  // the members are protected
  int points() const { return M_; }
  const std::vector<float>& weights() const { return barycentric_; }
};
int main(int argc, char** argv) {
  int d, n, c;
  FILE* in = fopen(argv[1], "rb");
  if (fread(&d, 4, 1, in) + fread(&n, 4, 1, in) + fread(&c, 4, 1, in) != 3) return 2;
  MatrixXf features(d, n), values(c, n);
  if (fread(features.data(), 4, (size_t)d * n, in) + fread(values.data(), 4, (size_t)c * n, in) != (size_t)(d + c) * n)
    return 2;
  fclose(in);
  Open lattice;
  lattice.init(features);
  MatrixXf out = lattice.compute(values);
  FILE* o = fopen(argv[2], "wb");
  int m = lattice.points();
  fwrite(&m, 4, 1, o);
  fwrite(out.data(), 4, (size_t)c * n, o);
  fwrite(lattice.weights().data(), 4, (size_t)(d + 1) * n, o);
  fclose(o);
}
"""

CASES = [  # (height, width, classes, bilateral): odd pixel counts leave densecrf's SSE padding pixels
    (17, 23, 1, True),
    (17, 23, 2, True),
    (17, 23, 21, True),
    (1, 1, 3, True),
    (40, 61, 6, False),
    (120, 160, 1, False),
    (120, 160, 21, True),
    (97, 131, 6, True),
]


@pytest.fixture(scope="module")
def densecrf_harness(tmp_path_factory) -> Path:
    """densecrf's permutohedral.cpp compiled with a harness that prints its lattice's insides."""
    if shutil.which("g++") is None:
        pytest.skip("needs g++ to compile densecrf's permutohedral.cpp")
    work = tmp_path_factory.mktemp("densecrf")
    download = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--dest", str(work)]
    fetched = subprocess.run([*download, "pydensecrf2==1.1"], capture_output=True, text=True)
    if fetched.returncode:
        pytest.skip(f"could not fetch the pydensecrf2 1.1 sdist from PyPI: {fetched.stderr.strip()[-300:]}")
    with tarfile.open(next(work.glob("pydensecrf2-*.tar.gz"))) as tar:
        tar.extractall(work, filter="data")
    src = next(p for p in work.glob("pydensecrf2-*") if p.is_dir()) / "pydensecrf" / "densecrf"
    (work / "harness.cpp").write_text(HARNESS)
    exe = work / "harness"
    flags = ["-O3", "-fwrapv", "-DNDEBUG", "-w", f"-I{src / 'include'}"]
    subprocess.run(["g++", *flags, str(work / "harness.cpp"), str(src / "src" / "permutohedral.cpp"), "-o", str(exe)],
                   check=True)  # fmt: skip
    return exe


def densecrf_filter(exe: Path, features: np.ndarray, values: np.ndarray):
    """densecrf's (number of lattice points, filtered values (N, C), barycentric weights (N, d+1))."""
    n, d = features.shape
    c = values.shape[1]
    work = exe.parent
    with open(work / "in.bin", "wb") as f:
        np.array([d, n, c], np.int32).tofile(f)
        features.astype(np.float32).tofile(f)  # row-major (N, d) is Eigen's column-major (d, N)
        values.astype(np.float32).tofile(f)
    subprocess.run([str(exe), str(work / "in.bin"), str(work / "out.bin")], check=True)
    raw = np.fromfile(work / "out.bin", np.uint8)
    m = int(raw[:4].view(np.int32)[0])
    out = raw[4 : 4 + 4 * n * c].view(np.float32).reshape(n, c)
    weights = raw[4 + 4 * n * c :].view(np.float32).reshape(n, d + 1)
    return m, out, weights


@pytest.mark.parametrize("h, w, c, bilateral", CASES)
def test_lattice_is_bitwise_densecrf(densecrf_harness, h, w, c, bilateral):
    rng = np.random.default_rng(h * 1000 + w * 10 + c)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    values = rng.random((h * w, c), dtype=np.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        features = _features(torch.from_numpy(image), 67.0 if bilateral else 3.0, 3.0 if bilateral else None)
        m, out, weights = densecrf_filter(densecrf_harness, features.numpy(), values)
        lattice = PermutohedralLattice.build(features)
        mine = lattice.filter(torch.from_numpy(values)).numpy()
    finally:
        torch.set_num_threads(threads)
    assert m == lattice.num_points
    assert np.array_equal(weights, lattice.weights.numpy())
    assert np.array_equal(out, mine), f"max abs difference {np.abs(out - mine).max():.1e}"
