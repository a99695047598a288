"""The public Attributor and the method-name → scores dispatch (issue 20 items 2–3).

Ground truth: the Attributor's scores equal the low-level path's (featurize_examples +
scores_from_features with the same config and keys) exactly; ``[Q, N]`` orientation by
construction (a query equal to training example j ranks j first; a non-square Q ≠ N shape);
a featurization interrupted after one chunk resumes to the same features; a store of other
data is refused; topk equals argsort of score."""

import numpy as np
import pytest

from jaxattrib.attribution import methods as M

CAPTIONS = ["a red square on a black background", "a blue circle on a white background",
            "a green triangle on a gray background", "a red circle on a white background",
            "a blue square on a gray background", "a green square on a black background"]


@pytest.fixture(scope="module")
def pipe(tiny_pixel_pipeline):
    from jaxattrib.models.pipeline import load_pipeline
    return load_pipeline(tiny_pixel_pipeline)


def _data(n=6, q=3, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (n, 8, 8, 3)).astype(np.float32)
    queries = rng.uniform(-1, 1, (q, 8, 8, 3)).astype(np.float32)
    return ({"images": images, "captions": CAPTIONS[:n]},
            {"images": queries, "captions": CAPTIONS[1:q + 1]})


def _config(method):
    from jaxattrib.attribution import AttributionConfig
    return AttributionConfig(method=method, k=16, params="attn2", num_timesteps=2,
                             projection="rademacher", microbatch=2)


@pytest.mark.parametrize("method", ["dtrak", "trak"])
def test_attributor_equals_the_low_level_path(pipe, tmp_path, method):
    from jaxattrib.attribution import Attributor, featurize_examples, scores_from_features
    from jaxattrib.attribution import diffusion_trak as dt
    from jaxattrib.diffusion.schedule import schedule_from_diffusers_config
    train, queries = _data()
    ac = _config(method)
    att = Attributor(pipe, method=method, config=ac, store=tmp_path / "a", lam_ratio=0.5)
    s = att.featurize(train).score(queries)
    assert s.shape == (3, 6)                       # [Q, N]
    # by hand: the same functions, config and keys
    sched = schedule_from_diffusers_config(pipe.scheduler_config)
    fn = dt.make_train_out_fn(pipe.unet_config, sched, ac)
    tr, q = M.model_inputs(pipe, **train), M.model_inputs(pipe, **queries)
    Phi = featurize_examples(fn, pipe.unet_params, tr, ac, tmp_path / "h" / "train",
                             progress=False)
    phi = featurize_examples(fn, pipe.unet_params, q, ac, tmp_path / "h" / "q", role="query",
                             progress=False)
    want = scores_from_features(phi, Phi, dt.relative_lambdas(Phi, [0.5])[0])
    np.testing.assert_array_equal(att.train_features[0], Phi)
    np.testing.assert_array_equal(s, want)
    np.testing.assert_array_equal(M.method_scores(method, phi, Phi, lam_ratio=0.5), want)
    # topk = argsort of score, best first
    vals, idx = att.topk(4)
    np.testing.assert_array_equal(att.topk(4).indices, idx)      # named fields
    np.testing.assert_array_equal(idx, np.argsort(-s, axis=1, kind="stable")[:, :4])
    np.testing.assert_array_equal(vals, np.take_along_axis(s, idx, 1))
    assert (np.diff(vals, axis=1) <= 0).all()


def test_journey_trak_scores_trajectory_targets(pipe, tmp_path):
    """Journey-TRAK: queries are trajectory targets {x̂0, ctx, t}, featurized with the target
    output function; equal to the low-level path; a query without 't' is refused."""
    from jaxattrib.attribution import Attributor, featurize_examples, scores_from_features
    from jaxattrib.attribution import diffusion_trak as dt
    from jaxattrib.diffusion.schedule import schedule_from_diffusers_config
    train, queries = _data()
    ac = _config("journey-trak")
    target = {**M.model_inputs(pipe, **queries), "t": np.array([100, 500, 900], np.int32)}
    att = Attributor(pipe, method="journey-trak", config=ac, store=tmp_path / "a")
    s = att.featurize(train).score(target)
    sched = schedule_from_diffusers_config(pipe.scheduler_config)
    Phi = featurize_examples(dt.make_train_out_fn(pipe.unet_config, sched, ac),
                             pipe.unet_params, M.model_inputs(pipe, **train), ac,
                             tmp_path / "h" / "train", progress=False)
    phi = featurize_examples(dt.make_journey_target_out_fn(pipe.unet_config, sched, ac),
                             pipe.unet_params, target, ac, tmp_path / "h" / "q", role="query",
                             progress=False)
    np.testing.assert_array_equal(s, scores_from_features(phi, Phi,
                                                          dt.relative_lambdas(Phi, [1.0])[0]))
    with pytest.raises(ValueError, match="'t' is missing"):
        att.score(queries)


def test_orientation_by_construction_and_exact_kernel():
    """A query equal to training example j ranks j first (pixel similarity); TRAK features
    with λ = 0 give the exact regression kernel X_q (XᵀX)⁻¹ Xᵀ (float64 solve, float32
    scores), [Q, N] with Q ≠ N."""
    rng = np.random.default_rng(1)
    train = rng.standard_normal((7, 4, 4, 3))
    queries = train[[5, 0, 3]] + 0.01 * rng.standard_normal((3, 4, 4, 3))
    s = M.method_scores("pixel", queries, train)
    assert s.shape == (3, 7)
    np.testing.assert_array_equal(s.argmax(1), [5, 0, 3])
    X, Xq = rng.standard_normal((9, 4)), rng.standard_normal((2, 4))
    exact = Xq @ np.linalg.solve(X.T @ X, X.T)
    got = M.method_scores("trak", Xq, X, lam_ratio=0.0)
    assert got.shape == (2, 9)
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-6)
    # TracIn: Σ η <φ_q, φ_i>, [Q, N]; a checkpoint ensemble of TRAK = mean of single ones
    np.testing.assert_allclose(M.method_scores("tracin", [Xq, 2 * Xq], [X, X],
                                               learning_rates=[0.5, 0.25]), Xq @ X.T,
                               rtol=1e-5)
    np.testing.assert_allclose(M.method_scores("dtrak", [Xq, Xq], [X, 2 * X], lam_ratio=0.1),
                               0.5 * (M.method_scores("dtrak", Xq, X, lam_ratio=0.1)
                                      + M.method_scores("dtrak", Xq, 2 * X, lam_ratio=0.1)),
                               rtol=1e-5)
    assert M.method_scores("random", Xq, X).shape == (2, 9)
    # swapping the sides and transposing (what the attribute / demo TracIn did before they
    # called method_scores) gives the same [Q, N] bit for bit, so their scores are unchanged
    from jaxattrib.attribution import trak
    np.testing.assert_array_equal(trak.tracin_scores([X], [Xq], [0.3]).T,
                                  trak.tracin_scores([Xq], [X], [0.3]))


def test_registry_names_every_accepted_method():
    from jaxattrib.attribution.diffusion_trak import METHODS as DT_METHODS
    from jaxattrib.runs.demo import DEMO_METHODS
    assert set(DEMO_METHODS) | set(DT_METHODS) <= set(M.METHODS)
    assert set(M.gradient_methods()) == set(DT_METHODS)
    from jaxattrib.attribution import method_names
    assert tuple(M.METHODS) == tuple(method_names.METHOD_FAMILIES)    # one list of names
    assert {n: s.family for n, s in M.METHODS.items()} == method_names.METHOD_FAMILIES
    assert {s.family for s in M.METHODS.values()} == set(M.FAMILIES)
    assert {n: s.default_checkpoints for n, s in M.METHODS.items()
            if isinstance(s.default_checkpoints, int)} == method_names.DEFAULT_CHECKPOINTS
    with pytest.raises(ValueError, match="expected one of"):
        M.method_spec("nope")
    with pytest.raises(ValueError, match="method_scores"):
        from jaxattrib.attribution import Attributor
        Attributor(None, method="pixel")


def test_featurize_resumes_and_refuses_other_data(pipe, tmp_path):
    from jaxattrib.attribution import Attributor
    from jaxattrib.attribution.store import StoreMismatchError
    train, queries = _data()
    ac = _config("dtrak")

    class Stop(Exception):
        pass

    calls = []

    def stop_after_first_chunk(n):
        calls.append(n)
        if len(calls) == 2:      # chunk 0 (2 rows) written, killed inside chunk 1
            raise Stop

    att = Attributor(pipe, config=ac, store=tmp_path / "s", chunk_size=2,
                     on_progress=stop_after_first_chunk)
    with pytest.raises(Stop):
        att.featurize(train)
    folder = tmp_path / "s" / "dtrak" / "model" / "train"
    assert (folder / "chunk_00000.done").is_file() and not (folder / "chunk_00001.done").exists()
    before = (folder / "chunk_00000.npy").stat().st_mtime_ns
    resumed = Attributor(pipe, config=ac, store=tmp_path / "s", chunk_size=2).featurize(train)
    assert (folder / "chunk_00000.npy").stat().st_mtime_ns == before   # kept, not recomputed
    fresh = Attributor(pipe, config=ac, store=tmp_path / "f", chunk_size=2).featurize(train)
    np.testing.assert_array_equal(resumed.train_features[0], fresh.train_features[0])
    other = {"images": -train["images"], "captions": train["captions"]}
    with pytest.raises(StoreMismatchError, match="dataset_fingerprint"):
        Attributor(pipe, config=ac, store=tmp_path / "s", chunk_size=2).featurize(other)
    with pytest.raises(ValueError, match="featurize"):
        Attributor(pipe, config=ac).score(queries)


def _record(root, pipe):
    """A trajectory record by hand: checkpoints 0, 1, 2 (perturbed UNets) and the step log's
    learning rates 0.1 (update 0) and 0.05 (update 1)."""
    import jax
    import jax.numpy as jnp
    from jaxattrib.train.record import TrajectoryRecord
    rec = TrajectoryRecord.create(root / "record", {"config": {"mode": "full"}})
    base = {"unet": pipe.unet_params}
    state = lambda p, s: {"step": jnp.asarray(s), "params": p,  # noqa: E731
                          "opt_state": {"count": jnp.zeros((), jnp.int32)}}
    rec.save(0, state(base, 0), base=base)
    for s in (1, 2):
        key = jax.random.PRNGKey(s)
        rec.save(s, state({"unet": jax.tree_util.tree_map(
            lambda a: a + 0.05 * jax.random.normal(key, a.shape, a.dtype), pipe.unet_params)}, s))
        rec.append_step({"step": s - 1, "indices": [0, 1], "key": [0, s], "lr": 0.1 / s})
    rec.close()
    return root / "record"


def test_checkpoint_ensemble_and_tracin_over_a_record(pipe, tmp_path):
    """TRAK over the last 2 checkpoints = ensemble_scores of each checkpoint's features;
    TracIn = Σ η_s φ_s Φ_sᵀ over checkpoints 1, 2 with the logged learning rates."""
    from jaxattrib.attribution import Attributor, featurize_examples
    from jaxattrib.attribution import diffusion_trak as dt
    from jaxattrib.attribution import trak
    from jaxattrib.diffusion.schedule import schedule_from_diffusers_config
    from jaxattrib.train.record import TrajectoryRecord
    rec_dir = _record(tmp_path, pipe)
    train, queries = _data()
    tr, q = M.model_inputs(pipe, **train), M.model_inputs(pipe, **queries)
    sched = schedule_from_diffusers_config(pipe.scheduler_config)
    rec = TrajectoryRecord.open(rec_dir)
    for method, kw in (("trak", {"checkpoints": 2}), ("tracin", {})):
        ac = _config(method)
        with Attributor(pipe, method=method, config=ac, record=rec_dir,
                        store=tmp_path / "a", **kw) as att:
            assert att.steps == [1, 2]
            s = att.featurize(train).score(queries)
        fn = dt.make_train_out_fn(pipe.unet_config, sched, ac)
        Phis, phis = [], []
        for st in (1, 2):
            p = rec.load(st)["unet"]
            Phis.append(featurize_examples(fn, p, tr, ac, tmp_path / f"h{method}{st}" / "t",
                                           step=st, progress=False))
            phis.append(featurize_examples(fn, p, q, ac, tmp_path / f"h{method}{st}" / "q",
                                           step=st, role="query", progress=False))
        want = (dt.ensemble_scores(phis, Phis, 1.0) if method == "trak" else
                trak.tracin_scores(phis, Phis, [0.1, 0.05]))
        assert s.shape == (3, 6)
        np.testing.assert_array_equal(s, want)
    with pytest.raises(ValueError, match="record"):
        Attributor(pipe, method="tracin", config=_config("tracin"))


README_SNIPPET = """\
from jaxattrib.attribution import Attributor, AttributionConfig
from jaxattrib.models.pipeline import load_pipeline

pipe = load_pipeline(model_folder)                        # a diffusers SD folder
att = Attributor(pipe, method="dtrak", store="features",  # resumable feature stores
                 config=AttributionConfig(k=2048, params="attn2"))
att.featurize({"images": train_images, "captions": train_captions})
scores = att.score({"images": query_images, "captions": query_prompts})  # [Q, N]
top = att.topk(3)                         # .scores, .indices [Q, 3], best first
"""


def test_readme_snippet_runs(tiny_pixel_pipeline, tmp_path, monkeypatch):
    """The README's Python API snippet, executed on the tiny pipeline."""
    monkeypatch.chdir(tmp_path)
    train, queries = _data()
    ns = {"model_folder": str(tiny_pixel_pipeline), "train_images": train["images"],
          "train_captions": train["captions"], "query_images": queries["images"],
          "query_prompts": queries["captions"]}
    assert len(README_SNIPPET.splitlines()) <= 10
    exec(compile(README_SNIPPET, "README snippet", "exec"), ns)
    assert ns["scores"].shape == (3, 6) and ns["top"].indices.shape == (3, 3)
    np.testing.assert_array_equal(ns["top"].indices, np.argsort(-ns["scores"], 1)[:, :3])
    assert (tmp_path / "features" / "dtrak" / "model" / "train" / "meta.json").is_file()


def _commands():
    """(module with training_examples / read_queries / attribute_run, train_run)."""
    from jaxattrib.runs import attribute as A, train as T
    return A, T.train_run


@pytest.mark.slow
def test_attributor_over_a_run_directory_reuses_and_reproduces_attribute(tiny_pixel_pipeline,
                                                                         tmp_path):
    """``store=RUN/features, record=RUN`` is the layout of ``jaxattrib attribute``: the
    Attributor reuses its training stores (files untouched) and reproduces its scores exactly,
    for D-TRAK (1 checkpoint), TRAK (ensemble of 2) and TracIn (the swapped-argument call of
    the command gives the same [Q, N])."""
    import hashlib

    from PIL import Image

    from jaxattrib.attribution import Attributor, AttributionConfig
    from jaxattrib.config import load_config
    A, train_run = _commands()
    c = load_config("finetune_folder", [
        f"model={tiny_pixel_pipeline}", "data.source=digits", "data.size=8",
        "data.max_examples=4", "finetune.steps=2", "finetune.batch_size=2",
        "finetune.checkpoint_every=1"])
    run, q = tmp_path / "run", tmp_path / "q"
    train_run(c, run, progress=False)
    q.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(q / f"{i}.png")
    (q / "prompts.txt").write_text("\n".join(CAPTIONS[:2]) + "\n")
    pipe = A.load_run_pipeline(run)
    train = A.training_examples(run, pipe, progress=False)
    q_images, q_prompts = A.read_queries(q)
    query_ex = M.model_inputs(pipe, q_images, q_prompts)
    kw = dict(k=16, params="attn2", num_timesteps=2, projection="rademacher", microbatch=2)
    for method, ck in (("dtrak", None), ("trak", 2), ("tracin", None)):
        A.attribute_run(run, q, method, checkpoints=ck, progress=False, **kw)
        stores = sorted((run / "features" / method).rglob("train/chunk_*.npy"))
        before = [p.stat().st_mtime_ns for p in stores]
        att = Attributor(pipe, method=method, config=AttributionConfig(method=method, **kw),
                         store=run / "features", record=run, checkpoints=ck)
        att.featurize(train.examples, fingerprint=train.fingerprint)
        s = att.score(query_ex, fingerprint=hashlib.sha256(q_images.tobytes()).hexdigest(),
                      folder="queries_q")
        assert [p.stat().st_mtime_ns for p in stores] == before and stores
        np.testing.assert_array_equal(s.astype(np.float32),
                                      np.load(run / "scores" / f"{method}_q.npy"))
