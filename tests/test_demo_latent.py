"""The demo's Concept-TRAK, MONTRAGE and CGI-DM stages on a latent base model, each called
directly on tiny inputs (the tiny latent pipeline of tests/tiny.py: 16-px images, 8x8x4
latents), against the same computation assembled by hand from the commands' latent I/O
(``concept-query``'s encoding, ``latent_io.encode_images`` / ``decode_images``); on a pixel
base model the same stages must equal the pre-port pixel computation exactly. The whole demo
on a latent base model is the slow test in tests/test_latent_path.py."""

import jax
import numpy as np
import pytest

pytest.importorskip("diffusers")

from tiny import make_pixel_base_model  # noqa: E402

from jaxattrib.models import latent_io  # noqa: E402

CAPTIONS = ["a red circle on a black background", "a red circle on a white background",
            "a blue square on a gray background", "a blue square on a black background",
            "a green star on a white background", "a yellow cross on a gray background"]
CONCEPT = np.array([0, 0, 1, 1, -1, -1], np.int32)   # 4 members of 2 new concepts, 2 others


def _images(n, seed, size=16):
    """Smooth random RGB images in [-1, 1] (low-frequency, image-like for the VAE)."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(-1, 1, (n, 4, 4, 3))
    return np.repeat(np.repeat(small, size // 4, 1), size // 4, 2).astype(np.float32)


def _config(**more):
    from jaxattrib.config import load_config
    sets = {"attribution.k": 16, "attribution.microbatch": 4, "attribution.lambda_ratios": "(0.1, 10.0)",
            "attribution.concept_inversion_steps": 5, "finetune.steps": 2,
            "finetune.batch_size": 4, "finetune.checkpoint_every": 1, "cgi_dm.num_steps": 2,
            "cgi_dm.batch_size": 4, "cgi_dm.t_min": 100, "cgi_dm.t_max": 900, **more}
    return load_config("demo", [f"{k}={v}" for k, v in sets.items()])


@pytest.fixture(scope="module", params=["latent", "pixel"])
def pipe(request, tiny_latent_pipeline, tmp_path_factory):
    from jaxattrib.models.pipeline import load_pipeline
    if request.param == "latent":
        return load_pipeline(tiny_latent_pipeline)
    return load_pipeline(make_pixel_base_model(tmp_path_factory.mktemp("pixbase")))


def _train(n=6):
    return {"images": _images(n, 0), "captions": np.array(CAPTIONS[:n]),
            "ids": np.array([f"t{i}" for i in range(n)]), "concept": CONCEPT[:n]}


def _ft(params, scale=0.02):
    """A stand-in fine-tuned UNet: the base weights plus small seeded noise."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [a + scale * jax.random.normal(k, a.shape, a.dtype)
                                               for a, k in zip(leaves, keys)])


def test_demo_concept_trak_on_model_inputs_equals_concept_query_rule(pipe, monkeypatch):
    """Latent: the demo's Concept-TRAK runs on the latents ``concept-query`` encodes
    (``runs.concept_query.concept_inputs``: the posterior mean), and its candidates are that
    computation's scores per λ ratio; pixel: on exactly the pixel arrays, as before the port."""
    from jaxattrib.runs import demo_attribute
    from jaxattrib.attribution import concept_trak as ct
    from jaxattrib.diffusion.schedule import schedule_from_diffusers_config
    from jaxattrib.runs.concept_query import concept_inputs
    config = _config()
    sched = schedule_from_diffusers_config(pipe.scheduler_config)
    train = _train(4)
    queries = {"images": _images(2, 1), "prompts": np.array(CAPTIONS[1:4:2])}
    seen = {}
    real = ct.concept_trak_scores

    def spy(unet_config, unet_params, encode, train_images, train_prompts, query_images,
            query_prompts, concepts, cfg, *args, **kwargs):
        seen.update(train=np.asarray(train_images), query=np.asarray(query_images),
                    concepts=list(concepts), cfg=cfg)
        seen["out"] = real(unet_config, unet_params, encode, train_images, train_prompts,
                           query_images, query_prompts, concepts, cfg, *args, **kwargs)
        return seen["out"]
    monkeypatch.setattr(ct, "concept_trak_scores", spy)
    train_ex = demo_attribute._examples(pipe, train["images"], train["captions"])
    query_ex = demo_attribute._examples(pipe, queries["images"], queries["prompts"])
    got = demo_attribute._concept_trak_candidates(config, pipe, pipe.unet_params, sched, train,
                                                  queries, train_ex, query_ex)
    if pipe.is_latent:   # concept-query's encoding, computed on its own
        x_tr, how = concept_inputs(pipe, train["images"], config, "train", "train")
        x_q, _ = concept_inputs(pipe, queries["images"], config, "query", "queries")
        assert x_tr.shape == (4, 8, 8, 4) and "posterior mean" in how
        np.testing.assert_allclose(seen["train"], x_tr, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(seen["query"], x_q, rtol=1e-5, atol=1e-6)
    else:                # the pre-port call: the pixel arrays themselves
        np.testing.assert_array_equal(seen["train"], train["images"])
        np.testing.assert_array_equal(seen["query"], queries["images"])
    assert seen["concepts"] == ["red circle", "blue square"]
    assert seen["cfg"].inversion_steps == 5 and seen["cfg"].proj_dim == 16
    _, (Phi, phi) = seen["out"]
    assert Phi.shape[0] == 4 and phi.shape[0] == 2
    assert list(got) == ["ratio=0.1", "ratio=10"]
    for r in config.attribution.lambda_ratios:
        s = np.asarray(got[f"ratio={r:g}"])
        assert s.shape == (2, 4) and np.isfinite(s).all()
        np.testing.assert_array_equal(s, np.asarray(ct.scores_from_features(phi, Phi, r)))
    assert not np.allclose(got["ratio=0.1"], got["ratio=10"])


def test_demo_cgi_dm_stage_on_latents_runs_pgd_on_the_latent(pipe, tmp_path, monkeypatch):
    """Latent: the demo's CGI-DM stage gives ``cgi_dm.authenticate`` and both baselines the
    latent I/O (encode = the VAE posterior mean of ``latent_io.encode_images``, decode =
    ``latent_io.decode_images``) and stores exactly what they return; the report's images are
    decoded pixels. Pixel: no codec (identity), as before the port."""
    from jaxattrib.runs import demo
    from jaxattrib.authentication import cgi_dm
    config = _config()
    train = _train()
    holdout = {"images": _images(4, 2), "captions": np.array(CAPTIONS[:4]),
               "concept": np.array([0, 0, 1, 1])}
    calls = {}

    def spying(name):
        real = getattr(cgi_dm, name)

        def spy(images, *args, **kwargs):
            calls[name] = (np.asarray(images), kwargs, real(images, *args, **kwargs))
            return calls[name][2]
        monkeypatch.setattr(cgi_dm, name, spy)
    for name in ("authenticate", "loss_gap_scores", "masked_similarity_scores"):
        spying(name)
    cg = demo.cgi_dm_stage(tmp_path, config, pipe, _ft(pipe.unet_params), train, holdout,
                           progress=False)
    assert (tmp_path / "cgi_dm" / "scores.npz").is_file()
    ev = np.concatenate([train["images"][:4], holdout["images"][2:]])
    np.testing.assert_array_equal(cg["labels"], [1, 1, 1, 1, 0, 0])
    for k in ("original", "masked", "recovered"):
        assert cg[k].shape == (6, 16, 16, 3), k          # pixels, decoded for latents
    np.testing.assert_array_equal(cg["original"], ev)
    assert not np.allclose(cg["masked"], cg["recovered"])
    _, kw, res = calls["authenticate"]
    np.testing.assert_array_equal(calls["authenticate"][0], ev)
    np.testing.assert_array_equal(cg["scores"], res["scores"])
    np.testing.assert_array_equal(cg["recovered"], res["recovered"])
    np.testing.assert_array_equal(cg["loss_gap"], calls["loss_gap_scores"][2])
    np.testing.assert_array_equal(cg["masked_similarity"], calls["masked_similarity_scores"][2])
    assert np.isfinite(cg["scores"]).all() and np.isfinite(cg["loss_gap"]).all()
    codecs = [(kw["encode"], kw["decode"]),
              (calls["loss_gap_scores"][1]["encode"], None),
              (calls["masked_similarity_scores"][1]["encode"],
               calls["masked_similarity_scores"][1]["decode"])]
    if pipe.is_latent:
        vp, vc = pipe.vae_params, pipe.vae_config
        z = latent_io.encode_images(vp, vc, ev)          # the posterior mean, by hand
        assert z.shape == (6, 8, 8, 4)
        x = latent_io.decode_images(vp, vc, z)
        for enc, dec in codecs:
            np.testing.assert_allclose(np.asarray(enc(ev)), z, rtol=1e-5, atol=1e-5)
            if dec is not None:
                np.testing.assert_allclose(np.asarray(dec(z)), x, rtol=1e-5, atol=1e-5)
    else:
        assert all(enc is None and dec is None for enc, dec in codecs)
    # the report section: ROC + the original | masked | recovered grid of pixel images
    row = demo.cgi_dm_report(tmp_path, cg, "VAE latents [8, 8, 4]" if pipe.is_latent else "")
    assert "AUC" in row
    assert (tmp_path / "results" / "cgi_dm_examples.png").is_file()
    text = (tmp_path / "results" / "cgi_dm.json").read_text()
    assert ("VAE-decoded" in text) == pipe.is_latent


def test_demo_montrage_on_latents_equals_by_hand_and_finds_copies(tiny_latent_pipeline,
                                                                 tmp_path):
    """The demo's MONTRAGE on a latent base model: a real (2-step) demo fine-tuning record,
    queries that are copies of training images; 'final' ranks each copy's source first and both
    aggregations equal MONTRAGE on hand-encoded latents (``latent_io.pipeline_inputs``, mean)."""
    from jaxattrib.runs import demo, demo_attribute
    from jaxattrib.attribution import montrage as M
    from jaxattrib.models.pipeline import load_pipeline
    from jaxattrib.train.record import TrajectoryRecord
    pipe = load_pipeline(tiny_latent_pipeline)
    config = _config()
    train = _train()
    _, record = demo.finetune_stage(tmp_path, config, pipe, train, progress=False)
    assert record.steps() == [0, 1, 2]
    record.close()
    src = np.array([3, 0, 4])
    queries = {"images": train["images"][src], "prompts": train["captions"][src]}
    train_ex = demo_attribute._examples(pipe, train["images"], train["captions"])
    query_ex = demo_attribute._examples(pipe, queries["images"], queries["prompts"])
    assert train_ex["x0"].shape == (6, 8, 8, 4)
    got = {how: demo_attribute._montrage_scores(tmp_path, pipe, train_ex, query_ex, how,
                                                progress=False)
           for how in ("movement", "final")}
    np.testing.assert_array_equal(np.argmax(got["final"], axis=1), src)
    z = latent_io.pipeline_inputs(pipe, train["images"], "train")
    rec = TrajectoryRecord.open(tmp_path / "record")
    traj = M.representation_trajectory(rec, pipe.unet_config, z, train_ex["ctx"], z[src],
                                       query_ex["ctx"], progress=False)
    for how, seen in (("movement", "count"), ("final", "ignore")):
        want = np.asarray(M.trajectory_scores(traj, how, record=rec, seen=seen))
        s = np.asarray(got[how])
        assert s.shape == (3, 6) and np.isfinite(s).all(), how
        np.testing.assert_allclose(s, want, rtol=1e-4, atol=1e-5, err_msg=how)
    rec.close()
