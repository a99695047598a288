"""The sd15_lora / sd21 configs end to end through `jaxattrib train` and `attribute` on tiny
pipelines, and sd21's refusal of an epsilon model."""

import json

import jax
import numpy as np
import pytest

from tiny import write_pngs


# sd21 is slow: sd15_lora runs the same train/attribute path on a latent pipeline, and
# test_sd21_refuses_an_epsilon_model / test_losses.py (v_prediction targets) cover what differs
@pytest.mark.parametrize("name", ["sd15_lora", pytest.param("sd21", marks=pytest.mark.slow)])
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
    write_pngs(data / "dog", 4, 0, size=16)
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
    q = write_pngs(tmp_path / "q", 2, 5, size=16)
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
    write_pngs(tmp_path / "db" / "dog", 2, 0)
    r = CliRunner().invoke(app, ["train", "sd21", "--run-dir", str(tmp_path / "run"),
                                 "--set", f"model='{tiny_pipeline_dir}'",
                                 "--set", f"data.path='{tmp_path / 'db'}'", "--set", "data.size=8"])
    assert r.exit_code == 2
    assert "model_prediction_type='v_prediction'" in r.output and "'epsilon'" in r.output
    r = CliRunner().invoke(app, ["train", "sd15_lora", "--run-dir", str(tmp_path / "r2"),
                                 "--set", f"data.path='{tmp_path / 'db'}'"])
    assert r.exit_code == 2 and "model is empty" in r.output
