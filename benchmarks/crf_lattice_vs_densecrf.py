"""Bitwise check of pipeline/crf_torch.py's permutohedral lattice against densecrf's own C++.

pydensecrf exposes only whole inferences, whose softmax (Eigen's exp) differs from torch's by ulps, so the
tests compare within a tolerance. This tool compiles densecrf's permutohedral.cpp (from the pydensecrf2
1.1 sdist, fetched with pip) into a small harness with the flags pip's build uses (-O3, no -march: the SSE2
code path) and compares barycentric weights, lattice size and filter output bit for bit.

    python benchmarks/crf_lattice_vs_densecrf.py [--sdist pydensecrf2-1.1.tar.gz]

Needs g++ and, without --sdist, PyPI. Exit status 1 if anything differs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.crf_torch import _features
from pipeline.permutohedral import PermutohedralLattice

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


def build_harness(work: Path, sdist: Path | None) -> Path:
    if sdist is None:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-binary",
                ":all:",
                "--no-deps",
                "--dest",
                str(work),
                "pydensecrf2==1.1",
            ],
            check=True,
        )
        sdist = next(work.glob("pydensecrf2-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        tar.extractall(work, filter="data")
    src = next(work.glob("pydensecrf2-*")) / "pydensecrf" / "densecrf"
    (work / "harness.cpp").write_text(HARNESS)
    exe = work / "harness"
    subprocess.run(
        [
            "g++",
            "-O3",
            "-fwrapv",
            "-DNDEBUG",
            "-w",
            f"-I{src / 'include'}",
            str(work / "harness.cpp"),
            str(src / "src" / "permutohedral.cpp"),
            "-o",
            str(exe),
        ],
        check=True,
    )
    return exe


def densecrf_filter(exe: Path, work: Path, features: np.ndarray, values: np.ndarray):
    """densecrf's (number of lattice points, filtered values (N, C), barycentric weights (N, d+1))."""
    n, d = features.shape
    c = values.shape[1]
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sdist", type=Path, help="pydensecrf2-1.1.tar.gz (default: pip download it)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        exe = build_harness(work, args.sdist)
        for h, w, c, bilateral in CASES:
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            features = _features(torch.from_numpy(image), 67.0 if bilateral else 3.0, 3.0 if bilateral else None)
            values = rng.random((h * w, c), dtype=np.float32)
            m, out, weights = densecrf_filter(exe, work, features.numpy(), values)
            lattice = PermutohedralLattice.build(features)
            mine = lattice.filter(torch.from_numpy(values)).numpy()
            same = (
                m == lattice.num_points,
                np.array_equal(weights, lattice.weights.numpy()),
                np.array_equal(out, mine),
            )
            failures += not all(same)
            print(
                f"{h}x{w}, {c} values, {'bilateral' if bilateral else 'Gaussian'}: lattice points {m} vs "
                f"{lattice.num_points}, weights identical {same[1]}, filter output identical {same[2]} "
                f"(max abs difference {np.abs(out - mine).max():.1e})"
            )
    print("all identical" if not failures else f"{failures} case(s) differ")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
