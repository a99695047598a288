"""`jaxattrib cgi-dm` (jaxattrib.runs.cgi_dm) on tiny pixel pipelines: end to end with a ROC,
per-batch caching equal to one recover() call, resume, errors; the projection settings reach
PGD and old run directories keep resuming."""

import json

import jax
import numpy as np

from jaxattrib.config import load_config
from jaxattrib.diffusion.schedule import schedule_from_diffusers_config
from tiny import perturbed_copy, write_pngs


def test_cli_cgi_dm_end_to_end_resumes(tiny_pipeline_dir, tmp_path):
    """`jaxattrib cgi-dm`: pretrained = the tiny pipeline, fine-tuned = another pipeline
    folder; labelled candidates give a ROC; per-batch caching equals one recover() call and a
    rerun recomputes nothing."""
    from typer.testing import CliRunner
    from jaxattrib.authentication import cgi_dm
    from jaxattrib.cli import app
    ft = perturbed_copy(tiny_pipeline_dir, tmp_path, seed=7, scale=0.05, name="ft")
    cand = tmp_path / "cand"
    write_pngs(cand / "member", 3, 1)
    write_pngs(cand / "non_member", 2, 2)
    write_pngs(tmp_path / "ref", 3, 3)
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
    write_pngs(tmp_path / "cand", 2, 1)
    write_pngs(tmp_path / "ref", 2, 3)
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
    assert r.exit_code == 2 and "another config (fields ['cgi'] differ: cgi.project_t: stored 0, given 100)" in r.output, r.output
    assert len(seen) == 3
