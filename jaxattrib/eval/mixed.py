"""Mixed-concept attribution with a soft ground truth (issue #7) [design: jaxattrib's, not a
paper's protocol].

MONTRAGE (Brokman et al., ECCV 2024; ``../shared/docs/methods.md`` §8) compares attributions
with a soft ground truth by rank correlation [paper]; how it builds that ground truth, and its
code, are not public, so everything else here is our construction [design]. It reuses a
finished customization run (:mod:`jaxattrib.eval.benchmarks`: the base model fine-tuned on
exemplars of its four withheld concepts + distractors, with a trajectory record) and asks
how attribution splits between two fine-tuned concepts when a generation is conditioned on a
*known* mixture of both:

* **Queries** (:func:`mixture_plan`, :func:`mixed_contexts`): for every unordered pair (A, B)
  of new concepts, every ``α`` in ``alphas`` and ``repeats`` seeds, the text conditioning is
  ``α · E(prompt_A) + (1 − α) · E(prompt_B)`` with ``E`` the pipeline's text encoder
  (``[L, D]`` hidden states) and prompts that name the concept on the same background (so the
  two prompts differ only in the colour and shape tokens, position by position). The
  fine-tuned model samples from that conditioning (DDIM, classifier-free guidance with the
  empty prompt as in :func:`jaxattrib.generate.generate`). ``α = 1`` / ``0`` are the pure
  concepts (anchors), ``0 < α < 1`` the mixtures.
* **Soft ground truth** (:func:`soft_ground_truth`): ``g[q, i] = α / n_A`` on A's exemplars,
  ``(1 − α) / n_B`` on B's, 0 on every other training image (a distribution over the
  fine-tuning set; the generator's data for the mixture, by construction of its conditioning).
  The model is not guaranteed to render a mixture (it may draw A, B or neither); the
  benchmark therefore reports how often the pixel classifier reads A's or B's colour per ``α``
  (:func:`generation_mix`) so the ground truth can be judged.
* **Metrics** (:func:`mixture_metrics`, per query): ``rho`` = Spearman rank correlation of the
  scores with ``g`` over all ``N`` training images (ties in ``g`` get average ranks);
  ``map_both`` = average precision of the exemplars of A and B together (``g > 0``);
  ``auc_ab`` = the probability that a random exemplar of A outscores a random exemplar of B
  (the rank-based share of the score mass on A; scale-free, so comparable across methods).
  :func:`summarize` aggregates test queries: means with percentile-bootstrap CIs over queries,
  and ``tracking`` = the Spearman correlation across queries between ``α`` and ``auc_ab``
  (1: the A-vs-B split follows the mixture perfectly; CI by resampling queries).

``benchmarks/montrage_mixed.py`` runs it (resumable; ``--smoke``) and adds the monitoring
analysis (per-checkpoint similarities, aggregations vs the final checkpoint).
"""

from __future__ import annotations

import itertools
from typing import Callable, Sequence

import numpy as np

from jaxattrib.config import ConfigError


def mixture_plan(held: Sequence[dict], alphas: Sequence[float], repeats: int,
                 backgrounds: Sequence[str] = ("black", "white", "gray"),
                 pairs: Sequence[tuple[int, int]] | None = None) -> dict:
    """The mixed queries: every pair × ``alphas`` × ``repeats``, ordered (pair, α, repeat).

    Args:
      held: the new concepts (dicts with ``shape`` and ``color``), indexed by position.
      alphas: mixture weights of concept A in [0, 1].
      repeats: queries per (pair, α) (>= 2: the first half validates each method's λ / sign,
        the rest are test queries).
      backgrounds: cycled over the queries of a (pair, α) group (and shifted per pair), so
        every group and every α sees every background equally often when ``repeats`` is a
        multiple of ``len(backgrounds)``.
      pairs: ``(a, b)`` concept indices (default: all unordered pairs ``a < b``).

    Returns arrays ``[Q]``: ``concept_a``, ``concept_b`` (int), ``alpha`` (float64),
    ``background``, ``prompt_a``, ``prompt_b`` (str), ``pair`` (index into ``pairs``),
    ``group`` (``pair * len(alphas) + α index``: the strata of the validation split).
    """
    from jaxattrib.data.synthetic import caption
    alphas = [float(a) for a in alphas]
    if not alphas or any(not 0.0 <= a <= 1.0 for a in alphas):
        raise ConfigError(f"mixed.alphas={alphas}: need one or more weights in [0, 1]")
    if repeats < 2:
        raise ConfigError(f"mixed.repeats={repeats}: need >= 2 (half of each (pair, alpha) "
                          f"group validates, the rest is tested)")
    pairs = list(itertools.combinations(range(len(held)), 2)) if pairs is None else \
        [tuple(int(x) for x in p) for p in pairs]
    if not pairs or any(a == b or not (0 <= a < len(held) and 0 <= b < len(held))
                        for a, b in pairs):
        raise ConfigError(f"mixed.pairs={pairs}: need pairs of two different concept indices "
                          f"in [0, {len(held)})")
    out = {k: [] for k in ("concept_a", "concept_b", "alpha", "background", "prompt_a",
                           "prompt_b", "pair", "group")}
    for pi, (a, b) in enumerate(pairs):
        for ai, alpha in enumerate(alphas):
            for r in range(repeats):
                bg = backgrounds[(r + pi) % len(backgrounds)]
                for k, v in (("concept_a", a), ("concept_b", b), ("alpha", alpha),
                             ("background", bg), ("pair", pi),
                             ("group", pi * len(alphas) + ai),
                             ("prompt_a", caption(held[a]["shape"], held[a]["color"], bg)),
                             ("prompt_b", caption(held[b]["shape"], held[b]["color"], bg))):
                    out[k].append(v)
    return {"concept_a": np.array(out["concept_a"], np.int32),
            "concept_b": np.array(out["concept_b"], np.int32),
            "alpha": np.array(out["alpha"], np.float64), "background": np.array(out["background"]),
            "prompt_a": np.array(out["prompt_a"]), "prompt_b": np.array(out["prompt_b"]),
            "pair": np.array(out["pair"], np.int32), "group": np.array(out["group"], np.int32)}


def mixed_contexts(encode: Callable[[list[str]], np.ndarray], prompt_a: Sequence[str],
                   prompt_b: Sequence[str], alpha: np.ndarray) -> np.ndarray:
    """``float32 [Q, L, D]``: ``α · encode(prompt_a) + (1 − α) · encode(prompt_b)`` per query
    (``encode``: prompts -> text hidden states ``[Q, L, D]``, e.g. ``pipe.encode_prompts``)."""
    ea = np.asarray(encode([str(p) for p in prompt_a]), np.float32)
    eb = np.asarray(encode([str(p) for p in prompt_b]), np.float32)
    al = np.asarray(alpha, np.float32)
    if ea.shape != eb.shape or al.shape != ea.shape[:1]:
        raise ValueError(f"mixed_contexts: {ea.shape} and {eb.shape} encodings, alpha "
                         f"{al.shape}; need equal shapes [Q, L, D] and alpha [Q]")
    return al[:, None, None] * ea + (1.0 - al[:, None, None]) * eb


def soft_ground_truth(train_concept: np.ndarray, concept_a: np.ndarray, concept_b: np.ndarray,
                      alpha: np.ndarray) -> np.ndarray:
    """``[Q, N]``: ``α / n_A`` on the exemplars of A, ``(1 − α) / n_B`` on B's, 0 elsewhere
    (``train_concept [N]``: new-concept index, ``-1`` for distractors). Rows sum to 1."""
    tc = np.asarray(train_concept)
    ca, cb = np.asarray(concept_a), np.asarray(concept_b)
    al = np.asarray(alpha, np.float64)
    in_a = tc[None, :] == ca[:, None]
    in_b = tc[None, :] == cb[:, None]
    if (ca == cb).any() or not (in_a.sum(1) > 0).all() or not (in_b.sum(1) > 0).all():
        raise ValueError("soft_ground_truth: every query needs two different concepts with "
                         "exemplars in the training set")
    return (al[:, None] * in_a / in_a.sum(1, keepdims=True)
            + (1.0 - al[:, None]) * in_b / in_b.sum(1, keepdims=True))


def a_over_b_auc(scores: np.ndarray, in_a: np.ndarray, in_b: np.ndarray) -> np.ndarray:
    """``[Q]``: P(score of a random A exemplar > that of a random B exemplar), ties count 1/2."""
    s = np.asarray(scores, np.float64)
    out = np.empty(len(s))
    for q in range(len(s)):
        a, b = s[q, in_a[q]], s[q, in_b[q]]
        out[q] = ((a[:, None] > b[None, :]).mean() + 0.5 * (a[:, None] == b[None, :]).mean())
    return out


def mixture_metrics(scores: np.ndarray, soft: np.ndarray) -> dict:
    """Per-query metrics of ``scores [Q, N]`` against the soft ground truth ``soft [Q, N]``
    (:func:`soft_ground_truth`): ``rho [Q]`` (Spearman over all N, average ranks for ties),
    ``map_both [Q]`` (average precision of ``soft > 0``). :func:`per_query` adds ``auc_ab``.
    """
    from jaxattrib.metrics import average_precision, spearman_columns
    s, g = np.asarray(scores, np.float64), np.asarray(soft, np.float64)
    if s.shape != g.shape or s.ndim != 2:
        raise ValueError(f"mixture_metrics: scores {s.shape} and soft {g.shape} must be the "
                         f"same [Q, N]")
    return {"rho": spearman_columns(s.T, g.T),
            "map_both": np.asarray(average_precision(s, g > 0), np.float64)}


def per_query(scores: np.ndarray, plan: dict, train_concept: np.ndarray) -> dict:
    """All per-query metrics of ``scores [Q, N]``: ``rho``, ``map_both`` and ``auc_ab``."""
    tc = np.asarray(train_concept)
    soft = soft_ground_truth(tc, plan["concept_a"], plan["concept_b"], plan["alpha"])
    out = mixture_metrics(scores, soft)
    out["auc_ab"] = a_over_b_auc(scores, tc[None, :] == plan["concept_a"][:, None],
                                 tc[None, :] == plan["concept_b"][:, None])
    return out


def _tracking(alpha: np.ndarray, auc: np.ndarray) -> float:
    from jaxattrib.metrics import spearman_columns
    return float(spearman_columns(np.asarray(alpha, np.float64)[:, None],
                                  np.asarray(auc, np.float64)[:, None])[0])


def summarize(metrics: dict, alpha: np.ndarray, queries: np.ndarray, *,
              n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Means over the selected ``queries`` ``[Q]`` bool with 95% bootstrap CIs.

    Returns ``rho``, ``map_both``, ``tracking`` (Spearman of α vs ``auc_ab`` across queries)
    as :class:`~jaxattrib.metrics.CI`, ``auc_by_alpha`` ``{α: mean auc_ab}`` and ``n``.
    """
    from jaxattrib.metrics import bootstrap_ci
    q = np.asarray(queries, bool)
    if not q.any():
        raise ValueError("summarize: no query selected")
    al = np.asarray(alpha, np.float64)[q]
    out = {"n": int(q.sum())}
    for k in ("rho", "map_both"):
        out[k] = bootstrap_ci(metrics[k][q], np.nanmean, n=n_bootstrap, seed=seed)
    out["tracking"] = bootstrap_ci((al, metrics["auc_ab"][q]), lambda t: _tracking(*t),
                                   n=n_bootstrap, seed=seed)
    out["auc_by_alpha"] = {float(a): float(metrics["auc_ab"][q][al == a].mean())
                           for a in np.unique(al)}
    return out


def paired_gain(a: np.ndarray, b: np.ndarray, queries: np.ndarray, *,
                n_bootstrap: int = 1000, seed: int = 0):
    """Mean of ``a − b`` (per-query metrics, e.g. ``rho``) over ``queries`` with its paired
    95% bootstrap CI."""
    from jaxattrib.metrics import bootstrap_ci
    q = np.asarray(queries, bool)
    return bootstrap_ci(np.asarray(a)[q] - np.asarray(b)[q], np.nanmean, n=n_bootstrap,
                        seed=seed)


def generation_mix(pred_color: np.ndarray, pred_shape: np.ndarray, plan: dict,
                   held: Sequence[dict], spec) -> dict:
    """``{α: {'color A', 'color B', 'shape A', 'shape B'}}``: fraction of the generations of
    each α whose classified colour / shape is A's or B's (``pred_*``: vocabulary indices from
    :func:`jaxattrib.data.synthetic.classify_concepts`)."""
    col = np.array([spec.colors[p] for p in pred_color])
    shp = np.array([spec.shapes[p] for p in pred_shape])
    ca = np.array([held[c]["color"] for c in plan["concept_a"]])
    cb = np.array([held[c]["color"] for c in plan["concept_b"]])
    sa = np.array([held[c]["shape"] for c in plan["concept_a"]])
    sb = np.array([held[c]["shape"] for c in plan["concept_b"]])
    out = {}
    for a in np.unique(plan["alpha"]):
        m = plan["alpha"] == a
        out[float(a)] = {"n": int(m.sum()), "color A": float((col[m] == ca[m]).mean()),
                         "color B": float((col[m] == cb[m]).mean()),
                         "shape A": float((shp[m] == sa[m]).mean()),
                         "shape B": float((shp[m] == sb[m]).mean())}
    return out


__all__ = ["a_over_b_auc", "generation_mix", "mixed_contexts", "mixture_metrics",
           "mixture_plan", "paired_gain", "per_query", "soft_ground_truth", "summarize"]
