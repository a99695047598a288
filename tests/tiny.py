"""Tiny models and pipelines shared by the tests (one home; import from here).

* :func:`make_latent_pipeline`: a tiny Stable-Diffusion-shaped **latent** pipeline (AutoencoderKL
  + UNet2DConditionModel + CLIPTextModel + word-level CLIPTokenizer + DDIM scheduler), written by
  diffusers/transformers themselves (``StableDiffusionPipeline.save_pretrained``, safetensors),
  with the synthetic concept vocabulary so the package's synthetic captions tokenize. Images are
  ``image_size`` px; the VAE downsamples by 2 (two encoder blocks), so latents are
  ``image_size / 2`` squared x 4 channels.
  :func:`make_sd_pipeline` is its variant for the diffusers parity tests (other widths/words).
* :func:`make_pixel_pipeline`: the same without a VAE (pixel space, 3 channels), written by our
  own writer (:func:`jaxattrib.train.base_model.save_pipeline`); :func:`make_pixel_base_model`
  and :func:`make_small_base_model` stand in for the embedded base model; :func:`perturbed_copy`
  is another model of the same architecture. Configs: :func:`text_config`,
  :func:`pixel_unet_config`.
* In memory: :func:`tiny_diffusion` (UNet + text encoder [+ VAE] configs and params),
  :func:`concept_unet` / :func:`word_encoder` (Concept-TRAK), :func:`gmm_toy_models` (analytic
  Gaussian-mixture denoisers for CGI-DM), :data:`TOY_TRAINING` (a toy fine-tuning problem).
* Data: :func:`write_pngs`, :func:`make_tiny_tfds`.

The session fixtures ``tiny_latent_pipeline`` / ``tiny_pixel_pipeline`` / ``tiny_pipeline_dir``
/ ``tiny_base_model`` in ``conftest.py`` build each once per test session (per xdist worker) and
return the folder; copy it before modifying. Test files import helpers from here (or
``bad_inputs.py`` / ``faults.py``), never from each other.
"""

from __future__ import annotations

import functools
import textwrap
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
                         seed: int = 0, name: str = "latent_pipe", words=None,
                         unet_channels=(16, 32), vae_channels=(8, 16),
                         hidden_act: str = "quick_gelu", pad_token: str | None = None,
                         return_pipe: bool = False):
    """Writes a tiny random latent SD pipeline with diffusers/transformers to ``root/name``.

    ``image_size`` px images (a multiple of 4), latents ``image_size // 2`` px x 4 channels;
    ``prediction_type`` 'epsilon' (SD-1.5-like) or 'v_prediction' (SD-2.1-like). Deterministic
    in ``seed``. ``words``: the tokenizer's vocabulary (default: the synthetic-concept words);
    ``unet_channels`` / ``vae_channels``: the two levels' widths; ``hidden_act`` of the text
    encoder; ``pad_token`` of the tokenizer (default its EOS). Returns the pipeline folder, or
    ``(folder, the diffusers pipeline object)`` with ``return_pipe``."""
    import diffusers
    import torch
    import transformers

    from jaxattrib.models.tokenizer import build_word_tokenizer

    root = Path(root)
    tok_dir = build_word_tokenizer(_words() if words is None else list(words),
                                   root / f"{name}_tok", model_max_length=MAX_LEN,
                                   **({} if pad_token is None else {"pad_token": pad_token}))
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(seed)
    text_encoder = _randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_LEN,
        hidden_act=hidden_act, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)), seed + 1)
    unet = _randomize(diffusers.UNet2DConditionModel(
        sample_size=image_size // LATENT_FACTOR, in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=tuple(unet_channels),
        layers_per_block=1, cross_attention_dim=TEXT_HIDDEN, attention_head_dim=4,
        norm_num_groups=8), seed + 2)
    vae = _randomize(diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=tuple(vae_channels),
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
    return (out, pipe) if return_pipe else out


def text_config(vocab_size: int, max_length: int = 8):
    """The 1-layer, 16-wide CLIP text encoder config of the tiny pixel pipelines: ``vocab_size``
    tokens (the last two are BOS/EOS, no pad token), ``max_length`` positions."""
    from jaxattrib.models import clip_text
    return clip_text.CLIPTextConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    max_position_embeddings=max_length, pad_token_id=None,
                                    bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                                    projection_dim=16)


def pixel_unet_config(image_size: int = 8, **overrides):
    """The tiny pixel-space UNet config (3 channels in and out): 2 levels, 8/16 channels,
    cross-attention 16 at full resolution, 2-dim heads; ``overrides`` replace fields of
    :func:`jaxattrib.models.unet.tiny_config`."""
    from jaxattrib.models import unet
    return unet.tiny_config(**{**dict(block_out_channels=(8, 16), cross_attention_dim=16,
                                      norm_num_groups=4, sample_size=image_size, in_channels=3,
                                      out_channels=3, attention_head_dim=2), **overrides})


SD_WORDS = ["a", "photo", "of", "sks", "dog", "cat", "painting", "in", "the", "style"]


def make_sd_pipeline(root, *, pad_token: str = "<|endoftext|>", hidden_act: str = "quick_gelu",
                     return_pipe: bool = False):
    """The tiny SD pipeline of the diffusers parity tests (``tests/test_pipeline.py``), saved to
    ``root/pipe``: :func:`make_latent_pipeline` with the :data:`SD_WORDS` vocabulary, UNet
    widths 32/64, VAE widths 16/32, 16-px images. Returns the folder (and the diffusers pipeline
    with ``return_pipe``)."""
    return make_latent_pipeline(root, image_size=16, name="pipe", words=SD_WORDS,
                                unet_channels=(32, 64), vae_channels=(16, 32),
                                hidden_act=hidden_act, pad_token=pad_token,
                                return_pipe=return_pipe)


def make_pixel_pipeline(root, *, image_size: int = 8, seed: int = 0,
                        name: str = "pixel_pipe", extra: dict | None = None,
                        unet_overrides: dict | None = None, words=None, max_length: int = 8,
                        noise: float = 0.05, zero_weights: bool = False) -> Path:
    """Writes a tiny random pixel-space pipeline (no VAE) with our own writer; returns it.
    ``extra``: the ``jaxattrib_base.json`` to write (default ``{"note": "test"}``).
    ``unet_overrides``: fields of :func:`pixel_unet_config` to replace. ``words``: the
    tokenizer's vocabulary (default: the synthetic-concept words); ``max_length``: the
    tokenizer's and text encoder's length. The UNet's initial weights get ``noise`` x N(0, 1)
    (so its output layer is not zero and generations depend on the prompt; 0: none).
    ``zero_weights``: all weights zero, their shapes found by tracing only (no init compiled:
    for tests that only load or check configs)."""
    import jax

    from jaxattrib.train import base_model as bm
    from jaxattrib.models import clip_text, unet
    from jaxattrib.models.tokenizer import CLIPTokenizer, build_word_tokenizer

    root = Path(root)
    tok = build_word_tokenizer(_words() if words is None else list(words), root / f"{name}_tok",
                               model_max_length=max_length)
    vocab = CLIPTokenizer.from_folder(tok).vocab_size
    t = text_config(vocab, max_length)
    u = pixel_unet_config(image_size, **(unet_overrides or {}))
    key = jax.random.PRNGKey(seed)
    if zero_weights:
        import numpy as np

        def zeros(init, cfg):
            return jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype),
                                          jax.eval_shape(lambda: init(cfg, key)))
        up, tp = zeros(unet.init_params, u), zeros(clip_text.init_params, t)
    else:
        # jitted init and draws, float32 arithmetic in numpy: bit-identical to the eager
        # ``a + noise * jax.random.normal(key, a.shape)`` (checked 2026-12-07), without
        # compiling each of the UNet's ops one by one
        import numpy as np
        up = unet.init_params(u, key)   # jitted inside
        if noise:
            normal = jax.jit(jax.random.normal, static_argnums=1)
            up = jax.tree_util.tree_map(
                lambda a: np.asarray(a) + np.float32(noise) * np.asarray(normal(key, a.shape)),
                up)
        tp = jax.jit(clip_text.init_params, static_argnums=0)(t, jax.random.fold_in(key, 1))
    return bm.save_pipeline(root / name, u, up, t, tp, tok, bm.SCHEDULER_CONFIG,
                            {"note": "test"} if extra is None else extra)


def make_pixel_base_model(root, *, name: str = "pixel_base", size: int = 16) -> Path:
    """A tiny pixel pipeline standing in for the embedded base model (``demo --set
    base_model=...``): ``size``-px images and the embedded model's data spec (vocabularies,
    backgrounds) and held-out concepts, random weights, so a whole demo runs in seconds of
    compute. (The embedded model is a 32-px latent pipeline; the stand-in stays 16-px pixel
    space for speed.)"""
    from jaxattrib.train import base_model as bm
    info = bm.base_model_info()
    info = {"data_spec": dict(info["data_spec"], size=size), "held_out": info["held_out"],
            "note": "test stand-in for the embedded base model"}
    words = bm.vocabulary(bm.spec_from_info(info)) + ["sks", "photo", "of", "dog", "cat"]
    return make_pixel_pipeline(root, image_size=size, name=name, extra=info, words=words)


def make_small_base_model(root, *, name: str = "pipe") -> Path:
    """A tiny 16-px pixel pipeline standing in for the embedded base model in benchmark runs:
    the base model's vocabulary and data spec with 2 images per combination, its first 2
    held-out concepts, 10-token prompts, unperturbed random weights."""
    import dataclasses

    from jaxattrib.train import base_model as bm
    spec = dataclasses.replace(bm.data_spec(), per_combination=2)
    extra = {"data_spec": dataclasses.asdict(spec), "held_out": list(bm.HELD_OUT[:2])}
    return make_pixel_pipeline(root, image_size=16, name=name, extra=extra,
                               words=bm.vocabulary(spec), max_length=10, noise=0.0)


def write_pngs(folder, n: int, seed: int, size: int = 8) -> Path:
    """Writes ``n`` random ``size`` px RGB PNGs (``000.png``, ...; seeded) into ``folder``."""
    import numpy as np
    from PIL import Image
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    for i in range(n):
        Image.fromarray(rng.randint(0, 256, (size, size, 3), np.uint8)).save(
            folder / f"{i:03d}.png")
    return folder


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


# ----------------------------------------------------------------------------- in-memory models

def tiny_diffusion_configs(vae: bool = True, blocks=(16, 32)):
    """(UNet, CLIP text, VAE or None) configs of a tiny in-memory diffusion model: an 8-px UNet
    with ``blocks`` widths and cross-attention 16 (4 latent channels with ``vae``, else 3 pixel
    channels), a 1-layer 16-wide text encoder (64 tokens, 8 positions), a 16-px 2-level VAE."""
    from jaxattrib.models import clip_text, unet, vae as vae_lib
    ucfg = unet.tiny_config(block_out_channels=blocks, cross_attention_dim=16,
                            norm_num_groups=8, sample_size=8,
                            **({} if vae else {"in_channels": 3, "out_channels": 3}))
    tcfg = clip_text.CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    max_position_embeddings=8, projection_dim=None,
                                    pad_token_id=0, bos_token_id=62, eos_token_id=63)
    vcfg = vae_lib.tiny_config(block_out_channels=(8, 16), norm_num_groups=4,
                               sample_size=16) if vae else None
    return ucfg, tcfg, vcfg


def tiny_diffusion(vae: bool = True, blocks=(16, 32), sched=None):
    """:func:`tiny_diffusion_configs` with random weights (PRNGKey(0)): (ucfg, tcfg, vcfg,
    sched, params) with params ``{"unet", "text_encoder"[, "vae"]}``; ``sched`` default a
    100-step scaled-linear schedule (SD's betas)."""
    import jax

    from jaxattrib.diffusion.schedule import make_schedule
    from jaxattrib.models import clip_text, unet, vae as vae_lib
    ucfg, tcfg, vcfg = tiny_diffusion_configs(vae, blocks)
    k = jax.random.PRNGKey(0)
    params = {"unet": jax.jit(unet.init_params, static_argnums=0)(ucfg, jax.random.fold_in(k, 0)),
              "text_encoder": jax.jit(clip_text.init_params, static_argnums=(0, 2))(
                  tcfg, jax.random.fold_in(k, 1), 8)}
    if vae:
        params["vae"] = jax.jit(vae_lib.init_params, static_argnums=0)(
            vcfg, jax.random.fold_in(k, 2))
    if sched is None:
        sched = make_schedule(100, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012)
    return ucfg, tcfg, vcfg, sched, params


# ----------------------------------------------------------------------------- analytic stand-ins

def gmm_eps_fn(sched, means, variances, weights):
    """Optimal epsilon-denoiser for a mixture of isotropic Gaussians N(mu_c, v_c I).

    means [K, H, W, C], variances [K], weights [K] (sum 1). x_t [B,H,W,C], t [B] -> eps_hat.
    """
    import jax
    import jax.numpy as jnp
    means = jnp.asarray(means)
    v = jnp.asarray(variances)
    logw = jnp.log(jnp.asarray(weights))
    d = means[0].size

    def eps(x_t, t, cond=None):
        a = sched.alphas_cumprod[t][:, None]  # [B, 1]
        x = x_t.reshape(x_t.shape[0], -1)
        mu = means.reshape(means.shape[0], -1)
        s2 = a * v[None] + 1 - a  # [B, K] marginal variances of x_t
        r = x[:, None, :] - jnp.sqrt(a)[..., None] * mu[None]  # [B, K, D]
        logp = logw[None] - 0.5 * jnp.sum(r * r, -1) / s2 - 0.5 * d * jnp.log(s2)
        w = jax.nn.softmax(logp, axis=-1)
        x0_c = mu[None] + (jnp.sqrt(a) * v[None] / s2)[..., None] * r
        x0 = jnp.sum(w[..., None] * x0_c, axis=1)
        e = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
        return e.reshape(x_t.shape)

    return eps


GMM_SIG_P, GMM_SIG_M = 0.5, 0.05  # broad pretrained prior; narrow member components


def gmm_toy_models(members, pi=0.5, *, sched=None):
    """Analytic (pretrained, fine-tuned) epsilon-denoisers for CGI-DM tests: the pretrained
    model is the prior N(0, GMM_SIG_P² I); the fine-tuned one mixes it (weight 1 - ``pi``) with
    narrow components N(member, GMM_SIG_M² I) around each of ``members`` [K, H, W, C].
    ``sched``: the noise schedule (default ``make_schedule(1000)``)."""
    import jax.numpy as jnp

    from jaxattrib.diffusion.schedule import make_schedule
    sched = make_schedule(1000) if sched is None else sched
    k = members.shape[0]
    pre = gmm_eps_fn(sched, jnp.zeros((1,) + members.shape[1:]), jnp.array([GMM_SIG_P ** 2]),
                     jnp.array([1.0]))
    means = jnp.concatenate([jnp.zeros((1,) + members.shape[1:]), members])
    var = jnp.r_[GMM_SIG_P ** 2, jnp.full((k,), GMM_SIG_M ** 2)]
    w = jnp.r_[1 - pi, jnp.full((k,), pi / k)]
    return pre, gmm_eps_fn(sched, means, var, w)


CONCEPT_L, CONCEPT_D_CTX = 6, 16  # prompt tokens and context width of concept_unet's tests


@functools.lru_cache(maxsize=None)
def concept_unet(dtype=None, seed=0):
    """Tiny UNet (one cross-attention down/up block, 8 px, context width CONCEPT_D_CTX), jitted
    init and apply (Concept-TRAK's ``unet_model_fn``), cached: (config, params, model_fn).
    ``dtype`` default float32."""
    import jax
    import jax.numpy as jnp

    from jaxattrib.attribution import concept_trak as ct
    from jaxattrib.models import unet
    dtype = jnp.float32 if dtype is None else dtype
    cfg = unet.tiny_config(sample_size=8, in_channels=3, out_channels=3,
                           cross_attention_dim=CONCEPT_D_CTX, block_out_channels=(8,),
                           norm_num_groups=4)
    params = jax.jit(functools.partial(unet.init_params, cfg))(jax.random.PRNGKey(seed))
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
    return cfg, params, jax.jit(ct.unet_model_fn(cfg, dtype))


def word_encoder(seed=0, dtype=None):
    """Fake text encoder: one fixed random vector per word, padded with zeros to CONCEPT_L
    tokens of width CONCEPT_D_CTX. ``dtype`` default float32."""
    import numpy as np
    dtype = np.float32 if dtype is None else dtype
    table = {}
    rng = np.random.default_rng(seed)

    def encode(prompts):
        out = np.zeros((len(prompts), CONCEPT_L, CONCEPT_D_CTX), dtype)
        for i, p in enumerate(prompts):
            for j, w in enumerate(p.split()[:CONCEPT_L]):
                if w not in table:
                    table[w] = rng.standard_normal(CONCEPT_D_CTX)
                out[i, j] = table[w]
        return out

    return encode


# ----------------------------------------------------------------------------- toy training

# A tiny Flax MLP on random regression data (source text, so subprocess scripts can run it
# verbatim); its per-example loss uses per-example noise from ``fold_in(key, position)`` so the
# step key matters and is replayed. ``exec`` defines MLP, N, X, Y, init_params, loss_fn,
# describe_step, get_batch.
TOY_TRAINING = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = jnp.tanh(nn.Dense(16, name="to_q")(x))
            return nn.Dense(2, name="to_out_0")(h)

    N = 40
    _rng = np.random.default_rng(0)
    X = _rng.normal(size=(N, 4)).astype(np.float32)
    Y = np.sin(X[:, :2] * 1.5).astype(np.float32)
    MODEL = MLP()

    def init_params():
        return {"net": {"attn1": MODEL.init(jax.random.PRNGKey(42), X[:1])["params"]},
                "vae": {"scale": jnp.ones((3,), jnp.float32)}}

    def loss_fn(params, batch, key):
        b = batch["x"].shape[0]
        noise = jax.vmap(lambda j: jax.random.normal(jax.random.fold_in(key, j), (4,)))(
            jnp.arange(b))
        pred = MODEL.apply({"params": params["net"]["attn1"]}, batch["x"] + 0.05 * noise)
        return jnp.sum((pred - batch["y"]) ** 2, -1) * params["vae"]["scale"][0]

    def describe_step(key, batch_size):
        # a task field: one "timestep" per example from fold_in(key, position)
        return {"timesteps": jax.vmap(lambda j: jax.random.randint(
            jax.random.fold_in(key, j), (), 0, 1000))(jnp.arange(batch_size))}

    def get_batch(idx):
        return {"x": X[idx], "y": Y[idx]}
""")


def toy_training():
    """The names :data:`TOY_TRAINING` defines (N, X, Y, init_params, loss_fn, describe_step,
    get_batch, ...), as attributes."""
    import types
    ns = {}
    exec(TOY_TRAINING, ns)
    return types.SimpleNamespace(**{k: v for k, v in ns.items() if not k.startswith("__")})


def toy_train_config(**kw):
    """The fine-tuning config of the toy training problem, fields ``kw`` replaced."""
    from jaxattrib.train.finetune import TrainConfig
    base = dict(steps=10, batch_size=8, learning_rate=2e-2, schedule="cosine", warmup_steps=2,
                checkpoint_every=4, seed=3, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


def leaves(tree):
    """The leaves of a parameter tree as numpy arrays."""
    import jax
    import numpy as np
    return [np.asarray(x) for x in jax.tree.leaves(tree)]
