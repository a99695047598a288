"""The demo's attribution stage: every method's scores of the generated queries.

:func:`attribute_stage` scores each query against the fine-tuning set with every method of
``attribution.methods`` (D-TRAK, TRAK, Journey-TRAK, TracIn, Concept-TRAK, MONTRAGE, pixel
similarity, random), choosing λ / ensemble settings (Journey-TRAK: also the sampling step) on
the validation queries (:func:`_validation_mask`); scores are cached under ``scores/`` and
``features/`` of the run directory, keyed by the data fingerprint (:func:`_space_fingerprint`),
so a rerun recomputes nothing. Inputs are the model's inputs (:func:`_examples`: pixels, or
VAE latents = posterior mean for a latent base model).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np

from jaxattrib.config import ConfigError
from jaxattrib.fileio import atomic_save_npy, atomic_write_text
from jaxattrib.fingerprint import raw_arrays as _fingerprint_of  # recipe of stored cache keys
from jaxattrib.fingerprint import text as fingerprint_text
from jaxattrib.runs.rundir import RunDir

logger = logging.getLogger(__name__)


# Version of the cached score files: 2 = TRAK / Journey-TRAK / TracIn no longer negated (see
# jaxattrib.attribution.diffusion_trak's module doc); bump when cached scores change meaning.
SCORES_VERSION = "2"


def _examples(pipe, images, captions) -> dict:
    """``{'x0', 'ctx'}`` for featurization: for a latent base model ``x0`` are the images' VAE
    latents (posterior mean, :mod:`jaxattrib.diffusion.latents`), else the pixels
    (:func:`jaxattrib.attribution.methods.model_inputs`)."""
    from jaxattrib.attribution.methods import model_inputs
    return model_inputs(pipe, images, captions)


def _space_fingerprint(pipe, fingerprint: str) -> str:
    """A feature-store fingerprint of pixel data, keyed also by the VAE for latent models."""
    if not pipe.is_latent:
        return fingerprint
    from jaxattrib.diffusion.latents import LATENT_RULE, vae_fingerprint
    return fingerprint_text(f"{fingerprint}|latents={LATENT_RULE}|"
                            f"{vae_fingerprint(pipe.vae_config, pipe.vae_params)}")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One ground truth under which λ (and, optionally, the sign) of each method is chosen.

    Attributes:
      relevant: ``[Q, N]`` bool, the training images each query should be attributed to.
      val: ``[Q]`` bool, the validation queries that choose λ; never use them for evaluation.
      candidates: optional ``[Q, N]`` bool with the same count per row: the validation metric
        ranks only these training images (e.g. the query concept's exemplars, for
        within-concept attribution); ``None`` ranks all ``N``.
    """

    relevant: np.ndarray
    val: np.ndarray
    candidates: np.ndarray | None = None

    def val_map(self, scores: np.ndarray) -> float:
        """Mean average precision of ``scores [Q, N]`` over the validation queries."""
        from jaxattrib.metrics import average_precision, restrict_to_candidates
        s, r = scores[self.val], self.relevant[self.val]
        if self.candidates is not None:
            s, r = restrict_to_candidates(s, r, self.candidates[self.val])
        return float(np.nanmean(average_precision(s, r)))


def attribute_stage(run_dir: Path, config, pipe, unet_params, train: dict, queries: dict,
                    fingerprint: str, step: int, progress: bool = True) -> dict[str, np.ndarray]:
    """Scores ``[Q, N]`` per method (larger = more attributed), cached in ``scores/``; λ is
    chosen on the validation half of each concept's queries, ground truth = the exemplars of the
    query's concept."""
    relevant = queries["concept"][:, None] == train["concept"][None, :]
    variant = Variant(relevant, _validation_mask(queries["concept"]))
    return attribute_variants(run_dir, config, pipe, unet_params, train, queries, fingerprint,
                              step, {"": variant}, progress)[""]


def attribute_variants(run_dir: Path, config, pipe, unet_params, train: dict, queries: dict,
                       fingerprint: str, step: int, variants: dict[str, Variant],
                       progress: bool = True) -> dict[str, dict[str, np.ndarray]]:
    """Scores ``{variant: {method: [Q, N]}}`` (larger = more attributed) for
    ``config.attribution.methods``.

    Each method yields candidate score matrices — TRAK / D-TRAK: one per λ ratio of
    ``attribution.lambda_ratios``; Concept-TRAK: one per ratio; with ``attribution.tune_sign``
    (absent = False) also the negated TRAK / D-TRAK / TracIn scores; the other methods: one.
    Per variant the candidate with the best validation mAP (:meth:`Variant.val_map`) is kept
    and saved to ``scores/<variant>/<method>.npy`` (``scores/<method>.npy`` for the variant
    ``''``), the sweep to ``<method>_lambda.json`` beside it. Features are cached per method in
    ``features/`` and computed once for all variants; a method whose score files all exist is
    loaded, not recomputed.
    """
    from jaxattrib.diffusion.schedule import schedule_from_diffusers_config
    sched = schedule_from_diffusers_config(pipe.scheduler_config)
    train_ex = _examples(pipe, train["images"], train["captions"])
    query_ex = _examples(pipe, queries["images"], queries["prompts"])
    fingerprint = _space_fingerprint(pipe, fingerprint)
    out: dict[str, dict[str, np.ndarray]] = {name: {} for name in variants}
    version = RunDir(run_dir).scores / "VERSION"
    # Score files of another scoring version (or of none: made before versions) are recomputed
    # from the cached features; nothing else is discarded.
    if not (version.is_file() and version.read_text().strip() == SCORES_VERSION):
        for stale in RunDir(run_dir).scores.rglob("*.npy"):
            stale.unlink()
        version.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(version, SCORES_VERSION + "\n")
    for method in config.attribution.methods:
        folders = {name: RunDir(run_dir).scores / name if name else RunDir(run_dir).scores
                   for name in variants}
        if all((f / f"{method}.npy").exists() for f in folders.values()):
            for name, f in folders.items():
                out[name][method] = np.load(f / f"{method}.npy")
            continue
        logger.info("[jaxattrib demo %s] attribution: %s", time.strftime('%H:%M:%S'), method)
        cands, sweep_meta = _candidate_scores(method, run_dir, config, pipe, unet_params, sched,
                                              train_ex, query_ex, train, queries, fingerprint,
                                              step, progress)
        labels = list(cands)
        for name, variant in variants.items():
            folders[name].mkdir(parents=True, exist_ok=True)
            best = labels[0]
            if len(labels) > 1:
                sweep = [variant.val_map(cands[label]) for label in labels]
                best = labels[int(np.argmax(sweep))]
                atomic_write_text(folders[name] / f"{method}_lambda.json", json.dumps(
                    {"split": "validation queries", **sweep_meta, "candidates": labels,
                     "val_mAP": sweep, "chosen": best}, indent=2))
            s = np.asarray(cands[best], np.float32)
            atomic_save_npy(folders[name] / f"{method}.npy", s)
            out[name][method] = s
    return out


def _candidate_scores(method: str, run_dir: Path, config, pipe, unet_params, sched, train_ex,
                      query_ex, train: dict, queries: dict, fingerprint: str, step: int,
                      progress: bool) -> tuple[dict[str, np.ndarray], dict]:
    """``({label: scores [Q, N]}, sweep metadata)`` for one method (see
    :func:`attribute_variants`)."""
    from jaxattrib.attribution import diffusion_trak as dt
    from jaxattrib.attribution.methods import method_scores
    a = config.attribution
    flip = a.get("tune_sign", False) and method in ("trak", "dtrak", "tracin")
    meta: dict = {}
    if method == "pixel":
        cands = {"pixel": method_scores("pixel", queries["images"], train["images"])}
    elif method == "random":
        cands = {"random": method_scores("random", queries["images"], train["images"],
                                         seed=config.seed)}
    elif method in ("trak", "dtrak", "tracin"):
        # a run config from before attribution.noise existed: 'shared' (its stores resume)
        ac = dt.AttributionConfig.from_section(a, method=method, noise=a.get("noise", "shared"))
        out_fn = dt.make_train_out_fn(pipe.unet_config, sched, ac)
        q_fp = _space_fingerprint(pipe, _fingerprint_of(queries["images"]))
        ens = a.get("checkpoints", 1)
        if method == "tracin":
            cands = {"tracin": _tracin_scores(run_dir, pipe, ac, out_fn, train_ex, query_ex,
                                              fingerprint, q_fp, progress)}
        elif ens != 1:
            cands, meta = _ensemble_candidates(run_dir, a, ac, out_fn, train_ex, query_ex,
                                               fingerprint, q_fp, progress)
        else:
            feats = RunDir(run_dir).features / method
            Phi = dt.featurize_examples(out_fn, unet_params, train_ex, ac, feats / "train",
                                        fingerprint=fingerprint, step=step, progress=progress)
            phi = dt.featurize_examples(out_fn, unet_params, query_ex, ac, feats / "queries",
                                        fingerprint=q_fp, step=step, role="query",
                                        progress=progress)
            lams = dt.relative_lambdas(Phi, a.lambda_ratios)
            meta = {"ratios": list(a.lambda_ratios), "lambdas": lams}
            cands = {f"ratio={r:g}": method_scores(method, phi, Phi, lam_ratio=r)
                     for r in a.lambda_ratios}
    elif method == "journey-trak":
        cands, meta = _journey_candidates(run_dir, config, pipe, unet_params, sched, train_ex,
                                          query_ex, fingerprint, step, progress)
    elif method in ("montrage", "montrage-final"):
        cands = {method: _montrage_scores(run_dir, pipe, train_ex, query_ex,
                                          "final" if method == "montrage-final" else "movement",
                                          progress)}
    elif method == "concept-trak":
        cands = _concept_trak_candidates(config, pipe, unet_params, sched, train, queries,
                                         train_ex, query_ex, run_dir)
        meta = {"ratios": list(a.lambda_ratios)}
    else:
        raise ConfigError(f"attribution.methods: unknown method {method!r}")
    if flip:
        cands.update({f"{label}, sign flipped": -s for label, s in list(cands.items())})
    return cands, meta


def _ensemble_candidates(run_dir: Path, a, ac, out_fn, train_ex, query_ex, fingerprint: str,
                         query_fingerprint: str, progress: bool) -> tuple[dict, dict]:
    """TRAK / D-TRAK over a checkpoint ensemble (``attribution.checkpoints`` = the last M
    checkpoints after step 0, or a tuple of steps): per λ ratio, the mean of the checkpoints'
    scores (:func:`~jaxattrib.attribution.diffusion_trak.ensemble_scores`); features in
    ``features/<method>/step_<s>/``."""
    from jaxattrib.attribution import diffusion_trak as dt
    from jaxattrib.train.record import TrajectoryRecord
    record = TrajectoryRecord.open(RunDir(run_dir).record.resolve())
    try:
        steps = dt.ensemble_steps(tuple(a.checkpoints) if isinstance(a.checkpoints, (list, tuple))
                                  else a.checkpoints, record.steps(), ac.method)
    except ValueError as e:
        record.close()
        raise ConfigError(f"attribution.{e}") from e
    Phis, phis = [], []
    for s in steps:
        p = record.load(s)["unet"]
        base = RunDir(run_dir).feature_dir(ac.method, s)
        Phis.append(dt.featurize_examples(out_fn, p, train_ex, ac, base / "train",
                                          fingerprint=fingerprint, step=s, progress=progress))
        phis.append(dt.featurize_examples(out_fn, p, query_ex, ac, base / "queries",
                                          fingerprint=query_fingerprint, step=s, role="query",
                                          progress=progress))
    record.close()
    from jaxattrib.attribution.methods import method_scores
    return ({f"ratio={r:g}": method_scores(ac.method, phis, Phis, lam_ratio=r)
             for r in a.lambda_ratios},
            {"ratios": list(a.lambda_ratios), "checkpoints": steps})


def _tracin_scores(run_dir: Path, pipe, ac, out_fn, train_ex, query_ex, fingerprint: str,
                   query_fingerprint: str, progress: bool) -> np.ndarray:
    """TracIn ``[Q, N]`` over the record's checkpoints after step 0, each weighted by the
    learning rate of the update that produced it; features in ``features/tracin/step_<s>/``."""
    from jaxattrib.attribution import diffusion_trak as dt
    from jaxattrib.attribution.methods import method_scores
    from jaxattrib.train.record import TrajectoryRecord
    record = TrajectoryRecord.open(RunDir(run_dir).record.resolve())
    Phis, phis, lrs = [], [], []
    for s in record.steps()[1:]:
        p = record.load(s)["unet"]
        base = RunDir(run_dir).feature_dir("tracin", s)
        Phis.append(dt.featurize_examples(out_fn, p, train_ex, ac, base / "train",
                                          fingerprint=fingerprint, step=s, progress=progress))
        phis.append(dt.featurize_examples(out_fn, p, query_ex, ac, base / "queries",
                                          fingerprint=query_fingerprint, step=s, role="query",
                                          progress=progress))
        lrs.append(record.step_info(s - 1)["lr"])
    record.close()
    return method_scores("tracin", phis, Phis, learning_rates=lrs)


#: Journey-TRAK's sampling-step candidates [design]: fractions of the trajectory (0 = the first,
#: noisiest step; 1 = the last), each step's scores and their mean chosen on validation
JOURNEY_STEP_FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def _journey_candidates(run_dir: Path, config, pipe, unet_params, sched, train_ex, query_ex,
                        fingerprint: str, step: int, progress: bool) -> tuple[dict, dict]:
    """Journey-TRAK [paper: Georgiev et al. 2023]: training features = projected DSM-loss
    gradients at K random timesteps; a query's features at sampling step ``i`` = the gradient
    of the DSM loss of its x̂0 at that step re-noised to the step's ``t`` (R draws,
    ``attribution.journey_resamples``), from ``generations/trajectory.npz``. One candidate per
    (step of ``attribution.journey_steps`` — fractions of the trajectory, default
    :data:`JOURNEY_STEP_FRACTIONS` — λ ratio), plus the mean over those steps per ratio."""
    from jaxattrib.attribution import diffusion_trak as dt
    from jaxattrib.attribution.methods import method_scores, query_out_fn
    a = config.attribution
    ac = dt.AttributionConfig.from_section(a, method="journey-trak",
                                           noise=a.get("noise", "shared"))
    tpath = RunDir(run_dir).generations / "trajectory.npz"
    from jaxattrib.diffusion.sampling import Trajectory
    with np.load(tpath) as z:
        x0s, ts = z["x0_preds"], z["timesteps"]
    traj = Trajectory(timesteps=ts, xs=None, x0_preds=x0s)   # image axis first, as stored
    S = x0s.shape[1]
    fractions = a.get("journey_steps", JOURNEY_STEP_FRACTIONS)
    idx = sorted({int(round(f * (S - 1))) for f in fractions})
    feats = RunDir(run_dir).features / "journey-trak"
    Phi = dt.featurize_examples(dt.make_train_out_fn(pipe.unet_config, sched, ac), unet_params,
                                train_ex, ac, feats / "train", fingerprint=fingerprint,
                                step=step, progress=progress)
    q_fn = query_out_fn("journey-trak", pipe.unet_config, sched, ac)
    cands: dict[str, np.ndarray] = {}
    per_step = {r: [] for r in a.lambda_ratios}
    for i in idx:
        tg = dt.journey_targets(traj, query_ex["ctx"], i)
        phi = dt.featurize_examples(q_fn, unet_params, tg, ac, feats / f"queries_step{i}",
                                    fingerprint=_space_fingerprint(pipe, _fingerprint_of(
                                        x0s[:, i])), step=step, role="query",
                                    progress=progress)
        for r in a.lambda_ratios:
            s = method_scores("journey-trak", phi, Phi, lam_ratio=r)
            cands[f"step {i}/{S - 1}, ratio={r:g}"] = s
            per_step[r].append(s)
    if len(idx) > 1:
        cands.update({f"mean of steps {idx}, ratio={r:g}": np.mean(v, axis=0)
                      for r, v in per_step.items()})
    return cands, {"ratios": list(a.lambda_ratios), "sampling_steps": idx,
                   "lambdas": dt.relative_lambdas(Phi, a.lambda_ratios)}


def _montrage_scores(run_dir: Path, pipe, train_ex, query_ex, how: str, progress: bool):
    """MONTRAGE [design, see attribution/montrage.py]: UNet-tap similarities at every
    checkpoint of the record; 'movement' weights checkpoints by how far each training image's
    representation moved while it was trained on; 'final' is the last checkpoint only.
    ``train_ex`` / ``query_ex``: :func:`_examples` (model inputs: VAE latents, posterior mean,
    for a latent base model — the same latents at every checkpoint)."""
    from jaxattrib.attribution import montrage
    from jaxattrib.train.record import TrajectoryRecord
    record = TrajectoryRecord.open(RunDir(run_dir).record.resolve())
    traj = montrage.representation_trajectory(
        record, pipe.unet_config, train_ex["x0"], train_ex["ctx"], query_ex["x0"],
        query_ex["ctx"], cache_dir=RunDir(run_dir).features / "montrage", progress=progress)
    from jaxattrib.attribution.methods import method_scores
    return method_scores("montrage-final" if how == "final" else "montrage", traj,
                         record=record)


def _concept_trak_candidates(config, pipe, unet_params, sched, train, queries, train_ex,
                             query_ex, run_dir=None):
    """Concept-TRAK with the query concept = '<color> <shape>' of each query prompt: one score
    matrix per λ ratio of ``attribution.lambda_ratios``.

    Runs on the model inputs of :func:`_examples` (``train_ex`` / ``query_ex`` ``{'x0',
    'ctx'}``): the pixels of a pixel base model; for a latent one the VAE latents, encoded once
    with the posterior mean (the rule of ``concept-query`` and the Concept-TRAK benchmark,
    docs/latent_methods.md) — the DDIM inversion and the gradients run on the latents. With
    ``attribution.concept_query_pairs = 'trajectory'`` the queries' pairs come from their
    regenerated trajectories (:func:`~jaxattrib.runs.concept_query.cached_query_pairs`)."""
    from jaxattrib.attribution import concept_trak as ct
    a = config.attribution
    cfg = ct.ConceptTRAKConfig.from_section(a)   # param_spec: concept_params, else 'attn2'
    concepts = [" ".join(str(p).split()[1:3]) for p in queries["prompts"]]
    encode = lambda prompts: np.asarray(pipe.encode_prompts(list(prompts)))  # noqa: E731
    pairs = None
    if cfg.query_from_trajectory:
        from jaxattrib.runs.concept_pairs import cached_query_pairs
        pairs = cached_query_pairs(run_dir, config, pipe, unet_params, queries["prompts"], cfg)
    _, (Phi, phi) = ct.concept_trak_scores(
        pipe.unet_config, unet_params, encode, train_ex["x0"], list(train["captions"]),
        query_ex["x0"], list(queries["prompts"]), concepts, cfg, sched,
        train_contexts=train_ex["ctx"], return_features=True, query_pairs=pairs)
    from jaxattrib.attribution.methods import method_scores
    return {f"ratio={r:g}": method_scores("concept-trak", phi, Phi, lam_ratio=r)
            for r in a.lambda_ratios}


def _validation_mask(groups: np.ndarray) -> np.ndarray:
    """First half of each group's queries (in order) validate λ; the rest are test queries.
    The demo groups by concept; the customization benchmark by (concept, variation)."""
    val = np.zeros(len(groups), bool)
    for c in np.unique(groups):
        idx = np.flatnonzero(groups == c)
        val[idx[: len(idx) // 2]] = True
    return val


__all__ = ["SCORES_VERSION", "Variant", "attribute_stage", "attribute_variants"]
