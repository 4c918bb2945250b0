"""Statistics for comparing methods: mean ± std, 95 % intervals, paired tests.

Shared by `python -m lora_diffusion.compare` (seed studies) and `bench quality`.

    mean_std(xs)                      -> (mean, sample std)          std 0.0 for one value
    ci95(xs)                          -> (lo, hi)                    Student-t interval of the mean
    paired_t_test(a, b)               -> {t, p, n, mean_diff, reason}   over seeds: a[i], b[i] share seed i
    paired_bootstrap(sa, sb, ...)     -> {diff, lo, hi, p, n, n_resamples, seed}
                                         over per-example scores of two systems on the same examples

Conventions: differences are always a − b (the first system minus the second); p-values are
two-sided; a test that is not defined (fewer than 2 pairs, zero variance of the differences)
returns p = nan and says why in `reason` instead of inventing a number. Inputs of different
lengths, empty inputs where a value is needed, and non-finite values raise ValueError.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from scipy import stats as _sps


def _as_array(xs: Sequence[float], name: str) -> np.ndarray:
    arr = np.asarray(list(xs), dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a flat list of numbers, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        bad = [float(x) for x in arr[~np.isfinite(arr)]][:3]
        raise ValueError(f"{name}: values must be finite numbers, got {bad}")
    return arr


def _paired(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    xa, xb = _as_array(a, "a"), _as_array(b, "b")
    if xa.shape != xb.shape:
        raise ValueError(f"paired samples must have the same length: a has {xa.size}, b has {xb.size}")
    return xa, xb


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1); std is 0.0 for one value, (nan, nan) for none."""
    arr = _as_array(xs, "xs")
    if arr.size == 0:
        return float("nan"), float("nan")
    if arr.size == 1:
        return float(arr[0]), 0.0
    return float(arr.mean()), float(arr.std(ddof=1))


def ci95(xs: Sequence[float]) -> tuple[float, float]:
    """95 % Student-t confidence interval of the mean: mean ± t(0.975, n−1) · s / √n.

    (nan, nan) for fewer than two values (no spread to estimate); (mean, mean) for zero spread.
    """
    arr = _as_array(xs, "xs")
    if arr.size < 2:
        return float("nan"), float("nan")
    mu, sd = float(arr.mean()), float(arr.std(ddof=1))
    half = float(_sps.t.ppf(0.975, arr.size - 1)) * sd / math.sqrt(arr.size)
    return mu - half, mu + half


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Two-sided paired t-test of mean(a − b) = 0 (a[i] and b[i] measured under the same seed i).

    Returns {t, p, n, mean_diff, reason}; reason is None when the test is defined. Fewer than two
    pairs or differences with zero variance (the t statistic divides by their spread) give
    t = p = nan and a reason.
    """
    xa, xb = _paired(a, b)
    n = int(xa.size)
    d = xa - xb
    mean_diff = float(d.mean()) if n else float("nan")
    out: dict[str, Any] = {"t": float("nan"), "p": float("nan"), "n": n, "mean_diff": mean_diff, "reason": None}
    if n < 2:
        out["reason"] = f"needs at least 2 pairs (seeds), got {n}"
        return out
    sd = float(d.std(ddof=1))
    # relative tolerance: differences equal up to rounding count as zero variance
    if sd <= 1e-12 * max(1.0, float(np.abs(d).max())):
        out["reason"] = (f"the differences have zero variance (every pair differs by {mean_diff:g}): "
                         "the t statistic is not defined")
        return out
    t = mean_diff / (sd / math.sqrt(n))
    out["t"] = float(t)
    out["p"] = float(2.0 * _sps.t.sf(abs(t), n - 1))
    return out


def paired_bootstrap(correct_a: Sequence[float], correct_b: Sequence[float], n_resamples: int = 10000,
                     seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap over examples: per-example scores (0/1 correctness or floats) of two systems
    on the same examples, in the same order.

    diff = mean(a) − mean(b). Each resample draws n example indices with replacement and takes the
    same indices from both systems (that is the pairing). lo, hi = the 2.5 / 97.5 percentiles of the
    resampled differences. p (two-sided) tests diff = 0 against the resampled differences shifted to
    mean zero: (1 + #{|d* − diff| ≥ |diff|}) / (n_resamples + 1) — never 0, and 1.0 when the systems
    agree on every example.
    """
    xa, xb = _paired(correct_a, correct_b)
    n = int(xa.size)
    if n == 0:
        raise ValueError("paired_bootstrap: no examples (both score lists are empty)")
    if n_resamples < 1:
        raise ValueError(f"paired_bootstrap: n_resamples must be >= 1, got {n_resamples}")
    d = xa - xb
    diff = float(d.mean())
    rng = np.random.default_rng(seed)
    boot = np.empty(n_resamples, dtype=np.float64)
    chunk = max(1, min(n_resamples, 2_000_000 // n))  # bounded memory: chunk × n indices at a time
    for start in range(0, n_resamples, chunk):
        stop = min(n_resamples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        boot[start:stop] = d[idx].mean(axis=1)
    lo, hi = (float(v) for v in np.percentile(boot, [2.5, 97.5]))
    extreme = int(np.count_nonzero(np.abs(boot - diff) >= abs(diff) - 1e-12))
    p = (1 + extreme) / (n_resamples + 1)
    return {"diff": diff, "lo": lo, "hi": hi, "p": float(p), "n": n, "n_resamples": int(n_resamples), "seed": seed}


def format_mean_std(xs: Sequence[float], digits: int = 2) -> str:
    """'mean ± std' for a table cell ('—' for no values)."""
    mu, sd = mean_std(xs)
    if math.isnan(mu):
        return "—"
    return f"{mu:.{digits}f} ± {sd:.{digits}f}"


def format_p(p: float) -> str:
    """A p-value for a table cell: '—' when undefined, '<0.001' below a thousandth."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "—"
    return "<0.001" if p < 1e-3 else f"{p:.3f}"
