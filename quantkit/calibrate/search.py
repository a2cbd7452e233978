"""Threshold searches over a histogram of |x|: percentile, entropy (KL) and mse.

Histogram convention (shared with ``histogram.HistogramCollector``): ``counts[j]`` holds the values
in ``(j * width, (j + 1) * width]``; bin 0 also holds the exact zeros, whose number is passed as
``zero_count`` where it matters. All searches are vectorised over the candidates in float64
numpy; the only loops are over cache-sized blocks of candidates (tested: same amax as one block).

The entropy search reproduces pytorch-quantization 2.1.3's ``_compute_amax_entropy`` (TensorRT's
KL calibration): candidates ``i`` = start_bin .. n bins, the kept bins merged into 128 cells (int8,
signed), the mass beyond the threshold folded into the last kept bin, ``counts[0]`` replaced by
``counts[1]`` so a spike of ReLU zeros does not dominate, and the last minimum wins ties.
"""

from __future__ import annotations

import math

import numpy as np

# Candidates per block in the entropy search: (block x 129) float64 arrays of ~260 KiB stay in L2.
_KL_BLOCK = 256
# Working-set bound for the mse search: candidates x edges evaluated per chunk (float64 elements).
_MSE_CHUNK_ELEMENTS = 1 << 21
# Candidates per block: small blocks keep the (block x edges) array in cache and let each block stop at the
# edges below its largest candidate.
_MSE_BLOCK_ROWS = 32
# Above this many mse candidates, search a strided grid first and then refine around its best.
# The modelled error is smooth over a few bins (checked: exhaustive and strided argmin agreed on
# 40 seeded gaussian/laplace/relu/student-t/skewed histograms); 512 makes 2048 bins cost ~1/4.
_MSE_MAX_CANDIDATES = 512


def _xlogx(v: np.ndarray) -> np.ndarray:
    out = np.zeros_like(v, dtype=np.float64)
    pos = v > 0
    out[pos] = v[pos] * np.log(v[pos])
    return out


def amax_percentile(counts: np.ndarray, width: float, percentile: float, zero_count: int = 0) -> float:
    """Smallest amax below which ``percentile`` % of the values lie, in the data's units.

    Linear interpolation inside the bin where the cumulative count crosses the target; the exact
    zeros count as lying at 0, not spread over bin 0. Returns 0.0 for an empty histogram.
    """
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return 0.0
    target = total * (percentile / 100.0)
    cum = np.cumsum(counts)
    idx = int(np.searchsorted(cum, target, side="left"))
    idx = min(idx, len(counts) - 1)
    below = cum[idx - 1] if idx > 0 else 0.0
    in_bin = counts[idx]
    if idx == 0:  # zeros sit at 0: interpolate only over the non-zero part of bin 0
        below += zero_count
        in_bin -= zero_count
    frac = 0.0 if in_bin <= 0 else min(max((target - below) / in_bin, 0.0), 1.0)
    return float((idx + frac) * width)


def kl_divergences(counts: np.ndarray, start_bin: int, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """KL(reference || quantized) for every candidate threshold, TensorRT / pytorch-quantization style.

    Args:
        counts: histogram of |x| (see module docstring), length n.
        start_bin: first candidate, in bins.
        levels: quantized cells on the |x| axis (128 for signed int8).

    Returns:
        (candidates, kl): candidate thresholds in bins (start_bin .. n inclusive) and their
        divergence in nats (``inf`` where the reference has mass the quantized histogram cannot hold).

    For candidate i the kept bins j < i go to cell ``floor(j * levels / i)`` (exact integer maths;
    numpy's ``linspace(0, i, levels + 1)`` is exact too because ``levels`` is a power of two), each
    non-empty bin of a cell gets the cell's mean, empty bins stay empty. Every term of the
    divergence is a difference of prefix sums, so all candidates are evaluated at once.
    """
    bins = np.asarray(counts, dtype=np.float64).copy()
    n = len(bins)
    if n < 2 or start_bin > n:
        raise ValueError(f"histogram of {n} bins has no candidate at or above start_bin={start_bin}")
    bins[0] = bins[1]
    total = bins.sum()
    cand = np.arange(start_bin, n + 1, dtype=np.int64)

    csum = np.concatenate(([0.0], np.cumsum(bins)))
    cnz = np.concatenate(([0], np.cumsum(bins > 0)))
    cxlogx = np.concatenate(([0.0], np.cumsum(_xlogx(bins))))

    cells = np.arange(levels + 1, dtype=np.int64)
    kl = np.concatenate([_kl_block(cand[lo : lo + _KL_BLOCK], bins, total, csum, cnz, cxlogx, cells, levels)
                         for lo in range(0, len(cand), _KL_BLOCK)])
    return cand, kl


def _kl_block(cand, bins, total, csum, cnz, cxlogx, cells, levels) -> np.ndarray:
    """KL of the candidates ``cand`` (a block small enough for its (block, levels) arrays to stay in cache)."""
    starts = (cells[None, :] * cand[:, None] + levels - 1) // levels  # ceil(g * i / levels), (m, levels+1)
    cell_sum = csum[starts[:, 1:]] - csum[starts[:, :-1]]
    cell_nz = cnz[starts[:, 1:]] - cnz[starts[:, :-1]]
    filled = cell_nz > 0
    safe_nz = np.where(filled, cell_nz, 1)
    safe_sum = np.where(filled, cell_sum, 1.0)
    # sum over kept bins of P_j log Q_j before the tail is folded in: each cell contributes S log(S/N)
    cross = np.where(filled, cell_sum * np.log(safe_sum / safe_nz), 0.0).sum(axis=1)

    tail = total - csum[cand]
    last = bins[cand - 1]
    rows = np.arange(len(cand))
    last_cell = ((cand - 1) * levels) // cand
    q_last = safe_sum[rows, last_cell] / safe_nz[rows, last_cell]
    cross = cross + np.where(last > 0, tail * np.log(np.where(last > 0, q_last, 1.0)), 0.0)
    plogp = cxlogx[cand - 1] + _xlogx(last + tail)

    kept = csum[cand]
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = (plogp - cross) / total - math.log(total) + np.log(kept)
    kl = np.where((last == 0) & (tail > 0), np.inf, kl)
    return np.where(kept > 0, kl, np.inf)


def amax_entropy(counts: np.ndarray, width: float, start_bin: int, levels: int) -> float:
    """amax minimising the KL divergence (see ``kl_divergences``); the largest of tied minima wins."""
    counts = np.asarray(counts)
    if counts.sum() <= 0:
        return 0.0
    start_bin = min(start_bin, len(counts))
    cand, kl = kl_divergences(counts, start_bin, levels)
    best = len(kl) - 1 - int(np.argmin(kl[::-1]))
    return float(cand[best] * width)


def expected_mse(
    counts: np.ndarray, width: float, candidates: np.ndarray, max_bound: int, zero_count: int = 0
) -> np.ndarray:
    """Mean squared quantization error of the histogrammed data for each candidate amax (units^2).

    Args:
        counts, width: the histogram (see module docstring).
        candidates: thresholds in bins (amax = candidate * width), each in 1 .. len(counts).
        max_bound: largest quantized magnitude (127 for signed int8); step s = amax / max_bound.
        zero_count: exact zeros inside ``counts[0]``; a point mass at 0 quantizes without error.

    Values are modelled as uniform inside each bin and integrated exactly, not collapsed to bin
    centres: near the smallest candidates a quantization step is about one bin wide, where centres
    alias with the grid. With the bin edges below amax written as e = k*s + r (|r| <= s/2),
    ``integral_0^e (x - Q(x))^2 dx = e*s^2/12 + s^3*psi(r/s)``, psi(v) = v^3/3 - v/12, so the error is

    * s^2/12 per value below amax (the uniform-rounding term, a prefix count),
    * plus an aliasing correction ``s^3/width * sum_k psi(v_k) * (counts[k-1] - counts[k])`` over the
      edges below amax: the only (candidates x bins) array, ~10 elementwise operations,
    * plus the clipping error ``sum_j counts[j] * ((centre_j - amax)^2 + width^2/12)`` over bins above
      amax, from prefix sums of the first two moments.
    """
    c = np.asarray(counts, dtype=np.float64).copy()
    total = c.sum()
    cand = np.asarray(candidates, dtype=np.int64)
    if total <= 0:
        return np.zeros(len(cand), dtype=np.float64)
    c[0] -= zero_count
    n = len(c)
    amax = cand * width
    step = amax / max_bound

    def prefix(v: np.ndarray) -> np.ndarray:
        return np.concatenate(([0.0], np.cumsum(v)))

    centres = (np.arange(n) + 0.5) * width
    n0, n1, n2 = prefix(c), prefix(c * centres), prefix(c * centres * centres)
    above0, above1, above2 = n0[n] - n0[cand], n1[n] - n1[cand], n2[n] - n2[cand]
    clip = above2 - 2.0 * amax * above1 + amax * amax * above0 + above0 * width * width / 12.0

    d_counts = np.concatenate(([0.0], c)) - np.concatenate((c, [0.0]))  # counts[k-1] - counts[k]
    k = np.arange(n + 1, dtype=np.float64)
    alias = np.empty(len(cand), dtype=np.float64)
    rows = max(1, min(_MSE_BLOCK_ROWS, _MSE_CHUNK_ELEMENTS // (n + 1)))
    for lo in range(0, len(cand), rows):  # cache-sized blocks; each block is one array expression
        block = cand[lo : lo + rows]
        top = int(block.max()) + 1  # edges at or above amax have r = 0, psi = 0: only k < top matter
        i = block.astype(np.float64)[:, None]
        u = np.minimum(k[None, :top], i)
        u *= max_bound / i  # edge position in quantization steps
        u -= np.floor(u + 0.5)  # v = r / s in [-1/2, 1/2)
        psi = u * u
        psi *= 1.0 / 3.0
        psi -= 1.0 / 12.0
        psi *= u
        alias[lo : lo + rows] = psi @ d_counts[:top]
    rounding = step * step / 12.0 * n0[cand] + step**3 / width * alias
    return (rounding + clip) / total


def amax_mse(
    counts: np.ndarray, width: float, start_bin: int, max_bound: int, zero_count: int = 0
) -> float:
    """amax (a bin edge, start_bin .. n bins) minimising ``expected_mse``; smallest amax wins ties.

    More than 512 candidates are searched on a strided grid first, then bin by bin within one
    stride of the grid's best, so the cost stays O(512 x bins) however far the range grew.
    """
    counts = np.asarray(counts)
    n = len(counts)
    if counts.sum() <= 0:
        return 0.0
    start_bin = min(start_bin, n)
    cand = np.arange(start_bin, n + 1, dtype=np.int64)
    stride = max(1, math.ceil(len(cand) / _MSE_MAX_CANDIDATES))
    if stride > 1:
        coarse = cand[::stride]
        best = int(coarse[np.argmin(expected_mse(counts, width, coarse, max_bound, zero_count))])
        cand = np.arange(max(start_bin, best - stride), min(n, best + stride) + 1, dtype=np.int64)
    err = expected_mse(counts, width, cand, max_bound, zero_count)
    return float(cand[int(np.argmin(err))] * width)
