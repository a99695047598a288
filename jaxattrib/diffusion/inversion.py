"""Deterministic DDIM inversion: x_0 -> x_T such that DDIM sampling maps x_T back to ~x_0.

What follows the reference (diffusers ``DDIMInverseScheduler`` and the usual inversion loop of
null-text inversion / DiffEdit): the inference timesteps ascending; at timestep ``t`` the
current latent (at level ``t - T // N``, or the clean sample for the first step) is moved to
level ``t`` with the DDIM (eta = 0) update, using the denoiser evaluated at ``(x, t)``:

    x0_hat = (x - sqrt(1 - abar_{t-T//N}) eps) / sqrt(abar_{t-T//N})
    x      = sqrt(abar_t) x0_hat + sqrt(1 - abar_t) eps,      eps = eps_fn(x, t, cond)

(``abar`` of a negative timestep is 1 with ``set_alpha_to_one`` else abar_0). The update is
exact when the model output does not change between the two levels, so the reconstruction
error of invert-then-sample shrinks as steps increase. ``clip_sample`` is never applied during
inversion [design] (clipping would make it non-invertible).

Our design: :func:`ddim_invert` uses the same ``eps_fn`` and guidance convention as
:func:`~jaxattrib.diffusion.sampling.sample`, and its :class:`Trajectory` stores the latent
*after* each step, ``xs[i]`` at noise level ``timesteps[i]`` (ascending), which is what
Concept-TRAK needs as (x_t, t) pairs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxattrib.diffusion.sampling import (EpsFn, Trajectory, ddim_prev_timesteps, ddim_step,
                                          ddim_timesteps, guided_output)
from jaxattrib.diffusion.schedule import Schedule


def ddim_invert(eps_fn: EpsFn, sched: Schedule, x0: jnp.ndarray, cond=None,
                num_inference_steps: int = 50, return_trajectory: bool = False, *,
                uncond=None, guidance_scale: float = 1.0, timestep_spacing: str | None = None,
                steps_offset: int | None = None):
    """Inverts DDIM sampling (eta = 0) from a clean ``x0[B, H, W, C]``.

    Args:
      eps_fn: denoiser ``(x_t[B,H,W,C], t[B] int32, cond) -> out[B,H,W,C]``.
      x0: clean samples (pixels in [-1, 1] or scaled VAE latents).
      cond, uncond, guidance_scale: as in :func:`~jaxattrib.diffusion.sampling.sample`.
      num_inference_steps, timestep_spacing, steps_offset: the DDIM grid; use the same values
        when sampling back.
    Returns:
      ``x_T`` (the latent at the largest inference timestep, the starting point for
      ``sample(..., x_T=x_T)``) or ``(x_T, trajectory)`` with ascending timesteps.
    """
    ts_desc = ddim_timesteps(sched, num_inference_steps, timestep_spacing, steps_offset)
    ts = ts_desc[::-1].copy()
    froms = ddim_prev_timesteps(sched, ts_desc)[::-1].copy()
    B = x0.shape[0]

    def body(x, inp):
        t, t_from = inp
        out = guided_output(eps_fn, x, jnp.full((B,), t, jnp.int32), cond, uncond, guidance_scale)
        # DDIM update from level t_from to level t (eta = 0): ddim_step with the roles swapped.
        x_new, x0_pred = ddim_step(sched, out, t_from, t, x, 0.0, clip_sample=False)
        return x_new, ((x_new, x0_pred) if return_trajectory else None)

    x_T, rec = jax.lax.scan(body, x0, (jnp.asarray(ts), jnp.asarray(froms)))
    if not return_trajectory:
        return x_T
    return x_T, Trajectory(timesteps=jnp.asarray(ts), xs=rec[0], x0_preds=rec[1])
