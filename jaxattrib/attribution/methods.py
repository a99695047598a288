"""One registry of the attribution methods: method name → how it is featurized and scored.

Every method name the CLI (``jaxattrib attribute --method``), the demo
(``attribution.methods``) and the benchmarks accept is a key of :data:`METHODS`; its
:class:`MethodSpec` says which family it belongs to, how its features are made and how they
become scores. :func:`method_scores` is the one features → scores dispatch; every score it
returns is ``[Q, N]`` (queries × training examples), larger = more attributed.

Families [design]:

* ``'trak'`` (``dtrak``, ``trak``, ``journey-trak``): projected per-example gradients of the
  method's output function (:func:`train_out_fn` for training examples, :func:`query_out_fn`
  for queries: Journey-TRAK's targets are trajectory steps), made by
  :func:`~jaxattrib.attribution.diffusion_trak.featurize_examples`; scored with the TRAK
  kernel at ``λ = lam_ratio · mean(diag(ΦᵀΦ))`` per checkpoint, averaged over a checkpoint
  ensemble (:func:`~jaxattrib.attribution.diffusion_trak.ensemble_scores`) [paper: methods.md
  §1–3].
* ``'tracin'``: the same features (TRAK's DSM loss) at every checkpoint of the record after
  step 0, ``Σ_s η_s ⟨φ_s(z), φ_s(z_i)⟩`` (:func:`~jaxattrib.attribution.trak.tracin_scores`)
  [paper: Pruthi et al. 2020].
* ``'concept-trak'``: concept-loss query gradients against DSM training gradients
  (:mod:`jaxattrib.attribution.concept_trak`), kernel with its own ratio rule
  ``λ = 0.1 · ratio · mean(diag(ΦᵀΦ))`` [paper: Concept-TRAK].
* ``'montrage'`` (``montrage`` = checkpoints weighted by representation movement,
  ``montrage-final`` = last checkpoint only): UNet-tap representation similarities over the
  record (:mod:`jaxattrib.attribution.montrage`) [design].
* ``'similarity'`` (``pixel``): cosine similarity of the flattened inputs (no model).
* ``'random'``: standard normal scores (a floor).

The :class:`~jaxattrib.attribution.attributor.Attributor` covers the ``'trak'`` and
``'tracin'`` families end to end; the others are scored here from what their modules compute.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from jaxattrib.attribution.method_names import (DEFAULT_CHECKPOINTS, FAMILIES, GRADIENT_METHODS,
                                                METHOD_FAMILIES)


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """How one attribution method is featurized and scored.

    ``name``: the method name (CLI / config); ``label``: its name in tables. ``family``: one
    of :data:`FAMILIES` (module doc).
    ``featurize``, ``score``: one line each on how, for docs and ``--help``. ``output``: the
    output function of the training features (``None``: not a gradient method; ``'config'``:
    ``AttributionConfig.output``, D-TRAK's choice). ``default_checkpoints``: the checkpoint
    ensemble when not given (``None``: not an ensemble method; ``'all'``: every checkpoint
    after step 0). ``query``: ``'examples'`` (``{'x0', 'ctx'}``) or ``'trajectory'``
    (Journey-TRAK: ``{'x0', 'ctx', 't'}`` of a sampling step). ``tunes``: what a validation
    sweep chooses (``'lam_ratio'``, ``'sign'``).
    """

    name: str
    label: str
    family: str
    featurize: str
    score: str
    output: str | None = None
    default_checkpoints: int | str | None = None
    query: str = "examples"
    tunes: tuple[str, ...] = ()


def _spec(name: str, *args, **kwargs) -> MethodSpec:
    """A registry entry, its family from
    :data:`~jaxattrib.attribution.method_names.METHOD_FAMILIES` (the one list of names)."""
    return MethodSpec(name, args[0], METHOD_FAMILIES[name], *args[1:], **kwargs)


_TRAK_SCORE = "TRAK kernel φ_q (ΦᵀΦ + λI)⁻¹ Φᵀ, λ = lam_ratio·mean diag(ΦᵀΦ), mean over checkpoints"

METHODS: dict[str, MethodSpec] = {s.name: s for s in (
    _spec("dtrak", "D-TRAK", "projected ∇ of D-TRAK's output (default mean ε_θ²) at K uniform "
          "timesteps, noise per batch position", _TRAK_SCORE, output="config",
          default_checkpoints=DEFAULT_CHECKPOINTS["dtrak"], tunes=("lam_ratio", "sign")),
    _spec("trak", "TRAK", "projected ∇ of the DSM loss at K uniform timesteps",
          _TRAK_SCORE, output="loss", default_checkpoints=DEFAULT_CHECKPOINTS["trak"],
          tunes=("lam_ratio", "sign")),
    _spec("journey-trak", "Journey-TRAK", "train: projected ∇ of the DSM loss at K random "
          "timesteps; query: x̂0 of a sampling step re-noised to its t (R draws)",
          _TRAK_SCORE, output="loss", default_checkpoints=DEFAULT_CHECKPOINTS["journey-trak"],
          query="trajectory",
          tunes=("lam_ratio",)),
    _spec("tracin", "TracIn", "projected ∇ of the DSM loss at every checkpoint after step 0",
          "Σ_s η_s φ_s(q)·Φ_sᵀ (η_s: learning rate of the update that made checkpoint s)",
          output="loss", default_checkpoints="all", tunes=("sign",)),
    _spec("concept-trak", "Concept-TRAK", "query: projected ∇ of the concept loss; "
          "train: projected ∇ of the DSM loss (concept_trak.py)",
          "TRAK kernel with λ = 0.1·ratio·mean diag(ΦᵀΦ)", output="loss",
          tunes=("lam_ratio",)),
    _spec("montrage", "MONTRAGE (trajectory)", "pooled UNet-tap representations at every checkpoint",
          "similarities weighted by each training image's representation movement"),
    _spec("montrage-final", "MONTRAGE final-only", "pooled UNet-tap representations, last "
          "checkpoint", "similarity at the last checkpoint"),
    _spec("pixel", "pixel similarity", "the flattened inputs", "cosine similarity"),
    _spec("random", "random", "none", "standard normal scores (a floor)"),
)}


def method_spec(name: str) -> MethodSpec:
    """The :class:`MethodSpec` of ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"method={name!r}: expected one of {tuple(METHODS)}") from None


def gradient_methods() -> tuple[str, ...]:
    """The methods featurized by per-example gradients of ``diffusion_trak``'s output
    functions (the ``'trak'`` and ``'tracin'`` families: what the Attributor runs)."""
    return GRADIENT_METHODS


# ----------------------------------------------------------------------------- featurize

def train_out_fn(method: str, unet_config, sched, config):
    """``out_fn(unet_params, {'x0', 'ctx'[, 'index']}, key) -> scalar`` of ``method``'s
    training features (``config``: an ``AttributionConfig`` whose ``method`` is ``method``;
    TracIn uses TRAK's DSM loss)."""
    from jaxattrib.attribution import diffusion_trak as dt
    _check_gradient(method, config)
    return dt.make_train_out_fn(unet_config, sched, config)


def query_out_fn(method: str, unet_config, sched, config):
    """``out_fn`` of ``method``'s query features: the training one, except Journey-TRAK's
    trajectory targets ``{'x0': x̂0 at step t, 'ctx', 't'}``
    (:func:`~jaxattrib.attribution.diffusion_trak.make_journey_target_out_fn`)."""
    from jaxattrib.attribution import diffusion_trak as dt
    if method_spec(method).query == "trajectory":
        _check_gradient(method, config)
        return dt.make_journey_target_out_fn(unet_config, sched, config)
    return train_out_fn(method, unet_config, sched, config)


def _check_gradient(method: str, config) -> None:
    spec = method_spec(method)
    if spec.family not in ("trak", "tracin"):
        raise ValueError(f"method={method!r} ({spec.family}) is not featurized by "
                         f"diffusion_trak's output functions; those are {gradient_methods()}")
    if config.method != method:
        raise ValueError(f"config.method={config.method!r} but method={method!r}: the "
                         f"AttributionConfig must name the method it featurizes")


def model_inputs(pipe, images, captions) -> dict:
    """``{'x0', 'ctx'}`` a pipeline's UNet sees for pixel ``images [N, H, W, 3]`` (in [-1, 1])
    and their ``captions [N]``: VAE latents (posterior mean × scaling factor) for a latent
    pipeline, the pixels otherwise; ``ctx [N, L, D]`` the text encoder's states."""
    from jaxattrib.diffusion.latents import encode_images
    ctx = np.asarray(pipe.encode_prompts([str(c) for c in captions]))
    return {"x0": np.asarray(encode_images(pipe.vae_config, pipe.vae_params, images)),
            "ctx": ctx}


# ----------------------------------------------------------------------------- score

def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def pixel_similarity(query: np.ndarray, train: np.ndarray, dtype=None) -> np.ndarray:
    """Cosine similarity ``[Q, N]`` of flattened ``query [Q, ...]`` and ``train [N, ...]``,
    computed in ``dtype`` (default: the inputs' dtype)."""
    a = np.asarray(query).reshape(len(query), -1)
    b = np.asarray(train).reshape(len(train), -1)
    if dtype is not None:
        a, b = a.astype(dtype), b.astype(dtype)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def method_scores(method: str, phi_query: Any, Phi_train: Any = None, *,
                  lam_ratio: float = 1.0, learning_rates: Sequence[float] | None = None,
                  record=None, seed: int = 0, dtype=None) -> np.ndarray:
    """Scores ``[Q, N]`` (larger = more attributed) of ``method`` from its features.

    What ``phi_query`` / ``Phi_train`` are, per family (:data:`METHODS`):

    * ``'trak'``: ``[Q, k]`` / ``[N, k]`` arrays, or lists of them (one per checkpoint of the
      ensemble); ``lam_ratio`` sets each checkpoint's ``λ``
      (:func:`~jaxattrib.attribution.diffusion_trak.ensemble_scores`).
    * ``'tracin'``: lists, one per checkpoint, and ``learning_rates`` (one per checkpoint);
      ``dtype`` the compute dtype (default float32).
    * ``'concept-trak'``: ``[Q, k]`` / ``[N, k]``; ``lam_ratio`` is Concept-TRAK's ratio.
    * ``'montrage'``: ``phi_query`` is the
      :class:`~jaxattrib.attribution.montrage.RepTrajectory` (both sides inside),
      ``Phi_train`` unused; ``record`` (the trajectory record) for ``montrage``'s movement
      weights.
    * ``'similarity'``: the inputs themselves (``[Q, ...]`` / ``[N, ...]``), ``dtype`` the
      compute dtype.
    * ``'random'``: anything with a length (``Q`` and ``N``); ``seed``.
    """
    family = method_spec(method).family
    if family == "trak":
        from jaxattrib.attribution import diffusion_trak as dt
        return dt.ensemble_scores(_as_list(phi_query), _as_list(Phi_train), lam_ratio)
    if family == "tracin":
        from jaxattrib.attribution import trak as trak_lib
        if learning_rates is None:
            raise ValueError("method='tracin' needs learning_rates (one per checkpoint)")
        return np.asarray(trak_lib.tracin_scores(_as_list(phi_query), _as_list(Phi_train),
                                                 list(learning_rates),
                                                 dtype=np.float32 if dtype is None else dtype))
    if family == "concept-trak":
        from jaxattrib.attribution import concept_trak as ct
        return np.asarray(ct.scores_from_features(phi_query, Phi_train, lam_ratio))
    if family == "montrage":
        from jaxattrib.attribution import montrage
        if method == "montrage-final":
            return np.asarray(montrage.trajectory_scores(phi_query, "final"))
        return np.asarray(montrage.trajectory_scores(phi_query, "movement", record=record,
                                                     seen="count"))
    if family == "similarity":
        return pixel_similarity(phi_query, Phi_train, dtype)
    return np.random.default_rng(seed).standard_normal((len(phi_query), len(Phi_train)))


__all__ = ["FAMILIES", "METHODS", "MethodSpec", "gradient_methods", "method_scores",
           "method_spec", "model_inputs", "pixel_similarity", "query_out_fn", "train_out_fn"]
