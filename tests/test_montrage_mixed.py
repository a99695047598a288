"""Mixed-concept attribution with a soft ground truth (jaxattrib.eval.mixed,
benchmarks/montrage_mixed.py): the plan, the ground truth and the metrics on constructed
scores, and a tiny end-to-end run of the benchmark script on a tiny source run."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from jaxattrib.train import base_model as bm
from jaxattrib.runs import demo, demo_attribute
from jaxattrib.runs.rundir import check_run_config
from jaxattrib.config import ConfigError, load_config
from jaxattrib.data.synthetic import SyntheticConceptSpec, parse_caption
from jaxattrib.eval import mixed

HELD = [dict(h) for h in bm.HELD_OUT]
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def test_mixture_plan_pairs_alphas_backgrounds_and_validation_strata():
    plan = mixed.mixture_plan(HELD, ALPHAS, repeats=3)
    assert len(plan["alpha"]) == 6 * 5 * 3                     # 6 pairs of 4 concepts
    for i in range(len(plan["alpha"])):
        pa, pb = parse_caption(plan["prompt_a"][i]), parse_caption(plan["prompt_b"][i])
        a, b = HELD[plan["concept_a"][i]], HELD[plan["concept_b"][i]]
        assert (pa["shape"], pa["color"]) == (a["shape"], a["color"])
        assert (pb["shape"], pb["color"]) == (b["shape"], b["color"])
        assert pa["background"] == pb["background"] == plan["background"][i]
        assert plan["concept_a"][i] < plan["concept_b"][i]
        assert plan["group"][i] == plan["pair"][i] * 5 + ALPHAS.index(plan["alpha"][i])
    for g in np.unique(plan["group"]):           # every group: the 3 backgrounds, one each
        m = plan["group"] == g
        assert sorted(plan["background"][m]) == ["black", "gray", "white"]
        assert len(set(plan["alpha"][m])) == 1
    val = demo_attribute._validation_mask(plan["group"])
    assert val.sum() == 30 and all(val[plan["group"] == g].sum() == 1 for g in range(30))
    one = mixed.mixture_plan(HELD, (0.5,), 2, pairs=[(2, 0)])
    assert one["concept_a"].tolist() == [2, 2] and one["concept_b"].tolist() == [0, 0]
    for bad in [dict(alphas=(1.5,), repeats=2), dict(alphas=ALPHAS, repeats=1),
                dict(alphas=ALPHAS, repeats=2, pairs=[(1, 1)])]:
        with pytest.raises(ConfigError, match="mixed"):
            mixed.mixture_plan(HELD, **bad)


def test_mixed_contexts_interpolate_the_encodings():
    rng = np.random.default_rng(0)
    table = {}

    def encode(prompts):
        return np.stack([table.setdefault(p, rng.standard_normal((3, 4))) for p in prompts])
    plan = mixed.mixture_plan(HELD, (0.0, 0.3, 1.0), 2, pairs=[(0, 1)])
    ctx = mixed.mixed_contexts(encode, plan["prompt_a"], plan["prompt_b"], plan["alpha"])
    assert ctx.shape == (6, 3, 4) and ctx.dtype == np.float32
    for i, a in enumerate(plan["alpha"]):
        ea, eb = table[plan["prompt_a"][i]], table[plan["prompt_b"][i]]
        np.testing.assert_allclose(ctx[i], a * ea + (1 - a) * eb, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ctx[plan["alpha"] == 1.0][0],
                                  table[plan["prompt_a"][4]].astype(np.float32))


def _setting():
    """4 concepts x 3 exemplars + 4 distractors; queries of pair (0, 1) and (2, 3) at ALPHAS."""
    tc = np.r_[np.repeat(np.arange(4), 3), -np.ones(4, int)]
    plan = mixed.mixture_plan(HELD, ALPHAS, 2, pairs=[(0, 1), (2, 3)])
    soft = mixed.soft_ground_truth(tc, plan["concept_a"], plan["concept_b"], plan["alpha"])
    return tc, plan, soft


def test_soft_ground_truth_by_construction():
    tc, plan, soft = _setting()
    np.testing.assert_allclose(soft.sum(1), 1.0)
    q = int(np.flatnonzero((plan["pair"] == 1) & (plan["alpha"] == 0.25))[0])   # A=2, B=3
    np.testing.assert_allclose(soft[q], np.r_[np.zeros(6), [0.25 / 3] * 3, [0.75 / 3] * 3,
                                              np.zeros(4)])
    with pytest.raises(ValueError, match="two different concepts"):
        mixed.soft_ground_truth(tc, np.array([1]), np.array([1]), np.array([0.5]))
    with pytest.raises(ValueError, match="exemplars"):
        mixed.soft_ground_truth(tc, np.array([1]), np.array([7]), np.array([0.5]))


def test_metrics_oracle_reversed_and_alpha_blind_scores():
    tc, plan, soft = _setting()
    rng = np.random.default_rng(1)
    noise = 1e-3 * rng.random(soft.shape)       # breaks ties among equal-truth images only
    oracle, rev = mixed.per_query(soft, plan, tc), mixed.per_query(-soft, plan, tc)
    np.testing.assert_allclose(oracle["rho"], 1.0)
    np.testing.assert_allclose(rev["rho"], -1.0)
    # A-over-B AUC of the oracle: 0 below α = 1/2, 1/2 at it (ties), 1 above
    want = np.select([plan["alpha"] < 0.5, plan["alpha"] == 0.5], [0.0, 0.5], 1.0)
    np.testing.assert_allclose(oracle["auc_ab"], want)
    np.testing.assert_allclose(mixed.per_query(soft + noise, plan, tc)["map_both"], 1.0)
    # knows the two concepts but not the mixture: A ∪ B on top in random order
    blind = (soft > 0) * 1.0 + noise
    b = mixed.per_query(blind, plan, tc)
    np.testing.assert_allclose(b["map_both"], 1.0)
    assert np.nanmean(b["rho"]) < np.nanmean(oracle["rho"])
    every = np.ones(len(plan["alpha"]), bool)
    s_or = mixed.summarize(oracle, plan["alpha"], every, n_bootstrap=50)
    s_bl = mixed.summarize(b, plan["alpha"], every, n_bootstrap=50)
    assert s_or["tracking"].estimate == pytest.approx(
        stats.spearmanr(plan["alpha"], want).statistic)
    assert s_or["auc_by_alpha"] == {0.0: 0.0, 0.25: 0.0, 0.5: 0.5, 0.75: 1.0, 1.0: 1.0}
    assert abs(s_bl["tracking"].estimate) < s_or["tracking"].estimate
    assert s_or["rho"].estimate == pytest.approx(1.0) and s_or["n"] == len(every)
    # a by-hand AUC and Spearman for one query
    s = rng.standard_normal(soft.shape[1])
    q = 3
    a, bb = s[tc == plan["concept_a"][q]], s[tc == plan["concept_b"][q]]
    m = mixed.per_query(np.tile(s, (len(plan["alpha"]), 1)), plan, tc)
    assert m["auc_ab"][q] == pytest.approx(np.mean([[x > y for y in bb] for x in a]))
    assert m["rho"][q] == pytest.approx(stats.spearmanr(s, soft[q]).statistic)
    gain = mixed.paired_gain(oracle["rho"], b["rho"], every, n_bootstrap=50)
    assert gain.estimate == pytest.approx(np.mean(oracle["rho"] - b["rho"]))


def test_generation_mix_counts_colours_and_shapes():
    spec = SyntheticConceptSpec()
    plan = mixed.mixture_plan(HELD, (0.0, 1.0), 2, pairs=[(0, 1)])
    a, b = HELD[0], HELD[1]
    col = [b["color"], b["color"], a["color"], spec.colors[0] if spec.colors[0] not in
           (a["color"], b["color"]) else spec.colors[-1]]
    shp = [b["shape"], a["shape"], a["shape"], a["shape"]]
    out = mixed.generation_mix(np.array([spec.colors.index(c) for c in col]),
                               np.array([spec.shapes.index(s) for s in shp]), plan, HELD, spec)
    assert out[0.0] == {"n": 2, "color A": 0.0, "color B": 1.0, "shape A": 0.5, "shape B": 0.5}
    assert out[1.0] == {"n": 2, "color A": 0.5, "color B": 0.0, "shape A": 1.0, "shape B": 0.0}


# ----------------------------------------------------------------------------- end to end

def _script():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "montrage_mixed.py"
    spec = importlib.util.spec_from_file_location("montrage_mixed", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_script_smoke_on_a_tiny_source_run(tiny_base_model, tmp_path, monkeypatch,
                                           capsys):
    src = tmp_path / "source"
    # the tiny stand-in has the 16-px spec's 3 backgrounds: 1 exemplar per background
    c = load_config("customization:smoke", [
        f"base_model='{tiny_base_model}'", "data.exemplars_per_concept=3",
        "finetune.steps=2", "finetune.checkpoint_every=1",
        "finetune.batch_size=4", "data.distractors=2"])
    check_run_config(src, c)
    info = bm.base_model_info(tiny_base_model)
    train = demo.build_data(src, c, info, stratify="background")["train"]
    pipe = bm.load_base_model(tiny_base_model)
    _, record = demo.finetune_stage(src, c, pipe, train, progress=False)
    record.close()
    mod = _script()
    run = tmp_path / "mixed"
    argv = ["--smoke", "--source-run", str(src), "--run-dir", str(run), "--steps", "2",
            "--alt-representation", "", "--no-progress",
            "--methods", "pixel,random,montrage,montrage-final"]
    mod.main(argv)
    out = capsys.readouterr().out
    for name in ("pixel similarity", "random", "MONTRAGE (trajectory, movement × count)",
                 "MONTRAGE final-only (representation similarity)"):
        assert f"| {name} |" in out
    assert "| step 0 (base model) |" in out and "| step 2 = final |" in out
    q = np.load(run / "generations" / "mixed.npz")
    assert q["images"].shape == (6, 16, 16, 3) and q["alpha"].tolist() == [0, 0, .5, .5, 1, 1]
    doc = json.loads((run / "tables" / "mixed.json").read_text())
    assert doc["counts"] == {"train": 8, "queries": 6, "val": 3, "test": 3}
    # the final-only scores are the last checkpoint's shifted cosines, by construction
    from jaxattrib.attribution import montrage as M
    traj = M.representation_trajectory(record.__class__.open((src / "record").resolve()),
                                       pipe.unet_config, train["images"],
                                       pipe.encode_prompts(list(train["captions"])),
                                       q["images"], q["ctx"], progress=False)
    np.testing.assert_allclose(np.load(run / "scores" / "montrage-final.npy"),
                               traj.similarities()[-1], atol=1e-6)
    # resumable: a rerun generates and scores nothing; other settings are refused
    def refuse(*a, **k):
        raise AssertionError("recomputed a cached stage")
    monkeypatch.setattr(mod, "generate_from_contexts", refuse)
    monkeypatch.setattr(demo_attribute, "_candidate_scores", refuse)
    mod.main(argv)
    assert json.loads((run / "tables" / "mixed.json").read_text())["methods"] == doc["methods"]
    with pytest.raises(ConfigError, match="another config"):
        mod.main(argv[:-1] + ["pixel"])


class _Pipe:
    """Just enough of a Pipeline for the script's glue: a deterministic text encoder."""
    scheduler_config = bm.SCHEDULER_CONFIG
    vae_config = vae_params = None     # pixel space
    is_latent = False

    def encode_prompts(self, prompts):
        return np.stack([np.random.default_rng(abs(hash(p)) % 2**32).standard_normal((2, 4))
                         for p in prompts]).astype(np.float32)


class _Record:
    def latest_step(self):
        return 2

    def load(self, step):
        return {"unet": None}

    def close(self):
        pass


def test_script_glue_with_constructed_images_and_candidates(tmp_path, monkeypatch, capsys):
    """Fast: no model. Training images are noisy copies of one prototype per concept; a
    'generation' of mixture α is α·P_A + (1−α)·P_B, so pixel similarity must follow the
    mixture; a fake gradient method offers a right and a reversed candidate, and validation
    must choose the right one. Then a rerun recomputes nothing."""
    from jaxattrib.train import record as record_lib
    rng = np.random.default_rng(0)
    protos = rng.uniform(-1, 1, (2, 16, 16, 3))
    concept = np.r_[0, 0, 0, 1, 1, 1, -1, -1].astype(np.int32)
    images = np.concatenate([protos[concept[:6]] + 0.3 * rng.standard_normal((6, 16, 16, 3)),
                             rng.uniform(-1, 1, (2, 16, 16, 3))]).clip(-1, 1)
    src = tmp_path / "source"
    (src / "data").mkdir(parents=True)
    (src / "record").mkdir()
    np.savez(src / "data" / "train.npz", images=images.astype(np.float32),
             captions=np.array([f"c{i}" for i in range(8)]), concept=concept,
             ids=np.array([str(i) for i in range(8)]))
    (src / "config.json").write_text(load_config("customization").to_json())
    info = {"held_out": HELD, "data_spec": dict(bm.base_model_info()["data_spec"], size=16)}
    monkeypatch.setattr(bm, "load_base_model", lambda folder=None: _Pipe())
    monkeypatch.setattr(bm, "base_model_info", lambda folder=None: info)
    monkeypatch.setattr(record_lib.TrajectoryRecord, "open", staticmethod(lambda d: _Record()))
    mod = _script()

    def fake_generate(pipe, ctx, key, **kw):
        q = np.load(run / "plan.npy", allow_pickle=True).item()
        al = q["alpha"][:, None, None, None]
        return (al * protos[0] + (1 - al) * protos[1]).astype(np.float32)

    real_candidates = demo_attribute._candidate_scores

    seen_fp = []
    # the training fingerprint is the one attribute_variants stores features under (latent
    # models: keyed also by the VAE), so the source run's copied stores are reused
    monkeypatch.setattr(demo_attribute, "_space_fingerprint", lambda pipe, fp: f"space|{fp}")

    def fake_candidates(method, *a, **k):
        if method != "dtrak":
            return real_candidates(method, *a, **k)
        seen_fp.append(a[9])
        q = np.load(run / "plan.npy", allow_pickle=True).item()
        soft = mixed.soft_ground_truth(concept, q["concept_a"], q["concept_b"], q["alpha"])
        return {"right": soft, "reversed": -soft}, {}

    run = tmp_path / "mixed"
    run.mkdir()
    np.save(run / "plan.npy", mixed.mixture_plan(HELD, ALPHAS, 2, pairs=[(0, 1)]))
    monkeypatch.setattr(mod, "generate_from_contexts", fake_generate)
    monkeypatch.setattr(demo_attribute, "_candidate_scores", fake_candidates)
    argv = ["--smoke", "--source-run", str(src), "--run-dir", str(run), "--no-progress",
            "--alphas", ",".join(map(str, ALPHAS)), "--methods", "pixel,random,dtrak"]
    mod.main(argv)
    doc = json.loads((run / "tables" / "mixed.json").read_text())
    assert doc["counts"] == {"train": 8, "queries": 10, "val": 5, "test": 5}
    assert doc["chosen"] == {"pixel": "pixel", "random": "random", "dtrak": "right"}
    assert seen_fp == [f"space|{demo_attribute._fingerprint_of(images.astype(np.float32))}"]
    choice = json.loads((run / "scores" / "dtrak_choice.json").read_text())
    assert choice["val"]["right"] > 0 > choice["val"]["reversed"]
    m = doc["methods"]
    assert m["dtrak"]["rho"]["estimate"] == pytest.approx(1.0)
    assert m["pixel"]["tracking"]["estimate"] > 0.9 and m["pixel"]["rho"]["estimate"] > 0.3
    assert m["pixel"]["auc_by_alpha"]["0.0"] == 0.0 and m["pixel"]["auc_by_alpha"]["1.0"] == 1.0
    q = np.load(run / "generations" / "mixed.npz")
    np.testing.assert_allclose(q["ctx"], mixed.mixed_contexts(
        _Pipe().encode_prompts, q["prompt_a"], q["prompt_b"], q["alpha"]), atol=1e-6)
    out = capsys.readouterr().out
    assert "| D-TRAK |" in out and "| pixel similarity |" in out and "## 1. generations" in out

    def refuse(*a, **k):
        raise AssertionError("recomputed a cached stage")
    monkeypatch.setattr(mod, "generate_from_contexts", refuse)
    monkeypatch.setattr(demo_attribute, "_candidate_scores", refuse)
    mod.main(argv)
    assert json.loads((run / "tables" / "mixed.json").read_text())["methods"] == m
    assert m["random"]["rho"]["estimate"] < 0.5          # random scores carry no mixture
