"""stats: mean ± std, t intervals, paired t-test against scipy, paired bootstrap by hand and by property."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from lora_diffusion import stats as S


def test_mean_std_hand_example():
    # 2, 4, 4, 4, 5, 5, 7, 9: mean 5, sum of squares 32, sample variance 32/7
    mu, sd = S.mean_std([2, 4, 4, 4, 5, 5, 7, 9])
    assert mu == 5.0
    assert sd == pytest.approx(math.sqrt(32 / 7))
    assert S.mean_std([3.5]) == (3.5, 0.0)
    mu, sd = S.mean_std([])
    assert math.isnan(mu) and math.isnan(sd)


def test_ci95_hand_example_and_scipy():
    # 1, 2, 3: mean 2, s = 1, t(0.975, 2) = 4.302653
    lo, hi = S.ci95([1, 2, 3])
    assert lo == pytest.approx(2 - 4.302653 / math.sqrt(3), abs=1e-5)
    assert hi == pytest.approx(2 + 4.302653 / math.sqrt(3), abs=1e-5)
    xs = [0.81, 0.79, 0.84, 0.80, 0.83]
    ref = sps.t.interval(0.95, len(xs) - 1, loc=np.mean(xs), scale=sps.sem(xs))
    assert S.ci95(xs) == pytest.approx(ref)
    assert S.ci95([0.7, 0.7, 0.7]) == pytest.approx((0.7, 0.7))
    assert all(math.isnan(v) for v in S.ci95([0.7]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paired_t_test_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(0.8, 0.03, size=5)
    b = a - rng.normal(0.02, 0.02, size=5)
    ours = S.paired_t_test(a, b)
    ref = sps.ttest_rel(a, b)
    assert ours["t"] == pytest.approx(float(ref.statistic))
    assert ours["p"] == pytest.approx(float(ref.pvalue))
    assert ours["n"] == 5 and ours["reason"] is None
    assert ours["mean_diff"] == pytest.approx(float(np.mean(a - b)))


def test_paired_t_test_hand_example():
    # differences 1, 2, 3, 2: mean 2, s^2 = (1 + 0 + 1 + 0) / 3, t = 2 / (sqrt(2/3) / 2) = 4 sqrt(3/2)
    out = S.paired_t_test([2, 3, 4, 3], [1, 1, 1, 1])
    assert out["mean_diff"] == pytest.approx(2.0)
    assert out["t"] == pytest.approx(4 * math.sqrt(1.5))
    assert out["p"] == pytest.approx(2 * sps.t.sf(4 * math.sqrt(1.5), 3))
    assert 0.01 < out["p"] < 0.05


def test_paired_t_test_undefined_cases_say_why():
    one = S.paired_t_test([0.8], [0.7])
    assert math.isnan(one["p"]) and "at least 2" in one["reason"] and one["n"] == 1
    assert one["mean_diff"] == pytest.approx(0.1)
    same = S.paired_t_test([0.8, 0.9, 0.7], [0.8, 0.9, 0.7])
    assert math.isnan(same["p"]) and "zero variance" in same["reason"] and same["mean_diff"] == 0.0
    shifted = S.paired_t_test([0.8, 0.9, 0.7], [0.7, 0.8, 0.6])  # constant non-zero difference
    assert math.isnan(shifted["p"]) and "zero variance" in shifted["reason"]
    assert shifted["mean_diff"] == pytest.approx(0.1)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="same length"):
        S.paired_t_test([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="finite"):
        S.paired_t_test([1, float("nan")], [1, 2])
    with pytest.raises(ValueError, match="same length"):
        S.paired_bootstrap([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="no examples"):
        S.paired_bootstrap([], [])
    with pytest.raises(ValueError, match="n_resamples"):
        S.paired_bootstrap([1], [0], n_resamples=0)


def test_paired_bootstrap_hand_example():
    # a right on 8 of 10, b right on 5 of 10, b's right answers a subset of a's: diff 0.3
    a = [1, 1, 1, 1, 1, 1, 1, 1, 0, 0]
    b = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    out = S.paired_bootstrap(a, b, n_resamples=5000, seed=0)
    assert out["diff"] == pytest.approx(0.3)
    assert out["n"] == 10 and out["n_resamples"] == 5000
    # per-example differences are 3 ones and 7 zeros: resampled mean ~ Binomial(10, 0.3)/10
    assert 0.0 <= out["lo"] <= 0.1 and 0.5 <= out["hi"] <= 0.6
    assert out["lo"] < out["diff"] < out["hi"]
    # shifted null: P(|Bin(10,.3)/10 - .3| >= .3) = P(X=0) + P(X>=6) = 0.028 + 0.047
    exact = sps.binom.pmf(0, 10, 0.3) + sps.binom.sf(5, 10, 0.3)
    assert out["p"] == pytest.approx(exact, abs=0.015)
    # deterministic per seed
    assert S.paired_bootstrap(a, b, n_resamples=5000, seed=0) == out
    assert S.paired_bootstrap(a, b, n_resamples=5000, seed=1)["lo"] == pytest.approx(out["lo"], abs=0.1)


def test_paired_bootstrap_identical_and_clear_winner():
    same = S.paired_bootstrap([1, 0, 1, 1], [1, 0, 1, 1], n_resamples=200)
    assert same["diff"] == 0.0 and same["lo"] == 0.0 and same["hi"] == 0.0 and same["p"] == 1.0
    rng = np.random.default_rng(0)
    b = (rng.random(400) < 0.5).astype(float)
    a = np.maximum(b, (rng.random(400) < 0.6).astype(float))  # a fixes many of b's errors
    win = S.paired_bootstrap(a, b, n_resamples=2000)
    assert win["diff"] > 0.2 and win["lo"] > 0 and win["p"] < 0.01
    assert win["p"] >= 1 / 2001  # never exactly zero
    # swapping the systems flips the sign and keeps p
    lose = S.paired_bootstrap(b, a, n_resamples=2000)
    assert lose["diff"] == pytest.approx(-win["diff"]) and lose["hi"] < 0
    assert lose["p"] == pytest.approx(win["p"])


def test_paired_bootstrap_float_scores_and_interval_against_normal_theory():
    rng = np.random.default_rng(3)
    a = rng.random(600)
    b = a - 0.05 + rng.normal(0, 0.2, size=600)
    out = S.paired_bootstrap(a, b, n_resamples=4000, seed=0)
    d = a - b
    half = 1.96 * d.std(ddof=1) / math.sqrt(d.size)
    assert out["lo"] == pytest.approx(d.mean() - half, abs=0.006)
    assert out["hi"] == pytest.approx(d.mean() + half, abs=0.006)


def test_formatting():
    assert S.format_mean_std([0.8, 0.9], digits=2) == "0.85 ± 0.07"
    assert S.format_mean_std([]) == "—"
    assert S.format_p(float("nan")) == "—"
    assert S.format_p(0.0004) == "<0.001"
    assert S.format_p(0.0412) == "0.041"
