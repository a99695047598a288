"""One sentence that explains why a method scored at or below its baseline, from measured numbers.

Our design (no paper behind it). A report that shows a method losing to its own baseline (a
random ranking, pixel similarity, a score that uses no model) says so in one sentence whose
every number comes from the run: the two metric values, then the *cause* as far as the run
measured it. The cause is picked by rules over quantities the run computed (per-query AP, which
generations are blank or show another concept, how far member and hold-out scores are apart),
never written by hand; when no rule applies the sentence says what was measured and that the
cause is not established. A method that beats its baseline gets no sentence.

Everything here is pure: numbers and arrays in, a string (or ``None``) out.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["TIE_TOL", "outcome", "explain", "separation", "cgi_dm_cause", "attribution_cause"]

#: [design] Two values of a metric in [0, 1] (mAP, AUC) closer than this are a tie (a
#: difference that rounds away at 2 decimals is not reported as a win or a loss).
TIE_TOL = 0.005


def outcome(value: float, baseline_value: float, tol: float = TIE_TOL) -> str:
    """``'win'`` if ``value > baseline_value + tol``, ``'loss'`` if ``value < baseline_value -
    tol``, else ``'tie'`` (larger is better; NaN on either side is a ``'tie'``: not a win)."""
    v, b = float(value), float(baseline_value)
    if not (np.isfinite(v) and np.isfinite(b)):
        return "tie"
    return "win" if v > b + tol else "loss" if v < b - tol else "tie"


def explain(method: str, value: float, baseline: str, baseline_value: float, metric: str,
            cause: Optional[str], measured: str, tol: float = TIE_TOL) -> Optional[str]:
    """The sentence for ``method`` against ``baseline`` on ``metric`` (larger is better), or
    ``None`` when the method wins (:func:`outcome`).

    ``cause``: a measured cause (a clause, computed by the caller from the run's numbers), or
    ``None`` when none could be established; then the sentence names ``measured`` (what was
    measured) and says the cause is not established.
    """
    o = outcome(value, baseline_value, tol)
    if o == "win":
        return None
    rel = "is below" if o == "loss" else "is level with (within %g of)" % tol
    head = f"{method} {metric} {float(value):.3f} {rel} {baseline}'s {float(baseline_value):.3f}"
    if cause:
        return f"{head}: {cause}."
    return f"{head}; measured: {measured}; the cause is not established."


def separation(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """``(mean(pos) - mean(neg), that difference in pooled standard deviations)`` of ``scores
    [N]`` split by boolean ``labels [N]`` (Cohen's d; pooled std with ddof 1 per group when it
    has >= 2 items; a zero pooled std gives ±inf, or 0 for no difference)."""
    s = np.asarray(scores, np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(bool)
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        raise ValueError("separation: need scores of both groups")
    diff = float(pos.mean() - neg.mean())
    dof = max(len(pos) - 1, 0) + max(len(neg) - 1, 0)
    var = ((pos.var(ddof=1) * (len(pos) - 1) if len(pos) > 1 else 0.0)
           + (neg.var(ddof=1) * (len(neg) - 1) if len(neg) > 1 else 0.0)) / max(dof, 1)
    sd = float(np.sqrt(var))
    if sd == 0.0:
        return diff, 0.0 if diff == 0.0 else float(np.sign(diff) * np.inf)
    return diff, diff / sd


def cgi_dm_cause(scores: np.ndarray, labels: np.ndarray, baseline_scores: np.ndarray,
                 baseline: str, *, score_name: str = "recovery SSIM",
                 baseline_uses_model: bool = True,
                 loss_gap: Optional[np.ndarray] = None) -> str:
    """Why CGI-DM's member-vs-hold-out separation is not above ``baseline``'s, from the scores.

    Args:
      scores: ``[N]`` CGI-DM scores (similarity of each image to its recovery); labels: ``[N]``
        bool, True = fine-tuning member.
      baseline_scores: ``[N]`` the baseline's scores of the same images.
      baseline: its name; ``baseline_uses_model``: False for a score computed from the images
        alone (then the sentence says so: it separates the groups without any model).
      loss_gap: optional ``[N]`` ``L_pre - L_ft`` per image (the loss-gap score): adds how much
        more the fine-tune lowered members' denoising loss than hold-outs'.

    Returns:
      a clause: the member-minus-hold-out mean of each score and that difference in pooled
      standard deviations (:func:`separation`).
    """
    d_m, e_m = separation(scores, labels)
    d_b, e_b = separation(baseline_scores, labels)
    out = (f"members' mean {score_name} minus hold-outs' is {d_m:+.3g} "
           f"({e_m:+.2f} pooled std), against {d_b:+.3g} ({e_b:+.2f} std) for {baseline}"
           + ("" if baseline_uses_model else ", which uses no model"))
    if loss_gap is not None:
        g, e_g = separation(loss_gap, labels)
        out += (f"; the fine-tune's drop in denoising loss (the loss-gap score), members' minus "
                f"hold-outs', is {g:+.3g} ({e_g:+.2f} std)")
    return out


def attribution_cause(baseline: str, method_ap: np.ndarray, baseline_ap: np.ndarray, *,
                      blank: np.ndarray, off_concept: np.ndarray,
                      constant: np.ndarray) -> tuple[Optional[str], str]:
    """``(cause or None, what was measured)`` for an attribution method's test-query AP
    ``method_ap [Q]`` against ``baseline_ap [Q]`` (ground truth: the prompted concept's
    exemplars).

    Args:
      blank: ``[Q]`` bool, the query generation is blank (:func:`jaxattrib.report.images.
        blank_mask`); off_concept: ``[Q]`` bool, it is not blank but the pixel classifier reads
        another concept than the prompted one; constant: ``[Q]`` bool, the method gave every
        training image the same score for that query.

    Rules, first match wins: (1) the method's scores are constant on some query it loses on
    (it ranks by index there, not by anything learned); (2) more than half of the queries it
    loses on are blank or off-concept generations (as far as the pixel classifier reads them:
    it reads 95% of the embedded base model's held-out renders right, 81% of its purple stars;
    16 px, seed 1000). Otherwise the cause is ``None``.
    """
    m, b = np.asarray(method_ap, float), np.asarray(baseline_ap, float)
    blank, off, const = (np.asarray(a, bool).reshape(-1) for a in (blank, off_concept, constant))
    lose, win = m < b, m > b
    n, k = len(m), int(lose.sum())
    bad = blank | off
    measured = (f"per-query AP on {n} test queries, lower than {baseline}'s on {k}, higher on "
                f"{int(win.sum())}; {int((bad & lose).sum())} of the {k} are blank or "
                f"off-concept generations")
    if (const & lose).any():
        return (f"its scores are the same for every training image on "
                f"{int((const & lose).sum())} of the {k} test queries on which its AP is lower "
                f"than {baseline}'s"), measured
    nb = int((bad & lose).sum())
    if k and nb > k / 2:
        return (f"{nb} of the {k} test queries on which its AP is lower than {baseline}'s are "
                f"generations without the prompted concept ({int((blank & lose).sum())} "
                f"blank, {int((off & lose).sum())} read as another concept by the pixel "
                f"classifier), whose ground truth (the prompted concept's exemplars) the image "
                f"does not show"), measured
    return None, measured
