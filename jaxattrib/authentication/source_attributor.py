"""``SourceModelAttributor``: was a suspicious model trained on my model's generations?

The public face of :mod:`jaxattrib.authentication.source_model` (Zhang et al., arXiv
2409.15781; methods.md §7) beside :class:`~jaxattrib.authentication.authenticator.
Authenticator` [design: issue 20]. It composes that module's functions as ``jaxattrib
source-model`` does (``runs/source_model.py``), so on the same models, prompts and keys it
gives that command's key samples, ``conf`` values, threshold and verdicts:

* key samples: :func:`~jaxattrib.authentication.source_model.select_key_samples` on the source,
  Strategy 1 ``'detection'`` (:func:`~jaxattrib.authentication.source_model.
  memorization_signal`, on noise of the UNet's sample shape), Strategy 2 ``'generation'``
  (cross − within distances to a reference model) or ``'random'`` [paper; the strategies'
  details are ours, see source_model's docstring];
* queries: every model generates the key prompts with the same seeds
  (:func:`~jaxattrib.authentication.source_model.query`, ``[S, N, H, W, 3]`` pixels; latent
  models are VAE-decoded by :func:`jaxattrib.generate.generate`);
* ``conf`` = hit rate ``mean(d < δ0)`` of the same-seed distances ``d [S, N]``
  (:func:`~jaxattrib.authentication.source_model.instance_distances`) [paper];
* threshold: :func:`~jaxattrib.authentication.source_model.calibrate_on_innocent` on innocent
  models only (and δ0 optionally :func:`~jaxattrib.authentication.source_model.
  calibrate_delta0` on them), never on the models under test [design]; ``conf ≥ threshold``
  ⇒ trained on the source's generations.

A *model* is a UNet parameter tree of the pipeline's architecture (generated with
:func:`~jaxattrib.authentication.source_model.pipeline_generate_fn`) or its generations
``[S, N, H, W, C]`` of the key prompts (seeds × key samples) made elsewhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Sequence

import jax
import numpy as np

from jaxattrib.authentication import source_model as sm
from jaxattrib.config import ConfigError

if TYPE_CHECKING:
    from jaxattrib.models.pipeline import Pipeline


def _bad(field: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"SourceModelAttributor: {field}={value!r}: expected {expected}")


class SourceModelAttributor:
    """Source-model attribution of suspicious models to a source model.

    ``SourceModelAttributor(pipe, source, seeds=(0,))``, then ``.select_keys(prompts, key)``,
    ``.calibrate(innocent_models)``, ``.decide(suspects) -> {'conf' [M], 'flagged' [M], ...}``.

    Args:
      pipe: a :class:`jaxattrib.models.pipeline.Pipeline` (architecture, scheduler, text
        encoder, VAE) shared by every model.
      source: the source model's UNet parameters (default ``pipe.unet_params``).
      seeds: query seeds ``S`` (seed ``s`` = ``PRNGKey(s)``); source and suspects use the same.
      metric: 'rmse' ([0, 1] pixel RMS) or 'ssim' (1 − SSIM) distance.
      delta0: hit distance δ0, or 'calibrated' (chosen on the innocent models in
        :meth:`calibrate` at ``innocent_hit_rate``).
      threshold: a fixed ``conf`` threshold used when :meth:`calibrate` is not called (the
        command's ``decision.threshold`` without innocent models); None: calibrate first.
      num_inference_steps, guidance_scale: sampling of the queries.

    Bad input raises :class:`~jaxattrib.config.ConfigError` naming the argument.
    """

    def __init__(self, pipe: "Pipeline", source: Any = None, *, seeds: Sequence[int] = (0,),
                 metric: Literal["rmse", "ssim"] = "rmse",
                 delta0: float | Literal["calibrated"] = sm.DEFAULT_DELTA0,
                 innocent_hit_rate: float = 0.05, threshold: float | None = None,
                 num_inference_steps: int = 25, guidance_scale: float = 3.0):
        seeds = tuple(seeds)
        if not seeds or not all(isinstance(s, (int, np.integer)) for s in seeds):
            raise _bad("seeds", seeds, "a non-empty sequence of integer seeds")
        if metric not in sm.METRICS:
            raise _bad("metric", metric, f"one of {sm.METRICS}")
        if delta0 != "calibrated" and (isinstance(delta0, str) or not delta0 > 0):
            raise _bad("delta0", delta0, "a positive distance or 'calibrated'")
        if not 0.0 < innocent_hit_rate < 1.0:
            raise _bad("innocent_hit_rate", innocent_hit_rate, "a number in (0, 1)")
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise _bad("threshold", threshold, "a conf threshold in [0, 1] or None")
        if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
            raise _bad("num_inference_steps", num_inference_steps, "a positive integer")
        self.pipe = pipe
        self.source = pipe.unet_params if source is None else source
        self.seeds, self.metric = [int(s) for s in seeds], metric
        self.delta0_setting, self.innocent_hit_rate = delta0, float(innocent_hit_rate)
        self.delta0: float | None = None if delta0 == "calibrated" else float(delta0)
        self.threshold = None if threshold is None else float(threshold)
        self._gen_kw = dict(num_inference_steps=int(num_inference_steps),
                            guidance_scale=float(guidance_scale))
        self.keys: sm.KeySamples | None = None
        self._source_images: np.ndarray | None = None

    def _generate_fn(self, params: Any) -> sm.GenerateFn:
        return sm.pipeline_generate_fn(self.pipe, params, **self._gen_kw)

    # ------------------------------------------------------------------------- key samples
    def select_keys(self, prompts: Sequence[str], key: jax.Array, *,
                    strategy: Literal["detection", "generation", "random"] = "detection",
                    n: int = sm.DEFAULT_N, detection_seeds: int = 4, reference: Any = None,
                    generation_seeds: Sequence[int] = (0, 1, 2)) -> sm.KeySamples:
        """Chooses ``n`` key prompts among ``prompts`` on the source (kept as ``self.keys``).

        ``key``: the noises of Strategy 1 (``detection_seeds`` of them) or the draw of
        ``'random'``. ``reference``: an independent model's UNet parameters (Strategy 2,
        generations with ``generation_seeds``). Returns
        :class:`~jaxattrib.authentication.source_model.KeySamples` (``indices``, ``prompts``,
        ``scores``, ``strategy``)."""
        from jaxattrib.diffusion.schedule import schedule_from_diffusers_config
        from jaxattrib.generate import latent_shape, make_eps_fn
        prompts = [str(p) for p in prompts]
        if not prompts or any(not p.strip() for p in prompts):
            raise _bad("prompts", prompts[:3], "a non-empty list of non-empty prompts")
        if strategy not in sm.STRATEGIES:
            raise _bad("strategy", strategy, f"one of {sm.STRATEGIES}")
        if not isinstance(n, (int, np.integer)) or not 1 <= n <= len(prompts):
            raise _bad("n", n, f"an integer in [1, {len(prompts)}] (the candidate prompts)")
        kw = {}
        if strategy == "detection":
            if not isinstance(detection_seeds, (int, np.integer)) or detection_seeds < 1:
                raise _bad("detection_seeds", detection_seeds, "a positive integer")
            sched = schedule_from_diffusers_config(self.pipe.scheduler_config)
            kw["memorization"] = np.asarray(sm.memorization_signal(
                make_eps_fn(self.pipe.unet_config, self.source), sched,
                self.pipe.encode_prompts(prompts), self.pipe.encode_prompts([""]), key,
                sample_shape=latent_shape(self.pipe, 1)[1:], n_seeds=int(detection_seeds)))
        elif strategy == "generation":
            if reference is None:
                raise _bad("reference", None, "an independent model's UNet parameters "
                                              "(strategy='generation')")
            if len(set(generation_seeds)) < 2:
                raise _bad("generation_seeds", tuple(generation_seeds), "at least 2 distinct "
                                                                        "seeds")
            seeds = list(generation_seeds)
            src = sm.query(self._generate_fn(self.source), prompts, seeds)
            kw["consistency"] = np.asarray(sm.within_distance(src, self.metric))
            kw["idiosyncrasy"] = np.asarray(sm.cross_distance(
                src, sm.query(self._generate_fn(reference), prompts, seeds), self.metric))
        self.keys = sm.select_key_samples(prompts, strategy, int(n), key=key, **kw)
        self._source_images = None
        return self.keys

    # ------------------------------------------------------------------------- queries
    def generations(self, model: Any) -> np.ndarray:
        """A model's generations of the key prompts, ``[S, N, H, W, C]`` float32 pixels in
        [-1, 1] (seeds × key samples); given generations are checked and returned."""
        if self.keys is None:
            raise ConfigError("SourceModelAttributor: keys is None: call select_keys(prompts, "
                              "key) first")
        want = (len(self.seeds), len(self.keys.prompts))
        if isinstance(model, (np.ndarray, jax.Array)):
            images = np.asarray(model, np.float32)
            src = self._source_images
            ok = images.ndim == 5 and images.shape[:2] == want and (
                src is None or images.shape == src.shape)
            if not ok:
                raise _bad("model", f"array of shape {images.shape}",
                           f"generations [S={want[0]}, N={want[1]}, H, W, C] (seeds × key "
                           f"samples{'' if src is None else f', images {src.shape[2:]}'})")
            return images
        return np.asarray(sm.query(self._generate_fn(model), self.keys.prompts, self.seeds),
                          np.float32)

    def source_generations(self) -> np.ndarray:
        """The source's generations ``[S, N, H, W, C]`` (computed once per key selection)."""
        if self._source_images is None:
            self._source_images = self.generations(self.source)
        return self._source_images

    def distances(self, model: Any) -> np.ndarray:
        """Same-seed distances ``d [S, N]`` of a model's key-sample generations to the
        source's (:func:`~jaxattrib.authentication.source_model.instance_distances`)."""
        src = self.source_generations()
        return np.asarray(sm.instance_distances(src, self.generations(model), self.metric))

    # ------------------------------------------------------------------------- decision
    def calibrate(self, innocent: Sequence[Any], *, fpr: float = 0.05) -> "SourceModelAttributor":
        """Threshold (and δ0 if ``delta0='calibrated'``) from models known to be innocent only.

        ``innocent``: models (see the module doc) not trained on the source's generations.
        δ0: :func:`~jaxattrib.authentication.source_model.calibrate_delta0` of their pooled
        distances; threshold: :func:`~jaxattrib.authentication.source_model.
        calibrate_on_innocent` of their ``conf`` at FPR <= ``fpr``. Returns ``self``."""
        innocent = list(innocent)
        if not innocent:
            raise _bad("innocent", [], "at least one innocent model")
        if not 0.0 <= fpr <= 1.0:
            raise _bad("fpr", fpr, "a number in [0, 1]")
        dists = [self.distances(m) for m in innocent]
        if self.delta0_setting == "calibrated":
            self.delta0 = sm.calibrate_delta0(dists, self.innocent_hit_rate)
        self.threshold = sm.calibrate_on_innocent(
            [float(np.mean(d < self.delta0)) for d in dists], fpr)
        return self

    def decide(self, suspects: Sequence[Any]) -> dict:
        """Verdicts on the suspects: ``{'conf': [M] hit rates, 'mean_distance': [M],
        'distances': [M, S, N], 'flagged': [M] bool (conf ≥ threshold), 'threshold',
        'delta0'}``."""
        if self.threshold is None or self.delta0 is None:
            field = "threshold" if self.threshold is None else "delta0"
            raise ConfigError(f"SourceModelAttributor: {field} is None: call "
                              f"calibrate(innocent_models) before decide (or pass a fixed "
                              f"threshold and delta0)")
        suspects = list(suspects)
        if not suspects:
            raise _bad("suspects", [], "at least one model to test")
        d = np.stack([self.distances(m) for m in suspects])
        conf = (d < self.delta0).mean(axis=(1, 2))
        return {"conf": conf, "mean_distance": d.mean(axis=(1, 2)), "distances": d,
                "flagged": conf >= self.threshold, "threshold": self.threshold,
                "delta0": self.delta0}


__all__ = ["SourceModelAttributor"]
