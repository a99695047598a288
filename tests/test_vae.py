"""VAE port: parity with diffusers AutoencoderKL (torch CPU, float32), latent helpers,
checkpoint errors, save_pretrained round trip."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxattrib.models import vae as V  # noqa: E402
from jaxattrib.models.convert import CheckpointError  # noqa: E402

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

CFG = dict(in_channels=3, out_channels=3,
           down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
           block_out_channels=[16, 32], layers_per_block=1, latent_channels=4,
           norm_num_groups=8, sample_size=16, scaling_factor=0.3)


def make_torch_vae(path, seed=0, cfg=CFG, **save_kw):
    model = diffusers.AutoencoderKL(**cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.eval().save_pretrained(path, **save_kw)
    return model


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def test_encode_decode_parity(tmp_path):
    model = make_torch_vae(tmp_path)
    config, params = V.from_pretrained(tmp_path)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        post = model.encode(nchw(x)).latent_dist
        ref_mean, ref_logvar = nhwc(post.mean), nhwc(post.logvar)
        z = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
        ref_dec = nhwc(model.decode(nchw(z)).sample)
    vae = V.AutoencoderKL(config)
    mean, logvar = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode),
                           compiler_options=FAST)(params, x)
    dec = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode),
                  compiler_options=FAST)(params, z)
    assert mean.shape == (2, 8, 8, 4) and dec.shape == (2, 16, 16, 3)
    for ours, ref in ((mean, ref_mean), (logvar, ref_logvar), (dec, ref_dec)):
        assert np.std(ref) > 0.05
        np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)

    # Latent helpers: scaling factor, posterior mean vs sample.
    lat = V.encode_latents(params, config, x)
    np.testing.assert_allclose(np.asarray(lat), ref_mean * 0.3, atol=1e-4 * 0.3)
    key = jax.random.PRNGKey(0)
    s1, s2 = V.encode_latents(params, config, x, key), V.encode_latents(params, config, x, key)
    np.testing.assert_array_equal(s1, s2)  # same key, same sample
    eps = jax.random.normal(key, mean.shape)
    np.testing.assert_allclose(s1, (mean + jnp.exp(0.5 * logvar) * eps) * 0.3, atol=1e-5)
    np.testing.assert_allclose(np.asarray(V.decode_latents(params, config, z * 0.3)), ref_dec,
                               atol=1e-4, rtol=0)


def test_param_count_and_legacy_attention_keys(tmp_path):
    model = make_torch_vae(tmp_path)
    n_torch = sum(p.numel() for p in model.parameters())
    config = V.VAEConfig.from_diffusers(json.loads(json.dumps(CFG)))
    shapes = V.param_shapes(config)
    assert sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes)) == n_torch
    assert set(shapes["encoder"]["mid_block"]["attentions_0"]) == {
        "group_norm", "to_q", "to_k", "to_v", "to_out_0"}
    # Old-style checkpoints name the VAE attention query/key/value/proj_attn.
    from safetensors.numpy import load_file, save_file
    f = Path(tmp_path) / "diffusion_pytorch_model.safetensors"
    t = load_file(str(f))
    new = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for k, v in t.items():
        for a, b in new.items():
            if f".attentions.0.{a}." in k:
                k = k.replace(f".attentions.0.{a}.", f".attentions.0.{b}.")
        legacy[k] = v
    assert any("proj_attn" in k for k in legacy)
    save_file(legacy, str(f))
    _, p_legacy = V.from_pretrained(tmp_path)
    p_ref = V.params_from_state_dict(V.StateDict(t, "current names"), config)
    for a, b in zip(jax.tree_util.tree_leaves(p_legacy), jax.tree_util.tree_leaves(p_ref)):
        np.testing.assert_array_equal(a, b)


def test_errors_collected(tmp_path):
    make_torch_vae(tmp_path)
    from safetensors.numpy import load_file, save_file
    f = Path(tmp_path) / "diffusion_pytorch_model.safetensors"
    t = load_file(str(f))
    del t["decoder.conv_out.bias"]
    t["encoder.conv_in.weight"] = t["encoder.conv_in.weight"][:8]
    save_file(t, str(f))
    with pytest.raises(CheckpointError) as e:
        V.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "decoder.conv_out.bias" in msg and "encoder.conv_in.weight" in msg
    # corrupt file
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt"):
        V.from_pretrained(tmp_path)


def test_pickle_refused_and_unsupported_config(tmp_path):
    make_torch_vae(tmp_path, safe_serialization=False)
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.bin"):
        V.from_pretrained(tmp_path)
    with pytest.raises(V.UnsupportedConfigError, match="latents_mean"):
        V.VAEConfig.from_diffusers({**CFG, "latents_mean": [0.0] * 4})
    with pytest.raises(V.UnsupportedConfigError, match="AttnDownEncoderBlock2D"):
        V.VAEConfig.from_diffusers({**CFG, "down_block_types": ["AttnDownEncoderBlock2D"] * 2})


def test_save_pretrained_round_trip_into_diffusers(tmp_path):
    config = V.VAEConfig.from_diffusers(json.loads(json.dumps(CFG)))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape, dtype=np.float32)),
        V.param_shapes(config))
    V.save_pretrained(tmp_path, config, params)
    model = diffusers.AutoencoderKL.from_pretrained(tmp_path).eval()
    z = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
    with torch.no_grad():
        ref = nhwc(model.decode(nchw(z)).sample)
    out = V.AutoencoderKL(config).apply({"params": params}, z, method=V.AutoencoderKL.decode)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=0)
