"""Seeded random projections of parameter gradients, generated block by block on device.

What follows the references:

* TRAK (MadryLab/trak) projects per-example gradients ``g ∈ R^p`` to ``Pᵀg ∈ R^k`` with a dense
  Gaussian or Rademacher ``P`` fixed by a seed, generated in blocks so the ``p×k`` matrix never
  exists. We scale entries by ``1/√k`` so ``E[<Pᵀa, Pᵀb>] = <a, b>`` (TRAK uses unscaled
  entries; the scaling changes nothing downstream except λ's units).
* Sparse JL ("SJLT", Kane & Nelson's block construction): each input coordinate is hashed to one
  output coordinate in each of ``c`` blocks of ``k/c`` outputs, with a random sign, scaled by
  ``1/√c``. Requires ``k % c == 0``.
* The factored projection follows LoGra (Choe et al. 2024): for a Dense layer with per-example
  weight gradient ``G = Σ_t x_t δ_tᵀ`` (``x_t`` inputs, ``δ_t`` output gradients over the
  example's tokens ``t``), the feature is ``vec(P_inᵀ G P_out) = Σ_t (P_inᵀx_t) ⊗ (P_outᵀδ_t)``,
  i.e. the projection ``P_in ⊗ P_out`` of ``vec(G)`` with ``k = k_in·k_out``; ``G`` is never formed.

Our design [design]:

* Leaves are visited in ``jax.tree_util`` order; leaf ``i`` is split into blocks of
  ``rows_i = min(block_size, p_i)`` consecutive coordinates (row-major ``ravel``), and block ``b``
  is drawn from ``fold_in(fold_in(key, i), b)``. Features therefore depend only on (key, kind, k,
  c, block_size, the leaves' shapes, :data:`GENERATOR_VERSION`) — not on batch size, device
  count or run.
* Generator version 2 (:data:`GENERATOR_VERSION`, in ``meta()``, so a store written by
  another version refuses to reopen): every block of P (all families, also ``P_in, P_out``) is
  drawn with JAX's *non-partitionable* threefry (``jax.threefry_partitionable(False)`` around
  the draw only; it selects the formulation, not the sharding, and P blocks are replicated, so
  1 and 8 devices agree); on CPU 3–5× faster than the partitionable default
  (docs/benchmarks/featurize.md). Gaussian: ``jax.random.normal``, exactly N(0, 1)/√k.
  Rademacher is *bit-packed*: ``P[r, c] = (1 − 2·bit_{c mod 32}(W[r, ⌊c/32⌋]))/√k``, ``W =
  bits(block_key, [rows, ⌈k/32⌉])``, 32× fewer PRNG evaluations. (Version 1: partitionable
  threefry, one ``jax.random.rademacher`` draw per entry.)
* P's cost is paid once per :meth:`Projector.project` call whatever the batch, so the engine
  projects several microbatches per pass (``proj_batch`` of :func:`jaxattrib.attribution.trak.
  featurize`; ``project``'s extra leading ``batch_dims``).
* The factored projection *sums* the per-layer projections into one ``k``-vector (layer
  ``P_in, P_out`` from ``fold_in(fold_in(key, layer), 0/1)``, Gaussian ``N(0, 1/k_in)``,
  ``N(0, 1/k_out)``): the dense families' ``[B, k]`` interface, unbiased for inner products.
  Only the 2-D ``kernel`` leaves of ``nn.Dense`` layers (biases, norms, convolutions ignored,
  as in LoGra); the capture from a Flax model: :mod:`jaxattrib.attribution.grads`
  (``factored_projected_grads``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("gaussian", "rademacher", "sjlt", "factored")
_HIGHEST = jax.lax.Precision.HIGHEST
GENERATOR_VERSION = 2
"""Version of the P generator (see the module docstring); part of every projector's ``meta()``."""


def _key_from(key_or_seed) -> jax.Array:
    if isinstance(key_or_seed, (int, np.integer)):
        return jax.random.PRNGKey(int(key_or_seed))
    return key_or_seed


def _key_list(key: jax.Array) -> list[int]:
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return [int(v) for v in np.asarray(data).ravel()]


def default_block_size(k: int, max_elements: int = 1 << 22) -> int:
    """Rows per generated block so a block holds at most ``max_elements`` (16 MiB in float32)."""
    return max(1, max_elements // k)


@partial(jax.jit, static_argnums=(0, 2, 3, 4, 5))
def _dense_block(kind: str, key: jax.Array, rows: int, k: int, dtype, c: int) -> jax.Array:
    """The ``[rows, k]`` block of P drawn from ``key`` (dense, also for SJLT; used by tests)."""
    if kind == "gaussian":
        with jax.threefry_partitionable(False):
            return jax.random.normal(key, (rows, k), dtype) / jnp.sqrt(jnp.asarray(k, dtype))
    if kind == "rademacher":
        return packed_rademacher(key, rows, k, dtype) / jnp.sqrt(jnp.asarray(k, dtype))
    if kind == "sjlt":
        idx, sign = _sjlt_hash(key, rows, k, c, dtype)
        out = jnp.zeros((rows, k), dtype)
        return out.at[jnp.arange(rows)[:, None], idx].add(sign)
    raise ValueError(f"kind={kind!r}: expected one of {KINDS[:3]} for a dense block")


def packed_rademacher(key: jax.Array, rows: int, k: int, dtype=jnp.float32) -> jax.Array:
    """``[rows, k]`` independent ±1 signs, 32 per 32-bit word of ``jax.random.bits``.

    Entry ``[r, c]`` is ``1 − 2·bit_{c mod 32}(W[r, ⌊c/32⌋])`` with
    ``W = bits(key, [rows, ⌈k/32⌉], uint32)`` (non-partitionable threefry); unused bits of the
    last word are dropped. Each bit of a threefry word is an independent fair coin, so the
    entries are i.i.d. Rademacher like ``jax.random.rademacher``, at 1/32 of its PRNG work.
    """
    words = -(-k // 32)
    with jax.threefry_partitionable(False):
        w = jax.random.bits(key, (rows, words), jnp.uint32)
    bit = (w[:, :, None] >> jnp.arange(32, dtype=jnp.uint32)) & jnp.uint32(1)  # [rows, words, 32]
    signs = jnp.where(bit == 1, jnp.asarray(-1, dtype), jnp.asarray(1, dtype))
    return signs.reshape(rows, words * 32)[:, :k]


def _sjlt_hash(key: jax.Array, rows: int, k: int, c: int, dtype):
    """Output index ``[rows, c]`` (one per block of k/c) and scaled sign ``±1/√c`` ``[rows, c]``."""
    with jax.threefry_partitionable(False):
        k_idx, k_sign = jax.random.split(key)
        width = k // c
        idx = jax.random.randint(k_idx, (rows, c), 0, width) + jnp.arange(c) * width
        sign = jax.random.rademacher(k_sign, (rows, c), dtype) / jnp.sqrt(jnp.asarray(c, dtype))
    return idx, sign


@dataclass(frozen=True)
class LeafLayout:
    """Block layout of one leaf: ``size`` coordinates in ``n_blocks`` blocks of ``rows``."""

    shape: tuple[int, ...]
    size: int
    rows: int
    n_blocks: int


def _layout(shape, block_size: int) -> LeafLayout:
    size = int(np.prod(shape)) if len(shape) else 1
    rows = max(1, min(block_size, size))
    return LeafLayout(tuple(int(s) for s in shape), size, rows, -(-size // rows))


@dataclass(frozen=True)
class Projector:
    """Dense-family projector (Gaussian / Rademacher / SJLT) over a parameter tree.

    ``project(grads)``: ``grads`` has the structure of ``param_shapes`` with a leading batch
    axis ``B`` on every leaf → ``[B, k]``. Pure and jit-able; P is regenerated inside, once per
    call whatever ``B`` (so larger batches amortize it).
    """

    kind: str
    k: int
    key: jax.Array
    treedef: Any
    layouts: tuple[LeafLayout, ...]
    dtype: Any
    block_size: int
    c: int

    @property
    def p(self) -> int:
        return sum(l.size for l in self.layouts)

    def meta(self) -> dict:
        """JSON-able description; two projectors with equal meta give identical features."""
        return {"kind": self.kind, "k": self.k, "key": _key_list(self.key),
                "dtype": np.dtype(self.dtype).name, "block_size": self.block_size,
                "c": self.c if self.kind == "sjlt" else None,
                "shapes": [list(l.shape) for l in self.layouts],
                "generator": GENERATOR_VERSION}

    def _check(self, grads, batch_dims: int):
        leaves, treedef = jax.tree_util.tree_flatten(grads)
        if treedef != self.treedef:
            raise ValueError(f"gradient tree structure {treedef} differs from the projector's "
                             f"{self.treedef}")
        lead = tuple(leaves[0].shape[:batch_dims])
        for i, (leaf, lay) in enumerate(zip(leaves, self.layouts)):
            if tuple(leaf.shape[batch_dims:]) != lay.shape or tuple(
                    leaf.shape[:batch_dims]) != lead:
                raise ValueError(f"gradient leaf {i} has shape {leaf.shape}; the projector expects "
                                 f"{batch_dims} batch axes {lead} then {lay.shape}")
        return leaves

    def project(self, grads, *, batch_dims: int = 1) -> jax.Array:
        """``[B, ...] leaves`` → ``Pᵀg`` of shape ``[B, k]`` in ``self.dtype``.

        ``batch_dims``: number of leading batch axes (e.g. 2 for ``[M, B, ...]`` leaves →
        ``[M, B, k]``); all of them share one generation of P.
        """
        leaves = self._check(grads, batch_dims)
        return _project_leaves(self.kind, self.k, self.layouts, self.dtype, self.c,
                               self.key, leaves, batch_dims)

    def materialize(self) -> jax.Array:
        """The full ``[p, k]`` matrix (tests only; small ``p``). Built from dense blocks."""
        parts = []
        for i, lay in enumerate(self.layouts):
            leaf_key = jax.random.fold_in(self.key, i)
            blocks = [_dense_block(self.kind, jax.random.fold_in(leaf_key, np.uint32(b)),
                                   lay.rows, self.k, self.dtype, self.c)
                      for b in range(lay.n_blocks)]
            parts.append(jnp.concatenate(blocks, 0)[: lay.size])
        return jnp.concatenate(parts, 0)


@partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 7))
def _project_leaves(kind, k, layouts, dtype, c, key, leaves, batch_dims=1):
    """Jitted once per (kind, k, layouts, dtype, c); the key is traced, so seeds share it.

    Leaves have ``batch_dims`` leading axes (kept as they are — a reshape merging a sharded
    batch axis with another one would force a resharding), every block of P multiplies all.
    """
    lead = tuple(leaves[0].shape[:batch_dims])
    acc = jnp.zeros(lead + (k,), dtype)
    for i, (leaf, lay) in enumerate(zip(leaves, layouts)):
        g = leaf.reshape(lead + (lay.size,)).astype(dtype)
        acc = acc + _project_leaf(kind, k, dtype, c, g, jax.random.fold_in(key, i), lay)
    return acc


def _project_leaf(kind, k, dtype, c, g: jax.Array, leaf_key: jax.Array, lay: LeafLayout):
    """``g [..., size]`` → ``[..., k]``, scanning over the leaf's blocks of P."""
    lead = g.shape[:-1]
    pad = lay.n_blocks * lay.rows - lay.size
    if pad:
        g = jnp.pad(g, [(0, 0)] * len(lead) + [(0, pad)])

    def step(acc, b):
        gb = jax.lax.dynamic_slice_in_dim(g, b.astype(jnp.int32) * lay.rows, lay.rows, axis=-1)
        key = jax.random.fold_in(leaf_key, b)
        if kind == "sjlt":
            idx, sign = _sjlt_hash(key, lay.rows, k, c, dtype)
            vals = (gb[..., :, None] * sign).reshape(lead + (-1,))
            return acc.at[..., idx.reshape(-1)].add(vals), None
        block = _dense_block(kind, key, lay.rows, k, dtype, c)
        return acc + jnp.dot(gb, block, precision=_HIGHEST), None

    acc0 = jnp.zeros(lead + (k,), dtype)
    acc, _ = jax.lax.scan(step, acc0, jnp.arange(lay.n_blocks, dtype=jnp.uint32))
    return acc


def _is_dense_kernel(path: str, shape) -> bool:
    return path.split("/")[-1] == "kernel" and len(shape) == 2


@dataclass(frozen=True)
class FactoredProjector:
    """LoGra-style projector for Dense kernels: ``Σ_layers vec(P_inᵀ G_l P_out)`` → ``[B, k]``.

    ``layers`` maps a Dense module path (``'/'``-joined Flax scope path, e.g. ``'Dense_0'`` or
    ``'block/attn/to_q'``) to its kernel shape ``(d_in, d_out)``; the kernel is the parameter
    at ``path + '/kernel'``.
    """

    k: int
    k_in: int
    k_out: int
    key: jax.Array
    layers: Mapping[str, tuple[int, int]]
    dtype: Any
    kind: str = field(default="factored")

    def meta(self) -> dict:
        return {"kind": "factored", "k": self.k, "k_in": self.k_in, "k_out": self.k_out,
                "key": _key_list(self.key), "dtype": np.dtype(self.dtype).name,
                "layers": {p: list(s) for p, s in sorted(self.layers.items())},
                "generator": GENERATOR_VERSION}

    def layer_matrices(self, path: str) -> tuple[jax.Array, jax.Array]:
        """``(P_in [d_in, k_in], P_out [d_out, k_out])`` of one layer."""
        names = sorted(self.layers)
        d_in, d_out = self.layers[path]
        lkey = jax.random.fold_in(self.key, names.index(path))
        with jax.threefry_partitionable(False):
            p_in = jax.random.normal(jax.random.fold_in(lkey, 0), (d_in, self.k_in), self.dtype)
            p_out = jax.random.normal(jax.random.fold_in(lkey, 1), (d_out, self.k_out),
                                      self.dtype)
        return (p_in / jnp.sqrt(jnp.asarray(self.k_in, self.dtype)),
                p_out / jnp.sqrt(jnp.asarray(self.k_out, self.dtype)))

    def project_layers(self, inputs: Mapping[str, list], out_grads: Mapping[str, list]):
        """Features from captured activations, never forming weight gradients.

        ``inputs[path]`` / ``out_grads[path]``: lists (one entry per call of the layer) of
        ``[B, ..., d_in]`` / ``[B, ..., d_out]``; all axes between B and the last are tokens.
        Returns ``[B, k]``.
        """
        feats = None
        for path in sorted(self.layers):
            p_in, p_out = self.layer_matrices(path)
            for x, d in zip(inputs.get(path, []), out_grads.get(path, [])):
                b = x.shape[0]
                xp = jnp.dot(x.reshape(b, -1, x.shape[-1]).astype(self.dtype), p_in,
                             precision=_HIGHEST)
                dp = jnp.dot(d.reshape(b, -1, d.shape[-1]).astype(self.dtype), p_out,
                             precision=_HIGHEST)
                f = jnp.einsum("bta,btc->bac", xp, dp, precision=_HIGHEST).reshape(b, self.k)
                feats = f if feats is None else feats + f
        if feats is None:
            raise ValueError("no Dense layer of the projector was called; captured paths: "
                             f"{sorted(inputs)}; projector layers: {sorted(self.layers)}")
        return feats

    def project(self, grads) -> jax.Array:
        """Same features from full per-example gradients (``[B, ...]`` leaves, nested dict).

        For checking and for callers that already have gradients: ``Σ_l vec(P_inᵀ G_l P_out)``.
        """
        flat = _flatten(grads)
        feats = None
        for path in sorted(self.layers):
            g = flat[path + "/kernel"].astype(self.dtype)
            p_in, p_out = self.layer_matrices(path)
            f = jnp.einsum("bij,ia,jc->bac", g, p_in, p_out, precision=_HIGHEST)
            f = f.reshape(g.shape[0], self.k)
            feats = f if feats is None else feats + f
        return feats

    def materialize(self) -> jax.Array:
        """``[Σ_l d_in·d_out, k]``: ``kron(P_in, P_out)`` per layer (sorted paths), stacked."""
        return jnp.concatenate([jnp.kron(*self.layer_matrices(p)) for p in sorted(self.layers)], 0)


def _flatten(tree) -> dict[str, Any]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out["/".join(_key_name(k) for k in path)] = leaf
    return out


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def dense_kernel_shapes(param_shapes, layer_filter: str | None = None) -> dict[str, tuple]:
    """``{module_path: (d_in, d_out)}`` for every 2-D ``kernel`` leaf (optionally regex-filtered
    on the module path)."""
    out = {}
    for path, leaf in _flatten(param_shapes).items():
        shape = tuple(np.shape(leaf)) if not hasattr(leaf, "shape") else tuple(leaf.shape)
        if _is_dense_kernel(path, shape):
            mod = path.rsplit("/", 1)[0] if "/" in path else ""
            if layer_filter is None or re.search(layer_filter, mod):
                out[mod] = shape
    return out


def make_projector(kind: str, k: int, key, param_shapes_tree, dtype=jnp.float32, *,
                   block_size: int | None = None, c: int = 4, k_in: int | None = None,
                   layer_filter: str | None = None):
    """Builds a projector from ``param_shapes_tree`` (arrays or ``ShapeDtypeStruct`` leaves).

    Args:
      kind: ``'gaussian' | 'rademacher' | 'sjlt' | 'factored'``.
      k: output dimension (e.g. 512 … 32768).
      key: ``jax.random`` key or an int seed.
      dtype: dtype of P and of the features.
      block_size: rows of P generated at once (default: ≤ 2^22 elements per block).
      c: SJLT non-zeros per input coordinate (``k % c == 0``).
      k_in: factored only; ``k_out = k // k_in`` (default ``k_in = isqrt(k)``, k a square).
      layer_filter: factored only; regex on the Dense module path.
    Returns:
      :class:`Projector` or :class:`FactoredProjector` with ``project(grads) -> [B, k]``.
    """
    key = _key_from(key)
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
    if k < 1:
        raise ValueError(f"k={k}: expected a positive output dimension")
    if kind == "factored":
        k_in = k_in or math.isqrt(k)
        if k % k_in:
            raise ValueError(f"factored projection: k={k} is not a multiple of k_in={k_in}")
        layers = dense_kernel_shapes(param_shapes_tree, layer_filter)
        if not layers:
            raise ValueError("factored projection: no 2-D Dense 'kernel' leaves in the tree")
        return FactoredProjector(k, k_in, k // k_in, key, layers, dtype)
    if kind == "sjlt" and (c < 1 or k % c):
        raise ValueError(f"sjlt: k={k} must be a multiple of c={c}")
    block_size = block_size or default_block_size(k)
    leaves, treedef = jax.tree_util.tree_flatten(param_shapes_tree)
    if not leaves:
        raise ValueError("param_shapes_tree has no leaves")
    layouts = tuple(_layout(np.shape(l) if not hasattr(l, "shape") else l.shape, block_size)
                    for l in leaves)
    return Projector(kind, k, key, treedef, layouts, dtype, block_size, c)
