"""CGI-DM: copyright authentication by contrasting gradient inversion (methods.md §6).

Question: was image x among the images used to fine-tune θ' from the pretrained θ?
What follows the paper / the authors' code (Nicholas0228/Revelio):

* Latent mask M: ``block × block`` blocks (4 × 4 on SD's 64 × 64 latent: a 16 × 16 grid), each
  keeping its top-left and bottom-right ``block/2 × block/2`` cells (a checkerboard keeping
  50 %), identical for all channels [code].
* ``z_init = encode(decode(M ⊙ z0))``; every evaluation uses ``z = M ⊙ z0 + (1 − M) ⊙ z_var``.
* PGD runs on the **VAE latent**, not on pixels through the encoder [code]: ``Extractor.py``
  perturbs ``vae.encode(lowpass image).latent_dist.sample() * scaling_factor`` with
  ``L2PGDAttack``; the decoder only makes the masked start image and decodes the result. Both
  encodings (``z0``, re-encoded ``z_init``) are posterior *samples* [code]
  (``recover(..., encode_key=...)``: from recorded per-image keys).
* Maximise ``J(z) = E_{t,ε}[ ||ε_θ(z_t, t, c) − ε||² − ||ε_θ'(z_t, t, c) − ε||² ]`` by L2-PGD:
  ball of radius 70 around ``z_init``, step 2.0, 1000 steps, gradient normalised by its L2 norm,
  values clamped to [−100, 100], one ``t ~ U{1..999}`` per step [code].
* Decode the recovered latent; high similarity(original, recovered) ⇒ used in fine-tuning [paper].

Our design [design]:

* Both models see the **same** (t, ε) per step (the code: independent noise per model): the
  common-random-numbers estimator of the same objective, lower variance. (t, ε) are fresh at
  every step (``n_noise`` draws averaged), as in the code: stochastic ascent on the expectation.
* Batched; each image's randomness is ``fold_in(key, global index)``, so its recovery depends
  on neither its batch nor the mesh (batches shardable over ``'data'``). Per-image gradients =
  the gradient of the summed objectives (the denoisers treat batch rows independently).
* Loss: per-element mean (diffusers' training MSE) against the schedule's training target (ε,
  v or x0 by ``prediction_type``); PGD normalises the gradient, so the scale is moot.
* ``scale='sqrt_numel'``: the published radius and step (for SD's 4 × 64 × 64 latent) times
  ``sqrt(numel / 16384)``, so the per-element RMS perturbation is unchanged; ``'none'``: as given.
* Manifold projection (``project_t > 0``, off by default; pixel models have no decoder to map
  an iterate back): every ``project_every`` PGD steps the unknown half is noised to
  ``project_t`` (fresh ε) and replaced by ``project_model``'s (fine-tuned or pretrained)
  one-step x̂0, before the ball projection and clamp, in the role of the paper's decoder.
* Mask ablations: ``'random_block'`` keeps each ``block/2`` cell with probability
  ``keep_rate``; ``'blur'`` keeps nothing (M = 0) and starts from a Gaussian-blurred latent
  (σ = ``blur_sigma`` latent pixels): the information removed by a low-pass.
* Each image is paired with its own recovery (the code: best match among all recoveries); the
  threshold is calibrated on held-out images, not the test data; p-values are empirical
  against the hold-out (non-member) scores: ``(1 + #{h ≥ s}) / (1 + n)``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxattrib.authentication import similarity as simlib
from jaxattrib.diffusion.schedule import Schedule
from jaxattrib.authentication.cgi_dm_pgd import (CGIDMConfig, CGIDMError, EpsFn, ImageSizeError,
                                                 IncompatibleModelsError, MASK_KINDS,
                                                 NonFiniteObjectiveError, PROJECT_MODELS,
                                                 SD_LATENT_NUMEL, _objective_jit, _slice_cond,
                                                 as_denoiser, batch_masks, check_compatible,
                                                 check_image_size, check_same_config,
                                                 checkerboard_mask, contrastive_objective,
                                                 gaussian_blur, image_keys, initial_latent,
                                                 make_mask, manifold_project, pgd_invert)


def empirical_p_values(scores: Any, null_scores: Any) -> np.ndarray:
    """``p_i = (1 + #{h ∈ null : h ≥ s_i}) / (1 + n)`` — small p ⇒ more member-like. ``[N]``."""
    s = np.asarray(scores, np.float64).reshape(-1)
    h = np.sort(np.asarray(null_scores, np.float64).reshape(-1))
    if h.size == 0:
        raise ValueError("empirical_p_values: need at least one hold-out (null) score")
    ge = h.size - np.searchsorted(h, s, side="left")
    return (1.0 + ge) / (1.0 + h.size)


def fpr_threshold(null_scores: Any, fpr: float = 0.05) -> float:
    """The smallest threshold τ (midpoints between distinct null scores, or the next float above
    the largest one) with ``#{h ≥ τ} / n <= fpr`` on the hold-out (non-member) scores. Rule:
    ``score ≥ τ`` ⇒ member. A budget below ``1 / n`` gives the value just above the largest
    null score (no hold-out flagged), not +inf, so scores above every hold-out are still
    flagged."""
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr_threshold: fpr must be in [0, 1]; got {fpr}")
    h = np.sort(np.asarray(null_scores, np.float64).reshape(-1))
    if h.size == 0:
        raise ValueError("fpr_threshold: need at least one hold-out score")
    u = np.unique(h)
    cands = np.r_[u[0] - 1.0, (u[:-1] + u[1:]) / 2.0, np.nextafter(u[-1], np.inf)]
    fp = h.size - np.searchsorted(h, cands, side="left")
    ok = np.flatnonzero(fp / h.size <= fpr + 1e-12)
    return float(cands[ok[0]])


def calibrate(null_scores: Any, member_scores: Any = None, *,
              target: Literal["accuracy", "fpr"] = "fpr", fpr: float = 0.05) -> float:
    """Decision threshold from known non-members (and optionally known members).

    ``target='fpr'``: :func:`fpr_threshold` on the hold-out scores (members unused).
    ``target='accuracy'``: ``jaxattrib.metrics.calibrate_threshold`` on members (positive)
    and hold-outs (negative); needs ``member_scores``.
    """
    if target == "fpr":
        return fpr_threshold(null_scores, fpr)
    if target == "accuracy":
        if member_scores is None or np.size(member_scores) == 0:
            raise ValueError("calibrate(target='accuracy') needs known member scores")
        from jaxattrib.metrics import calibrate_threshold
        s = np.r_[np.asarray(member_scores, np.float64).reshape(-1),
                  np.asarray(null_scores, np.float64).reshape(-1)]
        y = np.r_[np.ones(np.size(member_scores), bool), np.zeros(np.size(null_scores), bool)]
        return calibrate_threshold(s, y, target="accuracy")
    raise ValueError(f"calibrate: target must be 'fpr' or 'accuracy'; got {target!r}")


def decide(scores: Any, null_scores: Any, member_scores: Any = None, *,
           target: Literal["accuracy", "fpr"] = "fpr", fpr: float = 0.05) -> dict:
    """The CGI-DM decision, the one place it is made: ``scores [N]`` (similarity of each
    image's recovery, larger ⇒ more member-like) against known non-members ``null_scores``
    (and known members for ``target='accuracy'``, see :func:`calibrate`).

    Returns ``{'threshold': float, 'p_values': [N] (`empirical_p_values`), 'decisions': [N]
    bool}`` with the rule ``score ≥ threshold`` ⇒ used in fine-tuning.
    """
    s = np.asarray(scores)
    thr = calibrate(null_scores, member_scores, target=target, fpr=fpr)
    return {"threshold": thr, "p_values": empirical_p_values(s, null_scores),
            "decisions": s >= thr}


def similarity_fn(kind: str | Callable = "ssim", image_hw: Sequence[int] | None = None, *,
                  data_range: float = 2.0, embed: simlib.EmbedFn | None = None) -> Callable:
    """The similarity of an original and its recovery, ``sim(x[B,H,W,C], y[B,H,W,C]) -> [B]``.

    :func:`similarity.get_similarity`, except that ``'ssim'`` with ``image_hw`` given uses
    the largest odd window <= 11 that fits ``min(H, W)`` [design] (11 for any real SD
    resolution; 7 for 8-px test images), as ``jaxattrib cgi-dm`` does."""
    if kind == "ssim" and image_hw is not None:
        win = min(11, *(int(v) for v in image_hw))
        win -= 1 - win % 2
        return lambda x, y: simlib.ssim(x, y, data_range=data_range, win_size=win)
    return simlib.get_similarity(kind, data_range=data_range, embed=embed)


def recovery_scores(original: Any, recovered: Any, similarity: str | Callable = "ssim", *,
                    batch_size: int = 8, data_range: float = 2.0,
                    embed: simlib.EmbedFn | None = None) -> np.ndarray:
    """CGI-DM's membership scores ``[N]`` float64: ``similarity(original_i, recovered_i)``
    (:func:`similarity_fn` at the images' size), ``batch_size`` pairs per call; larger ⇒ more
    member-like [paper]. ``original``, ``recovered``: ``[N, H, W, C]`` pixels in [-1, 1] (the
    ``original`` / ``recovered`` of :func:`recover`). The scores of ``jaxattrib cgi-dm`` and of
    :class:`~jaxattrib.authentication.authenticator.Authenticator`."""
    original, recovered = np.asarray(original), np.asarray(recovered)
    sim = similarity_fn(similarity, original.shape[1:3], data_range=data_range, embed=embed)
    return np.concatenate([np.asarray(sim(original[i:i + batch_size],
                                          recovered[i:i + batch_size]))
                           for i in range(0, len(original), batch_size)]).astype(np.float64)


# ----------------------------------------------------------------------------- end to end
def _identity(x):
    return x


def recover(images: Any, eps_pre: EpsFn, eps_ft: EpsFn, sched: Schedule, config: CGIDMConfig,
            key: jax.Array, *, cond: Any = None, encode: Callable | None = None,
            decode: Callable | None = None, batch_size: int = 8, mesh: Any = None,
            index_offset: int = 0, encode_key: jax.Array | None = None) -> dict:
    """Masks, inverts and decodes a set of images in batches.

    Args:
      images: ``[N, H, W, C]`` pixels in [-1, 1].
      encode / decode: pixel ↔ model-space maps (VAE × scaling factor); identity if None.
        PGD runs on the model-space latents (as the authors' code: the L2 attack perturbs the
        SD latent, the VAE is only used to encode and decode) [code].
      encode_key: if given, ``encode`` is called as ``encode(x[B], keys[B, 2])`` and draws a
        VAE posterior sample per image, as the authors' code (``latent_dist.sample()``) and
        fine-tuning do: ``z0`` from ``fold_in(encode_key, i)`` and the re-encoding of
        ``z_init`` from ``fold_in(fold_in(encode_key, i), 1)``, ``i`` the global image index
        (so batching does not change them). None: ``encode(x)`` (e.g. the posterior mean).
      batch_size: images per PGD batch (a multiple of the mesh size when sharding); every batch,
        the last one included, is padded to this size so the PGD loop compiles once.
      index_offset: global index of ``images[0]`` (for the per-image keys).

    Returns:
      dict of NumPy arrays: ``original``, ``masked`` (= decode(z_init), the PGD start),
      ``recovered`` (= decode(z_rec)), each ``[N, H, W, C]``; ``mask`` ``[N, h, w, c]`` (latent);
      ``trace`` ``[num_steps, N]``.
    """
    images = jnp.asarray(images)
    enc = encode or _identity
    dec = decode or _identity
    n = images.shape[0]
    k_mask, k_pgd = jax.random.split(key)
    bs = batch_size
    out = {"original": [], "masked": [], "recovered": [], "mask": [], "trace": []}
    for lo in range(0, n, bs):
        hi = min(n, lo + bs)
        # the last batch is padded to the batch size (one compiled shape); padding rows dropped
        x = _pad_rows(images[lo:hi], bs)
        c = jax.tree_util.tree_map(lambda a: _pad_rows(a, bs) if np.shape(a)[:1] == (hi - lo,)
                                   else a, _slice_cond(cond, lo, hi, n))
        enc_re = encode
        if encode_key is not None:
            ik = image_keys(encode_key, bs, index_offset + lo)
            ik_re = jax.vmap(lambda k: jax.random.fold_in(k, 1))(ik)
            z0 = encode(x, ik)
            enc_re = functools.partial(_with_keys, encode, ik_re)
        else:
            z0 = enc(x)
        mask = batch_masks(config, z0.shape, k_mask, index_offset + lo)
        z_init = initial_latent(z0, mask, config, enc_re, decode)
        z_rec, trace = pgd_invert(eps_pre, eps_ft, sched, z0, mask, c, config, k_pgd,
                                  z_init=z_init, index_offset=index_offset + lo, mesh=mesh,
                                  return_trace=True)
        m = hi - lo
        out["original"].append(np.asarray(x[:m]))
        out["masked"].append(np.asarray(dec(z_init))[:m])
        out["recovered"].append(np.asarray(dec(z_rec))[:m])
        out["mask"].append(np.asarray(mask)[:m])
        out["trace"].append(np.asarray(trace)[:, :m])
    cat = {k: np.concatenate(v, axis=0) for k, v in out.items() if k != "trace"}
    cat["trace"] = np.concatenate(out["trace"], axis=1)
    return cat


def _with_keys(encode, keys, x):
    return encode(x, keys)


def _pad_rows(a, n):
    """Pads ``a`` along axis 0 to ``n`` rows by repeating its last row."""
    a = jnp.asarray(a)
    if a.shape[0] >= n:
        return a
    return jnp.concatenate([a, jnp.repeat(a[-1:], n - a.shape[0], axis=0)])


def _sim_batched(sim, a, b, batch_size):
    return np.concatenate([np.asarray(sim(jnp.asarray(a[i:i + batch_size]),
                                          jnp.asarray(b[i:i + batch_size])))
                           for i in range(0, a.shape[0], batch_size)])


def authenticate(images: Any, eps_pre: EpsFn, eps_ft: EpsFn, sched: Schedule,
                 config: CGIDMConfig, key: jax.Array, *, holdout_images: Any = None,
                 holdout_scores: Any = None, member_images: Any = None, cond: Any = None,
                 holdout_cond: Any = None, member_cond: Any = None,
                 encode: Callable | None = None, decode: Callable | None = None,
                 similarity: str | Callable = "ssim", embed: simlib.EmbedFn | None = None,
                 data_range: float = 2.0, image_size: int | Sequence[int] | None = None,
                 target: Literal["accuracy", "fpr"] = "fpr", fpr: float = 0.05,
                 batch_size: int = 8, mesh: Any = None,
                 check_params: tuple[Any, Any] | None = None) -> dict:
    """Decides, per image, whether it was used to fine-tune ``eps_ft`` from ``eps_pre``.

    Each image (and each calibration image) is recovered by :func:`recover`; its score is
    ``similarity(original, recovered)`` (larger ⇒ more member-like). The threshold and p-values
    come from known non-members: ``holdout_images`` (recovered the same way) or precomputed
    ``holdout_scores`` (a user-supplied reference set); with ``target='accuracy'`` known members
    (``member_images``) are also needed.

    Args:
      images: query images ``[N, H, W, C]`` in [-1, 1].
      similarity: 'ssim' | 'psnr' | 'embedding' | callable ``(x, y) -> [B]``; when ``embed`` is
        given and ``similarity='embedding'`` the cosine of embeddings is used (for a UNet-tap
        embedding pass :func:`similarity.tap_embedding_fn`).
      image_size: expected ``(H, W)`` (or int) of the model; checked for every image set.
      target, fpr: calibration rule (see :func:`calibrate`).
      check_params: optional ``(params_pre, params_ft)`` checked by :func:`check_compatible`
        before any work.

    Returns:
      dict: ``scores`` ``[N]``, ``p_values`` ``[N]``, ``decisions`` ``[N]`` bool (``score ≥
      threshold``), ``threshold``, ``calibration`` (``split``, ``target``, ``fpr``,
      ``holdout_scores``, ``member_scores``), and ``original``/``masked``/``recovered`` ``[N, H, W,
      C]`` NumPy images for the report.
    """
    if check_params is not None:
        check_compatible(*check_params)
    check_image_size(images, image_size)
    for extra, name in ((holdout_images, "holdout_images"), (member_images, "member_images")):
        if extra is not None:
            try:
                check_image_size(extra, image_size, channels=np.shape(images)[-1])
            except ImageSizeError as e:
                raise ImageSizeError(f"{name}: {e}") from e
    if holdout_images is None and holdout_scores is None:
        raise ValueError("authenticate: pass holdout_images (known non-members) or "
                         "holdout_scores (a reference set) to calibrate the decision")
    sim = simlib.get_similarity("embedding" if (embed is not None and similarity == "embedding")
                                else similarity, data_range=data_range, embed=embed)
    k_q, k_h, k_m = jax.random.split(key, 3)
    common = dict(encode=encode, decode=decode, batch_size=batch_size, mesh=mesh)

    def scored(x, k, c):
        r = recover(x, eps_pre, eps_ft, sched, config, k, cond=c, **common)
        return _sim_batched(sim, r["original"], r["recovered"], batch_size), r

    scores, rec = scored(images, k_q, cond)
    split = []
    if holdout_images is not None:
        null, _ = scored(holdout_images, k_h, holdout_cond)
        split.append("holdout_images")
    else:
        null = np.asarray(holdout_scores, np.float64).reshape(-1)
        split.append("holdout_scores")
    members = None
    if member_images is not None:
        members, _ = scored(member_images, k_m, member_cond)
        split.append("member_images")
    for name, arr in (("query", scores), ("hold-out", null)) + (
            (("member", members),) if members is not None else ()):
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            raise NonFiniteObjectiveError(f"authenticate: {name} similarity scores are not finite "
                                          f"for images {bad.tolist()}")
    d = decide(scores, null, members, target=target, fpr=fpr)
    return {
        "scores": scores,
        "p_values": d["p_values"],
        "decisions": d["decisions"],
        "threshold": d["threshold"],
        "calibration": {"split": "+".join(split), "target": target, "fpr": fpr,
                        "holdout_scores": np.asarray(null),
                        "member_scores": None if members is None else np.asarray(members)},
        "original": rec["original"], "masked": rec["masked"], "recovered": rec["recovered"],
        "trace": rec["trace"],
    }


def loss_gap_scores(images: Any, eps_pre: EpsFn, eps_ft: EpsFn, sched: Schedule,
                    key: jax.Array, *, cond: Any = None, encode: Callable | None = None,
                    n_draws: int = 8, t_min: int = 1, t_max: int = 999,
                    batch_size: int = 8) -> np.ndarray:
    """Baseline: ``L_pre − L_ft`` on the unmasked latent, no inversion. ``[N]``, larger ⇒ member.

    The same ``n_draws`` (t, ε) pairs, drawn once from ``key``, are used for every image and both
    models (fixed (t, ε)). Raises :class:`NonFiniteObjectiveError` naming the images whose gap
    is NaN/inf.
    """
    images = jnp.asarray(images)
    enc = encode or _identity
    n = images.shape[0]
    kt, kn = jax.random.split(key)
    out = []
    t_all = noise_one = None
    fns = (as_denoiser(eps_pre), as_denoiser(eps_ft))
    for lo in range(0, n, batch_size):
        hi = min(n, lo + batch_size)
        z = enc(images[lo:hi])
        if t_all is None:
            t_all = jax.random.randint(kt, (n_draws,), t_min, t_max + 1)
            noise_one = jax.random.normal(kn, (n_draws,) + z.shape[1:], z.dtype)
        b = hi - lo
        # one compiled draw, called n_draws times (jit over all draws unrolls n_draws UNet
        # pairs: minutes of compilation); the last batch is padded to the batch size
        z = _pad_rows(z, batch_size)
        c = jax.tree_util.tree_map(lambda a: _pad_rows(a, batch_size)
                                   if np.shape(a)[:1] == (b,) else a,
                                   _slice_cond(cond, lo, hi, n))
        total = np.zeros(batch_size, np.float64)
        for k in range(n_draws):
            t = jnp.broadcast_to(t_all[k], (1, batch_size))
            noise = jnp.broadcast_to(noise_one[k], (1, batch_size) + z.shape[1:])
            total += np.asarray(_objective_jit(fns, sched, z, t, noise, c), np.float64)
        out.append(total[:b] / n_draws)
    out = np.concatenate(out)
    bad = np.flatnonzero(~np.isfinite(out))
    if bad.size:
        raise NonFiniteObjectiveError(
            f"loss_gap_scores: the loss gap is NaN or inf for images {bad.tolist()} (check the "
            f"models' outputs and the input range)")
    return out


def masked_similarity_scores(images: Any, config: CGIDMConfig, key: jax.Array, *,
                             encode: Callable | None = None, decode: Callable | None = None,
                             similarity: str | Callable = "ssim",
                             embed: simlib.EmbedFn | None = None, data_range: float = 2.0,
                             batch_size: int = 8) -> np.ndarray:
    """Baseline: similarity of the masked start ``decode(z_init)`` to the original, no models.
    ``[N]``. (Uses the same masks as :func:`recover` with the same ``key``.)"""
    images = jnp.asarray(images)
    sim = simlib.get_similarity(similarity, data_range=data_range, embed=embed)
    starts = masked_starts(images, config, key, encode=encode, decode=decode,
                           batch_size=batch_size)
    return np.concatenate([np.asarray(sim(images[lo:lo + batch_size],
                                          jnp.asarray(starts[lo:lo + batch_size])))
                           for lo in range(0, images.shape[0], batch_size)])


def masked_starts(images: Any, config: CGIDMConfig, key: jax.Array, *,
                  encode: Callable | None = None, decode: Callable | None = None,
                  batch_size: int = 8) -> np.ndarray:
    """The masked starts ``decode(z_init)`` of ``images [N, H, W, C]`` -> ``[N, H, W, C]``
    NumPy, with the masks :func:`recover` draws from the same ``key`` (image ``i``'s from
    ``index_offset = i``); ``z0 = encode(x)`` (e.g. the VAE posterior mean; identity if None).
    What :func:`recover` returns as ``masked`` for the same images, key and deterministic
    ``encode``, without the PGD."""
    images = jnp.asarray(images)
    enc, dec = encode or _identity, decode or _identity
    k_mask, _ = jax.random.split(key)
    out = []
    for lo in range(0, images.shape[0], batch_size):
        z0 = enc(images[lo:lo + batch_size])
        mask = batch_masks(config, z0.shape, k_mask, lo)
        out.append(np.asarray(dec(initial_latent(z0, mask, config, encode, decode))))
    return np.concatenate(out)


__all__ = ["decide", "CGIDMConfig", "CGIDMError", "EpsFn", "ImageSizeError",
           "IncompatibleModelsError", "MASK_KINDS", "NonFiniteObjectiveError", "PROJECT_MODELS",
           "SD_LATENT_NUMEL", "as_denoiser", "authenticate", "batch_masks", "calibrate",
           "check_compatible", "check_image_size", "check_same_config", "checkerboard_mask",
           "contrastive_objective", "empirical_p_values", "fpr_threshold", "gaussian_blur",
           "image_keys", "initial_latent", "loss_gap_scores", "make_mask", "manifold_project",
           "masked_similarity_scores", "masked_starts", "pgd_invert", "recover",
           "recovery_scores", "similarity_fn"]
