"""The denoising score-matching loss and the D-TRAK output functions used as attribution targets.

Every function reduces over the trailing axes ``(H, W, C)`` only: ``x[B, H, W, C] -> [B]``, or
``x[H, W, C] -> []`` for one example (what ``jax.vmap(jax.grad(f))`` needs). What follows the
reference (sail-sg/D-TRAK ``grad_unconditional.py`` [code]; ``out`` is the denoiser output,
``target`` the training target of the schedule's prediction type — noise, velocity or x0):

* ``'loss'``        mean((out - target)^2)                  (TRAK's DSM loss)
* ``'square'``      mean(out^2)                             (D-TRAK 'mean-squared-l2-norm')
* ``'avg'``         mean(out)                               (D-TRAK 'mean')
* ``'l1-norm'``     sum |out|                               (torch.norm p=1 of the flattened out)
* ``'l2-norm'``     sqrt(sum out^2)
* ``'linf-norm'``   max |out|
* ``'weighted-mse'`` w_t mean((out - target)^2), w_t = beta_t / (2 alpha_t (1 - abar_t))
  [code: ``weights = betas / (2 * alphas * (1 - alphas_cumprod))``] — the ELBO weight of Ho et al.
  with sigma_t^2 = beta_t.
* Timesteps [code]: 'uniform' = ``range(0, T, T // K)``, 'cumulative' = ``range(0, K)``; noise
  fixed per timestep (D-TRAK seeds torch with ``e_seed*1000 + t`` and draws one batch of 52, so
  each batch position has its own noise, repeated across batches: :func:`example_noise`).
  Gradients are averaged over the timesteps.
Our design:

* ``'elbo'`` [design]: the per-timestep term of the variational bound with the true posterior
  variance (Ho et al. 2020 eq. 5; Kingma et al. 2021): for ``t >= 1``
  ``L_t = 1/2 (SNR(t-1) - SNR(t)) mean((x0 - x0_hat)^2)``, equal for epsilon-prediction to
  ``beta_t / (2 alpha_t (1 - abar_{t-1})) mean((eps - eps_hat)^2)``; for ``t = 0`` the Gaussian
  decoder term with variance beta_0, ``1/(2 beta_0) mean((x0 - x0_hat)^2)``
  (= ``1/(2 alpha_0) mean((eps - eps_hat)^2)``). Mean over pixels instead of the bound's sum, and
  constants dropped, so its scale is comparable to the other output functions. Defined through
  x0_hat so it applies to every prediction type.
* ``fixed_noise(seed, t, shape)`` = ``normal(fold_in(PRNGKey(seed), t), shape)``: the same
  noise for every example at a given (seed, t) (D-TRAK shares it per batch position only).
* :func:`example_noise` [design]: the three noise modes of attribution (``'shared'`` =
  :func:`fixed_noise`; ``'per_example'`` keyed by ``(seed, t, index)``; ``'per_position'`` by
  ``(seed, t, index mod period)``, D-TRAK's noise per batch position [code]) as pure functions
  of the example's row index, so a feature does not depend on the batch it is computed in.
* ``timesteps_uniform`` returns exactly K values ``k * (T // K)``; ``timesteps_random`` draws K
  distinct timesteps, sorted [design].
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxattrib.diffusion.sampling import EpsFn
from jaxattrib.diffusion.schedule import (Schedule, add_noise, predict_x0, snr,
                                          training_target)

OUTPUT_FUNCTIONS = ("loss", "square", "avg", "l1-norm", "l2-norm", "linf-norm", "weighted-mse",
                    "elbo")
ALIASES = {"mean-squared-l2-norm": "square", "mean": "avg", "dsm": "loss"}
_AXES = (-3, -2, -1)


def _mean(x):
    return jnp.mean(x, axis=_AXES)


# ----------------------------------------------------------------------------- weights


def dtrak_weights(sched: Schedule) -> jnp.ndarray:
    """D-TRAK's 'weighted-mse' weights ``beta_t / (2 alpha_t (1 - abar_t))``, ``[T]``."""
    return sched.betas / (2 * sched.alphas * (1 - sched.alphas_cumprod))


def elbo_x0_weights(sched: Schedule) -> jnp.ndarray:
    """Per-timestep weights on ``mean((x0 - x0_hat)^2)`` of the variational bound, ``[T]``.

    ``t >= 1``: ``(SNR(t-1) - SNR(t)) / 2``; ``t = 0``: ``1 / (2 beta_0)`` with
    ``beta_0 = 1 - abar_0`` (see module doc).
    """
    s = snr(sched, jnp.arange(sched.num_train_timesteps))
    return jnp.concatenate([0.5 / (1 - sched.alphas_cumprod[:1]), 0.5 * (s[:-1] - s[1:])])


# ----------------------------------------------------------------------------- losses


def dsm_loss(sched: Schedule, model_out: jnp.ndarray, x0: jnp.ndarray, noise: jnp.ndarray,
             t) -> jnp.ndarray:
    """Per-example DSM loss ``mean_{HWC}((target - model_out)^2)``.

    ``target`` is ``noise``, ``velocity(x0, noise, t)`` or ``x0`` by ``sched.prediction_type``.
    Shapes: ``[B, H, W, C]`` with ``t[B]`` -> ``[B]``; ``[H, W, C]`` with scalar ``t`` -> ``[]``.
    """
    target = training_target(sched, x0, noise, t)
    return _mean((target - model_out) ** 2)


def output_function(name: str, sched: Schedule, model_out: jnp.ndarray, x0: jnp.ndarray,
                    noise: jnp.ndarray, t, x_t: jnp.ndarray | None = None) -> jnp.ndarray:
    """Value of the output function ``name`` per example (see module doc for definitions).

    Args:
      name: one of :data:`OUTPUT_FUNCTIONS` (or the D-TRAK names 'mean-squared-l2-norm',
        'mean').
      model_out: denoiser output at ``(x_t, t)``, ``[..., H, W, C]``.
      x0, noise: the clean sample and the noise that made ``x_t`` (used by target-based
        functions).
      t: int timesteps matching the leading axes.
      x_t: the noisy input (only 'elbo' uses it; recomputed from x0, noise when omitted).
    Returns: ``[...]`` (leading axes of ``model_out``).
    """
    name = ALIASES.get(name, name)
    if name == "loss":
        return dsm_loss(sched, model_out, x0, noise, t)
    if name == "square":
        return _mean(model_out ** 2)
    if name == "avg":
        return _mean(model_out)
    if name == "l1-norm":
        return jnp.sum(jnp.abs(model_out), axis=_AXES)
    if name == "l2-norm":
        return jnp.sqrt(jnp.sum(model_out ** 2, axis=_AXES))
    if name == "linf-norm":
        return jnp.max(jnp.abs(model_out), axis=_AXES)
    if name == "weighted-mse":
        w = dtrak_weights(sched)[t]
        return w * dsm_loss(sched, model_out, x0, noise, t)
    if name == "elbo":
        if x_t is None:
            x_t = add_noise(sched, x0, noise, t)
        x0_hat = predict_x0(sched, x_t, model_out, t)
        return elbo_x0_weights(sched)[t] * _mean((x0 - x0_hat) ** 2)
    raise ValueError(f"unknown output function {name!r}; expected one of {OUTPUT_FUNCTIONS} "
                     f"or {sorted(ALIASES)}")


# ----------------------------------------------------------------------------- timesteps, noise


def timesteps_uniform(K: int, T: int = 1000) -> np.ndarray:
    """``{0, T//K, 2 T//K, ...}``: K timesteps, int32 ``[K]`` (D-TRAK 'uniform')."""
    if not 1 <= K <= T:
        raise ValueError(f"K={K}; expected 1..{T}")
    return (np.arange(K) * (T // K)).astype(np.int32)


def timesteps_cumulative(K: int, T: int = 1000) -> np.ndarray:
    """``{0, 1, ..., K-1}``, int32 ``[K]`` (D-TRAK 'cumulative')."""
    if not 1 <= K <= T:
        raise ValueError(f"K={K}; expected 1..{T}")
    return np.arange(K, dtype=np.int32)


def timesteps_random(key: jax.Array, K: int, T: int = 1000) -> jnp.ndarray:
    """K distinct timesteps drawn uniformly from ``[0, T)``, sorted, int32 ``[K]`` [design]."""
    return jnp.sort(jax.random.choice(key, T, (K,), replace=False)).astype(jnp.int32)


def fixed_noise(seed: int, t, shape: Sequence[int], dtype: Any = jnp.float32) -> jnp.ndarray:
    """Standard normal noise determined by ``(seed, t)`` only, shared by all examples.

    ``t`` may be traced (``fold_in``); ``seed`` a Python int or traced int.
    """
    key = jax.random.fold_in(jax.random.PRNGKey(seed), t)
    return jax.random.normal(key, tuple(shape), dtype)


NOISE_MODES = ("shared", "per_example", "per_position")


def example_noise(mode: str, seed, t, index, shape: Sequence[int], period: int = 52,
                  dtype: Any = jnp.float32) -> jnp.ndarray:
    """The noise of example ``index`` at timestep ``t`` under noise ``mode`` ``[*shape]``.

    * ``'shared'``: :func:`fixed_noise` ``(seed, t)``, the same for every example (``index``
      unused).
    * ``'per_example'``: ``normal(fold_in(fold_in(PRNGKey(seed), t), index))``: every example
      its own noise, reproducible from ``(seed, t, index)``.
    * ``'per_position'``: ``'per_example'`` of ``index mod period``. [code] D-TRAK
      (``CIFAR2/grad_unconditional.py``) reseeds torch with ``e_seed*1000 + t`` before
      ``randn_like`` over each batch of ``--train_batch_size=52`` (``scripts/run_grad.sh``)
      examples, so the example at position ``j`` of any batch gets the same noise and
      positions differ; keying on the global row index ``mod period`` keeps that structure
      while making the features independent of the microbatch we compute with [design] (the
      draws themselves are JAX's, not torch's).

    ``t`` and ``index`` may be traced int scalars.
    """
    if mode == "shared":
        return fixed_noise(seed, t, shape, dtype)
    if mode not in NOISE_MODES:
        raise ValueError(f"noise={mode!r}: expected one of {NOISE_MODES}")
    if mode == "per_position":
        if period < 1:
            raise ValueError(f"noise_period={period}: expected a positive number of positions")
        index = index % period
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), t), index)
    return jax.random.normal(key, tuple(shape), dtype)


# ----------------------------------------------------------------------------- averaged output


def averaged_output(fn_name: str, eps_fn: EpsFn, sched: Schedule, x0: jnp.ndarray, cond,
                    timesteps, noise_seed: int = 0, *, noise: jnp.ndarray | None = None,
                    timestep_batch: int | None = None) -> jnp.ndarray:
    """Output function ``fn_name`` of ONE example averaged over ``timesteps`` (a scalar).

    ``f(x0) = (1/K) sum_k g(eps_fn(x_{t_k}, t_k, cond))``, ``x_{t_k} = add_noise(x0, n_k, t_k)``
    with ``n_k = fixed_noise(noise_seed, t_k, x0.shape)`` unless ``noise[K, H, W, C]`` is given
    (e.g. fresh draws, or repeated timesteps for Journey-TRAK's re-noising). This is the function
    attribution differentiates per example: ``jax.vmap(jax.grad(f_of_params))``.

    Args:
      x0: ``[H, W, C]`` (one example, no batch axis).
      cond: that example's conditioning pytree WITHOUT batch axis (e.g. ``[L, D]``), or None.
      timesteps: int ``[K]``.
      timestep_batch: None = one denoiser call with batch K; else ``lax.map`` in chunks of this
        size (less memory).
    """
    ts = jnp.asarray(timesteps, jnp.int32)
    K = ts.shape[0]
    if noise is None:
        noise = jax.vmap(lambda t: fixed_noise(noise_seed, t, x0.shape, x0.dtype))(ts)
    cond1 = jax.tree_util.tree_map(lambda c: c[None], cond)

    def one(args):
        t, n = args
        x_t = add_noise(sched, x0, n, t)
        out = eps_fn(x_t[None], t[None], cond1)[0]
        return output_function(fn_name, sched, out, x0, n, t, x_t=x_t)

    if timestep_batch is None:
        vals = jax.vmap(one)((ts, noise))
    else:
        vals = jax.lax.map(one, (ts, noise), batch_size=timestep_batch)
    return jnp.sum(vals) / K
