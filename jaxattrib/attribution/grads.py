"""Per-example gradients of any scalar output function, projected one microbatch at a time.

What follows the references: TRAK's features are projected per-example gradients
``Pᵀ ∇_θ f(z; θ)`` of a scalar output function ``f``; D-TRAK restricts θ to a subset (e.g. LoRA).

Our design [design]:

* ``out_fn(params, example, key) -> scalar`` is any pure function of the full parameter tree,
  one example (no batch axis) and a PRNG key. Gradients are taken with ``jit(vmap(grad))`` only
  w.r.t. the subset chosen by :func:`select_params` (the rest is closed over as constants).
* The per-example gradient tree of one microbatch exists only inside one jitted call, which also
  projects it; an ``n×p`` matrix is never formed. Microbatches have a fixed size (the last one is
  padded by repeating its last example and the padded rows dropped), so there is one compile.
* With a mesh, each microbatch is sharded over its ``'data'`` axis (``NamedSharding``); the
  projection is regenerated from its key on every device (replicated by seed, not transfer).
  The global microbatch is assembled with ``jax.make_array_from_callback``: every process
  reads only the rows its own devices hold, so the same code is correct on one process and on
  a multi-host mesh (the features are then all-gathered to every process's host memory).
* The factored (LoGra) projection needs each Dense layer's inputs and output gradients. We get
  them from an unmodified model with ``flax.linen.intercept_methods``: the interceptor records the
  input of every intercepted ``nn.Dense.__call__`` and adds a zero *perturbation* array to its
  output; the gradient w.r.t. that perturbation is the output gradient ``δ``. This works through
  any closure that calls ``model.apply`` inside ``out_fn``, and only for ``nn.Dense`` modules.
"""

from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

OutFn = Callable[[Any, Any, jax.Array], jax.Array]


class ParamSplit(NamedTuple):
    """``trainable``: nested dict of the selected leaves; ``frozen``: the others."""

    trainable: dict
    frozen: dict


def select_params(params, spec="all") -> ParamSplit:
    """Splits ``params`` (nested dict) into the leaves gradients are taken for and the rest.

    ``spec``: ``'all'``; a regex searched in the ``'/'``-joined path (``'attn2'`` for
    cross-attention, ``'attn'`` for attention, ``'lora'``); or ``callable(path, leaf) -> bool``.
    Raises ``ValueError`` if nothing is selected.
    """
    flat = traverse_util.flatten_dict(params, sep="/")
    if spec == "all":
        keep = lambda path, leaf: True  # noqa: E731
    elif isinstance(spec, str):
        pattern = re.compile(spec)
        keep = lambda path, leaf: bool(pattern.search(path))  # noqa: E731
    elif callable(spec):
        keep = spec
    else:
        raise TypeError(f"spec={spec!r}: expected 'all', a regex string or a callable")
    train = {p: v for p, v in flat.items() if keep(p, v)}
    if not train:
        raise ValueError(f"spec={spec!r} selects no parameter; paths look like "
                         f"{sorted(flat)[:5]}")
    frozen = {p: v for p, v in flat.items() if p not in train}
    return ParamSplit(traverse_util.unflatten_dict(train, sep="/"),
                      traverse_util.unflatten_dict(frozen, sep="/") if frozen else {})


def merge_params(trainable, frozen) -> dict:
    """Inverse of :func:`select_params`: one nested dict with every leaf."""
    flat = traverse_util.flatten_dict(frozen, sep="/") if frozen else {}
    flat.update(traverse_util.flatten_dict(trainable, sep="/"))
    return traverse_util.unflatten_dict(flat, sep="/")


def per_example_grad_fn(out_fn: OutFn, *, remat: bool = False):
    """``(trainable, frozen, examples[B], keys[B]) -> grads`` (trainable tree, leading ``B``)."""
    def f(trainable, frozen, example, key):
        return out_fn(merge_params(trainable, frozen), example, key)

    if remat:
        f = jax.checkpoint(f)
    return jax.vmap(jax.grad(f), in_axes=(None, None, 0, 0))


def example_keys(key: jax.Array, start: int, stop: int) -> jax.Array:
    """Per-example keys ``fold_in(key, i)`` for global indices ``i ∈ [start, stop)``."""
    idx = jnp.arange(start, stop, dtype=jnp.uint32)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, idx)


def _capture_fn(out_fn: OutFn, layers):
    """Per-example ``(params, example, key) -> ([k] feature ingredients)`` via interception."""

    def run(params, example, key, perturb):
        inputs, counts = {}, {}

        def interceptor(next_fun, args, kwargs, context):
            mod = context.module
            if context.method_name != "__call__" or not isinstance(mod, nn.Dense):
                return next_fun(*args, **kwargs)
            path = "/".join(str(s) for s in mod.scope.path) if mod.scope is not None else ""
            if path not in layers:
                return next_fun(*args, **kwargs)
            name = f"{path}#{counts.get(path, 0)}"
            counts[path] = counts.get(path, 0) + 1
            inputs[name] = args[0]
            y = next_fun(*args, **kwargs)
            if perturb is None:
                return y
            return y + perturb[name]

        with nn.intercept_methods(interceptor):
            out = out_fn(params, example, key)
        return out, inputs

    return run


def factored_feature_fn(out_fn: OutFn, projector, *, remat: bool = False):
    """``(params, examples[B], keys[B]) -> [B, k]`` LoGra features (see module docstring)."""
    layers = set(projector.layers)
    run = _capture_fn(out_fn, layers)

    def one(params, example, key):
        shapes = _output_shapes(out_fn, layers, params, example, key)
        zeros = {n: jnp.zeros(s.shape, s.dtype) for n, s in shapes.items()}

        def f(perturb):
            out, ins = run(params, example, key, perturb)
            return out, ins

        if remat:
            f = jax.checkpoint(f)
        deltas, ins = jax.grad(f, has_aux=True)(zeros)
        return ins, deltas

    def batched(params, examples, keys):
        ins, deltas = jax.vmap(one, in_axes=(None, 0, 0))(params, examples, keys)
        by_in, by_d = {}, {}
        for name in sorted(ins):
            path = name.rsplit("#", 1)[0]
            by_in.setdefault(path, []).append(ins[name])
            by_d.setdefault(path, []).append(deltas[name])
        return projector.project_layers(by_in, by_d)

    return batched


def _output_shapes(out_fn, layers, params, example, key):
    """Shapes of each intercepted Dense output for one example (``jax.eval_shape``)."""
    shapes = {}

    def probe(params, example, key):
        counts = {}

        def interceptor(next_fun, args, kwargs, context):
            mod = context.module
            y = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and isinstance(mod, nn.Dense):
                path = "/".join(str(s) for s in mod.scope.path)
                if path in layers:
                    name = f"{path}#{counts.get(path, 0)}"
                    counts[path] = counts.get(path, 0) + 1
                    shapes[name] = jax.ShapeDtypeStruct(y.shape, y.dtype)
            return y

        with nn.intercept_methods(interceptor):
            return out_fn(params, example, key)

    jax.eval_shape(probe, params, example, key)
    return shapes


def make_feature_fn(out_fn: OutFn, params, projector, *, spec="all", remat: bool = False):
    """A jitted ``(examples[B], keys[B]) -> [B, k]`` for one microbatch, and its parameter split.

    Dense families: gradients w.r.t. ``select_params(params, spec).trainable``, projected with
    ``projector.project``; the projector must have been built on that subset's shapes.
    Factored projector: Dense layers in ``projector.layers`` (``spec`` is not used).
    """
    if getattr(projector, "kind", None) == "factored":
        fn = jax.jit(factored_feature_fn(out_fn, projector, remat=remat))
        return lambda ex, keys: fn(params, ex, keys)  # params as arguments, not constants
    split = select_params(params, spec)
    grad_fn = per_example_grad_fn(out_fn, remat=remat)

    @jax.jit
    def feats(trainable, frozen, examples, keys):
        return projector.project(grad_fn(trainable, frozen, examples, keys))

    return lambda ex, keys: feats(split.trainable, split.frozen, ex, keys)


def _take(tree, idx):
    return jax.tree_util.tree_map(lambda a: np.asarray(a)[idx], tree)


def _num_examples(tree) -> int:
    sizes = {int(np.shape(a)[0]) for a in jax.tree_util.tree_leaves(tree)}
    if len(sizes) != 1:
        raise ValueError(f"examples: leaves disagree on the leading (example) axis: {sizes}")
    return sizes.pop()


def projected_grads(feature_fn, examples, key: jax.Array, *, start: int = 0,
                    microbatch: int = 32, mesh: Mesh | None = None) -> np.ndarray:
    """Features ``[n, k]`` (numpy) of ``examples`` (pytree, leading axis ``n``).

    ``feature_fn``: from :func:`make_feature_fn`. Example ``j`` gets key
    ``fold_in(key, start + j)`` (global index, so chunking does not change features).
    With ``mesh``, each microbatch is sharded over its ``'data'`` axis; ``microbatch`` is rounded
    up to a multiple of that axis' size. On several processes (a mesh over the devices of all
    processes) every process must call this with the same arguments; each one reads only the
    rows of ``examples`` that its own devices hold (``examples`` may be memory-mapped), and
    every process returns the full ``[n, k]``.
    """
    n = _num_examples(examples)
    if mesh is not None:
        nd = mesh.shape["data"]
        microbatch = -(-microbatch // nd) * nd
        sharding = NamedSharding(mesh, P("data"))
    out = []
    for lo in range(0, n, microbatch):
        hi = min(lo + microbatch, n)
        idx = np.minimum(np.arange(lo, lo + microbatch), hi - 1)  # pad with the last example
        keys = example_keys(key, start + lo, start + lo + microbatch)
        if mesh is None:
            feats = np.asarray(feature_fn(_take(examples, idx), keys))
        else:
            ex = jax.tree_util.tree_map(lambda a: _global_rows(a, idx, sharding), examples)
            feats = _to_host(feature_fn(ex, _global_keys(keys, sharding)))
        out.append(feats[: hi - lo])
    return np.concatenate(out, 0)


def _global_rows(leaf, idx: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """``leaf[idx]`` as a global array sharded by ``sharding``; this process reads only the
    rows of its addressable devices."""
    shape = (len(idx),) + tuple(np.shape(leaf)[1:])
    return jax.make_array_from_callback(
        shape, sharding, lambda index: np.asarray(leaf[idx[index[0]]])[(slice(None),)
                                                                         + tuple(index[1:])])


def _global_keys(keys: jax.Array, sharding: NamedSharding) -> jax.Array:
    """Per-example keys (computed identically on every process) placed like the examples."""
    typed = jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)
    data = np.asarray(jax.random.key_data(keys) if typed else keys)
    glob = _global_rows(data, np.arange(len(data)), sharding)
    return jax.random.wrap_key_data(glob, impl=jax.random.key_impl(keys)) if typed else glob


def _to_host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-process) global array as numpy on every process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
