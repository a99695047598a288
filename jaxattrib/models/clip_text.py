"""Flax port of transformers' ``CLIPTextModel`` (the Stable Diffusion text encoder).

Follows the reference (transformers 5.x ``models/clip/modeling_clip.py``) exactly:

* token + learned absolute position embeddings;
* ``num_hidden_layers`` pre-LayerNorm transformer blocks: ``x + attn(ln1(x))`` then
  ``x + fc2(act(fc1(ln2(x))))`` with a **causal** self-attention mask, head scale
  ``head_dim ** -0.5``; ``act`` is ``quick_gelu`` (``x * sigmoid(1.702 x)``, SD-1.x / OpenAI CLIP)
  or exact (erf) ``gelu`` (SD-2.x / OpenCLIP);
* ``final_layer_norm`` on the last block's output gives ``last_hidden_state``;
* the pooled output is ``last_hidden_state`` at the EOS position. transformers' current rule:
  if ``eos_token_id == 2`` (legacy configs written before transformers PR #24773) the position is
  ``argmax(input_ids)`` (EOS has the largest id in the original vocabulary); otherwise it is the
  *first* position where ``input_ids == eos_token_id``;
* ``hidden_states`` are, as in transformers, ``num_hidden_layers + 1`` arrays: the embedding
  output followed by every block's output (the last one *before* the final layer norm).

Text conditioning for diffusion (:func:`encode_text`):

* ``layer='last'`` returns ``last_hidden_state``. This is what diffusers' Stable Diffusion
  pipelines use by default, **including SD-2.x**: the SD-2 text encoders published in diffusers
  format were truncated to 23 of OpenCLIP ViT-H's 24 blocks at conversion, so their last block
  already is the "penultimate layer" of the original model.
* ``layer='penultimate'`` returns ``final_layer_norm(hidden_states[-2])``, i.e. the output of
  block ``num_hidden_layers - 1`` passed through the final layer norm. This is exactly diffusers'
  ``encode_prompt(..., clip_skip=1)`` and the original SD-2 recipe for an *un-truncated*
  OpenCLIP text tower.

Our design ([design]): parameters are a plain nested dict whose names mirror the torch module
names (``embeddings/token_embedding/embedding``, ``encoder/layers_0/self_attn/q_proj/kernel``...),
float32 by default; the model returns a :class:`CLIPTextOutput` named tuple; attention is written
out explicitly (no fused kernels) so that gradients/jvp through the encoder are plain JAX.
Dropout is not modelled (the reference runs with ``attention_dropout=0`` in eval mode).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxattrib.models.convert import (CheckpointError, StateDict, linear_kernel, read_config,
                                      read_weights)

_ACTIVATIONS = ("quick_gelu", "gelu")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Configuration of the CLIP text encoder (the ``config.json`` keys of transformers).

    Defaults are those of SD-1.x's text encoder (OpenAI CLIP ViT-L/14 text tower).
    ``projection_dim`` is carried for round-tripping but unused (no projection head here).
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = 768
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int = 49407

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; "
                             f"expected one of {_ACTIVATIONS}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name}={v!r}: expected a positive integer")
        if not isinstance(self.eos_token_id, int) or isinstance(self.eos_token_id, bool):
            raise ValueError(f"eos_token_id={self.eos_token_id!r}: expected a single integer")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_transformers(cls, d: dict) -> "CLIPTextConfig":
        """From a transformers ``CLIPTextConfig`` dict (``config.json``).

        Raises ``ValueError`` naming the field for anything this port does not implement: a
        model type other than ``clip_text_model``, an activation other than quick_gelu/gelu,
        non-zero attention dropout is accepted (eval mode) but ignored.
        """
        if not isinstance(d, dict):
            raise ValueError(f"expected a config dict, got {type(d).__name__}")
        model_type = d.get("model_type", "clip_text_model")
        if model_type != "clip_text_model":
            raise ValueError(f"model_type={model_type!r}: expected 'clip_text_model' "
                             f"(a transformers CLIPTextModel config)")
        archs = d.get("architectures") or ["CLIPTextModel"]
        if any(a != "CLIPTextModel" for a in archs):
            raise ValueError(f"architectures={archs!r}: only CLIPTextModel is supported "
                             f"(no projection head)")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: d[k] for k in fields if k in d}
        if isinstance(kwargs.get("eos_token_id"), list):
            raise ValueError(f"eos_token_id={kwargs['eos_token_id']!r}: expected a single integer")
        if kwargs.get("layer_norm_eps") is None:
            kwargs.pop("layer_norm_eps", None)
        return cls(**kwargs)

    def to_transformers(self) -> dict:
        """The transformers ``config.json`` dict (``CLIPTextConfig(**d)`` rebuilds the model)."""
        d = dataclasses.asdict(self)
        d.update(model_type="clip_text_model", architectures=["CLIPTextModel"],
                 attention_dropout=0.0)
        return d

    # The repository-wide name for the same thing (CONTRIBUTING: from_diffusers/to_diffusers).
    from_diffusers = from_transformers

    def to_diffusers(self) -> dict:
        return self.to_transformers()


class CLIPTextOutput(NamedTuple):
    """Outputs of :class:`CLIPTextModel`.

    last_hidden_state: [B, L, D] after the final layer norm.
    pooled: [B, D] ``last_hidden_state`` at the EOS position (see module docstring).
    hidden_states: tuple of ``num_hidden_layers + 1`` arrays [B, L, D]: embeddings, then each
      block's output (no final layer norm).
    """

    last_hidden_state: jax.Array
    pooled: jax.Array
    hidden_states: tuple


def _activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    return lambda x: jax.nn.gelu(x, approximate=False)


class _Attention(nn.Module):
    config: CLIPTextConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """x [B, L, D], mask [L, L] boolean (True = may attend) -> [B, L, D]."""
        c = self.config
        b, l, _ = x.shape
        split = lambda t: t.reshape(b, l, c.num_attention_heads, c.head_dim)  # noqa: E731
        q = split(nn.Dense(c.hidden_size, name="q_proj")(x))
        k = split(nn.Dense(c.hidden_size, name="k_proj")(x))
        v = split(nn.Dense(c.hidden_size, name="v_proj")(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (c.head_dim ** -0.5)
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, l, c.hidden_size)
        return nn.Dense(c.hidden_size, name="out_proj")(out)


class _MLP(nn.Module):
    config: CLIPTextConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        x = nn.Dense(c.intermediate_size, name="fc1")(x)
        x = _activation(c.hidden_act)(x)
        return nn.Dense(c.hidden_size, name="fc2")(x)


class _EncoderLayer(nn.Module):
    config: CLIPTextConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        eps = self.config.layer_norm_eps
        x = x + _Attention(self.config, name="self_attn")(
            nn.LayerNorm(epsilon=eps, name="layer_norm1")(x), mask)
        x = x + _MLP(self.config, name="mlp")(nn.LayerNorm(epsilon=eps, name="layer_norm2")(x))
        return x


class _Embeddings(nn.Module):
    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        c = self.config
        tok = nn.Embed(c.vocab_size, c.hidden_size, name="token_embedding")(input_ids)
        pos = nn.Embed(c.max_position_embeddings, c.hidden_size, name="position_embedding")(
            jnp.arange(input_ids.shape[-1]))
        return tok + pos[None]


class _Encoder(nn.Module):
    config: CLIPTextConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> tuple:
        states = [x]
        for i in range(self.config.num_hidden_layers):
            x = _EncoderLayer(self.config, name=f"layers_{i}")(x, mask)
            states.append(x)
        return tuple(states)


def pooled_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """[B] index of the pooled (EOS) token, following transformers' rule (module docstring)."""
    input_ids = jnp.asarray(input_ids)
    if eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPTextModel(nn.Module):
    """CLIP text transformer: ``input_ids`` [B, L] int (L ≤ max_position_embeddings) ->
    :class:`CLIPTextOutput`."""

    config: CLIPTextConfig

    def setup(self):
        self.embeddings = _Embeddings(self.config)
        self.encoder = _Encoder(self.config)
        self.final_layer_norm = nn.LayerNorm(epsilon=self.config.layer_norm_eps)

    def __call__(self, input_ids: jax.Array) -> CLIPTextOutput:
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids: expected shape [B, L], got {input_ids.shape}")
        length = input_ids.shape[1]
        if length > self.config.max_position_embeddings:
            raise ValueError(f"input_ids: sequence length {length} exceeds "
                             f"max_position_embeddings={self.config.max_position_embeddings}")
        mask = jnp.tril(jnp.ones((length, length), dtype=bool))
        states = self.encoder(self.embeddings(input_ids), mask)
        last = self.final_layer_norm(states[-1])
        pos = pooled_positions(input_ids, self.config.eos_token_id)
        pooled = jnp.take_along_axis(last, pos[:, None, None], axis=1)[:, 0]
        return CLIPTextOutput(last, pooled, states)

    def apply_final_layer_norm(self, x: jax.Array) -> jax.Array:
        """The final layer norm alone (for ``layer='penultimate'``); x [..., D]."""
        return self.final_layer_norm(x)


def init_params(config: CLIPTextConfig, key: jax.Array, length: int | None = None) -> dict:
    """Randomly initialised parameters (flax default initialisers), for tests and demos."""
    length = length or config.max_position_embeddings
    ids = jnp.zeros((1, length), jnp.int32)
    return CLIPTextModel(config).init(key, ids)["params"]


def encode_text(params: dict, config: CLIPTextConfig, input_ids: jax.Array, *,
                layer: str = "last") -> jax.Array:
    """Text conditioning [B, L, D] for the UNet's cross-attention.

    ``layer='last'``: ``last_hidden_state`` (diffusers default, SD-1.x and diffusers-format
    SD-2.x). ``layer='penultimate'``: ``final_layer_norm(hidden_states[-2])`` = diffusers'
    ``clip_skip=1``. See the module docstring.
    """
    model = CLIPTextModel(config)
    out = model.apply({"params": params}, input_ids)
    if layer == "last":
        return out.last_hidden_state
    if layer == "penultimate":
        return model.apply({"params": params}, out.hidden_states[-2],
                           method=CLIPTextModel.apply_final_layer_norm)
    raise ValueError(f"layer={layer!r}: expected 'last' or 'penultimate'")


# ----------------------------------------------------------------------------- checkpoints

def _layer_norm(sd: StateDict, prefix: str, dim: int) -> dict:
    return {"scale": sd.take(f"{prefix}.weight", (dim,)), "bias": sd.take(f"{prefix}.bias", (dim,))}


def _dense(sd: StateDict, prefix: str, d_in: int, d_out: int) -> dict:
    return {"kernel": sd.take(f"{prefix}.weight", (d_in, d_out), linear_kernel),
            "bias": sd.take(f"{prefix}.bias", (d_out,))}


def state_dict_prefix(tensors: dict) -> str:
    """``'text_model.'`` for transformers < 5 / original SD checkpoints, ``''`` for transformers
    5 (which saves ``embeddings.token_embedding.weight`` without the wrapper prefix)."""
    return "text_model." if any(k.startswith("text_model.") for k in tensors) else ""


def params_from_state_dict(tensors: dict[str, np.ndarray], config: CLIPTextConfig,
                           source: str = "<state dict>") -> dict:
    """Maps a transformers CLIPTextModel state dict to Flax params.

    Accepts keys with or without the ``text_model.`` prefix; ``position_ids`` buffers are
    ignored. Raises one :class:`CheckpointError` listing every missing / unexpected /
    mis-shaped tensor.
    """
    sd = StateDict(tensors, source)
    sd.ignore(lambda k: k.endswith("position_ids"))
    p = state_dict_prefix(tensors)
    c = config
    d, f = c.hidden_size, c.intermediate_size
    emb = f"{p}embeddings"
    params: dict[str, Any] = {
        "embeddings": {
            "token_embedding": {"embedding": sd.take(f"{emb}.token_embedding.weight",
                                                     (c.vocab_size, d))},
            "position_embedding": {"embedding": sd.take(f"{emb}.position_embedding.weight",
                                                        (c.max_position_embeddings, d))},
        },
        "encoder": {},
        "final_layer_norm": _layer_norm(sd, f"{p}final_layer_norm", d),
    }
    for i in range(c.num_hidden_layers):
        lp = f"{p}encoder.layers.{i}"
        params["encoder"][f"layers_{i}"] = {
            "self_attn": {n: _dense(sd, f"{lp}.self_attn.{n}", d, d)
                          for n in ("q_proj", "k_proj", "v_proj", "out_proj")},
            "layer_norm1": _layer_norm(sd, f"{lp}.layer_norm1", d),
            "mlp": {"fc1": _dense(sd, f"{lp}.mlp.fc1", d, f),
                    "fc2": _dense(sd, f"{lp}.mlp.fc2", f, d)},
            "layer_norm2": _layer_norm(sd, f"{lp}.layer_norm2", d),
        }
    sd.finish()
    return jax.tree_util.tree_map(jnp.asarray, params)


def config_from_folder(folder: str | os.PathLike) -> CLIPTextConfig:
    """Reads and validates ``folder/config.json``; errors name the file."""
    raw = read_config(folder)
    try:
        return CLIPTextConfig.from_transformers(raw)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{os.path.join(folder, 'config.json')}: {e}") from e


def from_pretrained(folder: str | os.PathLike, *, allow_pickle: bool = False,
                    variant: str | None = None) -> tuple[CLIPTextConfig, dict]:
    """``(config, params)`` from a transformers ``save_pretrained`` folder (``config.json`` +
    ``model.safetensors``). Pickle weights are refused unless ``allow_pickle``; ``variant``
    (e.g. ``"fp16"``) selects ``model.{variant}.safetensors``."""
    config = config_from_folder(folder)
    tensors = read_weights(folder, allow_pickle=allow_pickle, variant=variant)
    return config, params_from_state_dict(tensors, config, source=str(folder))


def state_dict_from_params(params: dict, prefix: str = "text_model.") -> dict[str, np.ndarray]:
    """Inverse of :func:`params_from_state_dict`: Flax params -> transformers' torch layout.

    ``prefix`` defaults to ``'text_model.'``, the layout every transformers version (4.x and 5.x)
    and the original SD checkpoints load.
    """
    out: dict[str, np.ndarray] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [p.key for p in path]
        leaf = np.asarray(leaf, np.float32)
        parts = []
        for n in names[:-1]:
            parts.extend(n.split("_", 1) if n.startswith("layers_") else [n])
        last = names[-1]
        if last == "kernel":
            key, leaf = "weight", np.ascontiguousarray(leaf.T)
        elif last in ("scale", "embedding"):
            key = "weight"
        else:
            key = last
        out[prefix + ".".join(parts + [key])] = leaf
    return out


def save_pretrained(folder: str | os.PathLike, config: CLIPTextConfig, params: dict) -> None:
    """Writes ``config.json`` + ``model.safetensors`` as transformers' ``save_pretrained`` does
    (loadable by ``transformers.CLIPTextModel.from_pretrained`` and :func:`from_pretrained`)."""
    from jaxattrib.models.convert import write_component
    cfg = dict(config.to_transformers())
    cfg.setdefault("architectures", ["CLIPTextModel"])
    write_component(folder, cfg, state_dict_from_params(params), "model.safetensors")
