"""UNet port: numerical parity with diffusers (torch CPU, float32), checkpoint errors,
per-example gradients, taps, round trip through save_pretrained."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxattrib.models import unet as U  # noqa: E402
from jaxattrib.models.convert import CheckpointError  # noqa: E402

# XLA:CPU compile time dominates these tests; -O0 halves it and does not change the maths.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit(f, **kw):
    return jax.jit(f, compiler_options=FAST, **kw)


def random_params(config, seed=0, scale=0.1):
    """Random float32 params of the right shapes without compiling ``init``."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(scale * rng.standard_normal(s.shape, dtype=np.float32)),
        U.param_shapes(config))

SD1 = dict(
    sample_size=8, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=32,
    attention_head_dim=4, norm_num_groups=8, use_linear_projection=False)

SD2 = dict(
    sample_size=8, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=24,
    attention_head_dim=[2, 4], norm_num_groups=16, use_linear_projection=True,
    upcast_attention=True, flip_sin_to_cos=False, freq_shift=1, num_class_embeds=5,
    transformer_layers_per_block=2)


def randomize_(model, seed=0):
    """Default torch init plus N(0, 0.1) on every tensor, so no weight is zero or one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def make_torch_unet(cfg, path, seed=0, **save_kw):
    model = randomize_(diffusers.UNet2DConditionModel(**cfg), seed)
    model.save_pretrained(path, **save_kw)
    return model


def torch_forward(model, x, t, ctx, labels=None):
    with torch.no_grad():
        out = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                    torch.from_numpy(ctx),
                    class_labels=None if labels is None else torch.from_numpy(labels)).sample
    return out.numpy().transpose(0, 2, 3, 1)


def inputs(cfg, b=2, hw=8, seq=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, hw, hw, cfg["in_channels"]), dtype=np.float32)
    t = np.array([10, 731][:b], np.int64)
    ctx = rng.standard_normal((b, seq, cfg["cross_attention_dim"]), dtype=np.float32)
    return x, t, ctx


def test_parity_sd1_with_diffusers(tmp_path):
    model = make_torch_unet(SD1, tmp_path)
    config, params = U.from_pretrained(tmp_path)
    x, t, ctx = inputs(SD1)
    ref = torch_forward(model, x, t, ctx)
    out = jit(U.UNet2DConditionModel(config).apply)({"params": params}, x, t, ctx)
    assert out.shape == ref.shape
    assert np.std(ref) > 0.1  # the comparison is not between two near-zero tensors
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=0)


def test_parity_sd2_with_diffusers_incl_odd_size_and_scalar_float_t(tmp_path):
    model = make_torch_unet(SD2, tmp_path, seed=1)
    config, params = U.from_pretrained(tmp_path)
    assert config.heads == (2, 4) and config.use_linear_projection
    fwd = jit(U.UNet2DConditionModel(config).apply)
    labels = np.array([1, 3], np.int64)
    x, t, ctx = inputs(SD2)
    ref = torch_forward(model, x, t, ctx, labels)
    assert np.std(ref) > 0.1
    np.testing.assert_allclose(np.asarray(fwd({"params": params}, x, t, ctx, labels)), ref,
                               atol=1e-4, rtol=0)
    # 7x7 is not a multiple of 2**num_upsamplers: diffusers forwards the skip sizes.
    x, _, ctx = inputs(SD2, hw=7, seed=1)
    with torch.no_grad():
        ref = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), 417.5, torch.from_numpy(ctx),
                    class_labels=torch.from_numpy(labels)).sample.numpy().transpose(0, 2, 3, 1)
    out = fwd({"params": params}, x, 417.5, ctx, labels)
    assert out.shape == (2, 7, 7, 4)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=0)


def test_param_count_matches_torch():
    for cfg in (SD1, SD2):
        n_torch = sum(p.numel() for p in diffusers.UNet2DConditionModel(**cfg).parameters())
        config = U.UNetConfig.from_diffusers(json.loads(json.dumps(cfg)))
        n_flax = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(
            U.param_shapes(config)))
        assert n_flax == n_torch


def test_parameter_names_readable():
    shapes = U.param_shapes(U.UNetConfig.from_diffusers(dict(SD1)))
    attn = shapes["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]
    assert set(attn["attn2"]) == {"to_q", "to_k", "to_v", "to_out_0"}
    assert attn["attn2"]["to_k"]["kernel"].shape == (32, 32)  # cross_attention_dim -> inner
    assert "bias" not in attn["attn1"]["to_q"]


def test_intermediates_taps():
    config = U.UNetConfig.from_diffusers(dict(SD1))
    x, t, ctx = inputs(SD1)
    model = U.UNet2DConditionModel(config)
    out, state = jax.eval_shape(lambda: model.init_with_output(
        jax.random.PRNGKey(0), x, t, ctx, mutable=["params", "intermediates"]))
    taps = state["intermediates"]
    assert set(taps) == {"down_0", "down_1", "down_2", "mid", "up_0", "up_1", "up_2"}
    assert taps["down_0"][0].shape == (2, 4, 4, 32)
    assert taps["mid"][0].shape == (2, 2, 2, 64)
    assert taps["up_2"][0].shape == (2, 8, 8, 32)


def test_remat_same_output_and_grad():
    config = U.tiny_config(block_out_channels=(8, 16), cross_attention_dim=8, norm_num_groups=4)
    params = random_params(config, 1)
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 5, 4))  # odd size: static upsample size
    ctx = jax.random.normal(jax.random.PRNGKey(3), (2, 3, 8))
    t = jnp.array([3, 900])

    def f(p, remat):
        out = U.UNet2DConditionModel(config, remat=remat).apply({"params": p}, x, t, ctx)
        return jnp.sum(out ** 2)

    v0, g0 = jit(jax.value_and_grad(f), static_argnums=1)(params, False)
    v1, g1 = jit(jax.value_and_grad(f), static_argnums=1)(params, True)
    np.testing.assert_allclose(v0, v1, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(a))))


def test_per_example_grads_vmap_equals_loop():
    """vmap(grad) of the DSM loss equals a per-example loop (float64)."""
    with jax.enable_x64(True):
        cfg = U.tiny_config(block_out_channels=(8,), cross_attention_dim=8, norm_num_groups=4)
        model = U.UNet2DConditionModel(cfg, dtype=jnp.float64)
        params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), random_params(cfg))
        k = jax.random.split(jax.random.PRNGKey(1), 4)
        x0 = jax.random.normal(k[0], (4, 4, 4, 4), jnp.float64)
        eps = jax.random.normal(k[1], (4, 4, 4, 4), jnp.float64)
        ctx = jax.random.normal(k[2], (4, 3, 8), jnp.float64)
        t = jnp.array([5, 100, 500, 999])
        abar = jnp.cos(t / 1000 * jnp.pi / 2) ** 2

        def loss(p, x0, eps, t, c, ab):
            xt = jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * eps
            pred = model.apply({"params": p}, xt[None], t[None], c[None])[0]
            return jnp.mean((eps - pred) ** 2)

        g_vmap = jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0, 0, 0, 0)))(
            params, x0, eps, t, ctx, abar)
        grad_one = jit(jax.grad(loss))
        for i in range(4):
            g_i = grad_one(params, x0[i], eps[i], t[i], ctx[i], abar[i])
            for a, b in zip(jax.tree_util.tree_leaves(g_vmap), jax.tree_util.tree_leaves(g_i)):
                assert a.dtype == jnp.float64 and a.shape[0] == 4
                np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-12)


# ------------------------------------------------------------------------------------------
# Checkpoint errors
# ------------------------------------------------------------------------------------------

def _tensors(path):
    from safetensors.numpy import load_file
    return load_file(str(Path(path) / U.WEIGHTS_NAME))


def _write(path, tensors):
    from safetensors.numpy import save_file
    save_file(tensors, str(Path(path) / U.WEIGHTS_NAME))


def test_missing_unexpected_and_misshaped_in_one_error(tmp_path):
    make_torch_unet(SD1, tmp_path)
    t = _tensors(tmp_path)
    del t["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
    t["mid_block.resnets.0.conv1.weight"] = t["mid_block.resnets.0.conv1.weight"][:, :-1]
    t["extra.weight"] = np.zeros(3, np.float32)
    _write(tmp_path, t)
    with pytest.raises(CheckpointError) as e:
        U.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "missing tensors (1)" in msg
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight" in msg
    assert "unexpected tensors (1)" in msg and "extra.weight" in msg
    assert "shape mismatches (1)" in msg and "mid_block.resnets.0.conv1.weight" in msg


def test_corrupt_safetensors(tmp_path):
    make_torch_unet(SD1, tmp_path)
    f = tmp_path / U.WEIGHTS_NAME
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        U.from_pretrained(tmp_path)


def test_pickle_only_refused(tmp_path):
    make_torch_unet(SD1, tmp_path, safe_serialization=False)
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.bin"):
        U.from_pretrained(tmp_path)
    config, params = U.from_pretrained(tmp_path, allow_pickle=True)
    assert config.block_out_channels == (32, 64, 64)


@pytest.mark.parametrize("key,value", [("resnet_time_scale_shift", "scale_shift"),
                                       ("addition_embed_type", "text_time"),
                                       ("num_attention_heads", 8),
                                       ("time_cond_proj_dim", 16),
                                       ("brand_new_option", 1)])
def test_unsupported_config_rejected(key, value):
    cfg = {**SD1, key: value, "_class_name": "UNet2DConditionModel", "_diffusers_version": "0"}
    with pytest.raises(U.UnsupportedConfigError, match=f"{key}={value!r}"):
        U.UNetConfig.from_diffusers(cfg)


def test_unsupported_block_type_rejected():
    cfg = {**SD1, "down_block_types": ["AttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]}
    with pytest.raises(U.UnsupportedConfigError, match="AttnDownBlock2D"):
        U.UNetConfig.from_diffusers(cfg)


def test_save_pretrained_round_trip_into_diffusers(tmp_path):
    config = U.UNetConfig.from_diffusers(json.loads(json.dumps(SD2)))
    params = random_params(config, 3)
    U.save_pretrained(tmp_path, config, params)
    model = diffusers.UNet2DConditionModel.from_pretrained(tmp_path).eval()
    x, t, ctx = inputs(SD2)
    labels = np.array([0, 4], np.int64)
    ref = torch_forward(model, x, t, ctx, labels)
    out = jit(U.UNet2DConditionModel(config).apply)({"params": params}, x, t, ctx, labels)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=0)
    config2, params2 = U.from_pretrained(tmp_path)
    assert config2 == config
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2)):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------
# Full-size key mapping (slow: ~3.4 GB RAM for SD-1.5)
# ------------------------------------------------------------------------------------------

SD15_FULL = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
SD21_FULL = dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                 use_linear_projection=True, upcast_attention=True)


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [SD15_FULL, SD21_FULL], ids=["sd15", "sd21"])
def test_full_size_key_mapping(tmp_path, cfg):
    model = diffusers.UNet2DConditionModel(**cfg)
    model.save_pretrained(tmp_path)
    n_torch = sum(p.numel() for p in model.parameters())
    del model
    config, params = U.from_pretrained(tmp_path)  # raises if any key is unmapped
    assert sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params)) == n_torch
