"""DDIM/DDPM sampling and DDIM inversion: whole-trajectory parity with diffusers, CFG, and
invert-then-sample reconstruction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, DDPMScheduler
import diffusers.schedulers.scheduling_ddpm as ddpm_module

from jaxattrib.diffusion import schedule as S
from jaxattrib.diffusion.inversion import ddim_invert
from jaxattrib.diffusion.sampling import (ddim_step, ddim_timesteps, ddpm_step, guided_output,
                                          sample)

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SHAPE = (2, 6, 5, 3)  # NHWC


# A fixed nonlinear "model" implemented twice, elementwise so layout does not matter.
def fake_jnp(x, t, cond=None):
    s = (t.astype(x.dtype) / 1000.0).reshape(-1, 1, 1, 1)
    return 0.7 * jnp.tanh(x) * (1 - s) + 0.3 * jnp.sin(2 * x + 5 * s) + 0.2 * s


def fake_torch(x, t):
    s = float(t) / 1000.0
    return 0.7 * torch.tanh(x) * (1 - s) + 0.3 * torch.sin(2 * x + 5 * s) + 0.2 * s


def nchw(a):
    return torch.from_numpy(np.asarray(a).transpose(0, 3, 1, 2).copy())


def nhwc(a):
    return a.numpy().transpose(0, 2, 3, 1)


def x_T_and_key(seed=0):
    key = jax.random.PRNGKey(seed)
    return jax.random.normal(jax.random.fold_in(key, 0), SHAPE), key


@pytest.mark.parametrize("spacing,N,offset", [("leading", 50, 0), ("leading", 7, 1),
                                              ("trailing", 50, 0), ("trailing", 7, 0),
                                              ("linspace", 13, 0)])
def test_timesteps_match_diffusers(spacing, N, offset):
    ref = DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
    ref.set_timesteps(N)
    ours = ddim_timesteps(S.make_schedule(), N, spacing, offset)
    np.testing.assert_array_equal(ours, ref.timesteps.numpy())


DDIM_CASES = [
    (dict(beta_schedule="linear", prediction_type="epsilon", timestep_spacing="leading"), 0.0),
    (dict(SD, prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
          set_alpha_to_one=False), 0.0),
    (dict(SD, prediction_type="v_prediction", timestep_spacing="trailing"), 0.0),
    (dict(beta_schedule="linear", prediction_type="v_prediction", timestep_spacing="trailing",
          clip_sample=True), 0.7),
    (dict(SD, prediction_type="epsilon", timestep_spacing="leading"), 1.0),
    (dict(beta_schedule="linear", prediction_type="sample", timestep_spacing="linspace"), 0.0),
]


@pytest.mark.parametrize("kw,eta", DDIM_CASES)
def test_ddim_trajectory_matches_diffusers(kw, eta):
    N = 20
    kw = dict(kw)
    kw.setdefault("clip_sample", False)
    sched = S.make_schedule(**kw)
    x_T, key = x_T_and_key()
    x0, traj = sample(fake_jnp, sched, SHAPE, key, num_inference_steps=N, eta=eta,
                      return_trajectory=True)
    ref = DDIMScheduler(**kw)
    ref.set_timesteps(N)
    np.testing.assert_array_equal(np.asarray(traj.timesteps), ref.timesteps.numpy())
    x = nchw(x_T)
    for i, t in enumerate(ref.timesteps):
        np.testing.assert_allclose(np.asarray(traj.xs[i]), nhwc(x), atol=1e-5, rtol=1e-5)
        noise = None
        if eta:
            noise = nchw(jax.random.normal(jax.random.fold_in(key, i + 1), SHAPE))
        out = ref.step(fake_torch(x, t), t, x, eta=eta, variance_noise=noise)
        # x̂0 = (x_t − √(1−ᾱ) ε) / √ᾱ divides by the small √ᾱ of large t, amplifying float32
        # rounding of x_t: 1e-5 was at the edge (one element in 180 off by 1.6e-5, seen once on
        # 2026-12-07 with sampling.py unchanged)
        np.testing.assert_allclose(np.asarray(traj.x0_preds[i]), nhwc(out.pred_original_sample),
                                   atol=1e-4, rtol=1e-4)
        x = out.prev_sample
    np.testing.assert_allclose(np.asarray(x0), nhwc(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [
    dict(beta_schedule="linear", prediction_type="epsilon", variance_type="fixed_small"),
    dict(SD, prediction_type="v_prediction", variance_type="fixed_small_log",
         timestep_spacing="trailing"),
    dict(SD, prediction_type="epsilon", variance_type="fixed_large", clip_sample=True),
])
def test_ddpm_trajectory_matches_diffusers(kw, monkeypatch):
    """Whole DDPM ancestral trajectory with the same variance noise on both sides."""
    N = 25
    kw = dict(kw)
    kw.setdefault("clip_sample", False)
    sched = S.make_schedule(**kw)
    x_T, key = x_T_and_key(3)
    x0, traj = sample(fake_jnp, sched, SHAPE, key, num_inference_steps=N, sampler="ddpm",
                      return_trajectory=True)
    ref = DDPMScheduler(**kw)
    ref.set_timesteps(N)
    current = {}
    monkeypatch.setattr(ddpm_module, "randn_tensor", lambda *a, **k: current["noise"])
    x = nchw(x_T)
    for i, t in enumerate(ref.timesteps):
        np.testing.assert_allclose(np.asarray(traj.xs[i]), nhwc(x), atol=1e-5, rtol=1e-5)
        current["noise"] = nchw(jax.random.normal(jax.random.fold_in(key, i + 1), SHAPE))
        out = ref.step(fake_torch(x, t), t, x)
        # x̂0 = (x_t − √(1−ᾱ) ε) / √ᾱ divides by the small √ᾱ of large t, amplifying float32
        # rounding of x_t: 1e-5 was at the edge (one element in 180 off by 1.6e-5, seen once on
        # 2026-12-07 with sampling.py unchanged)
        np.testing.assert_allclose(np.asarray(traj.x0_preds[i]), nhwc(out.pred_original_sample),
                                   atol=1e-4, rtol=1e-4)
        x = out.prev_sample
    np.testing.assert_allclose(np.asarray(x0), nhwc(x), atol=1e-5, rtol=1e-5)


def test_ddpm_step_full_chain_steps_with_given_noise():
    """ddpm_step alone with t_prev = t - 1 (the 1000-step chain), against DDPMScheduler.step
    with the same variance noise (regenerated from the generator's seed)."""
    sched = S.make_schedule(**SD)
    ref = DDPMScheduler(**SD, clip_sample=False)
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    for t in [999, 500, 10, 1, 0]:
        ref_noise = torch.randn(nchw(x).shape, generator=torch.Generator().manual_seed(t))
        out = ref.step(fake_torch(nchw(x), t), t, nchw(x),
                       generator=torch.Generator().manual_seed(t))
        ours, x0 = ddpm_step(sched, fake_jnp(jnp.asarray(x), jnp.full((2,), t)), t, t - 1,
                             jnp.asarray(x), noise=jnp.asarray(nhwc(ref_noise)))
        np.testing.assert_allclose(np.asarray(ours), nhwc(out.prev_sample), atol=1e-5,
                                   rtol=1e-5)
        np.testing.assert_allclose(np.asarray(x0), nhwc(out.pred_original_sample), atol=1e-5,
                                   rtol=1e-5)


def test_step_functions_need_randomness():
    sched = S.make_schedule()
    x = jnp.zeros(SHAPE)
    with pytest.raises(ValueError, match="key"):
        ddpm_step(sched, x, 5, 4, x)
    with pytest.raises(ValueError, match="key"):
        ddim_step(sched, x, 5, 4, x, eta=1.0)


def test_classifier_free_guidance_one_call_and_combination():
    calls = []

    def eps_fn(x, t, cond):
        calls.append(x.shape[0])
        return jnp.tanh(x) * cond["scale"][:, None, None, None] + cond["shift"][:, None, None, None]

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)
    t = jnp.array([10, 900])
    cond = {"scale": jnp.array([1.5, -0.5]), "shift": jnp.array([0.3, 0.1])}
    uncond = {"scale": jnp.array([0.2, 0.2]), "shift": jnp.array([0.0, 0.0])}
    w = 7.5
    got = guided_output(eps_fn, x, t, cond, uncond, w)
    assert calls == [4]  # one batched call: [uncond; cond]
    u, c = eps_fn(x, t, uncond), eps_fn(x, t, cond)
    np.testing.assert_allclose(got, u + w * (c - u), rtol=1e-6, atol=1e-6)
    # Whole sampler: guided sampling == sampling with a hand-combined denoiser.
    sched = S.make_schedule(**SD)
    key = jax.random.PRNGKey(1)
    a = sample(eps_fn, sched, SHAPE, key, cond, uncond, w, num_inference_steps=5)
    combined = lambda x, t, _: (eps_fn(x, t, uncond)
                                + w * (eps_fn(x, t, cond) - eps_fn(x, t, uncond)))
    b = sample(combined, sched, SHAPE, key, None, num_inference_steps=5)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert not np.allclose(a, sample(eps_fn, sched, SHAPE, key, cond, num_inference_steps=5))


def test_sample_jits_and_matches_eager():
    sched = S.make_schedule(**SD)
    key = jax.random.PRNGKey(2)
    f = jax.jit(lambda s, k: sample(fake_jnp, s, SHAPE, k, num_inference_steps=8,
                                    sampler="ddpm"))
    np.testing.assert_allclose(f(sched, key), sample(fake_jnp, sched, SHAPE, key,
                                                     num_inference_steps=8, sampler="ddpm"),
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- inversion


@pytest.mark.parametrize("kw", [dict(SD, prediction_type="epsilon"),
                                dict(beta_schedule="linear", prediction_type="v_prediction",
                                     timestep_spacing="trailing", set_alpha_to_one=False)])
def test_inversion_trajectory_matches_diffusers_inverse_scheduler(kw):
    N = 10
    sched = S.make_schedule(**kw)
    x0 = jax.random.uniform(jax.random.PRNGKey(0), SHAPE, minval=-1, maxval=1)
    x_T, traj = ddim_invert(fake_jnp, sched, x0, None, N, return_trajectory=True)
    ref = DDIMInverseScheduler(**kw, clip_sample=False)
    ref.set_timesteps(N)
    np.testing.assert_array_equal(np.asarray(traj.timesteps), ref.timesteps.numpy())
    x = nchw(x0)
    for i, t in enumerate(ref.timesteps):
        x = ref.step(fake_torch(x, t), t, x).prev_sample
        np.testing.assert_allclose(np.asarray(traj.xs[i]), nhwc(x), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(x_T), nhwc(x), atol=1e-5, rtol=1e-5)


def gaussian_denoiser(sched, mu, s2):
    """Exact eps-prediction for data x0 ~ N(mu, s2 I): a smooth model whose DDIM ODE is exact."""
    def eps_fn(x, t, cond=None):
        a = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mu) / (a * s2 + 1 - a)
    return eps_fn


def reconstruction_error(N, x64=False):
    dtype = jnp.float64 if x64 else jnp.float32
    sched = S.make_schedule(**SD, dtype=dtype)
    rng = np.random.default_rng(0)
    mu = jnp.asarray(0.3 * rng.standard_normal(SHAPE[1:]), dtype)
    x0 = mu + 0.5 * jnp.asarray(rng.standard_normal(SHAPE), dtype)
    eps_fn = gaussian_denoiser(sched, mu, 0.25)
    x_T = ddim_invert(eps_fn, sched, x0, None, N)
    rec = sample(eps_fn, sched, SHAPE, jax.random.PRNGKey(0), None, num_inference_steps=N,
                 x_T=x_T, dtype=dtype)
    return float(jnp.max(jnp.abs(rec - x0)))


def test_invert_then_sample_reconstructs_and_improves_with_steps():
    # Measured (SD schedule, x0 ~ N(mu, 0.25 I), exact Gaussian denoiser): max |rec - x0| =
    # 0.299 (10 steps), 0.0617 (50), 0.0154 (200), the same in float64: the error is the
    # first-order discretization error of DDIM inversion (eps evaluated one level off), ~3/N.
    errs = [reconstruction_error(n) for n in (10, 50, 200)]
    assert errs[0] < 0.33 and errs[1] < 0.07 and errs[2] < 0.018, errs
    assert errs[0] > 4 * errs[1] > 4 * 3.5 * errs[2], errs  # ~1/N convergence
