"""Faithfulness to the reference protocols, by construction (issue 19): the noise modes of
TRAK / D-TRAK features, Journey-TRAK's re-noised targets, checkpoint ensembles, and the Python
API's data fingerprint."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattrib.attribution import diffusion_trak as dt
from jaxattrib.attribution.store import StoreMismatchError
from jaxattrib.diffusion import losses
from jaxattrib.diffusion.schedule import make_schedule

SHAPE = (4, 4, 3)


# ------------------------------------------------------------------------ noise modes


def test_example_noise_modes():
    """shared: one noise for every example; per_example: its own per index, reproducible;
    per_position: a function of index mod period only."""
    f = lambda mode, i, t=100, seed=0: np.asarray(  # noqa: E731
        losses.example_noise(mode, seed, t, i, SHAPE, period=5))
    np.testing.assert_array_equal(f("shared", 0), f("shared", 7))
    np.testing.assert_array_equal(f("shared", 3), losses.fixed_noise(0, 100, SHAPE))
    assert not np.allclose(f("per_example", 0), f("per_example", 1))
    assert not np.allclose(f("per_example", 0), f("per_example", 5))
    np.testing.assert_array_equal(f("per_example", 3), f("per_example", 3))  # reproducible
    assert not np.allclose(f("per_example", 3), f("per_example", 3, t=101))
    assert not np.allclose(f("per_example", 3), f("per_example", 3, seed=1))
    for i in range(5):
        np.testing.assert_array_equal(f("per_position", i), f("per_position", i + 5))
        np.testing.assert_array_equal(f("per_position", i), f("per_position", i + 10))
        np.testing.assert_array_equal(f("per_position", i), f("per_example", i))
    assert not np.allclose(f("per_position", 0), f("per_position", 1))
    traced = jax.jit(lambda t, i: losses.example_noise("per_position", 0, t, i, SHAPE, 5))
    np.testing.assert_array_equal(traced(jnp.int32(100), jnp.int32(7)), f("per_position", 2))
    with pytest.raises(ValueError, match="noise="):
        losses.example_noise("fresh", 0, 1, 0, SHAPE)
    with pytest.raises(ValueError, match="noise="):
        dt.AttributionConfig(noise="fresh")
    with pytest.raises(ValueError, match="noise_period"):
        dt.AttributionConfig(noise_period=0)


def _toy_eps(unet_config, params, config=None):
    """A denoiser whose gradient shows the noise: ``ε̂ = w ⊙ x_t`` (``w [C]``)."""
    return lambda x_t, t, ctx: params["w"] * x_t


@pytest.fixture
def toy_unet(monkeypatch):
    monkeypatch.setattr(dt, "_eps_fn", _toy_eps)
    # a unet_config of its own, so no out_fn made with the real UNet is reused from the caches
    return ("toy-eps", np.random.rand())


def _hand_square_grad(sched, w, x0, noises, ts):
    """d/dw of (1/K) Σ_k mean((w ⊙ x_t)²), x_t = √ᾱ x0 + √(1-ᾱ) n_k, by hand."""
    g = np.zeros_like(w)
    for n, t in zip(noises, ts):
        a = float(sched.alphas_cumprod[t])
        x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * n
        g += (2 * w * x_t ** 2).sum(axis=(0, 1)) / x_t.size
    return g / len(ts)


@pytest.mark.parametrize("mode", ["shared", "per_example", "per_position"])
def test_train_out_fn_uses_the_noise_of_its_mode(toy_unet, mode):
    """D-TRAK's output function with each noise mode equals a hand-computed gradient with the
    noise that mode defines for the example's row index; with equal x0 the examples' gradients
    are equal exactly when their noise is."""
    sched = make_schedule()
    cfg = dt.AttributionConfig(method="dtrak", num_timesteps=2, noise=mode, noise_period=3,
                               noise_seed=4)
    out_fn = dt.make_train_out_fn(toy_unet, sched, cfg)
    ts = dt.timesteps_for(cfg, 1000)
    w = np.array([0.5, -1.0, 2.0], np.float32)
    n = 7
    x0 = np.full((n,) + SHAPE, 0.3, np.float32)
    ex = dt.with_index({"x0": x0, "ctx": np.zeros((n, 2, 2), np.float32)})
    grads = jax.vmap(jax.grad(lambda p, e: out_fn(p, e, None)), in_axes=(None, 0))(
        {"w": jnp.asarray(w)}, ex)["w"]
    grads = np.asarray(grads)
    for i in range(n):
        noises = [np.asarray(losses.example_noise(mode, 4, int(t), i, SHAPE, 3)) for t in ts]
        np.testing.assert_allclose(grads[i], _hand_square_grad(sched, w, x0[i], noises, ts),
                                   rtol=1e-5)
    same = lambda i, j: np.allclose(grads[i], grads[j], rtol=1e-6)  # noqa: E731
    if mode == "shared":
        assert all(same(0, j) for j in range(n))
    elif mode == "per_example":
        assert not any(same(i, j) for i in range(n) for j in range(i))
    else:
        assert same(0, 3) and same(0, 6) and same(1, 4) and same(2, 5)
        assert not (same(0, 1) or same(0, 2) or same(1, 2))
    if mode != "shared":
        with pytest.raises(ValueError, match="index"):
            out_fn({"w": jnp.asarray(w)}, {"x0": x0[0], "ctx": ex["ctx"][0]}, None)


@pytest.mark.parametrize("mode", ["per_example", "per_position"])
def test_features_do_not_depend_on_microbatch(tmp_path, toy_unet, mode):
    """The same examples featurized with microbatch 2 (chunks of 3) and 5 (one chunk): equal
    features; a given 'index' (a stable example id) keys the noise instead of the row."""
    sched = make_schedule()
    rng = np.random.RandomState(0)
    ex = {"x0": rng.randn(9, *SHAPE).astype(np.float32),
          "ctx": rng.randn(9, 2, 2).astype(np.float32)}
    params = {"w": jnp.asarray([0.5, -1.0, 2.0], jnp.float32)}
    feats = []
    for mb, chunk in ((2, 3), (5, 64)):
        cfg = dt.AttributionConfig(method="dtrak", num_timesteps=2, k=3, projection="gaussian",
                                   microbatch=mb, noise=mode, noise_period=4)
        out_fn = dt.make_train_out_fn(toy_unet, sched, cfg)
        feats.append(dt.featurize_examples(out_fn, params, ex, cfg, tmp_path / f"mb{mb}",
                                           progress=False, chunk_size=chunk))
    np.testing.assert_allclose(feats[0], feats[1], rtol=1e-5, atol=1e-6)
    # stable ids: example 8 keyed as 0 gets example 0's noise (same x0 and ctx -> same feature)
    ids = {**ex, "x0": ex["x0"][[0, 1, 0]], "ctx": ex["ctx"][[0, 1, 0]],
           "index": np.array([10, 11, 10], np.int32)}
    got = dt.featurize_examples(out_fn, params, ids, cfg, tmp_path / "ids", progress=False)
    np.testing.assert_allclose(got[0], got[2], rtol=1e-6)
    assert not np.allclose(got[0], feats[1][0], rtol=1e-3)  # index 10 (mod 4 = 2), not row 0


def test_noise_goes_into_the_store_metadata(tmp_path, toy_unet):
    """A store made with one noise mode is refused for another (no stale features); 'shared'
    stores have no noise field (as stores made before it), so they keep opening."""
    sched = make_schedule()
    ex = {"x0": np.ones((3,) + SHAPE, np.float32), "ctx": np.zeros((3, 2, 2), np.float32)}
    params = {"w": jnp.ones((3,), jnp.float32)}
    kw = dict(progress=False, fingerprint="fp")

    def run(mode, folder):
        cfg = dt.AttributionConfig(method="dtrak", num_timesteps=1, k=3, projection="gaussian",
                                   noise=mode)
        return dt.featurize_examples(dt.make_train_out_fn(toy_unet, sched, cfg), params, ex,
                                     cfg, tmp_path / folder, **kw)

    run("shared", "a")
    import json
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())["meta"]["extra"]
    assert "noise" not in meta and "noise_period" not in meta
    with pytest.raises(StoreMismatchError, match="noise='shared'"):
        run("per_position", "a")
    run("per_example", "b")
    with pytest.raises(StoreMismatchError, match="noise"):
        run("per_position", "b")


# ------------------------------------------------------------------------ Journey-TRAK


def test_journey_target_renoises_to_t_and_averages_R_draws(toy_unet):
    """The target output is the DSM loss of x̂0 re-noised to the example's own t, averaged over
    R draws of normal(key, [R, ...]) — checked against a hand-computed loop."""
    sched = make_schedule()
    R = 3
    cfg = dt.AttributionConfig(method="journey-trak", journey_resamples=R)
    out_fn = dt.make_journey_target_out_fn(toy_unet, sched, cfg)
    rng = np.random.RandomState(1)
    w = np.array([0.5, -1.0, 2.0], np.float32)
    x0 = rng.randn(*SHAPE).astype(np.float32)
    key = jax.random.PRNGKey(9)
    vals = {}
    for t in (10, 600):
        got = float(out_fn({"w": jnp.asarray(w)}, {"x0": x0, "ctx": np.zeros((2, 2)),
                                                    "t": np.int32(t)}, key))
        draws = np.asarray(jax.random.normal(key, (R,) + SHAPE))
        a = float(sched.alphas_cumprod[t])
        want = 0.0
        for r in range(R):
            x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * draws[r]
            want += np.mean((draws[r] - w * x_t) ** 2) / R
        np.testing.assert_allclose(got, want, rtol=1e-5)
        vals[t] = got
    assert not np.isclose(vals[10], vals[600])


# ------------------------------------------------------------------------ ensembles


def test_ensemble_scores_are_the_mean_of_single_checkpoint_scores():
    rng = np.random.RandomState(2)
    Phis = [rng.randn(12, 5) * s for s in (1.0, 3.0, 0.5)]
    phis = [rng.randn(4, 5) for _ in Phis]
    singles = [dt.ensemble_scores([q], [P], 0.1) for q, P in zip(phis, Phis)]
    for q, P, s in zip(phis, Phis, singles):   # M = 1 is the single-checkpoint score
        np.testing.assert_allclose(
            s, dt.scores_from_features(q, P, dt.relative_lambdas(P, [0.1])[0]), rtol=1e-5)
    np.testing.assert_allclose(dt.ensemble_scores(phis, Phis, 0.1), np.mean(singles, axis=0),
                               rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="one of each"):
        dt.ensemble_scores(phis[:2], Phis, 0.1)


def test_ensemble_steps():
    steps = [0, 100, 200, 300, 400]
    assert dt.ensemble_steps(1, steps) == [400]
    assert dt.ensemble_steps(3, steps) == [200, 300, 400]
    assert dt.ensemble_steps(9, steps) == [100, 200, 300, 400]   # step 0 (the base) left out
    assert dt.ensemble_steps(2, [0]) == [0]
    assert dt.ensemble_steps([300, 100], steps) == [100, 300]
    assert dt.ensemble_steps(None, steps, "dtrak") == [400]
    assert dt.ensemble_steps(None, steps, "trak") == [200, 300, 400]
    assert dt.ensemble_steps(None, steps, "journey-trak") == [200, 300, 400]
    with pytest.raises(ValueError, match=r"no checkpoint at step\(s\) \[150\]"):
        dt.ensemble_steps([100, 150], steps)
    for bad in (0, -1, [], "last", True):
        with pytest.raises(ValueError, match="checkpoints="):
            dt.ensemble_steps(bad, steps)


# ------------------------------------------------------------------------ API fingerprint


def test_api_fingerprint_is_computed_and_refuses_other_data(tmp_path, toy_unet):
    """featurize_examples without a fingerprint keys the store by the examples themselves: a
    rerun with the same data reuses it, other data (e.g. other query images) is refused with
    an error that says so; an explicit fingerprint overrides (and is trusted)."""
    sched = make_schedule()
    cfg = dt.AttributionConfig(method="dtrak", num_timesteps=1, k=3, projection="gaussian")
    out_fn = dt.make_train_out_fn(toy_unet, sched, cfg)
    params = {"w": jnp.ones((3,), jnp.float32)}
    rng = np.random.RandomState(3)
    a = {"x0": rng.randn(2, *SHAPE).astype(np.float32), "ctx": np.zeros((2, 2, 2), np.float32)}
    b = {**a, "x0": a["x0"] + 1}
    fa = dt.featurize_examples(out_fn, params, a, cfg, tmp_path / "q", progress=False)
    np.testing.assert_array_equal(
        dt.featurize_examples(out_fn, params, {k: v.copy() for k, v in a.items()}, cfg,
                              tmp_path / "q", progress=False), fa)
    with pytest.raises(StoreMismatchError, match="computed for other examples"):
        dt.featurize_examples(out_fn, params, b, cfg, tmp_path / "q", progress=False)
    fb = dt.featurize_examples(out_fn, params, b, cfg, tmp_path / "q2", progress=False)
    assert not np.allclose(fa, fb)
    assert dt.data_fingerprint(a) != dt.data_fingerprint(b)
    # an explicit fingerprint is the key (the caller vouches for it)
    dt.featurize_examples(out_fn, params, a, cfg, tmp_path / "e", fingerprint="mine",
                          progress=False)
    with pytest.raises(StoreMismatchError, match="dataset_fingerprint"):
        dt.featurize_examples(out_fn, params, a, cfg, tmp_path / "e", progress=False)

    class Lazy:
        shape = (2, 2, 2)
    with pytest.raises(ValueError, match=r"examples\['ctx'\] is a Lazy.*fingerprint="):
        dt.data_fingerprint({"x0": a["x0"], "ctx": Lazy()})


# ------------------------------------------------------------------------ old run directories


def _old_config(c) -> dict:
    """``c`` as a config.json written before attribution.noise / checkpoints existed."""
    import json
    d = json.loads(c.to_json())
    del d["attribution"]["noise"], d["attribution"]["checkpoints"]
    return d


def test_demo_run_dirs_made_before_the_fields_keep_shared_noise(tmp_path, caplog):
    """A demo / benchmark run directory with results whose config.json predates the fields
    resumes with 'shared' noise and one checkpoint (what it was made with), saying so; one
    without results takes the new defaults; a new one is written with them."""
    import json
    from jaxattrib.config import ATTRIBUTION_LEGACY, load_config
    from jaxattrib.runs.rundir import check_run_config
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps(_old_config(load_config("demo"))))
    (old / "scores").mkdir()
    (old / "scores" / "dtrak.npy").write_bytes(b"x")          # something computed
    assert load_config("demo").attribution.noise == "shared"      # the default [design]
    c = load_config("demo", ["attribution.noise=per_position"])     # a config asking another
    assert c.attribution.checkpoints == 1
    check_run_config(old, c, adopt=ATTRIBUTION_LEGACY)
    assert c.attribution.noise == "shared" and c.attribution.checkpoints == 1
    assert "attribution.noise='per_position' -> 'shared'" in caplog.text   # a WARNING
    # no results yet: the config is replaced, the new defaults stay
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "config.json").write_text(json.dumps(_old_config(load_config("demo"))))
    c2 = load_config("demo", ["attribution.noise=per_position"])
    check_run_config(fresh, c2, adopt=ATTRIBUTION_LEGACY)
    assert c2.attribution.noise == "per_position"
    assert json.loads((fresh / "config.json").read_text())["attribution"]["noise"] == \
        "per_position"


def test_attribute_defaults_of_old_and_new_run_dirs(tmp_path):
    """`jaxattrib attribute` on a run whose config's attribution section predates the fields:
    'shared' and one checkpoint; a run with the fields: its values; a run without an
    attribution section: the defaults ('shared' [design], the method's checkpoints)."""
    import json
    from jaxattrib.config import load_config
    from jaxattrib.runs.attribute import attribution_defaults
    for name, cfg, want in (
            ("old", _old_config(load_config("sd15_lora")), ("shared", 1)),
            ("new", json.loads(load_config("sd15_lora", ["attribution.checkpoints=(2, 4)",
                                                         "attribution.noise=per_example"])
                               .to_json()), ("per_example", [2, 4])),
            ("bare", {"model": "embedded"}, ("shared", None))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        d = attribution_defaults(tmp_path / name)
        assert (d["noise"], d["checkpoints"]) == want, name


def test_lds_benchmark_legacy_noise(tmp_path):
    """benchmarks/lds.py: a run directory with features and a config.json without
    attribution.noise was made with 'shared'; one with the field, or without features, not."""
    import importlib.util
    import json
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("lds_benchmark_faithful",
                                                  root / "benchmarks" / "lds.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    run = tmp_path / "run"
    (run / "features").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"attribution": {"k": 32}}))
    assert not bench.legacy_noise(run)                      # no features yet
    np.save(run / "features" / "trak_final_train.npy", np.zeros((2, 2)))
    assert bench.legacy_noise(run)
    (run / "config.json").write_text(json.dumps({"attribution": {"noise": "per_position"}}))
    assert not bench.legacy_noise(run)


def test_train_run_made_before_the_fields_resumes_and_keeps_shared(tiny_pixel_pipeline,
                                                                   tmp_path, caplog):
    """`jaxattrib train` on a run directory whose config.json has an attribution section without
    noise / checkpoints resumes (no "another config"), and the config.json it rewrites states
    'shared' and one checkpoint, which `attribute` then uses."""
    import json
    import ml_collections
    from jaxattrib.config import load_config
    from jaxattrib.runs.attribute import attribution_defaults
    from jaxattrib.runs.train import train_run

    def config():
        c = load_config("finetune_folder", [
            f"model={tiny_pixel_pipeline}", "data.source=digits", "data.size=8",
            "data.max_examples=4", "finetune.steps=1", "finetune.batch_size=2",
            "finetune.checkpoint_every=1"])
        c.attribution = ml_collections.ConfigDict(load_config("sd15_lora").attribution)
        c.attribution.noise = "per_position"   # a run asking another mode than the legacy one
        return c
    run = tmp_path / "run"
    train_run(config(), run, progress=False)
    assert attribution_defaults(run)["noise"] == "per_position"
    stored = json.loads((run / "config.json").read_text())
    del stored["attribution"]["noise"], stored["attribution"]["checkpoints"]
    (run / "config.json").write_text(json.dumps(stored))          # as made before the fields
    log = (run / "record" / "steps.jsonl").read_text()
    train_run(config(), run, progress=False)                      # resumes
    assert (run / "record" / "steps.jsonl").read_text() == log
    assert "attribution.noise='per_position' -> 'shared'" in caplog.text   # a WARNING
    a = json.loads((run / "config.json").read_text())["attribution"]
    assert (a["noise"], a["checkpoints"]) == ("shared", 1)
    assert attribution_defaults(run)["noise"] == "shared"
