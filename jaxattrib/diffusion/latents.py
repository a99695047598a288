"""The diffusion model's ``x_0`` for an image: pure functions shared by fine-tuning and attribution.

A latent pipeline (one with a VAE) diffuses in the VAE's latent space; a pixel pipeline in
pixel space. :func:`encode_images` maps pixel images to the UNet's ``x_0``, identically for
training images and query images, and :func:`check_model_input` refuses arrays of the wrong
space or size with one :class:`~jaxattrib.config.ConfigError` naming the field and both shapes.

The latent rule [design] (:data:`LATENT_RULE` = ``'mean'``): ``x_0 = (μ(x) − shift) ·
scaling_factor``, the VAE posterior **mean** (diffusers' ``latent_dist.mode()``), computed once
per image. Why:

* It is what D-TRAK's SD experiments featurize with [code: sail-sg/D-TRAK
  ``ArtBench2/grad_text_to_image_lora.py``, ``vae.encode(...).latent_dist.mode() *
  scaling_factor``], and it is deterministic, so cached latents and features never depend on a
  key.
* ``jaxattrib train`` fine-tunes latent pipelines on the same posterior mean
  (``make_diffusion_loss(..., sample_posterior=False)``, recorded as ``vae_latents: 'mean'`` in
  the record manifest's ``model`` section), so the training objective and the attribution's
  output function see exactly the same ``x_0``. Records made before this rule (no
  ``vae_latents`` in the manifest) were trained on a fresh posterior sample per update
  (diffusers' ``train_text_to_image`` behaviour); they keep doing so when resumed, and are
  attributed with the mean — the expectation of what they were trained on (the SD VAE's
  posterior standard deviation is small against its mean).

Shapes: images ``[B, H, W, 3]`` float in [-1, 1] (NHWC); latents ``[B, H/f, W/f, C]`` with
``f = 2 ** (len(vae.block_out_channels) - 1)`` (8 for SD, 2 for the tiny test pipeline).
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxattrib.config import ConfigError

LATENT_RULE = "mean"


def vae_factor(vae_config) -> int:
    """Spatial down-sampling of the VAE (1 for a pixel pipeline, ``vae_config=None``)."""
    return 1 if vae_config is None else 2 ** (len(vae_config.block_out_channels) - 1)


def sample_shape(unet_config) -> tuple[int, int, int]:
    """``(h, w, c)`` of one UNet input (the diffusion model's ``x_0``)."""
    s = unet_config.sample_size
    h, w = (s, s) if isinstance(s, int) else tuple(s)
    return (int(h), int(w), int(unet_config.in_channels))


def pixel_shape(unet_config, vae_config) -> tuple[int, int, int]:
    """``(H, W, 3)`` of the pixel images the pipeline takes and generates."""
    h, w, c = sample_shape(unet_config)
    f = vae_factor(vae_config)
    return (h * f, w * f, 3 if vae_config is not None else c)


def _shape_str(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def check_pixel_images(shape, unet_config, vae_config, field: str) -> None:
    """Refuses pixel images whose ``[.., H, W, C]`` is not what the pipeline takes.

    Raises :class:`ConfigError` naming ``field``, the given and the expected shape (and, for a
    latent pipeline, the latent shape and VAE factor behind it)."""
    want = pixel_shape(unet_config, vae_config)
    got = tuple(int(s) for s in shape[-3:])
    if got == want:
        return
    how = (f"the UNet takes {_shape_str(sample_shape(unet_config))} latents and the VAE "
           f"down-samples by {vae_factor(vae_config)}" if vae_config is not None else
           f"the pixel-space UNet takes {_shape_str(sample_shape(unet_config))} images")
    raise ConfigError(f"{field}: images are {_shape_str(got)} but the model expects "
                      f"{_shape_str(want)} pixel images ({how})")


def check_model_input(shape, unet_config, vae_config, field: str) -> None:
    """Refuses an array meant as the UNet's ``x_0`` (``[.., h, w, c]``) of another shape.

    The typical mistake, pixel images given where a latent pipeline expects latents, gets a
    message saying so. Raises :class:`ConfigError` naming ``field`` and both shapes."""
    want = sample_shape(unet_config)
    got = tuple(int(s) for s in shape[-3:])
    if got == want:
        return
    if vae_config is not None and got == pixel_shape(unet_config, vae_config):
        raise ConfigError(f"{field}: got pixel images {_shape_str(got)} where the latent "
                          f"pipeline expects VAE latents {_shape_str(want)} (encode them with "
                          f"jaxattrib.diffusion.latents.encode_images)")
    raise ConfigError(f"{field}: arrays are {_shape_str(got)} but the UNet takes "
                      f"{_shape_str(want)}" + (" latents" if vae_config is not None else
                                               " images"))


@functools.lru_cache(maxsize=8)
def _encoder(vae_config):
    from jaxattrib.models.vae import encode_latents
    return jax.jit(lambda params, x: encode_latents(params, vae_config, x, None))


def encode_images(vae_config, vae_params, images, *, batch_size: int = 16) -> np.ndarray:
    """Pixel images ``[B, H, W, 3]`` in [-1, 1] -> the UNet's ``x_0`` ``[B, h, w, c]`` float32.

    Latent pipelines: the VAE posterior mean times ``scaling_factor`` (:data:`LATENT_RULE`),
    in jitted batches of ``min(batch_size, B)`` (the last one padded, so one compile); pixel pipelines
    (``vae_config=None``): the images themselves. Pure (no files, no randomness)."""
    images = np.asarray(images, np.float32)
    if vae_config is None:
        return images
    fn = _encoder(vae_config)
    out = []
    b = max(1, min(batch_size, len(images)))
    for start in range(0, len(images), b):
        chunk = images[start:start + b]
        n = len(chunk)
        if n < b:
            chunk = np.concatenate([chunk, np.zeros((b - n,) + chunk.shape[1:], chunk.dtype)])
        out.append(np.asarray(fn(vae_params, jnp.asarray(chunk)))[:n])
    if not out:
        h, w, _ = images.shape[1:]
        f = vae_factor(vae_config)
        return np.zeros((0, h // f, w // f, vae_config.latent_channels), np.float32)
    return np.concatenate(out).astype(np.float32)


def decode_latents(vae_config, vae_params, x0) -> np.ndarray:
    """The UNet's ``x_0`` ``[B, h, w, c]`` -> pixel images ``[B, H, W, 3]`` (clipped to [-1, 1]):
    the VAE decoder for latent pipelines, the identity for pixel ones (for reports)."""
    x0 = np.asarray(x0, np.float32)
    if vae_config is None:
        return np.clip(x0, -1, 1)
    from jaxattrib.models.vae import decode_latents as dec
    return np.clip(np.asarray(dec(vae_params, vae_config, jnp.asarray(x0))), -1, 1)


def vae_fingerprint(vae_config, vae_params) -> str:
    """sha256 over the VAE config and every weight (shape, dtype, bytes; sorted paths): the key
    of cached latents. ``''`` for a pixel pipeline."""
    if vae_config is None:
        return ""
    import dataclasses
    import json
    h = hashlib.sha256(json.dumps(dataclasses.asdict(vae_config), sort_keys=True,
                                  default=str).encode())
    flat = jax.tree_util.tree_flatten_with_path(vae_params)[0]
    for path, leaf in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.shape}|{a.dtype.str}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def training_latent_rule(pipe, record_dir: str | Path, model_info: dict) -> tuple[dict, bool]:
    """``(model_info for the record manifest, sample_posterior)`` of a fine-tuning run [design].

    Latent pipelines (``pipe.is_latent``) train on the VAE posterior mean, the rule attribution
    encodes with (:data:`LATENT_RULE`), recorded as ``vae_latents: 'mean'`` with the VAE's
    fingerprint. A record made before this rule (manifest without ``vae_latents``) resumes as
    it was made: on posterior samples, with its manifest unchanged. Pixel pipelines: unchanged
    (``sample_posterior`` is then irrelevant). Used by ``jaxattrib train`` and DreamBooth.
    """
    if not pipe.is_latent:
        return model_info, True
    manifest = Path(record_dir) / "manifest.json"
    if manifest.is_file():
        stored = json.loads(manifest.read_text()).get("model", {})
        if "vae_latents" not in stored:
            return model_info, True
    return ({**model_info, "vae_latents": LATENT_RULE,
             "vae_fingerprint": vae_fingerprint(pipe.vae_config, pipe.vae_params)}, False)
