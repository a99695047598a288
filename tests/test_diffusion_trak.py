"""diffusion_trak: one compile shared by featurize_examples calls (splits, checkpoints); engine
features equal an explicit projection in float64; Journey-TRAK targets; the relative λ grid."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattrib.attribution import diffusion_trak as dt
from jaxattrib.diffusion.schedule import make_schedule, schedule_from_diffusers_config
from jaxattrib.models import unet
from jaxattrib.train.base_model import SCHEDULER_CONFIG
from tiny import pixel_unet_config


@pytest.mark.parametrize("projection,proj_batch", [("rademacher", 0), ("rademacher", 8),
                                                   ("factored", 0)])
def test_featurize_examples_reuses_one_compile(tmp_path, projection, proj_batch):
    """The out_fn is traced (= the feature function compiled) on the first call only; a query
    split of another size, then another checkpoint (new parameter values) reuse it, and the
    features are those of a fresh computation."""
    traces = []

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, use_bias=False, name="out")(jnp.tanh(nn.Dense(5, name="inp")(x)))

    def out_fn(p, ex, key):
        traces.append(1)  # runs once per trace, never when a compiled function is called
        return jnp.sum(MLP().apply({"params": p}, ex["x0"].reshape(-1)) * jnp.mean(ex["ctx"]))

    rng = np.random.RandomState(0)

    def params(seed):
        r = np.random.RandomState(seed)
        return {"inp": {"kernel": jnp.asarray(r.randn(12, 5), jnp.float32),
                        "bias": jnp.asarray(r.randn(5), jnp.float32)},
                "out": {"kernel": jnp.asarray(r.randn(5, 3), jnp.float32)}}

    def examples(n):
        return {"x0": rng.randn(n, 2, 2, 3).astype(np.float32),
                "ctx": rng.randn(n, 2, 4).astype(np.float32)}

    cfg = dt.AttributionConfig(method="dtrak", k=16, projection=projection, microbatch=4,
                               proj_batch=proj_batch, num_timesteps=2)
    train, query = examples(19), examples(6)
    kw = dict(fingerprint="f", progress=False, chunk_size=8)
    Phi = dt.featurize_examples(out_fn, params(0), train, cfg, tmp_path / "train", **kw)
    n_traces = len(traces)
    assert n_traces > 0 and Phi.shape == (19, 16)
    phi = dt.featurize_examples(out_fn, params(0), query, cfg, tmp_path / "query", **kw)
    Phi1 = dt.featurize_examples(out_fn, params(1), train, cfg, tmp_path / "step1", step=1, **kw)
    assert len(traces) == n_traces  # no retrace for another split or checkpoint
    assert not np.allclose(Phi1, Phi)
    # the cached function computes what a fresh one does (other out_fn object: new compile)
    fresh = lambda p, ex, key: out_fn(p, ex, key)  # noqa: E731
    np.testing.assert_allclose(
        dt.featurize_examples(fresh, params(1), train, cfg, tmp_path / "fresh", step=1, **kw),
        Phi1, rtol=1e-6, atol=1e-6 * np.abs(Phi1).max())
    assert len(traces) > n_traces and phi.shape == (6, 16)


def test_out_fns_are_shared_for_equal_arguments():
    u = pixel_unet_config()
    cfg = dt.AttributionConfig(method="trak", num_timesteps=3)
    f = dt.make_train_out_fn(u, make_schedule(), cfg)
    assert dt.make_train_out_fn(u, make_schedule(), cfg) is f  # equal schedule values
    assert dt.make_train_out_fn(u, make_schedule(beta_end=0.03), cfg) is not f
    assert dt.make_train_out_fn(u, make_schedule(), dt.AttributionConfig(method="dtrak")) is not f
    j = dt.make_journey_target_out_fn(u, make_schedule(), cfg)
    assert j is dt.make_journey_target_out_fn(u, make_schedule(), cfg) and j is not f


# ----------------------------------------------------------------------------- engine glue
# (moved from test_app.py)

def _tiny_unet():
    """The 8-px pixel UNet (cross-attention 16) the glue tests below run (tests/tiny.py)."""
    return pixel_unet_config()


@pytest.mark.parametrize("method", ["dtrak", "trak", "journey-trak"])
def test_unet_features_equal_explicit_projection_float64(method):
    """Engine features == Pᵀ g with P materialized and g from a per-example jax.grad loop."""
    from jaxattrib.attribution.grads import (make_feature_fn, merge_params, projected_grads,
                                             select_params)
    with jax.enable_x64(True):
        u = _tiny_unet()
        params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64),
                                        unet.init_params(u, jax.random.PRNGKey(0)))
        sched = schedule_from_diffusers_config(SCHEDULER_CONFIG, dtype=jnp.float64)
        cfg = dt.AttributionConfig(method=method, k=64, num_timesteps=3, params="attn2",
                                   projection="gaussian", microbatch=2)
        out_fn = dt.make_train_out_fn(u, sched, cfg)
        rng = np.random.RandomState(0)
        ex = dt.with_index({"x0": rng.uniform(-1, 1, (3, 8, 8, 3)),
                            "ctx": rng.normal(size=(3, 4, 16))})   # row index: the noise
        proj = dt._projector(params, cfg)
        got = np.asarray(projected_grads(make_feature_fn(out_fn, params, proj, spec="attn2"),
                                         ex, jax.random.PRNGKey(1), microbatch=2))
        P = np.asarray(proj.materialize())
        split = select_params(params, "attn2")
        want = []
        for i in range(3):
            e = {k: v[i] for k, v in ex.items()}
            k_i = jax.random.fold_in(jax.random.PRNGKey(1), i)
            g = jax.grad(lambda tr: out_fn(merge_params(tr, split.frozen), e, k_i))(
                split.trainable)
            flat = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(g)])
            want.append(flat @ P)
        want = np.stack(want)
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_journey_targets_and_out_fn_shapes():
    u = _tiny_unet()
    sched = schedule_from_diffusers_config(SCHEDULER_CONFIG)
    from jaxattrib.diffusion.sampling import Trajectory
    traj = Trajectory(timesteps=jnp.array([[900, 500, 100]] * 2),
                      xs=jnp.zeros((2, 3, 8, 8, 3)), x0_preds=jnp.ones((2, 3, 8, 8, 3)))
    tg = dt.journey_targets(traj, np.zeros((2, 4, 16)), 1)
    assert tg["x0"].shape == (2, 8, 8, 3) and list(tg["t"]) == [500, 500]
    cfg = dt.AttributionConfig(method="journey-trak", journey_resamples=3)
    f = dt.make_journey_target_out_fn(u, sched, cfg)
    params = unet.init_params(u, jax.random.PRNGKey(0))
    v = f(params, {k: v[0] for k, v in tg.items()}, jax.random.PRNGKey(2))
    assert v.shape == () and np.isfinite(float(v)) and float(v) > 0


def test_lambda_grid_is_relative_to_feature_scale():
    Phi = np.random.RandomState(0).normal(size=(50, 8)) * 3.0
    lams = dt.relative_lambdas(Phi, [1.0, 10.0])
    assert lams[1] == pytest.approx(10 * lams[0])
    assert lams[0] == pytest.approx(np.mean(np.sum(Phi ** 2, 0)))
