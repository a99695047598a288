"""Tiny models and pipelines shared by the tests (one home; import from here).

* :func:`make_latent_pipeline`: a tiny Stable-Diffusion-shaped **latent** pipeline (AutoencoderKL
  + UNet2DConditionModel + CLIPTextModel + word-level CLIPTokenizer + DDIM scheduler), written by
  diffusers/transformers themselves (``StableDiffusionPipeline.save_pretrained``, safetensors),
  with the synthetic concept vocabulary so the package's synthetic captions tokenize. Images are
  ``image_size`` px; the VAE downsamples by 2 (two encoder blocks), so latents are
  ``image_size / 2`` squared x 4 channels.
* :func:`make_pixel_pipeline`: the same without a VAE (pixel space, 3 channels), written by our
  own writer (:func:`jaxattrib.train.base_model.save_pipeline`).

The session fixtures ``tiny_latent_pipeline`` / ``tiny_pixel_pipeline`` in ``conftest.py`` build
each once per test session (per xdist worker) and return the folder; copy it before modifying.
"""

from __future__ import annotations

from pathlib import Path

LATENT_FACTOR = 2        # VAE downsampling of the tiny latent pipeline
LATENT_CHANNELS = 4
TEXT_HIDDEN = 32
MAX_LEN = 16


def _words() -> list[str]:
    from jaxattrib.train.base_model import data_spec, vocabulary
    return vocabulary(data_spec()) + ["sks", "photo", "of", "dog", "cat"]


def _randomize(model, seed: int, scale: float = 0.05):
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def make_latent_pipeline(root, *, image_size: int = 16, prediction_type: str = "epsilon",
                         seed: int = 0, name: str = "latent_pipe") -> Path:
    """Writes a tiny random latent SD pipeline with diffusers/transformers to ``root/name``.

    ``image_size`` px images (a multiple of 4), latents ``image_size // 2`` px x 4 channels;
    ``prediction_type`` 'epsilon' (SD-1.5-like) or 'v_prediction' (SD-2.1-like). Deterministic
    in ``seed``. Returns the pipeline folder."""
    import diffusers
    import torch
    import transformers

    from jaxattrib.models.tokenizer import build_word_tokenizer

    root = Path(root)
    tok_dir = build_word_tokenizer(_words(), root / f"{name}_tok", model_max_length=MAX_LEN)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(seed)
    text_encoder = _randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_LEN,
        hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)), seed + 1)
    unet = _randomize(diffusers.UNet2DConditionModel(
        sample_size=image_size // LATENT_FACTOR, in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(16, 32),
        layers_per_block=1, cross_attention_dim=TEXT_HIDDEN, attention_head_dim=4,
        norm_num_groups=8), seed + 2)
    vae = _randomize(diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
        latent_channels=LATENT_CHANNELS, norm_num_groups=8, sample_size=image_size), seed + 3)
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                        beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                        set_alpha_to_one=False, steps_offset=1,
                                        prediction_type=prediction_type)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    out = root / name
    pipe.save_pretrained(str(out))
    return out


def make_pixel_pipeline(root, *, image_size: int = 8, seed: int = 0,
                        name: str = "pixel_pipe", extra: dict | None = None,
                        unet_overrides: dict | None = None) -> Path:
    """Writes a tiny random pixel-space pipeline (no VAE) with our own writer; returns it.
    ``extra``: the ``jaxattrib_base.json`` to write (default ``{"note": "test"}``).
    ``unet_overrides``: fields of :func:`jaxattrib.models.unet.tiny_config` to replace (default:
    2 levels, 8/16 channels, cross-attention at full resolution)."""
    import jax

    from jaxattrib.train import base_model as bm
    from jaxattrib.models import clip_text, unet
    from jaxattrib.models.tokenizer import CLIPTokenizer, build_word_tokenizer

    root = Path(root)
    tok = build_word_tokenizer(_words(), root / f"{name}_tok", model_max_length=8)
    vocab = CLIPTokenizer.from_folder(tok).vocab_size
    t = clip_text.CLIPTextConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 max_position_embeddings=8, pad_token_id=None,
                                 bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                                 projection_dim=16)
    u = unet.tiny_config(**{**dict(block_out_channels=(8, 16), cross_attention_dim=16,
                                   norm_num_groups=4, sample_size=image_size, in_channels=3,
                                   out_channels=3, attention_head_dim=2),
                            **(unet_overrides or {})})
    key = jax.random.PRNGKey(seed)
    up = unet.init_params(u, key)
    up = jax.tree_util.tree_map(lambda a: a + 0.05 * jax.random.normal(key, a.shape), up)
    tp = clip_text.init_params(t, jax.random.fold_in(key, 1))
    return bm.save_pipeline(root / name, u, up, t, tp, tok, bm.SCHEDULER_CONFIG,
                            {"note": "test"} if extra is None else extra)


def make_pixel_base_model(root, *, name: str = "pixel_base") -> Path:
    """A tiny pixel pipeline standing in for the embedded base model (``demo --set
    base_model=...``): 16-px images and the embedded model's ``jaxattrib_base.json`` (data spec,
    held-out concepts), random weights, so a whole demo runs in seconds of compute."""
    from jaxattrib.train import base_model as bm
    info = bm.base_model_info()
    return make_pixel_pipeline(root, image_size=int(info["data_spec"]["size"]),
                               name=name, extra=info)


def perturbed_copy(pipeline, root, *, seed: int = 1, scale: float = 0.02,
                   name: str = "perturbed") -> Path:
    """A copy of a pipeline folder whose UNet weights get ``scale`` x N(0, 1) noise (seeded):
    a stand-in for a fine-tuned (or another) model with the same architecture. Returns it."""
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file

    out = Path(root) / name
    shutil.copytree(pipeline, out)
    path = out / "unet" / "diffusion_pytorch_model.safetensors"
    rng = np.random.default_rng(seed)
    tensors = {k: (v + scale * rng.standard_normal(v.shape)).astype(v.dtype)
               for k, v in load_file(path).items()}
    save_file(tensors, path)
    return out


def make_tiny_tfds(data_dir, images, captions, *, labels=None, label_names=("a", "b")) -> str:
    """Prepares a tiny tfds data set in ``data_dir`` as array_record (no TensorFlow, nothing
    downloaded): ``images`` uint8 ``[N, H, W, 3]`` stored PNG-encoded (``tfds.features.Image``),
    ``captions`` as the text feature ``caption``, ``labels`` (default ``i % 2``) as a
    ``ClassLabel`` named ``label_names``. Returns its tfds name, ``'jaxattrib_stream_images'``
    (read it with ``tfds.builder(name, data_dir=data_dir)``)."""
    import numpy as np
    import tensorflow_datasets as tfds
    from PIL import Image

    images = np.asarray(images, np.uint8)
    labels = [i % 2 for i in range(len(images))] if labels is None else list(labels)

    class JaxattribStreamImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "caption": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=list(label_names))}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, (im, cap, lab) in enumerate(zip(images, captions, labels)):
                yield i, {"image": Image.fromarray(im), "caption": cap, "label": int(lab)}

    JaxattribStreamImages(data_dir=str(data_dir), file_format="array_record") \
        .download_and_prepare()
    return "jaxattrib_stream_images"
