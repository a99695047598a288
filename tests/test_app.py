"""The application layer: configs, generation, diffusion TRAK glue, CLI, demo helpers."""

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattrib import base_model as bm
from jaxattrib.attribution import diffusion_trak as dt
from jaxattrib.config import ConfigError, apply_overrides, load_config
from jaxattrib.diffusion.schedule import schedule_from_diffusers_config
from jaxattrib.models import clip_text, unet
from jaxattrib.models.tokenizer import build_word_tokenizer


# ----------------------------------------------------------------------------- fixtures

def _tiny_configs(vocab_size):
    text = clip_text.CLIPTextConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    max_position_embeddings=8, pad_token_id=None,
                                    bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                                    projection_dim=16)
    u = unet.tiny_config(block_out_channels=(8, 16), cross_attention_dim=16, norm_num_groups=4,
                         sample_size=8, in_channels=3, out_channels=3, attention_head_dim=2)
    return u, text


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory):
    """A tiny random pixel-space pipeline saved in diffusers layout by our own writer."""
    root = tmp_path_factory.mktemp("pipe")
    tok = build_word_tokenizer(["a", "red", "blue", "circle", "square"], root / "tok",
                               model_max_length=8)
    from jaxattrib.models.tokenizer import CLIPTokenizer
    vocab = CLIPTokenizer.from_folder(tok).vocab_size
    u, t = _tiny_configs(vocab)
    key = jax.random.PRNGKey(0)
    up = unet.init_params(u, key)
    # random, non-zero output layer so generations depend on the prompt
    up = jax.tree_util.tree_map(lambda a: a + 0.05 * jax.random.normal(key, a.shape), up)
    tp = clip_text.init_params(t, jax.random.fold_in(key, 1))
    return bm.save_pipeline(root / "pipe", u, up, t, tp, tok, bm.SCHEDULER_CONFIG,
                            {"note": "test"})


# ----------------------------------------------------------------------------- config

def test_config_overrides_typed_and_checked():
    c = load_config("demo", ["finetune.steps=7", "attribution.methods=['dtrak']",
                             "finetune.learning_rate=1"])
    assert c.finetune.steps == 7 and c.attribution.methods == ("dtrak",)
    assert isinstance(c.finetune.learning_rate, float)
    with pytest.raises(ConfigError, match="no field 'finetune.stepz'"):
        apply_overrides(c, ["finetune.stepz=3"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides(c, ["finetune.steps"])
    with pytest.raises(ConfigError, match="finetune.steps"):
        apply_overrides(c, ["finetune.steps='many'"])
    with pytest.raises(ConfigError, match="not one of the packaged configs"):
        load_config("no_such_config")


# ----------------------------------------------------------------------------- checkpoints

def test_clip_text_save_pretrained_loads_in_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    _, cfg = _tiny_configs(60)
    p = clip_text.init_params(cfg, jax.random.PRNGKey(3))
    clip_text.save_pretrained(tmp_path, cfg, p)
    _, p2 = clip_text.from_pretrained(tmp_path)
    for a, b in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(p2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ref = transformers.CLIPTextModel.from_pretrained(tmp_path).eval()
    ids = np.random.RandomState(0).randint(0, 58, (2, 8))
    ids[:, -1] = cfg.eos_token_id
    with torch.no_grad():
        want = ref(torch.tensor(ids)).last_hidden_state.numpy()
    got = np.asarray(clip_text.CLIPTextModel(cfg).apply({"params": p}, ids).last_hidden_state)
    assert np.abs(want - got).max() < 1e-4


def test_saved_pipeline_loads_and_refuses_tampering(tiny_pipeline_dir, tmp_path):
    import shutil
    from jaxattrib.models.convert import CheckpointError
    from jaxattrib.models.pipeline import load_pipeline
    pipe = load_pipeline(tiny_pipeline_dir)
    assert not pipe.is_latent and pipe.unet_config.sample_size == 8
    bad = tmp_path / "bad"
    shutil.copytree(tiny_pipeline_dir, bad)
    (bad / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors")
    with pytest.raises(CheckpointError, match="unet"):
        load_pipeline(bad)


def test_record_accepts_relative_path(tmp_path, monkeypatch):
    from jaxattrib.train.record import TrajectoryRecord
    monkeypatch.chdir(tmp_path)
    rec = TrajectoryRecord.create("rel/record", {"config": {"a": 1}})
    rec.save(0, {"params": {"w": np.ones(3, np.float32)}}, base={"w": np.ones(3, np.float32)})
    rec.wait()
    rec.close()
    assert TrajectoryRecord.open(Path("rel/record")).steps() == [0]


# ----------------------------------------------------------------------------- generation

def test_generate_is_batch_invariant_and_prompt_dependent(tiny_pipeline_dir):
    from jaxattrib.generate import generate
    from jaxattrib.models.pipeline import load_pipeline
    pipe = load_pipeline(tiny_pipeline_dir)
    prompts = ["a red circle", "a blue square", "a red circle"]
    key = jax.random.PRNGKey(5)
    g1 = generate(pipe, prompts, key, num_inference_steps=4, batch_size=3,
                  return_trajectory=True)
    g2 = generate(pipe, prompts, key, num_inference_steps=4, batch_size=1)
    a, b = np.asarray(g1.images), np.asarray(g2.images)
    # same per-image keys; only float32 summation order differs with the batch size
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    assert g1.images.shape == (3, 8, 8, 3)
    assert g1.trajectory.xs.shape == (3, 4, 8, 8, 3)
    assert g1.trajectory.x0_preds.shape == (3, 4, 8, 8, 3)
    # image i uses fold_in(key, i): the same prompt at another index gives another image
    assert np.abs(np.asarray(g1.images[0] - g1.images[2])).max() > 1e-3


# ----------------------------------------------------------------------------- diffusion TRAK

@pytest.mark.parametrize("method", ["dtrak", "trak", "journey-trak"])
def test_unet_features_equal_explicit_projection_float64(method):
    """Engine features == Pᵀ g with P materialized and g from a per-example jax.grad loop."""
    from jaxattrib.attribution.grads import (make_feature_fn, merge_params, projected_grads,
                                             select_params)
    with jax.enable_x64(True):
        u, _ = _tiny_configs(40)
        params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64),
                                        unet.init_params(u, jax.random.PRNGKey(0)))
        sched = schedule_from_diffusers_config(bm.SCHEDULER_CONFIG, dtype=jnp.float64)
        cfg = dt.AttributionConfig(method=method, k=64, num_timesteps=3, params="attn2",
                                   projection="gaussian", microbatch=2)
        out_fn = dt.make_train_out_fn(u, sched, cfg)
        rng = np.random.RandomState(0)
        ex = {"x0": rng.uniform(-1, 1, (3, 8, 8, 3)), "ctx": rng.normal(size=(3, 4, 16))}
        proj = dt._projector(params, cfg)
        got = np.asarray(projected_grads(make_feature_fn(out_fn, params, proj, spec="attn2"),
                                         ex, jax.random.PRNGKey(1), microbatch=2))
        P = np.asarray(proj.materialize())
        split = select_params(params, "attn2")
        want = []
        for i in range(3):
            e = {k: v[i] for k, v in ex.items()}
            k_i = jax.random.fold_in(jax.random.PRNGKey(1), i)
            g = jax.grad(lambda tr: out_fn(merge_params(tr, split.frozen), e, k_i))(
                split.trainable)
            flat = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(g)])
            want.append(flat @ P)
        want = np.stack(want)
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_journey_targets_and_out_fn_shapes():
    u, _ = _tiny_configs(40)
    sched = schedule_from_diffusers_config(bm.SCHEDULER_CONFIG)
    from jaxattrib.diffusion.sampling import Trajectory
    traj = Trajectory(timesteps=jnp.array([[900, 500, 100]] * 2),
                      xs=jnp.zeros((2, 3, 8, 8, 3)), x0_preds=jnp.ones((2, 3, 8, 8, 3)))
    tg = dt.journey_targets(traj, np.zeros((2, 4, 16)), 1)
    assert tg["x0"].shape == (2, 8, 8, 3) and list(tg["t"]) == [500, 500]
    cfg = dt.AttributionConfig(method="journey-trak", journey_resamples=3)
    f = dt.make_journey_target_out_fn(u, sched, cfg)
    params = unet.init_params(u, jax.random.PRNGKey(0))
    v = f(params, {k: v[0] for k, v in tg.items()}, jax.random.PRNGKey(2))
    assert v.shape == () and np.isfinite(float(v)) and float(v) > 0


def test_lambda_grid_is_relative_to_feature_scale():
    Phi = np.random.RandomState(0).normal(size=(50, 8)) * 3.0
    lams = dt.relative_lambdas(Phi, [1.0, 10.0])
    assert lams[1] == pytest.approx(10 * lams[0])
    assert lams[0] == pytest.approx(np.mean(np.sum(Phi ** 2, 0)))


# ----------------------------------------------------------------------------- CLI

def test_cli_info_generate_and_errors(tiny_pipeline_dir, tmp_path):
    from typer.testing import CliRunner
    from jaxattrib.cli import app
    r = CliRunner().invoke(app, ["info", str(tiny_pipeline_dir)])
    assert r.exit_code == 0, r.output
    assert "unet:" in r.output and "pixel space" in r.output
    r = CliRunner().invoke(app, ["generate", "--model", str(tiny_pipeline_dir), "-p", "a red circle",
                                 "--num", "2", "--steps", "3", "--out", str(tmp_path / "g"),
                                 "--trajectory"])
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "g").glob("*.png"))) == 2
    assert np.load(tmp_path / "g" / "trajectory.npz")["xs"].shape[:2] == (2, 3)
    r = CliRunner().invoke(app, ["info", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "not a directory" in r.output


def test_demo_refuses_run_dir_with_other_config(tmp_path):
    from jaxattrib.demo import _check_config
    c = load_config("demo")
    _check_config(tmp_path, c)
    _check_config(tmp_path, c)  # same config: fine
    with pytest.raises(ConfigError, match="finetune"):
        _check_config(tmp_path, apply_overrides(c, ["finetune.steps=1"]))


def test_cli_train_then_attribute_resumable(tiny_pipeline_dir, tmp_path):
    """`jaxattrib train` writes a record; rerun resumes (no new steps); `attribute` scores."""
    from typer.testing import CliRunner
    from jaxattrib.cli import app
    run = tmp_path / "run"
    args = ["train", "finetune_folder", "--run-dir", str(run), "--no-progress",
            "--set", f"model='{tiny_pipeline_dir}'", "--set", "data.source=digits",
            "--set", "data.size=8", "--set", "data.max_examples=8",
            "--set", "finetune.steps=2", "--set", "finetune.batch_size=4",
            "--set", "finetune.checkpoint_every=1"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "checkpoints [0, 1, 2]" in r.output
    log = (run / "record" / "steps.jsonl").read_text()
    r = CliRunner().invoke(app, args)            # resumes: nothing left to do
    assert r.exit_code == 0 and (run / "record" / "steps.jsonl").read_text() == log
    bad = CliRunner().invoke(app, args[:-2] + ["--set", "finetune.checkpoint_every=2"])
    assert bad.exit_code == 2 and "another config" in bad.output
    q = tmp_path / "q"
    r = CliRunner().invoke(app, ["generate", "--model", str(tiny_pipeline_dir), "-p", "a red",
                                 "-p", "a blue", "--steps", "2", "--out", str(q)])
    assert r.exit_code == 0, r.output
    for method in ("dtrak", "tracin"):
        r = CliRunner().invoke(app, ["attribute", str(run), "--queries", str(q), "--method",
                                     method, "--k", "16", "--timesteps", "2", "--no-progress"])
        assert r.exit_code == 0, r.output
        s = np.load(run / "scores" / f"{method}_q.npy")
        assert s.shape == (2, 8) and np.isfinite(s).all()
    r = CliRunner().invoke(app, ["attribute", str(run), "--queries", str(tmp_path / "none")])
    assert r.exit_code == 2 and "no PNG query images" in r.output
