"""DDIM / DDPM samplers with classifier-free guidance, recording the trajectory.

What follows the reference (diffusers 0.42 ``DDIMScheduler`` / ``DDPMScheduler`` and the Stable
Diffusion pipeline):

* :func:`ddim_timesteps`: ``set_timesteps`` for 'leading' (plus ``steps_offset``), 'trailing'
  and 'linspace' spacing. The DDIM "previous" timestep is ``t - T // N`` for every spacing, as
  in ``DDIMScheduler.step`` (``t_prev < 0`` uses the final abar, 1 or abar_0).
* :func:`ddim_step` = ``DDIMScheduler.step`` (eta, ``clip_sample``, ``use_clipped_model_output``);
  :func:`ddpm_step` = ``DDPMScheduler.step`` (posterior mean; variance 'fixed_small',
  'fixed_small_log' or 'fixed_large'; no noise at ``t = 0``). The DDPM previous timestep is the
  next entry of the inference timesteps (-1 after the last), as ``previous_timestep``.
* Classifier-free guidance: ``out = out_uncond + w (out_cond - out_uncond)`` on the raw model
  output, both halves in one denoiser call (uncond first), as the SD pipeline.

Our design:

* The denoiser is any ``eps_fn(x_t[B, H, W, C], t[B] int32, cond) -> out[B, H, W, C]`` (a
  closure over parameters; "eps" by name, but the output is of ``sched.prediction_type``).
  ``cond`` is any pytree with a leading batch axis (or None).
* The loop is a ``jax.lax.scan`` over precomputed (static) timesteps; the initial latent is drawn
  from ``fold_in(key, 0)`` and the noise of step ``i`` from ``fold_in(key, i + 1)``. Keys are
  explicit; no global state.
* The trajectory stores, per step ``i``, the latent *entering* the step (``xs[i]`` is at noise
  level ``timesteps[i]``) and the step's x0 prediction (after guidance and clipping).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxattrib.diffusion.schedule import (Schedule, TIMESTEP_SPACINGS, VARIANCE_TYPES,
                                          _bcast, alpha_prod, predict_x0_and_eps)

EpsFn = Callable[[jnp.ndarray, jnp.ndarray, Any], jnp.ndarray]


class Trajectory(NamedTuple):
    """A recorded sampling (or inversion) trajectory with ``N`` steps.

    timesteps: int32 ``[N]``; the noise level of ``xs[i]``.
    xs: ``[N, B, H, W, C]`` latent at ``timesteps[i]``.
    x0_preds: ``[N, B, H, W, C]`` x0 prediction made from ``xs[i]`` at ``timesteps[i]``.
    """

    timesteps: jnp.ndarray
    xs: jnp.ndarray
    x0_preds: jnp.ndarray


# ----------------------------------------------------------------------------- timesteps


def ddim_timesteps(sched: Schedule, num_inference_steps: int,
                   timestep_spacing: str | None = None,
                   steps_offset: int | None = None) -> np.ndarray:
    """Inference timesteps, descending, int32 ``[N]`` (diffusers ``set_timesteps``).

    ``timestep_spacing``/``steps_offset`` default to the schedule's. Static (numpy).
    """
    T = sched.num_train_timesteps
    N = int(num_inference_steps)
    spacing = sched.timestep_spacing if timestep_spacing is None else timestep_spacing
    offset = sched.steps_offset if steps_offset is None else int(steps_offset)
    if not 1 <= N <= T:
        raise ValueError(f"num_inference_steps={N}; expected 1..{T} (num_train_timesteps)")
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, N).round()[::-1]
    elif spacing == "leading":
        ts = (np.arange(0, N) * (T // N)).round()[::-1] + offset
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / N)) - 1
    else:
        raise ValueError(f"timestep_spacing={spacing!r}; expected one of {TIMESTEP_SPACINGS}")
    return np.ascontiguousarray(ts).astype(np.int32)


def ddim_prev_timesteps(sched: Schedule, timesteps: np.ndarray) -> np.ndarray:
    """DDIM's previous timestep ``t - T // N`` for each inference timestep (diffusers)."""
    ts = np.asarray(timesteps, np.int32)
    return (ts - sched.num_train_timesteps // len(ts)).astype(np.int32)


def ddpm_prev_timesteps(timesteps: np.ndarray) -> np.ndarray:
    """DDPM's previous timestep: the next inference timestep, -1 after the last (diffusers)."""
    ts = np.asarray(timesteps, np.int32)
    return np.concatenate([ts[1:], np.array([-1], np.int32)])


# ----------------------------------------------------------------------------- steps


def ddim_step(sched: Schedule, model_out: jnp.ndarray, t, t_prev, x_t: jnp.ndarray,
              eta: float = 0.0, key: jax.Array | None = None, *,
              noise: jnp.ndarray | None = None, clip_sample: bool | None = None,
              set_alpha_to_one: bool | None = None, use_clipped_model_output: bool = False):
    """One DDIM update ``x_t -> x_{t_prev}``; returns ``(x_prev, x0_pred)``.

    Args:
      model_out: denoiser output at ``(x_t, t)``, ``[B, H, W, C]`` (or ``[H, W, C]``).
      t, t_prev: int timesteps, scalars or ``[B]``; ``t_prev < 0`` (and ``t < 0``, used by
        inversion) take the final abar (1 if ``set_alpha_to_one``, else abar_0).
      eta: 0 = deterministic DDIM, 1 = DDPM-like variance. With ``eta != 0`` pass ``key`` or
        ``noise`` (standard normal, shape of ``x_t``).
      clip_sample, set_alpha_to_one: default to the schedule's.
    """
    clip = sched.clip_sample if clip_sample is None else clip_sample
    a_t = alpha_prod(sched, t, set_alpha_to_one)
    a_prev = alpha_prod(sched, t_prev, set_alpha_to_one)
    x0, eps = predict_x0_and_eps(sched, x_t, model_out, t, alpha_t=a_t)
    if clip:
        x0 = jnp.clip(x0, -sched.clip_sample_range, sched.clip_sample_range)
    a_t_b, a_prev_b = _bcast(a_t, x_t), _bcast(a_prev, x_t)
    if use_clipped_model_output:
        eps = (x_t - jnp.sqrt(a_t_b) * x0) / jnp.sqrt(1 - a_t_b)
    if isinstance(eta, (int, float)) and eta == 0:  # static: no variance term (also a_t = 1)
        return jnp.sqrt(a_prev_b) * x0 + jnp.sqrt(1 - a_prev_b) * eps, x0
    variance = (1 - a_prev_b) / (1 - a_t_b) * (1 - a_t_b / a_prev_b)
    std = eta * jnp.sqrt(variance)
    x_prev = jnp.sqrt(a_prev_b) * x0 + jnp.sqrt(1 - a_prev_b - std ** 2) * eps
    if noise is None:
        if key is None:
            raise ValueError("ddim_step with eta != 0 needs `key` or `noise`")
        noise = jax.random.normal(key, x_t.shape, x_t.dtype)
    return x_prev + std * noise, x0


def ddpm_variance(sched: Schedule, t, t_prev, variance_type: str | None = None) -> jnp.ndarray:
    """Standard deviation of the DDPM ancestral noise at ``t`` (per diffusers' ``_get_variance``).

    'fixed_small': posterior variance beta~ (clamped at 1e-20); 'fixed_small_log': the same via
    exp(0.5 log); 'fixed_large': beta_t (with beta_t = 1 - abar_t / abar_{t_prev}).
    """
    kind = sched.variance_type if variance_type is None else variance_type
    if kind not in VARIANCE_TYPES:
        raise ValueError(f"variance_type={kind!r}; expected one of {VARIANCE_TYPES}")
    a_t = alpha_prod(sched, t, True)
    a_prev = alpha_prod(sched, t_prev, True)
    beta = 1 - a_t / a_prev
    var = jnp.maximum((1 - a_prev) / (1 - a_t) * beta, 1e-20)
    if kind == "fixed_small":
        return jnp.sqrt(var)
    if kind == "fixed_small_log":
        return jnp.exp(0.5 * jnp.log(var))
    return jnp.sqrt(beta)


def ddpm_step(sched: Schedule, model_out: jnp.ndarray, t, t_prev, x_t: jnp.ndarray,
              key: jax.Array | None = None, *, noise: jnp.ndarray | None = None,
              clip_sample: bool | None = None, variance_type: str | None = None):
    """One DDPM ancestral update ``x_t -> x_{t_prev}``; returns ``(x_prev, x0_pred)``.

    Posterior mean ``c0 x0_hat + ct x_t`` plus ``sigma_t * noise`` when ``t > 0`` (as diffusers,
    no noise at ``t = 0``). ``noise`` (standard normal, shape of ``x_t``) or ``key`` is required
    unless every ``t`` is 0. ``t_prev = -1`` means abar_prev = 1.
    """
    clip = sched.clip_sample if clip_sample is None else clip_sample
    a_t = alpha_prod(sched, t, True)
    a_prev = alpha_prod(sched, t_prev, True)
    x0, _ = predict_x0_and_eps(sched, x_t, model_out, t, alpha_t=a_t)
    if clip:
        x0 = jnp.clip(x0, -sched.clip_sample_range, sched.clip_sample_range)
    a_t_b, a_prev_b = _bcast(a_t, x_t), _bcast(a_prev, x_t)
    cur_alpha = a_t_b / a_prev_b
    cur_beta = 1 - cur_alpha
    mean = (jnp.sqrt(a_prev_b) * cur_beta / (1 - a_t_b)) * x0 \
        + (jnp.sqrt(cur_alpha) * (1 - a_prev_b) / (1 - a_t_b)) * x_t
    if noise is None:
        if key is None:
            raise ValueError("ddpm_step needs `key` or `noise` for its ancestral noise")
        noise = jax.random.normal(key, x_t.shape, x_t.dtype)
    std = _bcast(ddpm_variance(sched, t, t_prev, variance_type), x_t)
    mask = _bcast(jnp.asarray(t) > 0, x_t)
    return mean + jnp.where(mask, std * noise, 0).astype(x_t.dtype), x0


# ----------------------------------------------------------------------------- guidance


def _concat_cond(uncond, cond):
    return jax.tree_util.tree_map(lambda u, c: jnp.concatenate([u, c], axis=0), uncond, cond)


def guided_output(eps_fn: EpsFn, x_t: jnp.ndarray, t: jnp.ndarray, cond, uncond=None,
                  guidance_scale: float = 1.0) -> jnp.ndarray:
    """Denoiser output with classifier-free guidance, one ``eps_fn`` call.

    Without ``uncond`` (or with ``guidance_scale == 1``) this is ``eps_fn(x_t, t, cond)``.
    Otherwise ``eps_fn`` runs once on ``[x_t; x_t]`` with ``[uncond; cond]`` (batch ``2B``) and
    returns ``out_u + guidance_scale * (out_c - out_u)``.
    """
    if uncond is None or (isinstance(guidance_scale, (int, float)) and guidance_scale == 1.0):
        return eps_fn(x_t, t, cond)
    B = x_t.shape[0]
    out = eps_fn(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), _concat_cond(uncond, cond))
    out_u, out_c = out[:B], out[B:]
    return out_u + guidance_scale * (out_c - out_u)


# ----------------------------------------------------------------------------- sampler


def sample(eps_fn: EpsFn, sched: Schedule, shape: tuple[int, ...], key: jax.Array, cond=None,
           uncond=None, guidance_scale: float = 1.0, num_inference_steps: int = 50,
           sampler: str = "ddim", eta: float = 0.0, return_trajectory: bool = False, *,
           x_T: jnp.ndarray | None = None, timestep_spacing: str | None = None,
           steps_offset: int | None = None, dtype: Any = jnp.float32):
    """Generates ``x_0[B, H, W, C]`` by DDIM or DDPM sampling with classifier-free guidance.

    Args:
      eps_fn: denoiser ``(x_t[B,H,W,C], t[B] int32, cond) -> out[B,H,W,C]``.
      shape: ``(B, H, W, C)`` of the latent.
      key: PRNG key. The initial latent is ``normal(fold_in(key, 0), shape)`` unless ``x_T`` is
        given; the noise of step ``i`` uses ``fold_in(key, i + 1)``.
      cond, uncond: conditioning pytrees with leading axis B (``uncond`` enables guidance).
      guidance_scale: w of classifier-free guidance (1 = no guidance).
      sampler: 'ddim' (eta-DDIM) or 'ddpm' (ancestral).
      return_trajectory: also return a :class:`Trajectory`.
      x_T: optional initial latent (e.g. from :func:`~jaxattrib.diffusion.inversion.ddim_invert`).
    Returns:
      ``x0`` or ``(x0, trajectory)``.
    Static: ``shape, num_inference_steps, sampler, eta, return_trajectory`` and spacing options.
    """
    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"sampler={sampler!r}; expected 'ddim' or 'ddpm'")
    ts = ddim_timesteps(sched, num_inference_steps, timestep_spacing, steps_offset)
    prev = ddim_prev_timesteps(sched, ts) if sampler == "ddim" else ddpm_prev_timesteps(ts)
    if x_T is None:
        x_T = jax.random.normal(jax.random.fold_in(key, 0), shape, dtype)
    B = x_T.shape[0]
    stochastic = sampler == "ddpm" or not (isinstance(eta, (int, float)) and eta == 0)

    def body(x, inp):
        i, t, t_prev = inp
        tb = jnp.full((B,), t, jnp.int32)
        out = guided_output(eps_fn, x, tb, cond, uncond, guidance_scale)
        noise = (jax.random.normal(jax.random.fold_in(key, i + 1), x.shape, x.dtype)
                 if stochastic else None)
        if sampler == "ddim":
            x_new, x0 = ddim_step(sched, out, t, t_prev, x, eta, noise=noise)
        else:
            x_new, x0 = ddpm_step(sched, out, t, t_prev, x, noise=noise)
        return x_new, ((x, x0) if return_trajectory else None)

    xs = (jnp.arange(len(ts), dtype=jnp.int32), jnp.asarray(ts), jnp.asarray(prev))
    x0, rec = jax.lax.scan(body, x_T, xs)
    if not return_trajectory:
        return x0
    return x0, Trajectory(timesteps=jnp.asarray(ts), xs=rec[0], x0_preds=rec[1])
