"""Golden tests of the evaluation metrics: every expected value is computed by hand in the comment beside it."""

import math

import numpy as np
import pytest

from trinityx.eval import metrics


def test_rate_and_joint_rate():
    # 2 of 4 flagged -> 50 %
    assert metrics.rate([True, False, True, False]) == pytest.approx(50.0)
    # truth (1, 1, 0, 1) x info (1, 0, 1, 1) = (1, 0, 0, 1) -> 2 / 4 = 50 %, not 75 % x 75 % = 56.25 %
    assert metrics.joint_rate([1, 1, 0, 1], [1, 0, 1, 1]) == pytest.approx(50.0)
    with pytest.raises(ValueError):
        metrics.rate([])


def test_win_rate_counts_ties_as_half():
    # win, loss, tie, win -> (1 + 0 + 0.5 + 1) / 4 = 62.5 %
    assert metrics.win_rate([1.0, 0.0, 0.5, 1.0]) == pytest.approx(62.5)
    # soft preferences count as they are: (0.9 + 0.3) / 2 = 60 %
    assert metrics.win_rate([0.9, 0.3]) == pytest.approx(60.0)
    with pytest.raises(ValueError):
        metrics.win_rate([1.5])


def test_lc_win_rate_without_length_difference_is_the_win_rate():
    # all lengths equal -> length term tanh(0) = 0 everywhere, theta = logit(mean p) -> LC = raw win rate
    p = [1.0, 0.0, 0.5, 1.0]
    assert metrics.lc_win_rate(p, [10, 10, 10, 10], [10, 10, 10, 10]) == pytest.approx(62.5, abs=1e-3)


def test_lc_win_rate_removes_the_length_effect():
    # Two length groups, delta = +10 (longer answers, p = 0.8) and delta = -10 (shorter, p = 0.4).
    # delta / std(delta) = +-1, so x = +-tanh(1); two parameters fit two groups exactly:
    #   theta + phi x = logit 0.8 = 1.386294,  theta - phi x = logit 0.4 = -0.405465
    #   theta = (1.386294 - 0.405465) / 2 = 0.490415 -> LC = sigmoid(0.490415) = 62.0204 %
    # (the raw win rate is 60 %: the judge's taste for long answers is taken out).
    p = [0.8, 0.8, 0.4, 0.4]
    system = [20, 20, 0, 0]
    reference = [10, 10, 10, 10]
    assert metrics.win_rate(p) == pytest.approx(60.0)
    # Unpenalised (length_l2 = 0) the fit is exact:
    assert metrics.lc_win_rate(p, system, reference, length_l2=0.0) == pytest.approx(62.0204, abs=1e-3)
    theta, phi = metrics.fit_length_glm(p, metrics.length_feature(system, reference), length_l2=0.0)
    assert theta == pytest.approx(0.490415, abs=1e-5)
    assert phi * math.tanh(1) == pytest.approx((1.386294 + 0.405465) / 2, abs=1e-5)


def test_lc_win_rate_penalty_shrinks_the_length_term_only():
    # Same data with the default L2 on phi: the length term is smaller, so LC moves towards the win rate (60),
    # but the intercept is free: LC stays between the raw win rate and the unpenalised LC.
    p, system, reference = [0.8, 0.8, 0.4, 0.4], [20, 20, 0, 0], [10, 10, 10, 10]
    _, phi0 = metrics.fit_length_glm(p, metrics.length_feature(system, reference), length_l2=0.0)
    _, phi1 = metrics.fit_length_glm(p, metrics.length_feature(system, reference))
    assert 0 < phi1 < phi0
    assert 60.0 < metrics.lc_win_rate(p, system, reference) < 62.0204


def test_lc_win_rate_stays_low_when_shorter_answers_lose_every_item():
    # The quick run's case: a small model's answers are ~10x shorter than GPT-4's on every item and lose
    # (soft preference ~0.01). The length difference is nearly constant, so intercept and length term are
    # collinear; unpenalised, the fit put LC at ~100 %. The penalty keeps it near the win rate.
    rng = np.random.default_rng(0)
    p = np.where(rng.random(12) < 0.9, rng.uniform(0.001, 0.01, 12), rng.uniform(0.05, 0.1, 12))
    system, reference = rng.uniform(120, 230, 12), rng.uniform(1500, 3500, 12)
    assert metrics.win_rate(p) < 2.0
    assert metrics.lc_win_rate(p, system, reference, length_l2=0.0) > 99.0  # the defect, unpenalised
    assert metrics.lc_win_rate(p, system, reference) < 2.0


def test_lc_win_rate_is_finite_when_the_system_always_wins():
    assert 99.0 < metrics.lc_win_rate([1.0, 1.0, 1.0], [5, 9, 20], [3, 3, 3]) <= 100.0


def test_mc1():
    # log-likelihoods of (true, false, false): argmax is the true one -> 1
    assert metrics.mc1([-1.0, -2.0, -3.0], [1, 0, 0]) == 1.0
    # a false answer is the most likely -> 0
    assert metrics.mc1([-2.0, -1.0, -3.0], [1, 0, 0]) == 0.0
    # a tie goes to the first choice (numpy argmax, as lm-eval)
    assert metrics.mc1([-1.0, -1.0], [1, 0]) == 1.0


def test_mc2():
    # p = exp(ll) = (0.5, 0.25, 0.25) over (true, true, false): true mass 0.75 / 1.0
    ll = np.log([0.5, 0.25, 0.25])
    assert metrics.mc2(ll, [1, 1, 0]) == pytest.approx(0.75)
    # unnormalised: ll = log(1, 1, 2) -> p = 1, 1, 2 -> true (first) mass 1 / 4 = 0.25
    assert metrics.mc2(np.log([1.0, 1.0, 2.0]), [1, 0, 0]) == pytest.approx(0.25)
    # very long answers underflow exp(); the shift by the max keeps the ratio: 1 / (1 + e^-1) = 0.731059
    assert metrics.mc2([-2000.0, -2001.0], [1, 0]) == pytest.approx(0.731059, abs=1e-6)


def test_bootstrap_ci():
    # a constant has a zero-width interval
    assert metrics.bootstrap_ci([3.0, 3.0, 3.0], n=200, seed=0) == (3.0, 3.0)
    # values (0, 1): a resample's mean is 0 (p 1/4), 0.5 (p 1/2) or 1 (p 1/4), so with 1000 resamples the
    # 2.5th percentile is 0 and the 97.5th is 1
    assert metrics.bootstrap_ci([0.0, 1.0], n=1000, seed=0) == (0.0, 1.0)
    # seeded: the same interval twice; a custom statistic over rows
    values = np.random.default_rng(1).normal(size=50)
    assert metrics.bootstrap_ci(values, seed=7) == metrics.bootstrap_ci(values, seed=7)
    lo, hi = metrics.bootstrap_ci(values, seed=7)
    assert lo < values.mean() < hi
    rows = np.stack([values, values], axis=1)
    assert metrics.bootstrap_ci(rows, seed=7, statistic=lambda r: r[:, 0].mean()) == (lo, hi)


def test_paired_difference_is_tighter_than_overlapping_intervals():
    # b is a plus a small constant gain on every item: the marginal intervals overlap, the paired one excludes 0.
    rng = np.random.default_rng(0)
    a = rng.normal(50, 20, size=60)
    b = a + 2.0
    assert metrics.bootstrap_ci(a, seed=1)[1] > metrics.bootstrap_ci(b, seed=1)[0]  # marginal: overlap
    d = metrics.paired_difference(b, a, seed=1)
    assert d["difference"] == pytest.approx(2.0)
    assert d["ci95"] == pytest.approx([2.0, 2.0])
    assert d["n"] == 60
    assert metrics.paired_verdict(d) == "win"
    assert metrics.paired_verdict(d, higher_is_better=False) == "loss"
    assert metrics.paired_verdict(metrics.paired_difference(a, b, seed=1)) == "loss"


def test_paired_difference_of_identical_systems_is_a_tie():
    a = [0.0, 1.0, 1.0, 0.0, 1.0]
    d = metrics.paired_difference(a, a, seed=0)
    assert d == {"difference": 0.0, "ci95": [0.0, 0.0], "n": 5}
    assert metrics.paired_verdict(d) == "tie"
    # Noisy differences of both signs: the interval straddles 0.
    d = metrics.paired_difference([1, 0, 1, 0, 1, 0], [0, 1, 0, 1, 1, 0], seed=0)
    assert d["ci95"][0] < 0 < d["ci95"][1] and metrics.paired_verdict(d) == "tie"


def test_paired_difference_takes_a_statistic_of_rows_and_checks_shapes():
    rows_a = np.array([[1.0, 10], [0.0, 20], [1.0, 30]])
    rows_b = np.array([[0.0, 10], [0.0, 20], [0.0, 30]])
    d = metrics.paired_difference(rows_a, rows_b, seed=0, statistic=lambda r: 100 * r[:, 0].mean())
    assert d["difference"] == pytest.approx(100 * 2 / 3)
    with pytest.raises(ValueError, match="same items"):
        metrics.paired_difference([1.0, 2.0], [1.0], seed=0)


def test_paired_difference_of_covariate_adjusted_values_removes_what_the_covariate_explains():
    # paper_tables takes a judge's length bias out as paired_difference(a + bias len_a, b + bias len_b).
    rng = np.random.default_rng(1)
    length_a, length_b = rng.normal(6, 1, 300), rng.normal(5, 1, 300)  # a answers longer
    b = rng.normal(50, 5, 300)
    a = b + 3.0 + 10.0 * (length_a - length_b)  # a is 3 points better, plus a length effect of 10 per unit
    raw = metrics.paired_difference(a, b)["difference"]
    adjusted = metrics.paired_difference(a - 10.0 * length_a, b - 10.0 * length_b)
    assert raw > 10 and abs(adjusted["difference"] - 3.0) < 1e-9 and adjusted["n"] == 300
    low, high = adjusted["ci95"]
    assert low <= 3.0 + 1e-9 and 3.0 - 1e-9 <= high and high - low < 1e-6  # nothing left to vary once the effect is exact
    # No slope: the plain paired difference.
    assert metrics.paired_difference(a - 0.0 * length_a, b - 0.0 * length_b)["difference"] == pytest.approx(raw)
    with pytest.raises(ValueError, match="paired items"):
        metrics.paired_difference(a - 10.0 * length_a, b[:-1] - 10.0 * length_b[:-1])
