"""Flax port of diffusers' ``UNet2DConditionModel`` (Stable Diffusion 1.x / 2.x layouts).

What follows the reference: the forward pass of diffusers ``UNet2DConditionModel`` with
``CrossAttnDownBlock2D`` / ``DownBlock2D``, ``UNetMidBlock2DCrossAttn`` and
``CrossAttnUpBlock2D`` / ``UpBlock2D`` (positional time embedding, optional ``num_class_embeds``
class embedding), including diffusers' head-count semantics: ``attention_head_dim`` in
``config.json`` is the **number of heads** per block (the historical misnaming that diffusers
keeps; ``num_attention_heads`` is refused, as diffusers itself refuses it), and each block's
head dimension is ``block_out_channels[i] // heads``. Up blocks use the reversed per-block lists.
Spatial sizes that are not multiples of ``2**num_upsamplers`` are handled like diffusers'
``forward_upsample_size`` (nearest resize to the skip connection's size).

Our design ([design]):

* NHWC everywhere. ``apply({'params': p}, sample[B,H,W,C], timesteps[B] or scalar,
  encoder_hidden_states[B,L,D], class_labels=None) -> [B,H,W,C_out]``.
* Named taps: ``self.sow('intermediates', name, x)`` with ``down_0..`` (each down block's
  output), ``mid`` and ``up_0..`` (each up block's output); read them with
  ``apply(..., mutable=['intermediates'])``.
* Parameter names follow the torch attribute paths (``down_blocks_0/attentions_0/
  transformer_blocks_0/attn2/to_q/kernel``); the state-dict mapping is therefore generic
  (:func:`jaxattrib.models.layers.flax_path_to_torch_key`) and exactly invertible
  (:func:`save_pretrained`).
* ``dtype`` is the compute dtype (``jnp.bfloat16`` for mixed precision); parameters are float32
  whatever ``dtype`` is (Flax casts them per layer), so the parameter tree, and loading
  diffusers weights, do not depend on it.
* ``remat`` wraps every down/mid/up block in ``nn.remat`` (activation checkpointing):
  ``False``/``'none'`` off, ``True``/``'full'`` save only block inputs, or a
  ``jax.checkpoint_policies`` name (``'dots_saveable'``, ``'nothing_saveable'``, ...; see
  :mod:`jaxattrib.precision`). ``nn.remat`` keeps the wrapped module's scope, so the parameter
  names are the same with and without it.
* Options outside the supported subset are refused by :meth:`UNetConfig.from_diffusers` with an
  error naming the key and value, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxattrib.models import convert
from jaxattrib.models.convert import CheckpointError, StateDict, read_config, read_weights
from jaxattrib.models.layers import (Downsample2D, ResnetBlock2D, TimestepEmbedding,
                                     Transformer2DModel, Upsample2D, conv,
                                     get_timestep_embedding, group_norm, params_from_torch,
                                     params_to_torch)
from jaxattrib.precision import checkpoint_policy

Dtype = Any

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


class UnsupportedConfigError(ValueError):
    """A diffusers config option that this port does not implement."""


def _tup(x):
    return tuple(_tup(v) for v in x) if isinstance(x, (list, tuple)) else x


# Keys accepted only with these values (diffusers defaults); anything else is refused.
_FIXED = {
    "num_attention_heads": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
    "dual_cross_attention": False,
    "reverse_transformer_layers_per_block": None,
    "act_fn": "silu",
    "dropout": 0.0,
}
# Keys that do not affect the supported blocks (kept for to_diffusers round trips).
_HARMLESS = ("resnet_out_scale_factor", "addition_embed_type_num_heads",
             "mid_block_only_cross_attention")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """diffusers ``UNet2DConditionModel`` config (the supported subset), lists as tuples."""

    sample_size: int | tuple[int, int] | None = 64
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                       "CrossAttnUpBlock2D")
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 768
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    use_linear_projection: bool = False
    num_class_embeds: int | None = None
    upcast_attention: bool = False
    time_embedding_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    extra: tuple[tuple[str, Any], ...] = ()  # harmless keys, kept for to_diffusers()

    def __post_init__(self):
        n = len(self.down_block_types)
        problems = []
        if len(self.up_block_types) != n or len(self.block_out_channels) != n:
            problems.append(f"down_block_types ({n}), up_block_types ({len(self.up_block_types)}) "
                            f"and block_out_channels ({len(self.block_out_channels)}) must have "
                            f"the same length")
        for key in ("only_cross_attention", "layers_per_block", "cross_attention_dim",
                    "transformer_layers_per_block", "attention_head_dim"):
            v = getattr(self, key)
            if isinstance(v, tuple) and len(v) != n:
                problems.append(f"{key}={list(v)} must have one entry per down block ({n})")
            if key == "transformer_layers_per_block" and isinstance(v, tuple) and any(
                    isinstance(e, tuple) for e in v):
                problems.append(f"{key}={v}: nested per-layer lists are not supported")
        for t in self.down_block_types:
            if t not in DOWN_BLOCK_TYPES:
                problems.append(f"down_block_types: {t!r} not supported (use {DOWN_BLOCK_TYPES})")
        for t in self.up_block_types:
            if t not in UP_BLOCK_TYPES:
                problems.append(f"up_block_types: {t!r} not supported (use {UP_BLOCK_TYPES})")
        if self.mid_block_type not in MID_BLOCK_TYPES:
            problems.append(f"mid_block_type: {self.mid_block_type!r} not supported "
                            f"(use {MID_BLOCK_TYPES})")
        if not problems:
            for i, c in enumerate(self.block_out_channels):
                heads = self.heads[i]
                if c % heads:
                    problems.append(f"block_out_channels[{i}]={c} not divisible by "
                                    f"attention_head_dim (number of heads) {heads}")
                if c % self.norm_num_groups:
                    problems.append(f"block_out_channels[{i}]={c} not divisible by "
                                    f"norm_num_groups={self.norm_num_groups}")
        if problems:
            raise UnsupportedConfigError("invalid UNetConfig: " + "; ".join(problems))

    # ---- per-block views (diffusers semantics) ----
    def _per_block(self, v) -> tuple:
        return tuple(v) if isinstance(v, tuple) else (v,) * len(self.down_block_types)

    @property
    def heads(self) -> tuple[int, ...]:
        """Number of attention heads per down block (= diffusers' ``attention_head_dim``)."""
        return self._per_block(self.attention_head_dim)

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    # ---- diffusers config.json ----
    @classmethod
    def from_diffusers(cls, cfg: dict) -> "UNetConfig":
        """From a diffusers ``config.json`` dict. Keys starting with ``_`` are ignored; an
        unsupported option or unknown key raises :class:`UnsupportedConfigError` naming it."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs, extra, problems = {}, [], []
        for key, value in cfg.items():
            if key.startswith("_"):
                continue
            if key in _FIXED:
                ok = value == _FIXED[key] or (key == "act_fn" and value == "swish")
                if not ok:
                    problems.append(f"{key}={value!r} (supported: {_FIXED[key]!r})")
            elif key in _HARMLESS:
                extra.append((key, _tup(value)))
            elif key in fields:
                kwargs[key] = _tup(value)
            else:
                problems.append(f"{key}={value!r} (unknown option)")
        if kwargs.get("norm_num_groups", 32) is None:
            problems.append("norm_num_groups=None (supported: an int)")
        if kwargs.get("num_class_embeds") is not None and cfg.get("class_embed_type") is not None:
            problems.append("num_class_embeds with a class_embed_type")
        if problems:
            raise UnsupportedConfigError("UNet2DConditionModel config not supported: "
                                         + "; ".join(problems))
        return cls(**kwargs, extra=tuple(extra))

    def to_diffusers(self) -> dict:
        """The ``config.json`` dict diffusers' ``UNet2DConditionModel.from_config`` accepts."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d.update(dict(self.extra))
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        d.update({k: v for k, v in _FIXED.items() if k not in ("num_attention_heads",
                                                               "reverse_transformer_layers_per_block")})
        d["_class_name"] = "UNet2DConditionModel"
        return d


def tiny_config(*, sd2: bool = False, block_out_channels: Sequence[int] = (32, 64),
                cross_attention_dim: int = 32, norm_num_groups: int = 8,
                layers_per_block: int = 1, sample_size: int = 8, **overrides) -> UNetConfig:
    """A small SD-1 (``sd2=False``) or SD-2 style config for tests and demos.

    SD-1 style: conv ``proj_in/out``, one ``attention_head_dim`` for all blocks.
    SD-2 style: linear projections, per-block head counts, ``upcast_attention=True``.
    The last block is a plain ``DownBlock2D`` / first up block ``UpBlock2D``, as in SD.
    """
    n = len(block_out_channels)
    down = ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1)
    if n == 1:
        down, up = ("CrossAttnDownBlock2D",), ("CrossAttnUpBlock2D",)
    kw: dict[str, Any] = dict(
        sample_size=sample_size, block_out_channels=tuple(block_out_channels),
        down_block_types=down, up_block_types=up, layers_per_block=layers_per_block,
        cross_attention_dim=cross_attention_dim, norm_num_groups=norm_num_groups)
    if sd2:
        kw.update(use_linear_projection=True, upcast_attention=True,
                  attention_head_dim=tuple(max(1, c // 16) for c in block_out_channels))
    else:
        kw.update(attention_head_dim=2)
    kw.update(overrides)
    return UNetConfig(**kw)


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------

class CrossAttnDownBlock2D(nn.Module):
    """``num_layers`` x (ResnetBlock2D, Transformer2DModel), optional stride-2 downsampler.
    Returns ``(x, skips)`` with one skip per layer plus the downsampled output."""

    out_channels: int
    num_layers: int
    heads: int
    transformer_layers: int
    groups: int
    eps: float
    use_linear_projection: bool
    only_cross_attention: bool
    add_downsample: bool
    downsample_padding: int = 1
    has_attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context):
        skips = []
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, eps=self.eps, dtype=self.dtype,
                              name=f"resnets_{i}")(x, temb)
            if self.has_attention:
                x = Transformer2DModel(self.heads, self.out_channels // self.heads,
                                       self.transformer_layers, self.groups,
                                       self.use_linear_projection, self.only_cross_attention,
                                       dtype=self.dtype, name=f"attentions_{i}")(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.downsample_padding, dtype=self.dtype,
                             name="downsamplers_0")(x)
            skips.append(x)
        return x, tuple(skips)


class CrossAttnUpBlock2D(nn.Module):
    """``num_layers`` x (concat skip, ResnetBlock2D, Transformer2DModel), optional upsampler."""

    out_channels: int
    num_layers: int
    heads: int
    transformer_layers: int
    groups: int
    eps: float
    use_linear_projection: bool
    only_cross_attention: bool
    add_upsample: bool
    has_attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, skips, temb, context, upsample_size=None):
        skips = list(skips)
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = ResnetBlock2D(self.out_channels, self.groups, eps=self.eps, dtype=self.dtype,
                              name=f"resnets_{i}")(x, temb)
            if self.has_attention:
                x = Transformer2DModel(self.heads, self.out_channels // self.heads,
                                       self.transformer_layers, self.groups,
                                       self.use_linear_projection, self.only_cross_attention,
                                       dtype=self.dtype, name=f"attentions_{i}")(x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(
                x, upsample_size)
        return x


class UNetMidBlock2DCrossAttn(nn.Module):
    """ResnetBlock2D, then (Transformer2DModel, ResnetBlock2D); ``output_scale_factor`` on resnets."""

    channels: int
    heads: int
    transformer_layers: int
    groups: int
    eps: float
    use_linear_projection: bool
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context):
        res = lambda i: ResnetBlock2D(self.channels, self.groups, eps=self.eps,  # noqa: E731
                                      output_scale_factor=self.output_scale_factor,
                                      dtype=self.dtype, name=f"resnets_{i}")
        x = res(0)(x, temb)
        x = Transformer2DModel(self.heads, self.channels // self.heads, self.transformer_layers,
                               self.groups, self.use_linear_projection, False,
                               dtype=self.dtype, name="attentions_0")(x, context)
        return res(1)(x, temb)


class UNet2DConditionModel(nn.Module):
    """Conditional UNet. See the module docstring for the call signature and taps."""

    config: UNetConfig
    dtype: Dtype = jnp.float32
    remat: bool | str = False   # False/'none' | True/'full' | a jax.checkpoint_policies name

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, class_labels=None):
        """sample ``[B,H,W,C_in]``; timesteps ``[B]`` or scalar (int or float);
        encoder_hidden_states ``[B,L,D]``; class_labels ``[B]`` int (only with
        ``num_class_embeds``) -> ``[B,H,W,C_out]`` in ``dtype``."""
        cfg = self.config
        n = len(cfg.down_block_types)
        boc = cfg.block_out_channels
        heads = cfg.heads
        lpb = cfg._per_block(cfg.layers_per_block)
        tlpb = cfg._per_block(cfg.transformer_layers_per_block)
        oca = cfg._per_block(cfg.only_cross_attention)
        if any(d != c for d, c in zip(cfg._per_block(cfg.cross_attention_dim),
                                      (encoder_hidden_states.shape[-1],) * n)):
            raise ValueError(f"encoder_hidden_states last dim {encoder_hidden_states.shape[-1]} "
                             f"!= cross_attention_dim {cfg.cross_attention_dim}")
        use_remat, policy = checkpoint_policy(self.remat)
        if use_remat:  # upsample_size (arg 5, counting self) is a static shape
            Down = nn.remat(CrossAttnDownBlock2D, policy=policy)
            Mid = nn.remat(UNetMidBlock2DCrossAttn, policy=policy)
            Up = nn.remat(CrossAttnUpBlock2D, static_argnums=(5,), policy=policy)
        else:
            Down, Mid, Up = CrossAttnDownBlock2D, UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D

        b = sample.shape[0]
        sample = sample.astype(self.dtype)
        context = encoder_hidden_states.astype(self.dtype)
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0

        # time (and class) embedding
        t = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (b,))
        t_emb = get_timestep_embedding(t, boc[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = TimestepEmbedding(cfg.time_embed_dim, dtype=self.dtype,
                                name="time_embedding")(t_emb.astype(self.dtype))
        if cfg.num_class_embeds is not None:
            if class_labels is None:
                raise ValueError("class_labels should be provided when num_class_embeds is set")
            emb = emb + nn.Embed(cfg.num_class_embeds, cfg.time_embed_dim, dtype=self.dtype,
                                 name="class_embedding")(jnp.asarray(class_labels))

        x = conv(boc[0], cfg.conv_in_kernel, self.dtype, "conv_in")(sample)
        skips: list = [x]
        for i in range(n):
            x, res = Down(boc[i], lpb[i], heads[i], tlpb[i], cfg.norm_num_groups, cfg.norm_eps,
                          cfg.use_linear_projection, oca[i], add_downsample=i < n - 1,
                          downsample_padding=cfg.downsample_padding,
                          has_attention=cfg.down_block_types[i] == "CrossAttnDownBlock2D",
                          dtype=self.dtype, name=f"down_blocks_{i}")(x, emb, context)
            skips.extend(res)
            self.sow("intermediates", f"down_{i}", x)

        x = Mid(boc[-1], heads[-1], tlpb[-1], cfg.norm_num_groups, cfg.norm_eps,
                cfg.use_linear_projection, cfg.mid_block_scale_factor, dtype=self.dtype,
                name="mid_block")(x, emb, context)
        self.sow("intermediates", "mid", x)

        rboc, rheads = boc[::-1], heads[::-1]
        rlpb, rtlpb, roca = lpb[::-1], tlpb[::-1], oca[::-1]
        for i in range(n):
            m = rlpb[i] + 1
            res, skips = skips[-m:], skips[:-m]
            last = i == n - 1
            up_size = None if last else tuple(skips[-1].shape[1:3])
            x = Up(rboc[i], m, rheads[i], rtlpb[i], cfg.norm_num_groups, cfg.norm_eps,
                   cfg.use_linear_projection, roca[i], add_upsample=not last,
                   has_attention=cfg.up_block_types[i] == "CrossAttnUpBlock2D",
                   dtype=self.dtype, name=f"up_blocks_{i}")(x, tuple(res), emb, context, up_size)
            self.sow("intermediates", f"up_{i}", x)

        x = group_norm(cfg.norm_num_groups, cfg.norm_eps, self.dtype, "conv_norm_out")(x)
        x = nn.silu(x)
        return conv(cfg.out_channels, cfg.conv_out_kernel, self.dtype, "conv_out")(x)


# --------------------------------------------------------------------------------------------
# Parameters: init, checkpoint reading/writing
# --------------------------------------------------------------------------------------------

def _dummy_inputs(config: UNetConfig):
    s = 2 ** (len(config.block_out_channels) - 1)
    ctx_dim = config._per_block(config.cross_attention_dim)[0]
    sample = jnp.zeros((1, s, s, config.in_channels), jnp.float32)
    ctx = jnp.zeros((1, 1, ctx_dim), jnp.float32)
    labels = jnp.zeros((1,), jnp.int32) if config.num_class_embeds is not None else None
    return sample, jnp.zeros((1,), jnp.float32), ctx, labels


def init_params(config: UNetConfig, key: jax.Array) -> dict:
    """Random parameters (Flax default initializers) for ``config``; float32."""
    sample, t, ctx, labels = _dummy_inputs(config)
    return jax.jit(UNet2DConditionModel(config).init)(key, sample, t, ctx, labels)["params"]


def param_shapes(config: UNetConfig) -> dict:
    """Parameter tree of ``jax.ShapeDtypeStruct`` (no memory allocated)."""
    sample, t, ctx, labels = _dummy_inputs(config)
    return jax.eval_shape(lambda: UNet2DConditionModel(config).init(
        jax.random.PRNGKey(0), sample, t, ctx, labels))["params"]


def params_from_state_dict(sd: StateDict, config: UNetConfig) -> dict:
    """Maps a torch-layout diffusers UNet state dict to Flax params; raises one
    :class:`CheckpointError` listing every missing / unexpected / mis-shaped tensor."""
    params = params_from_torch(sd, param_shapes(config))
    sd.finish()
    return jax.tree_util.tree_map(jnp.asarray, params)


def from_pretrained(folder: str | os.PathLike, *, allow_pickle: bool = False,
                    variant: str | None = None) -> tuple[UNetConfig, dict]:
    """Reads a diffusers ``unet/`` component folder -> ``(UNetConfig, params)``."""
    return read_component(folder, UNetConfig.from_diffusers, params_from_state_dict,
                          allow_pickle=allow_pickle, variant=variant)


def read_component(folder: str | os.PathLike, parse_config: Callable[[dict], Any],
                   to_params: Callable[[StateDict, Any], dict], *, allow_pickle: bool = False,
                   variant: str | None = None) -> tuple[Any, dict]:
    """Shared reader of a diffusers component folder (UNet, VAE): ``config.json`` parsed by
    ``parse_config`` (an :class:`UnsupportedConfigError` becomes a :class:`CheckpointError`
    naming the file), weights read by :func:`~jaxattrib.models.convert.read_weights` (pickle
    refused unless ``allow_pickle``) and mapped by ``to_params(state_dict, config)``."""
    folder = Path(folder)
    raw = read_config(folder)
    try:
        config = parse_config(raw)
    except UnsupportedConfigError as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from e
    tensors = read_weights(folder, allow_pickle=allow_pickle, variant=variant)
    return config, to_params(StateDict(tensors, str(folder)), config)


def save_pretrained(folder: str | os.PathLike, config: UNetConfig, params: dict) -> None:
    """Writes ``config.json`` + ``diffusion_pytorch_model.safetensors`` in diffusers layout
    (loadable by ``diffusers.UNet2DConditionModel.from_pretrained``). Atomic per file."""
    write_component(folder, config.to_diffusers(), params_to_torch(params))


def write_component(folder: str | os.PathLike, config_dict: dict,
                    tensors: dict[str, np.ndarray]) -> None:
    """Atomically writes ``config.json`` and ``diffusion_pytorch_model.safetensors``."""
    convert.write_component(folder, config_dict, tensors, WEIGHTS_NAME)
