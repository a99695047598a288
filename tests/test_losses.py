"""DSM loss, D-TRAK output functions, timestep/noise selection and per-example gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import DDPMScheduler

from jaxattrib.diffusion import losses as L
from jaxattrib.diffusion import schedule as S

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def np_output(name, out, target):
    """Direct numpy (float64) definitions, written independently of the module."""
    o = out.reshape(out.shape[0], -1).astype(np.float64)
    tg = target.reshape(target.shape[0], -1).astype(np.float64)
    return {
        "loss": ((o - tg) ** 2).mean(1),
        "square": (o ** 2).mean(1),
        "avg": o.mean(1),
        "l1-norm": np.abs(o).sum(1),
        "l2-norm": np.sqrt((o ** 2).sum(1)),
        "linf-norm": np.abs(o).max(1),
    }[name]


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("name", ["loss", "square", "avg", "l1-norm", "l2-norm", "linf-norm",
                                  "weighted-mse"])
def test_output_functions_match_numpy(kind, name):
    sched = S.make_schedule(**SD, prediction_type=kind)
    ref = DDPMScheduler(**SD, prediction_type=kind)
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((3, 4, 5, 2)).astype(np.float32)
    eps = rng.standard_normal((3, 4, 5, 2)).astype(np.float32)
    out = rng.standard_normal((3, 4, 5, 2)).astype(np.float32)
    t = np.array([0, 250, 999])
    a = ref.alphas_cumprod.numpy().astype(np.float64)[t][:, None, None, None]
    target = {"epsilon": eps, "sample": x0,
              "v_prediction": np.sqrt(a) * eps - np.sqrt(1 - a) * x0}[kind]
    got = L.output_function(name, sched, jnp.asarray(out), jnp.asarray(x0), jnp.asarray(eps),
                            jnp.asarray(t))
    if name == "weighted-mse":
        # D-TRAK: weights = betas / (2 * alphas * (1 - alphas_cumprod)), from the torch scheduler.
        w = (ref.betas / (2 * ref.alphas * (1 - ref.alphas_cumprod))).numpy()[t]
        want = w * np_output("loss", out, target)
    else:
        want = np_output(name, out, target)
    assert got.shape == (3,)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=1e-6)
    # One example, scalar t: same numbers.
    one = L.output_function(name, sched, jnp.asarray(out[1]), jnp.asarray(x0[1]),
                            jnp.asarray(eps[1]), int(t[1]))
    assert one.shape == ()
    np.testing.assert_allclose(float(one), want[1], rtol=2e-5, atol=1e-6)


def test_dtrak_aliases_and_unknown_name():
    sched = S.make_schedule()
    z = jnp.ones((1, 2, 2, 1))
    np.testing.assert_allclose(L.output_function("mean-squared-l2-norm", sched, 2 * z, z, z,
                                                 jnp.array([3])), [4.0])
    np.testing.assert_allclose(L.output_function("mean", sched, 2 * z, z, z, jnp.array([3])),
                               [2.0])
    with pytest.raises(ValueError, match="unknown output function"):
        L.output_function("l3-norm", sched, z, z, z, jnp.array([3]))


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_elbo_equals_gaussian_kl_float64(kind):
    """'elbo' = KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) / D with the posterior variance (t >= 1)
    and the Gaussian-decoder NLL with variance beta_0 (t = 0), up to constants."""
    with jax.enable_x64(True):
        sched = S.make_schedule(**SD, prediction_type=kind, dtype=jnp.float64)
        rng = np.random.default_rng(1)
        shape = (4, 3, 3, 2)
        x0, eps, out = (rng.standard_normal(shape) for _ in range(3))
        t = np.array([0, 1, 300, 999])
        got = np.asarray(L.output_function("elbo", sched, jnp.asarray(out), jnp.asarray(x0),
                                           jnp.asarray(eps), jnp.asarray(t)))
        ab = np.asarray(sched.alphas_cumprod, np.float64)
        # Per-step alpha/beta implied by abar (as DDPMScheduler.step does), so the reference is
        # exact in float64 although abar was accumulated in float32.
        al = ab / np.concatenate([[1.0], ab[:-1]])
        be = 1 - al
        want = []
        for i, ti in enumerate(t):
            a = ab[ti]
            xt = np.sqrt(a) * x0[i] + np.sqrt(1 - a) * eps[i]
            if kind == "epsilon":
                x0h = (xt - np.sqrt(1 - a) * out[i]) / np.sqrt(a)
            else:
                x0h = np.sqrt(a) * xt - np.sqrt(1 - a) * out[i]
            if ti == 0:
                want.append(np.mean((x0[i] - x0h) ** 2) / (2 * be[0]))
                continue
            ap = ab[ti - 1]
            var = (1 - ap) / (1 - a) * be[ti]
            mean = lambda z: (np.sqrt(ap) * be[ti] / (1 - a) * z
                              + np.sqrt(al[ti]) * (1 - ap) / (1 - a) * xt)
            want.append(np.mean((mean(x0[i]) - mean(x0h)) ** 2) / (2 * var))
        np.testing.assert_allclose(got, want, rtol=1e-9)
        if kind == "epsilon":  # closed form on the eps error, t >= 1 (Ho et al. eq. 12)
            w = be[t[1:]] / (2 * al[t[1:]] * (1 - ab[t[1:] - 1]))
            np.testing.assert_allclose(got[1:], w * ((eps - out) ** 2).mean((1, 2, 3))[1:],
                                       rtol=1e-9)
            np.testing.assert_allclose(got[0], ((eps - out) ** 2)[0].mean() / (2 * al[0]),
                                       rtol=1e-9)


def test_timestep_strategies():
    np.testing.assert_array_equal(L.timesteps_uniform(10), np.arange(0, 1000, 100))
    np.testing.assert_array_equal(L.timesteps_uniform(100), np.arange(0, 1000, 10))
    np.testing.assert_array_equal(L.timesteps_uniform(3, T=10), [0, 3, 6])
    np.testing.assert_array_equal(L.timesteps_cumulative(5), np.arange(5))
    r = np.asarray(L.timesteps_random(jax.random.PRNGKey(0), 20))
    assert r.shape == (20,) and len(set(r.tolist())) == 20
    assert (np.diff(r) > 0).all() and r.min() >= 0 and r.max() < 1000
    r2 = np.asarray(L.timesteps_random(jax.random.PRNGKey(1), 20))
    assert not np.array_equal(r, r2)
    with pytest.raises(ValueError):
        L.timesteps_uniform(0)


def test_fixed_noise_depends_only_on_seed_and_t():
    a = L.fixed_noise(0, 100, (4, 4, 3))
    np.testing.assert_array_equal(a, L.fixed_noise(0, 100, (4, 4, 3)))
    jitted = jax.jit(lambda t: L.fixed_noise(0, t, (4, 4, 3)))(jnp.int32(100))
    np.testing.assert_array_equal(a, jitted)
    assert not np.allclose(a, L.fixed_noise(0, 101, (4, 4, 3)))
    assert not np.allclose(a, L.fixed_noise(1, 100, (4, 4, 3)))
    big = L.fixed_noise(3, 7, (64, 64, 4))
    assert abs(float(big.mean())) < 0.05 and abs(float(big.std()) - 1) < 0.05


# ----------------------------------------------------------------------------- averaged output

H, W, C, D = 4, 4, 3, 5


def init_params(seed=0):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.standard_normal((C, C)) * 0.5, jnp.float32),
            "b": jnp.asarray(rng.standard_normal((C,)) * 0.1, jnp.float32),
            "p": jnp.asarray(rng.standard_normal((D, C)) * 0.3, jnp.float32)}


def model(params, x, t, cond):
    """Tiny denoiser: per-pixel channel mixing + time + conditioning. x[B,H,W,C], cond[B,D]."""
    s = (t.astype(x.dtype) / 1000.0)[:, None, None, None]
    h = jnp.einsum("bhwc,cd->bhwd", x, params["w"]) + params["b"] * s
    h = h + jnp.einsum("bk,kc->bc", cond, params["p"])[:, None, None, :]
    return jnp.tanh(h) + 0.1 * x


def data(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.uniform(-1, 1, (n, H, W, C)), jnp.float32),
            jnp.asarray(rng.standard_normal((n, D)), jnp.float32))


@pytest.mark.parametrize("name", L.OUTPUT_FUNCTIONS)
def test_averaged_output_equals_direct_numpy_loop(name):
    sched = S.make_schedule(**SD)
    params = init_params()
    x0, cond = data(1)
    ts = L.timesteps_uniform(5)
    got = L.averaged_output(name, lambda x, t, c: model(params, x, t, c), sched, x0[0], cond[0],
                            ts, noise_seed=7)
    vals = []
    for t in ts:
        n = L.fixed_noise(7, int(t), (H, W, C))[None]
        xt = S.add_noise(sched, x0, n, jnp.array([t]))
        out = model(params, xt, jnp.array([t]), cond)
        vals.append(float(L.output_function(name, sched, out, x0, n, jnp.array([t]))[0]))
    np.testing.assert_allclose(float(got), np.mean(vals), rtol=1e-5, atol=1e-7)
    if name in ("loss", "square"):  # and fully by hand for the two D-TRAK defaults
        hand = []
        for t in ts:
            n = np.asarray(L.fixed_noise(7, int(t), (H, W, C)))
            a = float(sched.alphas_cumprod[t])
            xt = np.sqrt(a) * np.asarray(x0[0]) + np.sqrt(1 - a) * n
            o = np.asarray(model(params, jnp.asarray(xt)[None], jnp.array([t]), cond))[0]
            hand.append(np.mean((o - n) ** 2) if name == "loss" else np.mean(o ** 2))
        np.testing.assert_allclose(float(got), np.mean(hand), rtol=1e-5)


@pytest.mark.parametrize("name", ["loss", "square", "linf-norm", "elbo"])
def test_vmap_grad_equals_per_example_loop(name):
    sched = S.make_schedule(**SD, prediction_type="v_prediction" if name == "elbo" else "epsilon")
    params = init_params(1)
    x0, cond = data(4, seed=2)
    ts = L.timesteps_uniform(4)

    def f(p, x, c):
        return L.averaged_output(name, lambda xx, t, cc: model(p, xx, t, cc), sched, x, c, ts,
                                 noise_seed=3)

    per_ex = jax.jit(jax.vmap(jax.grad(f), in_axes=(None, 0, 0)))(params, x0, cond)
    grad_one = jax.jit(jax.grad(f))  # the per-example loop, one example at a time
    for i in range(4):
        gi = grad_one(params, x0[i], cond[i])
        for k in params:
            np.testing.assert_allclose(per_ex[k][i], gi[k], rtol=1e-5, atol=1e-6)
    assert not np.allclose(per_ex["w"][0], per_ex["w"][1])  # genuinely per example
    if name != "loss":
        return
    # Chunked evaluation over timesteps gives the same gradients.
    def f_chunked(p, x, c):
        return L.averaged_output(name, lambda xx, t, cc: model(p, xx, t, cc), sched, x, c, ts,
                                 noise_seed=3, timestep_batch=2)
    chunked = jax.jit(jax.vmap(jax.grad(f_chunked), in_axes=(None, 0, 0)))(params, x0, cond)
    for k in params:
        np.testing.assert_allclose(chunked[k], per_ex[k], rtol=1e-5, atol=1e-6)


def test_averaged_output_with_explicit_noise_and_no_cond():
    sched = S.make_schedule()
    params = init_params()
    x0, _ = data(1)
    ts = jnp.array([500, 500])
    noise = jax.random.normal(jax.random.PRNGKey(0), (2, H, W, C))
    eps_fn = lambda x, t, c: model(params, x, t, jnp.zeros((x.shape[0], D)))
    got = L.averaged_output("loss", eps_fn, sched, x0[0], None, ts, noise=noise)
    want = np.mean([float(L.dsm_loss(sched, eps_fn(S.add_noise(sched, x0, noise[k][None],
                                                               jnp.array([500])),
                                                   jnp.array([500]), None),
                                     x0, noise[k][None], jnp.array([500]))[0])
                    for k in range(2)])
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
