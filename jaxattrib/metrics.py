"""Evaluation metrics for attribution scores and membership / source decisions (numpy + scipy).

Every function here is pure: arrays in, numbers out; nothing reads files or holds state; the
only randomness (bootstrap resampling) takes an explicit integer ``seed``.

Definitions and where they come from
------------------------------------
* **LDS** (linear datamodeling score), TRAK [code: MadryLab/trak]: for S random training subsets
  (``masks[j]``, boolean over the n training examples) and each target z, the predicted output of
  the model retrained on subset j is ``ĝ_j(z) = Σ_{i ∈ S_j} τ(z)_i`` (``masks @ scores.T``); LDS(z)
  is the Spearman rank correlation over j of ``(ĝ_j(z), g_j(z))`` with ``g_j`` the measured
  outputs (``actual``). Reported: the mean over targets. D-TRAK [code: sail-sg/D-TRAK] treats the
  influence as ``-scores``: pass ``sign=-1``.
* **Recall@K** (AbC / Concept-TRAK): ``#relevant in the top K / #relevant``.
  **Precision@K**: ``#relevant in the top K / K``.
* **AP** (AbC's definition): ``AP = (1/P) Σ_{j=1..P} j / r_j`` where ``r_j`` is the 1-based rank
  of the j-th relevant item in the full ranking and P the number of relevant items; **mAP** is the
  mean AP over queries. Without ties this is *exactly* sklearn's ``average_precision_score``
  (step-wise Σ (R_n − R_{n−1}) P_n). The two differ only when scores tie: sklearn treats tied
  items as one threshold (all of them enter the ranking together, each getting the precision of
  the whole tied block), whereas here ties are broken deterministically (see below), so each tied
  relevant item gets its own rank.
* **ROC / AUC / TPR@FPR** (CGI-DM, source-model attribution): larger score = more likely positive
  (member / infringing); a threshold τ predicts positive iff ``score >= τ``. ``roc_auc`` is the
  Mann–Whitney statistic with ties counted 1/2 (equal to sklearn's ``roc_auc_score``).
* **Thresholds** (CGI-DM's accuracy threshold): chosen on a *calibration* split with
  :func:`calibrate_threshold` and applied to a held-out split with :func:`accuracy_at_threshold`
  [design: the authors' code chose it on the test data itself; methods.md §6].

Ties (deterministic, documented)
--------------------------------
* Rankings (Recall@K, Precision@K, AP): items are sorted by descending score and ties are broken
  by ascending item index (``np.argsort(-scores, kind="stable")``) [design]. Results therefore
  never depend on platform sort order; a caller that wants pessimistic tie handling can add a
  tiny index-dependent offset.
* Spearman (LDS): average ranks for ties (the standard definition, as ``scipy.stats.spearmanr``).
  A target whose predicted or actual outputs are constant over the subsets has an undefined
  correlation: its LDS is NaN and the mean is taken over the finite values [design] (the count
  used is returned).
* ROC: tied scores form one operating point (as sklearn's ``roc_curve``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, NamedTuple, Sequence

import numpy as np
from scipy import stats

__all__ = [
    "CI",
    "LDSResult",
    "bootstrap_ci",
    "spearman_columns",
    "lds",
    "ranking",
    "recall_at_k",
    "precision_at_k",
    "average_precision",
    "mean_average_precision",
    "restrict_to_candidates",
    "roc_curve",
    "roc_auc",
    "roc_auc_ci",
    "tpr_at_fpr",
    "calibrate_threshold",
    "accuracy_at_threshold",
]


# --------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------


class CI(NamedTuple):
    """A point estimate with a percentile-bootstrap confidence interval."""

    estimate: float
    low: float
    high: float


def bootstrap_ci(values: Any, fn: Callable[[Any], float] = np.mean, n: int = 1000,
                 seed: int = 0, level: float = 0.95) -> CI:
    """Percentile bootstrap confidence interval of ``fn(values)``.

    Args:
      values: an array whose axis 0 indexes independent units (e.g. per-target LDS values, shape
        ``[T]``), or a tuple of arrays with the same axis-0 length that are resampled *together*
        (e.g. ``(scores, labels)`` for an AUC interval); ``fn`` then receives the same tuple.
      fn: statistic, called on the full data and on each resample; returns a float.
      n: number of bootstrap resamples.
      seed: seed of the ``numpy`` generator drawing the resamples (explicit; no global RNG).
      level: coverage, e.g. 0.95 → the 2.5 % and 97.5 % percentiles of the resampled statistic.

    Returns:
      ``CI(estimate=fn(values), low, high)``. Resamples where ``fn`` returns NaN (e.g. an AUC on
      a resample with one class) are ignored; if all are NaN the interval is NaN.
    """
    is_tuple = isinstance(values, tuple)
    arrays = tuple(np.asarray(v) for v in values) if is_tuple else (np.asarray(values),)
    m = arrays[0].shape[0] if arrays[0].ndim else 0
    if any(a.ndim == 0 or a.shape[0] != m for a in arrays):
        raise ValueError(f"bootstrap_ci: values must share axis-0 length; got shapes "
                         f"{[a.shape for a in arrays]}")
    if m == 0:
        raise ValueError("bootstrap_ci: values is empty")
    if n < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap_ci: need n >= 1 and 0 < level < 1; got n={n}, level={level}")

    def call(idx):
        sub = tuple(a[idx] for a in arrays)
        return float(fn(sub if is_tuple else sub[0]))

    estimate = call(np.arange(m))
    rng = np.random.default_rng(seed)
    stats_ = np.array([call(rng.integers(0, m, size=m)) for _ in range(n)])
    stats_ = stats_[np.isfinite(stats_)]
    if stats_.size == 0:
        return CI(estimate, float("nan"), float("nan"))
    alpha = 1.0 - level
    low, high = np.quantile(stats_, [alpha / 2, 1.0 - alpha / 2])
    return CI(estimate, float(low), float(high))


# --------------------------------------------------------------------------------------------
# LDS
# --------------------------------------------------------------------------------------------


def spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation between matching columns of ``a`` and ``b`` (both ``[S, T]``).

    Average ranks for ties, then Pearson correlation of the ranks (scipy's definition). Returns
    ``[T]``; NaN for a column where ``a`` or ``b`` is constant.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"spearman_columns: need two [S, T] arrays of equal shape; "
                         f"got {a.shape} and {b.shape}")
    ra = stats.rankdata(a, axis=0)
    rb = stats.rankdata(b, axis=0)
    ra -= ra.mean(axis=0)
    rb -= rb.mean(axis=0)
    num = (ra * rb).sum(axis=0)
    den = np.sqrt((ra * ra).sum(axis=0) * (rb * rb).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = num / den
    out[den == 0] = np.nan
    return out


@dataclass(frozen=True)
class LDSResult:
    """LDS of each target and its summary.

    Attributes:
      per_target: ``[n_targets]`` Spearman correlations (NaN where undefined).
      mean: mean over the finite entries of ``per_target``.
      ci_low, ci_high: percentile-bootstrap interval of the mean, resampling targets.
      n_valid: number of finite entries used.
      sign: the sign applied to the scores (``-1`` = D-TRAK's convention).
    """

    per_target: np.ndarray
    mean: float
    ci_low: float
    ci_high: float
    n_valid: int
    sign: float

    def as_dict(self) -> dict:
        """JSON-friendly summary (no per-target array)."""
        return {"lds": self.mean, "lds_ci_low": self.ci_low, "lds_ci_high": self.ci_high,
                "n_targets": self.n_valid, "sign": self.sign}


def lds(scores: np.ndarray, masks: np.ndarray, actual: np.ndarray, *, sign: float = 1.0,
        n_bootstrap: int = 1000, seed: int = 0, level: float = 0.95) -> LDSResult:
    """Linear datamodeling score.

    Args:
      scores: ``[n_targets, n_train]`` attribution scores τ(z)_i.
      masks: ``[S, n_train]`` boolean; ``masks[j, i]`` = training example i is in subset j.
      actual: ``[S, n_targets]`` measured output g_j(z) of the model trained on subset j (e.g.
        the diffusion loss on z).
      sign: multiplies the scores before the prediction; D-TRAK uses ``-1`` (influence is −score,
        because a larger loss means *less* support). ``sign=-1`` flips every correlation's sign.
      n_bootstrap, seed, level: bootstrap over targets for the interval of the mean.

    Returns:
      :class:`LDSResult`. The predicted outputs are ``masks @ (sign * scores).T``, ``[S, T]``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    masks = np.asarray(masks)
    actual = np.asarray(actual, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"lds: scores must be [n_targets, n_train]; got shape {scores.shape}")
    if masks.ndim != 2 or masks.shape[1] != scores.shape[1]:
        raise ValueError(f"lds: masks must be [S, n_train={scores.shape[1]}]; got {masks.shape}")
    if masks.dtype != np.bool_:
        raise ValueError(f"lds: masks must be boolean; got dtype {masks.dtype}")
    if actual.shape != (masks.shape[0], scores.shape[0]):
        raise ValueError(f"lds: actual must be [S={masks.shape[0]}, n_targets={scores.shape[0]}]; "
                         f"got {actual.shape}")
    if sign not in (1, -1, 1.0, -1.0):
        raise ValueError(f"lds: sign must be +1 or -1; got {sign}")
    predicted = masks.astype(np.float64) @ (sign * scores).T
    per_target = spearman_columns(predicted, actual)
    valid = per_target[np.isfinite(per_target)]
    if valid.size == 0:
        return LDSResult(per_target, float("nan"), float("nan"), float("nan"), 0, float(sign))
    ci = bootstrap_ci(valid, np.mean, n=n_bootstrap, seed=seed, level=level)
    return LDSResult(per_target, ci.estimate, ci.low, ci.high, int(valid.size), float(sign))


# --------------------------------------------------------------------------------------------
# Retrieval: Recall@K, Precision@K, AP
# --------------------------------------------------------------------------------------------


def _as_queries(scores, relevant, name):
    scores = np.asarray(scores, dtype=np.float64)
    relevant = np.asarray(relevant)
    single = scores.ndim == 1
    scores2 = np.atleast_2d(scores)
    relevant2 = np.atleast_2d(relevant)
    if scores2.ndim != 2 or relevant2.shape != scores2.shape:
        raise ValueError(f"{name}: need scores and relevant of equal shape [Q, N] or [N]; "
                         f"got {scores.shape} and {relevant.shape}")
    if relevant2.dtype != np.bool_:
        if not np.isin(relevant2, (0, 1)).all():
            raise ValueError(f"{name}: relevant must be boolean (or 0/1)")
        relevant2 = relevant2.astype(bool)
    if np.isnan(scores2).any():
        raise ValueError(f"{name}: scores contain NaN")
    return scores2, relevant2, single


def _out(x: np.ndarray, single: bool):
    return float(x[0]) if single else x


def ranking(scores: np.ndarray) -> np.ndarray:
    """Indices sorting each row of ``scores`` (``[Q, N]`` or ``[N]``) by descending score.

    Ties are broken by ascending index (stable sort of ``-scores``).
    """
    return np.argsort(-np.asarray(scores, dtype=np.float64), axis=-1, kind="stable")


def _relevant_sorted(scores, relevant):
    order = ranking(scores)
    return np.take_along_axis(relevant, order, axis=1)


def _check_k(k, n, name):
    if not 1 <= int(k) <= n:
        raise ValueError(f"{name}: k must be in [1, N={n}]; got {k}")
    return int(k)


def recall_at_k(scores: np.ndarray, relevant: np.ndarray, k: int):
    """Recall@K per query: ``#relevant among the top k / #relevant``.

    Args:
      scores: ``[Q, N]`` (or ``[N]`` for one query); larger = more attributed.
      relevant: boolean, same shape; the ground-truth training examples (e.g. AbC exemplars).
      k: cutoff, ``1 <= k <= N``.

    Returns:
      ``[Q]`` float64 (a float for 1-D input); NaN for a query with no relevant item.
    """
    s, r, single = _as_queries(scores, relevant, "recall_at_k")
    k = _check_k(k, s.shape[1], "recall_at_k")
    hits = _relevant_sorted(s, r)[:, :k].sum(axis=1)
    total = r.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(total > 0, hits / np.maximum(total, 1), np.nan)
    return _out(out, single)


def precision_at_k(scores: np.ndarray, relevant: np.ndarray, k: int):
    """Precision@K per query: ``#relevant among the top k / k``. Shapes as :func:`recall_at_k`."""
    s, r, single = _as_queries(scores, relevant, "precision_at_k")
    k = _check_k(k, s.shape[1], "precision_at_k")
    out = _relevant_sorted(s, r)[:, :k].sum(axis=1) / k
    return _out(out.astype(np.float64), single)


def average_precision(scores: np.ndarray, relevant: np.ndarray):
    """AbC's average precision per query: ``(1/P) Σ_j j / r_j`` over the full ranking.

    Args:
      scores: ``[Q, N]`` (or ``[N]``).
      relevant: boolean, same shape.

    Returns:
      ``[Q]`` (a float for 1-D input); NaN for a query with no relevant item. Ties broken by
      index (module docstring); equals sklearn's ``average_precision_score`` without ties.
    """
    s, r, single = _as_queries(scores, relevant, "average_precision")
    rel = _relevant_sorted(s, r)
    ranks = np.arange(1, s.shape[1] + 1, dtype=np.float64)
    j = np.cumsum(rel, axis=1)  # j-th relevant item at this position
    contrib = np.where(rel, j / ranks, 0.0).sum(axis=1)
    total = rel.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(total > 0, contrib / np.maximum(total, 1), np.nan)
    return _out(out, single)


def mean_average_precision(scores: np.ndarray, relevant: np.ndarray) -> float:
    """mAP: mean of :func:`average_precision` over queries that have a relevant item."""
    ap = np.atleast_1d(average_precision(scores, relevant))
    ap = ap[np.isfinite(ap)]
    if ap.size == 0:
        raise ValueError("mean_average_precision: no query has a relevant item")
    return float(ap.mean())


def restrict_to_candidates(scores: np.ndarray, relevant: np.ndarray,
                           candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each query's scores and relevance restricted to its candidate items.

    For rankings among a subset that differs per query (e.g. within-concept attribution ranks
    only the query concept's exemplars).

    Args:
      scores, relevant: ``[Q, N]``.
      candidates: ``[Q, N]`` bool with the same number ``M`` of True entries in every row.

    Returns:
      ``(scores [Q, M], relevant [Q, M])``, candidates in ascending index order (so ties keep
      the tie-break by index of :func:`ranking`).
    """
    s, r, _ = _as_queries(scores, relevant, "restrict_to_candidates")
    c = np.atleast_2d(np.asarray(candidates, bool))
    if c.shape != s.shape:
        raise ValueError(f"restrict_to_candidates: candidates must have the scores' shape "
                         f"{s.shape}; got {c.shape}")
    m = c.sum(axis=1)
    if len(m) and (m.min() != m.max() or m[0] == 0):
        raise ValueError(f"restrict_to_candidates: every query needs the same, non-zero number "
                         f"of candidates; got counts {sorted(set(m.tolist()))}")
    idx = np.nonzero(c)[1].reshape(len(c), -1)
    return np.take_along_axis(s, idx, 1), np.take_along_axis(r, idx, 1)


# --------------------------------------------------------------------------------------------
# Binary decisions: ROC, AUC, TPR@FPR, thresholds
# --------------------------------------------------------------------------------------------


def _binary(scores, labels, name):
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(f"{name}: scores and labels differ in length "
                         f"({scores.shape[0]} vs {labels.shape[0]})")
    if labels.dtype != np.bool_:
        if not np.isin(labels, (0, 1)).all():
            raise ValueError(f"{name}: labels must be boolean or 0/1 (1 = positive)")
        labels = labels.astype(bool)
    if np.isnan(scores).any():
        raise ValueError(f"{name}: scores contain NaN")
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == labels.size:
        raise ValueError(f"{name}: need both positive and negative labels; got {n_pos} positive "
                         f"of {labels.size}")
    return scores, labels


def roc_curve(scores: np.ndarray, labels: np.ndarray):
    """ROC curve: one operating point per distinct score, plus the origin.

    Args:
      scores: ``[N]``, larger = more likely positive.
      labels: ``[N]`` boolean or 0/1.

    Returns:
      ``(fpr, tpr, thresholds)``, each ``[D + 1]`` for D distinct scores: ``thresholds[0] = +inf``
      (nothing positive, the point (0, 0)), then the distinct scores in decreasing order; point i
      is the rule ``score >= thresholds[i]``. Matches sklearn's ``roc_curve(...,
      drop_intermediate=False)``.
    """
    scores, labels = _binary(scores, labels, "roc_curve")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last_of_block = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tps = np.cumsum(y)[last_of_block]
    fps = (last_of_block + 1) - tps
    tpr = np.r_[0.0, tps / y.sum()]
    fpr = np.r_[0.0, fps / (~y).sum()]
    thresholds = np.r_[np.inf, s[last_of_block]]
    return fpr, tpr, thresholds


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a positive > score of a negative) + ½ P(tie).

    Computed from average ranks (Mann–Whitney U / (P·N)); equals sklearn's ``roc_auc_score``.
    """
    scores, labels = _binary(scores, labels, "roc_auc")
    ranks = stats.rankdata(scores)
    n_pos = labels.sum()
    n_neg = labels.size - n_pos
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_auc_ci(scores: np.ndarray, labels: np.ndarray, n: int = 1000, seed: int = 0,
               level: float = 0.95) -> CI:
    """:func:`roc_auc` with a percentile-bootstrap interval that resamples the positives and
    the negatives separately, keeping both class sizes (a stratified bootstrap [design]: every
    resample has both classes, unlike :func:`bootstrap_ci` over ``(scores, labels)``)."""
    scores, labels = _binary(scores, labels, "roc_auc_ci")
    if n < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"roc_auc_ci: need n >= 1 and 0 < level < 1; got n={n}, level={level}")
    pos, neg = scores[labels], scores[~labels]
    y = np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]
    rng = np.random.default_rng(seed)
    stats_ = [roc_auc(np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))], y)
              for _ in range(n)]
    alpha = 1.0 - level
    low, high = np.quantile(stats_, [alpha / 2, 1.0 - alpha / 2])
    return CI(roc_auc(scores, labels), float(low), float(high))


def tpr_at_fpr(scores: np.ndarray, labels: np.ndarray, fpr: float = 0.01, *,
               interpolate: bool = False) -> float:
    """True-positive rate at a false-positive-rate budget.

    Conventions:
      * ``interpolate=False`` (default): the largest TPR over the operating points of
        :func:`roc_curve` whose FPR is ``<= fpr`` — the TPR of the best *deterministic* threshold
        that respects the budget. With few negatives this is a step function of ``fpr``
        (e.g. 100 negatives: only FPR 0, 0.01, 0.02, … are reachable).
      * ``interpolate=True``: linear interpolation of the ROC curve at ``fpr`` (the TPR a randomised
        choice between the two neighbouring thresholds achieves; sklearn-curve + ``np.interp``
        style, as many membership-inference papers plot). Always ``>=`` the default.

    Args:
      scores: ``[N]``; labels: ``[N]`` boolean/0-1; fpr: budget in [0, 1].
    """
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"tpr_at_fpr: fpr must be in [0, 1]; got {fpr}")
    f, t, _ = roc_curve(scores, labels)
    if not interpolate:
        return float(t[f <= fpr + 1e-12].max())
    # Walk the curve in order: at an FPR that is an operating point take the top of its vertical
    # segment; strictly between two FPRs interpolate from the last point at the lower FPR to the
    # first point at the higher one.
    i = int(np.searchsorted(f, fpr + 1e-12, side="right")) - 1
    if f[i] >= fpr - 1e-12 or i == f.size - 1:
        return float(t[i])
    j = i + 1
    w = (fpr - f[i]) / (f[j] - f[i])
    return float(t[i] + w * (t[j] - t[i]))


def accuracy_at_threshold(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    """Accuracy of the rule ``score >= threshold`` ⇒ positive. ``scores``/``labels``: ``[N]``."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(bool)
    if scores.shape != labels.shape or scores.size == 0:
        raise ValueError(f"accuracy_at_threshold: need non-empty scores and labels of equal "
                         f"length; got {scores.shape} and {labels.shape}")
    return float(np.mean((scores >= threshold) == labels))


def calibrate_threshold(scores_cal: np.ndarray, labels_cal: np.ndarray,
                        target: Literal["accuracy", "fpr"] = "accuracy",
                        fpr: float = 0.01) -> float:
    """Chooses a decision threshold on a calibration split (rule: ``score >= τ`` ⇒ positive).

    Candidates are ``-inf`` (all positive), ``+inf`` (all negative) and the midpoints between
    consecutive distinct calibration scores [design: midpoints rather than the scores themselves,
    so a held-out score equal to a calibration score is not decided by an accident of ties].

    Args:
      scores_cal: ``[N]`` calibration scores; labels_cal: ``[N]`` boolean / 0-1.
      target: ``"accuracy"`` → the candidate with the highest calibration accuracy; among equal
        accuracies the largest threshold (fewest positives, the conservative choice).
        ``"fpr"`` → the smallest candidate whose calibration FPR is ``<= fpr`` (the highest TPR
        within the budget).
      fpr: the FPR budget for ``target="fpr"``.

    Returns:
      the threshold τ (a float, possibly ±inf).
    """
    scores, labels = _binary(scores_cal, labels_cal, "calibrate_threshold")
    u = np.unique(scores)
    cands = np.r_[-np.inf, (u[:-1] + u[1:]) / 2.0, np.inf]  # increasing
    # Counts of scores >= cand via searchsorted on sorted positives / negatives.
    pos = np.sort(scores[labels])
    neg = np.sort(scores[~labels])
    tp = pos.size - np.searchsorted(pos, cands, side="left")
    fp = neg.size - np.searchsorted(neg, cands, side="left")
    if target == "accuracy":
        acc = (tp + (neg.size - fp)) / scores.size
        best = np.flatnonzero(acc == acc.max())[-1]  # largest threshold among maximisers
        return float(cands[best])
    if target == "fpr":
        if not 0.0 <= fpr <= 1.0:
            raise ValueError(f"calibrate_threshold: fpr must be in [0, 1]; got {fpr}")
        ok = np.flatnonzero(fp / neg.size <= fpr + 1e-12)  # never empty: +inf gives FPR 0
        return float(cands[ok[0]])
    raise ValueError(f"calibrate_threshold: target must be 'accuracy' or 'fpr'; got {target!r}")
