"""A 32-bit spread-spectrum image watermark: the baseline of source-model attribution.

Zhang et al. (arXiv 2409.15781; methods.md §7) compare their injection-free method with a
32-bit watermark embedded in the source model's generated images and decoded from the
suspicious model's generations [paper]. The paper's watermark scheme is not used here; this
module is a simple scheme of our own [design]:

* **Patterns**: ``K`` (default 32) patterns ``P_b [H, W]`` drawn from the secret ``key``
  (Gaussian, then orthonormalised by a QR decomposition and scaled to unit RMS per pixel), so
  they are mutually orthogonal and look like white noise.
* **Embedding**: ``x' = clip(x + α/√K · Σ_b s_b P_b, −1, 1)`` with ``s_b = 2·bit_b − 1``; the
  same gray pattern is added to the three channels. Because the patterns are orthogonal with
  unit RMS, the added signal has RMS exactly ``α`` ([-1, 1] pixel units), i.e. (before
  clipping) ``PSNR = 20·log10(2/α)`` dB. Default ``α = 0.06`` (30.5 dB): measured on 200
  images of the synthetic concept set (32 px, hard edges and textures), every image decodes
  32/32 at α = 0.06, whereas at α = 0.03 (36.5 dB) only 73 % do (mean bit accuracy 0.985)
  and at 0.05 99 %; with ``aggregate=True`` over the 200 images even α = 0.01 decodes 32/32.
* **Decoding** (blind: no original needed): average the channels, high-pass the image with
  ``r = y − box3(y)`` (3 × 3 mean, edge padding) to remove most of the image content, and solve
  the least-squares problem ``r ≈ Σ_b a_b HP(P_b)`` (precomputed pseudo-inverse); bit
  ``b = [a_b > 0]``. Without image content the coefficients are exactly ``α s_b / √K``.
* **Aggregation**: every generated image carries the *same* pattern (one message per source
  model), so the suspicious model — if it learns it — reproduces it in all its generations;
  :func:`decode` with ``aggregate=True`` averages the coefficients over the batch before taking
  signs, which raises the SNR by √B.
* **Detection**: a model / image is flagged when its bit accuracy against the source's message
  is ``>= τ``; :func:`detection_threshold` gives the smallest τ whose false-positive rate under
  "random bits" (Binomial(K, ½)) is ``<= fpr``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

N_BITS = 32


class WatermarkError(ValueError):
    """Bad watermark input (shapes, bit count, strength)."""


class WatermarkPatterns(NamedTuple):
    """``patterns [K, H, W]`` (orthogonal, unit RMS) and ``decoder [K, H·W]`` (pseudo-inverse
    of the high-passed patterns)."""

    patterns: jnp.ndarray
    decoder: jnp.ndarray


def highpass(y: jnp.ndarray) -> jnp.ndarray:
    """``y − box3(y)`` over the last two axes (``[..., H, W]``), edge-padded 3 × 3 mean."""
    pad = [(0, 0)] * (y.ndim - 2) + [(1, 1), (1, 1)]
    p = jnp.pad(y, pad, mode="edge")
    H, W = y.shape[-2:]
    box = sum(p[..., i:i + H, j:j + W] for i in range(3) for j in range(3)) / 9.0
    return y - box


def make_patterns(key: jax.Array, height: int, width: int,
                  n_bits: int = N_BITS) -> WatermarkPatterns:
    """The secret patterns of ``key`` for ``height × width`` images (see module docstring)."""
    n = int(height) * int(width)
    if not 1 <= n_bits <= n:
        raise WatermarkError(f"n_bits={n_bits} must be in [1, {n}] for {height}x{width} images")
    g = jax.random.normal(key, (n, n_bits), jnp.float32)
    q, _ = jnp.linalg.qr(g)                                    # [n, K] orthonormal columns
    pats = (q.T * math.sqrt(n)).reshape(n_bits, height, width)  # unit RMS per pixel
    hp = highpass(pats).reshape(n_bits, n)
    return WatermarkPatterns(pats, jnp.linalg.pinv(hp.T))      # decoder [K, n]


def _bits(bits, n_bits):
    b = np.asarray(bits).reshape(-1)
    if b.shape != (n_bits,) or not np.isin(b, (0, 1)).all():
        raise WatermarkError(f"bits: expected {n_bits} values in {{0, 1}}; got {b}")
    return jnp.asarray(b, jnp.float32)


def _images(images):
    x = jnp.asarray(images)
    if x.ndim != 4:
        raise WatermarkError(f"images: expected [B, H, W, C]; got shape {x.shape}")
    return x


def embed(images, bits, key: jax.Array, strength: float = 0.06) -> jnp.ndarray:
    """Adds the watermark of message ``bits [K]`` to ``images [B, H, W, C]`` in [-1, 1].

    ``strength`` α: RMS of the added signal in [-1, 1] pixel units (PSNR ≈ 20·log10(2/α) dB).
    Returns watermarked images clipped to [-1, 1], same shape and dtype family.
    """
    x = _images(images)
    if not strength > 0:
        raise WatermarkError(f"strength must be positive; got {strength}")
    b = np.asarray(bits).reshape(-1)
    s = 2.0 * _bits(bits, b.size) - 1.0
    pats = make_patterns(key, x.shape[1], x.shape[2], b.size).patterns
    w = strength / math.sqrt(b.size) * jnp.tensordot(s, pats, axes=1)   # [H, W]
    return jnp.clip(x + w[None, :, :, None].astype(x.dtype), -1.0, 1.0)


def coefficients(images, key: jax.Array, n_bits: int = N_BITS) -> jnp.ndarray:
    """Least-squares pattern coefficients ``a [B, K]`` of each image (sign = decoded bit)."""
    x = _images(images)
    B, H, W, _ = x.shape
    dec = make_patterns(key, H, W, n_bits).decoder
    r = highpass(x.astype(jnp.float32).mean(axis=-1)).reshape(B, H * W)
    return r @ dec.T


def decode(images, key: jax.Array, n_bits: int = N_BITS, *,
           aggregate: bool = False) -> np.ndarray:
    """Decoded bits: ``[B, K]`` uint8, or ``[K]`` when ``aggregate`` (mean coefficients over the
    batch, for a model whose generations all carry one message)."""
    a = coefficients(images, key, n_bits)
    if aggregate:
        a = a.mean(axis=0)
    return np.asarray(a > 0, np.uint8)


def bit_accuracy(decoded, bits) -> np.ndarray:
    """Fraction of matching bits: ``decoded [..., K]`` vs ``bits [K]`` -> ``[...]``."""
    d = np.asarray(decoded)
    b = np.asarray(bits).reshape(-1)
    if d.shape[-1] != b.size:
        raise WatermarkError(f"bit_accuracy: {d.shape[-1]} decoded bits vs {b.size}")
    return (d == b).mean(axis=-1)


def detection_threshold(n_bits: int = N_BITS, fpr: float = 1e-3) -> float:
    """Smallest bit-accuracy threshold τ = k/K with ``P(Binomial(K, ½) >= k) <= fpr``."""
    from scipy import stats
    if not 0.0 < fpr < 1.0:
        raise WatermarkError(f"fpr must be in (0, 1); got {fpr}")
    k = np.arange(n_bits + 2)
    tail = stats.binom.sf(k - 1, n_bits, 0.5)   # P(X >= k); P(X >= K+1) = 0
    return float(k[np.flatnonzero(tail <= fpr)[0]] / n_bits)


def detect(images, bits, key: jax.Array, threshold: float | None = None, *,
           aggregate: bool = False, fpr: float = 1e-3) -> np.ndarray:
    """Watermark present? ``bit_accuracy >= threshold`` (default :func:`detection_threshold`
    at ``fpr``); ``[B]`` bool, or a scalar bool with ``aggregate``."""
    b = np.asarray(bits).reshape(-1)
    tau = detection_threshold(b.size, fpr) if threshold is None else threshold
    return bit_accuracy(decode(images, key, b.size, aggregate=aggregate), b) >= tau
