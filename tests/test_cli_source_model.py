"""`jaxattrib source-model` (jaxattrib.runs.source_model): the run's glue with a stand-in
generator, and (slow) real generations flagging a copy of the source, not a stranger."""

import json

import jax
import numpy as np
import pytest

from tiny import perturbed_copy


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
    others = [perturbed_copy(tiny_pipeline_dir, tmp_path, seed=i, scale=0.05,
                             name=f"m{i}") for i in range(3)]
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
    stranger = perturbed_copy(tiny_pipeline_dir, tmp_path, seed=11, scale=0.5,
                              name="s1")
    innocent = perturbed_copy(tiny_pipeline_dir, tmp_path, seed=12, scale=0.5,
                              name="s2")
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
    stamps = {p.name: p.stat().st_mtime_ns for p in (run / "source_model").glob("gen_*")}
    assert len([n for n in stamps if n.endswith(".npz")]) == 4   # source + 2 suspects + 1 innocent
    r = CliRunner().invoke(app, args)                    # resumes: nothing regenerated
    assert r.exit_code == 0, r.output
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (run / "source_model").glob("gen_*")}
    for more in ([], ["--fresh"]):   # checked first: refused before anything is deleted
        bad = CliRunner().invoke(app, args + more + ["--set", "key_samples.n=9"])
        assert bad.exit_code == 2 and "key_samples.n=9: only 3" in bad.output
        assert (run / "source_model" / "results.json").is_file()
    bad = CliRunner().invoke(app, args + ["--set", "key_samples.n=1"])
    assert bad.exit_code == 2 and "another config" in bad.output
