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


class _ConvNet(nn.Module):
    """1×1 and 3×3 convolutions (the UNet's proj_in / conv_shortcut and conv layers)."""

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Conv(4, (3, 3), name="conv3")(x))
        return nn.Conv(2, (1, 1), name="conv1")(h)


def test_conv_features_on_a_mesh_equal_one_device_and_batch_independent():
    """Per-example conv gradients on an 8-device mesh: equal to one device, and an example's
    feature does not depend on the other examples of its microbatch. (Regression: left to the
    SPMD partitioner, vmap(grad) of a convolution gave kernel gradients that mixed the
    examples of the microbatch — `runs/lds_finetune` features, see grads' module doc.)"""
    model = _ConvNet()
    x = np.random.RandomState(1).randn(16, 4, 4, 3).astype(np.float32)
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(x[:1]))["params"]

    def out_fn(p, ex, key):
        return jnp.sum(jnp.sin(model.apply({"params": p}, ex[None])))

    proj = pj.make_projector("gaussian", 64, 0, params)
    fn = gr.make_feature_fn(out_fn, params, proj)
    key = jax.random.PRNGKey(2)
    ref = np.stack([gr.projected_grads(fn, x[i:i + 1], key, start=i, microbatch=1)[0]
                    for i in range(len(x))])  # one example at a time, one device
    scale = np.abs(ref).max()
    assert scale > 0.1
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = gr.projected_grads(fn, x, key, microbatch=16, mesh=mesh)
    np.testing.assert_allclose(sharded, ref, rtol=0, atol=1e-5 * scale)
    rev = gr.projected_grads(fn, x[::-1], key, microbatch=16, mesh=mesh)[::-1]
    np.testing.assert_allclose(rev, ref, rtol=0, atol=1e-5 * scale)
    # the same jitted function, traced without a mesh first, still agrees afterwards
    np.testing.assert_allclose(gr.projected_grads(fn, x, key, microbatch=16), ref, rtol=0,
                               atol=1e-5 * scale)


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


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "sjlt", "factored"])
def test_amortized_projection_equals_per_microbatch_path(kind):
    """``grad_batch``: gradients of M microbatches, one pass over P for all of them — the same
    features as projecting each microbatch (float64: equal to rounding), also on 8 devices."""
    with jax.enable_x64(True):
        _, params, x, out_fn = _setup(np.float64, n=13)
        if kind == "factored":
            proj = pj.make_projector(kind, 16, 2, params, dtype=jnp.float64)
        else:
            proj = pj.make_projector(kind, 32, 2, gr.select_params(params, "attn").trainable,
                                     dtype=jnp.float64, block_size=5, c=4)
        key = jax.random.PRNGKey(6)
        per_mb = gr.projected_grads(gr.make_feature_fn(out_fn, params, proj, spec="attn"), x,
                                    key, microbatch=2)
        amort = gr.make_feature_fn(out_fn, params, proj, spec="attn", grad_batch=2)
        got = gr.projected_grads(amort, x, key, microbatch=8)  # M = 4 microbatches per P pass
        assert np.abs(per_mb).max() > 1e-3
        np.testing.assert_allclose(got, per_mb, rtol=1e-13, atol=1e-13 * np.abs(per_mb).max())
        with pytest.raises(ValueError, match="multiple of grad_batch"):
            amort(x[:3], gr.example_keys(key, 0, 3))
        if kind != "rademacher":
            return  # the mesh case once (compiling for 8 devices is the slow part)
        mesh = Mesh(np.array(jax.devices()), ("data",))
        sharded = gr.projected_grads(gr.make_feature_fn(out_fn, params, proj, spec="attn",
                                                        grad_batch=8), x, key, microbatch=16,
                                     mesh=mesh)
        np.testing.assert_allclose(sharded, per_mb, rtol=1e-13,
                                   atol=1e-13 * np.abs(per_mb).max())


class _Eps(nn.Module):
    """A small denoiser ``(x_t [b, h, w, c], t [b], ctx [b, L, D]) -> ε̂`` made of Dense layers."""

    @nn.compact
    def __call__(self, x, t, ctx):
        b = x.shape[0]
        h = jnp.concatenate([x.reshape(b, -1), ctx.reshape(b, -1), t[:, None] / 1000.0], -1)
        h = jnp.tanh(nn.Dense(8, name="inp")(h))
        return nn.Dense(x[0].size, name="out")(h).reshape(x.shape)


@pytest.mark.parametrize("timestep_batch", [None, 2])
def test_factored_features_through_averaged_output(timestep_batch):
    """Regression: the factored projection of ``losses.averaged_output`` (which evaluates the K
    timesteps under an inner ``vmap`` / ``lax.map``) raised UnexpectedTracerError; it must equal
    the projector applied to explicit per-example kernel gradients (float64)."""
    from jaxattrib.diffusion import losses
    from jaxattrib.diffusion.schedule import make_schedule

    with jax.enable_x64(True):
        model, sched = _Eps(), make_schedule()
        rng = np.random.RandomState(0)
        ex = {"x0": rng.randn(5, 2, 2, 3), "ctx": rng.randn(5, 2, 4)}
        params = model.init(jax.random.PRNGKey(0), jnp.asarray(ex["x0"][:1]),
                            jnp.zeros((1,), jnp.int32), jnp.asarray(ex["ctx"][:1]))["params"]
        params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
        ts = jnp.asarray([0, 300, 600, 900], jnp.int32)

        def out_fn(p, e, key):
            eps = lambda x_t, t, c: model.apply({"params": p}, x_t, t, c)  # noqa: E731
            return losses.averaged_output("square", eps, sched, e["x0"], e["ctx"], ts, 0,
                                          timestep_batch=timestep_batch)

        proj = pj.make_projector("factored", 16, 1, params, dtype=jnp.float64)
        key = jax.random.PRNGKey(2)
        feats = gr.projected_grads(gr.make_feature_fn(out_fn, params, proj), ex, key,
                                   microbatch=2)
        g = jax.vmap(jax.grad(out_fn), (None, 0, 0))(params, ex, gr.example_keys(key, 0, 5))
        expected = np.asarray(proj.project(g))
        assert np.abs(expected).max() > 1e-3
        np.testing.assert_allclose(feats, expected, rtol=1e-10, atol=1e-12)
