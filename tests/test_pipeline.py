"""load_pipeline on a tiny diffusers StableDiffusionPipeline saved with save_pretrained."""

import json
import shutil
import types

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from jaxattrib.models import pipeline as P  # noqa: E402
from jaxattrib.models.convert import CheckpointError  # noqa: E402
from tiny import MAX_LEN, TEXT_HIDDEN, make_sd_pipeline  # noqa: E402

PROMPTS = ["a photo of sks dog", "A painting of a cat in the style of Van Gogh!", ""]
HIDDEN = TEXT_HIDDEN


def make_pipeline(root, *, pad_token="<|endoftext|>", hidden_act="quick_gelu"):
    """Saves a tiny random SD pipeline (diffusers, torch) to ``root/pipe``; returns it."""
    _, pipe = make_sd_pipeline(root, pad_token=pad_token, hidden_act=hidden_act,
                               return_pipe=True)
    text_encoder = pipe.text_encoder
    # diffusers 0.42's encode_prompt(clip_skip=...) reads text_encoder.text_model
    # .final_layer_norm, a wrapper transformers 5 no longer has: alias it (not a submodule, so
    # nothing else changes) to use diffusers' own clip_skip code as the reference.
    object.__setattr__(text_encoder, "text_model",
                       types.SimpleNamespace(final_layer_norm=text_encoder.final_layer_norm))
    return pipe


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    pipe = make_pipeline(root)
    return pipe, root / "pipe"


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_text_path_matches_diffusers_encode_prompt(saved):
    pipe, folder = saved
    loaded = P.load_pipeline(folder)
    # Tokenizer ids == the diffusers pipeline's own tokenization.
    ref_ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=MAX_LEN,
                             truncation=True, return_tensors="np").input_ids
    np.testing.assert_array_equal(loaded.tokenizer(PROMPTS), ref_ids)
    # Conditioning == StableDiffusionPipeline.encode_prompt (default and clip_skip=1).
    for layer, clip_skip in (("last", None), ("penultimate", 1)):
        with torch.no_grad():
            ref, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False, clip_skip=clip_skip)
        got = loaded.encode_prompts(PROMPTS, layer=layer)
        np.testing.assert_allclose(got, ref.numpy(), atol=1e-4)
    assert loaded.text_config.hidden_act == "quick_gelu"


def test_every_part_present_and_matches(saved):
    pipe, folder = saved
    loaded = P.load_pipeline(folder)
    assert loaded.is_latent and loaded.folder == str(folder)
    assert loaded.scheduler_config == json.loads(
        (folder / "scheduler" / "scheduler_config.json").read_text())
    assert loaded.scheduler_config["_class_name"] == "DDIMScheduler"
    assert loaded.model_index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert loaded.unet_config.cross_attention_dim == HIDDEN
    assert loaded.vae_config.latent_channels == 4

    from jaxattrib.models import unet as U
    from jaxattrib.models import vae as V
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4), dtype=np.float32)
    t = np.array([10, 700], dtype=np.int64)
    ctx = rng.standard_normal((2, MAX_LEN, HIDDEN), dtype=np.float32)
    with torch.no_grad():
        ref = pipe.unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                        torch.from_numpy(ctx)).sample.numpy().transpose(0, 2, 3, 1)
    got = U.UNet2DConditionModel(loaded.unet_config).apply(
        {"params": loaded.unet_params}, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx))
    np.testing.assert_allclose(got, ref, atol=1e-4)

    with torch.no_grad():
        ref = pipe.vae.decode(torch.from_numpy(x.transpose(0, 3, 1, 2))
                              / pipe.vae.config.scaling_factor).sample.numpy()
    got = V.decode_latents(loaded.vae_params, loaded.vae_config, jnp.asarray(x))
    np.testing.assert_allclose(got, ref.transpose(0, 2, 3, 1), atol=1e-4)


def test_load_component_on_each_folder(saved):
    _, folder = saved
    kinds = {name: P.load_component(folder / name)[0]
             for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")}
    assert kinds == {n: n for n in kinds}
    _, (cfg, params) = P.load_component(folder / "text_encoder")
    assert cfg.hidden_size == HIDDEN and "encoder" in params
    with pytest.raises(CheckpointError, match="single component folder"):
        P.load_pipeline(folder / "unet")


def test_pixel_space_pipeline_without_vae(saved, tmp_path):
    _, folder = saved
    f = _copy(folder, tmp_path / "pix")
    shutil.rmtree(f / "vae")
    index = json.loads((f / "model_index.json").read_text())
    index["vae"] = [None, None]
    (f / "model_index.json").write_text(json.dumps(index))
    loaded = P.load_pipeline(f)
    assert loaded.vae_config is None and loaded.vae_params is None and not loaded.is_latent
    del index["vae"]
    (f / "model_index.json").write_text(json.dumps(index))
    assert P.load_pipeline(f).vae_config is None


def test_errors_name_every_failing_component(saved, tmp_path):
    from safetensors.numpy import load_file, save_file
    _, folder = saved
    f = _copy(folder, tmp_path / "bad")
    # text encoder: a missing tensor; unet: corrupt file; vae listed but folder missing.
    te = f / "text_encoder" / "model.safetensors"
    sd = load_file(str(te))
    del sd[next(k for k in sd if k.endswith("final_layer_norm.weight"))]
    save_file(sd, str(te))
    unet_w = next((f / "unet").glob("*.safetensors"))
    unet_w.write_bytes(b"not a safetensors file")
    shutil.rmtree(f / "vae")
    with pytest.raises(CheckpointError) as e:
        P.load_pipeline(f)
    msg = str(e.value)
    assert "3 component(s) failed" in msg
    assert str(f / "text_encoder") in msg and "final_layer_norm.weight" in msg
    assert str(f / "unet") in msg and "corrupt" in msg
    assert str(f / "vae") in msg and "missing component folder" in msg
    assert "tokenizer" not in msg.split("failed")[1]  # the healthy parts are not blamed


def test_pickle_text_encoder_refused_then_allowed(saved, tmp_path):
    pipe, folder = saved
    f = _copy(folder, tmp_path / "pk")
    (f / "text_encoder" / "model.safetensors").unlink()
    torch.save(pipe.text_encoder.state_dict(), f / "text_encoder" / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as e:
        P.load_pipeline(f)
    assert "pytorch_model.bin" in str(e.value) and str(f / "text_encoder") in str(e.value)
    loaded = P.load_pipeline(f, allow_pickle=True)
    with torch.no_grad():
        ref, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    np.testing.assert_allclose(loaded.encode_prompts(PROMPTS), ref.numpy(), atol=1e-4)


def test_unsupported_class_and_mismatched_parts(saved, tmp_path):
    _, folder = saved
    f = _copy(folder, tmp_path / "cls")
    index = json.loads((f / "model_index.json").read_text())
    (f / "model_index.json").write_text(json.dumps(
        {**index, "text_encoder": ["transformers", "T5EncoderModel"]}))
    with pytest.raises(CheckpointError, match=r"text_encoder.*T5EncoderModel.*not supported"):
        P.load_pipeline(f)
    (f / "model_index.json").write_text(json.dumps(index))
    # A valid but wider text encoder than the UNet's cross-attention: caught at load time.
    cfg = json.loads((f / "text_encoder" / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if k in ("vocab_size", "max_position_embeddings",
                                                 "bos_token_id", "eos_token_id")}
    wide = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        **cfg, hidden_size=64, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4))
    shutil.rmtree(f / "text_encoder")
    wide.save_pretrained(str(f / "text_encoder"))
    with pytest.raises(CheckpointError,
                       match=r"(?s)do not fit.*cross_attention_dim=32.*hidden_size=64"):
        P.load_pipeline(f)


@pytest.mark.parametrize("hidden_act", ["gelu"])
def test_sd2_style_pad_and_gelu(tmp_path, hidden_act):
    """SD-2 style: pad token '!' (id 0) and an erf-gelu text encoder."""
    pipe = make_pipeline(tmp_path, pad_token="!", hidden_act=hidden_act)
    loaded = P.load_pipeline(tmp_path / "pipe")
    ids = loaded.tokenizer(PROMPTS)
    assert loaded.tokenizer.pad_token_id == 0 and ids[0, -1] == 0
    np.testing.assert_array_equal(ids, pipe.tokenizer(
        PROMPTS, padding="max_length", max_length=MAX_LEN, truncation=True).input_ids)
    for layer, clip_skip in (("last", None), ("penultimate", 1)):
        with torch.no_grad():
            ref, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False, clip_skip=clip_skip)
        np.testing.assert_allclose(loaded.encode_prompts(PROMPTS, layer=layer), ref.numpy(),
                                   atol=1e-4)


def test_saved_pipeline_loads_and_refuses_tampering(tiny_pipeline_dir, tmp_path):
    import shutil
    from jaxattrib.models.convert import CheckpointError
    from jaxattrib.models.pipeline import load_pipeline
    pipe = load_pipeline(tiny_pipeline_dir)
    assert not pipe.is_latent and pipe.unet_config.sample_size == 8
    bad = tmp_path / "bad"
    shutil.copytree(tiny_pipeline_dir, bad)
    (bad / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors")
    with pytest.raises(CheckpointError, match="unet"):
        load_pipeline(bad)
