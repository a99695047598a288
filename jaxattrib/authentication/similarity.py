"""Image similarity for copyright authentication: SSIM, PSNR, embedding cosine, UNet taps.

What follows the references:

* :func:`ssim` is the SSIM of Wang et al. (2004) with an 11-tap Gaussian window (σ = 1.5),
  K1 = 0.01, K2 = 0.03, C1 = (K1·L)², C2 = (K2·L)² for a data range L, population (biased)
  local statistics, averaged over the positions where the window lies fully inside the image and
  over channels. This is exactly ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=L, channel_axis=-1)`` (skimage filters with
  reflect padding and then crops the border of half a window, which equals a 'valid' filter).
* :func:`psnr` is ``10·log10(L² / MSE)`` per image (skimage ``peak_signal_noise_ratio``).

Our design:

* Images are NHWC. The default data range is ``2.0``, i.e. inputs in [-1, 1] (the library's pixel
  convention); pass ``data_range=1.0`` for images in [0, 1]. Every function returns one value per
  image, shape ``[B]``.
* CGI-DM's authors compare images with CLIP or DINO embeddings [code]. Where no such weights are
  available offline, :func:`tap_embedding_fn` embeds images with the diffusion model's own UNet:
  noise the input at a fixed (t, ε), run the UNet once, global-average-pool the sown
  intermediates (``down_i``, ``mid``, ``up_i``), concatenate and L2-normalise [design].
  :func:`encoder_embedding_fn` wraps any user-provided encoder into the same
  ``embed(images[B,H,W,C]) -> [B, D]`` form; :func:`hf_image_encoder` builds one from a local
  transformers CLIP or DINO/ViT folder (PyTorch, CPU).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

EmbedFn = Callable[[jnp.ndarray], jnp.ndarray]


class SimilarityInputError(ValueError):
    """Two image batches cannot be compared (shape mismatch, too small for the window)."""


def _pair(x, y, name):
    x, y = jnp.asarray(x), jnp.asarray(y)
    if x.shape != y.shape or x.ndim != 4:
        raise SimilarityInputError(f"{name}: expected two NHWC batches of equal shape; got "
                                   f"{x.shape} and {y.shape}")
    dt = jnp.promote_types(jnp.promote_types(x.dtype, y.dtype), jnp.float32)
    return x.astype(dt), y.astype(dt)


def gaussian_window(win_size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Normalised 1-D Gaussian taps ``[win_size]`` (scipy.ndimage's kernel for this radius)."""
    if win_size % 2 != 1 or win_size < 1:
        raise ValueError(f"win_size must be a positive odd integer; got {win_size}")
    r = win_size // 2
    x = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _filter_valid(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    """Separable 'valid' filtering of ``x[B,H,W,C]`` with taps ``w[k]`` (depthwise)."""
    k = w.shape[0]
    c = x.shape[-1]
    kh = jnp.tile(w.reshape(k, 1, 1, 1), (1, 1, 1, c)).astype(x.dtype)  # HWIO, depthwise
    kw = jnp.tile(w.reshape(1, k, 1, 1), (1, 1, 1, c)).astype(x.dtype)
    dn = ("NHWC", "HWIO", "NHWC")
    prec = jax.lax.Precision.HIGHEST
    x = jax.lax.conv_general_dilated(x, kh, (1, 1), "VALID", dimension_numbers=dn,
                                     feature_group_count=c, precision=prec)
    return jax.lax.conv_general_dilated(x, kw, (1, 1), "VALID", dimension_numbers=dn,
                                        feature_group_count=c, precision=prec)


def ssim(x: jnp.ndarray, y: jnp.ndarray, *, data_range: float = 2.0, win_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> jnp.ndarray:
    """Mean SSIM per image.

    Args:
      x, y: ``[B, H, W, C]`` images with values spanning ``data_range`` (2.0 for [-1, 1], 1.0 for
        [0, 1]); ``H, W >= win_size``.
      data_range: L in C1 = (k1·L)², C2 = (k2·L)².
      win_size, sigma: Gaussian window (11 taps, σ = 1.5 as Wang et al.).

    Returns:
      ``[B]`` SSIM in [-1, 1] (1 iff identical), averaged over valid window positions and channels.
    """
    x, y = _pair(x, y, "ssim")
    if min(x.shape[1:3]) < win_size:
        raise SimilarityInputError(f"ssim: images of size {x.shape[1:3]} are smaller than the "
                                   f"{win_size}-tap window; pass a smaller odd win_size")
    w = jnp.asarray(gaussian_window(win_size, sigma))
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    f = lambda a: _filter_valid(a, w)  # noqa: E731
    mx, my = f(x), f(y)
    vx = f(x * x) - mx * mx
    vy = f(y * y) - my * my
    cxy = f(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(axis=(1, 2, 3))


def psnr(x: jnp.ndarray, y: jnp.ndarray, *, data_range: float = 2.0) -> jnp.ndarray:
    """Peak signal-to-noise ratio per image in dB, ``10·log10(L² / MSE)``; ``[B]`` (inf if equal)."""
    x, y = _pair(x, y, "psnr")
    mse = jnp.mean((x - y) ** 2, axis=(1, 2, 3))
    return 10.0 * jnp.log10(data_range ** 2 / mse)


def l2_normalize(e: jnp.ndarray, eps: float = 1e-12) -> jnp.ndarray:
    """Rows of ``e[B, D]`` scaled to unit L2 norm (zero rows stay zero)."""
    return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), eps)


def cosine_similarity(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """Row-wise cosine similarity of ``a[B, D]`` and ``b[B, D]`` -> ``[B]``."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.shape != b.shape or a.ndim != 2:
        raise SimilarityInputError(f"cosine_similarity: expected two [B, D] arrays of equal "
                                   f"shape; got {a.shape} and {b.shape}")
    return jnp.sum(l2_normalize(a) * l2_normalize(b), axis=-1)


def embedding_similarity(embed: EmbedFn) -> Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]:
    """``sim(x, y) -> [B]``: cosine similarity of ``embed(x)`` and ``embed(y)`` per image pair."""
    def sim(x, y):
        x, y = _pair(x, y, "embedding_similarity")
        return cosine_similarity(embed(x), embed(y))
    return sim


def encoder_embedding_fn(encoder: Callable[[Any], Any], *,
                         preprocess: Callable[[jnp.ndarray], Any] | None = None) -> EmbedFn:
    """Wraps a user-provided image encoder (e.g. a CLIP/DINO image tower) as an ``EmbedFn``.

    Args:
      encoder: any callable mapping (preprocessed) images to per-image features ``[B, ...]``
        (a JAX function, or a NumPy/PyTorch-backed one: the output is converted with
        ``np.asarray``, so the wrapper is then not jit-able).
      preprocess: optional map applied to the NHWC [-1, 1] images first (resize, normalise,
        transpose to NCHW, ...), as the encoder expects.

    Returns:
      ``embed(images[B,H,W,C]) -> [B, D]`` features flattened and L2-normalised (float32).
    """
    def embed(images):
        x = preprocess(images) if preprocess is not None else images
        feats = encoder(x)
        feats = jnp.asarray(np.asarray(feats) if not isinstance(feats, jax.Array) else feats)
        return l2_normalize(feats.reshape(feats.shape[0], -1).astype(jnp.float32))
    return embed


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _processor_settings(folder: str, is_clip: bool, default_size: int):
    """(size, mean, std) from ``preprocessor_config.json`` if present, else model defaults."""
    import json
    import os
    mean, std = (CLIP_MEAN, CLIP_STD) if is_clip else (IMAGENET_MEAN, IMAGENET_STD)
    size = default_size
    path = os.path.join(folder, "preprocessor_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            pc = json.load(f)
        mean, std = tuple(pc.get("image_mean", mean)), tuple(pc.get("image_std", std))
        crop = pc.get("crop_size") or pc.get("size")
        if isinstance(crop, dict):
            crop = crop.get("height") or crop.get("shortest_edge")
        if isinstance(crop, int):
            size = crop
    return int(size), mean, std


def hf_image_encoder(folder: str, *, batch_size: int = 16) -> EmbedFn:
    """A CLIP/DINO-style image encoder from a local transformers folder, as an ``EmbedFn``.

    Runs in PyTorch on CPU (float32, eval mode) at the edge of the library; nothing is
    downloaded (``local_files_only``). CLIP (``model_type`` 'clip' or 'clip_vision_model'):
    ``CLIPVisionModelWithProjection(...).image_embeds``; anything else (DINO/DINOv2/ViT): the CLS
    token of ``AutoModel(...).last_hidden_state``.

    Preprocessing [design]: NHWC images in [-1, 1] are mapped to [0, 1], resized as a whole
    (bicubic, no centre crop) to the processor's crop size (``preprocessor_config.json``, else the
    model's ``image_size``), normalised by the processor's mean/std (CLIP's or ImageNet's by
    default) and transposed to NCHW. Returns ``embed(images[B,H,W,3]) -> [B, D]`` L2-normalised.
    """
    import os

    import torch
    import transformers

    from jaxattrib.models.convert import read_config

    folder = os.fspath(folder)
    cfg = read_config(folder, "config.json")
    model_type = cfg.get("model_type")
    is_clip = model_type in ("clip", "clip_vision_model")
    if is_clip:
        model = transformers.CLIPVisionModelWithProjection.from_pretrained(
            folder, local_files_only=True)
        vision = cfg.get("vision_config", cfg)
        feature = lambda out: out.image_embeds  # noqa: E731
    else:
        model = transformers.AutoModel.from_pretrained(folder, local_files_only=True)
        vision = cfg
        feature = lambda out: out.last_hidden_state[:, 0]  # noqa: E731
    model = model.float().eval()
    size, mean, std = _processor_settings(folder, is_clip, vision.get("image_size", 224))
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)

    def preprocess(images):
        x = (jnp.asarray(images, jnp.float32) + 1.0) / 2.0
        if x.shape[1:3] != (size, size):
            x = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "bicubic")
        x = (np.asarray(x) - mean) / std
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def encode(x):
        outs = []
        with torch.no_grad():
            for i in range(0, x.shape[0], batch_size):
                outs.append(feature(model(pixel_values=torch.from_numpy(x[i:i + batch_size])))
                            .numpy())
        return np.concatenate(outs, axis=0)

    return encoder_embedding_fn(encode, preprocess=preprocess)


def pool_taps(intermediates: Any, taps: Sequence[str]) -> jnp.ndarray:
    """Global-average-pools the named sown taps and concatenates them -> ``[B, sum C_tap]``.

    ``intermediates`` is the ``'intermediates'`` collection returned by ``apply(...,
    mutable=['intermediates'])``; each tap is a tuple of ``[B, h, w, C]`` arrays (the last one is
    used if a tap was sown more than once).
    """
    feats = []
    for name in taps:
        if name not in intermediates:
            raise KeyError(f"tap {name!r} is not among the sown intermediates "
                           f"{sorted(intermediates)}")
        v = intermediates[name]
        v = v[-1] if isinstance(v, (tuple, list)) else v
        feats.append(jnp.mean(v.astype(jnp.float32), axis=(1, 2)))
    return jnp.concatenate(feats, axis=-1)


def tap_embedding_fn(unet_apply: Callable, params: Any, *, cond: jnp.ndarray,
                     taps: Sequence[str] = ("mid",), t: int = 0, sched: Any = None,
                     noise_seed: int | None = 0, encode: Callable | None = None) -> EmbedFn:
    """Embeds images with a diffusion UNet's own internal representations [design].

    ``embed(x[B,H,W,C]) -> [B, D]`` (jit-compiled; retraces per batch shape): ``z = encode(x)`` (identity if ``encode`` is None); if
    ``sched`` is given and ``t > 0``, ``z_t = add_noise(sched, z, ε, t)`` with one fixed noise
    ``ε[H,W,C]`` drawn from ``PRNGKey(noise_seed)`` and shared by all images (so an image's
    embedding does not depend on the batch it is in; ``noise_seed=None`` means ε = 0); then one
    UNet call ``unet_apply({'params': params}, z_t, t, cond, mutable=['intermediates'])`` and
    :func:`pool_taps` over ``taps``, L2-normalised.

    Args:
      unet_apply: e.g. ``UNet2DConditionModel(config).apply``.
      params: the UNet parameters (usually the pretrained model's).
      cond: ``encoder_hidden_states`` ``[1, L, D]`` (broadcast to the batch) or ``[B, L, D]``.
      taps: names of sown intermediates, ``down_i`` / ``mid`` / ``up_i``.
      t: integer timestep given to the UNet.
      sched: a :class:`jaxattrib.diffusion.schedule.Schedule` for the forward noising.
      noise_seed: seed of the fixed noise.
      encode: pixel -> model-input map (VAE encoder times scaling factor for latent models).
    """
    from jaxattrib.diffusion.schedule import add_noise

    taps = tuple(taps)
    cond = jnp.asarray(cond)

    def embed_p(params, cond, x):
        z = x if encode is None else encode(x)
        b = z.shape[0]
        tt = jnp.full((b,), t, jnp.int32)
        if sched is not None and t > 0:
            if noise_seed is None:
                noise = jnp.zeros(z.shape[1:], z.dtype)
            else:
                noise = jax.random.normal(jax.random.PRNGKey(noise_seed), z.shape[1:], z.dtype)
            z = add_noise(sched, z, jnp.broadcast_to(noise, z.shape), tt)
        ctx = jnp.broadcast_to(cond, (b,) + cond.shape[1:]) if cond.shape[0] == 1 else cond
        _, state = unet_apply({"params": params}, z, tt, ctx, mutable=["intermediates"])
        return l2_normalize(pool_taps(state["intermediates"], taps))

    # params/cond are jit arguments, not constants baked into the compiled program
    run = jax.jit(embed_p)
    return lambda x: run(params, cond, jnp.asarray(x))


def get_similarity(kind: str | Callable, *, data_range: float = 2.0,
                   embed: EmbedFn | None = None) -> Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]:
    """A pairwise similarity ``sim(x[B,H,W,C], y[B,H,W,C]) -> [B]`` (larger = more similar).

    ``kind``: ``'ssim'``, ``'psnr'``, ``'embedding'`` (cosine of ``embed``; required) or a callable
    returned as is.
    """
    if callable(kind):
        return kind
    if kind == "ssim":
        return lambda x, y: ssim(x, y, data_range=data_range)
    if kind == "psnr":
        return lambda x, y: psnr(x, y, data_range=data_range)
    if kind == "embedding":
        if embed is None:
            raise ValueError("similarity 'embedding' needs an embed function (see "
                             "tap_embedding_fn / encoder_embedding_fn)")
        return embedding_similarity(embed)
    raise ValueError(f"unknown similarity {kind!r}; expected 'ssim', 'psnr', 'embedding' or a "
                     f"callable")
