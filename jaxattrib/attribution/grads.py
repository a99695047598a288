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
* Amortized projection (``grad_batch`` of :func:`make_feature_fn`): a dense P costs the same to
  generate for 1 or 1000 examples, so one call may take ``B = M · grad_batch`` examples, compute
  their per-example gradients ``grad_batch`` at a time (``lax.map``: activation memory of one
  ``grad_batch``), keep the ``M`` gradient trees (``B × p`` floats) and project all of them in one
  pass over P. Microbatch ``j`` of the call holds rows ``j, j+M, j+2M, …`` (so on a mesh the
  sharded example axis stays sharded); the rows come back in their original order.
* With a mesh, each microbatch is sharded over its ``'data'`` axis (``NamedSharding``); the
  projection is regenerated from its key on every device (replicated by seed, not transfer).
  The per-example gradients run under ``shard_map`` (each device runs the one-device program
  on its rows; :func:`projected_grads` sets the context mesh, :func:`per_example_grad_fn` picks
  it up at trace time) [measured]: the SPMD partitioner (jax 0.10.2, CPU) gave ``vmap(grad)``
  of a convolution (lowered to a grouped convolution, ``feature_group_count = B``) wrong kernel
  gradients that depended on the other examples of the microbatch (docs/benchmarks/lds.md: the
  UNet's 1×1 kernels off by 63–169 %). ``check_vma=False``: with it on, JAX types replicated
  parameters as device-invariant and turns their broadcast's transpose into a ``psum``.
  The global microbatch is assembled with ``jax.make_array_from_callback``: every process
  reads only the rows its own devices hold, so the same code is correct on one process and on
  a multi-host mesh (the features are then all-gathered to every process's host memory).
* The factored (LoGra) projection needs, per Dense layer, ``Σ_t (P_inᵀx_t)(P_outᵀδ_t)ᵀ`` over the
  layer's inputs ``x_t`` and output gradients ``δ_t``. We get it from an unmodified model with
  ``flax.linen.intercept_methods``: the interceptor adds a side branch ``((x P_in) A) P_outᵀ``
  with ``A = 0`` to the output of every intercepted ``nn.Dense.__call__``, and the gradient
  w.r.t. ``A`` *is* that sum (summed over layers, as the projector defines it). Nothing is
  captured out of ``out_fn``, so it works through any closure that calls ``model.apply`` inside
  ``out_fn`` — also under an inner ``vmap``/``lax.map`` (e.g. ``losses.averaged_output``) — and
  only for ``nn.Dense`` modules.
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
    return per_device(jax.vmap(jax.grad(f), in_axes=(None, None, 0, 0)), n_shared=2)


def per_device(fn, n_shared: int):
    """``fn(*shared, *batched)`` run with ``shard_map`` over the context mesh's ``'data'`` axis
    when one of size > 1 is set (``jax.set_mesh``, as :func:`projected_grads` does): the first
    ``n_shared`` arguments replicated, the others and the output split on their leading
    (example) axis, so each device runs the one-device program on its own examples (see the
    module docstring for why). Without such a mesh: ``fn`` itself. Decided at trace time; JAX
    traces a jitted caller once per context mesh."""
    def call(*args):
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or "data" not in mesh.axis_names or mesh.shape["data"] == 1:
            return fn(*args)
        specs = (P(),) * n_shared + (P("data"),) * (len(args) - n_shared)
        return jax.shard_map(fn, in_specs=specs, out_specs=P("data"), check_vma=False)(*args)
    return call


def example_keys(key: jax.Array, start: int, stop: int) -> jax.Array:
    """Per-example keys ``fold_in(key, i)`` for global indices ``i ∈ [start, stop)``."""
    idx = jnp.arange(start, stop, dtype=jnp.uint32)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, idx)


def factored_feature_fn(out_fn: OutFn, projector, *, remat: bool = False):
    """``(params, examples[B], keys[B]) -> [B, k]`` LoGra features (see module docstring).

    Every intercepted Dense layer ``l`` gets a side branch ``((x P_in,l) A) P_out,lᵀ`` added to
    its output, with one shared ``A = 0`` of shape ``[k_in, k_out]``: the output is unchanged,
    and ``∂f/∂A = Σ_l Σ_t (P_in,lᵀ x_t)(P_out,lᵀ δ_t)ᵀ`` — the summed factored feature. ``A`` is
    an argument of the differentiated function, so this holds through any transform inside
    ``out_fn`` (an inner ``vmap`` over timesteps, ``lax.map``, remat); weight gradients are
    never formed.
    """
    layers = set(projector.layers)
    k_in, k_out, dtype = projector.k_in, projector.k_out, projector.dtype
    hi = jax.lax.Precision.HIGHEST

    def batched(params, examples, keys):
        mats = {path: projector.layer_matrices(path) for path in sorted(layers)}
        called = set()  # paths seen while tracing (strings only; never tracers)

        def f(a, example, key):
            def interceptor(next_fun, args, kwargs, context):
                mod = context.module
                if context.method_name != "__call__" or not isinstance(mod, nn.Dense):
                    return next_fun(*args, **kwargs)
                path = "/".join(str(s) for s in mod.scope.path) if mod.scope is not None else ""
                if path not in mats:
                    return next_fun(*args, **kwargs)
                called.add(path)
                y = next_fun(*args, **kwargs)
                x = args[0] if args else kwargs["inputs"]
                p_in, p_out = mats[path]
                side = jnp.dot(jnp.dot(x.astype(dtype), p_in, precision=hi), a, precision=hi)
                return y + jnp.dot(side, p_out.T, precision=hi).astype(y.dtype)

            with nn.intercept_methods(interceptor):
                return out_fn(params, example, key)

        if remat:
            f = jax.checkpoint(f)
        a0 = jnp.zeros((k_in, k_out), dtype)
        g = per_device(jax.vmap(jax.grad(f), in_axes=(None, 0, 0)), n_shared=1)(a0, examples,
                                                                                keys)
        if not called:
            raise ValueError("no Dense layer of the projector was called by out_fn; projector "
                             f"layers: {sorted(layers)}")
        return g.reshape(g.shape[0], k_in * k_out)

    return batched


def make_feature_fn(out_fn: OutFn, params, projector, *, spec="all", remat: bool = False,
                    grad_batch: int | None = None):
    """A jitted ``(examples[B], keys[B]) -> [B, k]`` for one batch of examples.

    Dense families: gradients w.r.t. ``select_params(params, spec).trainable``, projected with
    ``projector.project``; the projector must have been built on that subset's shapes.
    Factored projector: Dense layers in ``projector.layers`` (``spec`` is not used).

    ``grad_batch``: if given and smaller than ``B`` (``B`` must then be a multiple of it),
    per-example gradients are computed ``grad_batch`` examples at a time and all ``B`` are
    projected in one pass over P (see the module docstring); peak memory then holds the
    ``B × p`` gradients of the call. ``None``: one ``vmap(grad)`` over all ``B``.
    """
    fn = params_feature_fn(out_fn, projector, spec=spec, remat=remat, grad_batch=grad_batch)
    if getattr(projector, "kind", None) == "factored":
        return lambda ex, keys: fn(params, ex, keys)
    split = select_params(params, spec)  # once, not per call
    return lambda ex, keys: fn.jitted(split.trainable, split.frozen, ex, keys)


def params_feature_fn(out_fn: OutFn, projector, *, spec="all", remat: bool = False,
                      grad_batch: int | None = None):
    """Like :func:`make_feature_fn` but ``(params, examples[B], keys[B]) -> [B, k]``: the
    parameters are arguments of the one jitted function (``.jitted``), so keeping this object
    lets every parameter tree of the same shapes (checkpoints) and every split reuse its compile.
    """
    if grad_batch is not None and grad_batch < 1:
        raise ValueError(f"grad_batch={grad_batch}: expected a positive number of examples")
    if getattr(projector, "kind", None) == "factored":
        batched = factored_feature_fn(out_fn, projector, remat=remat)

        @jax.jit
        def ffeats(params, examples, keys):
            m = _n_microbatches(keys, grad_batch)
            if m == 1:
                return batched(params, examples, keys)
            f = jax.lax.map(lambda xs: batched(params, *xs),
                            _split_microbatches((examples, keys), m))
            return _merge_microbatches(f)

        def fcall(params, examples, keys):
            return ffeats(params, examples, keys)

        fcall.jitted = ffeats
        return fcall
    grad_fn = per_example_grad_fn(out_fn, remat=remat)

    @jax.jit
    def feats(trainable, frozen, examples, keys):
        m = _n_microbatches(keys, grad_batch)
        if m == 1:
            return projector.project(grad_fn(trainable, frozen, examples, keys))
        g = jax.lax.map(lambda xs: grad_fn(trainable, frozen, *xs),
                        _split_microbatches((examples, keys), m))  # leaves [M, grad_batch, ...]
        return _merge_microbatches(projector.project(g, batch_dims=2))

    def call(params, examples, keys):
        split = select_params(params, spec)
        return feats(split.trainable, split.frozen, examples, keys)

    call.jitted = feats
    return call


def _n_microbatches(keys, grad_batch: int | None) -> int:
    """``M = B / grad_batch`` (1 when not amortizing); raises if ``B`` is not a multiple."""
    b = keys.shape[0]
    if grad_batch is None or b <= grad_batch:
        return 1
    if b % grad_batch:
        raise ValueError(f"a batch of {b} examples is not a multiple of grad_batch={grad_batch}")
    return b // grad_batch


def _split_microbatches(tree, m: int):
    """``[B, ...]`` → ``[M, B/M, ...]`` with row ``i·M + j`` at ``[j, i]``."""
    return jax.tree_util.tree_map(
        lambda a: jnp.swapaxes(a.reshape((a.shape[0] // m, m) + a.shape[1:]), 0, 1), tree)


def _merge_microbatches(x: jax.Array) -> jax.Array:
    """Inverse of :func:`_split_microbatches` for one ``[M, B/M, ...]`` array."""
    return jnp.swapaxes(x, 0, 1).reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _take(tree, idx):
    return jax.tree_util.tree_map(lambda a: np.asarray(a)[idx], tree)


def _num_examples(tree) -> int:
    sizes = {int(np.shape(a)[0]) for a in jax.tree_util.tree_leaves(tree)}
    if len(sizes) != 1:
        raise ValueError(f"examples: leaves disagree on the leading (example) axis: {sizes}")
    return sizes.pop()


def projected_grads(feature_fn, examples, key: jax.Array, *, start: int = 0,
                    microbatch: int = 32, mesh: Mesh | None = None,
                    on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """Features ``[n, k]`` (numpy) of ``examples`` (pytree, leading axis ``n``).

    ``feature_fn``: from :func:`make_feature_fn`. Example ``j`` gets key
    ``fold_in(key, start + j)`` (global index, so chunking does not change features).
    With ``mesh``, each microbatch is sharded over its ``'data'`` axis; ``microbatch`` is rounded
    up to a multiple of that axis' size. On several processes (a mesh over the devices of all
    processes) every process must call this with the same arguments; each one reads only the
    rows of ``examples`` that its own devices hold (``examples`` may be memory-mapped), and
    every process returns the full ``[n, k]``. ``on_batch(rows)`` is called after each call of
    ``feature_fn`` with its number of real (unpadded) rows, e.g. to advance a progress bar.
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
            with jax.set_mesh(mesh):  # per_example_grad_fn: per-device gradients (shard_map)
                feats = _to_host(feature_fn(ex, _global_keys(keys, sharding)))
        out.append(feats[: hi - lo])
        if on_batch is not None:
            on_batch(hi - lo)
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
