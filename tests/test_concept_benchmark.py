"""Concept-TRAK benchmark (issue #6): query plan and ground truth by construction, metrics on
constructed scores, free-text concept queries (multi-concept = one row per concept, equal to
attributing each concept alone; a concept the prompt lacks is refused, naming prompt and
concept, before any model work), and (slow) the script's smoke run + a CLI query on it."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxattrib.attribution import concept_trak as ct
from jaxattrib.config import ConfigError
from jaxattrib.data.synthetic import parse_caption
from jaxattrib.eval import concept_benchmark as cb
from jaxattrib.runs.concept_query import concept_query

from tiny import concept_unet as _unet, word_encoder as _word_encoder

ROOT = Path(__file__).resolve().parents[1]


def test_query_plan_rows_splits_and_validation_half():
    ids = [{"color": "yellow", "shape": "star"}]
    ood = [{"color": "purple", "shape": "star"}, {"color": "red", "shape": "square"}]
    p = cb.query_plan(ids, ood, ("black", "white", "gray"), 4)
    assert len(p["prompts"]) == 12 and len(p["row_image"]) == 24
    assert list(p["split"]) == ["id"] * 4 + ["ood"] * 8
    # backgrounds cycle within a combination; prompts say the combination
    assert [parse_caption(x)["background"] for x in p["prompts"][:4]] == [
        "black", "white", "gray", "black"]
    assert parse_caption(p["prompts"][5]) == {"color": "purple", "shape": "star",
                                             "background": "white", "texture": "solid"}
    # every generation: one color row and one shape row with its own values
    for r, i in enumerate(p["row_image"]):
        assert parse_caption(p["prompts"][i])[p["row_kind"][r]] == p["row_concept"][r]
        assert p["row_split"][r] == p["split"][i]
    # first half of each combination's generations validate (all their rows)
    val_images = sorted(set(p["row_image"][p["row_val"]].tolist()))
    assert val_images == [0, 1, 4, 5, 8, 9]
    with pytest.raises(ConfigError, match="per_combo=1"):
        cb.query_plan(ids, ood, ("black",), 1)
    with pytest.raises(ConfigError, match="'texture'"):
        cb.query_plan(ids, ood, ("black",), 2, concepts=("texture",))


def test_ground_truth_is_by_concept_kind_not_by_word():
    caps = ["a red circle on a black background", "a blue circle on a red background",
            "a red star on a white background", "a blue star on a gray background"]
    rel = cb.concept_ground_truth(caps, ["color", "shape", "background"],
                                  ["red", "star", "red"])
    # 'red' as a color is not the red background of image 1 (a word match would say it is)
    np.testing.assert_array_equal(rel, [[1, 0, 1, 0], [0, 0, 1, 1], [0, 1, 0, 0]])
    assert ct.has_concept(caps[1], "red")


def test_method_rows_oracle_antioracle_and_splits():
    rng = np.random.default_rng(0)
    R, N = 8, 30
    rel = np.zeros((R, N), bool)
    for r in range(R):
        rel[r, rng.choice(N, 12, replace=False)] = True
    split = np.array(["id"] * 4 + ["ood"] * 4)
    test = np.array([False, True, True, True] * 2)
    verified = np.array([True] * 7 + [False])
    noise = rng.standard_normal((R, N)) * 0.01
    scores = {"oracle": rel + noise, "anti": -(rel + noise),
              "half": np.where(np.arange(R)[:, None] < 4, rel + noise, -(rel + noise))}
    table, raw = cb.method_rows(scores, rel, test, split, verified, {"oracle": "1"},
                                k=10, n_bootstrap=20)
    assert raw["oracle"]["id"]["precision"].estimate == 1.0
    assert raw["oracle"]["ood"]["map"].estimate == pytest.approx(1.0)
    assert raw["anti"]["ood"]["precision"].estimate == 0.0
    assert raw["half"]["id"]["precision"].estimate == 1.0
    assert raw["half"]["ood"]["precision"].estimate == 0.0
    assert raw["oracle"]["id"]["n"] == 3 and raw["oracle"]["ood_verified"]["n"] == 2
    assert table[0]["P@10 ID"].startswith("1.000") and table[0]["λ ratio (val)"] == "1"
    assert table[1]["λ ratio (val)"] == "-"
    # validation rows are never evaluated: NaN scores there change nothing
    scores2 = {"oracle": np.where(test[:, None], scores["oracle"], np.nan)}
    _, raw2 = cb.method_rows(scores2, rel, test, split, verified, {}, k=10, n_bootstrap=20)
    assert raw2["oracle"]["id"]["precision"] == raw["oracle"]["id"]["precision"]


def test_neighbour_purity_and_row_cosine_by_construction():
    caps = [f"a {c} {s} on a black background" for c in ("red", "blue") for s in
            ("circle", "star") for _ in range(3)]  # 12 images, 3 per (color, shape)
    color = np.array([c.split()[1] == "red" for c in caps], float)
    rng = np.random.default_rng(0)
    # features that encode only the color (+ tiny noise): neighbours share it, not the shape
    Phi = np.stack([color, 1 - color], 1) + 1e-3 * rng.standard_normal((12, 2))
    got = cb.neighbour_purity(Phi, caps, k=5)
    assert got["color"] == 1.0 and got["background"] == 1.0
    assert got["shape"] == pytest.approx(2 / 5)  # 2 of the other 5 same-color share the shape
    rows = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [3.0, 0.0]])
    assert cb._concept_row_cosine(rows, np.array([0, 0, 1, 1])) == pytest.approx(0.5)


def test_lambda_curve_agrees_with_the_validation_choice_and_the_test_table():
    """The diagnostic curve's validation column is the sweep that chooses λ, and at the chosen
    ratio its test cells are the method table's; d_eff falls from the rank to ~0 with λ."""
    rng = np.random.default_rng(0)
    R, N, k = 16, 30, 50
    rel = rng.random((R, N)) < 0.3
    Phi = rng.standard_normal((N, k)) * np.linspace(0.1, 3, k)
    # query rows correlated with their relevant training rows, so λ matters
    phi = rel.astype(float) @ Phi / 5 + rng.standard_normal((R, k))
    val = np.arange(R) % 2 == 0
    split = np.array(["id"] * 8 + ["ood"] * 8)
    ratios = (1e-4, 1e-2, 1.0, 1e2, 1e4)
    scorer = lambda q, P, r: ct.scores_from_features(q, P, r)  # noqa: E731
    curve = cb.lambda_curve(phi, Phi, rel, val, split, ratios, scorer=scorer, k=5,
                            n_bootstrap=50)
    s, sweep = cb._choose_and_score(phi, Phi, rel, val, ratios, k=5, scorer=scorer)
    assert [c["ratio"] for c in curve] == list(ratios)
    np.testing.assert_allclose([c["val_precision"] for c in curve],
                               [w["val_precision_at_k"] for w in sweep["sweep"]])
    at = [c for c in curve if c["ratio"] == sweep["chosen"]][0]
    _, raw = cb.method_rows({"m": s}, rel, ~val, split, np.ones(R, bool), {}, k=5,
                            n_bootstrap=50)
    assert at["id"]["precision"] == raw["m"]["id"]["precision"]
    assert at["ood"]["precision"] == raw["m"]["ood"]["precision"]
    assert at["id"]["n"] == 4 and at["ood"]["n"] == 4
    d = [c["d_eff"] for c in curve]
    assert d[0] == pytest.approx(N, rel=1e-3) and d[-1] < 0.01 * N
    assert all(a > b for a, b in zip(d, d[1:]))


def test_leading_directions_name_the_concept_that_dominates():
    caps = [f"a {c} {s} on a {b} background" for b in ("black", "white") for c in ("red", "blue")
            for s in ("circle", "star") for _ in range(2)]  # 16 images
    bg = np.array([1.0 if "black" in c else -1.0 for c in caps])
    shape = np.array([1.0 if "star" in c else -1.0 for c in caps])
    rng = np.random.default_rng(0)
    # features: a strong background direction, a weaker shape direction, small noise
    Phi = (10 * bg[:, None] * rng.standard_normal(40) + 2 * shape[:, None]
           * rng.standard_normal(40) + 0.01 * rng.standard_normal((16, 40)))
    d = cb.leading_directions(Phi, caps, n=2)
    assert d[0]["η² background"] > 0.99 and d[0]["η² shape"] < 0.01
    assert d[1]["η² shape"] > 0.99 and d[1]["η² background"] < 0.01
    assert d[0]["η² color"] < 0.01
    assert d[0]["share of trace"] > d[1]["share of trace"] > 0
    assert sum(r["share of trace"] for r in d) <= 1.0 + 1e-12


def test_project_out_leading_removes_the_dominant_training_directions_only():
    rng = np.random.default_rng(0)
    N, k = 12, 30
    V = np.linalg.qr(rng.standard_normal((k, k)))[0]
    sv = np.array([50.0, 20.0] + [1.0] * (N - 2))  # two dominant directions
    Phi = np.diag(sv) @ V[:, :N].T  # singular values sv, right singular vectors V[:, :N]
    phi = rng.standard_normal((4, k))
    P2, q2 = cb.project_out_leading(Phi, phi, 2)
    np.testing.assert_allclose(P2 @ V[:, :2], 0, atol=1e-10)  # the two directions are gone
    np.testing.assert_allclose(q2 @ V[:, :2], 0, atol=1e-10)
    # everything else is untouched (not whitened): the remaining spectrum is Φ's
    np.testing.assert_allclose(np.linalg.svd(P2, compute_uv=False)[:N - 2], sv[2:], rtol=1e-10)
    np.testing.assert_allclose(q2 @ V[:, 2:], phi @ V[:, 2:], atol=1e-10)
    P0, q0 = cb.project_out_leading(Phi, phi, 0)
    np.testing.assert_allclose(P0, Phi)
    np.testing.assert_allclose(q0, phi)
    with pytest.raises(ValueError, match="n=12"):
        cb.project_out_leading(Phi, phi, 12)


def test_feature_settings_guard_refuses_other_settings(tmp_path):
    folder = tmp_path / "k32768" / "concept-trak"
    want = {"k": 32768, "projector": {"kind": "sjlt", "key": [0, 0]}, "record_step": 4000}
    cb.check_feature_settings(folder, want)
    np.save(folder / "train.npy", np.zeros(3))
    cb.check_feature_settings(folder, dict(want))  # same settings: reuse
    with pytest.raises(ConfigError, match=r"settings\.json: feature setting 'k' is 32768, "
                                          r"this run asks for 2048"):
        cb.check_feature_settings(folder, {**want, "k": 2048})
    with pytest.raises(ConfigError, match="'projector'"):
        cb.check_feature_settings(folder, {**want, "projector": {"kind": "sjlt", "key": [0, 1]}})
    (folder / "settings.json").unlink()
    with pytest.raises(ConfigError, match="holds features but no settings.json"):
        cb.check_feature_settings(folder, want)


def test_multi_concept_prompt_is_attributed_concept_by_concept():
    cfg_u, params, model_fn = _unet()
    enc = _word_encoder()
    rng = np.random.default_rng(1)
    train = rng.uniform(-1, 1, (5, 8, 8, 3)).astype(np.float32)
    tp = ["a red circle", "a blue circle", "a red square", "a blue square", "a red star"]
    query = rng.uniform(-1, 1, (8, 8, 3)).astype(np.float32)
    cfg = ct.ConceptTRAKConfig(ddim_inversion=False, num_timesteps=2, proj_dim=32,
                               microbatch=4, lam_ratio=0.1)
    # expected: one explicit (image, prompt, concept) row per concept (rows are independent)
    expect, (Phi, _) = ct.concept_trak_scores(
        cfg_u, params, enc, train, tp, np.stack([query, query]), ["a red circle"] * 2,
        ["red", "circle"], cfg, model_fn=model_fn, return_features=True)
    qs, s = ct.attribute_concepts(cfg_u, params, enc, train, tp, query, "a red circle",
                                  ["red", "circle"], cfg, model_fn=model_fn, Phi_train=Phi)
    assert [(q.concept, q.negative) for q in qs] == [("red", "a circle"), ("circle", "a red")]
    assert s.shape == (2, 5)
    assert not np.allclose(s[0], s[1])  # each concept has its own c⁻, hence its own scores
    np.testing.assert_allclose(s, expect, rtol=1e-5, atol=1e-6 * np.abs(expect).max())


def test_concept_missing_from_prompt_fails_before_any_model_work(tmp_path):
    def no_model(*a):
        raise AssertionError("the model must not be evaluated")

    x = np.zeros((8, 8, 3), np.float32)
    with pytest.raises(ValueError, match="'a red circle'.*'star'"):
        ct.attribute_concepts(None, {}, _word_encoder(), x[None], ["a red circle"], x,
                              "a red circle", ["red", "star"], model_fn=no_model)
    # the run-directory API refuses it before looking at the (here absent) run
    with pytest.raises(ValueError, match="'a red circle on a black background'.*'blue'"):
        concept_query(tmp_path / "none", "a red circle on a black background", ["blue"],
                         seed=0)
    with pytest.raises(ConfigError, match="config.json: missing"):
        concept_query(tmp_path / "none", "a red circle on a black background", ["red"],
                         seed=0)


def test_cli_concept_query_error_names_prompt_and_concept(tmp_path):
    from typer.testing import CliRunner

    from jaxattrib.cli import app
    res = CliRunner().invoke(app, ["concept-query", str(tmp_path), "--prompt",
                                   "a red circle on a black background", "--concept", "red",
                                   "--concept", "star", "--seed", "0"])
    assert res.exit_code == 2
    out = " ".join(res.output.split())
    assert "'a red circle on a black background'" in out and "'star'" in out


@pytest.mark.slow
def test_concept_trak_script_smoke_and_cli_query(tmp_path):
    """The script's --smoke run writes both tables; a multi-concept CLI query on it lists one
    ranking per concept (several minutes: compilation of every ablation setting)."""
    run = tmp_path / "run"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "concept_trak.py"), "--smoke",
                    "--run-dir", str(run), "--no-progress"], check=True, cwd=ROOT)
    md = (run / "tables" / "concept_trak.md").read_text()
    for name in ("Concept-TRAK", "D-TRAK", "TRAK", "P@10 OOD"):
        assert name in md
    abl = (run / "tables" / "ablation.md").read_text()
    for name, _ in ct.ABLATION:
        assert f"| {name} |" in abl
    out = subprocess.run([sys.executable, "-m", "jaxattrib.cli", "concept-query", str(run),
                          "--prompt", "a purple star on a black background", "--concept",
                          "purple", "--concept", "star", "--seed", "3", "--topk", "3"],
                         check=True, cwd=ROOT, capture_output=True, text=True).stdout
    assert "concept 'purple'" in out and "concept 'star'" in out
    assert out.count("synthetic/") == 6
    # the query's report section: the query image and its top images with scores
    html = (run / "report.html").read_text()
    assert "Concept query: a purple star on a black background" in html


def test_stage_lines_go_to_the_jaxattrib_logger_and_show_under_an_entry_point(capsys):
    """_log logs (no print): silent in a plain import at INFO, on stderr once the benchmark's
    entry point (eval.runner.prepare_run_dir -> logs.configure) has set the logger up."""
    from jaxattrib import logs
    cb._log("quiet")
    first = capsys.readouterr()
    assert "quiet" not in first.out + first.err
    logs.configure(0)
    try:
        cb._log("training set: 3 images")
    finally:
        logs.unconfigure()
    out = capsys.readouterr()
    assert out.out == ""
    assert "[concept-trak " in out.err and "] training set: 3 images" in out.err


def test_query_pairs_come_from_the_query_s_own_regenerated_trajectory(tmp_path,
                                                                      tiny_latent_pipeline):
    """By construction: regenerated with the generation's own steps and η = 0, each query's
    kept states are the sampler's own (same key, same path) and the implied noise maps the
    path's end to them; η = 0.1 moves the path; pairs are cached with their settings (another
    η recomputes)."""
    import dataclasses
    import jax
    import ml_collections
    from jaxattrib.attribution import concept_trak as ct
    from jaxattrib.generate import generate
    from jaxattrib.models.pipeline import load_pipeline
    from jaxattrib.generate import query_key
    from jaxattrib.runs.concept_pairs import cached_query_pairs, query_trajectory_pairs
    pipe = load_pipeline(tiny_latent_pipeline)
    config = ml_collections.ConfigDict({"seed": 3, "generate": {"guidance_scale": 2.0,
                                                                "num_inference_steps": 10}})
    prompts = ["a red circle", "a blue star", "a red star"]
    g = generate(pipe, prompts, query_key(config.seed), num_inference_steps=10,
                 guidance_scale=2.0, return_trajectory=True)
    cfg = ct.ConceptTRAKConfig(inversion_steps=10, query_eta=0.0, query_pairs="trajectory")
    xts, ts, nz = query_trajectory_pairs(pipe, pipe.unet_params, prompts,
                                         query_key(config.seed), 2.0, cfg)
    assert xts.shape[:2] == ts.shape == (3, 1)              # 10 steps, every 5th: step 5
    np.testing.assert_allclose(xts[:, 0], np.asarray(g.trajectory.xs)[:, 5], atol=1e-5)
    np.testing.assert_array_equal(ts[:, 0], np.asarray(g.trajectory.timesteps)[:, 5])
    # the implied noise maps the trajectory's end to each kept state
    from jaxattrib.diffusion.schedule import add_noise
    from jaxattrib.generate import pipeline_schedule
    x0 = np.asarray(g.trajectory.x0_preds)[:, -1]
    np.testing.assert_allclose(add_noise(pipeline_schedule(pipe), x0, nz[:, 0], ts[:, 0]),
                               xts[:, 0], atol=1e-4)
    eta = dataclasses.replace(cfg, query_eta=0.1, inversion_steps=20)
    p1 = cached_query_pairs(tmp_path, config, pipe, pipe.unet_params, prompts, eta)
    assert p1[0].shape[:2] == (3, 3)
    g20 = generate(pipe, prompts, query_key(config.seed), num_inference_steps=20,
                   guidance_scale=2.0, return_trajectory=True)
    assert np.abs(p1[0][:, 0] - np.asarray(g20.trajectory.xs)[:, 5]).max() > 1e-3  # η moves it
    again = cached_query_pairs(tmp_path, config, pipe, None, prompts, eta)  # cached: no model
    np.testing.assert_array_equal(again[0], p1[0])
    other = cached_query_pairs(tmp_path, config, pipe, pipe.unet_params, prompts,
                               dataclasses.replace(eta, query_eta=0.3))
    assert np.abs(other[0] - p1[0]).max() > 1e-4
