"""CGI-DM: masks, PGD invariants, toy membership with analytic denoisers, calibration, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattrib.authentication import cgi_dm, cgi_dm_pgd
from jaxattrib.authentication.cgi_dm import CGIDMConfig
from jaxattrib.authentication.similarity import psnr
from jaxattrib.diffusion.schedule import make_schedule
from jaxattrib.metrics import roc_auc
from tiny import GMM_SIG_M, GMM_SIG_P, gmm_toy_models, make_pixel_pipeline

SCHED = make_schedule(1000)
HW, C = 16, 1
SIG_P, SIG_M = GMM_SIG_P, GMM_SIG_M  # broad pretrained prior; narrow member components


# ----------------------------------------------------------------------------- toy denoisers
# (the analytic stand-ins live in tests/tiny.py)


def toy_models(members, pi=0.5):
    """(pretrained, fine-tuned) analytic denoisers: the prior N(0, SIG_P² I) vs a mixture with
    narrow components around ``members`` (``tiny.gmm_toy_models``)."""
    return gmm_toy_models(members, pi, sched=SCHED)


def toy_images(seed, n):
    return SIG_P * jax.random.normal(jax.random.PRNGKey(seed), (n, HW, HW, C))


TOY_CFG = CGIDMConfig(eps_radius=12.0, step_size=1.0, num_steps=40, t_min=20, t_max=300,
                      n_noise=2, scale="none", clamp=10.0)


# ----------------------------------------------------------------------------- masks


def _loop_mask(h, w, c, block, cells):
    m = np.zeros((h, w, c), np.float32)
    half = block // 2
    for i in range(h):
        for j in range(w):
            if ((i % block) // half, (j % block) // half) in cells:
                m[i, j, :] = 1
    return m


def test_checkerboard_sd_default():
    cfg = CGIDMConfig()
    m = np.asarray(cgi_dm.make_mask("checkerboard", (64, 64, 4), cfg))
    assert m.shape == (64, 64, 4) and m.mean() == 0.5
    np.testing.assert_array_equal(m, _loop_mask(64, 64, 4, 4, {(0, 0), (1, 1)}))
    # 16x16 grid of 4x4 blocks, each with exactly its top-left and bottom-right 2x2 cells kept
    blocks = m[..., 0].reshape(16, 4, 16, 4).transpose(0, 2, 1, 3)
    expect = np.zeros((4, 4)); expect[:2, :2] = 1; expect[2:, 2:] = 1
    assert all(np.array_equal(blocks[i, j], expect) for i in range(16) for j in range(16))


def test_checkerboard_other_sizes_and_patterns():
    cfg = CGIDMConfig(block=6, keep_cells=((0, 1),))
    m = np.asarray(cgi_dm.make_mask("checkerboard", (2, 12, 18, 3), cfg))
    np.testing.assert_array_equal(m[1], _loop_mask(12, 18, 3, 6, {(0, 1)}))
    assert m.mean() == 0.25
    m8 = np.asarray(cgi_dm.make_mask("checkerboard", (8, 8, 2), CGIDMConfig()))
    assert m8.mean() == 0.5 and m8[0, 0, 0] == 1 and m8[0, 2, 0] == 0 and m8[2, 2, 1] == 1


def test_random_block_and_blur_masks():
    cfg = CGIDMConfig(mask_kind="random_block", keep_rate=0.3)
    m = np.asarray(cgi_dm.make_mask("random_block", (4, 64, 64, 2), cfg, jax.random.PRNGKey(0)))
    cells = m[..., 0].reshape(4, 32, 2, 32, 2)
    assert (cells == cells[:, :, :1, :, :1]).all()  # constant over each 2x2 cell
    assert (m[..., 0] == m[..., 1]).all()
    assert abs(m.mean() - 0.3) < 0.03
    assert not np.array_equal(m[0], m[1])
    assert np.asarray(cgi_dm.make_mask("blur", (8, 8, 3), CGIDMConfig())).sum() == 0
    bm = np.asarray(cgi_dm.batch_masks(cfg, (3, 16, 16, 1), jax.random.PRNGKey(1)))
    bm2 = np.asarray(cgi_dm.batch_masks(cfg, (1, 16, 16, 1), jax.random.PRNGKey(1), 2))
    np.testing.assert_array_equal(bm[2], bm2[0])  # per-image masks, independent of the batch
    with pytest.raises(ValueError, match="PRNG key"):
        cgi_dm.make_mask("random_block", (8, 8, 1), cfg)


def test_scale_rule():
    cfg = CGIDMConfig()
    assert cfg.scaled((64, 64, 4)) == (70.0, 2.0)
    r, s = cfg.scaled((16, 16, 4))
    assert np.isclose(r, 70 / 4) and np.isclose(s, 0.5)
    assert CGIDMConfig(scale="none").scaled((8, 8, 1)) == (70.0, 2.0)


# ----------------------------------------------------------------------------- PGD invariants


def test_pgd_known_half_ball_clamp_and_ascent():
    members = toy_images(0, 4)
    pre, ft = toy_models(members)
    mask = cgi_dm.make_mask("checkerboard", (HW, HW, C), TOY_CFG)
    z0 = members
    cfg = CGIDMConfig(**{**TOY_CFG.__dict__, "eps_radius": 3.0, "clamp": 0.6})
    z, trace = cgi_dm.pgd_invert(pre, ft, SCHED, z0, mask, None, cfg, jax.random.PRNGKey(1),
                                 return_trace=True)
    z, m = np.asarray(z), np.broadcast_to(np.asarray(mask), z.shape)
    # known half re-imposed exactly
    np.testing.assert_array_equal(z[m == 1], np.asarray(z0)[m == 1])
    # within the L2 ball around z_init = M*z0 (unknown half of z_init is 0)
    norms = np.sqrt(((z * (1 - m)) ** 2).sum(axis=(1, 2, 3)))
    assert (norms <= 3.0 + 1e-4).all() and (norms > 2.0).all()
    assert np.abs(z[m == 0]).max() <= 0.6 + 1e-6
    assert trace.shape == (cfg.num_steps, 4)

    # objective increases (fixed draws shared by start and end point)
    z2 = cgi_dm.pgd_invert(pre, ft, SCHED, z0, mask, None, TOY_CFG, jax.random.PRNGKey(1))
    k1, k2 = jax.random.split(jax.random.PRNGKey(5))
    t = jax.random.randint(k1, (32, 4), TOY_CFG.t_min, TOY_CFG.t_max + 1)
    n = jax.random.normal(k2, (32,) + z0.shape)
    obj = jax.jit(lambda z: cgi_dm.contrastive_objective(pre, ft, SCHED, z, t, n))
    j0, j1 = obj(mask * z0), obj(z2)
    assert (j1 > j0 + 0.1).all(), (j0, j1)


def test_pgd_batch_and_mesh_invariance():
    """An image's recovery depends on neither its batch nor the mesh. In float64: where the two
    models agree (objective ~0) the normalised gradient direction is rounding noise, so float32
    runs with different fusions legitimately diverge there."""
    from jaxattrib.parallel import make_mesh
    with jax.enable_x64(True):
        members = toy_images(0, 4).astype(jnp.float64)
        pre, ft = toy_models(members)
        cfg = CGIDMConfig(**{**TOY_CFG.__dict__, "num_steps": 5})
        mask = cgi_dm.make_mask("checkerboard", (HW, HW, C), cfg)
        x = jnp.concatenate([members[:2], toy_images(3, 1).astype(jnp.float64)])
        key = jax.random.PRNGKey(7)
        full = np.asarray(cgi_dm.pgd_invert(pre, ft, SCHED, x, mask, None, cfg, key))
        # change another image of the batch: rows 1 and 2 are unchanged (same compiled shape)
        other = x.at[0].set(members[3])
        alt = np.asarray(cgi_dm.pgd_invert(pre, ft, SCHED, other, mask, None, cfg, key))
        np.testing.assert_allclose(alt[1:], full[1:], atol=1e-6)
        assert np.abs(alt[0] - full[0]).max() > 0.1
        sharded = np.asarray(cgi_dm.pgd_invert(pre, ft, SCHED, x, mask, None, cfg, key,
                                               mesh=make_mesh(8)))
        np.testing.assert_allclose(sharded, full, atol=1e-6)
        assert np.abs(full - np.asarray(mask * x)).max() > 0.1  # PGD moved


def test_pgd_draws_fresh_noise_every_step():
    """(t, ε) are redrawn at every PGD step (stochastic ascent on the expectation, as the
    authors' code), per image, independent of the batch."""
    keys = cgi_dm.image_keys(jax.random.PRNGKey(0), 3)
    t0, n0 = cgi_dm_pgd._draws(keys, 0, (HW, HW, C), TOY_CFG, jnp.float32)
    t1, n1 = cgi_dm_pgd._draws(keys, 1, (HW, HW, C), TOY_CFG, jnp.float32)
    assert t0.shape == (TOY_CFG.n_noise, 3) and n0.shape == (TOY_CFG.n_noise, 3, HW, HW, C)
    assert np.abs(np.asarray(n0 - n1)).min() < 1 and np.abs(np.asarray(n0 - n1)).max() > 1
    assert not np.array_equal(np.asarray(t0), np.asarray(t1))
    t_b, n_b = cgi_dm_pgd._draws(keys[1:], 1, (HW, HW, C), TOY_CFG, jnp.float32)
    np.testing.assert_array_equal(np.asarray(n_b), np.asarray(n1[:, 1:]))


def test_manifold_projection_exact_on_gaussian_prior():
    """For the pretrained toy prior N(0, σ² I) the projection is the posterior mean
    ``sqrt(a) σ² / (a σ² + 1 − a) · x_t`` of the noised input; in PGD (step 0, one step) it
    replaces exactly the unknown half, with the projection model and noise stream named."""
    members = toy_images(0, 2)
    pre, ft = toy_models(members)
    z = toy_images(5, 2)
    noise = jax.random.normal(jax.random.PRNGKey(9), z.shape)
    t = 200
    a = float(SCHED.alphas_cumprod[t])
    x_t = np.sqrt(a) * np.asarray(z) + np.sqrt(1 - a) * np.asarray(noise)
    want = np.sqrt(a) * SIG_P ** 2 / (a * SIG_P ** 2 + 1 - a) * x_t
    got = cgi_dm.manifold_project(pre, SCHED, z, t, noise)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)

    mask = cgi_dm.make_mask("checkerboard", (HW, HW, C), TOY_CFG)
    m = np.broadcast_to(np.asarray(mask), z.shape)
    key = jax.random.PRNGKey(3)
    keys = cgi_dm.image_keys(key, 2)
    base = dict(TOY_CFG.__dict__, step_size=0.0, eps_radius=1e3, clamp=1e3, project_t=t)
    # one step, projected: the pretrained model's x̂0 with the step-0 projection noise;
    # two steps with project_every=2: only after the second one (step-1 noise), fine-tuned model
    for which, fn, steps, every in (("pretrained", pre, 1, 1), ("finetuned", ft, 2, 2)):
        cfg = CGIDMConfig(**{**base, "project_model": which, "num_steps": steps,
                             "project_every": every})
        rec = np.asarray(cgi_dm.pgd_invert(pre, ft, SCHED, members, mask, None, cfg, key))
        pn = cgi_dm_pgd._proj_noise(keys, steps - 1, (HW, HW, C), jnp.float32)
        ref = np.asarray(cgi_dm.manifold_project(fn, SCHED, mask * members, t, pn))
        np.testing.assert_array_equal(rec[m == 1], np.asarray(members)[m == 1])
        np.testing.assert_allclose(rec[m == 0], ref[m == 0], rtol=1e-4, atol=1e-5)
    # the fine-tuned toy's projection (its components are the members) fills the unknown half
    # of a member's masked start toward the member; the pretrained prior's does not
    ps = lambda r: float(np.mean(np.asarray(psnr(jnp.asarray(r), members))))  # noqa: E731
    known = mask * members
    rec = {"finetuned": known, "pretrained": known}
    for i in range(3):   # a few projections, the known half re-imposed, as in PGD
        for which, fn in (("pretrained", pre), ("finetuned", ft)):
            n = cgi_dm_pgd._proj_noise(keys, i, (HW, HW, C), jnp.float32)
            rec[which] = known + (1 - mask) * cgi_dm.manifold_project(fn, SCHED, rec[which],
                                                                      t, n)
    start = ps(known)
    assert ps(rec["finetuned"]) > start + 10 and ps(rec["pretrained"]) < start + 1


def test_projection_config_errors():
    with pytest.raises(ValueError, match="project_model='vae'"):
        CGIDMConfig(project_model="vae")
    with pytest.raises(ValueError, match="project_t=-1"):
        CGIDMConfig(project_t=-1)
    with pytest.raises(ValueError, match="project_every=0; expected an integer >= 1"):
        CGIDMConfig(project_every=0)
    with pytest.raises(ValueError, match="project_every=2.5"):
        CGIDMConfig(project_every=2.5)
    # a projection timestep beyond the schedule is refused (it would index out of range)
    z = jnp.zeros((1, HW, HW, C))
    for field in ("project_t", "t_max"):
        with pytest.raises(cgi_dm.CGIDMError, match=f"{field}=1000: the schedule has timesteps "
                                                    r"0\.\.999"):
            cgi_dm.pgd_invert(None, None, SCHED, z, jnp.ones_like(z[0]), None,
                              CGIDMConfig(**{field: 1000}), jax.random.PRNGKey(0))


# ----------------------------------------------------------------------------- toy membership


def test_toy_membership_auc_and_authenticate():
    members = toy_images(0, 6)
    holdout = toy_images(1, 6)
    calib = toy_images(2, 6)  # non-members used for calibration only
    pre, ft = toy_models(members)
    sim = lambda a, b: psnr(a, b)  # noqa: E731
    res = cgi_dm.authenticate(jnp.concatenate([members, holdout]), pre, ft, SCHED, TOY_CFG,
                              jax.random.PRNGKey(0), holdout_images=calib, similarity=sim,
                              image_size=HW, fpr=0.2)
    labels = np.r_[np.ones(6), np.zeros(6)]
    s = res["scores"]
    assert roc_auc(s, labels) >= 0.95, s
    assert res["decisions"][:6].mean() >= 5 / 6 and res["decisions"][6:].mean() <= 2 / 6
    assert (res["p_values"][:6] <= 1 / 7 + 1e-12).sum() >= 5
    np.testing.assert_allclose(res["p_values"],
                               cgi_dm.empirical_p_values(s, res["calibration"]["holdout_scores"]))
    assert res["recovered"].shape == res["masked"].shape == (12, HW, HW, C)
    assert res["calibration"]["split"] == "holdout_images"
    # members are recovered: closer to the original than the masked start; hold-outs are not
    start = np.asarray(psnr(jnp.concatenate([members, holdout]), res["masked"]))
    assert (s[:6] > start[:6]).all() and (s[:6] - start[:6]).mean() > 5
    assert (s[6:] < start[6:]).all()

    # the plain loss-gap baseline also separates this easy toy; masked-only similarity is chance
    gap = cgi_dm.loss_gap_scores(jnp.concatenate([members, holdout]), pre, ft, SCHED,
                                 jax.random.PRNGKey(3), t_min=20, t_max=300)
    assert roc_auc(gap, labels) >= 0.9
    ms = cgi_dm.masked_similarity_scores(jnp.concatenate([members, holdout]), TOY_CFG,
                                         jax.random.PRNGKey(0), similarity=sim)
    mask = np.asarray(cgi_dm.make_mask("checkerboard", (HW, HW, C), TOY_CFG))
    x = np.asarray(jnp.concatenate([members, holdout]))
    np.testing.assert_allclose(ms, np.asarray(psnr(x, x * mask)), rtol=1e-6)


def test_loss_gap_uses_shared_fixed_draws():
    members = toy_images(0, 3)
    pre, ft = toy_models(members)
    key = jax.random.PRNGKey(4)
    g = cgi_dm.loss_gap_scores(members, pre, ft, SCHED, key, n_draws=3, batch_size=2)
    kt, kn = jax.random.split(key)
    t = jax.random.randint(kt, (3,), 1, 1000)
    n = jax.random.normal(kn, (3,) + members.shape[1:])
    ref = jax.jit(lambda z: cgi_dm.contrastive_objective(pre, ft, SCHED, z, t[:, None],
                                                         n[:, None]))
    for i in range(3):
        np.testing.assert_allclose(g[i], ref(members[i:i + 1])[0], rtol=1e-5)
    # a Partial with the parameters (here the member means) bound is an equivalent denoiser
    def ft_params(mem, z, t, cond):
        return toy_models(mem)[1](z, t, cond)
    gp = cgi_dm.loss_gap_scores(members, pre, jax.tree_util.Partial(ft_params, members), SCHED,
                                key, n_draws=3, batch_size=2)
    np.testing.assert_allclose(gp, g, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- calibration


def test_p_values_and_thresholds():
    rng = np.random.default_rng(0)
    null = rng.normal(size=50)
    s = np.r_[null.max() + 1, null.min() - 1, null[3], rng.normal(size=5)]
    p = cgi_dm.empirical_p_values(s, null)
    ref = [(1 + np.sum(null >= v)) / 51 for v in s]
    np.testing.assert_allclose(p, ref)
    assert p[0] == 1 / 51 and p[1] == 1.0
    for fpr in (0.0, 0.1, 0.5):
        thr = cgi_dm.fpr_threshold(null, fpr)
        assert np.mean(null >= thr) <= fpr + 1e-12
        # minimal: the next-lower distinct null score would exceed the budget
        lower = null[null < thr]
        if lower.size:
            assert np.mean(null >= lower.max()) > fpr
    members = null + 10
    thr = cgi_dm.calibrate(null, members, target="accuracy")
    assert null.max() < thr < members.min()
    with pytest.raises(ValueError, match="member"):
        cgi_dm.calibrate(null, None, target="accuracy")


# ----------------------------------------------------------------------------- errors


def test_check_compatible_names_paths():
    a = {"down": {"kernel": jnp.zeros((3, 3, 4, 8))}, "mid": {"bias": jnp.zeros(8)}}
    b = {"down": {"kernel": jnp.zeros((3, 3, 4, 16))}, "mid": {"bias": jnp.zeros(8)}}
    cgi_dm.check_compatible(a, a)
    with pytest.raises(cgi_dm.IncompatibleModelsError, match=r"\['down'\]\['kernel'\].*shape"):
        cgi_dm.check_compatible(a, b)
    c = {"down": a["down"], "mid2": {"bias": jnp.zeros(8)}}
    with pytest.raises(cgi_dm.IncompatibleModelsError, match="mid2.*only in the second"):
        cgi_dm.check_compatible(a, c)
    from jaxattrib.models.unet import tiny_config
    cgi_dm.check_same_config(tiny_config(), tiny_config())
    with pytest.raises(cgi_dm.IncompatibleModelsError, match="sample_size: 8 vs 16"):
        cgi_dm.check_same_config(tiny_config(), tiny_config(sample_size=16))


def test_wrong_image_size_and_nan_errors():
    members = toy_images(0, 2)
    pre, ft = toy_models(members)
    with pytest.raises(cgi_dm.ImageSizeError, match="16x16 but the model expects 32x32"):
        cgi_dm.authenticate(members, pre, ft, SCHED, TOY_CFG, jax.random.PRNGKey(0),
                            holdout_scores=[0.0], image_size=32)
    with pytest.raises(cgi_dm.IncompatibleModelsError, match=r"\['w'\]: shape \(2,\) vs \(3,\)"):
        cgi_dm.authenticate(members, pre, ft, SCHED, TOY_CFG, jax.random.PRNGKey(0),
                            holdout_scores=[0.0], check_params=({"w": jnp.zeros(2)},
                                                                {"w": jnp.zeros(3)}))
    with pytest.raises(cgi_dm.ImageSizeError, match="holdout_images"):
        cgi_dm.authenticate(members, pre, ft, SCHED, TOY_CFG, jax.random.PRNGKey(0),
                            holdout_images=toy_images(1, 2)[:, :8], image_size=16)

    def ft_nan(z, t, cond):  # NaN for the images flagged in cond
        return ft(z, t) + jnp.where(cond[:, None, None, None] > 0, jnp.nan, 0.0)

    cfg = CGIDMConfig(**{**TOY_CFG.__dict__, "num_steps": 3})
    x = toy_images(1, 4)
    mask = cgi_dm.make_mask("checkerboard", (HW, HW, C), cfg)
    flags = jnp.array([0.0, 1.0, 0.0, 1.0])
    with pytest.raises(cgi_dm.NonFiniteObjectiveError, match=r"images \[1, 3\]"):
        cgi_dm.pgd_invert(pre, ft_nan, SCHED, x, mask, flags, cfg, jax.random.PRNGKey(0))
    with pytest.raises(cgi_dm.NonFiniteObjectiveError, match=r"images \[2\]"):
        cgi_dm.pgd_invert(pre, ft, SCHED, x.at[2, 0, 0, 0].set(jnp.nan), mask, None, cfg,
                          jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="mask_kind"):
        CGIDMConfig(mask_kind="stripes")


def test_loss_gap_nan_names_images():
    members = toy_images(0, 3)
    pre, ft = toy_models(members)

    def ft_nan(z, t, cond):  # NaN for the images flagged in cond
        return ft(z, t) + jnp.where(cond[:, None, None, None] > 0, jnp.nan, 0.0)

    with pytest.raises(cgi_dm.NonFiniteObjectiveError, match=r"loss gap.*images \[2\]"):
        cgi_dm.loss_gap_scores(members, pre, ft_nan, SCHED, jax.random.PRNGKey(0),
                               cond=jnp.array([0.0, 0.0, 1.0]), n_draws=2, batch_size=2)


@pytest.fixture(scope="module")
def two_pipelines(tmp_path_factory):
    """Two tiny pixel pipelines whose UNets differ in width (8 vs 16 base channels); zero
    weights (tests/tiny.py)."""
    root = tmp_path_factory.mktemp("cgi_pipes")
    return [make_pixel_pipeline(root, name=name, words=["a", "red", "circle"], zero_weights=True,
                                unet_overrides={"block_out_channels": (width, 16)})
            for name, width in (("pre", 8), ("wide", 16))]


def test_cli_refuses_mismatched_models_and_wrong_size(two_pipelines, tmp_path):
    """`jaxattrib cgi-dm`'s loading: a fine-tuned model with another UNet config and an image
    size the model does not take are ConfigErrors that name the field, before any PGD work
    (differing parameter shapes: test_check_compatible_names_paths, which load_unet calls)."""
    from jaxattrib.runs.cgi_dm import run_cgi_dm
    from jaxattrib.config import ConfigError, load_config
    from jaxattrib.models.pipeline import load_pipeline
    from jaxattrib.runs.specs import load_unet
    pre, wide = two_pipelines
    pipe = load_pipeline(pre)
    with pytest.raises(ConfigError, match=r"model.finetuned=.*UNet config differs"):
        load_unet(str(wide), pipe, "model.finetuned")
    params, _ = load_unet(str(pre), pipe, "model.finetuned")  # the same architecture loads
    cgi_dm.check_compatible(pipe.unet_params, params)
    (tmp_path / "c").mkdir()
    (tmp_path / "r").mkdir()
    cfg = load_config("cgi_dm", [f"model.pipeline='{pre}'", f"model.finetuned='{pre}'",
                                 f"data.candidates='{tmp_path / 'c'}'",
                                 f"data.reference='{tmp_path / 'r'}'", "data.size=16"])
    with pytest.raises(ConfigError, match=r"data.size=16: images would be \[16, 16, 3\]; the "
                                          r"model works on \[8, 8, 3\] images \(UNet sample_size "
                                          r"8, pixel space\); set data.size=8 or 0"):
        run_cgi_dm(cfg, tmp_path / "run", progress=False)
