"""DreamBooth: the prior-preservation loss is instance + λ·class, λ=0 is plain fine-tuning,
pair data set, identifier checks; and (slow) the acceptance run on the shipped base model."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattrib import parallel
from jaxattrib.runs.dreambooth import dreambooth_run
from jaxattrib.train import dreambooth as db
from jaxattrib.train.diffusion_task import example_noise, make_diffusion_loss
from jaxattrib.train.finetune import TrainConfig, finetune
from tiny import tiny_diffusion, tiny_diffusion_configs


def _tiny_configs():
    """A pixel-space 8x8 UNet + 1-layer CLIP text encoder config (tests/tiny.py), 100-step
    schedule."""
    from jaxattrib.diffusion.schedule import make_schedule
    ucfg, tcfg, _ = tiny_diffusion_configs(vae=False, blocks=(16,))
    return ucfg, tcfg, make_schedule(100)


def _tiny_pixel_model():
    """:func:`_tiny_configs` with random weights."""
    from jaxattrib.diffusion.schedule import make_schedule
    ucfg, tcfg, _, sched, params = tiny_diffusion(vae=False, blocks=(16,),
                                                  sched=make_schedule(100))
    return ucfg, tcfg, sched, params


def _data(n, seed, tokens):
    rng = np.random.default_rng(seed)
    images = np.tanh(rng.normal(size=(n, 8, 8, 3))).astype(np.float32)
    ids = np.zeros((n, 8), np.int32)
    ids[:, :len(tokens)] = tokens
    return {"images": images, "input_ids": ids}


INSTANCE = _data(4, 1, [62, 5, 7, 63])   # "<bos> sks dog <eos>"
PRIOR = _data(4, 2, [62, 7, 63])         # "<bos> dog <eos>"


def test_loss_is_instance_plus_weighted_class_by_hand():
    """Each pair's loss = DSM(instance j; timestep/noise of row j) + λ·DSM(class j; row B+j),
    with the DSM written out from the logged timesteps and the regenerated noise."""
    from jaxattrib.diffusion.schedule import add_noise
    from jaxattrib.models.clip_text import encode_text
    from jaxattrib.models.unet import UNet2DConditionModel
    ucfg, tcfg, sched, params = _tiny_pixel_model()
    _, get = db.pair_dataset(INSTANCE, PRIOR)
    batch = get(np.arange(4))
    key = jax.random.PRNGKey(3)
    lam = 0.7
    loss_fn = db.make_dreambooth_loss(ucfg, tcfg, sched, prior_loss_weight=lam)
    got = np.asarray(jax.jit(loss_fn)(params, batch, key))
    t = np.asarray(loss_fn.describe_step(key, 4)["timesteps"])
    assert t.shape == (8,)
    noise = np.asarray(example_noise(key, 8, (8, 8, 3)))
    x0 = np.concatenate([batch["images"], batch["class_images"]])
    ids = np.concatenate([batch["input_ids"], batch["class_input_ids"]])
    x_t = add_noise(sched, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    ctx = jax.jit(encode_text, static_argnums=1)(params["text_encoder"], tcfg, ids)
    eps = np.asarray(jax.jit(UNet2DConditionModel(ucfg).apply)({"params": params["unet"]},
                                                               x_t, t, ctx))
    per_row = ((eps - noise) ** 2).mean(axis=(1, 2, 3))
    want = per_row[:4] + lam * per_row[4:]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    # the trainer's objective (batch mean) is mean_instance + λ·mean_class, the paper's sum
    np.testing.assert_allclose(got.mean(), per_row[:4].mean() + lam * per_row[4:].mean(),
                               rtol=1e-5)
    assert np.all(lam * per_row[4:] > 1e-3)   # the class term is not negligible here


def test_zero_prior_weight_is_plain_finetuning():
    """λ_prior = 0: the loss and its gradient equal plain fine-tuning's on the instance batch
    (so every update is plain fine-tuning's update)."""
    ucfg, tcfg, sched, params = _tiny_pixel_model()
    plain = make_diffusion_loss(ucfg, tcfg, sched)
    dbl = db.make_dreambooth_loss(ucfg, tcfg, sched, prior_loss_weight=0.0)
    _, get = db.pair_dataset(INSTANCE, PRIOR)
    key = jax.random.PRNGKey(4)
    a, ga = jax.jit(jax.value_and_grad(lambda p: jnp.mean(plain(p, INSTANCE, key))))(params)
    b, gb = jax.jit(jax.value_and_grad(lambda p: jnp.mean(dbl(p, get(np.arange(4)), key))))(
        params)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-7)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(ga["unet"])) > 0


def test_score_concept_on_renders_and_blank_images():
    """Clean renders of the concept score 1; a blank image scores 0 even for 'red' (the
    classifier's label 0) and counts as empty; another concept's renders score 0 jointly."""
    from jaxattrib.train.base_model import HELD_OUT, data_spec
    from jaxattrib.data.synthetic import make_withheld
    spec = data_spec()
    ds = make_withheld(spec, 1000, HELD_OUT)
    red_square = {"color": "red", "shape": "square"}
    mine = np.array([c == "red" and s == "square" for c, s in
                     zip(ds.label_strings("color"), ds.label_strings("shape"))])
    assert db.score_concept(ds.images[mine][:6], red_square, spec) == {
        "color": 1.0, "shape": 1.0, "both": 1.0, "empty": 0.0}
    blank = np.full((2, 16, 16, 3), -0.88, np.float32)          # the 'black' background
    assert db.score_concept(blank, red_square, spec) == {
        "color": 0.0, "shape": 0.0, "both": 0.0, "empty": 1.0}
    assert db.score_concept(ds.images[~mine][:6], red_square, spec)["both"] == 0.0


def test_run_config_errors_name_the_field(tmp_path):
    from PIL import Image

    from jaxattrib.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=r"dreambooth.concept='blue circle'.*yellow cross"):
        dreambooth_run(load_config("dreambooth", ["dreambooth.concept='blue circle'"]),
                          tmp_path / "a", progress=False)
    (tmp_path / "data" / "ball").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((32, 32, 3), 60 * i, np.uint8)).save(
            tmp_path / "data" / "ball" / f"{i}.png")
    folder = ["dreambooth.source='folder'", f"dreambooth.path='{tmp_path / 'data'}'",
              "dreambooth.subject='ball'", "dreambooth.class_noun='ball'"]
    with pytest.raises(ConfigError, match=r"dreambooth.instance_prompt=.*for a folder"):
        dreambooth_run(load_config("dreambooth", folder), tmp_path / "b", progress=False)
    with pytest.raises(ConfigError, match=r"dreambooth.identifier: .*'zqv'"):
        dreambooth_run(load_config("dreambooth", folder + [
            "dreambooth.identifier='zqv'", "dreambooth.instance_prompt='a {identifier} ball'",
            "dreambooth.class_prompt='a {class_noun}'"]), tmp_path / "c", progress=False)


@pytest.mark.slow
def test_zero_prior_weight_run_equals_plain_run(tmp_path):
    """With as many class as instance images, pair j holds instance j, so a λ_prior = 0 run
    sees plain fine-tuning's batches, timesteps and noise and ends at its parameters."""
    ucfg, tcfg, sched, params = _tiny_pixel_model()
    plain = make_diffusion_loss(ucfg, tcfg, sched)
    dbl = db.make_dreambooth_loss(ucfg, tcfg, sched, prior_loss_weight=0.0)
    size, get = db.pair_dataset(INSTANCE, PRIOR)
    cfg = TrainConfig(steps=6, batch_size=2, learning_rate=1e-3, checkpoint_every=0, seed=1)
    mesh = parallel.make_mesh(1)
    p_plain, r1 = finetune(plain, params, 4, lambda i: {k: v[i] for k, v in INSTANCE.items()},
                           cfg, tmp_path / "plain", mesh=mesh, progress=False)
    p_db, r2 = finetune(dbl, params, size, get, cfg, tmp_path / "db", mesh=mesh,
                        progress=False)
    np.testing.assert_array_equal(r1.step_info(5)["timesteps"], r2.step_info(5)["timesteps"][:2])
    r1.close(), r2.close()
    # same updates up to float reassociation (the 2B-row program reduces in another order;
    # Adam's normalisation can magnify that on near-zero gradients)
    for x, y in zip(jax.tree.leaves(p_plain["unet"]), jax.tree.leaves(p_db["unet"])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=2e-5)
    moved = max(float(jnp.abs(x - y).max()) for x, y in
                zip(jax.tree.leaves(p_db["unet"]), jax.tree.leaves(params["unet"])))
    assert moved > 1e-4


def test_pair_dataset_pairs_like_diffusers():
    inst = {"images": np.arange(3)[:, None], "input_ids": np.arange(3)[:, None] + 10}
    prior = {"images": np.arange(5)[:, None] + 100, "input_ids": np.arange(5)[:, None] + 200}
    size, get = db.pair_dataset(inst, prior)
    assert size == 5
    b = get(np.array([0, 3, 4]))
    np.testing.assert_array_equal(b["images"][:, 0], [0, 0, 1])
    np.testing.assert_array_equal(b["class_images"][:, 0], [100, 103, 104])
    np.testing.assert_array_equal(b["class_input_ids"][:, 0], [200, 203, 204])
    with pytest.raises(ValueError, match="keys"):
        db.pair_dataset(inst, {"images": prior["images"]})
    with pytest.raises(KeyError, match="class_input_ids"):    # checked before any compute
        db.make_dreambooth_loss(*_tiny_configs())(None, {**INSTANCE,
                                                            "class_images": PRIOR["images"]},
                                                   jax.random.PRNGKey(0))


def test_identifier_is_one_reserved_token_of_the_shipped_tokenizer():
    from jaxattrib.data.synthetic import make_synthetic
    from jaxattrib.models.tokenizer import CLIPTokenizer
    from jaxattrib.train.base_model import ASSET_DIR, base_model_info, spec_from_info
    tok = CLIPTokenizer.from_folder(ASSET_DIR / "tokenizer")
    spec = spec_from_info(base_model_info(), per_combination=1)
    captions = make_synthetic(spec, seed=0).captions          # the pretraining captions
    i = db.check_identifier(tok, db.IDENTIFIER, captions)
    assert tok.vocab[db.IDENTIFIER + "</w>"] == i
    with pytest.raises(ValueError, match="splits it"):
        db.check_identifier(tok, "zqv", captions)           # not in the vocabulary: bytes
    with pytest.raises(ValueError, match="already occurs"):
        db.check_identifier(tok, "star", captions)


@pytest.mark.slow
@pytest.mark.parametrize("concept", ["yellow cross", "green triangle"])
def test_dreambooth_teaches_the_base_model_a_held_out_concept(tmp_path, concept):
    """Acceptance (issue 3): DreamBooth on 4 renders of a concept the shipped base model never
    saw makes "a sks <shape> on a <bg> background" generate that concept — color AND shape by
    classify_concepts — far more often than the base model prompted the same way (same
    prompts, same noise). Runs the packaged `dreambooth` config (`jaxattrib train dreambooth`).
    On the 16-px pixel default (2026-11-25): about 2 CPU-minutes per concept, both 0.46 / 0.42
    vs 0.00 for the base model (BENCHMARKS.md); shape alone is not asserted: that base model
    already drew purple triangles for "a sks triangle" (shape 0.50), the fine-tuned one green
    ones (0.42). On the 32-px latent default it passes too: 356 s + 190 s wall (the first
    compiles), 2026-12-07, 2-core shared CPU, load 3-9, `nice -n 19 python -m pytest -q -p
    no:xdist -m slow tests/test_dreambooth.py -k teaches`."""
    from jaxattrib.config import load_config
    cfg = load_config("dreambooth", [f"dreambooth.concept={concept!r}",
                                     "finetune.checkpoint_every=0"])
    m = dreambooth_run(cfg, tmp_path / "run", progress=False)
    assert m["finetuned_both_accuracy"] >= m["base_both_accuracy"] + 0.25, m
    assert m["finetuned_color_accuracy"] >= m["base_color_accuracy"] + 0.25, m
    written = json.loads((tmp_path / "run" / "results" / "dreambooth.json").read_text())
    assert written["metrics"] == m


def test_dreambooth_on_a_latent_pipeline_trains_on_the_posterior_mean(tmp_path,
                                                                       tiny_latent_pipeline):
    """DreamBooth on a VAE pipeline follows the latent rule of `jaxattrib train` (the
    posterior mean that attribution encodes with, recorded in the manifest with the VAE's
    fingerprint), so its record is attributed on what it was trained on."""
    from PIL import Image

    from jaxattrib.config import load_config
    from jaxattrib.diffusion.latents import vae_fingerprint
    from jaxattrib.models.pipeline import load_pipeline
    (tmp_path / "data" / "dog").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(
            tmp_path / "data" / "dog" / f"{i}.png")
    sets = [f"model='{tiny_latent_pipeline}'", "dreambooth.source='folder'",
            f"dreambooth.path='{tmp_path / 'data'}'", "dreambooth.subject='dog'",
            "dreambooth.class_noun='dog'", "dreambooth.instance_prompt='a {identifier} dog'",
            "dreambooth.class_prompt='a {class_noun}'", "dreambooth.num_instance=2",
            "dreambooth.num_class_images=2", "dreambooth.class_inference_steps=2",
            "finetune.steps=1", "finetune.batch_size=2", "finetune.checkpoint_every=1",
            "evaluate.enabled=False"]
    dreambooth_run(load_config("dreambooth", sets), tmp_path / "run", progress=False)
    manifest = json.loads((tmp_path / "run" / "record" / "manifest.json").read_text())
    pipe = load_pipeline(tiny_latent_pipeline)
    assert manifest["model"]["vae_latents"] == "mean"
    assert manifest["model"]["vae_fingerprint"] == vae_fingerprint(pipe.vae_config,
                                                                   pipe.vae_params)
