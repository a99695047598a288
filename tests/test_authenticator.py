"""The authentication public face: ``Authenticator`` (CGI-DM) and ``SourceModelAttributor``.

Each is checked for exact equality with what its command writes on the same inputs and keys
(``jaxattrib cgi-dm`` on the tiny latent pipeline, ``jaxattrib source-model`` on the tiny pixel
pipeline), for a calibration that sees only the calibration split (thresholds known by
construction), and for one-line ConfigErrors naming the bad argument."""

import zlib

import jax
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers")

from tiny import perturbed_copy  # noqa: E402

from jaxattrib.config import ConfigError  # noqa: E402

CAPTION = "a red circle"


def _smooth_images(n, seed, size=16):
    """Smooth random RGB images in [-1, 1] (low-frequency, so the VAE sees image-like input)."""
    small = np.random.default_rng(seed).uniform(-1, 1, (n, 4, 4, 3))
    return np.repeat(np.repeat(small, size // 4, 1), size // 4, 2).astype(np.float32)


def _write_pngs(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(images):
        Image.fromarray(np.round((x + 1) * 127.5).astype(np.uint8)).save(folder / f"{i:02d}.png")


def _one_line(excinfo, *parts):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for p in parts:
        assert p in msg, msg


@pytest.fixture(scope="module")
def finetuned(tiny_latent_pipeline, tmp_path_factory):
    """The tiny latent pipeline with a perturbed UNet (stands in for a fine-tuned model)."""
    return perturbed_copy(tiny_latent_pipeline, tmp_path_factory.mktemp("ft"), seed=1)


@pytest.fixture(scope="module")
def pair(tiny_latent_pipeline, finetuned):
    """(pipe, fine-tuned UNet params), loaded as ``jaxattrib cgi-dm`` loads them."""
    from jaxattrib.runs.specs import load_model, load_unet
    pipe = load_model(str(tiny_latent_pipeline))
    return pipe, load_unet(str(finetuned), pipe, "model.finetuned")[0]


# ----------------------------------------------------------------------------- Authenticator
def test_authenticator_equals_the_cgi_dm_command(tiny_latent_pipeline, finetuned, pair,
                                                 tmp_path):
    """Same images, captions and keys: the command's stored scores (candidates and reference),
    threshold, p-values and decisions, bit for bit (posterior samples, 3 images in batches of
    2: padding and a second batch included)."""
    from jaxattrib.authentication import Authenticator
    from jaxattrib.config import load_config
    from jaxattrib.runs.cgi_dm import check_config, run_cgi_dm
    from jaxattrib.runs.specs import image_folder
    _write_pngs(tmp_path / "cand", _smooth_images(3, 10))
    _write_pngs(tmp_path / "ref", _smooth_images(3, 11))
    cfg = load_config("cgi_dm", [
        f"model.pipeline={tiny_latent_pipeline}", f"model.finetuned={finetuned}",
        f"data.candidates={tmp_path / 'cand'}", f"data.reference={tmp_path / 'ref'}",
        f"data.caption={CAPTION}", "cgi.num_steps=3", "batch_size=2", "report_images=0"])
    assert cfg.data.vae_posterior == "sample" and cfg.similarity == "ssim"
    run_cgi_dm(cfg, tmp_path / "run", progress=False)
    stored = dict(np.load(tmp_path / "run" / "cgi_dm" / "scores.npz"))

    cand = image_folder(tmp_path / "cand", 16, "c", default_caption=CAPTION, labelled=True)
    ref = image_folder(tmp_path / "ref", 16, "r", default_caption=CAPTION)
    k_cand, k_ref, k_enc = jax.random.split(jax.random.PRNGKey(cfg.seed), 3)
    pipe, ft = pair
    auth = Authenticator(pipe, ft, config=check_config(cfg), batch_size=2)
    auth.calibrate({"images": ref["images"], "captions": ref["captions"]}, k_ref,
                   encode_key=jax.random.fold_in(k_enc, 1))
    np.testing.assert_array_equal(auth.null_scores, stored["reference_scores"])
    d = auth.decide({"images": cand["images"], "captions": cand["captions"]}, k_cand,
                    encode_key=jax.random.fold_in(k_enc, 0))
    np.testing.assert_array_equal(d["scores"], stored["scores"])
    np.testing.assert_array_equal(d["p_values"], stored["p_values"])
    np.testing.assert_array_equal(d["decisions"], stored["decisions"])
    assert d["threshold"] == auth.threshold == float(stored["threshold"])
    assert d["scores"].shape == (3,) and d["scores"].dtype == np.float64


def test_authenticator_baselines_equal_the_demo_calls(pair):
    """``baselines`` = the demo's ``loss_gap_scores`` / ``masked_similarity_scores`` calls
    (posterior-mean codec, same key)."""
    from jax.tree_util import Partial

    from jaxattrib.authentication import Authenticator, CGIDMConfig
    from jaxattrib.authentication import cgi_dm
    from jaxattrib.diffusion.schedule import schedule_from_diffusers_config
    from jaxattrib.models.latent_io import vae_codec
    from jaxattrib.models.unet import UNet2DConditionModel
    pipe, ft = pair
    cfg = CGIDMConfig(num_steps=1)
    x, key = _smooth_images(3, 5), jax.random.PRNGKey(23)
    caps = [CAPTION, "a blue square", CAPTION]
    got = Authenticator(pipe, ft, config=cfg, batch_size=2).baselines(
        {"images": x, "captions": caps}, key, n_draws=2)
    encode, decode = vae_codec(pipe, sample=False)
    model = UNet2DConditionModel(pipe.unet_config)
    apply = lambda p, z, t, c: model.apply({"params": p}, z, t, c)  # noqa: E731
    sched = schedule_from_diffusers_config(pipe.scheduler_config)
    ctx = np.asarray(pipe.encode_prompts(caps))
    gap = cgi_dm.loss_gap_scores(x, Partial(apply, pipe.unet_params), Partial(apply, ft), sched,
                                 key, cond=ctx, batch_size=2, encode=encode, n_draws=2)
    masked = cgi_dm.masked_similarity_scores(x, cfg, key, batch_size=2, encode=encode,
                                             decode=decode)
    np.testing.assert_array_equal(got["loss_gap"], gap)
    np.testing.assert_array_equal(got["masked_similarity"], masked)
    assert np.abs(gap).max() > 0        # the two models differ


def test_authenticator_calibrates_on_the_calibration_split_only(pair):
    """Thresholds known by construction, from the calibration scores alone; deciding on
    queries changes nothing calibrated."""
    from jaxattrib.authentication import Authenticator
    pipe, ft = pair
    null = np.arange(20) / 20.0                          # 0, 0.05, ..., 0.95
    auth = Authenticator(pipe, ft, fpr=0.05).calibrate(null)
    assert auth.threshold == pytest.approx(0.925)       # one of 20 above: FPR 0.05
    d = auth.decide(np.array([0.93, 0.92, 2.0]))
    assert d["decisions"].tolist() == [True, False, True]
    np.testing.assert_allclose(d["p_values"], [2 / 21, 2 / 21, 1 / 21])   # #{h >= s}: 1, 1, 0
    d2 = auth.decide(np.array([0.0, 0.1]))               # other queries: same threshold
    assert d2["threshold"] == d["threshold"] == auth.threshold
    np.testing.assert_array_equal(auth.null_scores, null)
    # accuracy: the best split of known members and non-members, at the midpoint 0.5
    acc = Authenticator(pipe, ft, target="accuracy").calibrate(
        np.array([0.1, 0.2, 0.3]), members=np.array([0.7, 0.8]))
    assert acc.threshold == 0.5
    assert acc.decide(np.array([0.31, 0.49, 0.51]))["decisions"].tolist() == [False, False, True]


def test_authenticator_members_as_examples_and_posterior_mean(pair):
    """Calibration sets given as images are scored as ``score`` scores them (non-members with
    ``key``, members with ``fold_in(key, 1)``); ``vae_posterior='mean'`` needs no encode_key
    and is deterministic in it."""
    from jaxattrib.authentication import Authenticator, CGIDMConfig
    from jaxattrib.authentication import cgi_dm
    pipe, ft = pair
    auth = Authenticator(pipe, ft, config=CGIDMConfig(num_steps=2), vae_posterior="mean",
                         target="accuracy", batch_size=2)
    non = {"images": _smooth_images(2, 20), "captions": [CAPTION] * 2}
    mem = {"images": _smooth_images(2, 21), "captions": ["a blue square"] * 2}
    key = jax.random.PRNGKey(5)
    auth.calibrate(non, key, members=mem)
    s_non = auth.score(non, key)
    s_mem = auth.score(mem, jax.random.fold_in(key, 1))
    np.testing.assert_array_equal(auth.null_scores, s_non)
    np.testing.assert_array_equal(auth.member_scores, s_mem)
    assert auth.threshold == cgi_dm.calibrate(s_non, s_mem, target="accuracy")
    assert not np.array_equal(s_non, auth.score(non, jax.random.PRNGKey(6)))  # the key matters


def test_authenticator_bad_inputs_are_one_config_error(pair):
    from jaxattrib.authentication import Authenticator
    pipe, ft = pair
    auth = Authenticator(pipe, ft)
    key = jax.random.PRNGKey(0)
    with pytest.raises(ConfigError) as e:                 # pixels of the wrong size
        auth.score({"images": np.zeros((2, 8, 8, 3)), "captions": [CAPTION] * 2}, key,
                   encode_key=key)
    _one_line(e, "images['images']", "[2, 8, 8, 3]", "[N, 16, 16, 3]")
    with pytest.raises(ConfigError) as e:
        auth.score({"images": _smooth_images(2, 0), "captions": [CAPTION]}, key, encode_key=key)
    _one_line(e, "['captions']", "1 captions for 2 images")
    with pytest.raises(ConfigError) as e:
        auth.score({"pixels": _smooth_images(2, 0)}, key)
    _one_line(e, "expected {'images'")
    with pytest.raises(ConfigError) as e:                 # posterior samples need their key
        auth.score({"images": _smooth_images(2, 0), "captions": [CAPTION] * 2}, key)
    _one_line(e, "encode_key is None", "vae_posterior='sample'")
    with pytest.raises(ConfigError) as e:
        auth.decide(np.array([0.5]))
    _one_line(e, "threshold is None", "calibrate")
    with pytest.raises(ConfigError) as e:
        auth.calibrate(np.zeros((2, 2)))
    _one_line(e, "non_members", "shape (2, 2)")
    with pytest.raises(ConfigError) as e:
        Authenticator(pipe, ft, target="accuracy").calibrate(np.array([0.1]))
    _one_line(e, "members is None", "target='accuracy'")
    for kw, field in (({"similarity": "lpips"}, "similarity='lpips'"),
                      ({"vae_posterior": "mode"}, "vae_posterior='mode'"),
                      ({"fpr": 1.5}, "fpr=1.5"), ({"batch_size": 0}, "batch_size=0")):
        with pytest.raises(ConfigError) as e:
            Authenticator(pipe, ft, **kw)
        _one_line(e, field)
    bad = jax.tree_util.tree_map(lambda a: a[..., :1] if a.ndim == 4 else a, ft)
    with pytest.raises(ConfigError) as e:                 # another architecture
        Authenticator(pipe, bad)
    _one_line(e, "finetuned", "shape")


# ----------------------------------------------------------------------------- source model
@pytest.fixture(scope="module")
def pixel_models(tiny_pixel_pipeline, tmp_path_factory):
    """Three other models of the tiny pixel pipeline's architecture (perturbed UNets)."""
    root = tmp_path_factory.mktemp("others")
    return [perturbed_copy(tiny_pixel_pipeline, root, seed=i, name=f"m{i}") for i in range(3)]


def _stand_in(calls):
    """A generator whose images are a pure function of (weights, prompt, key): identical
    weights give identical images, other weights unrelated ones (no sampler to compile)."""
    def factory(pipe, params, **kw):
        w = np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(params)])

        def gen(prompts, key):
            calls.append(len(prompts))
            return np.asarray([np.random.default_rng(zlib.crc32(
                w.tobytes() + p.encode() + np.asarray(key).tobytes())).uniform(-1, 1, (8, 8, 3))
                for p in prompts], np.float32)
        return gen
    return factory


PROMPTS = ("a red circle", "a blue square", "a red square", "a blue circle")


@pytest.mark.parametrize("delta0", ["0.15", "calibrated"])
def test_source_model_attributor_equals_the_command(tiny_pixel_pipeline, pixel_models, tmp_path,
                                                    monkeypatch, delta0):
    """Same models, prompts and seeds: the command's key samples (Strategy 1 on the real tiny
    UNet), δ0, threshold, per-model conf and verdicts; the copy of the source is flagged."""
    from jaxattrib.authentication import SourceModelAttributor
    from jaxattrib.authentication import source_model as sm
    from jaxattrib.config import load_config
    from jaxattrib.runs.source_model import run_source_model
    from jaxattrib.runs.specs import load_model, load_unet
    calls = []
    monkeypatch.setattr(sm, "pipeline_generate_fn", _stand_in(calls))
    m = [str(p) for p in pixel_models]
    cfg = load_config("source_model", [
        f"model.pipeline='{tiny_pixel_pipeline}'", f"model.suspects=('{m[0]}', 'pipeline')",
        f"model.innocent=('{m[1]}', '{m[2]}')", "key_samples.strategy='detection'",
        f"key_samples.prompts={PROMPTS!r}", "key_samples.n=2", "key_samples.detection_seeds=2",
        "query.seeds=(0, 1)", "report_keys=0", f"decision.delta0={delta0}"])
    res = run_source_model(cfg, tmp_path / "run", progress=False)

    pipe = load_model(str(tiny_pixel_pipeline))
    params = [load_unet(s, pipe, "m")[0] for s in (m[0], "pipeline", m[1], m[2])]
    sma = SourceModelAttributor(pipe, seeds=(0, 1), delta0=(
        "calibrated" if delta0 == "calibrated" else float(delta0)))
    keys = sma.select_keys(list(PROMPTS), jax.random.PRNGKey(cfg.seed), n=2, detection_seeds=2)
    assert keys.indices.tolist() == res["key_samples"]["indices"]
    assert keys.scores.tolist() == res["key_samples"]["scores"]
    d = sma.calibrate(params[2:]).decide(params[:2])
    assert sma.threshold == res["threshold"] and sma.delta0 == res["delta0"]
    rows = res["models"][:2]
    assert d["conf"].tolist() == [r["conf"] for r in rows]
    assert d["flagged"].tolist() == [r["flagged"] for r in rows] == [False, True]
    assert d["mean_distance"].tolist() == pytest.approx([r["mean distance"] for r in rows])
    assert d["conf"][1] == 1.0 and d["distances"].shape == (2, 2, 2)
    # given generations [S, N, H, W, C] stand for a model: same verdict
    g = sma.generations(params[1])
    assert g.shape == (2, 2, 8, 8, 3)
    assert sma.decide([g])["conf"].tolist() == [1.0]


def test_source_model_attributor_bad_inputs_are_one_config_error(tiny_pixel_pipeline):
    from jaxattrib.authentication import SourceModelAttributor
    from jaxattrib.models.pipeline import load_pipeline
    pipe = load_pipeline(tiny_pixel_pipeline)
    sma = SourceModelAttributor(pipe, seeds=(0,))
    key = jax.random.PRNGKey(0)
    with pytest.raises(ConfigError) as e:
        sma.generations(pipe.unet_params)
    _one_line(e, "keys is None", "select_keys")
    with pytest.raises(ConfigError) as e:
        sma.select_keys(list(PROMPTS), key, n=5)
    _one_line(e, "n=5", "[1, 4]")
    with pytest.raises(ConfigError) as e:
        sma.select_keys(list(PROMPTS), key, strategy="generation", n=2)
    _one_line(e, "reference=None")
    with pytest.raises(ConfigError) as e:
        sma.select_keys(list(PROMPTS), key, strategy="oracle", n=2)
    _one_line(e, "strategy='oracle'")
    sma.select_keys(list(PROMPTS), key, strategy="random", n=2)
    with pytest.raises(ConfigError) as e:
        sma.decide([np.zeros((1, 2, 8, 8, 3))])
    _one_line(e, "threshold is None", "calibrate")
    fixed = SourceModelAttributor(pipe, seeds=(0,), threshold=0.5)
    fixed.select_keys(list(PROMPTS), key, strategy="random", n=2)
    with pytest.raises(ConfigError) as e:                   # 3 key samples given, 2 selected
        fixed.decide([np.zeros((1, 3, 8, 8, 3))])
    _one_line(e, "model=", "[S=1, N=2")
    for kw, field in (({"metric": "l1"}, "metric='l1'"), ({"seeds": ()}, "seeds=()"),
                      ({"delta0": -1.0}, "delta0=-1.0"), ({"threshold": 2.0}, "threshold=2.0")):
        with pytest.raises(ConfigError) as e:
            SourceModelAttributor(pipe, **kw)
        _one_line(e, field)


# ----------------------------------------------------------------------------- README
#: how the README makes ``pipe`` and ``train`` (the lines this test repeats below)
README_DATA_LINES = [
    'pipe = bm.load_base_model()                                  # or models.pipeline.load_pipeline("sd15/")',
    "train = make_synthetic(bm.spec_from_info(bm.base_model_info(), per_combination=2), seed=1)   # 300 32-px images"]

README_AUTH_SNIPPET = """\
import jax
from jaxattrib.authentication import Authenticator, CGIDMConfig   # and SourceModelAttributor
auth = Authenticator(pipe, ft_unet_params, config=CGIDMConfig(num_steps=20), vae_posterior="mean", batch_size=4)   # CGI-DM: pipe's UNet vs a fine-tuned one; z = VAE posterior mean
auth.calibrate(non_members, jax.random.PRNGKey(1))            # {"images", "captions"} known not trained on: the threshold
d = auth.decide({"images": train.images[:4], "captions": train.captions[:4]}, jax.random.PRNGKey(2))   # d["scores"], d["decisions"]: [4]
"""


def test_readme_snippet_runs():
    """The README's Authenticator lines, verbatim, on the embedded (latent) base model (``pipe``,
    ``train`` as the README makes them); ``ft_unet_params`` is a perturbed copy of its UNet and
    ``non_members`` four other synthetic images (stand-ins the README leaves to the user)."""
    from pathlib import Path

    from jaxattrib.authentication import cgi_dm
    from jaxattrib.data.synthetic import make_synthetic
    from jaxattrib.train import base_model as bm
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme[readme.index("<!-- python-api: begin"):readme.index("<!-- python-api: end")]
    for line in README_AUTH_SNIPPET.splitlines() + README_DATA_LINES:
        assert line in block.splitlines(), line
    pipe = bm.load_base_model()
    train = make_synthetic(bm.spec_from_info(bm.base_model_info(), per_combination=2), seed=1)
    other = make_synthetic(bm.spec_from_info(bm.base_model_info(), per_combination=1), seed=2)
    assert train.images.shape == (300, 32, 32, 3) and pipe.is_latent   # as the README says
    k = jax.random.PRNGKey(7)
    ft = jax.tree_util.tree_map(lambda a: a + 0.01 * jax.random.normal(k, a.shape, a.dtype),
                                pipe.unet_params)
    ns = {"pipe": pipe, "train": train, "ft_unet_params": ft,
          "non_members": {"images": other.images[:4], "captions": other.captions[:4]}}
    exec(compile(README_AUTH_SNIPPET, "README snippet", "exec"), ns)
    d, auth = ns["d"], ns["auth"]
    assert d["scores"].shape == d["decisions"].shape == (4,) and d["decisions"].dtype == bool
    assert auth.null_scores.shape == (4,) and np.isfinite(d["scores"]).all()
    assert d["threshold"] == cgi_dm.calibrate(auth.null_scores) == auth.threshold
    np.testing.assert_array_equal(d["decisions"], d["scores"] >= d["threshold"])
