"""Flax port of diffusers' ``AutoencoderKL`` (the Stable Diffusion VAE).

What follows the reference: ``Encoder`` (``DownEncoderBlock2D`` blocks with a right/bottom-
padded stride-2 conv, ``UNetMidBlock2D`` with one self-attention, GroupNorm-SiLU-conv to
``2*latent_channels``), ``quant_conv``, the diagonal Gaussian (``logvar`` clamped to
[-30, 20]), ``post_quant_conv`` and ``Decoder`` (``UpDecoderBlock2D`` blocks with
``layers_per_block + 1`` resnets). All norms use eps 1e-6 as diffusers' VAE does.

Our design ([design]):

* NHWC; pixels in [-1, 1]. ``AutoencoderKL.encode(x) -> (mean, logvar)`` and
  ``decode(z) -> x`` are the raw (unscaled) latents; the helpers :func:`encode_latents` and
  :func:`decode_latents` apply the ``scaling_factor`` (and ``shift_factor`` if set):
  ``z = (latent - shift) * scaling_factor`` — the diffusion model's ``x_0``.
* Parameter names follow the torch paths (``encoder/mid_block/attentions_0/to_q/kernel``);
  the mapping is the generic one in :mod:`jaxattrib.models.layers`. Both the current
  (``to_q/to_k/to_v/to_out.0``) and the legacy (``query/key/value/proj_attn``) attention key
  names are read.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxattrib.models.convert import StateDict
from jaxattrib.models.layers import (Downsample2D, ResnetBlock2D, SpatialSelfAttention,
                                     Upsample2D, conv, group_norm, params_from_torch,
                                     params_to_torch)
from jaxattrib.models.unet import UnsupportedConfigError, _tup, read_component, write_component

Dtype = Any

_FIXED = {"act_fn": "silu", "latents_mean": None, "latents_std": None}
_HARMLESS = ("force_upcast",)
_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """diffusers ``AutoencoderKL`` config (supported subset), lists as tuples."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] = 512
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    extra: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        problems = []
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            problems.append("down_block_types, up_block_types and block_out_channels must have "
                            "the same length")
        for t in self.down_block_types:
            if t != "DownEncoderBlock2D":
                problems.append(f"down_block_types: {t!r} not supported (DownEncoderBlock2D)")
        for t in self.up_block_types:
            if t != "UpDecoderBlock2D":
                problems.append(f"up_block_types: {t!r} not supported (UpDecoderBlock2D)")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                problems.append(f"block_out_channels entry {c} not divisible by "
                                f"norm_num_groups={self.norm_num_groups}")
        if problems:
            raise UnsupportedConfigError("invalid VAEConfig: " + "; ".join(problems))

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "VAEConfig":
        """From a diffusers ``AutoencoderKL`` ``config.json`` dict; ``_``-keys ignored,
        unsupported options / unknown keys raise :class:`UnsupportedConfigError` naming them."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs, extra, problems = {}, [], []
        for key, value in cfg.items():
            if key.startswith("_"):
                continue
            if key in _FIXED:
                if not (value == _FIXED[key] or (key == "act_fn" and value == "swish")):
                    problems.append(f"{key}={value!r} (supported: {_FIXED[key]!r})")
            elif key in _HARMLESS:
                extra.append((key, _tup(value)))
            elif key in fields:
                kwargs[key] = _tup(value)
            else:
                problems.append(f"{key}={value!r} (unknown option)")
        if problems:
            raise UnsupportedConfigError("AutoencoderKL config not supported: "
                                         + "; ".join(problems))
        return cls(**kwargs, extra=tuple(extra))

    def to_diffusers(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d.update(dict(self.extra))
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        d.update(_FIXED)
        d["_class_name"] = "AutoencoderKL"
        return d


def tiny_config(block_out_channels=(16, 32), norm_num_groups: int = 8, latent_channels: int = 4,
                layers_per_block: int = 1, sample_size: int = 16, **overrides) -> VAEConfig:
    """A small VAE config for tests and demos (downsampling factor ``2**(len-1)``)."""
    n = len(block_out_channels)
    kw = dict(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
              block_out_channels=tuple(block_out_channels), norm_num_groups=norm_num_groups,
              latent_channels=latent_channels, layers_per_block=layers_per_block,
              sample_size=sample_size)
    kw.update(overrides)
    return VAEConfig(**kw)


class UNetMidBlock2D(nn.Module):
    """ResnetBlock2D, (SpatialSelfAttention), ResnetBlock2D; no time embedding."""

    channels: int
    groups: int
    add_attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        res = lambda i: ResnetBlock2D(self.channels, self.groups, eps=1e-6, use_temb=False,  # noqa
                                      dtype=self.dtype, name=f"resnets_{i}")
        x = res(0)(x)
        if self.add_attention:
            x = SpatialSelfAttention(heads=1, groups=self.groups, eps=1e-6, dtype=self.dtype,
                                     name="attentions_0")(x)
        return res(1)(x)


class _Block(nn.Module):
    """Holds one encoder/decoder block's resnets and resampler under ``down_blocks_i`` /
    ``up_blocks_i`` (keeps the torch path ``encoder.down_blocks.0.resnets.1``)."""

    channels: int
    groups: int
    num_layers: int
    resample: str | None  # "down", "up" or None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.channels, self.groups, eps=1e-6, use_temb=False,
                              dtype=self.dtype, name=f"resnets_{j}")(x)
        if self.resample == "down":
            x = Downsample2D(self.channels, padding=0, dtype=self.dtype, name="downsamplers_0")(x)
        elif self.resample == "up":
            x = Upsample2D(self.channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


class AutoencoderKL(nn.Module):
    """``encode(x[B,H,W,3]) -> (mean, logvar)`` each ``[B,H/f,W/f,latent_channels]`` (logvar
    clamped to [-30, 20]); ``decode(z) -> [B,H,W,3]``; ``__call__(x)`` = decode(mean)
    (used for init)."""

    config: VAEConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        self.encoder = _Coder(self.config, "encoder", self.dtype)
        self.decoder = _Coder(self.config, "decoder", self.dtype)
        c2 = 2 * self.config.latent_channels
        if self.config.use_quant_conv:
            self.quant_conv = conv(c2, 1, self.dtype, "quant_conv")
        if self.config.use_post_quant_conv:
            self.post_quant_conv = conv(self.config.latent_channels, 1, self.dtype,
                                        "post_quant_conv")

    def encode(self, x):
        h = self.encoder(x.astype(self.dtype))
        if self.config.use_quant_conv:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z):
        z = z.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x):
        mean, _ = self.encode(x)
        return self.decode(mean)


class _Coder(nn.Module):
    """Encoder (``kind='encoder'``) or decoder with torch-compatible sub-module names."""

    config: VAEConfig
    kind: str
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        boc = cfg.block_out_channels
        n = len(boc)
        if self.kind == "encoder":
            x = conv(boc[0], 3, self.dtype, "conv_in")(x)
            for i in range(n):
                x = _Block(boc[i], cfg.norm_num_groups, cfg.layers_per_block,
                           "down" if i < n - 1 else None, self.dtype, name=f"down_blocks_{i}")(x)
            x = UNetMidBlock2D(boc[-1], cfg.norm_num_groups, cfg.mid_block_add_attention,
                               dtype=self.dtype, name="mid_block")(x)
            out = 2 * cfg.latent_channels
        else:
            rboc = boc[::-1]
            x = conv(rboc[0], 3, self.dtype, "conv_in")(x)
            x = UNetMidBlock2D(rboc[0], cfg.norm_num_groups, cfg.mid_block_add_attention,
                               dtype=self.dtype, name="mid_block")(x)
            for i in range(n):
                x = _Block(rboc[i], cfg.norm_num_groups, cfg.layers_per_block + 1,
                           "up" if i < n - 1 else None, self.dtype, name=f"up_blocks_{i}")(x)
            out = cfg.out_channels
        x = nn.silu(group_norm(cfg.norm_num_groups, 1e-6, self.dtype, "conv_norm_out")(x))
        return conv(out, 3, self.dtype, "conv_out")(x)


# --------------------------------------------------------------------------------------------
# Latent helpers
# --------------------------------------------------------------------------------------------

def encode_latents(params: dict, config: VAEConfig, x: jax.Array,
                   key: jax.Array | None = None) -> jax.Array:
    """Pixels ``x[B,H,W,3]`` in [-1, 1] -> scaled latents ``[B,H/f,W/f,C_lat]``.

    The posterior mean if ``key`` is None, else a sample ``mean + exp(logvar/2) * eps``;
    then ``(latent - shift_factor) * scaling_factor`` (shift 0 when unset).
    """
    mean, logvar = AutoencoderKL(config).apply({"params": params}, x,
                                               method=AutoencoderKL.encode)
    z = mean
    if key is not None:
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    return (z - (config.shift_factor or 0.0)) * config.scaling_factor


def decode_latents(params: dict, config: VAEConfig, z: jax.Array) -> jax.Array:
    """Scaled latents ``[B,h,w,C_lat]`` -> pixels ``[B,h*f,w*f,3]`` (about [-1, 1], unclipped)."""
    z = z / config.scaling_factor + (config.shift_factor or 0.0)
    return AutoencoderKL(config).apply({"params": params}, z, method=AutoencoderKL.decode)


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------

def param_shapes(config: VAEConfig) -> dict:
    f = 2 ** (len(config.block_out_channels) - 1)
    x = jnp.zeros((1, f, f, config.in_channels), jnp.float32)
    return jax.eval_shape(lambda: AutoencoderKL(config).init(jax.random.PRNGKey(0), x))["params"]


def init_params(config: VAEConfig, key: jax.Array) -> dict:
    f = 2 ** (len(config.block_out_channels) - 1)
    x = jnp.zeros((1, f, f, config.in_channels), jnp.float32)
    return jax.jit(AutoencoderKL(config).init)(key, x)["params"]


def _rename_legacy(tensors: dict) -> dict:
    """Legacy VAE attention keys (``...attentions.0.query.weight``) -> current names."""
    out = {}
    for k, v in tensors.items():
        parts = k.split(".")
        if len(parts) >= 2 and "attentions" in parts and parts[-2] in _LEGACY_ATTN:
            k = ".".join(parts[:-2] + [_LEGACY_ATTN[parts[-2]], parts[-1]])
            if v.ndim == 4:  # some legacy checkpoints store 1x1 convs
                v = v[:, :, 0, 0]
        out[k] = v
    return out


def params_from_state_dict(sd: StateDict, config: VAEConfig) -> dict:
    """torch-layout ``AutoencoderKL`` state dict -> Flax params; one :class:`CheckpointError`
    listing every missing / unexpected / mis-shaped tensor."""
    sd.tensors = _rename_legacy(sd.tensors)
    params = params_from_torch(sd, param_shapes(config))
    sd.finish()
    return jax.tree_util.tree_map(jnp.asarray, params)


def from_pretrained(folder: str | os.PathLike, *, allow_pickle: bool = False,
                    variant: str | None = None) -> tuple[VAEConfig, dict]:
    """Reads a diffusers ``vae/`` component folder -> ``(VAEConfig, params)``."""
    return read_component(folder, VAEConfig.from_diffusers, params_from_state_dict,
                          allow_pickle=allow_pickle, variant=variant)


def save_pretrained(folder: str | os.PathLike, config: VAEConfig, params: dict) -> None:
    """Writes ``config.json`` + ``diffusion_pytorch_model.safetensors`` in diffusers layout."""
    write_component(folder, config.to_diffusers(), params_to_torch(params))
