"""The source-model model-zoo benchmark (jaxattrib.eval.source_zoo): metrics by construction and
the whole run (smoke config) with stand-in models, no compilation."""

import json
import types
import zlib

import numpy as np
import pytest

from jaxattrib.authentication import source_model as SM
from jaxattrib.config import load_config
from jaxattrib.eval import source_zoo as Z


def test_balanced_threshold_and_split():
    s = np.array([0.1, 0.2, 0.3, 0.5, 0.6, 0.9, 0.95])
    y = np.array([0, 0, 0, 1, 1, 1, 1])
    assert Z.balanced_threshold(s, y) == pytest.approx(0.4)        # separates perfectly
    # 1 innocent vs 4 infringing: plain accuracy would flag everything (0.8); balanced does not
    s2, y2 = np.array([0.3, 0.1, 0.2, 0.4, 0.5]), np.array([0, 1, 1, 1, 1])
    assert Z.balanced_threshold(s2, y2) == pytest.approx(0.35)
    with pytest.raises(ValueError, match="both classes"):
        Z.balanced_threshold(s, np.ones(7))
    assert [Z.split_of(i, 2, 3) for i in range(7)] == ["shadow"] * 2 + ["cal"] * 3 + ["eval"] * 2


def test_instance_confs_and_evaluate_by_construction():
    d = np.array([[0.1, 0.2, 0.05, 0.3], [0.1, 0.1, 0.2, 0.3]])     # [S=2, P=4]
    c = Z.instance_confs(d, {"a": [np.array([0, 1])], "b": [np.array([2]), np.array([3])]}, 0.15)
    assert c == {"a": pytest.approx(3 / 4), "b": pytest.approx((1 / 2 + 0) / 2)}
    rows = []
    for split in ("cal", "eval"):
        for i in range(4):
            rows.append({"rho": 0.0, "label": 0, "split": split, "m": 0.1 * i})
            rows.append({"rho": 0.3, "label": 1, "split": split, "m": 0.25 + 0.1 * i})
            rows.append({"rho": 1.0, "label": 1, "split": split, "m": 1.0 + i})
    res = Z.evaluate(rows, fpr=0.1, methods=("m",))["m"]
    assert res["threshold"] == pytest.approx(0.325)     # innocents <= 0.3 < 3 of 4 rho=0.3 (cal)
    r1, r03 = res["rho=1"], res["rho=0.3"]
    assert r1["auc"] == 1.0 and r1["accuracy"] == 1.0 and r1["tpr@0.1fpr"] == 1.0
    assert r03["accuracy"] == pytest.approx(7 / 8)          # 0.25 < tau: one miss
    # rho=0.3 overlaps the innocents: scores 0.25..0.55 vs 0..0.3 -> AUC = 1 - 1/16 (0.25 < 0.3)
    assert r03["auc"] == pytest.approx(15 / 16) and r03["n_pos"] == r03["n_neg"] == 4
    assert res["overall"]["n_pos"] == 8 and res["overall"]["n_neg"] == 4
    md = Z.markdown_table({"m": res}, 0.1)
    assert "rho=0.3" in md and "overall" in md and "1.00 / 1.00 / 1.00" in md


def test_paired_comparison():
    a, b = np.array([0.5, 0.4, 0.6, 0.3, 0.5]), np.array([0.2, 0.2, 0.2, 0.3, 0.1])
    c = Z.paired_comparison(a, b, n_boot=200)
    assert c["mean_diff"] == pytest.approx(0.26) and c["ci_low"] > 0
    assert (c["wins"], c["ties"], c["losses"]) == (4, 1, 0) and c["n"] == 5


def test_calibrate_delta0_by_construction():
    """δ0 = the innocent_hit_rate quantile of innocent distances: the hit rate of those models
    is that rate exactly, of fresh innocents from the same distribution about that rate,
    whatever the unit; copies of the source (small distances) score far higher."""
    rng = np.random.default_rng(0)
    d = rng.permutation(np.arange(200) / 200.0).reshape(4, 1, 50)          # [M, S, P]
    delta0 = SM.calibrate_delta0(d, 0.05)
    assert delta0 == pytest.approx(10 / 200) and np.mean(d < delta0) == pytest.approx(0.05)
    assert SM.calibrate_delta0(7.0 * d, 0.05) == pytest.approx(7.0 * delta0)   # unit-free
    assert SM.calibrate_delta0(d, 0.29) == pytest.approx(58 / 200)   # no float round-down
    fresh = rng.uniform(0, 1, (400, 1, 30))
    assert abs(np.mean(fresh < delta0) - 0.05) < 0.01
    infringer = np.where(rng.uniform(size=(1, 30)) < 0.5, 0.01, rng.uniform(0, 1, (1, 30)))
    assert Z.instance_confs(infringer, {"k": [np.arange(30)]}, delta0)["k"] > 0.4
    for bad in (dict(innocent_distances=[]), dict(innocent_distances=d, innocent_hit_rate=0.0),
                dict(innocent_distances=[np.nan])):
        with pytest.raises(SM.SourceModelError, match="calibrate_delta0"):
            SM.calibrate_delta0(**bad)


def test_zoo_delta0_never_uses_evaluation_models():
    rows = [{"name": f"m{i}", "label": int(i >= 4), "split": s}
            for i, s in enumerate(["shadow", "cal", "eval", "eval", "shadow", "eval"])]
    dists = {f"m{i}": np.full((1, 20), 0.5) for i in range(6)}
    dists["m0"] = np.linspace(0.0, 0.19, 20)[None]
    dists["m1"] = np.linspace(0.2, 0.39, 20)[None]
    dec = types.SimpleNamespace(delta0="calibrated", innocent_hit_rate=0.25)
    delta0, info = Z.zoo_delta0(rows, dists, dec)
    assert delta0 == pytest.approx(0.1) and info["models"] == ["m0", "m1"]
    assert info["innocent hit rate, all candidates (calibration models)"] == pytest.approx(0.25)
    assert info["innocent hit rate, all candidates (evaluation models)"] == 0.0
    dists["m2"] = dists["m3"] = np.zeros((1, 20))          # evaluation innocents change:
    assert Z.zoo_delta0(rows, dists, dec)[0] == delta0     # δ0 does not
    dec.delta0 = 0.15
    assert Z.zoo_delta0(rows, dists, dec)[0] == 0.15
    rows = [r for r in rows if r["name"] not in ("m0", "m1")]
    dec.delta0 = "calibrated"
    with pytest.raises(ValueError, match="no innocent"):
        Z.zoo_delta0(rows, dists, dec)


# ------------------------------------------------------------------------------ the whole run
def _standins():
    """Stand-in models that memorize their training set exactly: a model generates, for a
    caption it was trained on, the mean of its training images of that caption (+ tiny seed
    noise), and for any other caption a flat color of (weights, caption) — so the source
    reproduces its renders, an infringer reproduces the source's (watermarked) generations of
    the captions it took, and an innocent reproduces other renders."""
    calls = {"finetune": 0, "generate": 0}

    def finetune_fn(init, ds, seed, workdir=None):
        calls["finetune"] += 1
        caps = np.array([zlib.crc32(c.encode()) for c in ds.captions], np.int64)
        return {"unet": {"images": np.asarray(ds.images, np.float32), "caps": caps}}

    def generate_fn_of(unet):
        imgs, caps = np.asarray(unet["images"]), np.asarray(unet["caps"])

        def gen(prompts, key):
            calls["generate"] += 1
            out = []
            for i, p in enumerate(prompts):
                c = zlib.crc32(p.encode())
                rng = np.random.default_rng([c, int(np.asarray(key).sum()), i])
                hit = caps == c
                if hit.any():
                    out.append(imgs[hit].mean(0) + 0.005 * rng.normal(size=imgs.shape[1:]))
                else:
                    w = zlib.crc32(imgs.tobytes()[:4096] + p.encode())
                    out.append(np.full(imgs.shape[1:], np.random.default_rng(w).uniform(-1, 1)))
            return np.asarray(out, np.float32)
        return gen

    def memorization_fn(unet, prompts, key, n_seeds):
        return np.array([zlib.crc32(p.encode()) % 97 for p in prompts], np.float64)

    return calls, finetune_fn, generate_fn_of, memorization_fn


def _standin_pipe(root):
    """A stand-in pipeline: no model, only a folder whose ``jaxattrib_base.json`` names the
    16-px pixel concept set (3 backgrounds, 75 captions), which the run renders its data from
    (:func:`jaxattrib.runs.specs.synthetic_spec`), not the embedded model's 32-px set."""
    import dataclasses

    from jaxattrib.train.base_model import data_spec
    folder = root.parent / f"{root.name}_standin"       # beside the run directory
    folder.mkdir()
    (folder / "jaxattrib_base.json").write_text(json.dumps(
        {"data_spec": dataclasses.asdict(data_spec())}))
    return types.SimpleNamespace(folder=folder, unet_params={
        "images": np.zeros((1, 16, 16, 3), np.float32), "caps": np.zeros(1, np.int64)})


def test_smoke_run_with_stand_in_models_and_resume(tmp_path):
    cfg = load_config("source_model:smoke")
    calls, ft, gen_of, mem = _standins()
    pipe = _standin_pipe(tmp_path)
    kw = dict(pipe=pipe, finetune_fn=ft, generate_fn_of=gen_of, memorization_fn=mem)
    out = Z.run_source_zoo(cfg, tmp_path, progress=False, **kw)
    z = cfg.zoo
    n_models = len(z.rhos) * (z.n_shadow + z.n_cal + z.n_eval)
    assert calls["finetune"] == 2 + n_models                      # source + reference + zoo
    rows = out["models"]
    assert len(rows) == n_models and {r["split"] for r in rows} == {"shadow", "cal", "eval"}
    inn = [r for r in rows if r["label"] == 0]
    inf = [r for r in rows if r["label"] == 1]
    # infringers (rho = 1) reproduce the source's generations, innocents do not
    for m in ("strategy1", "strategy2", "random"):
        assert np.mean([r[m] for r in inf]) > np.mean([r[m] for r in inn]) + 0.3
    # by construction a stand-in infringer hits exactly the key samples it trained on
    cov = out["coverage"]["rho=1"]
    assert 0 < cov["random:coverage"] < 1
    assert cov["random:conf_covered"] == 1.0 and cov["random:conf_uncovered"] < 0.3
    assert set(out["source"]) == set(Z.INSTANCE_METHODS) | {"all candidates"}
    # δ0 calibrated (smoke default) on the innocent shadow + calibration models only
    info = out["delta0_calibration"]
    assert info["calibrated"] and info["models"] == [f"rho000_{i:02d}" for i in range(4)]
    assert info["innocent hit rate, all candidates (calibration models)"] <= 0.05

    assert out["delta_sweep"]["mean d"]["strategy1"]["auc"] > 0.5 and "0.15" in out["delta_sweep"]
    # the watermark survives in an exact copy, not in innocent renders
    assert min(r["watermark"] for r in inf) >= 0.9 > max(r["watermark"] for r in inn)
    res = out["results"]
    assert set(res) == set(Z.INSTANCE_METHODS) | {"discriminator", "watermark"}
    assert res["watermark"]["rho=1"]["auc"] == 1.0
    for m in res.values():
        assert 0.0 <= m["overall"]["auc"] <= 1.0 and m["overall"]["n_pos"] == z.n_eval
    assert out["conf_vs_rho"]["rho"] == [0.0, 1.0] and out["rho0.3_vs_random"] == {}  # no rho=0.3
    for name in ("tables/source_model_zoo.md", "tables/source_model_zoo.json",
                 "plots/conf_vs_rho.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "Acc / AUC / TPR@10%FPR" in (tmp_path / "tables/source_model_zoo.md").read_text()
    # a rerun trains and generates nothing and reproduces the numbers
    n_ft, n_gen = calls["finetune"], calls["generate"]
    again = Z.run_source_zoo(cfg, tmp_path, progress=False, **kw)
    assert (calls["finetune"], calls["generate"]) == (n_ft, n_gen)
    assert json.dumps(again["results"]) == json.dumps(out["results"])


@pytest.mark.slow
def test_zoo_finetune_fn_matches_finetune_and_compiles_once(tmp_path, monkeypatch):
    """zoo_finetune_fn = diffusion_finetune_fn (finetune with its record) up to float noise, and
    a second and third member (other seed, other data) reuse the one compiled train step."""
    pytest.importorskip("diffusers")
    import jax
    from tiny import make_sd_pipeline

    from jaxattrib import parallel
    from jaxattrib.authentication import source_model_zoo as zoo_lib
    from jaxattrib.data.dataset import ImageDataset
    from jaxattrib.models.pipeline import load_pipeline
    from jaxattrib.train import diffusion_task
    from jaxattrib.train.finetune import TrainConfig

    make_sd_pipeline(tmp_path)
    pipe = load_pipeline(tmp_path / "pipe")
    rng = np.random.default_rng(0)

    def data(n, tag):
        return ImageDataset(images=rng.uniform(-1, 1, (n, 16, 16, 3)).astype(np.float32),
                            captions=["a photo of sks dog", "a painting of a cat"] * (n // 2),
                            labels={}, label_names={}, ids=[f"{tag}/{i}" for i in range(n)])
    ds = data(6, "a")
    cfg = TrainConfig(steps=3, batch_size=2, learning_rate=1e-3, checkpoint_every=0)
    mesh = parallel.make_mesh(1)
    ref = zoo_lib.diffusion_finetune_fn(pipe, cfg, mesh=mesh)({"unet": pipe.unet_params}, ds, 5,
                                                         tmp_path / "ref")
    traces = []
    real_loss = diffusion_task.make_diffusion_loss

    def counting(*a, **k):
        loss = real_loss(*a, **k)

        def fn(*args):
            traces.append(1)           # once per trace of the train step
            return loss(*args)
        return fn
    monkeypatch.setattr(diffusion_task, "make_diffusion_loss", counting)
    fast = Z.zoo_finetune_fn(pipe, cfg, mesh)
    got = fast({"unet": pipe.unet_params}, ds, 5)
    for a, b in zip(jax.tree.leaves(got["unet"]), jax.tree.leaves(ref["unet"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    n = len(traces)
    other = fast({"unet": pipe.unet_params}, data(4, "b"), 6)
    fast({"unet": pipe.unet_params}, ds, 7)
    assert n >= 1 and len(traces) == n
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(other["unet"]), jax.tree.leaves(got["unet"])))
    assert moved > 0


def test_rho03_comparison_tables_with_stand_ins(tmp_path):
    """With a ρ = 0.3 group the paired strategies-vs-random comparison is made at δ0 and at the
    tighter COMPARE_DELTAS, on the ρ = 0.3 and on the innocent models, and rendered."""
    cfg = load_config("source_model:smoke", ["zoo.rhos=(0.0, 0.3)"])
    _, ft, gen_of, mem = _standins()
    pipe = _standin_pipe(tmp_path)
    out = Z.run_source_zoo(cfg, tmp_path, progress=False, pipe=pipe, finetune_fn=ft,
                           generate_fn_of=gen_of, memorization_fn=mem)
    comp = out["rho0.3_vs_random"]
    n_per = cfg.zoo.n_shadow + cfg.zoo.n_cal + cfg.zoo.n_eval
    assert "strategy2 vs random" in comp and "strategy1 vs random, δ0=0.03, innocent rho=0" in comp
    assert "strategy1 vs random, innocent rho=0" in comp           # at the calibrated δ0
    assert len(comp) == 3 + 2 + 2 * 2 * len(Z.COMPARE_DELTAS)
    for c in comp.values():
        assert c["n"] == n_per and c["wins"] + c["ties"] + c["losses"] == n_per
        assert c["mean_diff"] == pytest.approx(c["mean_a"] - c["mean_b"])
    assert "δ0=0.05, innocent rho=0" in (tmp_path / "tables/source_model_zoo.md").read_text()
