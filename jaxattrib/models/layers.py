"""Building blocks shared by the UNet and VAE ports (Flax linen, NHWC).

What follows the reference: every block reproduces the forward pass of the diffusers module of
the same name (diffusers 0.3x-0.4x, eval mode, no dropout): ``ResnetBlock2D`` (``default``
time-embedding norm), ``Downsample2D`` / ``Upsample2D`` with a convolution, the
``Attention`` used by ``BasicTransformerBlock`` and by the VAE mid-block, ``GEGLU`` feed-forward,
``BasicTransformerBlock`` (``norm_type="layer_norm"``), ``Transformer2DModel`` for continuous
inputs (1x1-conv or linear ``proj_in`` / ``proj_out``), the sinusoidal
``get_timestep_embedding`` and ``TimestepEmbedding``.

Our design:

* Sub-module names mirror the diffusers attribute paths with ``.`` -> ``_`` for list entries
  (``resnets_0``, ``transformer_blocks_0``, ``attn1``, ``to_out_0``, ``ff/net_0/proj``), so a
  Flax parameter path maps 1:1 to a torch state-dict key (see :func:`flax_path_to_torch_key`)
  and parameter subsets can be chosen by path pattern (e.g. ``'attn2'``).
* Attention is plain ``jnp`` (einsum + softmax in float32), with no fused kernels, so it
  differentiates under ``jax.vmap(jax.grad(...))`` and behaves identically on CPU/GPU/TPU.
* Group/Layer norms use the two-pass variance (``use_fast_variance=False``) to match torch.
* ``dtype`` is the computation dtype; parameters are always stored in float32.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Dtype = Any


# --------------------------------------------------------------------------------------------
# Parameter-path <-> torch-key mapping (shared by unet.py and vae.py)
# --------------------------------------------------------------------------------------------

_LIST_ENTRY = re.compile(r"^(.*)_(\d+)$")
#: Module-list attribute names whose Flax names end in ``_<index>``.
LIST_NAMES = frozenset({"down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks",
                        "downsamplers", "upsamplers", "to_out", "net"})


def flax_path_to_torch_key(path: Sequence[str]) -> str:
    """``('down_blocks_0', 'resnets_1', 'conv1', 'kernel')`` -> ``down_blocks.0.resnets.1.conv1.weight``.

    Leaf names: ``kernel``/``scale``/``embedding`` -> ``weight``; ``bias`` stays ``bias``.
    """
    parts: list[str] = []
    for name in path[:-1]:
        m = _LIST_ENTRY.match(name)
        if m and m.group(1) in LIST_NAMES:
            parts.extend([m.group(1), m.group(2)])
        else:
            parts.append(name)
    leaf = path[-1]
    parts.append({"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf))
    return ".".join(parts)


def torch_to_flax_array(leaf: str, w: np.ndarray) -> np.ndarray:
    """Layout change for one tensor given the Flax leaf name (``kernel`` of Dense or Conv)."""
    if leaf == "kernel":
        if w.ndim == 4:  # Conv2d (out, in, kh, kw) -> (kh, kw, in, out)
            return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))
        if w.ndim == 2:  # Linear (out, in) -> (in, out)
            return np.ascontiguousarray(w.T)
    return w


def flax_to_torch_array(leaf: str, w: np.ndarray) -> np.ndarray:
    """Inverse of :func:`torch_to_flax_array`."""
    if leaf == "kernel":
        if w.ndim == 4:
            return np.ascontiguousarray(np.transpose(w, (3, 2, 0, 1)))
        if w.ndim == 2:
            return np.ascontiguousarray(w.T)
    return w


def params_from_torch(sd, shapes) -> dict:
    """Fills a Flax parameter tree of the given ``shapes`` from a :class:`StateDict`.

    ``shapes``: pytree (nested dicts) of objects with ``.shape`` (e.g. ``jax.eval_shape`` of
    ``init``). Every leaf is ``sd.take``-n with its torch key, so missing tensors and shape
    mismatches are recorded; the caller runs ``sd.finish()``.
    """
    flat = _flatten(shapes)
    out = {}
    for path, s in flat.items():
        leaf = path[-1]
        key = flax_path_to_torch_key(path)
        # Expected torch-layout shape is checked after the layout change, in Flax layout.
        out[path] = sd.take(key, tuple(s.shape), lambda w, leaf=leaf: torch_to_flax_array(leaf, w))
    return _unflatten(out)


def params_to_torch(params) -> dict[str, np.ndarray]:
    """Flax parameter tree -> ``{torch_key: float32 array}`` in torch layout."""
    return {flax_path_to_torch_key(path): flax_to_torch_array(path[-1], np.asarray(v, np.float32))
            for path, v in _flatten(params).items()}


def _flatten(tree, prefix=()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) or hasattr(v, "items"):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


# --------------------------------------------------------------------------------------------
# Primitive layers
# --------------------------------------------------------------------------------------------

def group_norm(num_groups: int, eps: float, dtype: Dtype, name: str) -> nn.GroupNorm:
    """torch ``GroupNorm`` equivalent over the channel (last) axis of NHWC / NLC inputs."""
    return nn.GroupNorm(num_groups=num_groups, epsilon=eps, dtype=dtype,
                        use_fast_variance=False, name=name)


def layer_norm(eps: float, dtype: Dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


def conv(features: int, kernel: int, dtype: Dtype, name: str, stride: int = 1,
         padding: int | None = None, use_bias: bool = True) -> nn.Conv:
    """torch ``Conv2d(kernel_size=kernel, stride, padding)``; default padding ``(kernel-1)//2``."""
    p = (kernel - 1) // 2 if padding is None else padding
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((p, p), (p, p)), use_bias=use_bias, dtype=dtype, name=name)


def get_timestep_embedding(timesteps: jax.Array, embedding_dim: int, flip_sin_to_cos: bool = False,
                           downscale_freq_shift: float = 1.0, scale: float = 1.0,
                           max_period: int = 10000) -> jax.Array:
    """Sinusoidal embedding, same arithmetic as diffusers ``get_timestep_embedding``.

    timesteps: ``[N]`` (int or float, possibly fractional) -> ``[N, embedding_dim]`` float32.
    """
    timesteps = jnp.asarray(timesteps)
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-D [N], got shape {timesteps.shape}")
    half_dim = embedding_dim // 2
    exponent = -math.log(max_period) * jnp.arange(half_dim, dtype=jnp.float32)
    exponent = exponent / (half_dim - downscale_freq_shift)
    emb = jnp.exp(exponent)
    emb = timesteps.astype(jnp.float32)[:, None] * emb[None, :]
    emb = scale * emb
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half_dim:], emb[:, :half_dim]], axis=-1)
    if embedding_dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """``linear_1 -> SiLU -> linear_2``: ``[N, in] -> [N, time_embed_dim]``."""

    time_embed_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.time_embed_dim, dtype=self.dtype, name="linear_1")(x)
        x = nn.silu(x)
        return nn.Dense(self.time_embed_dim, dtype=self.dtype, name="linear_2")(x)


class ResnetBlock2D(nn.Module):
    """diffusers ``ResnetBlock2D`` (``time_embedding_norm="default"``, SiLU), NHWC.

    x: ``[B, H, W, C_in]``; temb: ``[B, T]`` or ``None`` (VAE) -> ``[B, H, W, out_channels]``.
    A 1x1 ``conv_shortcut`` is created when ``C_in != out_channels``.
    """

    out_channels: int
    groups: int = 32
    groups_out: int | None = None
    eps: float = 1e-6
    use_temb: bool = True
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        residual = x
        h = group_norm(self.groups, self.eps, self.dtype, "norm1")(x)
        h = nn.silu(h)
        h = conv(self.out_channels, 3, self.dtype, "conv1")(h)
        if self.use_temb:
            if temb is None:
                raise ValueError("ResnetBlock2D built with a time embedding needs temb")
            t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = group_norm(self.groups_out or self.groups, self.eps, self.dtype, "norm2")(h)
        h = nn.silu(h)
        h = conv(self.out_channels, 3, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            residual = conv(self.out_channels, 1, self.dtype, "conv_shortcut")(residual)
        return (residual + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 convolution (``downsamplers.0.conv``). ``padding=0`` pads right/bottom by 1
    first, as diffusers' VAE encoder does. ``[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C]``."""

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(self.out_channels, 3, self.dtype, "conv", stride=2, padding=self.padding)(x)


def nearest_resize(x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
    """torch ``F.interpolate(mode='nearest')`` on NHWC: x2 when ``size`` is None, else to ``size``."""
    if size is None:
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    h, w = x.shape[1], x.shape[2]
    oh, ow = size
    ih = np.minimum(np.floor(np.arange(oh) * np.float32(h / oh)).astype(np.int64), h - 1)
    iw = np.minimum(np.floor(np.arange(ow) * np.float32(w / ow)).astype(np.int64), w - 1)
    return x[:, ih][:, :, iw]


class Upsample2D(nn.Module):
    """Nearest x2 (or to ``output_size``) then 3x3 convolution (``upsamplers.0.conv``)."""

    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, output_size: tuple[int, int] | None = None):
        x = nearest_resize(x, output_size)
        return conv(self.out_channels, 3, self.dtype, "conv")(x)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int) -> jax.Array:
    """Multi-head softmax attention in plain ``jnp``.

    q: ``[B, Lq, H*D]``, k/v: ``[B, Lk, H*D]`` -> ``[B, Lq, H*D]``. Scale ``D**-0.5``; scores
    and softmax are computed in float32 (equivalent to diffusers' ``upcast_attention`` /
    ``upcast_softmax``; a no-op for float32 inputs).
    """
    b, lq, inner = q.shape
    d = inner // heads
    qh = q.reshape(b, lq, heads, d)
    kh = k.reshape(b, k.shape[1], heads, d)
    vh = v.reshape(b, v.shape[1], heads, d)
    scores = jnp.einsum("bqhd,bkhd->bhqk", qh.astype(jnp.float32), kh.astype(jnp.float32))
    probs = jax.nn.softmax(scores * (d ** -0.5), axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, vh)
    return out.reshape(b, lq, inner)


class Attention(nn.Module):
    """diffusers ``Attention`` for token inputs: ``to_q/to_k/to_v`` then ``to_out.0``.

    x: ``[B, L, query_dim]``; context: ``[B, Lc, Dc]`` or ``None`` (self-attention) ->
    ``[B, L, query_dim]``. ``qkv_bias`` is ``attention_bias`` (False in the UNet, True in
    the VAE).
    """

    heads: int
    dim_head: int
    query_dim: int
    qkv_bias: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):
        inner = self.heads * self.dim_head
        ctx = x if context is None else context
        q = nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_q")(x)
        k = nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_k")(ctx)
        v = nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_v")(ctx)
        out = dot_product_attention(q, k, v, self.heads)
        return nn.Dense(self.query_dim, dtype=self.dtype, name="to_out_0")(out)


class SpatialSelfAttention(nn.Module):
    """The VAE mid-block ``Attention`` (``_from_deprecated_attn_block``): group norm, one-
    or multi-head self-attention over the H*W positions, residual add.
    ``[B, H, W, C] -> [B, H, W, C]``."""

    heads: int
    groups: int = 32
    eps: float = 1e-6
    rescale_output_factor: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        t = group_norm(self.groups, self.eps, self.dtype, "group_norm")(x).reshape(b, h * w, c)
        inner = c  # dim_head * heads == C for the VAE attention
        q = nn.Dense(inner, dtype=self.dtype, name="to_q")(t)
        k = nn.Dense(inner, dtype=self.dtype, name="to_k")(t)
        v = nn.Dense(inner, dtype=self.dtype, name="to_v")(t)
        out = dot_product_attention(q, k, v, self.heads)
        out = nn.Dense(c, dtype=self.dtype, name="to_out_0")(out).reshape(b, h, w, c)
        return (out + x) / self.rescale_output_factor


class GEGLU(nn.Module):
    """``proj`` to ``2*dim_out``, split into (hidden, gate), ``hidden * gelu(gate)`` (exact erf GELU)."""

    dim_out: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(2 * self.dim_out, dtype=self.dtype, name="proj")(x)
        hidden, gate = jnp.split(h, 2, axis=-1)
        return hidden * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """``net.0`` = GEGLU(dim -> 4*dim), ``net.2`` = Linear(4*dim -> dim). ``[B, L, dim]``."""

    dim: int
    mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = GEGLU(self.dim * self.mult, dtype=self.dtype, name="net_0")(x)
        return nn.Dense(self.dim, dtype=self.dtype, name="net_2")(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attn (``attn1``), cross-attn (``attn2``), GEGLU ``ff``.

    x: ``[B, L, dim]``; context: ``[B, Lc, Dc]`` -> ``[B, L, dim]``. With
    ``only_cross_attention`` ``attn1`` also attends to ``context`` (as in diffusers).
    """

    dim: int
    heads: int
    dim_head: int
    only_cross_attention: bool = False
    norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        attn = lambda name: Attention(self.heads, self.dim_head, self.dim, dtype=self.dtype,  # noqa: E731
                                      name=name)
        h = layer_norm(self.norm_eps, self.dtype, "norm1")(x)
        x = x + attn("attn1")(h, context if self.only_cross_attention else None)
        h = layer_norm(self.norm_eps, self.dtype, "norm2")(x)
        x = x + attn("attn2")(h, context)
        h = layer_norm(self.norm_eps, self.dtype, "norm3")(x)
        return x + FeedForward(self.dim, dtype=self.dtype, name="ff")(h)


class Transformer2DModel(nn.Module):
    """Spatial transformer for continuous inputs (diffusers ``Transformer2DModel``).

    x: ``[B, H, W, C]``; context: ``[B, Lc, Dc]`` -> ``[B, H, W, C]``. GroupNorm (eps 1e-6),
    ``proj_in`` (1x1 conv, or Linear when ``use_linear_projection``), ``num_layers``
    :class:`BasicTransformerBlock`, ``proj_out``, residual add.
    """

    heads: int
    dim_head: int
    num_layers: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        b, h, w, c = x.shape
        inner = self.heads * self.dim_head
        residual = x
        t = group_norm(self.groups, 1e-6, self.dtype, "norm")(x)
        if self.use_linear_projection:
            t = nn.Dense(inner, dtype=self.dtype, name="proj_in")(t.reshape(b, h * w, c))
        else:
            t = conv(inner, 1, self.dtype, "proj_in")(t).reshape(b, h * w, inner)
        for i in range(self.num_layers):
            t = BasicTransformerBlock(inner, self.heads, self.dim_head,
                                      only_cross_attention=self.only_cross_attention,
                                      dtype=self.dtype, name=f"transformer_blocks_{i}")(t, context)
        if self.use_linear_projection:
            t = nn.Dense(c, dtype=self.dtype, name="proj_out")(t).reshape(b, h, w, c)
        else:
            t = conv(c, 1, self.dtype, "proj_out")(t.reshape(b, h, w, inner))
        return t + residual
