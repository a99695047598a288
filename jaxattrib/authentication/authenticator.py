"""``Authenticator``: CGI-DM copyright authentication of images against a fine-tuned model.

The public face of :mod:`jaxattrib.authentication.cgi_dm` in the style of the attribution
side's :class:`~jaxattrib.attribution.attributor.Attributor` [design: issue 20]: construct it
once per (pretrained, fine-tuned) pair, ``.calibrate`` on known non-members (a calibration
split), then ``.score`` / ``.decide`` query images. It only composes the module's functions,
wired as ``jaxattrib cgi-dm`` wires them (``runs/cgi_dm.py``), so on the same images, captions
and keys it gives that command's numbers exactly:

* recovery: :func:`~jaxattrib.authentication.cgi_dm.recover` (latent mask, L2-PGD on the
  contrastive objective ``L_pre − L_ft``, decode) [paper: methods.md §6; code: Revelio]; on a
  latent pipeline PGD runs on the VAE latent with the shared codec
  :func:`jaxattrib.models.latent_io.vae_codec` [code];
* score ``[N]``: :func:`~jaxattrib.authentication.cgi_dm.recovery_scores`, the similarity of
  each image to its own recovery (SSIM with the largest odd window <= 11 that fits, or PSNR);
  larger ⇒ more member-like [paper];
* decision: :func:`~jaxattrib.authentication.cgi_dm.decide` against the calibration scores
  only (``score ≥ threshold`` ⇒ used in fine-tuning; empirical p-values) [design];
* baselines: :func:`~jaxattrib.authentication.cgi_dm.loss_gap_scores` (no inversion) and
  :func:`~jaxattrib.authentication.cgi_dm.masked_similarity_scores` (no model), as the demo's
  CGI-DM stage reports them.

Examples are ``{'images': [n, H, W, 3] pixels in [-1, 1], 'captions': [n] str}`` with ``H = W``
the model's image size (UNet ``sample_size`` × VAE factor). Every random choice comes from the
explicit keys: image ``i``'s mask / PGD noise from ``fold_in(key, i)``, its VAE posterior sample
(``vae_posterior='sample'``) from ``fold_in(encode_key, i)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import jax
import numpy as np

from jaxattrib.authentication import cgi_dm
from jaxattrib.authentication.cgi_dm_pgd import CGIDMConfig
from jaxattrib.config import ConfigError

if TYPE_CHECKING:
    from jaxattrib.models.pipeline import Pipeline

SIMILARITIES = ("ssim", "psnr")
POSTERIORS = ("mean", "sample")
TARGETS = ("fpr", "accuracy")


def _check(ok: bool, field: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"Authenticator: {field}={value!r}: expected {expected}")


class Authenticator:
    """Was image x used to fine-tune ``finetuned`` from ``pretrained``? (CGI-DM)

    ``Authenticator(pipe, finetuned, config=CGIDMConfig(...))``, then
    ``.calibrate(non_members, key=...)`` (known non-members: the calibration split),
    ``.score(images, key) -> [N]``, ``.decide(images, key) -> {'scores', 'p_values',
    'decisions', 'threshold'}``, ``.baselines(images, key)``.

    Args:
      pipe: a :class:`jaxattrib.models.pipeline.Pipeline` (UNet config, scheduler, text encoder,
        VAE for latent pipelines); its UNet is the pretrained model unless ``pretrained`` is given.
      finetuned: UNet parameters of the fine-tuned model (same tree, shapes and dtypes as the
        pretrained ones, e.g. ``load_pipeline(ft_folder).unet_params``).
      config: :class:`~jaxattrib.authentication.cgi_dm.CGIDMConfig` (mask, PGD radius / step /
        steps, timesteps); default the authors' (1000 PGD steps).
      pretrained: UNet parameters of the pretrained model (default ``pipe.unet_params``).
      similarity: 'ssim' | 'psnr' (original vs recovered, data range 2).
      vae_posterior: latent pipelines: 'sample' (one posterior sample per image from
        ``encode_key``, the authors' code and ``jaxattrib cgi-dm``'s default) or 'mean'.
      target, fpr: calibration rule of :func:`~jaxattrib.authentication.cgi_dm.calibrate`:
        'fpr' (threshold at FPR <= ``fpr`` on the non-members) or 'accuracy' (needs members).
      batch_size: images per PGD batch (the last one is padded, so PGD compiles once).
      mesh: a device mesh with a ``'data'`` axis to shard each batch over (optional).

    Bad input raises :class:`~jaxattrib.config.ConfigError` naming the argument.
    """

    def __init__(self, pipe: "Pipeline", finetuned: Any, config: CGIDMConfig | None = None, *,
                 pretrained: Any = None, similarity: Literal["ssim", "psnr"] = "ssim",
                 vae_posterior: Literal["mean", "sample"] = "sample",
                 target: Literal["fpr", "accuracy"] = "fpr", fpr: float = 0.05,
                 batch_size: int = 8, mesh: Any = None):
        from jax.tree_util import Partial

        from jaxattrib.diffusion.schedule import schedule_from_diffusers_config
        from jaxattrib.models.latent_io import pixel_size, vae_codec
        from jaxattrib.models.unet import UNet2DConditionModel
        config = CGIDMConfig() if config is None else config
        _check(isinstance(config, CGIDMConfig), "config", type(config).__name__, "a CGIDMConfig")
        _check(similarity in SIMILARITIES, "similarity", similarity, f"one of {SIMILARITIES}")
        _check(vae_posterior in POSTERIORS, "vae_posterior", vae_posterior,
               f"one of {POSTERIORS}")
        _check(target in TARGETS, "target", target, f"one of {TARGETS}")
        _check(isinstance(fpr, (int, float)) and 0.0 <= fpr <= 1.0, "fpr", fpr,
               "a number in [0, 1]")
        _check(isinstance(batch_size, (int, np.integer)) and batch_size >= 1, "batch_size",
               batch_size, "an integer >= 1")
        pretrained = pipe.unet_params if pretrained is None else pretrained
        try:
            cgi_dm.check_compatible(pretrained, finetuned)
        except cgi_dm.IncompatibleModelsError as e:
            raise ConfigError(f"Authenticator: finetuned: {e}") from e
        self.pipe, self.config, self.similarity = pipe, config, similarity
        self.vae_posterior, self.target, self.fpr = vae_posterior, target, float(fpr)
        self.batch_size, self.mesh = int(batch_size), mesh
        self.image_size = pixel_size(pipe.unet_config, pipe.vae_config)
        self._sample = pipe.vae_config is not None and vae_posterior == "sample"
        self._encode, self._decode = vae_codec(pipe, self._sample)
        self._mean_encode = vae_codec(pipe, False)[0] if self._sample else self._encode
        model = UNet2DConditionModel(pipe.unet_config)
        apply = lambda p, z, t, c: model.apply({"params": p}, z, t, c)  # noqa: E731
        self._eps_pre, self._eps_ft = Partial(apply, pretrained), Partial(apply, finetuned)
        self._sched = schedule_from_diffusers_config(pipe.scheduler_config)
        self.threshold: float | None = None
        self.null_scores: np.ndarray | None = None
        self.member_scores: np.ndarray | None = None

    # ------------------------------------------------------------------------- inputs
    def _inputs(self, examples: Any, role: str) -> tuple[np.ndarray, np.ndarray]:
        """``(images [n, S, S, 3] float32, text states [n, L, D])`` of an examples dict."""
        from jaxattrib.models.latent_io import check_pixel_images
        if not isinstance(examples, dict) or not {"images", "captions"} <= set(examples):
            got = sorted(examples) if isinstance(examples, dict) else type(examples).__name__
            raise ConfigError(f"Authenticator: {role}: expected {{'images': [n, H, W, 3], "
                              f"'captions': [n]}}, got {got}")
        images = np.asarray(examples["images"], np.float32)
        check_pixel_images(images, self.pipe.unet_config, self.pipe.vae_config,
                           f"Authenticator: {role}['images']")
        caps = [str(c) for c in np.asarray(examples["captions"]).reshape(-1)]
        if len(caps) != len(images):
            raise ConfigError(f"Authenticator: {role}['captions']: {len(caps)} captions for "
                              f"{len(images)} images")
        if len(images) == 0:
            raise ConfigError(f"Authenticator: {role}['images']: no images")
        return images, np.asarray(self.pipe.encode_prompts(caps))

    def _encode_key(self, encode_key: jax.Array | None, role: str) -> jax.Array | None:
        if self._sample and encode_key is None:
            raise ConfigError(f"Authenticator: {role}: encode_key is None, but "
                              f"vae_posterior='sample' draws one VAE posterior sample per image "
                              f"from fold_in(encode_key, i): pass encode_key (or "
                              f"vae_posterior='mean')")
        return encode_key if self._sample else None

    def _scores(self, x: Any, key: jax.Array | None, encode_key: jax.Array | None,
                role: str) -> np.ndarray:
        """Scores ``[n]`` of an examples dict, or a 1-D array of precomputed scores."""
        if isinstance(x, dict):
            if key is None:
                raise ConfigError(f"Authenticator: {role}: key is None: recovering images "
                                  f"needs an explicit PRNG key")
            return self.recover(x, key, encode_key=encode_key, role=role)["scores"]
        s = np.asarray(x, np.float64)
        if s.ndim != 1 or s.size == 0 or not np.isfinite(s).all():
            raise ConfigError(f"Authenticator: {role}: expected an examples dict or a non-empty "
                              f"1-D array of finite scores, got shape {s.shape}")
        return s

    # ------------------------------------------------------------------------- API
    def recover(self, examples: dict, key: jax.Array, *, encode_key: jax.Array | None = None,
                role: str = "images") -> dict:
        """:func:`~jaxattrib.authentication.cgi_dm.recover` of the examples plus their
        ``scores [n]`` float64: ``original`` / ``masked`` / ``recovered`` ``[n, H, W, 3]``
        pixels, ``mask`` ``[n, h, w, c]`` (model space), ``trace`` ``[num_steps, n]``."""
        images, ctx = self._inputs(examples, role)
        rec = cgi_dm.recover(images, self._eps_pre, self._eps_ft, self._sched, self.config, key,
                             cond=ctx, encode=self._encode, decode=self._decode,
                             batch_size=self.batch_size, mesh=self.mesh,
                             encode_key=self._encode_key(encode_key, role))
        rec["scores"] = cgi_dm.recovery_scores(rec["original"], rec["recovered"],
                                               self.similarity, batch_size=self.batch_size)
        bad = np.flatnonzero(~np.isfinite(rec["scores"]))
        if bad.size:
            raise cgi_dm.NonFiniteObjectiveError(f"Authenticator: {role}: similarity scores are "
                                                 f"not finite for images {bad.tolist()}")
        return rec

    def score(self, examples: dict, key: jax.Array, *,
              encode_key: jax.Array | None = None) -> np.ndarray:
        """Membership scores ``[n]`` float64 (similarity of each image to its own recovery;
        larger ⇒ more member-like). ``key``: masks and PGD draws; ``encode_key``: VAE
        posterior samples (``vae_posterior='sample'`` only)."""
        return self.recover(examples, key, encode_key=encode_key)["scores"]

    def calibrate(self, non_members: Any, key: jax.Array | None = None, *, members: Any = None,
                  encode_key: jax.Array | None = None) -> "Authenticator":
        """Sets ``self.threshold`` from the calibration split only.

        ``non_members``: known non-member examples (recovered with ``key`` / ``encode_key``)
        or their precomputed scores ``[n]`` (a reference set); kept as ``self.null_scores``.
        ``members``: known members' scores ``[m]`` or examples (recovered with
        ``fold_in(key, 1)`` / ``fold_in(encode_key, 1)``); needed for ``target='accuracy'``.
        The rule is :func:`~jaxattrib.authentication.cgi_dm.calibrate`. Returns ``self``.
        """
        null = self._scores(non_members, key, encode_key, "non_members")
        mem = None
        if members is not None:
            fold = lambda k: None if k is None else jax.random.fold_in(k, 1)  # noqa: E731
            mem = self._scores(members, fold(key), fold(encode_key), "members")
        elif self.target == "accuracy":
            raise ConfigError("Authenticator: members is None, but target='accuracy' "
                              "calibrates on known members and non-members")
        self.threshold = cgi_dm.calibrate(null, mem, target=self.target, fpr=self.fpr)
        self.null_scores, self.member_scores = null, mem
        return self

    def decide(self, examples: Any, key: jax.Array | None = None, *,
               encode_key: jax.Array | None = None) -> dict:
        """The CGI-DM decision with the calibrated threshold:
        :func:`~jaxattrib.authentication.cgi_dm.decide` of the examples' scores (or given
        scores ``[n]``) against the calibration scores. Returns ``{'scores' [n], 'p_values'
        [n], 'decisions' [n] bool (score ≥ threshold ⇒ used in fine-tuning), 'threshold'}``."""
        if self.null_scores is None:
            raise ConfigError("Authenticator: threshold is None: call calibrate(non_members, "
                              "key) before decide")
        s = self._scores(examples, key, encode_key, "images")
        d = cgi_dm.decide(s, self.null_scores, self.member_scores, target=self.target,
                          fpr=self.fpr)
        return {"scores": s, "p_values": d["p_values"], "decisions": d["decisions"],
                "threshold": d["threshold"]}

    def baselines(self, examples: dict, key: jax.Array, *, n_draws: int = 8) -> dict:
        """The two baselines the demo reports beside CGI-DM, ``[n]`` each, larger ⇒ member:
        ``'loss_gap'`` (:func:`~jaxattrib.authentication.cgi_dm.loss_gap_scores`: ``L_pre −
        L_ft`` on the unmasked latent, ``n_draws`` fixed (t, ε) from ``key``, no inversion) and
        ``'masked_similarity'`` (:func:`~jaxattrib.authentication.cgi_dm.
        masked_similarity_scores`: the masked start vs the original, no model). Latent
        pipelines encode with the VAE posterior mean, as the demo."""
        images, ctx = self._inputs(examples, "images")
        gap = cgi_dm.loss_gap_scores(images, self._eps_pre, self._eps_ft, self._sched, key,
                                     cond=ctx, encode=self._mean_encode, n_draws=n_draws,
                                     batch_size=self.batch_size)
        sim = cgi_dm.similarity_fn(self.similarity, images.shape[1:3])
        masked = cgi_dm.masked_similarity_scores(images, self.config, key,
                                                 encode=self._mean_encode, decode=self._decode,
                                                 similarity=sim, batch_size=self.batch_size)
        return {"loss_gap": np.asarray(gap), "masked_similarity": np.asarray(masked)}


__all__ = ["Authenticator", "CGIDMConfig", "POSTERIORS", "SIMILARITIES", "TARGETS"]
