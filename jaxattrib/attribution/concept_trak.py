"""Concept-TRAK: attribution of a *concept* of a generated image to training examples.
``I(x_0^i, c) = ∇_θ L_concept(c; θ)ᵀ (ΦᵀΦ + λI)⁻¹ ∇_θ L_train(x_0^i; θ)``. What follows the
paper / the authors' code (enkeejunior1/concept-trak, ``experiments/toy``; methods.md §5)
[paper] [code]:

* Training loss (reconstruction reward, ``'dpsv1'``): with ``g = −∇_{x_t} mean((x̂_0(x_t) −
  x_0)²)`` (parameters frozen), ``L_train = mean((sg[ε_θ(x_t; c) − g] − ε_θ(x_t; c))²)``; value
  ``mean(g²)``, θ-gradient ``(2/D) Σ g · ∂ε_θ/∂θ`` (``D = H·W·C``), along the DSM gradient for
  small ``t``-Jacobians. The code's ``get_dps_guidance`` uses ``F.mse_loss`` and
  ``loss_rescale = 1``; we take the per-example mean over ``(H, W, C)`` (the code's batch mean
  only rescales by ``1/B``).
* Concept loss (``'slider_local'``): ``L_concept = mean((sg[ε_c + λ_c (ε_c − sg ε_c⁻)] −
  ε_c)²)``, ``ε_c = ε_θ(x_t; c)``, ``ε_c⁻ = ε_θ(x_t; c⁻)``, ``λ_c = 3``, ``c⁻`` = the prompt
  without the concept; θ-gradient ``−(2 λ_c / D) Σ (ε_c − ε_c⁻) · ∂ε_c/∂θ`` (0 when c⁻ = c).
* (x_t, t) pairs: 50-step DDIM inversion (the code's ``linspace(0, 1, 51)·999``), every 5th
  state kept (``[4::5]``) → 10 pairs at t ≈ 99, 199, …, 999 (our ``trailing`` spacing gives
  exactly those). Without inversion: ``t = arange(T/K, T, T/K)`` (K = 10 → 9 timesteps 100 …
  900; the code zips them with 10 noises), one fixed noise per timestep for all examples.
* Per-timestep gradients normalized to unit L2 (all-zero left as is), then summed (summed
  unnormalized without it); only the UNet's cross-attention (``'attn2'``); projection is
  linear, so projecting the sum = summing the projections. ``λ = r · 0.1 · mean(diag(ΦᵀΦ))``,
  ``r`` swept over ``1e-4 … 1e4``.

Our design [design]: ``r`` chosen on a *validation* split by Precision@k
(:func:`choose_lambda_ratio`; ``r = 1`` without one; reports say which split chose it).
``k = 2048`` (paper: 32768) so the ``k×k`` float64 kernel fits a CPU
(``ConceptTRAKConfig.proj_dim``). Inversion is conditioned on the image's own prompt without
CFG by default [design]. The reference's scripts invert training images with CFG 7.5 against
the empty prompt, and its AbC query side regenerates the query's own sampling trajectory from
its seed (50 DDIM steps, η = 0.1) [code]: options ``inversion_guidance`` and ``query_pairs =
'trajectory'`` (:func:`trajectory_pairs`; docs/benchmarks/concept_trak.md). Inversion:
:func:`jaxattrib.diffusion.inversion.ddim_invert` (ε at the target level, as diffusers'
``DDIMInverseScheduler``; the authors' loop uses the source level: one grid step apart). With
inversion the DSM target noise (switches off only) is the noise the state implies,
``(x_t − √ᾱ_t x_0)/√(1−ᾱ_t)`` (the code: that of the state one step earlier). ``ε`` = the model output, ``x̂_0`` by :func:`predict_x0` (the
authors' models are ε-prediction). No ``loss_rescale = 1e4`` (a common scale changes nothing
once λ follows the ratio rule). A prompt with several target concepts is attributed concept by
concept (:func:`concept_queries`); :func:`remove_concept` deletes every whole-word,
case-insensitive occurrence of the phrase and collapses spaces.
Model function: ``model_fn(params, x_t[B,H,W,C], t[B] int32, ctx[B,L,D]) -> out[B,H,W,C]``
(:func:`unet_model_fn`); text: ``encode(prompts) -> [B, L, D]`` (:func:`clip_encoder`, or any).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import scipy.linalg

from jaxattrib.attribution.trak import score, trak_kernel_inverse
from jaxattrib.diffusion.schedule import Schedule
from jaxattrib.metrics import precision_at_k
from jaxattrib.attribution.concept_trak_prompts import (ConceptQuery, concept_queries,
                                                        concept_relevance, has_concept,
                                                        remove_concept)
from jaxattrib.attribution.concept_trak_features import (ABLATION, ConceptTRAKConfig,
                                                         DEFAULT_RATIOS, EncodeFn, ModelFn,
                                                         build_examples, clip_encoder,
                                                         concept_loss, fixed_timesteps,
                                                         implied_noise, make_concept_projector,
                                                         make_side_feature_fn,
                                                         normalize_per_timestep,
                                                         per_timestep_grads, per_timestep_norms,
                                                         per_timestep_query_features,
                                                         QUERY_PAIRS, query_features,
                                                         reconstruction_guidance,
                                                         summed_grads, timestep_pairs,
                                                         train_features, training_loss,
                                                         trajectory_pairs, unet_model_fn)


def lambda_from_ratio(Phi_train, ratio: float) -> float:
    """``λ = ratio · 0.1 · mean(diag(ΦᵀΦ))`` = ``ratio · 0.1 · Σ_i ||φ_i||² / k``."""
    Phi = np.asarray(Phi_train, np.float64)
    return float(ratio * 0.1 * np.mean(np.sum(Phi * Phi, axis=0)))


def scores_from_features(phi_query, Phi_train, ratio: float, *,
                         solver: str = "primal") -> np.ndarray:
    """``φ_q (ΦᵀΦ + λI)⁻¹ Φᵀ`` with the ratio rule, ``[Q, N]`` (float64 solve).

    ``solver='primal'`` inverts the ``[k, k]`` kernel (the engine's path); ``'dual'`` uses the
    identity ``(ΦᵀΦ + λI)⁻¹ Φᵀ = Φᵀ (ΦΦᵀ + λI)⁻¹`` (λ > 0) and solves the ``[N, N]`` system
    instead — the same scores, for ``N ≪ k`` (e.g. k = 32768, whose float64 kernel alone is
    8 GiB).
    """
    lam = lambda_from_ratio(Phi_train, ratio)
    if solver == "dual":
        if not lam > 0:
            raise ValueError(f"solver='dual' needs λ > 0; ratio={ratio} gives λ={lam}")
        Phi = np.asarray(Phi_train, np.float64)
        G = Phi @ Phi.T
        G[np.diag_indices_from(G)] += lam
        rhs = Phi @ np.asarray(phi_query, np.float64).T  # [N, Q]
        return scipy.linalg.cho_solve(scipy.linalg.cho_factor(G, lower=True), rhs).T
    if solver != "primal":
        raise ValueError(f"solver={solver!r}: expected 'primal' or 'dual'")
    kinv = trak_kernel_inverse(Phi_train, lam)
    return np.asarray(score(phi_query, Phi_train, kinv, dtype=np.float64))  # [Q, N]


def choose_lambda_ratio(Phi_train, phi_val, val_relevant, ratios: Sequence[float] =
                        DEFAULT_RATIOS, *, k: int = 10):
    """Sweeps ``r`` on a *validation* split by mean Precision@k; ``(best_r, table)``.

    ``phi_val [Q_val, k]``, ``val_relevant [Q_val, N]`` bool. ``table``: list of
    ``{'ratio', 'lambda', 'precision_at_k'}`` in the order of ``ratios``; ties → the first.
    Pass validation queries only — never the evaluation queries.
    """
    if not len(ratios):
        raise ValueError("ratios is empty")
    val_relevant = np.asarray(val_relevant, bool)
    table = []
    for r in ratios:
        s = scores_from_features(phi_val, Phi_train, float(r))
        table.append({"ratio": float(r), "lambda": lambda_from_ratio(Phi_train, float(r)),
                      "precision_at_k": float(np.nanmean(precision_at_k(s, val_relevant, k)))})
    best = max(table, key=lambda row: row["precision_at_k"])  # max returns the first maximum
    return best["ratio"], table


def _contexts(encode: EncodeFn | None, contexts, prompts, name):
    if contexts is not None:
        return np.asarray(contexts)
    if encode is None:
        raise ValueError(f"{name}: give either an encode function or precomputed contexts")
    return np.asarray(encode(list(prompts)))


def uncond_context(encode: EncodeFn | None, config: ConceptTRAKConfig):
    """The empty prompt's context ``[L, D]`` when ``config`` inverts with CFG
    (``inversion_guidance`` ≠ 1), else None."""
    if config.inversion_guidance == 1.0:
        return None
    if encode is None:
        raise ValueError(f"inversion_guidance={config.inversion_guidance}: CFG inversion needs "
                         f"an encode function for the empty prompt")
    return np.asarray(encode([""]))[0]


def concept_trak_scores(unet_config, unet_params, encode: EncodeFn | None, train_images,
                        train_prompts, query_images, query_prompts, concepts,
                        config: ConceptTRAKConfig = ConceptTRAKConfig(),
                        sched: Schedule | None = None, *, model_fn: ModelFn | None = None,
                        train_contexts=None, return_features: bool = False,
                        query_pairs=None):
    """Concept-TRAK scores ``[Q, N]`` of ``N`` training images for ``Q`` (query, concept) rows.

    Args:
      unet_config, unet_params: the UNet port (or pass ``model_fn`` and any params).
      encode: ``encode(prompts) -> [B, L, D]`` (:func:`clip_encoder`, or any function);
        always needed for the query prompts and c⁻; ``train_contexts [N, L, D]`` may replace
        the encoding of ``train_prompts``.
      train_images ``[N,H,W,C]`` (pixels in [-1,1] or scaled latents), train_prompts ``[N]``.
      query_images ``[Q,H,W,C]``, query_prompts ``[Q]``, concepts ``[Q]`` (one concept per row;
        expand multi-concept prompts with :func:`concept_queries`).
      config: switches and sizes. sched: default ``make_schedule()`` (DDPM linear, 1000 steps).
      return_features: also return ``(Phi_train, phi_query)``.
      query_pairs: the queries' ``(xts, ts, noise)`` (:func:`trajectory_pairs`), needed with
        ``config.query_pairs = 'trajectory'``.
    Larger score = more attributed. Raises ``ValueError`` if a query prompt lacks its concept.
    """
    from jaxattrib.diffusion.schedule import make_schedule

    sched = sched or make_schedule()
    model_fn = model_fn or unet_model_fn(unet_config)
    if not len(query_prompts) == len(concepts) == len(query_images):
        raise ValueError(f"query_images ({len(query_images)}), query_prompts "
                         f"({len(query_prompts)}) and concepts ({len(concepts)}) must align")
    negs = [remove_concept(p, c) for p, c in zip(query_prompts, concepts)]
    ctx_tr = _contexts(encode, train_contexts, train_prompts, "train")
    ctx_q = _contexts(encode, None, query_prompts, "query")
    ctx_n = _contexts(encode, None, negs, "query c⁻")
    projector = make_concept_projector(unet_params, config)
    cache: dict = {}
    unc = uncond_context(encode, config)
    Phi = train_features(model_fn, unet_params, sched, train_images, ctx_tr, config, projector,
                         cache=cache, uncond_context=unc)
    phi = query_features(model_fn, unet_params, sched, query_images, ctx_q, ctx_n, config,
                         projector, cache=cache, uncond_context=unc, pairs=query_pairs)
    s = scores_from_features(phi, Phi, config.lam_ratio)
    return (s, (Phi, phi)) if return_features else s


def attribute_concepts(unet_config, unet_params, encode: EncodeFn, train_images, train_prompts,
                       query_image, prompt: str, concepts: Sequence[str] | str,
                       config: ConceptTRAKConfig = ConceptTRAKConfig(),
                       sched: Schedule | None = None, *, model_fn: ModelFn | None = None,
                       train_contexts=None, Phi_train=None, query_pairs=None):
    """Free-text concept query: one generated image, its prompt, one or more concept phrases.

    Each concept is attributed separately (:func:`concept_queries` builds its ``c⁻``); checked
    *before* any gradient is computed, so a concept the prompt does not contain raises
    ``ValueError`` naming the prompt and the concept. ``query_image [H, W, C]``.
    ``Phi_train [N, k]``: precomputed training features of the same ``config`` and projector
    (e.g. a benchmark's cache); computed otherwise. ``query_pairs``: the image's ``(xts [K,...],
    ts [K], noise [K,...])`` from its regenerated trajectory (:func:`trajectory_pairs`), needed
    with ``config.query_pairs = 'trajectory'``.

    Returns ``(queries, scores [C, N])``: the :class:`ConceptQuery` list and one score row per
    concept (larger = more attributed), λ by ``config.lam_ratio``.
    """
    from jaxattrib.diffusion.schedule import make_schedule

    queries = concept_queries(prompt, concepts)
    sched = sched or make_schedule()
    model_fn = model_fn or unet_model_fn(unet_config)
    projector = make_concept_projector(unet_params, config)
    cache: dict = {}
    unc = uncond_context(encode, config)
    if Phi_train is None:
        Phi_train = train_features(model_fn, unet_params, sched, train_images,
                                   _contexts(encode, train_contexts, train_prompts, "train"),
                                   config, projector, cache=cache, uncond_context=unc)
    images = np.repeat(np.asarray(query_image)[None], len(queries), axis=0)
    pairs = None if query_pairs is None else tuple(
        np.repeat(np.asarray(a)[None], len(queries), axis=0) for a in query_pairs)
    phi = query_features(model_fn, unet_params, sched, images,
                         np.asarray(encode([q.prompt for q in queries])),
                         np.asarray(encode([q.negative for q in queries])), config, projector,
                         cache=cache, uncond_context=unc, pairs=pairs)
    return queries, scores_from_features(phi, Phi_train, config.lam_ratio)


def feature_tag(side: str, config: ConceptTRAKConfig) -> str:
    """The name of a side's features under ``config``'s switches, e.g. ``'tl1_inv1_norm1'``
    (train) / ``'cl1_inv1_norm1'`` (query), plus ``_g{scale}`` for a CFG inversion and, on the
    query side, ``_traj`` for pairs from regenerated trajectories (:func:`ablation_table`'s
    cache files are ``{train,query,val}_<tag>.npy``)."""
    first, on = (("tl", config.training_loss) if side == "train"
                 else ("cl", config.concept_loss))
    tag = f"{first}{int(on)}_inv{int(config.ddim_inversion)}_norm{int(config.normalize)}"
    if side != "train" and config.query_from_trajectory:
        return tag + "_traj"
    return tag + (f"_g{config.inversion_guidance:g}" if config.needs_uncond else "")


def ablation_table(unet_config, unet_params, encode: EncodeFn, train_images, train_prompts,
                   query_images, query_prompts, concepts,
                   config: ConceptTRAKConfig = ConceptTRAKConfig(),
                   sched: Schedule | None = None, *, k: int = 10, val_images=None,
                   val_prompts=None, val_concepts=None,
                   ratios: Sequence[float] = DEFAULT_RATIOS, model_fn: ModelFn | None = None,
                   settings=ABLATION, relevant=None, val_relevant=None,
                   features_dir=None, train_contexts=None, query_pairs=None,
                   val_pairs=None) -> list[dict]:
    """Precision@k of the five settings (TRAK → … → +normalization) on the given queries.

    Each row: ``{'setting', 'precision_at_k' (mean over queries), 'per_query', 'ratio',
    'ratio_split', 'sweep', 'scores' [Q, N]}``. With a validation split (``val_*``), ``r`` is
    chosen per setting on it (:func:`choose_lambda_ratio`, ``'ratio_split' = 'validation'``);
    otherwise ``config.lam_ratio`` is used (``'ratio_split' = 'fixed'``). Relevance: a training
    prompt contains the query's concept (:func:`concept_relevance`), unless ``relevant [Q, N]``
    (and ``val_relevant``) bool are given. ``features_dir``: Φ and φ of every distinct
    switch combination are saved there (``{train,query,val}_<switches>.npy``) and loaded when
    present (the caller must use a fresh folder for other data, model or config).
    ``train_contexts [N, L, D]`` replaces the encoding of ``train_prompts``. ``query_pairs`` /
    ``val_pairs``: the rows' ``(xts, ts, noise)`` from their regenerated trajectories
    (:func:`trajectory_pairs`), used by the settings with inversion when
    ``config.query_pairs = 'trajectory'``. Feature names add ``_g{scale}`` for a CFG inversion
    and ``_traj`` for trajectory pairs, so each variant caches apart.
    """
    from jaxattrib.diffusion.schedule import make_schedule

    sched = sched or make_schedule()
    model_fn = model_fn or unet_model_fn(unet_config)
    ctx_tr = _contexts(encode, train_contexts, train_prompts, "train")
    rel = (concept_relevance(train_prompts, concepts) if relevant is None
           else np.asarray(relevant, bool))
    projector = make_concept_projector(unet_params, config)
    unc = uncond_context(encode, config)

    def q_inputs(prompts, cs):
        negs = [remove_concept(p, c) for p, c in zip(prompts, cs)]
        return np.asarray(encode(list(prompts))), np.asarray(encode(negs))

    cq, cn = q_inputs(query_prompts, concepts)
    use_val = val_images is not None
    if use_val:
        vq, vn = q_inputs(val_prompts, val_concepts)
        vrel = (concept_relevance(train_prompts, val_concepts) if val_relevant is None
                else np.asarray(val_relevant, bool))
    train_cache, query_cache, fn_cache, rows = {}, {}, {}, []

    def stored(name, compute):
        if features_dir is None:
            return compute()
        from pathlib import Path
        path = Path(features_dir) / f"{name}.npy"
        if path.exists():
            return np.load(path)
        arr = np.asarray(compute())
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, arr)
        tmp.replace(path)
        return arr

    for name, switches in settings:
        cfg = dataclasses.replace(config, **switches)
        tkey, qkey = feature_tag("train", cfg), feature_tag("query", cfg)
        if tkey not in train_cache:
            train_cache[tkey] = stored("train_" + tkey, lambda: train_features(
                model_fn, unet_params, sched, train_images, ctx_tr, cfg, projector,
                cache=fn_cache, uncond_context=unc))
        if qkey not in query_cache:
            q = stored("query_" + qkey, lambda: query_features(
                model_fn, unet_params, sched, query_images, cq, cn, cfg, projector,
                cache=fn_cache, uncond_context=unc, pairs=query_pairs))
            v = (stored("val_" + qkey, lambda: query_features(
                model_fn, unet_params, sched, val_images, vq, vn, cfg, projector,
                cache=fn_cache, uncond_context=unc, pairs=val_pairs)) if use_val else None)
            query_cache[qkey] = (q, v)
        Phi = train_cache[tkey]
        phi, phi_val = query_cache[qkey]
        sweep = None
        ratio = cfg.lam_ratio
        if use_val:
            ratio, sweep = choose_lambda_ratio(Phi, phi_val, vrel, ratios, k=k)
        s = scores_from_features(phi, Phi, ratio)
        per_q = precision_at_k(s, rel, k)
        rows.append({"setting": name, "precision_at_k": float(np.nanmean(per_q)),
                     "per_query": np.asarray(per_q), "ratio": ratio,
                     "ratio_split": "validation" if use_val else "fixed", "sweep": sweep,
                     "scores": s})
    return rows


__all__ = ["ABLATION", "ConceptQuery", "ConceptTRAKConfig", "DEFAULT_RATIOS", "EncodeFn",
           "ModelFn", "ablation_table", "attribute_concepts", "build_examples",
           "choose_lambda_ratio", "clip_encoder", "concept_loss", "concept_queries",
           "concept_relevance", "concept_trak_scores", "feature_tag", "fixed_timesteps",
           "has_concept",
           "implied_noise", "lambda_from_ratio", "make_concept_projector", "make_side_feature_fn",
           "normalize_per_timestep", "per_timestep_grads", "per_timestep_norms",
           "per_timestep_query_features", "query_features", "reconstruction_guidance",
           "remove_concept", "scores_from_features", "summed_grads", "timestep_pairs",
           "train_features", "training_loss", "trajectory_pairs", "uncond_context",
           "unet_model_fn", "QUERY_PAIRS"]
