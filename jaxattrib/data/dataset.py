"""The in-memory image dataset every jaxattrib data source returns.

All our data sets are small (tens to a few thousand images at 32-128 px), so a data set is a plain
frozen container of numpy arrays: ``images [N, H, W, 3] float32`` in ``[-1, 1]`` (NHWC), one
caption and one stable id per example, integer concept labels and free-form ``meta``.

[design] Attribution scores are indexed by training example, so two things are fixed here:

* ``ids`` are stable, human-readable and unique (a relative file path, ``synthetic/...``,
  ``digits/0042``); they survive :meth:`ImageDataset.subset` and :func:`concat`.
* :meth:`ImageDataset.fingerprint` is a sha256 over the image bytes, captions and ids. Stores of
  per-example gradients/features record it and refuse to be scored against another data set.

Batching (:meth:`ImageDataset.batches`) yields one epoch per call in a permutation drawn from an
explicit key or seed; callers fold the epoch number into the key for the next epoch.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Iterator, Mapping, Sequence

import numpy as np


class DataError(ValueError):
    """A data source could not be read (bad file, bad folder layout, missing data set)."""


def uint8_to_model(x: np.ndarray) -> np.ndarray:
    """uint8 pixels ``[..., 3]`` in ``[0, 255]`` -> float32 in ``[-1, 1]``."""
    return (np.asarray(x, np.float32) / 127.5 - 1.0).astype(np.float32)


def model_to_uint8(x: np.ndarray) -> np.ndarray:
    """float pixels in ``[-1, 1]`` -> uint8 ``[0, 255]`` (rounded, clipped)."""
    y = (np.asarray(x, np.float64) + 1.0) * 127.5
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def resize_center_crop(image, size: int):
    """Resizes a PIL image so its shorter side is ``size`` and center-crops to ``size x size``.

    Implemented as one resampling of the centered square of side ``min(w, h)`` (PIL bicubic,
    which low-pass filters when shrinking), so the result is deterministic and free of the
    rounding of the longer side. Returns a PIL image of shape ``size x size``.
    """
    from PIL import Image

    w, h = image.size
    s = min(w, h)
    left, top = (w - s) / 2.0, (h - s) / 2.0
    return image.resize((size, size), Image.Resampling.BICUBIC,
                        box=(left, top, left + s, top + s))


@dataclasses.dataclass(frozen=True, eq=False)
class ImageDataset:
    """A small captioned, labelled image data set held in memory.

    Attributes:
      images: ``[N, H, W, 3]`` float32 in ``[-1, 1]`` (NHWC). Stored read-only.
      captions: ``N`` caption strings.
      labels: name -> ``[N]`` int array; value ``k`` means ``label_names[name][k]``.
      label_names: name -> tuple of class names for that label.
      ids: ``N`` unique, stable example ids.
      meta: free-form description of the source (``source``, ``seed``, ``size``, options).
    """

    images: np.ndarray
    captions: tuple[str, ...]
    labels: Mapping[str, np.ndarray]
    label_names: Mapping[str, tuple[str, ...]]
    ids: tuple[str, ...]
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        images = np.asarray(self.images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise DataError(f"images: expected [N, H, W, 3], got shape {images.shape}")
        if images.dtype != np.float32:
            raise DataError(f"images: expected float32 in [-1, 1], got {images.dtype}")
        n = images.shape[0]
        if n and (not np.all(np.isfinite(images)) or images.min() < -1.0 or images.max() > 1.0):
            raise DataError("images: values must be finite and in [-1, 1]")
        images = np.array(images, copy=True)  # own the pixels: the fingerprint must not drift
        images.flags.writeable = False
        captions = tuple(str(c) for c in self.captions)
        ids = tuple(str(i) for i in self.ids)
        if len(captions) != n:
            raise DataError(f"captions: expected {n}, got {len(captions)}")
        if len(ids) != n:
            raise DataError(f"ids: expected {n}, got {len(ids)}")
        if len(set(ids)) != n:
            dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise DataError(f"ids: must be unique; duplicated: {dup}")
        labels, label_names = {}, {}
        for name, values in self.labels.items():
            v = np.asarray(values)
            if v.shape != (n,) or not np.issubdtype(v.dtype, np.integer):
                raise DataError(f"labels[{name!r}]: expected int array [{n}], got "
                                f"{v.dtype} {v.shape}")
            if name not in self.label_names:
                raise DataError(f"labels[{name!r}]: no entry in label_names")
            names = tuple(str(s) for s in self.label_names[name])
            if n and (v.min() < 0 or v.max() >= len(names)):
                raise DataError(f"labels[{name!r}]: values must be in [0, {len(names)})")
            v = v.astype(np.int32)
            v.flags.writeable = False
            labels[name], label_names[name] = v, names
        object.__setattr__(self, "images", images)
        object.__setattr__(self, "captions", captions)
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "label_names", label_names)
        object.__setattr__(self, "meta", dict(self.meta))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, 3)``."""
        return tuple(self.images.shape[1:])

    def label_strings(self, name: str) -> tuple[str, ...]:
        """The class name of every example for label ``name``: ``N`` strings."""
        names = self.label_names[name]
        return tuple(names[int(k)] for k in self.labels[name])

    def subset(self, indices: Sequence[int] | np.ndarray) -> "ImageDataset":
        """The examples at ``indices`` (ints, in the given order, or a boolean mask ``[N]``).

        Ids, captions and labels follow their images; ``meta`` is kept.
        """
        idx = np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise DataError(f"subset: boolean mask must have shape ({len(self)},)")
            idx = np.nonzero(idx)[0]
        idx = idx.astype(np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise DataError(f"subset: index out of range for {len(self)} examples")
        return ImageDataset(
            images=np.ascontiguousarray(self.images[idx]),
            captions=tuple(self.captions[i] for i in idx),
            labels={k: v[idx] for k, v in self.labels.items()},
            label_names=self.label_names,
            ids=tuple(self.ids[i] for i in idx),
            meta=self.meta,
        )

    def concat(self, *others: "ImageDataset") -> "ImageDataset":
        """``concat([self, *others])``; see :func:`concat`."""
        return concat([self, *others])

    def fingerprint(self) -> str:
        """sha256 hex digest over image shape and bytes (float32, C order), captions and ids.

        Labels and ``meta`` are not part of it: two data sets with the same pixels, captions and
        ids are the same training set for attribution purposes.
        """
        return pixel_fingerprint(self.images, self.captions, self.ids)

    def batches(self, batch_size: int, key_or_seed=None, *, shuffle: bool = True,
                drop_last: bool = False) -> Iterator[dict[str, Any]]:
        """One epoch of batches.

        Args:
          batch_size: examples per batch.
          key_or_seed: a ``jax.random`` key or an int seed for the permutation; required when
            ``shuffle`` (use ``jax.random.fold_in(key, epoch)`` for successive epochs).
          shuffle: permute the examples; otherwise dataset order.
          drop_last: drop the final batch when it is smaller than ``batch_size``.

        Yields:
          dicts with ``images [B, H, W, 3]``, ``captions`` (tuple of B), ``ids`` (tuple of B),
          ``indices [B]`` (positions in this data set) and ``labels`` (name -> ``[B]``).
          Every example appears exactly once per epoch (except the dropped remainder).
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        n = len(self)
        order = epoch_permutation(n, key_or_seed) if shuffle else np.arange(n)
        stop = (n // batch_size) * batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
            yield {
                "images": self.images[idx],
                "captions": tuple(self.captions[i] for i in idx),
                "ids": tuple(self.ids[i] for i in idx),
                "indices": idx,
                "labels": {k: v[idx] for k, v in self.labels.items()},
            }


def pixel_fingerprint(images, captions: Sequence[str], ids: Sequence[str]) -> str:
    """:meth:`ImageDataset.fingerprint` of ``images [N, H, W, 3]`` (any array-like whose
    ``[lo:hi]`` slices give float32 rows; hashed in blocks of 256 rows), captions and ids."""
    h = hashlib.sha256()
    h.update(b"jaxattrib.ImageDataset/v1\0")
    h.update(repr(tuple(int(d) for d in images.shape)).encode())
    for lo in range(0, int(images.shape[0]), 256):
        h.update(np.ascontiguousarray(images[lo:lo + 256], dtype="<f4").tobytes())
    for field in (captions, ids):
        for s in field:
            b = str(s).encode("utf-8")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
        h.update(b"\1")
    return h.hexdigest()


def epoch_permutation(n: int, key_or_seed) -> np.ndarray:
    """A permutation of ``range(n)`` as int64 numpy, from an int seed or a ``jax.random`` key."""
    if key_or_seed is None:
        raise ValueError("shuffling needs an explicit jax.random key or int seed")
    if isinstance(key_or_seed, (int, np.integer)):
        return np.random.default_rng(int(key_or_seed)).permutation(n).astype(np.int64)
    import jax

    return np.asarray(jax.random.permutation(key_or_seed, n)).astype(np.int64)


def concat(datasets: Sequence[ImageDataset]) -> ImageDataset:
    """Concatenates data sets with equal image shapes.

    Labels present in every part are kept; their class names are merged (ordered union, first
    appearance wins) and the integer labels remapped. Ids must stay unique. ``meta`` becomes
    ``{'source': 'concat', 'parts': [meta of each part]}``.
    """
    datasets = list(datasets)
    if not datasets:
        raise DataError("concat: no data sets given")
    shapes = {d.image_shape for d in datasets}
    if len(shapes) != 1:
        raise DataError(f"concat: image shapes differ: {sorted(shapes)}")
    common = [k for k in datasets[0].labels if all(k in d.labels for d in datasets)]
    labels, label_names = {}, {}
    for k in common:
        names: list[str] = []
        for d in datasets:
            names += [s for s in d.label_names[k] if s not in names]
        lookup = {s: i for i, s in enumerate(names)}
        labels[k] = np.concatenate([
            np.array([lookup[s] for s in d.label_names[k]], np.int32)[d.labels[k]]
            for d in datasets])
        label_names[k] = tuple(names)
    return ImageDataset(
        images=np.concatenate([d.images for d in datasets]),
        captions=sum((d.captions for d in datasets), ()),
        labels=labels,
        label_names=label_names,
        ids=sum((d.ids for d in datasets), ()),
        meta={"source": "concat", "parts": [dict(d.meta) for d in datasets]},
    )
