"""Tests of source-model attribution (jaxattrib.authentication.source_model) on toy models."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from jaxattrib.authentication import source_model as SM
from jaxattrib.authentication import source_model_zoo as zoo_lib
from jaxattrib.authentication.similarity import psnr
from jaxattrib.data.dataset import ImageDataset
from jaxattrib.diffusion.schedule import make_schedule


# ------------------------------------------------------------------------------ distances
def test_rmse_distance_is_in_unit_pixel_scale():
    rng = np.random.default_rng(0)
    a = rng.uniform(-1, 1, (3, 8, 8, 3)).astype(np.float32)
    assert float(SM.reconstruction_distance(-np.ones_like(a), np.ones_like(a))[0]) == 1.0
    np.testing.assert_allclose(SM.reconstruction_distance(a, a), 0.0)
    # a constant shift of 0.3 in [-1, 1] units is 0.15 in [0, 1] units: exactly delta0
    np.testing.assert_allclose(SM.reconstruction_distance(a, a + 0.3), 0.15, rtol=1e-5)
    b = rng.uniform(-1, 1, a.shape).astype(np.float32)
    d = np.asarray(SM.reconstruction_distance(a, b))
    np.testing.assert_allclose(d, np.sqrt((((a - b) / 2) ** 2).mean(axis=(1, 2, 3))), rtol=1e-5)
    # PSNR with range 1 on [0, 1] images is -20 log10(d)
    np.testing.assert_allclose(np.asarray(psnr(a, b)), -20 * np.log10(d), rtol=1e-4)
    # leading axes are kept; 1 - SSIM is 0 for identical images and positive otherwise
    assert SM.reconstruction_distance(a[None], b[None]).shape == (1, 3)
    s = np.asarray(SM.reconstruction_distance(a, b, "ssim"))
    assert np.allclose(SM.reconstruction_distance(a, a, "ssim"), 0.0, atol=1e-5) and (s > 0.5).all()
    with pytest.raises(SM.SourceModelError):
        SM.reconstruction_distance(a, b[:2])
    with pytest.raises(SM.SourceModelError, match="metric"):
        SM.reconstruction_distance(a, b, "l1")


# ------------------------------------------------------------------------------ instance level
def test_confidence_is_the_hit_rate():
    rng = np.random.default_rng(1)
    src = rng.uniform(-0.5, 0.5, (10, 6, 6, 3)).astype(np.float32)
    shift = np.array([0.0, 0.1, 0.2, 0.28, 0.29, 0.31, 0.4, 0.6, 1.0, -0.25], np.float32)
    sus = src + shift[:, None, None, None]                    # d_i = |shift_i| / 2
    np.testing.assert_allclose(SM.instance_distances(src, sus), np.abs(shift) / 2, atol=1e-6)
    assert SM.instance_confidence(src, sus) == pytest.approx(6 / 10)      # d < 0.15
    assert SM.instance_confidence(src, sus, delta0=0.1) == pytest.approx(3 / 10)
    # several seeds: the rate over all (seed, key sample) pairs
    two = np.stack([sus, src + 1.0])
    assert SM.instance_confidence(np.stack([src, src]), two) == pytest.approx(6 / 20)


def test_calibrate_on_innocent_respects_the_budget():
    c = np.array([0.0, 0.1, 0.1, 0.2, 0.3])
    t0 = SM.calibrate_on_innocent(c, fpr=0.0)
    assert t0 > 0.3 and t0 == np.nextafter(0.3, 1)
    assert SM.calibrate_on_innocent(c, fpr=0.2) == pytest.approx(0.25)   # 1 of 5 above
    assert SM.calibrate_on_innocent(c, fpr=0.6) == pytest.approx(0.15)   # 2 of 5 above
    assert SM.calibrate_on_innocent(c, fpr=1.0) == 0.0
    for fpr in (0.0, 0.2, 0.4, 0.6, 0.8):
        tau = SM.calibrate_on_innocent(c, fpr)
        assert (c >= tau).mean() <= fpr + 1e-12


# ------------------------------------------------------------------------------ Strategy 1
def _toy_eps_fn(x, t, ctx):
    """eps = tanh(x)/2 + s * (t/T) * x with s = ctx[:, 0, 0]; the empty prompt has s = 0."""
    s = ctx[:, 0, 0]
    return 0.5 * jnp.tanh(x) + (s * t / 1000.0)[:, None, None, None] * x


def test_memorization_signal_ground_truth_and_detection_selection():
    P, L, D = 12, 3, 4
    scales = np.array([0.1, 2.0, 0.3, 1.5, 0.0, 0.9, 3.0, 0.2, 1.1, 0.05, 2.5, 0.7], np.float32)
    ctx = np.zeros((P, L, D), np.float32)
    ctx[:, 0, 0] = scales
    ctx[:, 1:] = np.random.default_rng(2).normal(size=(P, L - 1, D))   # irrelevant
    uncond = np.zeros((1, L, D), np.float32)
    sched = make_schedule(1000)
    key = jax.random.PRNGKey(0)
    shape = (4, 4, 2)
    sig = np.asarray(SM.memorization_signal(_toy_eps_fn, sched, ctx, uncond, key,
                                            sample_shape=shape, n_seeds=3, batch_size=5))
    # ground truth: |s| * mean_t(t/T) * mean_s RMS(x_s), with x_s = normal(fold_in(key, s))
    rms = np.mean([np.sqrt(np.mean(np.asarray(jax.random.normal(jax.random.fold_in(key, s),
                                                                shape)) ** 2))
                   for s in range(3)])
    ts = np.array([999, 900, 800]) / 1000.0
    np.testing.assert_allclose(sig, scales * ts.mean() * rms, rtol=1e-5)
    prompts = [f"prompt {i}" for i in range(P)]
    ks = SM.select_key_samples(prompts, "detection", n=4, memorization=sig)
    assert list(ks.indices) == [6, 10, 1, 3]                  # the 4 largest scales
    assert ks.prompts == tuple(prompts[i] for i in ks.indices)
    assert np.all(np.diff(ks.scores) <= 0) and ks.strategy == "detection"


# ------------------------------------------------------------------------------ Strategy 2
# 16 prompts in four groups of 4 (index % 4): 0 consistent and idiosyncratic (the key samples),
# 1 consistent but drawn the same by the reference, 2 idiosyncratic but inconsistent,
# 3 neither. Per-prompt noise std sigma_p and template shift are known by construction.
SIGMA = {0: 0.02, 1: 0.02, 2: 0.6, 3: 0.6}
SHIFT = {0: 0.8, 1: 0.0, 2: 0.8, 3: 0.0}


def _template(i):
    return np.random.default_rng(100 + i).uniform(-0.5, 0.5, (8, 8, 3)).astype(np.float32)


def _toy_generator(reference: bool):
    def generate_fn(prompts, key):
        out = []
        for pos, p in enumerate(prompts):
            i = int(p.split()[-1])
            g = i % 4
            base = _template(i) + (SHIFT[g] if reference else 0.0)
            noise = jax.random.normal(jax.random.fold_in(key, pos), base.shape)
            out.append(base + SIGMA[g] * np.asarray(noise))
        return jnp.asarray(np.stack(out))
    return generate_fn


def test_generation_strategy_picks_consistent_idiosyncratic_prompts():
    prompts = [f"prompt {i}" for i in range(16)]
    seeds = [0, 1, 2]
    src = SM.query(_toy_generator(False), prompts, seeds)
    ref = SM.query(_toy_generator(True), prompts, [10, 11])
    assert src.shape == (3, 16, 8, 8, 3)
    np.testing.assert_array_equal(np.asarray(src), np.asarray(
        SM.query(_toy_generator(False), prompts, seeds)))          # seeds reproduce
    within = np.asarray(SM.within_distance(src))
    cross = np.asarray(SM.cross_distance(src, ref))
    # within-distance of a prompt = sigma * sqrt(2) / 2 (RMS of a difference of two noises)
    groups = np.arange(16) % 4
    np.testing.assert_allclose(within, [SIGMA[g] * math.sqrt(2) / 2 for g in groups], rtol=0.15)
    ks = SM.select_key_samples(prompts, "generation", n=4, consistency=within,
                               idiosyncrasy=cross)
    assert sorted(ks.indices) == [0, 4, 8, 12]                  # group 0 exactly
    np.testing.assert_allclose(np.asarray(SM.generation_scores(src, ref))[ks.indices],
                               ks.scores, rtol=1e-6)
    # detection by generation consistency alone cannot tell groups 0 and 1 apart
    det = SM.select_key_samples(prompts, "detection", n=8, consistency=within)
    assert sorted(groups[det.indices]) == [0] * 4 + [1] * 4
    cons = np.asarray(SM.generation_consistency(_toy_generator(False), prompts, seeds))
    np.testing.assert_allclose(cons, within, rtol=1e-6)


def test_random_selection_is_keyed_and_errors():
    prompts = [f"p{i}" for i in range(50)]
    a = SM.select_key_samples(prompts, "random", n=30, key=jax.random.PRNGKey(0))
    b = SM.select_key_samples(prompts, "random", n=30, key=jax.random.PRNGKey(0))
    c = SM.select_key_samples(prompts, "random", n=30, key=jax.random.PRNGKey(1))
    assert len(set(a.indices)) == 30 and list(a.indices) == list(b.indices)
    assert list(a.indices) != list(c.indices) and np.isnan(a.scores).all()
    with pytest.raises(SM.SourceModelError, match="key"):
        SM.select_key_samples(prompts, "random", n=3)
    with pytest.raises(SM.SourceModelError, match="n=60"):
        SM.select_key_samples(prompts, "detection", n=60, memorization=np.zeros(50))
    with pytest.raises(SM.SourceModelError, match="entries"):
        SM.select_key_samples(prompts, "detection", n=3, memorization=np.zeros(5))
    with pytest.raises(SM.SourceModelError, match="needs"):
        SM.select_key_samples(prompts, "generation", n=3, consistency=np.zeros(50))
    with pytest.raises(SM.SourceModelError, match="strategy"):
        SM.select_key_samples(prompts, "oracle", n=3)


# ------------------------------------------------------------------------------ statistical level
def test_probe_features_from_known_distances():
    rng = np.random.default_rng(3)
    src = rng.uniform(-0.5, 0.5, (2, 20, 4, 4, 3)).astype(np.float32)
    shift = rng.uniform(0, 0.6, 20).astype(np.float32)
    sus = src + shift[None, :, None, None, None]
    d = shift.astype(np.float64) / 2
    f = SM.probe_features(src, sus, quantiles=(0.1, 0.5, 0.9), deltas=(0.1, 0.15))
    want = np.r_[np.quantile(d, [0.1, 0.5, 0.9]), d.mean(), (d < 0.1).mean(), (d < 0.15).mean()]
    np.testing.assert_allclose(f, want, rtol=1e-5, atol=1e-6)
    assert len(SM.probe_feature_names((0.1, 0.5, 0.9), (0.1, 0.15))) == f.size
    assert SM.probe_features(src[0], sus[0]).shape == (len(SM.probe_feature_names()),)


def _blobs(n, seed):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.normal(size=(n, 4))
    x[:, 0] += np.where(y == 1, 3.0, -3.0)                 # separable along feature 0
    x[:, 3] = 5.0                                            # a constant feature
    return x.astype(np.float32), y


def test_discriminator_separates_and_is_deterministic():
    x, y = _blobs(60, 0)
    xt, yt = _blobs(40, 1)
    for disc in (SM.Discriminator(), SM.Discriminator(hidden=8)):
        st = disc.fit(x, y, jax.random.PRNGKey(0))
        assert (disc.predict(st, x) == y).all() and (disc.predict(st, xt) == yt).all()
        st2 = disc.fit(x, y, jax.random.PRNGKey(0))
        for a, b in zip(jax.tree.leaves(st), jax.tree.leaves(st2)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        p = np.asarray(disc.predict_proba(st, xt))
        assert np.all((p >= 0) & (p <= 1))


def test_logistic_regression_reaches_the_exact_optimum():
    # non-separable data: the regularised optimum is unique; compare with scipy (float64)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(80, 3))
    y = (x[:, 0] + 0.8 * rng.normal(size=80) > 0.3).astype(int)
    disc = SM.Discriminator(l2=0.05, steps=3000, learning_rate=0.02)
    st = disc.fit(x, y, jax.random.PRNGKey(1))
    z = (x - x.mean(0)) / x.std(0)
    w_pos, w_neg = 0.5 / y.sum(), 0.5 / (y.size - y.sum())
    wts = np.where(y == 1, w_pos, w_neg)

    def obj(v):
        logit = z @ v[:3] + v[3]
        return np.sum(wts * (np.logaddexp(0, logit) - y * logit)) + 0.025 * np.sum(v[:3] ** 2)
    ref = optimize.minimize(obj, np.zeros(4), method="BFGS", options={"gtol": 1e-10}).x
    got = np.r_[np.asarray(st.params["w"]), float(st.params["b"])]
    np.testing.assert_allclose(got, ref, atol=2e-3)


# ------------------------------------------------------------------------------ model zoo
def _dataset(prefix, n, value):
    imgs = np.full((n, 4, 4, 3), value, np.float32)
    imgs += np.arange(n, dtype=np.float32)[:, None, None, None] * 0.01
    return ImageDataset(images=imgs, captions=[f"{prefix} {i}" for i in range(n)], labels={},
                        label_names={}, ids=[f"{prefix}/{i:03d}" for i in range(n)])


class _Counting:
    """A trivial finetune_fn: params = init + mean image; fails on demand."""

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = [], fail_at

    def __call__(self, init, ds, seed, workdir):
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise RuntimeError("interrupted")
        self.calls.append((ds.ids, seed, str(workdir)))
        return {"w": init["w"] + ds.images.mean(), "n": np.asarray(len(ds))}


def test_model_zoo_builds_caches_and_resumes(tmp_path):
    real, gen = _dataset("real", 10, -0.5), _dataset("gen", 10, 0.5)
    base, source = {"w": np.zeros(3, np.float32)}, {"w": np.ones(3, np.float32)}
    kw = dict(rhos=(0.0, 0.5, 1.0), n_models=2, n_train=6, seed=3)
    run = tmp_path / "zoo"
    fail = _Counting(fail_at=3)
    with pytest.raises(RuntimeError, match="interrupted"):
        zoo_lib.build_model_zoo(base, source, real, gen, run, fail, **kw)
    assert len(fail.calls) == 3
    resumed = _Counting()
    zoo = zoo_lib.build_model_zoo(base, source, real, gen, run, resumed, **kw)
    assert len(resumed.calls) == 3                               # only the unfinished members
    assert [m.name for m in zoo.members] == ["source", "rho000_00", "rho000_01", "rho050_00",
                                             "rho050_01", "rho100_00", "rho100_01"]
    for m in zoo.suspects():
        assert m.label == int(m.rho > 0) and m.role == ("infringing" if m.rho else "innocent")
        assert m.n_generated == round(m.rho * 6) and m.n_generated + m.n_real == 6
        assert sum(i.startswith("gen/") for i in m.ids) == m.n_generated
        p = zoo.load(m)
        n_gen = m.n_generated
        # mean image of the training set, known by construction
        idx = np.array([int(i.split("/")[1]) for i in m.ids])
        vals = np.where(np.arange(6) < n_gen, 0.5, -0.5) + idx * 0.01
        np.testing.assert_allclose(p["w"], np.full(3, vals.mean()), rtol=1e-5)
    np.testing.assert_array_equal(zoo.load("source")["w"], source["w"])
    # different members get different data; a full rerun trains nothing and returns the same
    assert zoo.members[1].ids != zoo.members[2].ids
    again = _Counting()
    zoo2 = zoo_lib.build_model_zoo(base, source, real, gen, run, again, **kw)
    assert again.calls == [] and zoo2.members == zoo.members
    manifest = json.loads((run / "zoo.json").read_text())
    assert len(manifest["members"]) == 7 and manifest["config"]["n_train"] == 6
    # a lost member file is rebuilt, identically (same seed, same data)
    before = zoo.load("rho050_01")
    (run / "members" / "rho050_01" / "params.msgpack").unlink()
    one = _Counting()
    zoo_lib.build_model_zoo(base, source, real, gen, run, one, **kw)
    assert len(one.calls) == 1 and one.calls[0][2].endswith("rho050_01")
    np.testing.assert_array_equal(zoo.load("rho050_01")["w"], before["w"])
    shadow, held = zoo.split(1)
    assert {m.index for m in shadow} == {0} and {m.index for m in held} == {1}
    with pytest.raises(zoo_lib.ZooMismatchError, match="n_train"):
        zoo_lib.build_model_zoo(base, source, real, gen, run, _Counting(), **{**kw, "n_train": 4})
    with pytest.raises(SM.SourceModelError, match="needs"):
        zoo_lib.build_model_zoo(base, None, real, gen, tmp_path / "z2", _Counting(), rhos=(1.0,),
                           n_train=20)


def test_source_model_is_cached(tmp_path):
    data = _dataset("src", 5, 0.25)
    ft = _Counting()
    p = zoo_lib.build_source_model({"w": np.zeros(2, np.float32)}, data, tmp_path, ft, seed=1)
    np.testing.assert_allclose(p["w"], np.full(2, data.images.mean()), rtol=1e-6)
    assert len(ft.calls) == 1 and ft.calls[0][1] == 1 and ft.calls[0][2].endswith("source")
    again = _Counting()
    q = zoo_lib.build_source_model({"w": np.zeros(2, np.float32)}, data, tmp_path, again, seed=1)
    assert again.calls == [] and np.array_equal(p["w"], q["w"])
    with pytest.raises(zoo_lib.ZooMismatchError, match="another seed or data"):
        zoo_lib.build_source_model({"w": np.zeros(2)}, data.subset([0, 1]), tmp_path, again, seed=1)


# ------------------------------------------------------------------------------ real pipeline glue
@pytest.mark.slow
def test_pipeline_glue_zoo_query_and_signal(tmp_path):
    """End to end on a tiny saved SD pipeline: the diffusion finetune_fn builds a 2-member zoo
    (2 fine-tuning steps each), members load back and generate through pipeline_generate_fn,
    and memorization_signal matches a direct evaluation of the Flax UNet."""
    pytest.importorskip("diffusers")
    from tiny import make_sd_pipeline

    from jaxattrib import parallel
    from jaxattrib.generate import make_eps_fn
    from jaxattrib.models.pipeline import load_pipeline
    from jaxattrib.train.finetune import TrainConfig

    make_sd_pipeline(tmp_path)
    pipe = load_pipeline(tmp_path / "pipe")
    prompts = ["a photo of sks dog", "a painting of a cat", "a cat in the style", "a dog"] * 2
    gen_fn = SM.pipeline_generate_fn(pipe, num_inference_steps=3)
    src = SM.query(gen_fn, prompts, [0])
    assert src.shape == (1, 8, 16, 16, 3)
    gen = ImageDataset(images=np.clip(np.asarray(src[0]), -1, 1).astype(np.float32),
                       captions=prompts, labels={}, label_names={},
                       ids=[f"gen/{i}" for i in range(8)])
    real = ImageDataset(images=np.random.default_rng(0).uniform(-1, 1, (8, 16, 16, 3))
                        .astype(np.float32), captions=prompts[::-1], labels={},
                        label_names={}, ids=[f"real/{i}" for i in range(8)])
    cfg = TrainConfig(steps=2, batch_size=2, learning_rate=1e-3, checkpoint_every=0)
    ft = zoo_lib.diffusion_finetune_fn(pipe, cfg, mesh=parallel.make_mesh(1))
    zoo = zoo_lib.build_model_zoo({"unet": pipe.unet_params}, None, real, gen, tmp_path / "zoo", ft,
                             rhos=(0.0, 1.0), n_models=1, n_train=4)
    assert [m.name for m in zoo.members] == ["rho000_00", "rho100_00"]
    for m in zoo.members:
        tuned = zoo.load(m)["unet"]
        moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
                 zip(jax.tree.leaves(tuned), jax.tree.leaves(pipe.unet_params))]
        assert max(moved) > 0
        assert (tmp_path / "zoo" / "members" / m.name / "record").is_dir()
    sus = SM.query(SM.pipeline_generate_fn(pipe, unet_params=zoo.load("rho100_00")["unet"],
                                           num_inference_steps=3), prompts, [0])
    feats = SM.probe_features(src, sus)
    assert np.all(np.isfinite(feats)) and feats[len(SM.DEFAULT_QUANTILES)] > 0
    eps_fn = make_eps_fn(pipe.unet_config, pipe.unet_params)
    from jaxattrib.generate import pipeline_schedule
    ctx, unc = pipe.encode_prompts(prompts[:3]), pipe.encode_prompts([""])
    key = jax.random.PRNGKey(5)
    sig = SM.memorization_signal(eps_fn, pipeline_schedule(pipe), ctx, unc, key,
                                 sample_shape=(8, 8, 4), n_seeds=1, timesteps=(999,))
    x = jax.random.normal(jax.random.fold_in(key, 0), (1, 8, 8, 4))
    t = jnp.full((1,), 999, jnp.int32)
    for p in range(3):
        d = eps_fn(x, t, ctx[p:p + 1]) - eps_fn(x, t, unc)
        assert float(sig[p]) == pytest.approx(float(jnp.sqrt(jnp.mean(d ** 2))), rel=1e-4)
