"""Calibrator math against independent oracles.

* pytorch-quantization 2.1.3's HistogramCalibrator for entropy and percentile (same data, same bins);
* brute force for mse: fake-quantize the actual data at many amax values and take the true optimum
  (pytorch-quantization's own mse search calls .cuda() and cannot run here);
* closed forms: uniform data, a two-point distribution, exact merges of a grown histogram.

pytorch-quantization's entropy search is an O(bins^2) Python loop, so most oracle cases use 1024
bins (the semantics do not depend on the bin count) and the tensors stay at 200k elements.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch

from quantkit.calibrate import search
from quantkit.calibrate.histogram import HistogramCollector, MaxCollector
from quantkit.calib_methods import CalibMethod, MethodSettings
from quantkit.errors import CalibrationError, UsageError

pq_calib = pytest.importorskip("pytorch_quantization.calib", reason="pytorch-quantization is the oracle")

N = 200_000


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _distributions() -> dict[str, list[torch.Tensor]]:
    g = _gen(0)
    laplace = torch.distributions.Laplace(0.0, 1.0)
    torch.manual_seed(1)
    lap = laplace.sample((N,))
    heavy = torch.randn(N, generator=g)
    heavy[torch.randperm(N, generator=g)[:30]] = 20.0 + 30.0 * torch.rand(30, generator=g)
    return {
        "gaussian": [torch.randn(N, generator=g)],
        "laplace": [lap],
        "relu_gaussian": [torch.relu(torch.randn(4, N // 4, generator=g))],
        "heavy_outliers": [heavy],
        # the range grows twice after the first batch, shrinks once: exercises bin appending
        "growing": [torch.randn(N // 4, generator=g) * s for s in (1.0, 1.4, 0.5, 1.8)],
    }


DISTS = _distributions()


def _collect(batches, num_bins, name="t"):
    ours = HistogramCollector(name, num_bins=num_bins)
    theirs = pq_calib.HistogramCalibrator(8, None, False, num_bins=num_bins)
    for b in batches:
        ours.collect(b)
        theirs.collect(b)
    return ours, theirs


@pytest.mark.parametrize("name", sorted(DISTS))
def test_entropy_and_percentile_match_pytorch_quantization(name):
    num_bins = 2048 if name == "gaussian" else 1024
    batches = DISTS[name]
    ours, theirs = _collect(batches, num_bins)
    _, width = ours.histogram()
    allx = torch.cat([b.flatten() for b in batches])

    ent = ours.compute_amax(MethodSettings(CalibMethod.ENTROPY))
    ent_ref = float(theirs.compute_amax("entropy"))
    assert abs(ent - ent_ref) <= 1.001 * width, (ent, ent_ref, width)

    for p in (99.9, 99.99):
        pct = ours.compute_amax(MethodSettings(CalibMethod.PERCENTILE, percentile=p))
        pct_ref = float(theirs.compute_amax("percentile", percentile=p))
        # pytorch-quantization returns the lower edge of the bin holding the percentile; we interpolate
        assert abs(pct - pct_ref) <= 1.001 * width, (p, pct, pct_ref, width)
        exact = float(np.quantile(allx.abs().double().numpy(), p / 100.0))
        assert abs(pct - exact) <= width, (p, pct, exact)

    assert ours.amax_max() == float(allx.abs().max())
    counts, _ = ours.histogram()
    assert counts.sum() == allx.numel()  # every value counted once, nothing else stored


def test_entropy_unsigned_matches_pytorch_quantization():
    batches = DISTS["relu_gaussian"]
    ours = HistogramCollector("relu", num_bins=1024)
    theirs = pq_calib.HistogramCalibrator(8, None, True, num_bins=1024)
    for b in batches:
        ours.collect(b)
        theirs.collect(b)
    _, width = ours.histogram()
    ent = ours.compute_amax(MethodSettings(CalibMethod.ENTROPY, unsigned=True))
    assert abs(ent - float(theirs.compute_amax("entropy"))) <= 1.001 * width


def test_kl_vectorised_equals_reference_loop_on_sparse_histogram():
    """Empty bins, empty cells (start_bin < levels) and folded tails give the same divergences."""
    from collections import Counter

    from scipy.stats import entropy

    rng = np.random.default_rng(3)
    counts = rng.poisson(rng.uniform(0, 20, size=300))
    counts[rng.random(300) < 0.25] = 0
    levels, start = 16, 10
    cand, kl = search.kl_divergences(counts, start, levels)
    bins = counts.astype(np.float64)
    bins[0] = bins[1]
    for i, got in zip(cand, kl):  # plain re-statement of TensorRT's procedure, bin by bin
        cell = (np.arange(i) * levels) // i
        nonzero = bins[:i] > 0
        cell_sum, cell_nz = Counter(), Counter()
        for j in range(i):
            if nonzero[j]:
                cell_sum[cell[j]] += bins[j]
                cell_nz[cell[j]] += 1
        q = np.array([cell_sum[cell[j]] / cell_nz[cell[j]] if nonzero[j] else 0.0 for j in range(i)])
        p = bins[:i].copy()
        p[-1] += bins[i:].sum()
        want = entropy(p, q)
        assert (math.isinf(got) and math.isinf(want)) or abs(got - want) < 1e-12, (i, got, want)


def _true_mse(x: torch.Tensor, amax: float) -> float:
    """What TensorRT does to the data: int8 [-128, 127], scale amax / 127."""
    q = torch.fake_quantize_per_tensor_affine(x, amax / 127.0, 0, -128, 127)
    return float(((q - x) ** 2).mean())


@pytest.mark.parametrize("name", sorted(DISTS))
def test_mse_amax_is_near_brute_force_optimum(name):
    x = torch.cat([b.flatten() for b in DISTS[name]])
    col = HistogramCollector(name)
    for b in DISTS[name]:
        col.collect(b)
    amax = col.compute_amax(MethodSettings(CalibMethod.MSE))
    top = float(x.abs().max())
    coarse = np.linspace(top * 128 / 2048, top, 80)
    c_best = coarse[int(np.argmin([_true_mse(x, float(a)) for a in coarse]))]
    step = coarse[1] - coarse[0]
    fine = np.linspace(max(coarse[0], c_best - 2 * step), min(top, c_best + 2 * step), 80)  # < 1 bin apart
    best = min(_true_mse(x, float(a)) for a in np.concatenate([coarse, fine]))
    assert _true_mse(x, amax) <= 1.01 * best, (amax, _true_mse(x, amax), best)


def test_expected_mse_model_tracks_true_error():
    x = DISTS["laplace"][0]
    col = HistogramCollector("laplace")
    col.collect(x)
    counts, width = col.histogram()
    cand = np.arange(150, 2049, 150)
    model = search.expected_mse(counts, width, cand, 127, col.zero_count)
    for c, m in zip(cand, model):
        # symmetric [-127, 127] is what the |x| histogram models
        true = float(((torch.fake_quantize_per_tensor_affine(x, c * width / 127, 0, -127, 127) - x) ** 2).mean())
        assert abs(m / true - 1) < 0.02, (c, m, true)


def test_expected_mse_equals_integral_of_uniform_in_bin_model():
    """The closed form (rounding + aliasing + clipping terms) against direct numerical integration
    of the same model: each bin's count spread uniformly, sampled at 512 midpoints per bin. The
    aliasing term matters here: the data sits below small candidates, where a step is ~1 bin."""
    rng = np.random.default_rng(7)
    counts = np.zeros(2048, dtype=np.int64)
    counts[:200] = rng.integers(0, 1000, size=200)
    width, k = 0.01, 512
    cand = np.array([128, 131, 150, 170, 199, 200, 260, 2048])
    got = search.expected_mse(counts, width, cand, 127)
    pos = (np.arange(200)[:, None] + (np.arange(k)[None, :] + 0.5) / k) * width
    x = torch.from_numpy(pos.ravel())
    weights = torch.from_numpy(np.repeat(counts[:200] / k, k))
    for c, g in zip(cand, got):
        q = torch.fake_quantize_per_tensor_affine(x.float(), float(c * width / 127), 0, -127, 127).double()
        want = float((weights * (q - x) ** 2).sum() / counts.sum())
        assert abs(g / want - 1) < 2e-3, (c, g, want)


def test_uniform_closed_forms():
    x = torch.linspace(-1.0, 1.0, 400_001)  # |x| uniform on [0, 1]
    col = HistogramCollector("uniform")
    col.collect(x)
    _, width = col.histogram()
    assert col.amax_max() == 1.0
    assert abs(col.compute_amax(MethodSettings(CalibMethod.PERCENTILE, percentile=99.0)) - 0.99) < width
    assert abs(col.compute_amax(MethodSettings(CalibMethod.PERCENTILE, percentile=50.0)) - 0.5) < width
    # every bin full: the candidate keeping all bins quantizes to itself, KL = 0, any clip is worse
    assert abs(col.compute_amax(MethodSettings(CalibMethod.ENTROPY)) - 1.0) <= width
    # mse(a) = a^3 / (12 * 127^2) + (1 - a)^3 / 3  ->  minimum at a = 254 / 255
    assert abs(col.compute_amax(MethodSettings(CalibMethod.MSE)) - 254 / 255) <= width


def test_two_point_distribution():
    # 99 % exact zeros, 1 % at +-3: the zeros are a point mass, the 3s need no clipping
    x = torch.zeros(100_000)
    x[:500], x[500:1000] = 3.0, -3.0
    col = HistogramCollector("two_point")
    col.collect(x)
    _, width = col.histogram()
    assert col.zero_count == 99_000
    assert col.compute_amax(MethodSettings(CalibMethod.PERCENTILE, percentile=98.0)) == 0.0
    assert abs(col.compute_amax(MethodSettings(CalibMethod.PERCENTILE, percentile=99.9)) - 3.0) <= width
    assert col.compute_amax(MethodSettings(CalibMethod.MAX)) == 3.0
    assert abs(col.compute_amax(MethodSettings(CalibMethod.MSE)) - 3.0) <= width
    assert _true_mse(x, col.compute_amax(MethodSettings(CalibMethod.MSE))) < 1e-5


def test_range_growth_merges_bins_exactly():
    """Past max_bins, adjacent bins merge by an integer factor: the result equals binning all the
    data at the final width directly (values sit mid-bin so float rounding cannot move them)."""
    w0 = 1.0 / 16
    first = torch.cat([(torch.arange(16) + 0.5) * w0, torch.tensor([1.0])])
    second = (torch.arange(80) + 0.5) * w0
    second[-1] = 80 * w0 - w0 / 4  # max 4.984 -> 80 fine bins > max_bins=32 -> merge by 3
    col = HistogramCollector("grow", num_bins=16, max_bins=32)
    col.collect(first)
    col.collect(second)
    counts, width = col.histogram()
    assert width == pytest.approx(3 * w0, rel=1e-12)
    allx = torch.cat([first, second]).double().numpy()
    want = np.bincount(np.ceil(allx / width).astype(np.int64) - 1, minlength=len(counts))
    np.testing.assert_array_equal(counts, want)


def test_mse_on_wide_histogram_refines_strided_search():
    """Past 512 candidates the search is strided, then refined: on a grown histogram (~5000 bins,
    stride 10) the result must be the exhaustive optimum of the same error model (or tie with it)."""
    g = _gen(9)
    col = HistogramCollector("wide", num_bins=2048)
    col.collect(torch.randn(50_000, generator=g))
    col.collect(torch.randn(50_000, generator=g) * 3.5)
    counts, width = col.histogram()
    assert len(counts) > 4096
    cand = np.arange(128, len(counts) + 1)
    err = search.expected_mse(counts, width, cand, 127, col.zero_count)
    got = search.amax_mse(counts, width, 128, 127, col.zero_count)
    got_err = search.expected_mse(counts, width, np.array([round(got / width)]), 127, col.zero_count)[0]
    assert got_err <= err.min() * (1 + 1e-9), (got, cand[err.argmin()] * width)


def test_growth_appends_bins_of_first_width():
    g = _gen(5)
    col = HistogramCollector("g", num_bins=256)
    col.collect(torch.rand(1000, generator=g))
    _, w_first = col.histogram()
    col.collect(torch.rand(1000, generator=g) * 3)
    counts, w = col.histogram()
    assert w == w_first and len(counts) >= 3 * 256 - 3 and counts.sum() == 2000


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_data_names_the_tensor(bad):
    x = torch.randn(100)
    x[7] = bad
    with pytest.raises(CalibrationError, match="backbone.stem.conv"):
        HistogramCollector("backbone.stem.conv").collect(x)
    with pytest.raises(CalibrationError, match="head.w"):
        MaxCollector(0, name="head.w").collect(x.reshape(10, 10))


def test_all_zero_and_empty():
    col = HistogramCollector("dead")
    with pytest.raises(CalibrationError, match="dead"):
        col.compute_amax(MethodSettings(CalibMethod.MAX))
    col.collect(torch.zeros(3, 4))
    assert all(v == 0.0 for v in col.all_amax().values())
    col.collect(torch.full((5,), 2.0))  # data after zero batches: width comes from this batch
    assert col.amax_max() == 2.0 and col.zero_count == 12 and col.num_values == 17


def test_all_amax_keys_and_state_round_trip():
    col = HistogramCollector("rt")
    for b in DISTS["growing"]:
        col.collect(b)
    res = col.all_amax()
    assert list(res) == ["max", "percentile_99.9", "percentile_99.99", "percentile_99.999", "entropy", "mse"]
    assert res["percentile_99.9"] < res["percentile_99.99"] < res["percentile_99.999"] <= res["max"]
    state = json.loads(json.dumps(col.state_dict(), allow_nan=False))
    again = HistogramCollector()
    again.load_state_dict(state)
    assert again.all_amax() == res
    state["counts"][3] += 1  # counts no longer add up to num_values
    with pytest.raises(CalibrationError, match="unusable"):
        HistogramCollector("x").load_state_dict(state)


def test_half_precision_input():
    x = DISTS["gaussian"][0]
    a, b = HistogramCollector(), HistogramCollector()
    a.collect(x.half())
    b.collect(x.half().float())
    assert a.all_amax() == b.all_amax()


def test_max_collector_matches_pytorch_quantization():
    g = _gen(2)
    conv_w = torch.randn(16, 8, 3, 3, generator=g)
    ours = MaxCollector(axis=0, name="conv")
    ours.collect(conv_w)
    theirs = pq_calib.MaxCalibrator(8, 0, False)
    theirs.collect(conv_w)
    got = ours.compute_amax()
    assert got.shape == (16, 1, 1, 1)
    assert torch.equal(got, theirs.compute_amax().reshape(16, 1, 1, 1))

    lin = MaxCollector(axis=0)
    lin.collect(torch.randn(10, 4, generator=g))
    assert lin.compute_amax().shape == (10, 1)

    per_tensor = MaxCollector(axis=None)
    per_tensor.collect(conv_w)
    per_tensor.collect(conv_w * 0.5)
    assert per_tensor.compute_amax().shape == () and float(per_tensor.compute_amax()) == float(conv_w.abs().max())

    state = json.loads(json.dumps(ours.state_dict()))
    back = MaxCollector()
    back.load_state_dict(state)
    assert torch.equal(back.compute_amax(), got)


def test_method_parsing_and_settings_validation():
    assert CalibMethod.parse("entropy") is CalibMethod.ENTROPY
    with pytest.raises(UsageError):  # parsed as recipes spell it: one spelling everywhere
        CalibMethod.parse("Entropy")
    assert CalibMethod.parse(CalibMethod.MSE) is CalibMethod.MSE
    with pytest.raises(UsageError, match="max, percentile, entropy, mse"):
        CalibMethod.parse("kl")
    assert MethodSettings("percentile").method is CalibMethod.PERCENTILE
    assert MethodSettings(CalibMethod.MAX).max_bound == 127
    assert MethodSettings(CalibMethod.MAX, unsigned=True).levels == 256
    for bad in ({"percentile": 0.0}, {"percentile": 100.5}, {"start_bin": 4096}, {"num_bits": 1}):
        with pytest.raises(UsageError):
            MethodSettings(CalibMethod.ENTROPY, **bad)


def _best_ms(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)  # min of repeats: the machine is shared, noise only ever adds time


def test_report_search_time_on_a_feature_map():
    """Entropy + mse search on one 8x64x80x80 activation, quantkit vs pytorch-quantization.

    Timings are printed (run with -s), never asserted; the amax agreement is.
    """
    g = _gen(11)
    scale = torch.rand(1, 64, 1, 1, generator=g) * 2 + 0.1
    x = torch.relu(torch.randn(8, 64, 80, 80, generator=g) * scale + 0.2)
    collect_ours = collect_ref = math.inf
    for _ in range(3):  # interleaved so both see the same load on the shared machine
        collect_ours = min(collect_ours, _best_ms(lambda: HistogramCollector("fmap").collect(x), repeat=1))
        collect_ref = min(collect_ref, _best_ms(lambda: pq_calib.HistogramCalibrator(8, None, False).collect(x), 1))
    ours = HistogramCollector("fmap")
    theirs = pq_calib.HistogramCalibrator(8, None, False)
    ours.collect(x)
    theirs.collect(x)
    entropy_ours = _best_ms(lambda: ours.compute_amax(MethodSettings(CalibMethod.ENTROPY)))
    mse_ours = _best_ms(lambda: ours.compute_amax(MethodSettings(CalibMethod.MSE)))
    entropy_ref = _best_ms(lambda: theirs.compute_amax("entropy"), repeat=1)
    print(
        f"\n[8x64x80x80] collect: quantkit {collect_ours:.1f} ms, pytorch-quantization {collect_ref:.1f} ms"
        f"\n[8x64x80x80] entropy: quantkit {entropy_ours:.1f} ms, pytorch-quantization {entropy_ref:.1f} ms"
        f"\n[8x64x80x80] mse: quantkit {mse_ours:.1f} ms (pytorch-quantization's needs CUDA)"
    )
    ent = ours.compute_amax(MethodSettings(CalibMethod.ENTROPY))
    assert abs(ent - float(theirs.compute_amax("entropy"))) <= 1.001 * ours.histogram()[1]


@pytest.mark.parametrize("seed", range(6))
def test_blocked_searches_equal_one_block(monkeypatch, seed):
    """The entropy and mse searches run over cache-sized blocks of candidates (the mse blocks also stop at
    their largest candidate's edge). One block over everything is the plain vectorised formula: the KL
    curve must be bit-identical and both amaxes equal."""
    g = _gen(100 + seed)
    n = 50_000
    x = [torch.randn(n, generator=g), torch.relu(torch.randn(n, generator=g)),
         torch.distributions.StudentT(3.0).sample((n,))][seed % 3]
    col = HistogramCollector("blocks", num_bins=2048)
    col.collect(x)
    if seed >= 3:
        col.collect(x * 2.3)  # grown histogram: more candidates than one default block
    counts, width = col.histogram()
    blocked_kl = search.kl_divergences(counts, 128, 128)[1]
    blocked = (search.amax_entropy(counts, width, 128, 128), search.amax_mse(counts, width, 128, 127, col.zero_count))
    monkeypatch.setattr(search, "_KL_BLOCK", 1 << 30)
    monkeypatch.setattr(search, "_MSE_BLOCK_ROWS", 1 << 30)
    monkeypatch.setattr(search, "_MSE_CHUNK_ELEMENTS", 1 << 40)
    np.testing.assert_array_equal(blocked_kl, search.kl_divergences(counts, 128, 128)[1])
    assert blocked == (search.amax_entropy(counts, width, 128, 128),
                       search.amax_mse(counts, width, 128, 127, col.zero_count))


def test_shared_batch_stats_reuse_only_the_same_unmodified_tensor():
    """Collectors sharing a SharedBatchStats memo end with exactly the histograms of unshared ones, including when
    a tensor is modified in place between two quantizers (version counter) or freed and its memory reused."""
    from quantkit.calibrate.histogram import SharedBatchStats

    shared = SharedBatchStats()
    a, b = HistogramCollector("a", shared=shared), HistogramCollector("b", shared=shared)
    ra, rb = HistogramCollector("ra"), HistogramCollector("rb")
    g = _gen(7)
    with torch.no_grad():
        for scale in (1.0, 3.0, 0.5):
            x = torch.randn(20_000, generator=g) * scale
            a.collect(x)
            ra.collect(x)
            x.add_(0.0).mul_(2.0)  # in place: b must see the new values, not a's memo
            b.collect(x)
            rb.collect(x)
            del x
            y = torch.randn(20_000, generator=g)  # may land at the freed address: a fresh entry, not x's
            b.collect(y)
            rb.collect(y)
    for got, want in ((a, ra), (b, rb)):
        np.testing.assert_array_equal(got.histogram()[0], want.histogram()[0])
        assert got.histogram()[1] == want.histogram()[1] and got.amax_max() == want.amax_max()
    del y
    assert len(shared) == 0  # entries go with their tensors
