"""LoRA on Flax parameter trees: identity at init, Dense equivalence, gradient flow, naming."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattrib.models import lora


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, ctx):
        for name in ("attn1", "attn2"):
            src = x if name == "attn1" else ctx  # self- / cross-attention, diffusers naming
            x = x + _Attn(name=name)(x, src)
        return nn.Dense(4, name="proj_out")(x)


class _Attn(nn.Module):
    @nn.compact
    def __call__(self, x, src):
        q = nn.Dense(8, name="to_q")(x)
        k = nn.Dense(8, name="to_k")(src)
        v = nn.Dense(8, name="to_v")(src)
        a = jax.nn.softmax(q @ k.swapaxes(-1, -2) / np.sqrt(8.0), -1)
        return nn.Dense(x.shape[-1], name="to_out_0")(a @ v)


def _setup():
    m = Block()
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 4))
    ctx = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 4))
    params = m.init(jax.random.PRNGKey(2), x, ctx)["params"]
    return m, params, x, ctx


def test_default_target_selects_attention_projections():
    _, params, _, _ = _setup()
    paths = lora.lora_targets(params)
    assert len(paths) == 8
    assert all(re.search(r"attn[12]/to_(q|k|v|out_0)/kernel$", p) for p in paths)
    assert "proj_out/kernel" not in paths
    # CLIP text encoder naming
    text = {"encoder": {"layers_0": {"self_attn": {n: {"kernel": np.zeros((4, 4)),
                                                       "bias": np.zeros(4)}
                                                   for n in ("q_proj", "k_proj", "v_proj",
                                                             "out_proj")},
                                     "mlp": {"fc1": {"kernel": np.zeros((4, 8))}}}}}
    assert len(lora.lora_targets(text, lora.TEXT_ATTENTION_TARGET)) == 4


def test_init_is_identity_and_shapes():
    m, params, x, ctx = _setup()
    lp = lora.lora_init(params, jax.random.PRNGKey(3), rank=2)
    ab = lp["attn1"]["to_q"]["kernel"]
    assert ab["a"].shape == (4, 2) and ab["b"].shape == (2, 8)
    np.testing.assert_array_equal(ab["b"], 0)
    assert np.std(np.asarray(ab["a"])) > 0
    merged = lora.lora_merge(params, lp, alpha=8.0)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(m.apply({"params": merged}, x, ctx),
                                  m.apply({"params": params}, x, ctx))
    assert lora.lora_param_count(lp) == sum(
        2 * (params[n][p]["kernel"].shape[0] + params[n][p]["kernel"].shape[1])
        for n in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out_0"))


def test_lora_dense_equals_explicit_low_rank_update():
    """Dense with merged kernel == x W + b + (alpha/r) (x A) B, computed explicitly in float64."""
    with jax.enable_x64(True):
        dense = nn.Dense(6, dtype=jnp.float64, param_dtype=jnp.float64)
        x = jax.random.normal(jax.random.PRNGKey(0), (3, 5), jnp.float64)
        base = {"layer": dense.init(jax.random.PRNGKey(1), x)["params"]}
        r, alpha = 3, 5.0
        lp = lora.lora_init(base, jax.random.PRNGKey(2), r, target=r"layer/kernel$",
                            dtype=jnp.float64)
        b = jax.random.normal(jax.random.PRNGKey(4), (r, 6), jnp.float64)
        lp["layer"]["kernel"]["b"] = b
        a = lp["layer"]["kernel"]["a"]
        y = dense.apply({"params": lora.lora_merge(base, lp, alpha)["layer"]}, x)
        w, bias = np.asarray(base["layer"]["kernel"]), np.asarray(base["layer"]["bias"])
        xn, an, bn = np.asarray(x), np.asarray(a), np.asarray(b)
        expected = xn @ w + bias + (alpha / r) * ((xn @ an) @ bn)
        np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-12, atol=1e-12)
        # A ~ N(0, 1/r^2): sample std over a larger matrix
        big = lora.lora_init({"k": jnp.zeros((4000, 8))}, jax.random.PRNGKey(5), 4, target="k")
        assert abs(float(jnp.std(big["k"]["a"])) - 0.25) < 0.01


def test_gradients_flow_only_to_lora_params():
    m, params, x, ctx = _setup()
    lp = lora.lora_init(params, jax.random.PRNGKey(3), rank=2)

    def loss(lp_, base):
        return jnp.sum(m.apply({"params": lora.lora_merge(base, lp_, 4.0)}, x, ctx) ** 2)

    g_lora, g_base = jax.grad(loss, argnums=(0, 1))(lp, params)
    # at B = 0 the gradient reaches B (not A): dL/dB = (alpha/r) A^T dL/dW
    gw = g_base["attn1"]["to_q"]["kernel"]
    ab = lp["attn1"]["to_q"]["kernel"]
    np.testing.assert_allclose(g_lora["attn1"]["to_q"]["kernel"]["b"], 2.0 * ab["a"].T @ gw,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(g_lora["attn1"]["to_q"]["kernel"]["a"], 0)
    # the structure of the LoRA gradient is the LoRA tree: no base parameter is trained
    assert jax.tree.structure(g_lora) == jax.tree.structure(lp)
    assert "proj_out" not in g_lora


def test_errors_name_the_path():
    _, params, _, _ = _setup()
    with pytest.raises(ValueError, match="matches no parameter"):
        lora.lora_init(params, jax.random.PRNGKey(0), 2, target="nothing_here")
    with pytest.raises(ValueError, match="2-D"):
        lora.lora_init({"conv": {"kernel": jnp.zeros((3, 3, 4, 8))}}, jax.random.PRNGKey(0), 2,
                       target="conv/kernel")
    lp = lora.lora_init(params, jax.random.PRNGKey(0), 2)
    with pytest.raises(KeyError, match="attn1"):
        lora.lora_merge({"attn2": params["attn2"]}, lp, 1.0)


def test_state_dict_uses_peft_names_and_torch_layout():
    _, params, _, _ = _setup()
    lp = lora.lora_init(params, jax.random.PRNGKey(0), 2)
    sd = lora.lora_state_dict(lp)
    a = sd["unet.attn1.to_out.0.lora_A.weight"]
    b = sd["unet.attn1.to_out.0.lora_B.weight"]
    assert a.shape == (2, 8) and b.shape == (4, 2)
    np.testing.assert_array_equal(a, np.asarray(lp["attn1"]["to_out_0"]["kernel"]["a"]).T)
    assert len(sd) == 16
