"""The customization benchmark (jaxattrib.eval.benchmarks): ground truth by construction,
metrics on constructed score matrices, and a resumable tiny end-to-end run."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxattrib.train import base_model as bm
from jaxattrib.runs import demo, demo_attribute
from jaxattrib.config import ConfigError, load_config
from jaxattrib.data.synthetic import classify_concepts, parse_caption
from jaxattrib.eval import benchmarks as B
from jaxattrib.metrics import restrict_to_candidates

VARS = ("black", "white", "gray")


# ----------------------------------------------------------------------------- ground truth

def test_query_plan_prompts_and_validation_strata():
    held = [dict(h) for h in bm.HELD_OUT]
    plan = B.query_plan(held, VARS, per_variation=4)
    assert len(plan["prompts"]) == len(held) * 3 * 4
    for p, c, v, g in zip(plan["prompts"], plan["concept"], plan["variation"], plan["group"]):
        parsed = parse_caption(str(p))
        assert (parsed["shape"], parsed["color"]) == (held[c]["shape"], held[c]["color"])
        assert parsed["background"] == v and g == c * 3 + VARS.index(v)
    val = demo_attribute._validation_mask(plan["group"])
    for g in np.unique(plan["group"]):       # half of every (concept, variation) validates
        assert val[plan["group"] == g].sum() == 2
    with pytest.raises(ConfigError, match="per_variation"):
        B.query_plan(held, VARS, per_variation=1)


def test_ground_truth_matches_a_direct_loop():
    rng = np.random.default_rng(0)
    train_c = np.r_[np.repeat([0, 1], 6), -np.ones(5, int)]       # 2 concepts x 6 + 5 distractors
    train_v = np.r_[np.tile(VARS, 4), rng.choice(VARS, 5)]
    q_c, q_v = rng.integers(0, 2, 9), rng.choice(VARS, 9)
    gt = B.ground_truth(train_c, train_v, q_c, q_v)
    for q in range(9):
        for n in range(len(train_c)):
            ex = train_c[n] == q_c[q]                            # distractors never match
            assert gt["between"][q, n] == ex
            assert gt["within"][q, n] == (ex and train_v[n] == q_v[q])
    assert (gt["between"].sum(1) == 6).all() and (gt["within"].sum(1) == 2).all()
    with pytest.raises(ValueError, match="same, non-zero number"):
        B.ground_truth(np.r_[0, 0, 1], np.array(VARS), np.array([0, 1]), np.array(VARS[:2]))


def _data_config(exemplars=3):
    c = load_config("customization")
    c.data.exemplars_per_concept = exemplars
    c.data.distractors = 4
    c.data.per_combination = 2
    return c


def test_stratified_exemplars_show_the_variation_their_captions_state(tmp_path):
    # the 16-px pixel spec (3 backgrounds): the stratification, not the embedded model, is tested
    info = {"data_spec": dataclasses.asdict(bm.data_spec()), "held_out": list(bm.HELD_OUT)}
    data = demo.build_data(tmp_path, _data_config(3), info, stratify="background")
    train = data["train"]
    ex = train["concept"] >= 0
    held = info["held_out"]
    for ci in range(len(held)):
        caps = [parse_caption(str(c)) for c in train["captions"][train["concept"] == ci]]
        assert [c["background"] for c in caps] == list(VARS)      # one per background
        assert {(c["shape"], c["color"]) for c in caps} == {(held[ci]["shape"],
                                                            held[ci]["color"])}
    # the renders show what the captions say (the classifier reads the background exactly)
    spec = bm.data_spec()
    pred = classify_concepts(train["images"][ex], spec)["background"]
    assert [VARS[p] for p in pred] == list(B.caption_variations(train["captions"][ex]))
    with pytest.raises(ConfigError, match="multiple of the 3 variations"):
        demo.build_data(tmp_path / "bad", _data_config(4), info, stratify="background")


# ----------------------------------------------------------------------------- metrics

def test_retrieval_metrics_on_constructed_scores():
    # query 0: relevant {0, 2}; ranking 2, 5, 0, ... -> AP = (1/1 + 2/3) / 2, R@2 = 1/2, top1 = 1
    # query 1: relevant {4};    ranking 1, 3, 4, ... -> AP = 1/3,             R@2 = 0,   top1 = 0
    scores = np.array([[4., 1, 6, 0, 2, 5], [2., 6, 1, 5, 4, 0]])
    rel = np.zeros((2, 6), bool)
    rel[0, [0, 2]] = rel[1, 4] = True
    m = B.retrieval_metrics(scores, rel, np.array([True, True]), k=2, n_bootstrap=50)
    assert m["map"].estimate == pytest.approx(((1 + 2 / 3) / 2 + 1 / 3) / 2)
    assert m["recall"].estimate == pytest.approx(0.25) and m["top1"].estimate == 0.5
    assert m["map"].low <= m["map"].estimate <= m["map"].high
    # among candidates {0, 2, 3} / {3, 4, 5}: query 0 ranks 2, 0, 3 (AP 1), query 1 ranks 3, 4
    cand = np.zeros((2, 6), bool)
    cand[0, [0, 2, 3]] = cand[1, [3, 4, 5]] = True
    s_c, r_c = restrict_to_candidates(scores, rel, cand)
    assert s_c.tolist() == [[4, 6, 0], [5, 4, 0]] and r_c.tolist() == [[1, 1, 0], [0, 1, 0]]
    m = B.retrieval_metrics(scores, rel, np.array([True, True]), k=10, candidates=cand,
                            n_bootstrap=50)
    assert m["k"] == 3 and m["map"].estimate == pytest.approx((1 + 1 / 2) / 2)
    assert m["top1"].estimate == 0.5 and m["recall"].estimate == 1.0
    # only the selected queries count
    m = B.retrieval_metrics(scores, rel, np.array([False, True]), k=2, n_bootstrap=10)
    assert m["n"] == 1 and m["map"].estimate == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="same, non-zero number"):
        restrict_to_candidates(scores, rel, np.eye(2, 6, dtype=bool) | cand)


def test_benchmark_tables_oracle_and_variant_specific_rankings():
    train_c = np.r_[np.repeat([0, 1], 3), -1, -1]
    train_v = np.array(list(VARS) * 2 + ["black", "white"])
    q_c, q_v = np.array([0, 0, 1, 1]), np.array(["black", "white", "gray", "black"])
    gt = B.ground_truth(train_c, train_v, q_c, q_v)
    # 'concept' knows the concept but ranks its exemplars wrongly (reversed variation order)
    concept_only = gt["between"] * 10.0 - (1.0 + np.arange(8)) * gt["within"]
    scores = {"between": {"oracle": gt["within"] * 2.0 + gt["between"],
                          "concept": concept_only},
              "within": {"oracle": gt["within"] * 2.0 + gt["between"],
                         "concept": concept_only}}
    t = B.benchmark_tables(scores, gt, np.ones(4, bool), np.array([True, True, True, False]),
                           {"between": {}, "within": {}}, k=3, n_bootstrap=20)
    raw = t["raw"]
    assert raw["between"]["oracle"]["map"].estimate == 1.0
    assert raw["between"]["concept"]["map"].estimate == 1.0          # concept found
    assert raw["within"]["oracle"]["among_concept"]["map"].estimate == 1.0
    # within: each relevant exemplar is pushed below the other two of its concept -> AP = 1/3
    assert raw["within"]["concept"]["among_concept"]["map"].estimate == pytest.approx(1 / 3)
    assert raw["within"]["concept"]["among_concept"]["n"] == 3       # unconfirmed query left out
    assert [r["method"] for r in t["between"]] == ["oracle", "concept"]
    assert "mAP among concept" in t["within"][0] and "Recall@3" in t["between"][0]


# ----------------------------------------------------------------------------- attribution

def test_top_k_composition_reads_what_a_ranking_is_organised_by():
    from jaxattrib.data.synthetic import caption
    train = [caption(sh, co, bg) for sh in ("star", "cross") for co in ("red", "green")
             for bg in ("black", "white", "gray")]                          # N = 12
    prompts = [caption("star", "red", "white"), caption("cross", "green", "black")]
    tr = [c.split() for c in train]
    by_bg = np.array([[float(t[5] == p.split()[5]) for t in tr] for p in prompts])
    by_shape = np.array([[float(t[2] == p.split()[2]) for t in tr] for p in prompts])
    rows = B.top_k_composition({"dtrak": by_bg, "trak": by_shape}, train, prompts,
                               np.array([True, True]), k=4)
    by = {r["method"]: r for r in rows}
    # background ranking: 4 same-background images exist per query, all in the top-4
    assert by["D-TRAK"]["same background"] == "1.00" and by["TRAK"]["same shape"] == "1.00"
    # ties in training-set order: the top-4 of the 6 same-shape images are the red ones (x 3
    # backgrounds) + 1 green: concept 3/4 for the red star, 1/4 for the green cross
    assert by["TRAK"]["query concept"] == "0.50"
    assert by["base rate (all 12)"] == {"method": "base rate (all 12)", "same background":
                                        "0.33", "same color": "0.50", "same shape": "0.50",
                                        "query concept": "0.25"}
    only_second = B.top_k_composition({"dtrak": by_bg}, train, prompts,
                                      np.array([False, True]), k=4)
    assert only_second[0]["same background"] == "1.00"


class _FakePipe:
    """Just enough of a Pipeline for attribute_variants with precomputed candidates."""
    scheduler_config = bm.SCHEDULER_CONFIG
    vae_config = vae_params = None     # pixel space
    is_latent = False

    def encode_prompts(self, prompts):
        return np.zeros((len(prompts), 2, 4), np.float32)


def test_attribute_variants_chooses_per_variant_on_validation_and_caches(tmp_path, monkeypatch):
    gt = B.ground_truth(np.array([0, 0, 1, 1, -1]), np.array(["black", "white"] * 2 + ["gray"]),
                        np.array([0, 0, 1, 1]), np.array(["black", "white", "white", "black"]))
    val = np.array([True, False, True, False])
    # 'good-between' ranks the concept first but the wrong variation on top; 'good-within' the
    # right exemplar first; on validation the two variants prefer different candidates
    cands = {"good-between": gt["between"] * 2.0 - gt["within"] + 0.1 * np.arange(5),
             "good-within": gt["within"] * 3.0 - 0.5 * gt["between"]}
    calls = []

    def fake(method, *a, **k):
        calls.append(method)
        return dict(cands), {"ratios": [1, 2]}
    monkeypatch.setattr(demo_attribute, "_candidate_scores", fake)
    cfg = load_config("customization", ["attribution.methods=('fake',)"])
    train = {"images": np.zeros((5, 2, 2, 3)), "captions": np.array(["a"] * 5)}
    queries = {"images": np.zeros((4, 2, 2, 3)), "prompts": np.array(["b"] * 4)}
    variants = {"between": demo_attribute.Variant(gt["between"], val),
                "within": demo_attribute.Variant(gt["within"], val, gt["candidates"])}
    run = lambda: demo_attribute.attribute_variants(tmp_path, cfg, _FakePipe(), None, train,  # noqa
                                          queries, "fp", 0, variants, progress=False)
    out = run()
    want = {name: max(cands, key=lambda c: v.val_map(cands[c])) for name, v in variants.items()}
    assert want == {"between": "good-between", "within": "good-within"}
    for name in variants:
        np.testing.assert_array_equal(out[name]["fake"], cands[want[name]].astype(np.float32))
        sweep = json.loads((tmp_path / "scores" / name / "fake_lambda.json").read_text())
        assert sweep["chosen"] == want[name] and sweep["split"] == "validation queries"
    assert calls == ["fake"]
    again = run()                                   # cached: no candidate is recomputed
    assert calls == ["fake"] and all(
        np.array_equal(again[n]["fake"], out[n]["fake"]) for n in variants)


def test_generate_stage_adds_journey_trajectories_to_cached_queries(tiny_base_model, tmp_path):
    """Adding Journey-TRAK to a run regenerates its queries' sampling trajectories and keeps the
    stored images; the last step's x̂0 is the generated image (DDIM's final step, pixel model)."""
    pipe, info = demo.load_base(str(tiny_base_model))
    held = [dict(h) for h in info["held_out"]][:2]
    cfg = load_config("customization:smoke", ["generate.num_inference_steps=3",
                                              "attribution.methods=('pixel',)"])
    plan = B.query_plan(held, VARS[:1], 2, "background")
    first = demo.generate_stage(tmp_path, cfg, pipe, pipe.unet_params, held, plan)
    traj = tmp_path / "generations" / "trajectory.npz"
    assert not traj.exists()
    cfg.attribution.methods = ("journey-trak",)
    again = demo.generate_stage(tmp_path, cfg, pipe, pipe.unet_params, held, plan)
    np.testing.assert_array_equal(again["images"], first["images"])
    with np.load(traj) as z:
        x0s, ts = z["x0_preds"], z["timesteps"]
    assert x0s.shape == (4, 3, 16, 16, 3) and ts.shape == (4, 3)
    assert (np.diff(ts, axis=1) < 0).all()                     # noisiest step first
    np.testing.assert_allclose(np.clip(x0s[:, -1], -1, 1), first["images"], atol=1e-4)
    other = B.query_plan(held[::-1], VARS[:1], 2, "background")
    traj.unlink()
    with pytest.raises(ConfigError, match="prompts differ"):
        demo.generate_stage(tmp_path, cfg, pipe, pipe.unet_params, held, other)


# ----------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_run_is_resumable_and_writes_tables(tiny_base_model, tmp_path, monkeypatch):
    # the tiny stand-in has the 16-px spec's 3 backgrounds: 1 exemplar per background
    c = load_config("customization:smoke", [
        f"base_model='{tiny_base_model}'", "data.exemplars_per_concept=3",
        "finetune.steps=2", "finetune.checkpoint_every=1",
        "finetune.batch_size=4", "generate.num_inference_steps=2", "attribution.k=16",
        "attribution.num_timesteps=1", "attribution.microbatch=8",
        "attribution.methods=('journey-trak', 'tracin', 'pixel', 'random')",
        "attribution.journey_steps=(0.0, 1.0)", "data.distractors=4"])
    out = B.run_customization(c, tmp_path, progress=False)
    n = out["counts"]
    assert (n["train"], n["exemplars"], n["queries"], n["val"], n["test"]) == (10, 6, 12, 6, 6)
    assert n["within_val"] <= 6 and n["within_test"] <= 6
    assert {r["method"] for r in out["between"]} == {"Journey-TRAK", "TracIn",
                                                     "pixel similarity", "random"}
    s = np.load(tmp_path / "scores" / "within" / "tracin.npy")
    assert s.shape == (12, 10) and np.isfinite(s).all()
    # TracIn = the lr-weighted sum over checkpoints 1 and 2 (sign chosen on validation)
    assert sorted(p.name for p in (tmp_path / "features" / "tracin").iterdir()) == [
        "step_1", "step_2"]
    sweep = json.loads((tmp_path / "scores" / "between" / "tracin_lambda.json").read_text())
    assert sweep["candidates"] == ["tracin", "tracin, sign flipped"]
    # Journey-TRAK: queries = the generations' x̂0 at sampling steps 0 and 1 (of 2), each step
    # and their mean per λ ratio chosen on validation
    sweep = json.loads((tmp_path / "scores" / "between" / "journey-trak_lambda.json").read_text())
    assert sweep["sampling_steps"] == [0, 1] and len(sweep["candidates"]) == 3 * len(
        c.attribution.lambda_ratios) and sweep["chosen"] in sweep["candidates"]
    assert {"train", "queries_step0", "queries_step1"} <= {
        p.name for p in (tmp_path / "features" / "journey-trak").iterdir()}
    doc = json.loads((tmp_path / "tables" / "customization.json").read_text())
    assert len(doc["between"]) == len(doc["within"]) == 4
    assert "| method |" in (tmp_path / "tables" / "customization.md").read_text()
    assert (tmp_path / "report.html").is_file()
    # second run: every stage comes from the run directory (nothing recomputed)
    log = (tmp_path / "record" / "steps.jsonl").read_text()

    def refuse(*a, **k):
        raise AssertionError("recomputed a cached stage")
    monkeypatch.setattr(demo_attribute, "_candidate_scores", refuse)
    monkeypatch.setattr("jaxattrib.generate.generate", refuse)
    again = B.run_customization(c, tmp_path, progress=False)
    assert again["between"] == out["between"] and again["within"] == out["within"]
    assert (tmp_path / "record" / "steps.jsonl").read_text() == log


@pytest.mark.slow
def test_customization_script_smoke(tmp_path):
    """``benchmarks/customization.py --smoke`` on the embedded base model prints both tables."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "customization.py"),
                           "--smoke", "--run-dir", str(tmp_path / "run"), "--no-progress"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("D-TRAK", "TRAK", "Journey-TRAK", "TracIn", "Concept-TRAK",
                 "MONTRAGE (trajectory)", "MONTRAGE final-only", "pixel similarity", "random"):
        assert proc.stdout.count(f"| {name} |") == 2, name      # between and within tables


def test_paired_ap_difference_by_construction():
    rel = np.zeros((4, 5), bool)
    rel[np.arange(4), np.arange(4)] = True           # query q's one relevant image is q
    a = np.zeros((4, 5))
    a[np.arange(4), 4] = 2.0                          # A ranks image 4 first, the right one 2nd
    a[np.arange(4), np.arange(4)] = 1.0
    b = a.copy()
    b[:2, 4] = 0.0                                    # B ranks it first for queries 0, 1 only
    d = B.paired_ap_difference(a, b, rel, np.ones(4, bool))
    assert d["n"] == 4 and d["a"].estimate == 0.5 and d["b"].estimate == 0.75
    assert d["diff"].estimate == pytest.approx(0.25) and d["diff"].low >= 0.0
    # only queries 2, 3 selected: no difference, a degenerate interval at 0
    d = B.paired_ap_difference(a, b, rel, np.array([False, False, True, True]))
    assert tuple(d["diff"]) == (0.0, 0.0, 0.0)
    # ranked among candidates {q, 4}: the same APs as over all five images here
    cand = rel.copy()
    cand[:, 4] = True
    d = B.paired_ap_difference(a, b, rel, np.ones(4, bool), candidates=cand)
    assert d["diff"].estimate == pytest.approx(0.25)
    with pytest.raises(ValueError, match="no query"):
        B.paired_ap_difference(a, b, rel, np.zeros(4, bool))


def test_customization_paired_script_glue(tmp_path, monkeypatch):
    """benchmarks/customization_paired.py: paired rows from two runs' score files; runs whose
    queries differ are refused (nothing computed)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "customization_paired", Path(__file__).resolve().parents[1] / "benchmarks" /
        "customization_paired.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rng = np.random.default_rng(0)
    concept = np.array([0, 0, 1, 1, -1])
    caps = np.array([f"a red star on a {v} background" for v in VARS[:2] * 2 + ("gray",)])
    q = {"images": rng.uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32),
         "prompts": np.array(["p"] * 4), "concept": np.array([0, 0, 1, 1]),
         "variation": np.array(["black", "white"] * 2), "group": np.array([0, 0, 1, 1])}
    runs = {}
    for name in ("a", "b"):
        run = tmp_path / name
        (run / "data").mkdir(parents=True)
        (run / "generations").mkdir()
        np.savez(run / "data" / "train.npz", images=np.zeros((5, 8, 8, 3), np.float32),
                 captions=caps, concept=concept)
        np.savez(run / "generations" / "queries.npz", **q)
        (run / "config.json").write_text(json.dumps({"base_model": "", "variation":
                                                     "background"}))
        for variant in ("between", "within"):
            (run / "scores" / variant).mkdir(parents=True)
            np.save(run / "scores" / variant / "dtrak.npy", rng.standard_normal((4, 5)))
        runs[name] = run
    monkeypatch.setattr(B, "variation_check", lambda images, prompted, *a, **k:
                        np.ones(len(images), bool))
    rows = mod.compare(runs["a"], runs["b"], ["dtrak"], n_bootstrap=50)
    assert [(r["method"], r["variant"], r["n"]) for r in rows] == [
        ("D-TRAK", "between", 2), ("D-TRAK", "within (among the concept)", 2)]
    gt = B.ground_truth(concept, B.caption_variations(caps), q["concept"], q["variation"])
    test = ~demo_attribute._validation_mask(q["group"])
    want = B.paired_ap_difference(np.load(runs["a"] / "scores/between/dtrak.npy"),
                                  np.load(runs["b"] / "scores/between/dtrak.npy"),
                                  gt["between"], test, n_bootstrap=50)["diff"]
    assert rows[0]["B − A"].startswith(f"{want.estimate:+.3f}")
    q["images"] = q["images"] + 0.1
    np.savez(runs["b"] / "generations" / "queries.npz", **q)
    with pytest.raises(SystemExit, match="not paired"):
        mod.compare(runs["a"], runs["b"], ["dtrak"])
