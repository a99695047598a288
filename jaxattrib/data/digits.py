"""scikit-learn's bundled handwritten digits as a tiny captioned image set.

The data are the UCI optical digits shipped inside scikit-learn (``sklearn.datasets.load_digits``:
1797 gray images of 8x8 pixels, values 0..16, ink = 16), so nothing is downloaded.

[design] Pixels map linearly ``0..16 -> [-1, 1]`` (white ink on black), the gray channel is
repeated to RGB, and images are upsampled to ``size`` with ``nearest`` (index
``floor((i + 0.5) * 8 / size)``) or ``bilinear`` (half-pixel centers, edge clamped, the
convention of ``jax.image.resize``). Captions are ``"a handwritten digit {d}"``;
``labels['digit']`` holds the digit, ids are ``digits/{index:04d}`` in scikit-learn's order.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxattrib.data.dataset import DataError, ImageDataset

DIGIT_NAMES = tuple(str(d) for d in range(10))


def _interp_matrix(n_in: int, n_out: int, method: str) -> np.ndarray:
    """``[n_out, n_in]`` 1-D resampling weights (rows sum to 1)."""
    centers = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5  # output centers in input coords
    m = np.zeros((n_out, n_in))
    if method == "nearest":
        m[np.arange(n_out), np.clip(np.floor(centers + 0.5).astype(int), 0, n_in - 1)] = 1.0
    elif method == "bilinear":
        lo = np.floor(centers).astype(int)
        frac = centers - lo
        for idx, wgt in ((lo, 1.0 - frac), (lo + 1, frac)):
            np.add.at(m, (np.arange(n_out), np.clip(idx, 0, n_in - 1)), wgt)
    else:
        raise ValueError(f"resample={method!r}: expected 'nearest' or 'bilinear'")
    return m


def upsample(images: np.ndarray, size: int, method: str = "nearest") -> np.ndarray:
    """Resizes ``[N, h, w]`` (or ``[N, h, w, C]``) to ``size x size`` (separable, float64)."""
    x = np.asarray(images, np.float64)
    my = _interp_matrix(x.shape[1], size, method)
    mx = _interp_matrix(x.shape[2], size, method)
    return np.einsum("yh,nhw...,xw->nyx...", my, x, mx)


def load_digits(size: int = 32, *, resample: str = "nearest",
                digits: Sequence[int] | None = None,
                max_per_digit: int | None = None) -> ImageDataset:
    """The scikit-learn digits as an :class:`ImageDataset`.

    Args:
      size: output side in pixels (8 keeps the originals).
      resample: ``'nearest'`` or ``'bilinear'``.
      digits: keep only these digits (e.g. ``(0, 1)``); ``None`` keeps all ten.
      max_per_digit: keep at most this many images per digit (first ones in scikit-learn order).

    Returns:
      images ``[N, size, size, 3]`` float32 in ``[-1, 1]``; ``labels['digit']``.
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    images, target, index = select_digits(digits, max_per_digit)
    gray = upsample(images[index] / 16.0, size, resample) * 2.0 - 1.0
    rgb = np.repeat(np.clip(gray, -1.0, 1.0)[..., None], 3, axis=-1).astype(np.float32)
    return ImageDataset(
        images=rgb,
        captions=tuple(f"a handwritten digit {int(target[i])}" for i in index),
        labels={"digit": target[index].astype(np.int32)},
        label_names={"digit": DIGIT_NAMES},
        ids=tuple(f"digits/{int(i):04d}" for i in index),
        meta={"source": "sklearn.datasets.load_digits", "size": size, "resample": resample,
              "digits": None if digits is None else [int(d) for d in digits],
              "max_per_digit": max_per_digit},
    )


def select_digits(digits: Sequence[int] | None = None, max_per_digit: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's raw digits ``[1797, 8, 8]`` (0..16), their targets ``[1797]`` and the
    selected positions (see :func:`load_digits`)."""
    from sklearn.datasets import load_digits as _sk_load_digits

    raw = _sk_load_digits()
    images, target = raw.images, np.asarray(raw.target)
    keep = np.ones(len(target), bool)
    if digits is not None:
        bad = [d for d in digits if d not in range(10)]
        if bad:
            raise ValueError(f"digits: {bad} are not digits 0..9")
        keep &= np.isin(target, list(digits))
    if max_per_digit is not None:
        rank = np.zeros(len(target), int)
        for d in range(10):
            where = np.nonzero(keep & (target == d))[0]
            rank[where] = np.arange(len(where))
        keep &= rank < max_per_digit
    index = np.nonzero(keep)[0]
    if index.size == 0:
        raise DataError(f"digits: nothing selected (digits={digits}, "
                        f"max_per_digit={max_per_digit})")
    return images, target, index
