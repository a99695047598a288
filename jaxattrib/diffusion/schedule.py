"""Discrete DDPM noise schedules and the algebra between prediction types.

What follows the reference (diffusers ``DDPMScheduler`` / ``DDIMScheduler``, Ho et al. 2020):

* ``betas`` for ``linear``, ``scaled_linear`` (linear in sqrt(beta)) and ``squaredcos_cap_v2``
  (Nichol & Dhariwal cosine, beta capped at 0.999), optional ``rescale_betas_zero_snr``
  (Lin et al. 2023, Algorithm 1) and ``trained_betas``; ``alphas = 1 - betas``,
  ``alphas_cumprod = cumprod(alphas)``. Built in float32 with a sequential cumulative product, as
  diffusers does, so trajectories match it to float32 rounding.
* Forward process ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``; velocity
  ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0``; ``SNR(t) = abar_t / (1 - abar_t)``.
* ``t < 0`` means "before the first training step": its ``abar`` is 1 when
  ``set_alpha_to_one`` else ``abar_0`` (diffusers' ``final_alpha_cumprod``).

Our design:

* :class:`Schedule` is a ``flax.struct`` dataclass: the arrays are pytree leaves, the
  configuration (``num_train_timesteps``, ``prediction_type``, and the sampler options read from
  a diffusers ``scheduler_config.json``) is static, so a schedule can be passed straight
  through ``jax.jit``/``vmap``/``grad``.
* Timesteps are integer indices ``t in [0, num_train_timesteps)``; they may be a scalar (one
  example ``x[H, W, C]``) or shape ``[B]`` (a batch ``x[B, H, W, C]``). Per-timestep
  coefficients are broadcast over the trailing axes of ``x``.
* ``make_schedule`` defaults ``clip_sample=False`` [design] (diffusers' class default is True;
  every Stable Diffusion scheduler config sets it False). ``schedule_from_diffusers_config``
  uses diffusers' defaults for missing keys, so it reproduces ``Scheduler.from_config``.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import flax.struct
import jax.numpy as jnp
import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


class ScheduleConfigError(ValueError):
    """A scheduler configuration asks for something this module does not implement."""


@flax.struct.dataclass
class Schedule:
    """A discrete diffusion schedule.

    Attributes (arrays, float, shape ``[T]`` with ``T = num_train_timesteps``):
      betas: per-step noise variances beta_t.
      alphas: ``1 - betas``.
      alphas_cumprod: abar_t = prod_{s <= t} alpha_s.
    Static attributes:
      num_train_timesteps: T.
      prediction_type: what the denoiser outputs: 'epsilon' | 'v_prediction' | 'sample'.
      set_alpha_to_one: abar used for ``t < 0`` is 1 (True) or abar_0 (False).
      clip_sample, clip_sample_range: clamp predicted x_0 to +-range during sampling.
      timestep_spacing, steps_offset: how inference timesteps are chosen (diffusers semantics).
      variance_type: DDPM ancestral-step variance ('fixed_small' | 'fixed_small_log' |
        'fixed_large').
    """

    betas: jnp.ndarray
    alphas: jnp.ndarray
    alphas_cumprod: jnp.ndarray
    num_train_timesteps: int = flax.struct.field(pytree_node=False, default=1000)
    prediction_type: str = flax.struct.field(pytree_node=False, default="epsilon")
    set_alpha_to_one: bool = flax.struct.field(pytree_node=False, default=True)
    clip_sample: bool = flax.struct.field(pytree_node=False, default=False)
    clip_sample_range: float = flax.struct.field(pytree_node=False, default=1.0)
    timestep_spacing: str = flax.struct.field(pytree_node=False, default="leading")
    steps_offset: int = flax.struct.field(pytree_node=False, default=0)
    variance_type: str = flax.struct.field(pytree_node=False, default="fixed_small")


# ----------------------------------------------------------------------------- construction


def _alpha_bar_cosine(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def make_betas(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
               beta_schedule: str = "linear") -> np.ndarray:
    """The beta_t of a named schedule, float32 ``[T]``, computed as diffusers does."""
    T = int(num_train_timesteps)
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, T, dtype=np.float64).astype(np.float32)
    if beta_schedule == "scaled_linear":
        root = np.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=np.float64)
        root = root.astype(np.float32)
        return root * root
    if beta_schedule == "squaredcos_cap_v2":
        return np.array([min(1 - _alpha_bar_cosine((i + 1) / T) / _alpha_bar_cosine(i / T), 0.999)
                         for i in range(T)], dtype=np.float32)
    raise ScheduleConfigError(f"beta_schedule={beta_schedule!r} is not supported; expected one of "
                              f"{BETA_SCHEDULES} (or pass trained_betas)")


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescales betas so that abar_{T-1} = 0 (Lin et al. 2023, Alg. 1), as diffusers."""
    betas = np.asarray(betas, np.float32)
    abar_sqrt = np.sqrt(np.cumprod(1.0 - betas, dtype=np.float32))
    a0, aT = abar_sqrt[0].copy(), abar_sqrt[-1].copy()
    abar_sqrt = (abar_sqrt - aT) * (a0 / (a0 - aT))
    abar = abar_sqrt ** 2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return (1.0 - alphas).astype(np.float32)


def make_schedule(num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                  beta_end: float = 0.02, beta_schedule: str = "linear",
                  prediction_type: str = "epsilon", *,
                  trained_betas: Sequence[float] | np.ndarray | None = None,
                  rescale_betas_zero_snr: bool = False, set_alpha_to_one: bool = True,
                  clip_sample: bool = False, clip_sample_range: float = 1.0,
                  timestep_spacing: str = "leading", steps_offset: int = 0,
                  variance_type: str = "fixed_small", dtype: Any = jnp.float32) -> Schedule:
    """Builds a :class:`Schedule`.

    Defaults are diffusers' DDPM/DDIM defaults except ``clip_sample=False`` [design]. Stable
    Diffusion 1.x/2.x use ``beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012``.
    ``dtype`` is the dtype of the stored arrays (the cumulative product is taken in float32 as
    diffusers does, then cast; pass ``jnp.float64`` under ``enable_x64`` for exact tests).
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ScheduleConfigError(f"prediction_type={prediction_type!r}; expected one of "
                                  f"{PREDICTION_TYPES}")
    if timestep_spacing not in TIMESTEP_SPACINGS:
        raise ScheduleConfigError(f"timestep_spacing={timestep_spacing!r}; expected one of "
                                  f"{TIMESTEP_SPACINGS}")
    if variance_type not in VARIANCE_TYPES:
        raise ScheduleConfigError(f"variance_type={variance_type!r} is not supported; expected one "
                                  f"of {VARIANCE_TYPES} (learned variances are not implemented)")
    if trained_betas is not None:
        betas = np.asarray(trained_betas, np.float32)
        if betas.shape != (int(num_train_timesteps),):
            raise ScheduleConfigError(f"trained_betas has shape {betas.shape}; expected "
                                      f"({num_train_timesteps},)")
    else:
        betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule)
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    alphas = (1.0 - betas).astype(np.float32)
    alphas_cumprod = np.cumprod(alphas, dtype=np.float32)
    return Schedule(
        betas=jnp.asarray(betas, dtype), alphas=jnp.asarray(alphas, dtype),
        alphas_cumprod=jnp.asarray(alphas_cumprod, dtype),
        num_train_timesteps=int(num_train_timesteps), prediction_type=prediction_type,
        set_alpha_to_one=bool(set_alpha_to_one), clip_sample=bool(clip_sample),
        clip_sample_range=float(clip_sample_range), timestep_spacing=timestep_spacing,
        steps_offset=int(steps_offset), variance_type=variance_type)


# Keys of DDIM/DDPM/PNDM scheduler_config.json files and diffusers' defaults for them.
_SUPPORTED_CLASSES = ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler")
_DEFAULTS = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                 trained_betas=None, prediction_type="epsilon", rescale_betas_zero_snr=False,
                 set_alpha_to_one=True, clip_sample=True, clip_sample_range=1.0,
                 timestep_spacing="leading", steps_offset=0, variance_type="fixed_small")
_CLASS_DEFAULTS = {"PNDMScheduler": dict(set_alpha_to_one=False, clip_sample=False)}
# Accepted but without effect on anything this module computes (valid only with an option we
# reject, or PNDM-only sampler details).
_INERT = ("sample_max_value", "dynamic_thresholding_ratio", "skip_prk_steps")


def schedule_from_diffusers_config(config: Mapping[str, Any], *, dtype: Any = jnp.float32,
                                   source: str = "scheduler config") -> Schedule:
    """A :class:`Schedule` from a diffusers DDIM/DDPM/PNDM ``scheduler_config.json`` dict.

    Missing keys take the defaults of the class named by ``_class_name`` (as
    ``Scheduler.from_config`` would). Raises :class:`ScheduleConfigError` naming ``source`` and the
    field for an unsupported class, an unknown key, ``thresholding=True``, a learned
    ``variance_type`` or an unknown beta schedule.
    """
    cls = config.get("_class_name")
    if cls is not None and cls not in _SUPPORTED_CLASSES:
        raise ScheduleConfigError(f"{source}: _class_name={cls!r} is not supported; expected one "
                                  f"of {_SUPPORTED_CLASSES} (build other schedules with "
                                  f"make_schedule)")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _DEFAULTS
                     and k not in _INERT and k != "thresholding")
    if unknown:
        raise ScheduleConfigError(f"{source}: unknown field(s) {unknown}; this reader understands "
                                  f"{sorted(_DEFAULTS) + ['thresholding'] + list(_INERT)}")
    if config.get("thresholding", False):
        raise ScheduleConfigError(f"{source}: thresholding=true (dynamic thresholding) is not "
                                  f"supported")
    kw = dict(_DEFAULTS)
    kw.update(_CLASS_DEFAULTS.get(cls, {}))
    kw.update({k: v for k, v in config.items() if k in _DEFAULTS})
    try:
        return make_schedule(dtype=dtype, **kw)
    except ScheduleConfigError as e:
        raise ScheduleConfigError(f"{source}: {e}") from e


def schedule_from_pretrained(folder: str | os.PathLike, *, dtype: Any = jnp.float32) -> Schedule:
    """Reads ``folder/scheduler_config.json`` (a pipeline's ``scheduler/`` component)."""
    from jaxattrib.models.convert import read_config
    path = os.fspath(folder)
    config = read_config(path, "scheduler_config.json")
    return schedule_from_diffusers_config(config, dtype=dtype,
                                          source=os.path.join(path, "scheduler_config.json"))


# ----------------------------------------------------------------------------- algebra


def _bcast(coef: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    """Reshapes per-timestep coefficients ``[...]`` to broadcast against ``x[..., H, W, C]``."""
    coef = jnp.asarray(coef)
    return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim)).astype(x.dtype)


def alpha_prod(sched: Schedule, t, set_alpha_to_one: bool | None = None) -> jnp.ndarray:
    """abar_t for integer ``t`` (any shape); ``t < 0`` gives 1 or abar_0 (``set_alpha_to_one``)."""
    one = sched.set_alpha_to_one if set_alpha_to_one is None else set_alpha_to_one
    t = jnp.asarray(t)
    ac = sched.alphas_cumprod
    final = jnp.ones((), ac.dtype) if one else ac[0]
    return jnp.where(t >= 0, ac[jnp.clip(t, 0, sched.num_train_timesteps - 1)], final)


def add_noise(sched: Schedule, x0: jnp.ndarray, noise: jnp.ndarray, t) -> jnp.ndarray:
    """Forward process ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``.

    ``x0, noise``: ``[B, H, W, C]`` with ``t[B]``, or ``[H, W, C]`` with scalar ``t``.
    """
    a = _bcast(sched.alphas_cumprod[t], x0)
    return jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise


def velocity(sched: Schedule, x0: jnp.ndarray, noise: jnp.ndarray, t) -> jnp.ndarray:
    """v-prediction target ``v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0`` (Salimans & Ho)."""
    a = _bcast(sched.alphas_cumprod[t], x0)
    return jnp.sqrt(a) * noise - jnp.sqrt(1 - a) * x0


def snr(sched: Schedule, t) -> jnp.ndarray:
    """Signal-to-noise ratio ``abar_t / (1 - abar_t)`` for integer ``t`` (any shape)."""
    a = sched.alphas_cumprod[t]
    return a / (1 - a)


def _check_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r}; expected one of {PREDICTION_TYPES}")
    return prediction_type


def predict_x0_and_eps(sched: Schedule, x_t: jnp.ndarray, model_out: jnp.ndarray, t, *,
                       prediction_type: str | None = None, alpha_t: jnp.ndarray | None = None):
    """``(x0_hat, eps_hat)`` from a model output of ``prediction_type`` (default: the schedule's).

    ``alpha_t`` overrides abar_t (used by samplers for ``t < 0``); otherwise abar_t =
    ``alphas_cumprod[t]``. Same formulas as diffusers' DDIM step.
    """
    kind = _check_type(prediction_type or sched.prediction_type)
    a = _bcast(sched.alphas_cumprod[t] if alpha_t is None else alpha_t, x_t)
    sa, sb = jnp.sqrt(a), jnp.sqrt(1 - a)
    if kind == "epsilon":
        return (x_t - sb * model_out) / sa, model_out
    if kind == "sample":
        return model_out, (x_t - sa * model_out) / sb
    return sa * x_t - sb * model_out, sa * model_out + sb * x_t


def predict_x0(sched: Schedule, x_t, model_out, t, *, prediction_type: str | None = None):
    """x0_hat from the model output (see :func:`predict_x0_and_eps`)."""
    return predict_x0_and_eps(sched, x_t, model_out, t, prediction_type=prediction_type)[0]


def predict_eps(sched: Schedule, x_t, model_out, t, *, prediction_type: str | None = None):
    """eps_hat from the model output (see :func:`predict_x0_and_eps`)."""
    return predict_x0_and_eps(sched, x_t, model_out, t, prediction_type=prediction_type)[1]


def predict_v(sched: Schedule, x_t, model_out, t, *, prediction_type: str | None = None):
    """v_hat = sqrt(abar) eps_hat - sqrt(1 - abar) x0_hat from the model output."""
    x0, eps = predict_x0_and_eps(sched, x_t, model_out, t, prediction_type=prediction_type)
    return velocity(sched, x0, eps, t)


def convert_output(sched: Schedule, x_t, model_out, t, to: str, *,
                   prediction_type: str | None = None) -> jnp.ndarray:
    """Re-expresses a model output of ``prediction_type`` as prediction type ``to``."""
    fns = {"epsilon": predict_eps, "sample": predict_x0, "v_prediction": predict_v}
    return fns[_check_type(to)](sched, x_t, model_out, t, prediction_type=prediction_type)


def training_target(sched: Schedule, x0: jnp.ndarray, noise: jnp.ndarray, t, *,
                    prediction_type: str | None = None) -> jnp.ndarray:
    """What the denoiser is trained to output: noise, velocity or x0 by prediction type."""
    kind = _check_type(prediction_type or sched.prediction_type)
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return x0
    return velocity(sched, x0, noise, t)
