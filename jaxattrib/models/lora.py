"""Low-rank adaptation (LoRA) of Flax parameter trees.

Follows Hu et al. (2021) and the diffusers/peft conventions: for a targeted linear layer with
Flax kernel ``W`` of shape ``[in, out]`` (``y = x @ W + b``) the adapted kernel is

    W' = W + (alpha / rank) * A @ B,    A: [in, rank],  B: [rank, out]

with ``B = 0`` at initialisation (so the adapted model starts equal to the base model) and
``A ~ N(0, (1/rank)^2)`` (peft's ``init_lora_weights="gaussian"``, which diffusers' DreamBooth
LoRA script uses). In torch layout this is ``lora_A.weight = A.T`` ``[rank, in]`` and
``lora_B.weight = B.T`` ``[out, rank]``.

[design] Instead of wrapping modules, LoRA acts on parameter trees: ``lora_params`` mirrors the
base tree but contains only the targeted kernels, each replaced by ``{'a': A, 'b': B}``.
:func:`lora_merge` is pure and returns a full parameter tree the unmodified model applies, so
``grad`` of ``loss(lora_merge(base, lora))`` w.r.t. ``lora`` gives gradients for the LoRA
parameters only. ``alpha`` is a hyper-parameter, not a parameter: it is passed to
:func:`lora_merge` explicitly (the rank is read from ``A``'s shape) so that optimizers and
per-example gradients never see it.

Targets are regular expressions searched in the ``'/'``-joined parameter path, e.g.
``down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q/kernel``.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

# Attention projections of the UNet's self- (attn1) and cross-attention (attn2) layers. The
# output projection may be named to_out_0 (diffusers' to_out.0 flattened) or to_out/0.
UNET_ATTENTION_TARGET = r"(^|/)attn[12]/(to_q|to_k|to_v|to_out(_0|/0)?)/kernel$"
# CLIP text encoder self-attention projections (transformers naming).
TEXT_ATTENTION_TARGET = r"(^|/)self_attn/(q_proj|k_proj|v_proj|out_proj)/kernel$"
DEFAULT_TARGET = UNET_ATTENTION_TARGET


def _path_str(path) -> str:
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        else:
            parts.append(str(k))
    return "/".join(parts)


def lora_targets(params: Any, target: str = DEFAULT_TARGET) -> list[str]:
    """The ``'/'``-joined paths of the leaves of ``params`` that ``target`` selects."""
    rx = re.compile(target)
    return [_path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)
            if rx.search(_path_str(p))]


def _set_path(tree: dict, keys: list[str], value) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def lora_init(params: Mapping, key: jax.Array, rank: int, alpha: float | None = None,
              target: str = DEFAULT_TARGET, dtype=jnp.float32) -> dict:
    """Initial LoRA parameters for every 2-D kernel of ``params`` matched by ``target``.

    Args:
      params: nested dict of base parameters (only dict nodes are supported).
      key: PRNG key; layer ``i`` (in sorted path order) uses ``fold_in(key, i)``.
      rank: LoRA rank ``r`` (> 0).
      alpha: unused here (kept for call symmetry with peft); pass it to :func:`lora_merge`.
      target: regex searched in the ``'/'``-joined path of each leaf.
      dtype: dtype of ``A`` and ``B``.

    Returns:
      nested dict mirroring ``params`` with each targeted kernel ``[in, out]`` replaced by
      ``{'a': A [in, r] ~ N(0, 1/r^2), 'b': B [r, out] = 0}``.

    Raises ``ValueError`` when nothing matches or a matched leaf is not a 2-D kernel.
    """
    del alpha
    if rank <= 0:
        raise ValueError(f"lora_init: rank must be positive, got {rank}")
    rx = re.compile(target)
    leaves = sorted((_path_str(p), v) for p, v in jax.tree_util.tree_leaves_with_path(params)
                    if rx.search(_path_str(p)))
    if not leaves:
        examples = [_path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)][:5]
        raise ValueError(f"lora_init: target {target!r} matches no parameter; example paths: "
                         f"{examples}")
    out: dict = {}
    for i, (path, w) in enumerate(leaves):
        if np.ndim(w) != 2:
            raise ValueError(f"lora_init: {path} has shape {np.shape(w)}; LoRA targets must be "
                             f"2-D Dense kernels [in, out]")
        d_in, d_out = np.shape(w)
        a = jax.random.normal(jax.random.fold_in(key, i), (d_in, rank), dtype) / rank
        b = jnp.zeros((rank, d_out), dtype)
        _set_path(out, path.split("/"), {"a": a, "b": b})
    return out


def lora_delta(a: jax.Array, b: jax.Array, alpha: float) -> jax.Array:
    """``(alpha / r) * A @ B`` for ``A [in, r]``, ``B [r, out]`` -> ``[in, out]``."""
    return (alpha / a.shape[-1]) * (a @ b)


def _is_ab(x) -> bool:
    return isinstance(x, Mapping) and set(x.keys()) == {"a", "b"}


def lora_merge(base_params: Mapping, lora_params: Mapping, alpha: float) -> dict:
    """Pure: ``base_params`` with ``W + (alpha/r) A B`` at every kernel present in ``lora_params``.

    The result has the structure and dtypes of ``base_params``; leaves not adapted are the
    same objects. Raises ``KeyError`` naming the path when ``lora_params`` refers to a
    parameter absent from ``base_params``.
    """
    def merge(base, lora, path):
        if _is_ab(lora):
            if not hasattr(base, "shape"):
                raise KeyError(f"lora_merge: {path} is not a parameter array in base_params")
            return base + lora_delta(lora["a"], lora["b"], alpha).astype(base.dtype)
        if not isinstance(base, Mapping):
            raise KeyError(f"lora_merge: {path} is a leaf in base_params but a subtree in "
                           f"lora_params")
        out = dict(base)
        for k, v in lora.items():
            if k not in base:
                raise KeyError(f"lora_merge: {path + '/' if path else ''}{k} not in base_params")
            out[k] = merge(base[k], v, f"{path}/{k}" if path else str(k))
        return out

    return merge(base_params, lora_params, "")


def compose_params(trainable: Mapping, frozen: Mapping, config) -> dict:
    """Model parameters from the trained part and the frozen/base part; pure.

    Full mode: ``{**frozen, **trainable}``; LoRA mode: ``lora_merge(frozen, trainable, alpha)``
    where ``frozen`` is the full base parameter tree. ``config`` is a ``TrainConfig`` or a
    manifest mapping with ``mode`` (default ``"full"``) and ``lora_alpha`` (default 1.0).
    [design] Lives here (not in ``train.finetune``) so ``train.record`` can rebuild parameters
    without importing the trainer.
    """
    def get(name, default):
        return config.get(name, default) if isinstance(config, Mapping) \
            else getattr(config, name, default)

    if get("mode", "full") == "lora":
        return lora_merge(frozen, trainable, get("lora_alpha", 1.0))
    return {**frozen, **trainable}


def lora_param_count(lora_params: Any) -> int:
    """Number of scalar LoRA parameters (sum of the sizes of all ``A`` and ``B``)."""
    return int(sum(np.size(x) for x in jax.tree.leaves(lora_params)))


def _torch_module_name(path: str) -> str:
    """``a/b_0/to_out_0/kernel`` -> ``a.b.0.to_out.0`` (diffusers' module naming)."""
    mod = path.rsplit("/", 1)[0]
    parts = []
    for p in mod.split("/"):
        m = re.fullmatch(r"(.*\D)_(\d+)", p)
        parts.extend([m.group(1), m.group(2)] if m else [p])
    return ".".join(parts)


def lora_state_dict(lora_params: Mapping, prefix: str = "unet") -> dict[str, np.ndarray]:
    """LoRA weights as a peft-style torch state dict (``pytorch_lora_weights.safetensors``).

    Keys are ``{prefix}.{module}.lora_A.weight`` ``[r, in]`` and ``...lora_B.weight``
    ``[out, r]``. The module name is derived from the Flax path by splitting trailing
    ``_<index>`` (``down_blocks_0`` -> ``down_blocks.0``); [design] this matches diffusers'
    naming for the UNet attention processors; alpha is not stored (diffusers then uses
    ``alpha = rank``) so pass ``lora_alpha`` separately.
    """
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(lora_params):
        p = _path_str(path)
        if not p.endswith(("/a", "/b")):
            continue
        name = _torch_module_name(p[:-2])
        arr = np.asarray(leaf, np.float32).T
        out[f"{prefix}.{name}.{'lora_A' if p.endswith('/a') else 'lora_B'}.weight"] = \
            np.ascontiguousarray(arr)
    return out
