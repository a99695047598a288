"""Schedules and prediction-type algebra: parity with diffusers and identities in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler

from jaxattrib.diffusion import schedule as S

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@pytest.mark.parametrize("kw", [
    dict(beta_schedule="linear"),
    SD,
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(SD, rescale_betas_zero_snr=True),
    dict(beta_schedule="linear", num_train_timesteps=200, beta_start=1e-3, beta_end=0.05),
])
def test_betas_and_cumprod_match_diffusers(kw):
    ref = DDPMScheduler(**kw)
    ours = S.make_schedule(**kw)
    # Zero-terminal-SNR betas are 1 - abar_t/abar_{t-1}: float32 cancellation (~5e-6 absolute).
    beta_atol = 1e-5 if kw.get("rescale_betas_zero_snr") else 1e-9
    np.testing.assert_allclose(np.asarray(ours.betas), ref.betas.numpy(), rtol=2e-6,
                               atol=beta_atol)
    np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy(),
                               rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("t_kind", ["batch", "scalar"])
def test_add_noise_and_velocity_match_diffusers(t_kind):
    rng = np.random.default_rng(0)
    ref = DDPMScheduler(**SD)
    ours = S.make_schedule(**SD)
    x0 = rng.standard_normal((4, 8, 8, 3)).astype(np.float32)
    eps = rng.standard_normal((4, 8, 8, 3)).astype(np.float32)
    t = np.array([0, 17, 500, 999])
    to_t = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())  # NHWC -> NCHW
    back = lambda a: a.numpy().transpose(0, 2, 3, 1)
    ref_xt = back(ref.add_noise(to_t(x0), to_t(eps), torch.from_numpy(t)))
    ref_v = back(ref.get_velocity(to_t(x0), to_t(eps), torch.from_numpy(t)))
    if t_kind == "batch":
        xt = S.add_noise(ours, jnp.asarray(x0), jnp.asarray(eps), jnp.asarray(t))
        v = S.velocity(ours, jnp.asarray(x0), jnp.asarray(eps), jnp.asarray(t))
    else:  # one example at a time, scalar t
        xt = jnp.stack([S.add_noise(ours, x0[i], eps[i], int(t[i])) for i in range(4)])
        v = jnp.stack([S.velocity(ours, x0[i], eps[i], int(t[i])) for i in range(4)])
    np.testing.assert_allclose(np.asarray(xt), ref_xt, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(v), ref_v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", S.PREDICTION_TYPES)
def test_prediction_conversions_exact_float64(kind):
    """Feeding the exact target of each prediction type recovers x0 and eps (ground truth)."""
    with jax.enable_x64(True):
        sched = S.make_schedule(prediction_type=kind, dtype=jnp.float64)
        rng = np.random.default_rng(1)
        x0 = jnp.asarray(rng.standard_normal((3, 4, 4, 2)))
        eps = jnp.asarray(rng.standard_normal((3, 4, 4, 2)))
        t = jnp.array([1, 400, 998])
        xt = S.add_noise(sched, x0, eps, t)
        out = S.training_target(sched, x0, eps, t)
        np.testing.assert_allclose(S.predict_x0(sched, xt, out, t), x0, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(S.predict_eps(sched, xt, out, t), eps, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(S.predict_v(sched, xt, out, t),
                                   S.velocity(sched, x0, eps, t), rtol=1e-9, atol=1e-9)
        for to in S.PREDICTION_TYPES:
            conv = S.convert_output(sched, xt, out, t, to)
            back = S.convert_output(sched, xt, conv, t, kind, prediction_type=to)
            np.testing.assert_allclose(back, out, rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(conv, S.training_target(sched, x0, eps, t,
                                                               prediction_type=to),
                                       rtol=1e-8, atol=1e-8)


def test_snr_and_alpha_prod():
    sched = S.make_schedule(set_alpha_to_one=False)
    a = np.asarray(sched.alphas_cumprod)
    np.testing.assert_allclose(np.asarray(S.snr(sched, jnp.array([0, 999]))),
                               a[[0, 999]] / (1 - a[[0, 999]]), rtol=1e-6)
    got = np.asarray(S.alpha_prod(sched, jnp.array([-1, 0, 5])))
    np.testing.assert_allclose(got, [a[0], a[0], a[5]])
    assert float(S.alpha_prod(sched, -1, set_alpha_to_one=True)) == 1.0


def test_schedule_is_a_pytree_through_jit():
    sched = S.make_schedule(prediction_type="v_prediction")
    leaves = jax.tree_util.tree_leaves(sched)
    assert len(leaves) == 3
    f = jax.jit(lambda s, t: S.snr(s, t) * (s.prediction_type == "v_prediction"))
    np.testing.assert_allclose(f(sched, 3), S.snr(sched, 3))


@pytest.mark.parametrize("cls,kw", [
    (DDIMScheduler, dict(SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         prediction_type="v_prediction", timestep_spacing="trailing")),
    (DDPMScheduler, dict(beta_schedule="squaredcos_cap_v2", variance_type="fixed_large")),
    (PNDMScheduler, dict(SD, skip_prk_steps=True, steps_offset=1)),
])
def test_from_pretrained_scheduler_folder(tmp_path, cls, kw):
    ref = cls(**kw)
    ref.save_pretrained(tmp_path)
    ours = S.schedule_from_pretrained(tmp_path)
    np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy(),
                               rtol=2e-5, atol=1e-7)
    cfg = ref.config
    assert ours.prediction_type == cfg.prediction_type
    assert ours.steps_offset == cfg.steps_offset
    assert ours.timestep_spacing == cfg.timestep_spacing
    assert ours.clip_sample == cfg.get("clip_sample", False)  # PNDM never clips
    if "set_alpha_to_one" in cfg:
        assert ours.set_alpha_to_one == cfg.set_alpha_to_one
    if "variance_type" in cfg:
        assert ours.variance_type == cfg.variance_type


def test_missing_keys_take_class_defaults():
    assert S.schedule_from_diffusers_config({"_class_name": "DDIMScheduler"}).clip_sample is True
    pndm = S.schedule_from_diffusers_config({"_class_name": "PNDMScheduler"})
    assert pndm.set_alpha_to_one is False and pndm.clip_sample is False


@pytest.mark.parametrize("cfg,needle", [
    ({"_class_name": "EulerDiscreteScheduler"}, "_class_name"),
    ({"thresholding": True}, "thresholding"),
    ({"variance_type": "learned_range"}, "variance_type"),
    ({"beta_schedule": "sigmoid"}, "sigmoid"),
    ({"prediction_type": "flow"}, "prediction_type"),
    ({"use_karras_sigmas": True}, "use_karras_sigmas"),
    ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
])
def test_unsupported_configs_are_rejected(cfg, needle):
    with pytest.raises(S.ScheduleConfigError, match=needle):
        S.schedule_from_diffusers_config(cfg, source="x/scheduler_config.json")


def test_missing_config_file_names_it(tmp_path):
    from jaxattrib.models.convert import CheckpointError
    with pytest.raises(CheckpointError, match="scheduler_config.json"):
        S.schedule_from_pretrained(tmp_path)
