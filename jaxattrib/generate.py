"""Text-to-image generation with a loaded pipeline: prompts in, images (and trajectories) out.

Pure at the core: :func:`make_eps_fn` closes a UNet over its params, :func:`generate` runs the
sampler of :mod:`jaxattrib.diffusion.sampling` with classifier-free guidance (empty-prompt
unconditional branch, as diffusers' ``StableDiffusionPipeline``) and decodes VAE latents for
latent models. Writing PNGs is left to the CLI (:func:`save_images`).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxattrib.diffusion import sampling
from jaxattrib.fileio import atomic_write_text
from jaxattrib.diffusion.schedule import Schedule, schedule_from_diffusers_config


class Generation(NamedTuple):
    """``images [B,H,W,3]`` in about [-1, 1]; ``trajectory`` (latent space) or None."""
    images: jax.Array
    trajectory: Any = None


def make_eps_fn(unet_config, unet_params):
    """``eps_fn(x_t[B,h,w,c], t[B], ctx[B,L,D]) -> model output`` for a UNet and its params."""
    from jaxattrib.models.unet import UNet2DConditionModel
    model = UNet2DConditionModel(unet_config)

    def eps_fn(x_t, t, ctx):
        return model.apply({"params": unet_params}, x_t, t, ctx)
    return eps_fn


def query_key(seed: int) -> jax.Array:
    """The PRNG key a run's queries are generated from (the demo and the benchmarks built on it;
    query ``i``: ``fold_in(key, i)``)."""
    return jax.random.PRNGKey(int(seed) + 11)


def pipeline_schedule(pipe) -> Schedule:
    """The noise schedule of a loaded :class:`~jaxattrib.models.pipeline.Pipeline`."""
    return schedule_from_diffusers_config(pipe.scheduler_config)


def latent_shape(pipe, batch: int) -> tuple[int, int, int, int]:
    """``(B, h, w, c)`` of the UNet's sample for ``batch`` images."""
    s = pipe.unet_config.sample_size
    return (batch, s, s, pipe.unet_config.in_channels)


@functools.lru_cache(maxsize=32)
def _batched_sampler(unet_config, shape, guidance_scale: float, num_inference_steps: int,
                     sampler: str, eta: float, return_trajectory: bool):
    """``f(unet_params, sched, uncond_emb [1, L, D], keys [b], ctx [b, 1, L, D])`` -> samples
    ``[b, 1, h, w, c]`` (and trajectories): one jitted, vmapped sampler per architecture and
    sampling setting. The UNet params are a jit *argument*, so querying many fine-tuned models
    of one architecture (a model zoo) compiles once per prompt-batch size, not once per model.
    """
    from jaxattrib.models.unet import UNet2DConditionModel
    model = UNet2DConditionModel(unet_config)

    def one(params, sched, uncond_emb, key_i, ctx):
        def eps_fn(x_t, t, c):
            return model.apply({"params": params}, x_t, t, c)
        uncond = None if guidance_scale == 1.0 else uncond_emb
        return sampling.sample(eps_fn, sched, shape, key_i, cond=ctx, uncond=uncond,
                               guidance_scale=guidance_scale,
                               num_inference_steps=num_inference_steps, sampler=sampler,
                               eta=eta, return_trajectory=return_trajectory)

    return jax.jit(jax.vmap(one, in_axes=(None, None, None, 0, 0)))


def generate(pipe, prompts: Sequence[str], key: jax.Array, *, unet_params=None,
             num_inference_steps: int = 25, guidance_scale: float = 3.0,
             sampler: str = "ddim", eta: float = 0.0, negative_prompt: str = "",
             return_trajectory: bool = False, batch_size: int = 16) -> Generation:
    """Generates one image per prompt.

    Args:
      pipe: a loaded pipeline (UNet, text encoder, tokenizer, scheduler config, optional VAE).
      prompts: B prompts.
      key: PRNG key; image ``i`` uses ``fold_in(key, i)`` so results do not depend on
        ``batch_size``.
      unet_params: UNet params to use instead of ``pipe.unet_params`` (e.g. a fine-tuned
        checkpoint from a trajectory record).
      guidance_scale: classifier-free guidance weight (1 disables the unconditional branch).
      return_trajectory: also return the sampling trajectory (``x_t`` and ``x̂0`` per step,
        in latent space, leading axis = image).
    Returns:
      :class:`Generation` with pixel images ``[B,H,W,3]``.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("generate: no prompts given")
    params = pipe.unet_params if unet_params is None else unet_params
    sched = pipeline_schedule(pipe)
    uncond_emb = pipe.encode_prompts([negative_prompt])
    batched = _batched_sampler(pipe.unet_config, latent_shape(pipe, 1), float(guidance_scale),
                               int(num_inference_steps), sampler, float(eta),
                               bool(return_trajectory))
    images, trajs = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ctx = pipe.encode_prompts(chunk)[:, None]          # [b, 1, L, D]
        keys = jnp.stack([jax.random.fold_in(key, start + i) for i in range(len(chunk))])
        out = batched(params, sched, uncond_emb, keys, ctx)
        x0, traj = (out if return_trajectory else (out, None))
        x0 = x0[:, 0]
        if traj is not None:
            traj = jax.tree_util.tree_map(
                lambda a: a[:, :, 0] if a.ndim > 2 else a, traj)
        images.append(x0)
        trajs.append(traj)
    x0 = jnp.concatenate(images)
    if pipe.is_latent:
        from jaxattrib.models.vae import decode_latents
        x0 = decode_latents(pipe.vae_params, pipe.vae_config, x0)
    traj = None
    if return_trajectory:
        traj = jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *trajs)
    return Generation(images=x0, trajectory=traj)


def save_images(folder: str | os.PathLike, images, prompts: Sequence[str],
                prefix: str = "gen") -> list[Path]:
    """Writes ``images [B,H,W,3]`` in [-1, 1] as PNGs plus ``prompts.txt``; returns paths."""
    from jaxattrib.report.images import save_png, to_uint8
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arr = to_uint8(np.clip(np.asarray(images), -1.0, 1.0))
    paths = []
    for i, img in enumerate(arr):
        p = folder / f"{prefix}_{i:04d}.png"
        save_png(p, img)
        paths.append(p)
    atomic_write_text(folder / "prompts.txt", "\n".join(prompts) + "\n")
    return paths
