"""Per-example gradients: parameter subsets, vmap vs loop, remat, microbatch padding, mesh."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from jaxattrib.attribution import grads as gr
from jaxattrib.attribution import projection as pj


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        q = nn.Dense(4, name="attn1_q")(x)
        kv = nn.Dense(4, name="attn2_kv")(x)
        h = jnp.tanh(q * kv)
        return nn.Dense(2, name="proj")(h)


def _setup(dtype=np.float32, n=7):
    model = Block()
    x = np.random.RandomState(0).randn(n, 3).astype(dtype)
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(x[0]))["params"]
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params)

    def out_fn(p, ex, key):
        return jnp.sum(model.apply({"params": p}, ex) * jax.random.normal(key, (2,), ex.dtype))

    return model, params, jnp.asarray(x), out_fn


def test_select_params_specs_and_merge():
    _, params, _, _ = _setup()
    tr, fr = gr.select_params(params, "all")
    assert fr == {} and jax.tree_util.tree_structure(tr) == jax.tree_util.tree_structure(params)
    tr, fr = gr.select_params(params, "attn2")
    assert list(tr) == ["attn2_kv"] and sorted(fr) == ["attn1_q", "proj"]
    tr, fr = gr.select_params(params, "attn")
    assert sorted(tr) == ["attn1_q", "attn2_kv"]
    tr, fr = gr.select_params(params, lambda path, leaf: path.endswith("bias"))
    assert all(list(v) == ["bias"] for v in tr.values()) and len(tr) == 3
    merged = gr.merge_params(tr, fr)
    for a, b in zip(jax.tree_util.tree_leaves_with_path(merged),
                    jax.tree_util.tree_leaves_with_path(params)):
        assert a[0] == b[0] and a[1] is b[1]
    with pytest.raises(ValueError, match="selects no parameter"):
        gr.select_params(params, "lora")


def test_per_example_grads_subset_equal_loop_float64():
    with jax.enable_x64(True):
        _, params, x, out_fn = _setup(np.float64)
        tr, fr = gr.select_params(params, "attn")
        keys = gr.example_keys(jax.random.PRNGKey(1), 0, x.shape[0])
        g = jax.jit(gr.per_example_grad_fn(out_fn))(tr, fr, x, keys)
        g_remat = jax.jit(gr.per_example_grad_fn(out_fn, remat=True))(tr, fr, x, keys)
        full_grad = jax.jit(jax.grad(out_fn))
        for i in range(x.shape[0]):
            ref = full_grad(params, x[i], keys[i])
            for name in ("attn1_q", "attn2_kv"):
                for leaf in ("kernel", "bias"):
                    np.testing.assert_allclose(g[name][leaf][i], ref[name][leaf], rtol=1e-12,
                                               atol=1e-14)
                    np.testing.assert_allclose(g_remat[name][leaf][i], ref[name][leaf],
                                               rtol=1e-12, atol=1e-14)
        assert "proj" not in g


def test_projected_grads_padding_chunking_and_mesh():
    """Features do not depend on microbatch size, on a start offset (chunking) or on an
    8-device mesh (vs 1 device)."""
    _, params, x, out_fn = _setup(n=11)
    tr, _ = gr.select_params(params, "attn")
    proj = pj.make_projector("gaussian", 32, 0, tr)
    fn = gr.make_feature_fn(out_fn, params, proj, spec="attn")
    key = jax.random.PRNGKey(5)
    ref = gr.projected_grads(fn, x, key, microbatch=1)
    assert ref.shape == (11, 32)
    np.testing.assert_allclose(gr.projected_grads(fn, x, key, microbatch=4), ref,
                               rtol=1e-6, atol=1e-6)
    tail = gr.projected_grads(fn, x[5:], key, start=5, microbatch=4)
    np.testing.assert_allclose(tail, ref[5:], rtol=1e-6, atol=1e-6)
    assert len(jax.devices()) == 8
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = gr.projected_grads(fn, x, key, microbatch=4, mesh=mesh)  # rounded up to 8
    np.testing.assert_allclose(sharded, ref, rtol=1e-6, atol=1e-6)


def test_factored_features_via_interception_match_gradient_path():
    """The interception path (activations × output gradients, no weight gradients) equals the
    projector applied to true per-example kernel gradients, for a subset of layers."""
    _, params, x, out_fn = _setup()
    proj = pj.make_projector("factored", 16, 2, params, layer_filter="attn")
    assert sorted(proj.layers) == ["attn1_q", "attn2_kv"]
    key = jax.random.PRNGKey(4)
    feats = gr.projected_grads(gr.make_feature_fn(out_fn, params, proj), x, key, microbatch=3)
    keys = gr.example_keys(key, 0, x.shape[0])
    g = jax.vmap(jax.grad(out_fn), (None, 0, 0))(params, x, keys)
    np.testing.assert_allclose(feats, proj.project(g), rtol=1e-5, atol=1e-6)


def test_errors():
    _, params, x, out_fn = _setup()
    with pytest.raises(TypeError):
        gr.select_params(params, 3)
    with pytest.raises(ValueError, match="leading"):
        gr.projected_grads(lambda e, k: e, {"a": np.zeros((3, 1)), "b": np.zeros((4, 1))},
                           jax.random.PRNGKey(0))
