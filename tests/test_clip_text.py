"""Parity of the Flax CLIP text encoder with transformers' CLIPTextModel (torch, CPU, float32)."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxattrib.models import clip_text  # noqa: E402
from jaxattrib.models.convert import CheckpointError  # noqa: E402
from tiny import text_config  # noqa: E402

VOCAB = 100
LENGTH = 12


def _save_tiny(path, *, hidden_act, eos_token_id=VOCAB - 1, seed=0, layers=3):
    torch.manual_seed(seed)
    cfg = transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=LENGTH, hidden_act=hidden_act,
        bos_token_id=VOCAB - 2, eos_token_id=eos_token_id, pad_token_id=1)
    model = transformers.CLIPTextModel(cfg).eval()
    # Non-trivial layer norms so that a missing/ swapped scale or bias would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def _random_ids(rng, batch, eos):
    """Random ids with bos first and an eos at a random position (then padding with eos)."""
    ids = rng.integers(3, VOCAB - 2, size=(batch, LENGTH))
    ids[:, 0] = VOCAB - 2
    for b in range(batch):
        end = rng.integers(2, LENGTH)
        ids[b, end:] = eos
    return ids


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_parity_with_transformers(tmp_path, hidden_act):
    model = _save_tiny(tmp_path / "te", hidden_act=hidden_act)
    config, params = clip_text.from_pretrained(tmp_path / "te")
    assert config.hidden_act == hidden_act and config.num_hidden_layers == 3

    ids = _random_ids(np.random.default_rng(1), 4, VOCAB - 1)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), output_hidden_states=True)
    out = clip_text.CLIPTextModel(config).apply({"params": params}, jnp.asarray(ids))

    tol = 1e-4
    np.testing.assert_allclose(out.last_hidden_state, ref.last_hidden_state.numpy(), atol=tol)
    np.testing.assert_allclose(out.pooled, ref.pooler_output.numpy(), atol=tol)
    assert len(out.hidden_states) == len(ref.hidden_states) == 4
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        np.testing.assert_allclose(ours, theirs.numpy(), atol=tol)

    # encode_text: 'last' == last_hidden_state; 'penultimate' == diffusers clip_skip=1 rule.
    last = clip_text.encode_text(params, config, ids, layer="last")
    np.testing.assert_allclose(last, ref.last_hidden_state.numpy(), atol=tol)
    pen = clip_text.encode_text(params, config, ids, layer="penultimate")
    with torch.no_grad():
        ref_pen = model.final_layer_norm(ref.hidden_states[-2]).numpy()
    np.testing.assert_allclose(pen, ref_pen, atol=tol)
    assert np.abs(ref_pen - ref.last_hidden_state.numpy()).max() > 1e-2  # the two differ
    with pytest.raises(ValueError, match="layer"):
        clip_text.encode_text(params, config, ids, layer="first")


def test_causal_mask_future_tokens_do_not_matter(tmp_path):
    _save_tiny(tmp_path / "te", hidden_act="quick_gelu")
    config, params = clip_text.from_pretrained(tmp_path / "te")
    ids = _random_ids(np.random.default_rng(2), 2, VOCAB - 1)
    ids2 = ids.copy()
    ids2[:, 7:] = (ids2[:, 7:] + 5) % (VOCAB - 3) + 3
    model = clip_text.CLIPTextModel(config)
    a = model.apply({"params": params}, ids).last_hidden_state
    b = model.apply({"params": params}, ids2).last_hidden_state
    np.testing.assert_allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert np.abs(np.asarray(a[:, 7:] - b[:, 7:])).max() > 1e-3


def test_legacy_eos_token_id_2_pools_at_argmax(tmp_path):
    # eos_token_id == 2: transformers pools at argmax(input_ids) (the old rule).
    model = _save_tiny(tmp_path / "te", hidden_act="quick_gelu", eos_token_id=2)
    config, params = clip_text.from_pretrained(tmp_path / "te")
    ids = np.random.default_rng(3).integers(3, VOCAB, size=(3, LENGTH))
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).pooler_output.numpy()
    out = clip_text.CLIPTextModel(config).apply({"params": params}, ids)
    np.testing.assert_allclose(out.pooled, ref, atol=1e-4)
    expected = np.asarray(out.last_hidden_state)[np.arange(3), ids.argmax(-1)]
    np.testing.assert_allclose(out.pooled, expected, atol=0)


def test_old_text_model_prefix_and_position_ids_buffer(tmp_path):
    """transformers < 5 and original SD checkpoints store ``text_model.*`` and position_ids."""
    from safetensors.numpy import load_file, save_file
    model = _save_tiny(tmp_path / "te", hidden_act="gelu")
    sd = load_file(str(tmp_path / "te" / "model.safetensors"))
    old = {f"text_model.{k}": v for k, v in sd.items()}
    old["text_model.embeddings.position_ids"] = np.arange(LENGTH, dtype=np.int64)[None]
    (tmp_path / "old").mkdir()
    shutil.copy(tmp_path / "te" / "config.json", tmp_path / "old" / "config.json")
    save_file(old, str(tmp_path / "old" / "model.safetensors"))
    config, params = clip_text.from_pretrained(tmp_path / "old")
    ids = _random_ids(np.random.default_rng(4), 2, VOCAB - 1)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).last_hidden_state.numpy()
    out = clip_text.encode_text(params, config, ids)
    np.testing.assert_allclose(out, ref, atol=1e-4)


def test_config_round_trip_and_rejections():
    cfg = clip_text.CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   max_position_embeddings=8, hidden_act="gelu")
    d = cfg.to_transformers()
    assert clip_text.CLIPTextConfig.from_transformers(d) == cfg
    ref = transformers.CLIPTextConfig(**{k: v for k, v in d.items() if k != "architectures"})
    assert clip_text.CLIPTextConfig.from_transformers(ref.to_dict()) == cfg
    with pytest.raises(ValueError, match="hidden_act"):
        clip_text.CLIPTextConfig.from_transformers({**d, "hidden_act": "relu"})
    with pytest.raises(ValueError, match="model_type"):
        clip_text.CLIPTextConfig.from_transformers({**d, "model_type": "clip"})
    with pytest.raises(ValueError, match="architectures"):
        clip_text.CLIPTextConfig.from_transformers(
            {**d, "architectures": ["CLIPTextModelWithProjection"]})
    with pytest.raises(ValueError, match="divisible"):
        clip_text.CLIPTextConfig.from_transformers({**d, "num_attention_heads": 3})


def test_errors_all_in_one(tmp_path):
    from safetensors.numpy import load_file, save_file
    _save_tiny(tmp_path / "te", hidden_act="quick_gelu")
    sd = load_file(str(tmp_path / "te" / "model.safetensors"))
    del sd["encoder.layers.1.mlp.fc1.bias"]
    sd["encoder.layers.0.self_attn.q_proj.weight"] = np.zeros((32, 31), np.float32)
    sd["encoder.layers.0.extra.weight"] = np.zeros((3,), np.float32)
    save_file(sd, str(tmp_path / "te" / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        clip_text.from_pretrained(tmp_path / "te")
    msg = str(e.value)
    assert "missing tensors (1)" in msg and "encoder.layers.1.mlp.fc1.bias" in msg
    assert "unexpected tensors (1)" in msg and "encoder.layers.0.extra.weight" in msg
    assert "shape mismatches (1)" in msg and "q_proj.weight" in msg
    assert str(tmp_path / "te") in msg


def test_corrupt_file_and_bad_config(tmp_path):
    _save_tiny(tmp_path / "te", hidden_act="quick_gelu")
    weights = tmp_path / "te" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors.*corrupt"):
        clip_text.from_pretrained(tmp_path / "te")
    cfg_path = tmp_path / "te" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "hidden_act": "silu"}))
    with pytest.raises(CheckpointError, match=r"config.json.*hidden_act"):
        clip_text.from_pretrained(tmp_path / "te")


def test_pickle_only_folder_refused(tmp_path):
    model = _save_tiny(tmp_path / "te", hidden_act="quick_gelu")
    (tmp_path / "te" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "te" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        clip_text.from_pretrained(tmp_path / "te")
    config, params = clip_text.from_pretrained(tmp_path / "te", allow_pickle=True)
    ids = _random_ids(np.random.default_rng(5), 2, VOCAB - 1)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).last_hidden_state.numpy()
    np.testing.assert_allclose(clip_text.encode_text(params, config, ids), ref, atol=1e-4)


def test_gradients_flow_and_jit(tmp_path):
    _save_tiny(tmp_path / "te", hidden_act="gelu")
    config, params = clip_text.from_pretrained(tmp_path / "te")
    ids = _random_ids(np.random.default_rng(6), 2, VOCAB - 1)
    f = jax.jit(lambda p: jnp.sum(clip_text.encode_text(p, config, ids) ** 2))
    g = jax.grad(f)(params)
    gq = g["encoder"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert gq.shape == (32, 32) and np.isfinite(np.asarray(gq)).all()
    assert np.abs(np.asarray(gq)).max() > 0


def test_clip_text_save_pretrained_loads_in_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = text_config(60)
    p = clip_text.init_params(cfg, jax.random.PRNGKey(3))
    clip_text.save_pretrained(tmp_path, cfg, p)
    _, p2 = clip_text.from_pretrained(tmp_path)
    for a, b in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(p2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ref = transformers.CLIPTextModel.from_pretrained(tmp_path).eval()
    ids = np.random.RandomState(0).randint(0, 58, (2, 8))
    ids[:, -1] = cfg.eos_token_id
    with torch.no_grad():
        want = ref(torch.tensor(ids)).last_hidden_state.numpy()
    got = np.asarray(clip_text.CLIPTextModel(cfg).apply({"params": p}, ids).last_hidden_state)
    assert np.abs(want - got).max() < 1e-4
