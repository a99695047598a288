"""The application layer: configs, generation, CLI, demo helpers."""

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxattrib.train import base_model as bm
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


def test_record_names_embedded_base_model_independently_of_the_checkout(tmp_path):
    """A demo/benchmark run directory must resume after the checkout (or the run) moves: the
    embedded base model is recorded as 'embedded', not by its absolute path; records written
    with another checkout's asset path keep resuming; a user's folder stays a path."""
    from jaxattrib.runs.demo import base_model_ref
    from jaxattrib.train.record import TrajectoryRecord
    rec_dir = tmp_path / "record"
    assert base_model_ref(str(bm.ASSET_DIR), rec_dir) == "embedded"
    assert base_model_ref(str(tmp_path / "mine"), rec_dir) == str(tmp_path / "mine")
    old = "/elsewhere/checkout/jaxattrib/assets/base_model"
    TrajectoryRecord.create(rec_dir, {"model": {"base_model": old}})
    ref = base_model_ref(str(bm.ASSET_DIR), rec_dir)
    assert ref == old
    TrajectoryRecord.create(rec_dir, {"model": {"base_model": ref}})   # reopens, no mismatch
    # a record of a user's model is not silently taken for the embedded one
    other = tmp_path / "other"
    TrajectoryRecord.create(other, {"model": {"base_model": "/data/my_model"}})
    assert base_model_ref(str(bm.ASSET_DIR), other) == "embedded"


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


def test_generate_compiles_once_for_many_unet_params(tiny_pipeline_dir, monkeypatch):
    """UNet params are a jit argument: a second model of the same architecture (a zoo member)
    reuses the compiled sampler, and its images are those of a fresh trace with its params."""
    from jaxattrib import generate as G
    from jaxattrib.models.pipeline import load_pipeline
    pipe = load_pipeline(tiny_pipeline_dir)
    traces = []
    real_sample = G.sampling.sample

    def counting_sample(*args, **kwargs):
        traces.append(1)  # runs once per trace, never when a compiled function is called
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(G.sampling, "sample", counting_sample)
    G._batched_sampler.cache_clear()
    prompts, key = ["a red circle", "a blue square"], jax.random.PRNGKey(2)
    other = jax.tree_util.tree_map(lambda a: a * 1.5, pipe.unet_params)
    a = G.generate(pipe, prompts, key, num_inference_steps=3).images
    n = len(traces)
    b = G.generate(pipe, prompts, key, num_inference_steps=3, unet_params=other).images
    assert n == 1 and len(traces) == n          # no retrace for other params
    assert np.abs(np.asarray(a - b)).max() > 1e-3
    G._batched_sampler.cache_clear()            # a fresh trace computes the same images
    b2 = G.generate(pipe, prompts, key, num_inference_steps=3, unet_params=other).images
    assert len(traces) == n + 1
    np.testing.assert_allclose(np.asarray(b2), np.asarray(b), rtol=1e-6, atol=1e-6)
    G._batched_sampler.cache_clear()


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
    from jaxattrib.runs.rundir import check_run_config
    c = load_config("demo")
    check_run_config(tmp_path, c)
    check_run_config(tmp_path, c)  # same config: fine
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.npz").write_bytes(b"x")  # something computed
    with pytest.raises(ConfigError, match="finetune"):
        check_run_config(tmp_path, apply_overrides(c, ["finetune.steps=1"]))


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
    # a checkpoint ensemble scores the mean of its checkpoints' scores (issue 19)
    dtrak = ["attribute", str(run), "--queries", str(q), "--method", "dtrak", "--k", "16",
             "--timesteps", "2", "--no-progress"]
    single = []
    for steps in ("1,", "2,"):
        r = CliRunner().invoke(app, dtrak + ["--checkpoints", steps])
        assert r.exit_code == 0, r.output
        single.append(np.load(run / "scores" / "dtrak_q.npy"))
    r = CliRunner().invoke(app, dtrak + ["--checkpoints", "2"])   # the last 2: steps 1, 2
    assert r.exit_code == 0, r.output
    np.testing.assert_allclose(np.load(run / "scores" / "dtrak_q.npy"), np.mean(single, 0),
                               rtol=1e-5, atol=1e-6 * np.abs(single).max())
    assert not np.allclose(single[0], single[1])
    r = CliRunner().invoke(app, dtrak + ["--checkpoints", "2,5"])
    assert r.exit_code == 2 and "no checkpoint at step(s) [5]" in r.output
    r = CliRunner().invoke(app, dtrak + ["--checkpoints", "last"])
    assert r.exit_code == 2 and "--checkpoints='last'" in r.output
    # the stores were made with the default noise (per_position): another mode is refused
    r = CliRunner().invoke(app, dtrak + ["--noise", "shared"])
    assert r.exit_code == 2 and "noise='per_position'" in r.output, r.output
    r = CliRunner().invoke(app, dtrak + ["--noise", "fresh"])     # not a choice: click refuses
    assert r.exit_code == 2 and "Invalid value for '--noise'" in r.output, r.output
    r = CliRunner().invoke(app, ["attribute", str(run), "--queries", str(tmp_path / "none")])
    assert r.exit_code == 2 and "no PNG query images" in r.output
    # the run's report shows images and scores: the training section (loss per checkpoint from
    # logs/train.log, training images) and the attribution sections (top-k grids with scores)
    r = CliRunner().invoke(app, ["report", str(run)])
    assert r.exit_code == 0, r.output
    html = (run / "report.html").read_text()
    import re
    logged = re.findall(r"checkpoint (\d+) saved \(loss ([^,]+),", (run / "logs" / "train.log")
                        .read_text())
    assert {int(s) for s, _ in logged} == {1, 2}
    assert "Training run" in html and f"{float(logged[-1][1]):.4g}" in html
    for pic in ("train_loss.png", "train_images.png", "attribute_dtrak_q_topk.png",
                "attribute_tracin_q_topk.png"):
        assert (run / "results" / pic).is_file(), pic
    assert html.count("data:image/png;base64,") >= 4
    assert "digits/" in html                                  # training ids and captions


# ----------------------------------------------------------------------------- experiment configs

def _write_pngs(folder, n, seed, size=8):
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    for i in range(n):
        Image.fromarray(rng.randint(0, 256, (size, size, 3), np.uint8)).save(folder / f"{i:02d}.png")
    return folder


def _variant_pipeline(src, dst, *, seed=None, noise=0.05, prediction_type=None):
    """A copy of pipeline folder ``src``: other UNet weights (``src``'s plus N(0, noise²)
    from ``seed``) and/or another scheduler ``prediction_type``; same architecture, text
    encoder and tokenizer."""
    import shutil
    from jaxattrib.models.pipeline import load_pipeline
    if seed is not None:
        pipe = load_pipeline(src)
        rng = np.random.default_rng(seed)
        up = jax.tree_util.tree_map(
            lambda a: np.asarray(a) + noise * rng.standard_normal(np.shape(a), np.float32),
            pipe.unet_params)
        bm.save_pipeline(dst, pipe.unet_config, up, pipe.text_config, pipe.text_params,
                         Path(src) / "tokenizer", pipe.scheduler_config)
    else:
        shutil.copytree(src, dst)
    if prediction_type is not None:
        path = Path(dst) / "scheduler" / "scheduler_config.json"
        sc = json.loads(path.read_text())
        sc["prediction_type"] = prediction_type
        path.write_text(json.dumps(sc))
    return dst


@pytest.mark.parametrize("name", ["sd15_lora", "sd21"])
def test_sd_configs_run_tiny_end_to_end(name, tiny_latent_pipeline, tmp_path):
    """sd15_lora / sd21 with the model path pointed at a tiny *latent* pipeline (VAE + UNet +
    CLIP, written by diffusers; v-prediction for sd21): LoRA fine-tuning into a record, then
    `attribute` takes D-TRAK on attn2 with the config's k from the run config."""
    from typer.testing import CliRunner
    from jaxattrib.cli import app
    from jaxattrib.models.pipeline import load_pipeline
    from jaxattrib.runs.specs import load_unet
    from tiny import make_latent_pipeline
    model = tiny_latent_pipeline if name == "sd15_lora" else make_latent_pipeline(
        tmp_path, prediction_type="v_prediction", name="v_pipe")
    data = tmp_path / "db"
    _write_pngs(data / "dog", 4, 0, size=16)
    (data / "dog" / "prompt.txt").write_text("a red circle")
    run = tmp_path / "run"
    args = ["train", name, "--run-dir", str(run), "--no-progress", "--set", f"model='{model}'",
            "--set", f"data.path='{data}'", "--set", "data.size=16",
            "--set", "finetune.steps=2", "--set", "finetune.batch_size=4",
            "--set", "finetune.checkpoint_every=1", "--set", "attribution.k=16",
            "--set", "attribution.num_timesteps=2", "--set", "attribution.microbatch=2"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "checkpoints [0, 1, 2]" in r.output
    manifest = json.loads((run / "record" / "manifest.json").read_text())
    assert manifest["config"]["mode"] == "lora"
    # RUN@0 is exactly the pipeline's UNet (the record's base); RUN@last moved
    pipe = load_pipeline(model)
    assert pipe.is_latent and manifest["model"]["vae_latents"] == "mean"
    p0, _ = load_unet(f"{run}@0", pipe)
    p2, _ = load_unet(str(run), pipe)
    for a, b in zip(jax.tree_util.tree_leaves(p0), jax.tree_util.tree_leaves(pipe.unet_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
             zip(jax.tree_util.tree_leaves(p2), jax.tree_util.tree_leaves(p0))]
    assert max(moved) > 0
    q = _write_pngs(tmp_path / "q", 2, 5, size=16)
    (q / "prompts.txt").write_text("a red circle\na blue square\n")
    r = CliRunner().invoke(app, ["attribute", str(run), "--queries", str(q), "--no-progress"])
    assert r.exit_code == 0, r.output
    s = np.load(run / "scores" / "dtrak_q.npy")
    assert s.shape == (2, 4) and np.isfinite(s).all()
    meta = json.loads((run / "features" / "dtrak" / "step_2" / "train" / "meta.json").read_text())
    assert meta["meta"]["extra"]["params"] == "attn2"
    assert meta["meta"]["k"] == 16 and meta["meta"]["projection"] == "sjlt"


def test_sd21_refuses_an_epsilon_model(tiny_pipeline_dir, tmp_path):
    from typer.testing import CliRunner
    from jaxattrib.cli import app
    _write_pngs(tmp_path / "db" / "dog", 2, 0)
    r = CliRunner().invoke(app, ["train", "sd21", "--run-dir", str(tmp_path / "run"),
                                 "--set", f"model='{tiny_pipeline_dir}'",
                                 "--set", f"data.path='{tmp_path / 'db'}'", "--set", "data.size=8"])
    assert r.exit_code == 2
    assert "model_prediction_type='v_prediction'" in r.output and "'epsilon'" in r.output
    r = CliRunner().invoke(app, ["train", "sd15_lora", "--run-dir", str(tmp_path / "r2"),
                                 "--set", f"data.path='{tmp_path / 'db'}'"])
    assert r.exit_code == 2 and "model is empty" in r.output


def test_launch_dry_run_with_sd15_lora(tiny_pipeline_dir, tmp_path, capsys):
    from jaxattrib import launch
    _write_pngs(tmp_path / "db" / "dog", 4, 0)
    args = ["sd15_lora", "--set", f"model={tiny_pipeline_dir}", "--set",
            f"data.path={tmp_path / 'db'}", "--set", "data.size=8", "--set",
            "finetune.batch_size=4", "--set", f"out_dir={tmp_path / 'out'}"]
    assert launch.main(["train", *args, "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out.split("config OK\n", 1)[1])
    assert plan["task"] == "pipeline_finetune" and plan["n_examples"] == 4
    assert plan["mode"] == "lora" and plan["record"] == str(tmp_path / "out" / "record")
    assert not (tmp_path / "out").exists()
    assert launch.main(["featurize", *args, "--dry-run"]) == 2
    assert "'featurize' is for task configs" in capsys.readouterr().err
    # attribute: the run's settings when it exists, else the config's; --set on top
    assert launch.main(["attribute", *args, "--set", "attribution.k=32", "--chunk-size", "16",
                        "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out.split("config OK\n", 1)[1])
    assert plan["task"] == "pipeline_attribute" and not plan["run_exists"]
    assert (plan["k"], plan["chunk_size"], plan["params"]) == (32, 16, "attn2")
    assert plan["logs"] == str(tmp_path / "out" / "logs" / "attribute.log")
    assert launch.main(["attribute", *args, "--set", "attribution.k=0", "--dry-run"]) == 2
    assert "attribution.k=0: expected a positive integer" in capsys.readouterr().err
    assert launch.main(["attribute", *args, "--chunk-size", "0", "--dry-run"]) == 2
    assert "--chunk-size=0" in capsys.readouterr().err
    assert launch.main(["attribute", "featurize_digits:tiny", "--dry-run"]) == 2
    assert "'attribute' needs a pipeline fine-tuning config" in capsys.readouterr().err
    (tmp_path / "run" / "record").mkdir(parents=True)   # a run made with k=8, projection gaussian
    (tmp_path / "run" / "config.json").write_text(json.dumps(
        {"attribution": {"k": 8, "projection": "gaussian"}}))
    assert launch.main(["attribute", "sd15_lora", "--set", f"out_dir={tmp_path / 'run'}",
                        "--set", "attribution.projection=sjlt", "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out.split("config OK\n", 1)[1])
    assert plan["run_exists"] and (plan["k"], plan["projection"]) == (8, "sjlt")
    assert launch.main(["train", *args, "--set", "finetune.batch_size=8", "--dry-run"]) == 2
    assert "finetune.batch_size=8 > 4 examples" in capsys.readouterr().err
    assert launch.main(["train", *args, "--set", "model=/nonexistent", "--dry-run"]) == 2
    assert "no model_index.json" in capsys.readouterr().err
    assert launch.main(["train", "dreambooth", "--dry-run"]) == 2     # not silently plain
    assert "DreamBooth configs" in capsys.readouterr().err


def test_cli_cgi_dm_end_to_end_resumes(tiny_pipeline_dir, tmp_path):
    """`jaxattrib cgi-dm`: pretrained = the tiny pipeline, fine-tuned = another pipeline
    folder; labelled candidates give a ROC; per-batch caching equals one recover() call and a
    rerun recomputes nothing."""
    from typer.testing import CliRunner
    from jaxattrib.authentication import cgi_dm
    from jaxattrib.cli import app
    ft = _variant_pipeline(tiny_pipeline_dir, tmp_path / "ft", seed=7)
    cand = tmp_path / "cand"
    _write_pngs(cand / "member", 3, 1)
    _write_pngs(cand / "non_member", 2, 2)
    _write_pngs(tmp_path / "ref", 3, 3)
    run = tmp_path / "run"
    args = ["cgi-dm", "cgi_dm", "--run-dir", str(run), "--no-progress",
            "--set", f"model.pipeline='{tiny_pipeline_dir}'", "--set", f"model.finetuned='{ft}'",
            "--set", f"data.candidates='{cand}'", "--set", f"data.reference='{tmp_path / 'ref'}'",
            "--set", "data.caption='a red circle'", "--set", "cgi.num_steps=3",
            "--set", "batch_size=2", "--set", "calibration.fpr=0.34"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert (run / "report.html").is_file() and "AUC=" in r.output
    doc = json.loads((run / "results" / "cgi_dm.json").read_text())
    rows = doc["tables"][0]["rows"]
    assert [x["label"] for x in rows] == ["member"] * 3 + ["non_member"] * 2
    sc = np.load(run / "cgi_dm" / "scores.npz")
    assert ((sc["p_values"] > 0) & (sc["p_values"] <= 1)).all()
    np.testing.assert_array_equal(sc["decisions"], sc["scores"] >= sc["threshold"])
    assert {i["path"] for i in doc["images"]} == {"results/cgi_dm_roc.png",
                                                  "results/cgi_dm_images.png"}
    # batches cached with index offsets == one recover() over the whole set
    from jax.tree_util import Partial
    from jaxattrib.models.pipeline import load_pipeline
    from jaxattrib.models.unet import UNet2DConditionModel
    from jaxattrib.runs.specs import image_folder
    pipe, pft = load_pipeline(tiny_pipeline_dir), load_pipeline(ft)
    m = UNet2DConditionModel(pipe.unet_config)
    ap = lambda p, z, t, c: m.apply({"params": p}, z, t, c)  # noqa: E731
    imgs = image_folder(cand, 8, "c", labelled=True)["images"]
    ctx = np.asarray(pipe.encode_prompts(["a red circle"] * len(imgs)))
    whole = cgi_dm.recover(imgs, Partial(ap, pipe.unet_params), Partial(ap, pft.unet_params),
                           schedule_from_diffusers_config(pipe.scheduler_config),
                           cgi_dm.CGIDMConfig(num_steps=3), jax.random.split(
                               jax.random.PRNGKey(0), 3)[0], cond=ctx, batch_size=2)
    cached = np.concatenate([np.load(run / "cgi_dm" / f"candidates_{lo:06d}.npz")["recovered"]
                             for lo in (0, 2, 4)])
    np.testing.assert_allclose(cached, whole["recovered"], atol=1e-5)
    stamps = {p.name: p.stat().st_mtime_ns for p in (run / "cgi_dm").glob("*_0*.npz")}
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (run / "cgi_dm").glob("*_0*.npz")}
    np.testing.assert_array_equal(np.load(run / "cgi_dm" / "scores.npz")["scores"], sc["scores"])
    bad = CliRunner().invoke(app, args + ["--set", "cgi.mask_kind='stripes'"])
    assert bad.exit_code == 2 and "cgi.mask_kind='stripes'" in bad.output
    other_run = [str(tmp_path / "run2") if a == str(run) else a for a in args]
    bad = CliRunner().invoke(app, other_run + ["--set", "model.finetuned='/nonexistent'"])
    assert bad.exit_code == 2 and "model.finetuned='/nonexistent'" in bad.output


def test_cli_cgi_dm_projection_settings_reach_pgd(tiny_pipeline_dir, tmp_path, monkeypatch):
    """`jaxattrib cgi-dm --set cgi.project_*=...` reaches the PGD call's settings (off by
    default); a bad value exits 2 naming the field before PGD; a run directory made before the
    fields existed (its config.json lacks them: no projection) still resumes, and asking such a
    directory for a projection is refused."""
    from typer.testing import CliRunner
    from jaxattrib.authentication import cgi_dm
    from jaxattrib.cli import app

    class Reached(Exception):
        pass

    seen = []

    def spy(eps_pre, eps_ft, sched, z0, mask, cond, config, key, **kw):
        seen.append((config.project_t, config.project_model, config.project_every))
        raise Reached

    monkeypatch.setattr(cgi_dm, "pgd_invert", spy)
    _write_pngs(tmp_path / "cand", 2, 1)
    _write_pngs(tmp_path / "ref", 2, 3)
    sets = [f"model.pipeline='{tiny_pipeline_dir}'", f"model.finetuned='{tiny_pipeline_dir}'",
            f"data.candidates='{tmp_path / 'cand'}'", f"data.reference='{tmp_path / 'ref'}'",
            "data.caption='a red circle'"]

    def run(name, *more):
        args = ["cgi-dm", "cgi_dm", "--run-dir", str(tmp_path / name), "--no-progress"]
        return CliRunner().invoke(app, args + [a for s in sets + list(more)
                                               for a in ("--set", s)])

    r = run("default")
    assert r.exit_code == 1 and "unexpected Reached" in r.output, r.output  # the CLI's safety net
    assert seen == [(0, "finetuned", 1)]
    r = run("projected", "cgi.project_t=100", "cgi.project_model=pretrained",
            "cgi.project_every=5")
    assert r.exit_code == 1 and "unexpected Reached" in r.output, r.output  # the CLI's safety net
    assert seen[-1] == (100, "pretrained", 5)
    stored = json.loads((tmp_path / "projected" / "config.json").read_text())["cgi"]
    assert (stored["project_t"], stored["project_model"], stored["project_every"]) == \
        (100, "pretrained", 5)
    for bad, msg in (("cgi.project_every=0", "cgi.project_every=0; expected an integer >= 1"),
                     ("cgi.project_every=-1", "cgi.project_every=-1"),
                     ("cgi.project_t=-5", "cgi.project_t=-5"),
                     ("cgi.project_model=vae", "cgi.project_model='vae'; expected one of")):
        r = run("bad", bad)
        assert r.exit_code == 2 and msg in r.output, r.output
    assert len(seen) == 2
    # a run directory from before the fields: its config.json has no cgi.project_*
    old = json.loads(load_config("cgi_dm", sets).to_json())
    for f in ("project_t", "project_model", "project_every"):
        del old["cgi"][f]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(old, indent=2, sort_keys=True))
    r = run("old")
    assert r.exit_code == 1 and "unexpected Reached" in r.output, r.output  # the CLI's safety net
    assert seen[-1] == (0, "finetuned", 1)
    r = run("old", "cgi.project_t=100")
    assert r.exit_code == 2 and "another config (fields ['cgi'] differ)" in r.output, r.output
    assert len(seen) == 3


def test_source_model_run_glue_with_a_stand_in_generator(tiny_pipeline_dir, tmp_path,
                                                          monkeypatch):
    """The run's glue (model specs, random key samples, same-seed queries, innocent calibration,
    caching, report) with a stand-in generator whose images are a pure function of (weights,
    prompt, seed): identical weights give identical images, others unrelated ones."""
    import zlib
    from jaxattrib.authentication import source_model as sm
    from jaxattrib.config import apply_overrides, load_config
    from jaxattrib.runs.source_model import run_source_model
    calls = []

    def stand_in(pipe, params, **kw):
        w = np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(params)])

        def gen(prompts, key):
            calls.append(len(prompts))
            out = []
            for p in prompts:
                seed = zlib.crc32(w.tobytes() + p.encode() + np.asarray(key).tobytes())
                out.append(np.random.default_rng(seed).uniform(-1, 1, (8, 8, 3)))
            return np.asarray(out, np.float32)
        return gen
    monkeypatch.setattr(sm, "pipeline_generate_fn", stand_in)
    others = [_variant_pipeline(tiny_pipeline_dir, tmp_path / f"m{i}", seed=i) for i in range(3)]
    cfg = load_config("source_model", [
        f"model.pipeline='{tiny_pipeline_dir}'", f"model.suspects=('{others[0]}', 'pipeline')",
        f"model.innocent=('{others[1]}', '{others[2]}')", "key_samples.strategy='random'",
        "key_samples.prompts=('a red circle', 'a blue square', 'a red square', 'a blue circle')",
        "key_samples.n=3", "query.seeds=(0, 1)", "report_keys=2"])
    res = run_source_model(cfg, tmp_path / "run", progress=False)
    stranger, copy = res["models"][:2]
    assert copy["conf"] == 1.0 and copy["flagged"] and copy["mean distance"] == 0.0
    assert stranger["conf"] == 0.0 and not stranger["flagged"]
    assert [r["role"] for r in res["models"]] == ["suspect", "suspect", "innocent", "innocent"]
    assert res["threshold"] == sm.calibrate_on_innocent([0.0, 0.0], 0.05)
    assert len(res["key_samples"]["prompts"]) == 3 and calls == [3] * 10   # 5 models x 2 seeds
    assert (tmp_path / "run" / "report.html").is_file()
    res2 = run_source_model(cfg, tmp_path / "run", progress=False)     # all cached
    assert calls == [3] * 10 and res2["threshold"] == res["threshold"]
    # δ0 calibrated on the innocents: 12 distances at rate 0.05 -> their minimum (no innocent
    # hit), and the copy (distance 0) still hits everywhere
    cal = apply_overrides(cfg, ["decision.delta0=calibrated"])
    res3 = run_source_model(cal, tmp_path / "run_cal", progress=False)
    assert res3["delta0"] > 0 and res3["delta0_from"].startswith("calibrated")
    assert [r["conf"] for r in res3["models"]] == [0.0, 1.0, 0.0, 0.0]
    assert res3["models"][1]["flagged"] and not res3["models"][0]["flagged"]


@pytest.mark.slow
def test_cli_source_model_flags_the_copy_not_the_stranger(tiny_pipeline_dir, tmp_path):
    """Real generations: a suspect identical to the source reproduces every key sample
    (conf 1, flagged); models with other weights do not. (About 70 s of CPU time: one sampler
    compilation per model.)"""
    from typer.testing import CliRunner
    from jaxattrib.cli import app
    stranger = _variant_pipeline(tiny_pipeline_dir, tmp_path / "s1", seed=11, noise=0.5)
    innocent = _variant_pipeline(tiny_pipeline_dir, tmp_path / "s2", seed=12, noise=0.5)
    run = tmp_path / "run"
    args = ["source-model", "source_model", "--run-dir", str(run), "--no-progress",
            "--set", f"model.pipeline='{tiny_pipeline_dir}'",
            "--set", f"model.suspects=('pipeline', '{stranger}')",
            "--set", f"model.innocent=('{innocent}',)",
            "--set", "key_samples.prompts=('a red circle', 'a blue square', 'a red square')",
            "--set", "key_samples.n=2", "--set", "key_samples.detection_seeds=2",
            "--set", "query.seeds=(0,)", "--set", "query.num_inference_steps=3"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads((run / "source_model" / "results.json").read_text())
    copy, other, inn = res["models"]
    assert copy["conf"] == 1.0 and copy["flagged"] and copy["mean distance"] == 0.0
    assert other["conf"] < 1.0 and not other["flagged"] and inn["role"] == "innocent"
    assert res["threshold"] > inn["conf"]
    assert len(res["key_samples"]["prompts"]) == 2 and (run / "report.html").is_file()
    assert (run / "results" / "source_model_keys.png").is_file()
    stamps = {p.name: p.stat().st_mtime_ns for p in (run / "source_model").glob("gen_*.npz")}
    assert len(stamps) == 4                              # source + 2 suspects + 1 innocent
    r = CliRunner().invoke(app, args)                    # resumes: nothing regenerated
    assert r.exit_code == 0, r.output
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (run / "source_model").glob("gen_*")}
    for more in ([], ["--fresh"]):   # checked first: refused before anything is deleted
        bad = CliRunner().invoke(app, args + more + ["--set", "key_samples.n=9"])
        assert bad.exit_code == 2 and "key_samples.n=9: only 3" in bad.output
        assert (run / "source_model" / "results.json").is_file()
    bad = CliRunner().invoke(app, args + ["--set", "key_samples.n=1"])
    assert bad.exit_code == 2 and "another config" in bad.output


def test_compile_cache_directory_resolution(tmp_path, monkeypatch):
    from jaxattrib.cli import resolve_compile_cache
    monkeypatch.delenv("JAXATTRIB_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_compile_cache(None) == tmp_path / "xdg" / "jaxattrib" / "xla"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_compile_cache(None) == tmp_path / "home" / ".cache" / "jaxattrib" / "xla"
    monkeypatch.setenv("JAXATTRIB_COMPILE_CACHE", str(tmp_path / "env"))
    assert resolve_compile_cache(None) == tmp_path / "env"
    assert resolve_compile_cache(str(tmp_path / "opt")) == tmp_path / "opt"  # option wins
    assert resolve_compile_cache("off") is None and resolve_compile_cache("OFF") is None
    monkeypatch.setenv("JAXATTRIB_COMPILE_CACHE", "off")
    assert resolve_compile_cache(None) is None
    assert resolve_compile_cache(str(tmp_path / "opt")) == tmp_path / "opt"


@pytest.fixture
def restore_compile_cache():
    """Puts JAX's persistent-cache settings back after a test that let the CLI change them, so
    later tests in the process neither write to nor read from its tmp cache."""
    from jax.experimental.compilation_cache import compilation_cache as cc
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {n: jax.config.values[n] for n in names}
    yield
    for n, v in saved.items():
        jax.config.update(n, v)
    cc.reset_cache()


def test_cli_compile_cache_on_and_off(tiny_pipeline_dir, tmp_path, monkeypatch,
                                      restore_compile_cache):
    """A command that compiles (`info` checks every tensor) writes XLA cache entries to the
    directory --compile-cache / $JAXATTRIB_COMPILE_CACHE names, and none anywhere when off."""
    from typer.testing import CliRunner
    from jaxattrib.cli import app
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)

    def info(*top):
        jax.clear_caches()  # in-memory executables from earlier tests would skip compilation
        r = CliRunner().invoke(app, [*top, "info", str(tiny_pipeline_dir)])
        assert r.exit_code == 0, r.output
        return r.output

    def entries(d):
        return sorted(p.name for p in d.glob("*-cache")) if d.is_dir() else []

    monkeypatch.setenv("JAXATTRIB_COMPILE_CACHE", str(tmp_path / "env"))
    out = info()
    written = entries(tmp_path / "env")
    assert written and any(n.startswith("jit_") for n in written)
    assert str((tmp_path / "env").resolve()) in out and not (tmp_path / "xdg").exists()
    out = info("--no-compile-cache")     # off after on (same process): back to no cache
    assert "compilation cache" not in out
    assert jax.config.values["jax_compilation_cache_dir"] in (None, "")
    assert entries(tmp_path / "env") == written
    monkeypatch.setenv("JAXATTRIB_COMPILE_CACHE", "off")
    (tmp_path / "env2").mkdir()
    monkeypatch.chdir(tmp_path / "env2")
    info()
    assert not any((tmp_path / "env2").iterdir()) and not (tmp_path / "xdg").exists()
    info("--compile-cache", "rel")       # the option wins over the environment; relative path
    assert entries(tmp_path / "env2" / "rel")
