"""LDS harness: subset drawing, resumable retraining cache, fixed-noise target losses, and an
end-to-end run on a linear "model" whose exact influence is known (LDS ≈ 1 by construction)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxattrib import parallel
from jaxattrib.diffusion.schedule import make_schedule
from jaxattrib.eval import lds as lds_lib
from jaxattrib.metrics import lds


def test_draw_subsets_exact_fraction_and_determinism():
    masks = lds_lib.draw_subsets(101, 12, 0.5, jax.random.PRNGKey(3))
    assert masks.shape == (12, 101) and masks.dtype == np.bool_
    np.testing.assert_array_equal(masks.sum(1), np.full(12, round(0.5 * 101)))
    np.testing.assert_array_equal(masks, lds_lib.draw_subsets(101, 12, 0.5, jax.random.PRNGKey(3)))
    # subset j does not depend on S; different keys / subsets differ
    np.testing.assert_array_equal(masks[:5], lds_lib.draw_subsets(101, 5, 0.5,
                                                                  jax.random.PRNGKey(3)))
    assert not np.array_equal(masks, lds_lib.draw_subsets(101, 12, 0.5, jax.random.PRNGKey(4)))
    assert len({m.tobytes() for m in masks}) == 12
    # every example is drawn about half the time
    many = lds_lib.draw_subsets(50, 200, 0.3, 0)
    np.testing.assert_array_equal(many.sum(1), np.full(200, 15))
    assert abs(many.mean() - 0.3) < 1e-12 and many.mean(0).min() > 0.15
    with pytest.raises(ValueError, match="alpha"):
        lds_lib.draw_subsets(10, 2, 1.0, 0)
    with pytest.raises(ValueError, match="members"):
        lds_lib.draw_subsets(3, 2, 0.1, 0)


def test_retrain_subsets_caches_and_resumes(tmp_path):
    masks = lds_lib.draw_subsets(10, 3, 0.5, 0)
    calls = []

    class Crash(RuntimeError):
        pass

    def train_fn(idx, seed, crash_after=None):
        if crash_after is not None and len(calls) == crash_after:
            raise Crash
        calls.append((tuple(idx), seed))
        return {"w": np.asarray(idx, np.float32) + seed, "b": {"c": np.float32(seed)}}

    with pytest.raises(Crash):
        lds_lib.retrain_subsets(lambda i, s: train_fn(i, s, crash_after=4), masks, [0, 1],
                                tmp_path, fingerprint="f", progress=None)
    assert len(calls) == 4
    trained = lds_lib.retrain_subsets(train_fn, masks, [0, 1], tmp_path, fingerprint="f",
                                      progress=None)
    assert trained == [(2, 0), (2, 1)] and len(calls) == 6
    # each model got its own subset's indices and seed, and round-trips
    for j in range(3):
        for s in (0, 1):
            assert (tuple(np.nonzero(masks[j])[0]), s) in calls
            p = lds_lib.load_model(tmp_path, j, s)
            np.testing.assert_array_equal(p["w"], np.nonzero(masks[j])[0] + s)
            assert float(p["b"]["c"]) == s
    assert lds_lib.retrain_subsets(train_fn, masks, [0, 1], tmp_path, fingerprint="f",
                                   progress=None) == []
    assert json.loads((tmp_path / lds_lib.MANIFEST).read_text())["seeds"] == [0, 1]
    with pytest.raises(lds_lib.LDSRunMismatchError, match="seeds"):
        lds_lib.retrain_subsets(train_fn, masks, [0], tmp_path, fingerprint="f", progress=None)
    with pytest.raises(lds_lib.LDSRunMismatchError, match="masks_sha256"):
        lds_lib.retrain_subsets(train_fn, ~masks, [0, 1], tmp_path, fingerprint="f",
                                progress=None)
    with pytest.raises(lds_lib.LDSRunMismatchError, match="fingerprint"):
        lds_lib.retrain_subsets(train_fn, masks, [0, 1], tmp_path, fingerprint="g",
                                progress=None)

    # measured outputs: averaged over seeds, cached per model
    n_meas = []

    def measure(p):
        n_meas.append(1)
        return np.array([p["w"].sum(), float(p["b"]["c"])])

    out = lds_lib.actual_outputs(tmp_path, measure, name="toy")
    want = np.stack([[np.nonzero(masks[j])[0].sum() + 5 * 0.5, 0.5] for j in range(3)])
    np.testing.assert_allclose(out, want)
    assert len(n_meas) == 6
    np.testing.assert_allclose(lds_lib.actual_outputs(tmp_path, measure, name="toy"), want)
    assert len(n_meas) == 6  # all cached
    np.testing.assert_allclose(lds_lib.actual_outputs(tmp_path, measure, name="toy", seeds=[1]),
                               want + np.array([2.5, 0.5]))


def _toy_eps(params, x_t, t, ctx):
    """A denoiser with every input mattering: channel mix + time + conditioning."""
    return (jnp.einsum("bhwc,cd->bhwd", x_t, params["w"]) + params["b"] * t[:, None, None, None]
            / 1000.0 + ctx.mean(axis=(1, 2))[:, None, None, None])


def test_target_losses_match_direct_computation():
    sched = make_schedule(1000, prediction_type="epsilon")
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 3)).astype(np.float32) * 0.3,
              "b": np.float32(0.7)}
    T = 5
    targets = {"x0": rng.uniform(-1, 1, (T, 4, 4, 3)).astype(np.float32),
               "ctx": rng.normal(size=(T, 2, 6)).astype(np.float32)}
    ts, R = [0, 250, 999], 2
    got = lds_lib.target_losses(_toy_eps, params, sched, targets, ts, noise_seed=7, n_noise=R)

    ac = np.asarray(sched.alphas_cumprod, np.float64)
    want = np.zeros(T)
    for r in range(R):
        for t in ts:
            eps = np.asarray(jax.random.normal(
                jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(7), r), t),
                (4, 4, 3)), np.float64)
            x_t = np.sqrt(ac[t]) * targets["x0"] + np.sqrt(1 - ac[t]) * eps
            out = (np.einsum("bhwc,cd->bhwd", x_t, params["w"]) + params["b"] * t / 1000.0
                   + targets["ctx"].mean(axis=(1, 2))[:, None, None, None])
            want += ((eps - out) ** 2).mean(axis=(1, 2, 3))
    want /= R * len(ts)
    np.testing.assert_allclose(got, want, rtol=2e-5)
    assert got.shape == (T,) and got.dtype == np.float64
    # sharded over 8 devices (padded 5 -> 8) and in small batches: same numbers
    mesh = parallel.make_mesh(8)
    np.testing.assert_allclose(lds_lib.target_losses(_toy_eps, params, sched, targets, ts,
                                                     noise_seed=7, n_noise=R, mesh=mesh),
                               got, rtol=1e-6)
    np.testing.assert_allclose(lds_lib.target_losses(_toy_eps, params, sched, targets, ts,
                                                     noise_seed=7, n_noise=R, batch_size=2),
                               got, rtol=1e-6)
    # another noise seed gives other values (the noise is really used)
    other = lds_lib.target_losses(_toy_eps, params, sched, targets, ts, noise_seed=8, n_noise=R)
    assert np.abs(other - got).max() > 1e-3


def test_end_to_end_linear_model_exact_influence_has_lds_one(tmp_path):
    """θ_S = Σ_{i∈S} y_i x_i (+ small seed noise); output g_S(z) = ⟨θ_S, z⟩. The exact influence
    of example i on z is y_i ⟨x_i, z⟩, so Σ_{i∈S} τ_i = g_S(z) up to the seed noise: LDS ≈ 1."""
    rng = np.random.default_rng(1)
    n, d, T = 60, 5, 12
    X = rng.normal(size=(n, d))
    y = rng.normal(size=n)
    Z = rng.normal(size=(T, d))
    masks = lds_lib.draw_subsets(n, 32, 0.5, jax.random.PRNGKey(0))

    def train_fn(idx, seed):
        noise = np.random.default_rng(seed).normal(size=d) * 0.01
        return {"theta": (y[idx, None] * X[idx]).sum(0) + noise}

    lds_lib.retrain_subsets(train_fn, masks, [0, 1], tmp_path, progress=None)
    actual = lds_lib.actual_outputs(tmp_path, lambda p: Z @ p["theta"], name="lin")
    exact = (Z @ (y[:, None] * X).T)  # [T, n]
    res = lds(exact, masks, actual)
    assert res.mean > 0.99 and res.n_valid == T
    assert lds(exact, masks, actual, sign=-1).mean < -0.99
    rand = lds(rng.normal(size=(T, n)), masks, actual)
    assert abs(rand.mean) < 0.2
    # a partly wrong attribution (half the examples' influence dropped) lands in between
    half = exact * (np.arange(n) % 2 == 0)
    assert 0.2 < lds(half, masks, actual).mean < 0.95


def test_seed_agreement_matches_scipy_and_the_known_noise_level():
    from scipy import stats
    rng = np.random.default_rng(2)
    # small case: the pairwise Spearman over subsets, averaged over targets and pairs, is scipy's
    out = rng.normal(size=(3, 9, 4))
    want = np.mean([np.mean([stats.spearmanr(out[a][:, t], out[b][:, t])[0] for t in range(4)])
                    for a, b in ((0, 1), (0, 2), (1, 2))])
    got = lds_lib.seed_agreement(out)
    assert got["n_seeds"] == 3 and abs(got["r"] - want) < 1e-12
    assert abs(got["r_mean"] - 3 * want / (1 + 2 * want)) < 1e-12
    # by construction: output = subset effect + seed noise of variance s2 -> Pearson 1/(1+s2),
    # Spearman (6/pi) asin(rho/2) for Gaussians; seed mean of R seeds: R r / (1 + (R-1) r)
    S, T, s2 = 3000, 8, 1.0
    signal = rng.normal(size=(S, T))
    noisy = signal[None] + np.sqrt(s2) * rng.normal(size=(2, S, T))
    rho = 1 / (1 + s2)
    r_true = 6 / np.pi * np.arcsin(rho / 2)
    got = lds_lib.seed_agreement(noisy)
    assert abs(got["r"] - r_true) < 0.02
    assert abs(got["ceiling"] - np.sqrt(2 * r_true / (1 + r_true))) < 0.02
    # identical seeds: perfectly reproducible; independent seeds: no agreement
    assert lds_lib.seed_agreement(np.stack([signal, signal]))["ceiling"] == pytest.approx(1.0)
    assert abs(lds_lib.seed_agreement(rng.normal(size=(2, S, T)))["r"]) < 0.03
    with pytest.raises(ValueError, match=r"\[R >= 2 seeds, S, T\]"):
        lds_lib.seed_agreement(signal[None])


def _bench_module(name: str):
    """``benchmarks/{name}.py`` as a module."""
    import importlib.util
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(name, root / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _benchmark_module():
    from pathlib import Path
    return _bench_module("lds"), Path(__file__).resolve().parents[1]


def test_benchmark_cosine_schedule_ends_training_with_no_step():
    """``train.schedule='cosine'`` (finetune setting): the last update is ~0 while 'constant'
    keeps moving at the learning rate (Adam on a constant gradient steps by ~lr)."""
    from jaxattrib.config import load_config
    bench, root = _benchmark_module()
    cfg = load_config(str(root / "jaxattrib" / "configs" / "lds.py") + ":finetune",
                      ["train.steps=50", "train.warmup_steps=5"])
    assert cfg.train.schedule == "cosine" and cfg.pretrain.steps > 0

    def last_update(tc):
        opt = bench.make_optimizer(tc)
        p = {"w": jnp.zeros(3)}
        st = opt.init(p)
        g = {"w": jnp.full(3, 0.1)}
        for _ in range(tc.steps):
            upd, st = opt.update(g, st, p)
        return float(jnp.abs(upd["w"]).max())

    lr = cfg.train.learning_rate
    assert last_update(cfg.train) < 1e-2 * lr
    const = load_config(str(root / "jaxattrib" / "configs" / "lds.py") + ":finetune",
                        ["train.steps=50", "train.warmup_steps=5", "train.schedule='constant'"])
    assert abs(last_update(const.train) - lr) < 0.05 * lr
    bad = load_config(str(root / "jaxattrib" / "configs" / "lds.py"), ["train.steps=5"])
    bad.train.schedule = "linear"
    with pytest.raises(ValueError, match="schedule='linear'"):
        bench.make_optimizer(bad.train)


def test_benchmark_tracin_weights_each_checkpoint_by_its_learning_rate():
    """TracIn's η_c in benchmarks/lds.py is the learning rate of the update that produced
    checkpoint c (issue #19: it was the peak rate, so under the cosine decay of 'finetune' the
    last checkpoint weighed 1 instead of ~0). By construction: plain SGD on a unit gradient with
    the same schedule moves by exactly η at each update."""
    from jaxattrib.config import load_config
    bench, root = _benchmark_module()
    cfg = load_config(str(root / "jaxattrib" / "configs" / "lds.py") + ":finetune",
                      ["train.steps=40", "train.warmup_steps=5"])
    steps = (3, 5, 20, 40)
    got = bench.checkpoint_lrs(cfg.train, steps)
    opt = optax.sgd(bench.lr_schedule(cfg.train))
    p, st, moves = {"w": jnp.zeros(())}, None, {}
    st = opt.init(p)
    for s in range(1, cfg.train.steps + 1):
        upd, st = opt.update({"w": jnp.ones(())}, st, p)
        moves[s] = -float(upd["w"])
    np.testing.assert_allclose(got, [moves[s] for s in steps], rtol=1e-6)
    lr = cfg.train.learning_rate
    assert got[0] < lr and got[-1] < 1e-2 * lr   # warm-up, then decayed to ~0
    const = load_config(str(root / "jaxattrib" / "configs" / "lds.py") + ":finetune",
                        ["train.steps=40", "train.warmup_steps=5", "train.schedule='constant'"])
    np.testing.assert_allclose(bench.checkpoint_lrs(const.train, (20, 40)), [lr, lr], rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("setting, extra", [
    ("smoke", []),
    ("finetune_smoke", ["pretrain.steps=6", "pretrain.n=32"]),
])
def test_benchmark_smoke_runs_end_to_end_and_resumes(tmp_path, setting, extra):
    """The CPU LDS benchmark (reduced further) writes its tables; a rerun retrains nothing. The
    finetune setting pretrains once and reports the seed agreement of its two seeds."""
    from jaxattrib.config import load_config
    bench, root = _benchmark_module()
    cfg = load_config(str(root / "jaxattrib" / "configs" / "lds.py") + f":{setting}",
                      ["data.n_train=32", "train.steps=6", "train.tracin_checkpoints=(3, 6)",
                       "lds.num_subsets=4", "attribution.k=32"] + extra)
    rows = bench.run(cfg, tmp_path, log=lambda m: None)
    if setting == "finetune_smoke":
        assert (tmp_path / "pretrained.msgpack").is_file()
        assert "Seed agreement" in (tmp_path / "lds_table.md").read_text()
    assert [r["method"] for r in rows] == list(cfg.attribution.methods)
    for r in rows:
        for sp in ("val", "gen"):
            assert -1.0 <= r[f"lds_{sp}_ci_low"] <= r[f"lds_{sp}"] <= r[f"lds_{sp}_ci_high"] <= 1
    doc = json.loads((tmp_path / "results" / "lds.json").read_text())
    assert doc["tables"][0]["rows"][0]["method"] == "trak"
    assert "| dtrak |" in (tmp_path / "lds_table.md").read_text()
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "subsets" / "models").iterdir()}
    assert len(stamp) == cfg.lds.num_subsets * len(cfg.lds.seeds)
    rows2 = bench.run(cfg, tmp_path, log=lambda m: None)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "subsets" / "models").iterdir()} == stamp
    assert [r["lds_val"] for r in rows2] == [r["lds_val"] for r in rows]


def test_benchmark_setting_names_and_the_fitting_regime_config():
    """``--config`` / ``--finetune`` / ``--smoke`` select one setting of configs/lds.py; the
    ``finetune_fit`` setting differs from ``finetune`` only in the data size and the steps, and
    its subset models see their images >= 100 times (``finetune``: ~19)."""
    from jaxattrib.config import load_config
    bench, root = _benchmark_module()
    assert bench.setting_name(None) == ""
    assert bench.setting_name("full", smoke=True) == "smoke"
    assert bench.setting_name(None, finetune=True, smoke=True) == "finetune_smoke"
    assert bench.setting_name("finetune_fit", smoke=True) == "finetune_fit_smoke"
    assert bench.setting_name("finetune", finetune=True) == "finetune"
    with pytest.raises(ValueError, match="two settings"):
        bench.setting_name("finetune_fit", finetune=True)
    with pytest.raises(ValueError, match="add --smoke"):
        bench.setting_name("finetune_smoke")
    spec = str(root / "jaxattrib" / "configs" / "lds.py")
    ft, fit = load_config(spec + ":finetune").to_dict(), load_config(spec + ":finetune_fit")
    epochs = lambda c: c["train"]["steps"] * c["train"]["batch_size"] / (  # noqa: E731
        c["lds"]["alpha"] * c["data"]["n_train"])
    assert epochs(fit.to_dict()) >= 100 > 5 * epochs(ft)
    diff = {(sec, k) for sec in ft if isinstance(ft[sec], dict) for k in ft[sec]
            if ft[sec][k] != fit.to_dict()[sec][k]}
    assert diff == {("data", "n_train"), ("train", "steps"), ("train", "tracin_checkpoints"),
                    ("attribution", "num_timesteps")}
    assert fit.attribution.num_timesteps == 100 and ft["attribution"]["num_timesteps"] == 10
    assert max(fit.train.tracin_checkpoints) == fit.train.steps
    smoke = load_config(spec + ":finetune_fit_smoke")
    assert smoke.pretrain.steps > 0 and smoke.data.n_train < fit.data.n_train
    with pytest.raises(ValueError, match="'finetune_fit'"):
        load_config(spec + ":finetune_fitt")


def test_benchmark_refuses_features_cached_with_other_attribution_settings(tmp_path):
    """A run directory whose features were computed at K = 10 is not reused at K = 100 (nor
    another k / projection): the run stops before any training, naming the file and the field;
    an older cache without ``features/settings.json`` is judged by the previous config.json."""
    from jaxattrib.config import load_config
    bench, root = _benchmark_module()
    spec = str(root / "jaxattrib" / "configs" / "lds.py") + ":finetune_fit_smoke"
    k10 = load_config(spec, ["attribution.num_timesteps=10"])
    k100 = load_config(spec, ["attribution.num_timesteps=100"])
    recorded = tmp_path / "recorded"
    lds_lib.check_settings(recorded / "features" / "settings.json",
                           bench.feature_settings(k10.to_dict()))
    with pytest.raises(lds_lib.LDSRunMismatchError,
                       match=r"features/settings.json.*num_timesteps: stored 10 vs given 100"):
        bench.run(k100, recorded, log=lambda m: None)
    other_k = load_config(spec, ["attribution.num_timesteps=10", "attribution.k=64"])
    with pytest.raises(lds_lib.LDSRunMismatchError, match=r"\bk: stored 256 vs given 64"):
        bench.run(other_k, recorded, log=lambda m: None)
    # a cache made before the record existed: features + the config.json of the run that made them
    older = tmp_path / "older"
    (older / "features").mkdir(parents=True)
    np.save(older / "features" / "trak_final_train.npy", np.zeros((3, 2)))
    (older / "config.json").write_text(json.dumps(k10.to_dict(), default=list))
    with pytest.raises(lds_lib.LDSRunMismatchError, match="num_timesteps: stored 10 vs given 100"):
        bench.run(k100, older, log=lambda m: None)
    assert not (older / "features" / "settings.json").exists()
    assert json.loads((older / "config.json").read_text())["attribution"]["num_timesteps"] == 10


def test_feature_settings_record_guards_the_projection_generator(tmp_path, monkeypatch):
    """``features/settings.json`` records the projection generator version. A record written
    before the field (no ``generator``) is read as version 2 and resumes under the current code
    (2) without being rewritten, but is refused once the generator moves on; a record naming
    another version is refused naming the field, both versions and what to do; features cached
    before any record are refused unless their generator is declared."""
    from jaxattrib.attribution import projection
    from jaxattrib.config import load_config
    bench, root = _benchmark_module()
    cfg = load_config(str(root / "jaxattrib" / "configs" / "lds.py") + ":finetune_fit_smoke")
    cfg = cfg.to_dict()
    assert projection.GENERATOR_VERSION == 2 == bench.RECORD_GENERATOR_BEFORE_FIELD
    want = bench.feature_settings(cfg)
    assert want["generator"] == 2
    # an existing record from before the field: resumes, untouched
    run = tmp_path / "old_record"
    rec = run / "features" / "settings.json"
    rec.parent.mkdir(parents=True)
    old = {k: v for k, v in want.items() if k != "generator"}
    rec.write_text(json.dumps(old, indent=2))
    np.save(run / "features" / "trak_final_train.npy", np.zeros((3, 2)))
    bench.check_feature_settings(run, cfg)
    assert json.loads(rec.read_text()) == old
    # ... but not under another generator: absence means 2, not "whatever the code draws now"
    monkeypatch.setattr(projection, "GENERATOR_VERSION", 3)
    with pytest.raises(lds_lib.LDSRunMismatchError,
                       match=r"settings.json.*generator: stored 2 vs given 3\. generator: .*"
                             r"version 3.*delete .*features to recompute"):
        bench.check_feature_settings(run, cfg)
    monkeypatch.setattr(projection, "GENERATOR_VERSION", 2)
    # a record naming another version than the code's
    rec.write_text(json.dumps({**old, "generator": 1}))
    with pytest.raises(lds_lib.LDSRunMismatchError, match="generator: stored 1 vs given 2"):
        bench.check_feature_settings(run, cfg)
    # features cached before any record, judged by the run's previous config.json
    legacy = tmp_path / "legacy"
    (legacy / "features").mkdir(parents=True)
    np.save(legacy / "features" / "trak_final_train.npy", np.zeros((3, 2)))
    (legacy / "config.json").write_text(json.dumps(cfg, default=list))
    with pytest.raises(lds_lib.LDSRunMismatchError,
                       match=r"generator: stored None vs given 2.*--features-generator"):
        bench.check_feature_settings(legacy, cfg)
    with pytest.raises(lds_lib.LDSRunMismatchError, match="generator: stored 1 vs given 2"):
        bench.check_feature_settings(legacy, cfg, features_generator=1)
    assert not (legacy / "features" / "settings.json").exists()
    bench.check_feature_settings(legacy, cfg, features_generator=2)
    assert json.loads((legacy / "features" / "settings.json").read_text()) == want
    # a fresh run directory gets the record with the generator
    bench.check_feature_settings(tmp_path / "fresh", cfg)
    assert json.loads((tmp_path / "fresh" / "features" / "settings.json").read_text()) == want


def test_check_settings_writes_matches_and_names_the_mismatch(tmp_path):
    path = tmp_path / "sub" / "settings.json"
    assert lds_lib.check_settings(path, {"a": 1, "b": "x"})          # written
    assert not lds_lib.check_settings(path, {"a": 1, "b": "x"})      # matches
    with pytest.raises(lds_lib.LDSRunMismatchError, match=r"settings.json.*b: stored 'x' vs "
                                                          r"given 'y'"):
        lds_lib.check_settings(path, {"a": 1, "b": "y"})
    fresh = tmp_path / "fresh.json"
    with pytest.raises(lds_lib.LDSRunMismatchError, match="a: stored None vs given 1"):
        lds_lib.check_settings(fresh, {"a": 1}, stored={})
    assert not fresh.exists()
    assert lds_lib.check_settings(fresh, {"a": 1}, stored={"a": 1, "z": 0})
    # a field added to the record later: read from ``absent`` when missing; hints explain
    assert not lds_lib.check_settings(fresh, {"a": 1, "new": 5}, absent={"new": 5})
    assert json.loads(fresh.read_text()) == {"a": 1}
    with pytest.raises(lds_lib.LDSRunMismatchError,
                       match=r"new: stored 5 vs given 6\. do this$"):
        lds_lib.check_settings(fresh, {"a": 1, "new": 6}, absent={"new": 5},
                               hints={"new": "do this", "a": "not shown"})
    assert not lds_lib.check_settings(fresh, {"a": 1}, absent={"new": 5}, hints={"new": "x"})


def _regime_module():
    return _bench_module("lds_regime")


def test_regime_participation_ratio_and_residuals_by_construction():
    """Participation ratio 1 for rank-1 features, n for n orthogonal equal-norm ones (centring
    removes a shared offset); residual / output of a known denoiser match a direct computation."""
    reg = _regime_module()
    rng = np.random.default_rng(0)
    v = rng.normal(size=64)
    rank1 = rng.uniform(0.5, 2.0, size=(10, 1)) * v
    assert reg.participation_ratio(rank1) == pytest.approx(1.0)
    assert reg.mean_cosine_to_mean(rank1) == pytest.approx(1.0)
    q = np.linalg.qr(rng.normal(size=(64, 8)))[0].T * 3.0     # 8 orthogonal rows, equal norms
    assert reg.participation_ratio(q) == pytest.approx(8.0)
    offset = q + 100.0 * v                                     # a huge common mode on top
    assert reg.participation_ratio(offset) < 1.1
    assert reg.participation_ratio(offset, centre=True) > 6.0
    sched = make_schedule(1000)
    x0 = jnp.asarray(rng.normal(size=(3, 4, 4, 1)), jnp.float32)
    noise = jnp.asarray(rng.normal(size=(4, 4, 1)), jnp.float32)
    ident = lambda p, x_t, t, ctx: p * x_t  # noqa: E731   (eps_theta = p * x_t)
    res, sq = reg._residual_and_output(jnp.float32(0.5), sched, x0, None, 300, noise,
                                       eps_apply=ident)
    from jaxattrib.diffusion.schedule import add_noise
    x_t = add_noise(sched, x0, jnp.broadcast_to(noise, x0.shape), jnp.full((3,), 300))
    np.testing.assert_allclose(res, jnp.mean((0.5 * x_t - noise) ** 2, axis=(1, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(sq, jnp.mean((0.5 * x_t) ** 2, axis=(1, 2, 3)), rtol=1e-5)


def test_regime_paired_difference_reads_the_chosen_lambda_and_sign(tmp_path):
    """A run directory built by construction: method 'b' has exact linear-datamodel features
    (LDS 1 on every target), 'a' random ones; the paired difference is LDS(b) − LDS(a) per
    target, with the λ ratio and sign read from results/lds.json."""
    reg = _regime_module()
    rng = np.random.default_rng(0)
    n, S, T = 24, 16, 6
    masks = lds_lib.draw_subsets(n, S, 0.5, jax.random.PRNGKey(0))
    sub = tmp_path / "subsets"
    lds_lib.retrain_subsets(lambda idx, seed: {"w": np.zeros(1)}, masks, [0], sub, progress=None)
    (tmp_path / "config.json").write_text(json.dumps({"seed": 0, "lds": {"n_bootstrap": 200}}))
    feats = tmp_path / "features"
    feats.mkdir()
    np.save(feats / "b_final_train.npy", np.eye(n))
    np.save(feats / "a_final_train.npy", rng.normal(size=(n, n)))
    per_a = {}
    for split in ("val", "gen"):
        w = rng.normal(size=(T, n))                       # true per-example effects
        actual = -(masks @ w.T)                           # helpful = lower loss: sign -1
        for j in range(S):
            path = sub / "outputs" / f"loss_{split}" / f"s{j:04d}_seed0.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, actual[j])
        np.save(feats / f"b_final_{split}.npy", w)
        qa = rng.normal(size=(T, n))
        np.save(feats / f"a_final_{split}.npy", qa)
        Phi_a = np.load(feats / "a_final_train.npy")
        lam = float(np.mean(np.sum(Phi_a ** 2, axis=0)))  # ratio 1
        sa = qa @ np.linalg.solve(Phi_a.T @ Phi_a + lam * np.eye(n), Phi_a.T)
        per_a[split] = lds(sa, masks, actual, sign=1.0).per_target
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "lds.json").write_text(json.dumps({"tables": [{"rows": [
        {"method": "a", "choice": "lambda_ratio=1", "sign": 1.0},
        {"method": "b", "choice": "lambda_ratio=0.0001", "sign": -1.0}]}]}))
    diff = reg.paired_difference(tmp_path, "a", "b")
    for split in ("val", "gen"):
        assert diff[split]["mean"] == pytest.approx(np.mean(1.0 - per_a[split]), abs=1e-9)
        assert diff[split]["ci_low"] <= diff[split]["mean"] <= diff[split]["ci_high"]
        assert diff[split]["n"] == T
    # with results/lds_per_target.npz (any noise mode or ensemble), its arrays are the pair
    np.savez(tmp_path / "results" / "lds_per_target.npz",
             **{f"{m}/{sp}": np.full(T, v) for m, v in (("a", 0.25), ("b", 0.75))
                for sp in ("val", "gen")})
    assert reg.paired_difference(tmp_path, "a", "b")["gen"]["mean"] == pytest.approx(0.5)


def _paired_module():
    return _bench_module("lds_paired")


def _paired_run(path, masks, actual, per_target, noise):
    """A finished LDS run directory by construction: subsets, measured outputs, generated
    targets and the per-target LDS that benchmarks/lds.py writes."""
    import ml_collections
    sub = path / "subsets"
    lds_lib.retrain_subsets(lambda idx, seed: {"w": np.zeros(1)}, masks, [0], sub, progress=None)
    for split, y in actual.items():
        for j in range(masks.shape[0]):
            p = sub / "outputs" / f"loss_{split}" / f"s{j:04d}_seed0.npy"
            p.parent.mkdir(parents=True, exist_ok=True)
            np.save(p, y[j])
    np.savez(path / "generated.npz", x=np.zeros((2, 8, 8, 1)), y=np.arange(2))
    lds_bench = _bench_module("lds")

    class R:
        def __init__(self, v):
            self.per_target = v
    lds_bench.save_per_target(path, {m: {sp: R(v) for sp, v in d.items()}
                                     for m, d in per_target.items()},
                              ml_collections.ConfigDict({"noise": noise, "checkpoints": 1}))


def test_lds_paired_differences_pairs_and_refuses_unpaired_runs(tmp_path):
    """Two run directories sharing subsets and outputs: the paired difference is the mean of the
    per-target differences (a CI around it, the fraction of targets where B is higher); runs with
    other subsets or outputs, or without a method, are refused naming the file or method."""
    pair = _paired_module()
    rng = np.random.default_rng(0)
    n, S, T = 20, 8, 10
    masks = lds_lib.draw_subsets(n, S, 0.5, jax.random.PRNGKey(0))
    actual = {sp: rng.normal(size=(S, T)) for sp in ("tune", "val", "gen")}
    pa = {"trak": {sp: rng.uniform(-1, 1, T) for sp in ("val", "gen")}}
    pb = {"trak": {sp: v + np.linspace(0.0, 0.2, T) for sp, v in pa["trak"].items()}}
    pb["trak"]["gen"][3] = np.nan                      # an undefined target drops from the pair
    _paired_run(tmp_path / "a", masks, actual, pa, "per_position")
    _paired_run(tmp_path / "b", masks, actual, pb, "shared")
    rows = pair.compare(tmp_path / "a", tmp_path / "b", ["trak"], n_bootstrap=200)
    val, gen = rows
    assert val["diff"] == pytest.approx(0.1) and val["n"] == T
    assert val["ci_low"] <= 0.1 <= val["ci_high"] and val["frac_b_better"] == 0.9
    keep = np.arange(T) != 3
    assert gen["n"] == T - 1
    assert gen["diff"] == pytest.approx(np.linspace(0.0, 0.2, T)[keep].mean())
    assert gen["lds_a"] == pytest.approx(pa["trak"]["gen"][keep].mean())
    assert pair.variant(pair.load_per_target(tmp_path / "b")) == "noise shared, M 1"
    with pytest.raises(ValueError, match="no method 'dtrak'"):
        pair.compare(tmp_path / "a", tmp_path / "b", ["dtrak"])
    other = dict(actual, val=actual["val"] + 1.0)
    _paired_run(tmp_path / "c", masks, other, pa, "shared")
    with pytest.raises(ValueError, match="split 'val' differ"):
        pair.compare(tmp_path / "a", tmp_path / "c", ["trak"])
    masks2 = lds_lib.draw_subsets(n, S, 0.5, jax.random.PRNGKey(1))
    _paired_run(tmp_path / "d", masks2, actual, pa, "shared")
    with pytest.raises(ValueError, match="masks.npy .*differ"):
        pair.compare(tmp_path / "a", tmp_path / "d", ["trak"])
    with pytest.raises(SystemExit, match=r"none/subsets/masks.npy: missing"):
        pair.main(["--run-a", str(tmp_path / "a"), "--run-b", str(tmp_path / "none")])
    (tmp_path / "b" / "results" / "lds_per_target.npz").unlink()
    with pytest.raises(SystemExit, match=r"b/results/lds_per_target.npz: missing; run "
                                         r"benchmarks/lds.py"):
        pair.main(["--run-a", str(tmp_path / "a"), "--run-b", str(tmp_path / "b")])
