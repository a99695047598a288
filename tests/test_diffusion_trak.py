"""diffusion_trak: one compile shared by featurize_examples calls (splits, checkpoints)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattrib.attribution import diffusion_trak as dt
from jaxattrib.diffusion.schedule import make_schedule
from jaxattrib.models import unet


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
    u = unet.tiny_config(block_out_channels=(8, 16), cross_attention_dim=16, norm_num_groups=4,
                         sample_size=8, in_channels=3, out_channels=3, attention_head_dim=2)
    cfg = dt.AttributionConfig(method="trak", num_timesteps=3)
    f = dt.make_train_out_fn(u, make_schedule(), cfg)
    assert dt.make_train_out_fn(u, make_schedule(), cfg) is f  # equal schedule values
    assert dt.make_train_out_fn(u, make_schedule(beta_end=0.03), cfg) is not f
    assert dt.make_train_out_fn(u, make_schedule(), dt.AttributionConfig(method="dtrak")) is not f
    j = dt.make_journey_target_out_fn(u, make_schedule(), cfg)
    assert j is dt.make_journey_target_out_fn(u, make_schedule(), cfg) and j is not f
