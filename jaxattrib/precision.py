"""Mixed precision, rematerialization and matmul precision: names, checks and their JAX meaning.

One place maps the config strings of ``finetune.*`` and ``attribution.*`` (see
``docs/precision.md``) to what JAX needs, so the UNet, the fine-tuning step and featurization
read them the same way. Foundation module: imports only ``jax`` and :mod:`jaxattrib.config`.

* ``precision``: ``'float32'`` | ``'bfloat16'`` — the *compute* dtype of the UNet (activations,
  matmul/conv operands). Parameters stay float32 in both cases (Flax ``param_dtype``); Flax
  casts them to the compute dtype at each layer, so gradients w.r.t. the float32 parameters
  come back float32 (the transpose of the cast) [design].
* ``remat``: ``'none'`` | ``'full'`` | a name of ``jax.checkpoint_policies``
  (:data:`REMAT_POLICIES`) — ``nn.remat`` around every down / mid / up block of the UNet.
  ``'full'`` saves only each block's inputs (recompute everything inside it on the backward
  pass); ``'dots_saveable'`` keeps matmul/conv outputs; ``'nothing_saveable'`` is
  ``'full'`` spelled as a policy. Parameters are unchanged (same tree, same names).
* ``matmul_precision``: ``'default'`` | ``'tensorfloat32'`` | ``'highest'`` — the value of
  ``jax.default_matmul_precision`` around the jitted work, i.e. how float32 matmuls and
  convolutions run: ``'default'`` is TF32 on Ampere/Hopper GPUs (one bf16 pass on TPU; exact
  float32 on CPU), ``'highest'`` is full float32 everywhere. Matmuls that pass an explicit
  ``precision=`` (the projection, LoGra's side branch: ``HIGHEST``) are not affected.
"""

from __future__ import annotations

import contextlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxattrib.config import ConfigError

PRECISIONS = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots_saveable", "nothing_saveable",
                  "dots_with_no_batch_dims_saveable", "everything_saveable")
MATMUL_PRECISIONS = ("default", "tensorfloat32", "highest")

#: defaults of the three fields (what every run did before they existed)
DEFAULTS = {"precision": "float32", "remat": "none", "matmul_precision": "default"}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(precision: str) -> Any:
    """``'float32'`` -> ``jnp.float32``, ``'bfloat16'`` -> ``jnp.bfloat16``."""
    if precision not in _DTYPES:
        raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
    return _DTYPES[precision]


def remat_name(remat: bool | str | None) -> str:
    """Normalizes a remat setting: ``False``/``None``/``'none'`` -> ``'none'``, ``True`` ->
    ``'full'``, a policy name -> itself; anything else raises ``ValueError``."""
    if remat is None or remat is False:
        return "none"
    if remat is True:
        return "full"
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}: expected one of {REMAT_POLICIES} (or a bool)")
    return remat


def checkpoint_policy(remat: bool | str | None):
    """``(enabled, policy)`` for ``nn.remat``/``jax.checkpoint``: ``policy`` is ``None`` for
    ``'full'`` (save nothing but the inputs) or a ``jax.checkpoint_policies`` function."""
    name = remat_name(remat)
    if name == "none":
        return False, None
    if name == "full":
        return True, None
    return True, getattr(jax.checkpoint_policies, name)


def matmul_precision(name: str | None):
    """Context manager setting ``jax.default_matmul_precision`` (``None``/``'default'``: JAX's
    default, i.e. nothing changed). Trace the jitted function inside it: JAX keys its compile
    cache on this setting, so the same function retraces for another value."""
    if name in (None, "default"):
        return contextlib.nullcontext()
    if name not in MATMUL_PRECISIONS:
        raise ValueError(f"matmul_precision={name!r}: expected one of {MATMUL_PRECISIONS}")
    return jax.default_matmul_precision(name)


def unet_kwargs(precision: str = "float32", remat: bool | str = "none") -> dict:
    """Keyword arguments of :class:`jaxattrib.models.unet.UNet2DConditionModel` for these
    settings: ``{'dtype': compute dtype, 'remat': policy name}``."""
    return {"dtype": compute_dtype(precision), "remat": remat_name(remat)}


def check_fields(section: Mapping | None, where: str) -> None:
    """Checks ``precision``, ``remat`` and ``matmul_precision`` of a config section when
    present; raises :class:`~jaxattrib.config.ConfigError` naming ``where.field``."""
    if section is None:
        return
    allowed = {"precision": PRECISIONS, "remat": REMAT_POLICIES,
               "matmul_precision": MATMUL_PRECISIONS}
    for name, values in allowed.items():
        if name in section and section[name] not in values:
            raise ConfigError(f"{where}.{name}={section[name]!r}: expected one of {values}")


def non_default(section: Mapping | Any) -> dict:
    """The three fields of ``section`` (mapping or object) that differ from :data:`DEFAULTS`
    (what goes into manifests / feature-store metadata, so records and stores made before the
    fields existed keep matching)."""
    get = (lambda k: section.get(k, DEFAULTS[k])) if isinstance(section, Mapping) else \
        (lambda k: getattr(section, k, DEFAULTS[k]))
    out = {}
    for k, default in DEFAULTS.items():
        v = get(k)
        if k == "remat":
            v = remat_name(v)
        if v != default:
            out[k] = v
    return out


def added_defaults(*sections: str) -> dict:
    """``{'section.field': default}`` for the three fields of each section: how a run
    directory's stored ``config.json`` from before these fields is read (they did float32,
    no remat, JAX's default matmul precision)."""
    return {f"{s}.{k}": v for s in sections for k, v in DEFAULTS.items()}


def fill_added(stored: dict, added: Mapping[str, Any], current: dict | None = None) -> dict:
    """``stored`` (a config as JSON dict) with each ``'section.field'`` of ``added`` set to its
    value where the section exists and lacks the field (and, given ``current``, only the fields
    ``current`` has: a config without the field, e.g. one whose ``attribution`` section has no
    Concept-TRAK keys, stays without it); in place, returned."""
    for dotted, value in added.items():
        *sections, name = dotted.split(".")
        node, cur = stored, current
        for sec in sections:
            node = node.get(sec) if isinstance(node, dict) else None
            cur = cur.get(sec) if isinstance(cur, dict) else None
        if isinstance(node, dict) and (current is None or (isinstance(cur, dict)
                                                           and name in cur)):
            node.setdefault(name, value)
    return stored
