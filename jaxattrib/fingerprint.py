"""Fingerprints: the one home of the sha256 recipes that key stored results (foundation layer).

A fingerprint is the hex sha256 of a byte stream. Run directories store fingerprints (feature
stores, score caches, CGI-DM recoveries, MONTRAGE caches, record manifests, latent stores), so
**each recipe's byte stream is frozen**: a fingerprint stored by an older run must still match
when the same data is fingerprinted again, or the run stops resuming. [design] The recipes
therefore differ where their stored kinds always differed; they share one hashing helper
(:func:`digest`) and each states which stored values it keys. Never change a recipe's bytes;
add a new recipe (and keep the old one for existing runs) instead.

Recipes (arrays are hashed C-contiguous, in their own dtype and byte order):

=======================  ===============================================  =====================
recipe                   bytes hashed, in order                           keys
=======================  ===============================================  =====================
:func:`raw_arrays`       each array's bytes (no shapes, no dtypes)        demo score/feature
                                                                          caches, CGI-DM inputs,
                                                                          ``attribute`` queries
:func:`typed_arrays`     per array ``"{shape}|{dtype.str}|"`` + bytes     feature stores
                                                                          (``dataset_fingerprint``),
                                                                          MONTRAGE caches
:func:`text`             ``sep.join(parts)`` as UTF-8                     ``attribute``'s latent
                                                                          feature-store key
:func:`json_object`      ``json.dumps(obj, sort_keys=True)`` as UTF-8     source-model caches
=======================  ===============================================  =====================

Other stored kinds keep their own recipe beside the data they describe, because the recipe is
part of that format: record manifests (:func:`jaxattrib.train.record.dataset_fingerprint`,
key paths first), data sources (``jaxattrib.data.source``, versioned tags), pixel data sets
(:func:`jaxattrib.data.dataset.pixel_fingerprint`, hashed in blocks), the VAE
(:func:`jaxattrib.diffusion.latents.vae_fingerprint`, sorted key paths), LDS masks
(:func:`jaxattrib.eval.lds.masks_fingerprint`, packed bits) and files
(:func:`jaxattrib.integrity.sha256_file`). They all hash with :func:`digest`'s sha256.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

import numpy as np


def digest(chunks: Iterable[bytes]) -> str:
    """Hex sha256 of the concatenation of ``chunks`` (streamed; nothing is joined in memory)."""
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def _contiguous(a: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a))


def raw_arrays(*arrays: Any) -> str:
    """sha256 over the arrays' bytes only, in order (no shapes or dtypes)."""
    return digest(_contiguous(a).tobytes() for a in arrays)


def typed_arrays(*arrays: Any) -> str:
    """sha256 over ``"{shape}|{dtype.str}|"`` then the bytes, for each array in order."""
    def chunks():
        for a in arrays:
            a = _contiguous(a)
            yield f"{a.shape}|{a.dtype.str}|".encode()
            yield a.tobytes()
    return digest(chunks())


def tree(tree_or_arrays: Any) -> str:
    """:func:`typed_arrays` of a pytree's leaves (``jax.tree_util.tree_leaves`` order)."""
    import jax  # local: this module is numpy-only otherwise

    return typed_arrays(*jax.tree_util.tree_leaves(tree_or_arrays))


def text(*parts: str, sep: str = "|") -> str:
    """sha256 of ``sep.join(parts)`` encoded as UTF-8."""
    return digest([sep.join(parts).encode()])


def json_object(obj: Any) -> str:
    """sha256 of ``json.dumps(obj, sort_keys=True)`` encoded as UTF-8."""
    return digest([json.dumps(obj, sort_keys=True).encode()])


__all__ = ["digest", "json_object", "raw_arrays", "text", "tree", "typed_arrays"]
