"""Projections: exact equality with the materialized matrix, JL distortion, determinism."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattrib.attribution import grads as gr
from jaxattrib.attribution import projection as pj

DENSE_KINDS = ["gaussian", "rademacher", "sjlt"]


class TokenMLP(nn.Module):
    """Acts on one example ``[T, d]``; the second Dense layer is applied twice (shared)."""

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(6, name="inp")(x))
        shared = nn.Dense(6, name="shared")
        h = jnp.tanh(shared(h))
        h = jnp.tanh(shared(h))
        return nn.Dense(3, name="out")(h)


def _setup(dtype):
    model = TokenMLP()
    x = np.random.RandomState(0).randn(5, 4, 3).astype(dtype)  # 5 examples of [T=4, d=3]
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(x[0]))["params"]
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params)

    def out_fn(p, ex, key):
        noise = jax.random.normal(key, (3,), ex.dtype)
        return jnp.sum((model.apply({"params": p}, ex) - noise) ** 2)

    return params, jnp.asarray(x), out_fn


def _explicit_grads(out_fn, params, x, key):
    """Per-example loop of ``jax.grad`` (no vmap), flattened ``[n, p]`` in tree-leaf order."""
    rows, grad = [], jax.jit(jax.grad(out_fn))
    for i in range(x.shape[0]):
        g = grad(params, x[i], jax.random.fold_in(key, i))
        rows.append(np.concatenate([np.ravel(l) for l in jax.tree_util.tree_leaves(g)]))
    return np.stack(rows), g


@pytest.mark.parametrize("kind", DENSE_KINDS)
def test_features_equal_explicit_projection_float64(kind):
    with jax.enable_x64(True):
        params, x, out_fn = _setup(np.float64)
        key = jax.random.PRNGKey(7)
        proj = pj.make_projector(kind, 24, 11, params, dtype=jnp.float64, block_size=5, c=3)
        fn = gr.make_feature_fn(out_fn, params, proj)
        feats = gr.projected_grads(fn, x, key, microbatch=2)
        G, _ = _explicit_grads(out_fn, params, x, key)
        P = np.asarray(proj.materialize())
        assert P.shape == (G.shape[1], 24)
        expected = G @ P
        rel = np.abs(feats - expected).max() / np.abs(expected).max()
        assert feats.dtype == np.float64
        assert rel < 1e-12, rel


def test_sjlt_structure():
    with jax.enable_x64(True):
        params, _, _ = _setup(np.float64)
        proj = pj.make_projector("sjlt", 24, 0, params, dtype=jnp.float64, c=3)
        P = np.asarray(proj.materialize())
        nz = P != 0
        # each input coordinate hits exactly one output in each of the c blocks, value ±1/√c
        assert (nz.reshape(P.shape[0], 3, 8).sum(-1) == 1).all()
        np.testing.assert_allclose(np.abs(P[nz]), 1 / np.sqrt(3), rtol=1e-15)


def test_factored_equals_kronecker_projection_float64():
    with jax.enable_x64(True):
        params, x, out_fn = _setup(np.float64)
        key = jax.random.PRNGKey(3)
        proj = pj.make_projector("factored", 12, 5, params, dtype=jnp.float64, k_in=4)
        assert sorted(proj.layers) == ["inp", "out", "shared"]
        fn = gr.make_feature_fn(out_fn, params, proj)
        feats = gr.projected_grads(fn, x, key, microbatch=2)
        # explicit: per-example kernel gradients (row-major vec) times stacked kron(P_in, P_out)
        rows, grad = [], jax.jit(jax.grad(out_fn))
        for i in range(x.shape[0]):
            g = grad(params, x[i], jax.random.fold_in(key, i))
            rows.append(np.concatenate([np.ravel(g[name]["kernel"]) for name in sorted(g)]))
        expected = np.stack(rows) @ np.asarray(proj.materialize())
        rel = np.abs(feats - expected).max() / np.abs(expected).max()
        assert rel < 1e-12, rel
        # and the gradient-tree path of the same projector agrees
        g_all = jax.vmap(jax.grad(out_fn), (None, 0, 0))(params, x,
                                                        gr.example_keys(key, 0, x.shape[0]))
        np.testing.assert_allclose(proj.project(g_all), expected, rtol=1e-12, atol=1e-12)


def test_factored_layer_filter():
    params, _, _ = _setup(np.float32)
    proj = pj.make_projector("factored", 16, 0, params, layer_filter="shared")
    assert list(proj.layers) == ["shared"] and proj.layers["shared"] == (6, 6)


@pytest.mark.parametrize("kind", DENSE_KINDS)
def test_jl_distortion(kind):
    """|<Pᵀa,Pᵀb> − <a,b>| ≤ c·|a||b|/√k with c = 6 (Var ≤ 2|a|²|b|²/k for all three families,
    so c = 6 is > 4σ), and the same for squared norms, over 8 seeds."""
    k, c = 1024, 6.0
    rng = np.random.RandomState(1)
    shapes = {"w": (40, 50), "b": (1000,)}
    a = {n: rng.randn(*s).astype(np.float32) for n, s in shapes.items()}
    b = {n: (0.6 * a[n] + 0.8 * rng.randn(*s)).astype(np.float32) for n, s in shapes.items()}
    batch = jax.tree_util.tree_map(lambda u, v: jnp.stack([u, v]), a, b)
    va = np.concatenate([np.ravel(a[n]) for n in sorted(a)]).astype(np.float64)
    vb = np.concatenate([np.ravel(b[n]) for n in sorted(b)]).astype(np.float64)
    na, nb = np.linalg.norm(va), np.linalg.norm(vb)
    errs = []
    for seed in range(8):
        proj = pj.make_projector(kind, k, seed, a, block_size=300)
        f = np.asarray(proj.project(batch), np.float64)
        err_ab = abs(f[0] @ f[1] - va @ vb) / (na * nb / np.sqrt(k))
        err_aa = abs(f[0] @ f[0] - va @ va) / (na * na / np.sqrt(k))
        assert err_ab <= c and err_aa <= c, (seed, err_ab, err_aa)
        errs.append(f[0] @ f[1] - va @ vb)
    # unbiased: the mean over seeds is within 4 standard errors of the truth
    assert abs(np.mean(errs)) <= 4 * np.sqrt(2) * na * nb / np.sqrt(k) / np.sqrt(8)


def test_jl_distortion_factored():
    """Kronecker-Gaussian projection: Var[<Pa,Pb>] ≲ (2/k_in + 2/k_out + 2/k)|a|²|b|²; we
    assert 5 of those standard deviations over 8 seeds (a looser bound than dense JL)."""
    k_in = k_out = 32
    k = k_in * k_out
    rng = np.random.RandomState(2)
    A, B = rng.randn(60, 50), rng.randn(60, 50)
    B = 0.6 * A + 0.8 * B
    tree = {"layer": {"kernel": np.zeros((60, 50), np.float32)}}
    batch = {"layer": {"kernel": jnp.asarray(np.stack([A, B]), jnp.float32)}}
    bound = 5 * np.sqrt(2 / k_in + 2 / k_out + 2 / k)
    na, nb, ab = np.linalg.norm(A), np.linalg.norm(B), np.sum(A * B)
    for seed in range(8):
        proj = pj.make_projector("factored", k, seed, tree, k_in=k_in)
        f = np.asarray(proj.project(batch), np.float64)
        assert abs(f[0] @ f[1] - ab) <= bound * na * nb, seed
        assert abs(f[0] @ f[0] - na**2) <= bound * na**2, seed


@pytest.mark.parametrize("kind", DENSE_KINDS)
def test_deterministic_and_batch_independent(kind):
    rng = np.random.RandomState(0)
    tree = {"a": np.zeros((7, 9), np.float32), "b": np.zeros((5,), np.float32)}
    g = {"a": rng.randn(6, 7, 9).astype(np.float32), "b": rng.randn(6, 5).astype(np.float32)}
    p1 = pj.make_projector(kind, 64, 3, tree, block_size=8)
    p2 = pj.make_projector(kind, 64, 3, tree, block_size=8)
    full = np.asarray(jax.jit(p1.project)(g))
    np.testing.assert_array_equal(full, np.asarray(jax.jit(p2.project)(g)))
    part = np.asarray(p1.project(jax.tree_util.tree_map(lambda v: v[2:3], g)))
    np.testing.assert_allclose(part, full[2:3], rtol=1e-6, atol=1e-6)
    other = np.asarray(pj.make_projector(kind, 64, 4, tree, block_size=8).project(g))
    assert not np.allclose(other, full)
    assert p1.meta() == p2.meta() and p1.meta()["key"] != pj.make_projector(
        kind, 64, 4, tree).meta()["key"]


def test_bad_arguments():
    tree = {"a": np.zeros((3,), np.float32)}
    with pytest.raises(ValueError, match="multiple of c"):
        pj.make_projector("sjlt", 10, 0, tree, c=4)
    with pytest.raises(ValueError, match="kind"):
        pj.make_projector("fourier", 8, 0, tree)
    proj = pj.make_projector("gaussian", 8, 0, tree)
    with pytest.raises(ValueError, match="shape"):
        proj.project({"a": np.zeros((2, 4), np.float32)})
    with pytest.raises(ValueError, match="factored"):
        pj.make_projector("factored", 16, 0, tree)


def test_packed_rademacher_is_the_bit_unpacking_and_has_the_right_distribution():
    """Generator v2: entry [r, c] = 1 − 2·bit_{c mod 32}(W[r, c // 32]) of one 32-bit word
    W = bits(key, [rows, ⌈k/32⌉]) (ground truth written out with numpy); entries ±1, mean ≈ 0,
    every bit position fair, columns (within and across words) uncorrelated."""
    key = jax.random.PRNGKey(5)
    rows, k = 4096, 80  # k not a multiple of 32: the last word's unused bits are dropped
    signs = np.asarray(pj.packed_rademacher(key, rows, k, jnp.float32))
    with jax.threefry_partitionable(False):
        words = np.asarray(jax.random.bits(key, (rows, 3), jnp.uint32))
    cols = np.arange(k)
    bit = (words[:, cols // 32] >> (cols % 32).astype(np.uint32)) & 1
    expected = 1 - 2 * bit.astype(np.int64)
    np.testing.assert_array_equal(signs, expected.astype(np.float32))
    assert set(np.unique(signs)) == {-1.0, 1.0}
    se = 1 / np.sqrt(rows)
    assert abs(signs.mean()) < 4 * se / np.sqrt(k)
    assert np.abs(signs.mean(0)).max() < 4.5 * se  # each column (= bit position of its word)
    corr = signs.T @ signs / rows
    off = corr[~np.eye(k, dtype=bool)]
    assert np.abs(off).max() < 5 * se, np.abs(off).max()  # 6320 pairs; 5σ ≈ 6e-7 two-sided
    assert abs(off.mean()) < 4 * se / np.sqrt(off.size / 2)
    # the projector's block is these signs scaled by 1/√k, and differs between block keys
    block = np.asarray(pj._dense_block("rademacher", key, rows, k, jnp.float32, 1))
    np.testing.assert_array_equal(block, signs / np.float32(np.sqrt(k)))
    other = np.asarray(pj.packed_rademacher(jax.random.fold_in(key, 1), rows, k))
    assert np.mean(other == signs) < 0.52


@pytest.mark.parametrize("kind", DENSE_KINDS)
def test_project_with_two_batch_axes_equals_flat(kind):
    """``project(g, batch_dims=2)`` on ``[M, B, ...]`` leaves = ``project`` of the ``[M·B, ...]``
    rows (one generation of P for all of them)."""
    rng = np.random.RandomState(0)
    tree = {"a": np.zeros((7, 9), np.float32), "b": np.zeros((5,), np.float32)}
    g = {"a": rng.randn(3, 4, 7, 9).astype(np.float32), "b": rng.randn(3, 4, 5).astype(np.float32)}
    proj = pj.make_projector(kind, 64, 3, tree, block_size=8)
    two = np.asarray(proj.project(g, batch_dims=2))
    flat = np.asarray(proj.project(jax.tree_util.tree_map(lambda v: v.reshape((12,) + v.shape[2:]),
                                                          g)))
    assert two.shape == (3, 4, 64)
    np.testing.assert_allclose(two.reshape(12, 64), flat, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="batch axes"):
        proj.project({"a": g["a"], "b": g["b"][:2]}, batch_dims=2)


def test_generator_version_in_meta():
    tree = {"a": np.zeros((3, 4), np.float32)}
    for kind in ("gaussian", "rademacher", "sjlt", "factored"):
        proj = pj.make_projector(kind, 16, 0, {"l": {"kernel": tree["a"]}}, k_in=4)
        assert proj.meta()["generator"] == pj.GENERATOR_VERSION == 2
