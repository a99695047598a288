"""The text-to-image diffusion fine-tuning loss, built from the model ports.

Follows diffusers' ``train_text_to_image.py`` / ``train_dreambooth.py``: images are encoded to
latents by the VAE (a posterior sample, times ``scaling_factor``), a timestep ``t ~ U{0..T-1}``
and Gaussian noise are drawn per example, ``x_t = add_noise(x0, noise, t)``, the UNet
conditioned on the CLIP text states predicts the schedule's training target (noise,
velocity or x0) and the loss is the per-example mean squared error. DreamBooth prior
preservation weights the class-prior examples by ``prior_loss_weight``.

[design] Ours:

* Per-example randomness is a pure function of the step key and the example's position
  ``j`` in the global batch: ``k_j = fold_in(key, j)``; timestep from ``fold_in(k_j, 0)``,
  noise from ``fold_in(k_j, 1)``, VAE posterior sample from ``fold_in(k_j, 2)``. It therefore
  does not depend on how the batch is sharded, and the trajectory record regenerates it from
  the logged key (``loss_fn.describe_step`` logs the timesteps; :func:`example_noise` gives the
  noise back).
* Prior preservation is a per-example weight (1 for instance images, ``prior_loss_weight``
  for ``batch['is_prior']``); the trainer averages over the batch, so with half/half batches
  the objective is ``(mean_instance + w * mean_prior) / 2`` — half of diffusers' sum.
* The VAE is never trained (latents are ``stop_gradient``-ed); the text encoder gets
  gradients only with ``train_text_encoder=True``. Without a ``vae_config`` the UNet works on
  pixels directly (``in_channels == 3``). Without a ``text_config`` the batch must carry
  ``encoder_hidden_states [B, L, D]``.
* No caption dropout for classifier-free guidance (add empty-caption examples to the data).
* Mixed precision (``precision='bfloat16'``): the UNet computes in bfloat16 (activations and
  matmul/conv operands) from the float32 parameters, which Flax casts per layer, so gradients
  (and hence the trainer's master weights and AdamW state) stay float32; the UNet output is
  cast to float32 before the loss. The VAE encoder and the text encoder stay float32 (frozen
  in the usual configs; small next to the UNet's forward + backward). ``remat`` checkpoints
  each UNet block (:mod:`jaxattrib.precision`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def example_keys(key: jax.Array, batch_size: int) -> jax.Array:
    """Per-example keys ``fold_in(key, j)`` for ``j < batch_size`` -> ``[B, 2]`` (uint32)."""
    return jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(batch_size))


def example_timesteps(key: jax.Array, batch_size: int, num_train_timesteps: int) -> jax.Array:
    """Training timesteps ``int32 [B]``, uniform on ``{0..T-1}``, of the update with ``key``."""
    return jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 0), (), 0,
                                                 num_train_timesteps))(
        example_keys(key, batch_size)).astype(jnp.int32)


def example_noise(key: jax.Array, batch_size: int, shape, dtype=jnp.float32) -> jax.Array:
    """Noise ``[B, *shape]`` (``shape`` = one latent, ``(h, w, c)``) of the update with ``key``."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), tuple(shape), dtype))(
        example_keys(key, batch_size))


def make_diffusion_loss(unet_config, text_config, schedule, vae_config=None,
                        train_text_encoder: bool = False, prior_loss_weight: float = 1.0,
                        text_layer: str = "last",
                        sample_posterior: bool = True, precision: str = "float32",
                        remat: bool | str = "none") -> Callable[..., jax.Array]:
    """``loss_fn(params, batch, key) -> per-example loss [B]`` for :func:`finetune.finetune`.

    Args:
      unet_config: ``jaxattrib.models.unet.UNetConfig``.
      text_config: ``jaxattrib.models.clip_text.CLIPTextConfig`` or None (then ``batch`` has
        ``encoder_hidden_states``).
      schedule: ``jaxattrib.diffusion.schedule.Schedule`` (its ``prediction_type`` sets the
        target).
      vae_config: ``jaxattrib.models.vae.VAEConfig`` or None (pixel-space UNet).
      train_text_encoder: let gradients reach ``params['text_encoder']``.
      prior_loss_weight: weight of examples with ``batch['is_prior']`` true.
      text_layer: ``'last'`` or ``'penultimate'`` (clip skip) hidden states.
      sample_posterior: VAE posterior sample (diffusers' ``latent_dist.sample()``) or mean.
      precision: UNet compute dtype, 'float32' | 'bfloat16' (parameters stay float32).
      remat: UNet block rematerialization, 'none' | 'full' | a ``jax.checkpoint_policies``
        name (see :mod:`jaxattrib.precision`).

    ``params``: ``{'unet': ..., 'text_encoder': ... (if text_config), 'vae': ... (if
    vae_config)}``. ``batch``: ``images [B, H, W, 3]`` in [-1, 1] (NHWC), ``input_ids [B, L]``
    int32, optional ``is_prior [B]`` bool. The returned function has an attribute
    ``describe_step(key, batch_size) -> {'timesteps': int32 [B]}`` for the record, and
    ``precision`` / ``remat`` (checked against the ``TrainConfig`` by ``finetune``).
    """
    from jaxattrib.diffusion.losses import dsm_loss
    from jaxattrib.diffusion.schedule import add_noise
    from jaxattrib.models.unet import UNet2DConditionModel
    from jaxattrib.precision import unet_kwargs

    unet_kw = unet_kwargs(precision, remat)
    unet = UNet2DConditionModel(unet_config, **unet_kw)
    T = schedule.num_train_timesteps

    def latents(params, images, keys):
        if vae_config is None:
            return images
        from jaxattrib.models.vae import encode_latents
        if sample_posterior:
            z = jax.vmap(lambda x, k: encode_latents(params["vae"], vae_config, x[None],
                                                     jax.random.fold_in(k, 2))[0])(images, keys)
        else:
            z = encode_latents(params["vae"], vae_config, images, None)
        return jax.lax.stop_gradient(z)

    def text_states(params, batch):
        if text_config is None:
            return batch["encoder_hidden_states"]
        from jaxattrib.models.clip_text import encode_text
        ctx = encode_text(params["text_encoder"], text_config, batch["input_ids"],
                          layer=text_layer)
        return ctx if train_text_encoder else jax.lax.stop_gradient(ctx)

    def loss_fn(params: Any, batch: dict, key: jax.Array) -> jax.Array:
        images = batch["images"]
        b = images.shape[0]
        keys = example_keys(key, b)
        x0 = latents(params, images, keys)
        t = example_timesteps(key, b, T)
        noise = example_noise(key, b, x0.shape[1:], x0.dtype)
        x_t = add_noise(schedule, x0, noise, t)
        out = unet.apply({"params": params["unet"]}, x_t, t, text_states(params, batch))
        per = dsm_loss(schedule, out.astype(jnp.float32), x0, noise, t)
        if "is_prior" in batch:
            per = per * jnp.where(jnp.asarray(batch["is_prior"]), prior_loss_weight, 1.0)
        return per

    def describe_step(key: jax.Array, batch_size: int) -> dict:
        return {"timesteps": example_timesteps(key, batch_size, T)}

    loss_fn.describe_step = describe_step
    loss_fn.precision, loss_fn.remat = precision, unet_kw["remat"]
    return loss_fn
