"""MONTRAGE's aggregation over checkpoints, learned weights, and its evaluation metrics.

From similarity trajectories ``sims [S, Q, N]`` (S checkpoints): :func:`aggregate` ('mean',
'final', 'movement' weighted by :func:`movement_weights` and :func:`seen_counts`),
:func:`fit_learned_weights` (per-checkpoint, per-tap weights fitted with an InfoNCE loss
[paper]), and the paper's concept-level metrics (:func:`between_concept_accuracy`,
:func:`within_concept_spearman`). Pure numpy / JAX; re-exported by
:mod:`jaxattrib.attribution.montrage`.
"""

from __future__ import annotations

import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxattrib.attribution.montrage_reps import MontrageError


# ============================================================================ aggregation
def seen_counts(record, steps: Sequence[int], num_examples: int | None = None) -> np.ndarray:
    """``int64 [S, N]``: how many times example ``i`` was in the batches of the interval
    ``(steps[s-1], steps[s]]`` (updates ``steps[s-1] .. steps[s]-1`` of ``record.step_info``);
    row 0 counts the updates before ``steps[0]`` (0 when ``steps[0] == 0``).

    ``num_examples`` defaults to the record manifest's ``dataset.size``.
    """
    if num_examples is None:
        num_examples = record.manifest.get("dataset", {}).get("size")
        if num_examples is None:
            raise MontrageError(f"{record.directory}: manifest has no dataset.size; pass "
                                f"num_examples")
    steps = [int(s) for s in steps]
    out = np.zeros((len(steps), int(num_examples)), np.int64)
    prev = 0
    for j, s in enumerate(steps):
        for u in range(prev, s):
            idx = record.step_info(u)["indices"]
            if idx.size and (idx.min() < 0 or idx.max() >= num_examples):
                raise MontrageError(f"{record.directory}: step {u} has indices outside "
                                    f"[0, {num_examples})")
            np.add.at(out[j], idx, 1)
        prev = s
    return out


def movement_weights(movement: np.ndarray, counts: np.ndarray | None = None,
                     seen: str = "ignore") -> np.ndarray:
    """Checkpoint weights ``[S, N]`` for the ``'movement'`` aggregation [design].

    movement: ``[S, N]`` from :meth:`RepTrajectory.movement` (row 0 is 0). counts: ``[S, N]``
    from :func:`seen_counts` (needed unless ``seen='ignore'``). seen: ``'ignore'`` (weight =
    movement), ``'mask'`` (only intervals in which the image was trained on), ``'count'``
    (movement times the number of times it was seen).
    """
    movement = np.asarray(movement, np.float64)
    if seen == "ignore":
        return movement
    if seen not in ("mask", "count"):
        raise MontrageError(f"seen must be 'ignore', 'mask' or 'count', got {seen!r}")
    if counts is None or np.shape(counts) != movement.shape:
        raise MontrageError(f"seen={seen!r} needs counts of shape {movement.shape}, got "
                            f"{None if counts is None else np.shape(counts)}")
    counts = np.asarray(counts, np.float64)
    return movement * (counts > 0) if seen == "mask" else movement * counts


def weighted_scores(sims: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``[Q, N]``: ``Σ_s w[s,i] sims[s,q,i] / Σ_s w[s,i]``; images with all-zero weights get
    the unweighted mean. sims ``[S, Q, N]``, weights ``[S, N]`` (non-negative)."""
    sims = np.asarray(sims, np.float64)
    w = np.asarray(weights, np.float64)
    if sims.ndim != 3 or w.shape != (sims.shape[0], sims.shape[2]):
        raise MontrageError(f"weighted_scores: sims [S, Q, N] and weights [S, N]; got "
                            f"{sims.shape} and {w.shape}")
    if (w < 0).any():
        raise MontrageError("weighted_scores: weights must be non-negative")
    total = w.sum(0)
    w = np.where(total > 0, w / np.where(total > 0, total, 1.0), 1.0 / sims.shape[0])
    return np.einsum("sqn,sn->qn", sims, w)


def aggregate(sims: np.ndarray, method: str = "mean", *, movement: np.ndarray | None = None,
              counts: np.ndarray | None = None, seen: str = "ignore") -> np.ndarray:
    """Trajectory similarities ``[S, Q, N]`` -> scores ``[Q, N]`` (module docstring).

    method: ``'final'`` | ``'mean'`` | ``'movement'`` (needs ``movement [S, N]``, and
    ``counts`` for ``seen != 'ignore'``). For ``'learned'`` use :func:`fit_learned_weights`
    and :func:`learned_scores`.
    """
    sims = np.asarray(sims, np.float64)
    if sims.ndim != 3 or sims.shape[0] == 0:
        raise MontrageError(f"aggregate: sims must be [S>0, Q, N], got {sims.shape}")
    if method == "final":
        return sims[-1]
    if method == "mean":
        return sims.mean(0)
    if method == "movement":
        if movement is None:
            raise MontrageError("aggregate(method='movement') needs movement [S, N]")
        return weighted_scores(sims, movement_weights(movement, counts, seen))
    raise MontrageError(f"aggregate: method must be 'final', 'mean' or 'movement', got "
                        f"{method!r}")


# ---------------------------------------------------------------------------- learned weights
def learned_scores(weights: Mapping, tap_sims) -> jax.Array:
    """``[Q, N]``: ``Σ_s Σ_l softmax(a)_s softmax(b)_l tap_sims[s, l]``.

    weights: ``{'step_logits': [S], 'tap_logits': [T]}``; tap_sims ``[S, T, Q, N]``
    (:meth:`RepTrajectory.tap_similarities`).
    """
    a = jax.nn.softmax(weights["step_logits"])
    b = jax.nn.softmax(weights["tap_logits"])
    return jnp.einsum("s,l,slqn->qn", a, b, jnp.asarray(tap_sims))


def infonce_loss(weights: Mapping, tap_sims, relevant, temperature: float = 0.05) -> jax.Array:
    """Multi-positive InfoNCE over training images, mean over queries [design]:
    ``-log Σ_{i ∈ pos(q)} exp(s_qi/τ) / Σ_i exp(s_qi/τ)`` with ``s = learned_scores``.

    relevant: bool ``[Q, N]``; every query needs at least one positive.
    """
    logits = learned_scores(weights, tap_sims) / temperature
    pos = jnp.where(jnp.asarray(relevant), logits, -jnp.inf)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - jax.nn.logsumexp(pos, axis=-1))


def init_learned_weights(num_steps: int, num_taps: int, key: jax.Array | None = None,
                         scale: float = 1e-2) -> dict:
    """Logits ``{'step_logits': [S], 'tap_logits': [T]}``: zeros (uniform weights = the mean
    aggregation) plus ``scale``-sized normal noise from ``key`` (None: exactly zeros)."""
    w = {"step_logits": jnp.zeros((num_steps,), jnp.float32),
         "tap_logits": jnp.zeros((num_taps,), jnp.float32)}
    if key is not None:
        k1, k2 = jax.random.split(key)
        w = {"step_logits": scale * jax.random.normal(k1, (num_steps,)),
             "tap_logits": scale * jax.random.normal(k2, (num_taps,))}
    return w


def fit_learned_weights(tap_sims, relevant, key: jax.Array, *, num_iters: int = 200,
                        learning_rate: float = 0.05, temperature: float = 0.05,
                        query_batch: int | None = None) -> tuple[dict, np.ndarray]:
    """Learns checkpoint/tap weights on validation queries with known ground truth.

    Args:
      tap_sims: ``[S, T, Qv, N]`` per-tap shifted cosines of the validation queries.
      relevant: bool ``[Qv, N]`` ground truth (each query needs one positive or more).
      key: PRNG key (initial logits noise, query mini-batches); same key -> same weights.
      num_iters: Adam iterations. learning_rate: Adam step size. temperature: InfoNCE τ.
      query_batch: queries per iteration (None: all, full batch).

    Returns:
      ``(weights, losses)``: the weights for :func:`learned_scores` and the full-batch
      validation loss before the first and after every iteration (``float64 [num_iters+1]``).
    """
    tap_sims = jnp.asarray(tap_sims, jnp.float32)
    relevant = jnp.asarray(relevant, bool)
    if tap_sims.ndim != 4 or relevant.shape != tap_sims.shape[2:]:
        raise MontrageError(f"fit_learned_weights: tap_sims [S, T, Q, N] and relevant [Q, N]; "
                            f"got {tap_sims.shape} and {relevant.shape}")
    if not bool(relevant.any(-1).all()):
        raise MontrageError("fit_learned_weights: every validation query needs a relevant "
                            "training image")
    S, T, Q, _ = tap_sims.shape
    k_init, k_batch = jax.random.split(key)
    weights = init_learned_weights(S, T, k_init)
    qb = None if query_batch is None or query_batch >= Q else int(query_batch)
    weights, losses = _fit(weights, tap_sims, relevant, k_batch, jnp.float32(learning_rate),
                           jnp.float32(temperature), int(num_iters), qb)
    return jax.tree.map(np.asarray, weights), np.asarray(losses, np.float64)


@functools.partial(jax.jit, static_argnums=(6, 7))
def _fit(weights, tap_sims, relevant, k_batch, learning_rate, temperature, num_iters,
         query_batch):
    """Adam on :func:`infonce_loss` for ``num_iters`` steps (``lax.scan``); returns the
    weights and the full-batch loss before and after every step."""
    opt = optax.adam(learning_rate)
    Q = tap_sims.shape[2]

    def body(carry, i):
        w, state = carry
        if query_batch is None:
            ts, rel = tap_sims, relevant
        else:
            sel = jax.random.choice(jax.random.fold_in(k_batch, i), Q, (query_batch,),
                                    replace=False)
            ts, rel = tap_sims[:, :, sel], relevant[sel]
        g = jax.grad(infonce_loss)(w, ts, rel, temperature)
        upd, state = opt.update(g, state, w)
        w = optax.apply_updates(w, upd)
        return (w, state), infonce_loss(w, tap_sims, relevant, temperature)

    (w, _), losses = jax.lax.scan(body, (weights, opt.init(weights)), jnp.arange(num_iters))
    return w, jnp.concatenate([infonce_loss(weights, tap_sims, relevant, temperature)[None],
                               losses])


# ============================================================================ evaluation [paper]
def concept_scores(scores: np.ndarray, train_concepts: np.ndarray, num_concepts: int | None = None,
                   reduce: str = "max") -> np.ndarray:
    """Per-concept scores ``[Q, C]`` from image scores ``[Q, N]``: the max (or mean) over the
    training images of each concept (``train_concepts`` int ``[N]`` in ``[0, C)``) [design].
    Concepts without images get ``-inf``."""
    if reduce not in ("max", "mean"):
        raise MontrageError(f"concept_scores: reduce must be 'max' or 'mean', got {reduce!r}")
    scores = np.asarray(scores, np.float64)
    c = np.asarray(train_concepts, np.int64)
    if c.shape != scores.shape[-1:]:
        raise MontrageError(f"concept_scores: train_concepts must be [N={scores.shape[-1]}], "
                            f"got {c.shape}")
    C = int(c.max()) + 1 if num_concepts is None else int(num_concepts)
    out = np.full((scores.shape[0], C), -np.inf)
    for k in range(C):
        m = c == k
        if m.any():
            out[:, k] = scores[:, m].max(1) if reduce == "max" else scores[:, m].mean(1)
    return out


def between_concept_accuracy(scores: np.ndarray, train_concepts: np.ndarray,
                             query_concepts: np.ndarray, reduce: str = "max") -> float:
    """Between-concept evaluation [paper]: fraction of queries whose top-scoring concept
    (:func:`concept_scores`) is their true concept (``query_concepts`` int ``[Q]``)."""
    cs = concept_scores(scores, train_concepts, None, reduce)
    q = np.asarray(query_concepts, np.int64)
    if q.shape != (cs.shape[0],):
        raise MontrageError(f"query_concepts must be [Q={cs.shape[0]}], got {q.shape}")
    return float(np.mean(np.argmax(cs, axis=1) == q))


def within_concept_spearman(scores: np.ndarray, soft_truth: np.ndarray,
                            train_concepts: np.ndarray,
                            query_concepts: np.ndarray) -> np.ndarray:
    """Within-concept evaluation [paper]: per query, the Spearman rank correlation between its
    scores and the soft ground truth over the training images of its own concept -> ``[Q]``
    (NaN when either is constant there). scores, soft_truth ``[Q, N]``."""
    from jaxattrib.metrics import spearman_columns
    scores = np.asarray(scores, np.float64)
    soft = np.asarray(soft_truth, np.float64)
    if soft.shape != scores.shape:
        raise MontrageError(f"soft_truth must have the scores' shape {scores.shape}, got "
                            f"{soft.shape}")
    tc = np.asarray(train_concepts, np.int64)
    qc = np.asarray(query_concepts, np.int64)
    out = np.full(scores.shape[0], np.nan)
    for q in range(scores.shape[0]):
        m = tc == qc[q]
        if m.sum() >= 2:
            out[q] = spearman_columns(scores[q, m][:, None], soft[q, m][:, None])[0]
    return out


__all__ = ["aggregate", "between_concept_accuracy", "concept_scores", "fit_learned_weights",
           "infonce_loss", "init_learned_weights", "learned_scores", "movement_weights",
           "seen_counts", "weighted_scores", "within_concept_spearman"]
