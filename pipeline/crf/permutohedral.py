"""The permutohedral lattice (Adams et al. 2010) of densecrf's ``Permutohedral``, in torch: features
elevated onto the lattice, splat, [1 2 1]/2 blur along each axis, alpha-scaled slice (as
``pipeline/crf/torch_port.py``'s module docstring lists, operation for operation)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

_SIMD_BLOCK = 4  # densecrf's SSE init runs 4 pixels at a time: pad pixels (features 0) create lattice points too


def f32(x: float) -> float:
    """x rounded to float32, as densecrf stores its constants."""
    return float(np.float32(x))


def _elevate(features: torch.Tensor) -> torch.Tensor:
    """(N, d) features -> (N, d+1) points on the plane sum = 0 (y = E p, Adams et al. 2010 p. 5)."""
    n, d = features.shape
    inv_std_dev = f32(math.sqrt(2.0 / 3.0) * (d + 1))
    scale = [f32(1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std_dev) for i in range(d)]
    cf = features * torch.tensor(scale, dtype=torch.float32, device=features.device)
    elevated: list[torch.Tensor] = [features] * (d + 1)  # every slot is set below
    running = features.new_zeros(n)
    for j in range(d, 0, -1):  # densecrf's order of float additions
        elevated[j] = running - j * cf[:, j - 1]
        running = running + cf[:, j - 1]
    elevated[0] = running
    return torch.stack(elevated, 1)


def _simplex(elevated: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest remainder-0 lattice point (N, d+1) float and the rank of each coordinate (N, d+1) int64."""
    d = elevated.shape[1] - 1
    v = torch.round(elevated * f32(1.0 / (d + 1)))  # cvtps2dq under MXCSR round-to-nearest: half to even
    rem0 = v * (d + 1)
    diff = elevated - rem0
    # densecrf, for i < j: rank[i] += diff_i < diff_j, rank[j] += !(diff_i < diff_j); then rank += sum(v).
    rank = (
        torch.stack(
            [
                (diff[:, i + 1 :] > diff[:, i : i + 1]).sum(1) + (diff[:, :i] >= diff[:, i : i + 1]).sum(1)
                for i in range(d + 1)
            ],
            1,
        )
        + v.sum(1, keepdim=True).long()
    )
    wrap = (rank < 0).long() - (rank > d).long()
    return rem0 + (d + 1) * wrap, rank + (d + 1) * wrap


def _barycentric(elevated: torch.Tensor, rem0: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """(N, d+1) barycentric weights of the enclosing simplex's vertices (p. 10), with densecrf's wrap-around."""
    d = elevated.shape[1] - 1
    v = (elevated - rem0) * f32(1.0 / (d + 1))
    by_slot = torch.zeros_like(v).scatter_(1, d - rank, v)  # slot d - rank[i] gets +v_i, slot d - rank[i] + 1 gets -v_i
    return torch.cat([by_slot[:, :1] + (1.0 - by_slot[:, d:]), by_slot[:, 1:] - by_slot[:, :-1]], 1)


def _vertex_codes(rem0: torch.Tensor, rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, d+1) int64 codes of each pixel's vertex keys and, per axis j, the code step to densecrf's neighbour
    n1 = key - 1 + (d+1) e_j (e_d: no coordinate); n2 = key + 1 - (d+1) e_j is minus that step.

    Vertex r's key is rem0 + canonical simplex r: r, or r - (d+1) where rank > d - r, on the first d
    coordinates (densecrf drops the last: coordinates sum to 0). Codes are mixed radix over a box holding
    every key (rem0 ± d) and its neighbours (± d more).
    """
    d = rank.shape[1] - 1
    base = rem0[:, :d].long()
    low = base.amin(0) - 2 * d
    widths = (base.amax(0) - low + 2 * d + 1).tolist()
    if math.prod(widths) >= 2**63:
        raise ValueError(f"lattice keys span {widths}: too wide for int64 codes (features too spread; raise sxy/srgb)")
    strides = [math.prod(widths[k + 1 :]) for k in range(d)]
    stride = torch.tensor(strides, device=rank.device)
    origin = ((base - low) * stride).sum(1)
    codes = [origin + r * sum(strides) - (d + 1) * ((rank[:, :d] > d - r).long() * stride).sum(1) for r in range(d + 1)]
    steps = [(d + 1) * strides[j] - sum(strides) for j in range(d)] + [-sum(strides)]
    return torch.stack(codes, 1), torch.tensor(steps, device=rank.device)


@dataclass
class PermutohedralLattice:
    """Permutohedral lattice of one (or several stacked) images' features; built once, filters many times.

    Points are numbered by remainder (vertex slot: each point is the same slot of every simplex it is in),
    then by first use in pixel order, so each pixel's d+1 points ascend with the slot and sparse rows keep
    densecrf's order of additions.
    """

    offsets: torch.Tensor  # (N, d+1) int64: lattice point of each pixel's enclosing vertices
    weights: torch.Tensor  # (N, d+1) float32: their barycentric weights
    neighbours: torch.Tensor  # (d+1, 2, M+1) int64: point of key -/+ along each axis; M, an all-zero row, if absent
    num_points: int  # M

    def __post_init__(self) -> None:
        n, slots = self.offsets.shape
        flat = self.offsets.reshape(-1)
        by_point = torch.sort(flat, stable=True).indices  # stable: each point's pixels stay in pixel order
        rows = torch.cat([flat.new_zeros(1), torch.bincount(flat, minlength=self.num_points + 1).cumsum(0)])
        pixels = torch.arange(n, device=flat.device).repeat_interleave(slots)
        alpha = f32(1.0 / (1.0 + 2.0 ** -(slots - 1)))  # densecrf's "magic scaling constant"
        self.alpha = alpha
        self._splat = _csr(rows, pixels[by_point], self.weights.reshape(-1)[by_point], (self.num_points + 1, n))
        self._slice = _csr(
            torch.arange(0, flat.numel() + 1, slots, device=flat.device),
            flat,
            (self.weights * alpha).reshape(-1),
            (n, self.num_points + 1),
        )

    @classmethod
    def build(cls, features: torch.Tensor) -> PermutohedralLattice:
        """Lattice of (N, d) float32 features (densecrf's feature matrix, transposed)."""
        n, d = features.shape
        padded = torch.cat([features, features.new_zeros((-n) % _SIMD_BLOCK, d)])
        elevated = _elevate(padded)
        rem0, rank = _simplex(elevated)
        codes, steps = _vertex_codes(rem0, rank)
        points, inverse = torch.unique(codes.reshape(-1), sorted=True, return_inverse=True)
        m, uses = points.numel(), torch.arange(codes.numel(), device=codes.device)
        first = torch.full((m,), codes.numel(), device=codes.device).scatter_reduce_(0, inverse, uses, "amin")
        order = torch.argsort(first % (d + 1) * codes.numel() + first)  # by slot, then first use
        renumber = torch.full((m + 1,), m, device=codes.device)
        renumber[order] = torch.arange(m, device=codes.device)
        # n1 along each axis by binary search; n2 is its inverse (opposite steps): n1(p) = q <=> n2(q) = p.
        targets = points[None, :] + steps[:, None]
        found = torch.searchsorted(points, targets).clamp_(max=m - 1)
        n1 = renumber[torch.where(points[found] == targets, found, m)].index_select(1, order)
        n1 = torch.cat([n1, n1.new_full((d + 1, 1), m)], 1)
        n2 = torch.full_like(n1, m).scatter_(1, n1, torch.arange(m + 1, device=codes.device).expand(d + 1, m + 1))
        n2[:, m] = m  # every absent n1 was scattered onto the zero row
        neighbours = torch.stack([n1, n2], 1)
        offsets = renumber[inverse].reshape(-1, d + 1)[:n]
        return cls(offsets, _barycentric(elevated, rem0, rank)[:n], neighbours, m)

    @classmethod
    def concat(cls, lattices: list[PermutohedralLattice]) -> PermutohedralLattice:
        """One lattice for several images (pixels stacked): their points never neighbour each other."""
        if len(lattices) == 1:
            return lattices[0]
        total = sum(lat.num_points for lat in lattices)
        offsets, neighbours, start = [], [], 0
        for lat in lattices:
            offsets.append(lat.offsets + start)
            inner = lat.neighbours[..., :-1]
            neighbours.append(torch.where(inner == lat.num_points, total, inner + start))
            start += lat.num_points
        neighbours.append(lattices[0].neighbours.new_full((*lattices[0].neighbours.shape[:2], 1), total))
        weights = torch.cat([lat.weights for lat in lattices])
        return cls(torch.cat(offsets), weights, torch.cat(neighbours, -1), total)

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """Gaussian-filter (N, C) values: splat, blur, slice (densecrf's Permutohedral::compute, reverse=False)."""
        lattice = self._splat @ values.contiguous()  # rows in pixel order: densecrf's order of additions
        pair, spare = torch.empty_like(lattice), torch.empty_like(lattice)
        for j in range(self.offsets.shape[1]):
            torch.index_select(lattice, 0, self.neighbours[j, 0], out=pair)
            torch.index_select(lattice, 0, self.neighbours[j, 1], out=spare)
            pair.add_(spare)
            # value + 0.5 * (n1 + n2); 0.5 * x is exact, so a fused multiply-add would round alike.
            torch.add(lattice, pair, alpha=0.5, out=spare)
            lattice, spare = spare, lattice
        if values.shape[1] > 2:
            return self._slice @ lattice  # sseCompute: sum_j (w_j * alpha) * value_j, in slot order
        out = torch.zeros_like(values)
        for j in range(self.offsets.shape[1]):  # seqCompute: sum_j (w_j * value_j) * alpha
            out += (self.weights[:, j : j + 1] * lattice.index_select(0, self.offsets[:, j])) * self.alpha
        return out

    def normaliser(self) -> torch.Tensor:
        """(N, 1) NORMALIZE_SYMMETRIC factors 1 / sqrt(K·1 + 1e-20), computed in double as densecrf does."""
        k1 = self.filter(self.weights.new_ones(self.weights.shape[0], 1))
        return (1.0 / torch.sqrt(k1.double() + 1e-20)).float()


def _csr(rows: torch.Tensor, columns: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Sparse CSR matrix; its product with a dense matrix adds each row's terms in column order."""
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is stable API
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(rows, columns, values, size, check_invariants=False)
