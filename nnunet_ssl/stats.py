"""Paired comparisons of benchmark cells: mean difference, 95 % bootstrap CI and win count.

Two runs are *paired* when they share the seed (hence the labelled subset) and are scored on the same test cases.
For a method M and a reference R at one k, ``d[s, c] = Dice_M(s, c) - Dice_R(s, c)`` for seed s and test case c
(per-case Dice averaged over the foreground classes). The reported difference is the mean of ``d``; its 95 % CI
comes from a two-level bootstrap that resamples seeds *and* test cases with replacement (both are sources of
variance the claim must survive: another labelled subset, other patients). Where cells hold no per-case values,
only seeds are resampled. The win count is the number of seeds whose mean over cases favours M.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class PairedDifference:
    mean: float
    low: float          # 2.5 % bootstrap quantile
    high: float         # 97.5 % bootstrap quantile
    wins: int           # seeds whose case-mean difference is > 0
    n_seeds: int
    n_cases: int        # 0 where only seed means were available

    def fmt(self) -> str:
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}] {self.wins}/{self.n_seeds}"


def bootstrap_mean_ci(values: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95):
    """Mean of a (seeds x cases) array (or of a vector of seed values) with a two-level bootstrap CI.

    Resamples rows (seeds) and, for 2-D input, columns (cases) independently with replacement; vectorised: the
    resampled means are ``W_s^T V W_c / (S C)`` with multinomial count vectors W."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 1:
        v = v[:, None]
    if v.size == 0 or np.isnan(v).any():
        raise ValueError("bootstrap_mean_ci needs a non-empty array without NaN")
    s, c = v.shape
    rng = np.random.default_rng(seed)
    ws = rng.multinomial(s, np.full(s, 1.0 / s), size=n_boot).astype(np.float64)           # (B, S)
    wc = (rng.multinomial(c, np.full(c, 1.0 / c), size=n_boot).astype(np.float64) if c > 1
          else np.ones((n_boot, 1)))                                                      # (B, C)
    means = resampled_means(v, ws, wc)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(v.mean()), float(low), float(high)


def resampled_means(v: np.ndarray, seed_counts: np.ndarray, case_counts: np.ndarray) -> np.ndarray:
    """Mean of v[seeds][:, cases] for each bootstrap draw, given how often each seed (B x S) and each case (B x C)
    was drawn: sum_sc n_s v_sc m_c / (S C), one einsum for all draws instead of B fancy-indexed copies."""
    s, c = v.shape
    return np.einsum("bs,sc,bc->b", seed_counts, v, case_counts) / (s * c)


def case_matrix(cells: Sequence[dict]) -> Optional[np.ndarray]:
    """(seeds x cases) per-case mean Dice of cells sorted by seed; None unless every cell has the same cases."""
    per_case = [c.get("per_case") for c in cells]
    if not per_case or any(p is None for p in per_case):
        return None
    cases = sorted(per_case[0])
    if any(sorted(p) != cases for p in per_case):
        return None
    return np.array([[np.nanmean(p[k]) for k in cases] for p in per_case], dtype=np.float64)


def paired_difference(method_cells: Dict[int, dict], reference_cells: Dict[int, dict], n_boot: int = 2000,
                      seed: int = 0) -> Optional[PairedDifference]:
    """Paired difference over the seeds both have (seed -> cell row); None if they share no seed."""
    seeds = sorted(set(method_cells) & set(reference_cells))
    if not seeds:
        return None
    m = case_matrix([method_cells[s] for s in seeds])
    r = case_matrix([reference_cells[s] for s in seeds])
    if m is not None and r is not None and m.shape == r.shape:
        d = m - r
        per_seed = d.mean(axis=1)
        n_cases = d.shape[1]
    else:  # cells from before per-case scores were kept: seed means only
        per_seed = np.array([method_cells[s]["mean_dice"] - reference_cells[s]["mean_dice"] for s in seeds])
        d, n_cases = per_seed, 0
    mean, low, high = bootstrap_mean_ci(d, n_boot, seed)
    return PairedDifference(mean, low, high, int((per_seed > 0).sum()), len(seeds), n_cases)


def mean_ci(cells: Sequence[dict], n_boot: int = 2000, seed: int = 0):
    """Mean Dice of a method at one k with its bootstrap CI (seeds and cases resampled)."""
    m = case_matrix(sorted(cells, key=lambda c: c["seed"]))
    return bootstrap_mean_ci(m if m is not None else np.array([c["mean_dice"] for c in cells]), n_boot, seed)
