"""Model inputs of a pipeline: pixels for a pixel-space UNet, VAE latents for a latent one.

The methods' numerics take *model inputs* (``x_0`` of the diffusion): pixels ``[N, S, S, 3]`` in
[-1, 1] for a pixel-space UNet, scaled VAE latents ``[N, s, s, c]`` for a latent one (``s`` =
the UNet's ``sample_size``, ``c`` its ``in_channels``, ``S = s · f`` with ``f`` the VAE's
down-sampling factor). This module checks which one is given and
encodes / decodes between them, for the commands that take images (``cgi-dm``,
``source-model``, ``concept-query``) and for MONTRAGE.

* Shape checks raise :class:`ModelInputError` (a :class:`~jaxattrib.config.ConfigError`, so the
  CLI exits 2) on one line naming the field and both shapes.
* Encoding: each image once. :func:`encode_images` with ``key=None`` gives the posterior
  mean; with a ``key`` it draws one posterior sample per image ``i`` from ``fold_in(key,
  index_offset + i)`` — the same latent whatever the batching, reproducible from the recorded
  key. Each caller states its rule (docs/latent_methods.md): ``concept-query`` the mean (the
  project's rule for attributed latents), ``cgi-dm`` a sample by default (the authors' code).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxattrib.config import ConfigError

class ModelInputError(ConfigError):
    """Images of the wrong kind or size for a model: pixels where latents are expected, or a
    size that is not the UNet's sample size (× the VAE factor for pixels)."""


def sample_hw(unet_config) -> tuple[int, int] | None:
    """The UNet's ``sample_size`` as ``(h, w)`` (None when the config leaves it open)."""
    s = unet_config.sample_size
    if s is None:
        return None
    return (int(s), int(s)) if isinstance(s, (int, np.integer)) else (int(s[0]), int(s[1]))


def vae_factor(vae_config) -> int:
    """Spatial down-sampling of a VAE (``2 ** (len(block_out_channels) - 1)``); 1 if None."""
    return 1 if vae_config is None else 2 ** (len(vae_config.block_out_channels) - 1)


def pixel_size(unet_config, vae_config=None) -> int:
    """Pixel side of the pipeline's (square) images: UNet ``sample_size`` × the VAE factor."""
    return sample_hw(unet_config)[0] * vae_factor(vae_config)


def _fmt(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _what(unet_config, vae_config) -> str:
    hw, c = sample_hw(unet_config), int(unet_config.in_channels)
    h, w = ("H", "W") if hw is None else hw
    if vae_config is None:
        if c == 3:
            return f"pixel images [N, {h}, {w}, 3] (UNet sample_size {h}, pixel space)"
        return (f"model inputs [N, {h}, {w}, {c}] (UNet sample_size {h}, in_channels {c}: "
                f"VAE latents of a latent model, not its pixel images)")
    f = vae_factor(vae_config)
    ph, pw = ("H*f", "W*f") if hw is None else (h * f, w * f)
    return (f"VAE latents [N, {h}, {w}, {c}] (UNet sample_size {h}; pixel images [N, {ph}, "
            f"{pw}, 3] = sample_size x VAE factor {f} are VAE-encoded first)")


def check_model_inputs(x, unet_config, field: str, vae_config=None) -> None:
    """Raises :class:`ModelInputError` unless ``x`` is ``[N, h, w, c]`` model inputs (the UNet's
    ``sample_size`` (h, w) — any size when it is None — and ``in_channels`` c).
    ``vae_config`` only improves the message (it says how pixels become latents). ``field``
    names the argument / config field / file."""
    shape = tuple(np.shape(x))
    hw, c = sample_hw(unet_config), int(unet_config.in_channels)
    if len(shape) != 4 or shape[-1] != c or (hw is not None and shape[1:3] != hw):
        got = ""
        if c != 3 and len(shape) == 4 and shape[-1] == 3:
            got = " (pixel images? encode them with the VAE first)"
        raise ModelInputError(f"{field}: got shape {_fmt(shape)}{got}; the model expects "
                              f"{_what(unet_config, vae_config)}")


def check_pixel_images(x, unet_config, vae_config, field: str) -> None:
    """Raises :class:`ModelInputError` unless ``x`` is pixel images ``[N, S, S, 3]`` with ``S`` =
    UNet ``sample_size`` × VAE factor (``[N, s, s, in_channels]`` for a pixel-space UNet)."""
    shape = tuple(np.shape(x))
    size = pixel_size(unet_config, vae_config)
    ch = 3 if vae_config is not None else int(unet_config.in_channels)
    if len(shape) != 4 or shape[1:] != (size, size, ch):
        s, f = sample_hw(unet_config)[0], vae_factor(vae_config)
        how = (f"UNet sample_size {s} x VAE factor {f}" if vae_config is not None
               else f"UNet sample_size {s}, pixel space")
        raise ModelInputError(f"{field}: got images of shape {_fmt(shape)}; the model expects "
                              f"pixel images [N, {size}, {size}, {ch}] ({how})")


def check_image_size(size: int, unet_config, vae_config, field: str = "data.size") -> None:
    """Raises :class:`ModelInputError` unless the pixel side ``size`` is UNet ``sample_size`` ×
    VAE factor (the message gives both image shapes and the latent shape)."""
    want = pixel_size(unet_config, vae_config)
    if int(size) != want:
        s, c, f = sample_hw(unet_config)[0], int(unet_config.in_channels), \
            vae_factor(vae_config)
        lat = (f" = UNet sample_size {s} x VAE factor {f} (latents [{s}, {s}, {c}])"
               if vae_config is not None else f" (UNet sample_size {s}, pixel space)")
        raise ModelInputError(f"{field}={size}: images would be [{size}, {size}, 3]; the model "
                              f"works on [{want}, {want}, 3] images{lat}; set {field}={want} "
                              f"or 0")


@functools.lru_cache(maxsize=8)
def jitted_encoder(vae_config, sample: bool):
    """A jitted ``enc(vae_params, x[B,H,W,3], keys[B,2]) -> latents [B,H/f,W/f,c]``: one
    posterior sample per row from its key (``sample``), else the mean (keys unused)."""
    from jaxattrib.models.vae import encode_latents

    @jax.jit
    def enc(params, x, keys):
        if not sample:
            return encode_latents(params, vae_config, x, None)
        return jax.vmap(lambda xi, k: encode_latents(params, vae_config, xi[None], k)[0])(x, keys)
    return enc


@functools.lru_cache(maxsize=8)
def _decode_fn(vae_config):
    from jaxattrib.models.vae import decode_latents
    return jax.jit(lambda params, z: decode_latents(params, vae_config, z))


def image_keys(key: jax.Array, n: int, offset: int = 0) -> jax.Array:
    """Per-image keys ``fold_in(key, offset + i)`` for ``i < n`` -> ``[n, 2]``."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(offset, offset + n))


def encode_images(vae_params: Any, vae_config, images, *, key: jax.Array | None = None,
                  index_offset: int = 0, batch_size: int = 16) -> np.ndarray:
    """Pixels ``[N, H, W, 3]`` in [-1, 1] -> scaled VAE latents ``float32 [N, H/f, W/f, c]``.

    ``key``: one posterior sample per image ``i`` from ``fold_in(key, index_offset + i)``
    (independent of ``batch_size``); ``None``: the posterior mean. Batches are padded to
    ``batch_size`` (one compiled shape)."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ModelInputError(f"encode_images: expected pixel images [N, H, W, 3]; got shape "
                              f"{_fmt(images.shape)}")
    n = images.shape[0]
    fn = jitted_encoder(vae_config, key is not None)
    keys = (image_keys(key, n, index_offset) if key is not None
            else jnp.zeros((n, 2), jnp.uint32))
    out = []
    for lo in range(0, n, batch_size):
        x, k = images[lo:lo + batch_size], keys[lo:lo + batch_size]
        m = x.shape[0]
        if m < batch_size and n > batch_size:
            x = np.concatenate([x, np.repeat(x[-1:], batch_size - m, 0)])
            k = jnp.concatenate([k, jnp.repeat(k[-1:], batch_size - m, 0)])
        out.append(np.asarray(fn(vae_params, jnp.asarray(x), k))[:m])
    if not out:
        f = vae_factor(vae_config)
        return np.zeros((0, images.shape[1] // f, images.shape[2] // f,
                         vae_config.latent_channels), np.float32)
    return np.concatenate(out).astype(np.float32)


def decode_images(vae_params: Any, vae_config, latents, *, batch_size: int = 16) -> np.ndarray:
    """Scaled latents ``[N, h, w, c]`` -> pixels ``float32 [N, h·f, w·f, 3]`` (about [-1, 1],
    unclipped), in batches."""
    z = np.asarray(latents, np.float32)
    fn = _decode_fn(vae_config)
    return np.concatenate([np.asarray(fn(vae_params, jnp.asarray(z[lo:lo + batch_size])))
                           for lo in range(0, z.shape[0], batch_size)]).astype(np.float32)


def pipeline_inputs(pipe, images, field: str, *, key: jax.Array | None = None,
                    index_offset: int = 0, batch_size: int = 16) -> np.ndarray:
    """Pixel images -> the pipeline's model inputs: checked (:func:`check_pixel_images`), then
    VAE-encoded (:func:`encode_images` with ``key``) for a latent pipeline; returned as given
    for a pixel one."""
    check_pixel_images(images, pipe.unet_config, pipe.vae_config, field)
    if pipe.vae_config is None:
        return np.asarray(images, np.float32)
    return encode_images(pipe.vae_params, pipe.vae_config, images, key=key,
                         index_offset=index_offset, batch_size=batch_size)


def pipeline_pixels(pipe, x, *, batch_size: int = 16) -> np.ndarray:
    """Model inputs -> pixels: decoded by the VAE for a latent pipeline, unchanged otherwise."""
    if pipe.vae_config is None:
        return np.asarray(x, np.float32)
    return decode_images(pipe.vae_params, pipe.vae_config, x, batch_size=batch_size)


def vae_codec(pipe, sample: bool = False):
    """``(encode, decode)`` between pixels and a latent pipeline's model inputs, as
    :func:`jaxattrib.authentication.cgi_dm.recover` takes them (PGD on the latent [code]); ``(None,
    None)`` for a pixel pipeline (identity maps).

    ``encode(x[B, H, W, 3]) -> [B, h, w, c]``: the posterior mean; with ``sample``,
    ``encode(x, keys[B, 2])`` draws one posterior sample per row from its key (pass recover's
    ``encode_key``). ``decode(z[B, h, w, c]) -> [B, H, W, 3]`` pixels (unclipped). Both jitted.
    Used by ``jaxattrib cgi-dm`` and the demo's CGI-DM stage."""
    if pipe.vae_config is None:
        return None, None
    from jaxattrib.models.vae import decode_latents
    enc = jitted_encoder(pipe.vae_config, sample)
    vp = pipe.vae_params
    encode = ((lambda x, keys: enc(vp, x, keys)) if sample
              else (lambda x: enc(vp, x, jnp.zeros((x.shape[0], 2), jnp.uint32))))
    decode = jax.jit(lambda z: decode_latents(vp, pipe.vae_config, z))
    return encode, decode


def encoding_note(key_desc: str | None) -> str:
    """How inputs were encoded, for reports: ``key_desc`` names the key, None = the mean."""
    return ("VAE posterior mean" if key_desc is None
            else f"VAE posterior sample, one per image from fold_in({key_desc}, image index)")
