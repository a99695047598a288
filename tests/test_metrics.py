"""Tests of jaxattrib.metrics against scipy / sklearn and direct loops."""

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from jaxattrib import metrics as M
SEEDS = [0, 1, 2, 3]


# ------------------------------------------------------------------ LDS / Spearman


@pytest.mark.parametrize("seed", SEEDS)
def test_spearman_columns_matches_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 5, size=(30, 7)).astype(float)  # many ties
    b = rng.normal(size=(30, 7))
    b[:, 0] = np.round(b[:, 0])
    got = M.spearman_columns(a, b)
    want = [stats.spearmanr(a[:, t], b[:, t]).statistic for t in range(7)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_lds_matches_direct_spearman(seed):
    rng = np.random.default_rng(seed)
    n_targets, n_train, S = 6, 40, 25
    scores = rng.normal(size=(n_targets, n_train))
    masks = rng.random((S, n_train)) < 0.5
    actual = rng.normal(size=(S, n_targets))
    for sign in (1, -1):
        res = M.lds(scores, masks, actual, sign=sign, n_bootstrap=200, seed=seed)
        want = []
        for t in range(n_targets):
            pred = [sign * scores[t, masks[j]].sum() for j in range(S)]
            want.append(stats.spearmanr(pred, actual[:, t]).statistic)
        np.testing.assert_allclose(res.per_target, want, atol=1e-12)
        assert res.mean == pytest.approx(np.mean(want), abs=1e-12)
        assert res.ci_low <= res.mean <= res.ci_high
        assert res.n_valid == n_targets
    # sign=-1 flips every correlation.
    pos = M.lds(scores, masks, actual, sign=1, n_bootstrap=10).per_target
    neg = M.lds(scores, masks, actual, sign=-1, n_bootstrap=10).per_target
    np.testing.assert_allclose(pos, -neg, atol=1e-12)


def test_lds_recovers_linear_datamodel_by_construction():
    # Ground truth: actual outputs are exactly linear in the mask with weights = scores,
    # so the true scores give LDS 1, noise-free; random scores give LDS near 0; -scores give -1.
    rng = np.random.default_rng(0)
    n_targets, n_train, S = 5, 50, 64
    w = rng.normal(size=(n_targets, n_train))
    masks = rng.random((S, n_train)) < 0.5
    actual = masks.astype(float) @ w.T
    assert M.lds(w, masks, actual, n_bootstrap=50).mean == pytest.approx(1.0, abs=1e-12)
    assert M.lds(w, masks, actual, sign=-1, n_bootstrap=50).mean == pytest.approx(-1.0, abs=1e-12)
    rnd = M.lds(rng.normal(size=w.shape), masks, actual, n_bootstrap=50).mean
    assert abs(rnd) < 0.3
    # D-TRAK convention: loss-like outputs decrease with support, so -scores is the influence.
    assert M.lds(w, masks, -actual, sign=-1, n_bootstrap=50).mean == pytest.approx(1.0, abs=1e-12)


def test_lds_constant_target_is_nan_and_excluded():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(3, 10))
    masks = rng.random((12, 10)) < 0.5
    actual = rng.normal(size=(12, 3))
    actual[:, 1] = 2.0
    res = M.lds(scores, masks, actual, n_bootstrap=20)
    assert np.isnan(res.per_target[1]) and res.n_valid == 2
    assert res.mean == pytest.approx(np.nanmean(res.per_target))


def test_lds_rejects_bad_shapes():
    with pytest.raises(ValueError, match="masks"):
        M.lds(np.zeros((2, 5)), np.zeros((4, 6), bool), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="actual"):
        M.lds(np.zeros((2, 5)), np.zeros((4, 5), bool), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="boolean"):
        M.lds(np.zeros((2, 5)), np.zeros((4, 5)), np.zeros((4, 2)))


# ------------------------------------------------------------------ bootstrap


def test_bootstrap_ci_deterministic_and_covers_direct_loop():
    rng = np.random.default_rng(0)
    v = rng.normal(loc=0.3, size=200)
    a = M.bootstrap_ci(v, np.mean, n=500, seed=7)
    b = M.bootstrap_ci(v, np.mean, n=500, seed=7)
    assert a == b
    # Same draws by a direct loop with the documented generator.
    g = np.random.default_rng(7)
    direct = [v[g.integers(0, v.size, size=v.size)].mean() for _ in range(500)]
    lo, hi = np.quantile(direct, [0.025, 0.975])
    assert (a.low, a.high) == pytest.approx((lo, hi), abs=1e-15)
    # Close to the normal-theory interval for a mean.
    se = v.std(ddof=1) / np.sqrt(v.size)
    assert a.low == pytest.approx(v.mean() - 1.96 * se, abs=0.4 * se)
    assert a.high == pytest.approx(v.mean() + 1.96 * se, abs=0.4 * se)


def test_bootstrap_ci_paired_tuple():
    rng = np.random.default_rng(3)
    labels = rng.random(300) < 0.5
    scores = rng.normal(size=300) + labels
    ci = M.bootstrap_ci((scores, labels), lambda sl: M.roc_auc(*sl), n=200, seed=0)
    assert ci.estimate == pytest.approx(skm.roc_auc_score(labels, scores))
    assert ci.low < ci.estimate < ci.high


# ------------------------------------------------------------------ retrieval


def _ap_loop(scores, relevant):
    """AbC AP by a direct loop over the ranking (ties: lower index first)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    P, found, total = relevant.sum(), 0, 0.0
    for rank, i in enumerate(order, start=1):
        if relevant[i]:
            found += 1
            total += found / rank
    return total / P


@pytest.mark.parametrize("seed", SEEDS)
def test_average_precision_matches_sklearn_without_ties(seed):
    rng = np.random.default_rng(seed)
    Q, N = 5, 60
    scores = rng.normal(size=(Q, N))
    relevant = rng.random((Q, N)) < 0.15
    relevant[:, 0] = True  # every query has a relevant item
    got = M.average_precision(scores, relevant)
    want = [skm.average_precision_score(relevant[q], scores[q]) for q in range(Q)]
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert M.mean_average_precision(scores, relevant) == pytest.approx(np.mean(want), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_average_precision_with_ties_matches_loop_not_sklearn(seed):
    rng = np.random.default_rng(seed)
    Q, N = 4, 40
    scores = rng.integers(0, 4, size=(Q, N)).astype(float)  # heavy ties
    relevant = rng.random((Q, N)) < 0.3
    relevant[:, 1] = True
    got = M.average_precision(scores, relevant)
    np.testing.assert_allclose(got, [_ap_loop(scores[q], relevant[q]) for q in range(Q)],
                               atol=1e-12)
    # With heavy ties the two definitions genuinely differ (documented in the module).
    sk = [skm.average_precision_score(relevant[q], scores[q]) for q in range(Q)]
    assert np.abs(np.asarray(got) - sk).max() > 1e-6


def test_average_precision_known_value():
    # relevant at ranks 1, 3, 6 → AP = (1/1 + 2/3 + 3/6) / 3.
    scores = np.array([9.0, 8, 7, 6, 5, 4, 3])
    relevant = np.array([1, 0, 1, 0, 0, 1, 0], bool)
    assert M.average_precision(scores, relevant) == pytest.approx((1 + 2 / 3 + 0.5) / 3)
    assert np.isnan(M.average_precision(scores, np.zeros(7, bool)))


@pytest.mark.parametrize("seed", SEEDS)
def test_recall_precision_at_k_against_loop(seed):
    rng = np.random.default_rng(seed)
    Q, N = 6, 50
    scores = rng.integers(0, 10, size=(Q, N)).astype(float)  # ties → index tie-break
    relevant = rng.random((Q, N)) < 0.2
    relevant[:, 3] = True
    for k in (1, 5, 10, 50):
        rec = M.recall_at_k(scores, relevant, k)
        prec = M.precision_at_k(scores, relevant, k)
        for q in range(Q):
            top = sorted(range(N), key=lambda i: (-scores[q, i], i))[:k]
            hits = relevant[q, top].sum()
            assert rec[q] == pytest.approx(hits / relevant[q].sum())
            assert prec[q] == pytest.approx(hits / k)
    np.testing.assert_allclose(M.recall_at_k(scores, relevant, N), 1.0)
    # 1-D input returns a float; sklearn's top_k has no tie rule, so compare on continuous scores.
    cont = rng.normal(size=N)
    r1 = M.recall_at_k(cont, relevant[0], 10)
    assert isinstance(r1, float)
    top = np.argsort(-cont)[:10]
    assert r1 == pytest.approx(relevant[0, top].sum() / relevant[0].sum())
    with pytest.raises(ValueError, match="k must be"):
        M.recall_at_k(scores, relevant, N + 1)


# ------------------------------------------------------------------ ROC / AUC / TPR@FPR


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("discrete", [False, True])
def test_roc_curve_and_auc_match_sklearn(seed, discrete):
    rng = np.random.default_rng(seed)
    labels = rng.random(200) < 0.4
    scores = rng.normal(size=200) + 0.8 * labels
    if discrete:
        scores = np.round(scores * 2) / 2  # ties
    f, t, th = M.roc_curve(scores, labels)
    sf, st, sth = skm.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(f, sf, atol=1e-12)
    np.testing.assert_allclose(t, st, atol=1e-12)
    np.testing.assert_array_equal(th[1:], sth[1:])
    assert np.isinf(th[0])
    assert M.roc_auc(scores, labels) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_tpr_at_fpr_conventions(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(300) < 0.5
    scores = rng.normal(size=300) + 1.5 * labels
    if seed % 2:
        scores = np.round(scores, 1)
    neg, pos = scores[~labels], scores[labels]
    for budget in (0.0, 0.01, 0.1, 0.5):
        # Brute force: best deterministic threshold within the FPR budget.
        best = 0.0
        for tau in np.r_[np.inf, np.unique(scores)]:
            if np.mean(neg >= tau) <= budget:
                best = max(best, np.mean(pos >= tau))
        got = M.tpr_at_fpr(scores, labels, budget)
        assert got == pytest.approx(best, abs=1e-12)
        interp = M.tpr_at_fpr(scores, labels, budget, interpolate=True)
        assert interp >= got - 1e-12
        sf, st, _ = skm.roc_curve(labels, scores, drop_intermediate=False)
        if np.isclose(budget * neg.size, np.round(budget * neg.size)):
            want = st[np.isclose(sf, budget)].max()  # top of the vertical segment
        else:
            want = np.interp(budget, sf, st)  # strictly between two FPRs: unambiguous
        assert interp == pytest.approx(want, abs=1e-12)
        # Between budgets, interpolation is linear along the curve.
        mid = M.tpr_at_fpr(scores, labels, budget + 0.37 / neg.size, interpolate=True)
        assert mid == pytest.approx(np.interp(budget + 0.37 / neg.size, sf, st), abs=1e-12)
    assert M.tpr_at_fpr(scores, labels, 1.0) == 1.0


def test_binary_metrics_reject_one_class():
    with pytest.raises(ValueError, match="both positive and negative"):
        M.roc_auc(np.arange(4.0), np.ones(4, bool))


# ------------------------------------------------------------------ thresholds


@pytest.mark.parametrize("seed", SEEDS)
def test_calibrate_threshold_accuracy_is_optimal(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(120) < 0.5
    scores = np.round(rng.normal(size=120) + labels, 1)
    tau = M.calibrate_threshold(scores, labels, "accuracy")
    acc = M.accuracy_at_threshold(scores, labels, tau)
    brute = max(np.mean((scores >= c) == labels) for c in np.r_[np.unique(scores), np.inf])
    assert acc == pytest.approx(brute)
    assert tau not in set(scores)  # a midpoint (or ±inf), never a calibration score


@pytest.mark.parametrize("seed", SEEDS)
def test_calibrate_threshold_fpr_holds_budget_on_calibration(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(400) < 0.5
    scores = rng.normal(size=400) + 2 * labels
    for budget in (0.01, 0.1):
        tau = M.calibrate_threshold(scores, labels, "fpr", fpr=budget)
        fpr = np.mean(scores[~labels] >= tau)
        tpr = np.mean(scores[labels] >= tau)
        assert fpr <= budget
        assert tpr == pytest.approx(M.tpr_at_fpr(scores, labels, budget))


def test_threshold_transfers_to_held_out_split():
    # Ground truth by construction: positives ~ N(2, 1), negatives ~ N(0, 1); the Bayes threshold
    # is 1 with accuracy Φ(1) ≈ 0.841.
    rng = np.random.default_rng(0)
    def draw(n):
        y = rng.random(n) < 0.5
        return rng.normal(size=n) + 2 * y, y
    s_cal, y_cal = draw(4000)
    s_test, y_test = draw(4000)
    tau = M.calibrate_threshold(s_cal, y_cal, "accuracy")
    assert tau == pytest.approx(1.0, abs=0.2)
    assert M.accuracy_at_threshold(s_test, y_test, tau) == pytest.approx(stats.norm.cdf(1), abs=0.02)


def test_roc_auc_ci_stratified_bootstrap():
    from scipy.stats import norm
    # separated classes: every stratified resample is separated too (bootstrap_ci over
    # (scores, labels) would also draw one-class resamples)
    ci = M.roc_auc_ci(np.r_[np.arange(5) + 10.0, np.arange(5)], np.r_[[1] * 5, [0] * 5])
    assert tuple(ci) == (1.0, 1.0, 1.0)
    # Gaussian classes d apart: AUC = Φ(d/√2); the 95% interval of 400 + 400 draws covers it and
    # is about ±1.96 · the DeLong-scale standard error (≈ 0.02 here), not wider or narrower
    rng = np.random.default_rng(3)
    s = np.r_[rng.normal(1.0, 1, 400), rng.normal(0, 1, 400)]
    y = np.r_[np.ones(400, bool), np.zeros(400, bool)]
    ci = M.roc_auc_ci(s, y, n=400, seed=1)
    assert ci.estimate == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert ci.low < norm.cdf(1 / np.sqrt(2)) < ci.high and 0.05 < ci.high - ci.low < 0.12
    with pytest.raises(ValueError, match="roc_auc_ci"):
        M.roc_auc_ci(np.arange(4.0), np.ones(4, bool))
