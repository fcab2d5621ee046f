"""Paired bootstrap of the benchmark: the vectorised resampling against explicit resampling, CIs, pairing."""
import numpy as np
import pytest

from nnunet_ssl import stats


def _cells(values, cases=("a", "b", "c")):
    """seed -> cell with per-case Dice lists (2 classes: the value and the value itself)."""
    return {s: {"seed": s, "mean_dice": float(np.mean(v)),
                "per_case": {c: [float(x), float(x)] for c, x in zip(cases, v)}} for s, v in enumerate(values)}


def test_resampled_means_equal_explicit_resampling():
    rng = np.random.default_rng(1)
    v = rng.random((5, 7))
    for _ in range(20):
        si, ci = rng.integers(0, 5, 5), rng.integers(0, 7, 7)
        explicit = v[si][:, ci].mean()
        got = stats.resampled_means(v, np.bincount(si, minlength=5)[None].astype(float),
                                    np.bincount(ci, minlength=7)[None].astype(float))
        assert got[0] == pytest.approx(explicit, abs=1e-12)


def test_bootstrap_ci_matches_a_slow_reference_and_covers_the_mean():
    rng = np.random.default_rng(0)
    v = rng.normal(0.03, 0.1, (5, 40))
    mean, low, high = stats.bootstrap_mean_ci(v, n_boot=20000, seed=3)
    ref = np.empty(20000)
    r2 = np.random.default_rng(7)
    for b in range(ref.size):  # slow reference: fancy-indexed copies
        ref[b] = v[r2.integers(0, 5, 5)][:, r2.integers(0, 40, 40)].mean()
    assert mean == pytest.approx(v.mean())
    assert low == pytest.approx(np.quantile(ref, 0.025), abs=0.006)
    assert high == pytest.approx(np.quantile(ref, 0.975), abs=0.006)
    assert low < mean < high
    # a constant difference has a CI of width 0; NaN is an error, never a silent number
    assert stats.bootstrap_mean_ci(np.full((3, 4), 0.2))[1:] == pytest.approx((0.2, 0.2))
    with pytest.raises(ValueError):
        stats.bootstrap_mean_ci(np.array([[np.nan, 1.0]]))


def test_paired_difference_uses_shared_seeds_cases_and_counts_wins():
    m = _cells([[0.8, 0.7, 0.9], [0.6, 0.6, 0.6], [0.9, 0.9, 0.9]])
    r = _cells([[0.7, 0.7, 0.7], [0.7, 0.7, 0.7]])  # seed 2 has no reference: left out
    d = stats.paired_difference(m, r)
    assert (d.n_seeds, d.n_cases, d.wins) == (2, 3, 1)
    assert d.mean == pytest.approx(np.mean([[0.1, 0.0, 0.2], [-0.1, -0.1, -0.1]]))
    assert d.low <= d.mean <= d.high
    # cells without per-case values fall back to seed means
    for c in list(m.values()) + list(r.values()):
        del c["per_case"]
    d = stats.paired_difference(m, r)
    assert d.n_cases == 0 and d.mean == pytest.approx(np.mean([0.1, -0.1]))
    assert stats.paired_difference(m, {}) is None
