"""The CGI-DM benchmark (jaxattrib.eval.cgi_benchmark): splits by construction, config errors,
calibrated metrics, the DreamBooth folder source; end to end (slow)."""

import json
import types

import numpy as np
import pytest

from jaxattrib.config import ConfigError, apply_overrides, load_config
from jaxattrib.eval import cgi_benchmark as CB


def test_assign_splits_equal_sizes_per_concept():
    groups = np.array(["a"] * 20 + ["b"] * 20 + ["c"] * 7 + ["d"] * 4)
    split = CB.assign_splits(groups, members=8, calib=4, seed=3)
    for g in ("a", "b"):
        s = split[groups == g]
        for name, n in (("member_val", 4), ("member_test", 4), ("holdout_val", 4),
                        ("holdout_test", 4), ("calib", 4)):
            assert (s == name).sum() == n, (g, name)
    # 7 images: (7 - 1) // 2 = 3 members and 3 hold-outs, 1 calibration image
    s = split[groups == "c"]
    assert [(s == k).sum() for k in ("member_val", "member_test", "holdout_val",
                                     "holdout_test", "calib")] == [2, 1, 2, 1, 1]
    assert (split[groups == "d"] == "").all()           # 4 images: < 2 members, left out
    again = CB.assign_splits(groups, members=8, calib=4, seed=3)
    np.testing.assert_array_equal(split, again)
    other = CB.assign_splits(groups, members=8, calib=4, seed=4)
    assert (other != split).any() and sorted(other) == sorted(split)


def test_config_and_variant_errors_name_the_field():
    c = load_config("cgi_dm_benchmark")
    v = CB.check_config(c)
    assert set(v) == {"authors_50x4", "clamp1", "clamp1_low_t", "clamp1_block2", "clamp1_r10",
                      "clamp1_r3", "clamp1_proj_ft100", "clamp1_proj_ft50", "clamp1_proj_ft300",
                      "clamp1_proj_pre100", "clamp1_proj_ft100_every5",
                      "clamp1_proj_ft100_step16", "clamp1_proj_ft100_n4"}
    assert v["clamp1_proj_pre100"].project_model == "pretrained"
    assert v["clamp1_proj_ft100_n4"].project_t == 100 and v["clamp1_proj_ft100_n4"].n_noise == 4
    assert v["clamp1_low_t"].t_max == 300 and v["clamp1_low_t"].clamp == 1.0
    a = v["authors_50x4"]
    assert a.eps_radius == 70.0 and a.scale == "sqrt_numel"
    assert (a.num_steps, a.step_size) == (50, 4.0)
    # the authors' budget is a named variant of its own config only
    pb = CB.check_config(load_config("cgi_dm_benchmark:paper_budget"))
    assert set(pb) == set(v) | {"authors_1000x2"}
    b = pb["authors_1000x2"]
    assert (b.num_steps, b.step_size) == (1000, 2.0)
    assert (b.eps_radius, b.clamp, b.t_min, b.t_max) == (a.eps_radius, a.clamp, a.t_min, a.t_max)
    for override, msg in [("source='web'", "source='web'"),
                          ("data.members=1", "data.members must be >= 2"),
                          ("data.calib=0", "data.calib=0"),
                          ("tune.similarities=('clip',)", "tune.similarities"),
                          ("tune.variants=('x: t_maxx=3',)", r"tune.variants\[x\].*t_maxx"),
                          ("tune.variants=('x: block=3',)", r"tune.variants\[x\].*block=3"),
                          ("tune.variants=('x: t_max=many',)", r"t_max='many' is not a int"),
                          ("tune.variants=('a: ', 'a: t_max=3')", "distinct"),
                          ("source='folder'", "data.path")]:
        with pytest.raises(ConfigError, match=msg):
            CB.check_config(apply_overrides(c, [override]))


def test_run_made_before_base_model_field_resumes(tmp_path):
    """A benchmark run directory whose config.json predates ``base_model`` resumes with the
    embedded model (read as ''); another base model is refused."""
    from jaxattrib.runs.cgi_dm import CGI_ADDED_FIELDS
    from jaxattrib.runs.rundir import check_run_config
    added = {**CGI_ADDED_FIELDS, **CB.ADDED_FIELDS}
    c = load_config("cgi_dm_benchmark:smoke")
    old = json.loads(c.to_json())
    del old["base_model"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    (tmp_path / "scores").mkdir()
    (tmp_path / "scores" / "baselines.npz").write_bytes(b"x")      # something computed
    check_run_config(tmp_path, c, added=added)                      # resumes
    with pytest.raises(ConfigError, match="base_model"):
        check_run_config(tmp_path, apply_overrides(c, ["base_model='/elsewhere'"]), added=added)


def test_metrics_threshold_from_calibration_split_only():
    labels = np.r_[np.ones(10), np.zeros(10)].astype(bool)
    scores = np.r_[np.arange(10) + 5.5, np.arange(10)]      # members 5.5..14.5, hold-outs 0..9
    cal = np.arange(10) * 0.5 + 3.25                        # calibration non-members 3.25..7.75
    row = CB._metrics(scores, labels, cal)
    assert row["AUC"] == pytest.approx(1 - 10 / 100)         # 10 (member, hold-out) pairs swapped
    lo, hi = map(float, row["AUC 95% CI"].strip("[]").split(","))
    assert lo < 0.9 <= hi <= 1.0
    # 1 % of 10: no calibration score may pass -> just above 7.75: members 8.5.., hold-outs 8, 9
    assert row["calibrated 1%: TPR"] == 0.7 and row["calibrated 1%: FPR"] == 0.2
    # 10 %: one calibration score (7.75) may pass -> midpoint 7.5: members 7.5..
    assert row["calibrated 10%: TPR"] == 0.8 and row["calibrated 10%: FPR"] == 0.2
    shifted = CB._metrics(scores, labels, cal + 100)         # only the calibration split moved
    assert shifted["AUC"] == row["AUC"] and shifted["calibrated 10%: TPR"] == 0.0


def _toy_bench_models():
    """Analytic stand-ins (tests/tiny.py): N(0, 0.25 I) prior vs a fine-tune on 2 images."""
    import jax

    from jaxattrib.diffusion.schedule import make_schedule
    from tiny import gmm_toy_models as toy_models
    members = 0.5 * jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1))
    pre, ft = toy_models(members)
    return members, pre, ft, make_schedule(1000)


def test_baseline_scores_cache_computes_only_missing_entries(tmp_path):
    """A rerun with another variant reuses the cached entries (a marked cached value comes back)
    and computes only the new variant's; entries of variants no longer configured are not
    returned."""
    from jaxattrib.authentication.cgi_dm import CGIDMConfig
    members, pre, ft, sched = _toy_bench_models()
    images = np.concatenate([np.asarray(members)] * 2)
    data = {"images": images, "split": np.array(["member_val", "member_val",
                                                 "holdout_val", "holdout_val"])}
    cfg = types.SimpleNamespace(seed=0, loss_gap_draws=2, batch_size=4)
    sims = {"mse": lambda x, y: -((np.asarray(x) - np.asarray(y)) ** 2).mean(axis=(1, 2, 3))}
    va = {"a": CGIDMConfig(num_steps=1)}
    first = CB.baseline_scores(tmp_path, cfg, data, None, pre, ft, sched, sims, va)
    assert set(first) == {"loss_gap_t1-999", "masked_a_mse"}
    path = tmp_path / "scores" / "baselines.npz"
    cached = dict(np.load(path))
    cached["masked_a_mse"] = np.full(4, 123.0)
    np.savez(path, **cached)
    vb = {**va, "b": CGIDMConfig(num_steps=1, block=2, t_max=300)}
    second = CB.baseline_scores(tmp_path, cfg, data, None, pre, ft, sched, sims, vb)
    assert set(second) == {"loss_gap_t1-999", "loss_gap_t1-300", "masked_a_mse", "masked_b_mse"}
    np.testing.assert_array_equal(second["masked_a_mse"], 123.0)          # reused
    np.testing.assert_array_equal(second["loss_gap_t1-999"], first["loss_gap_t1-999"])
    # block 2 keeps other pixels than block 4: the masked start differs, so does its score
    assert not np.allclose(second["masked_b_mse"], first["masked_a_mse"])
    only_b = CB.baseline_scores(tmp_path, cfg, data, None, pre, ft, sched, sims,
                                {"b": vb["b"]})
    assert set(only_b) == {"loss_gap_t1-999", "loss_gap_t1-300", "masked_b_mse"}


def test_j_gain_is_the_rise_of_the_contrastive_objective():
    """J(recovered) − J(start): 0 when PGD did not move; positive when the recovery is the
    member itself (where the toy fine-tune's loss is far below the prior's) and the start is
    the masked member; the same draws at both points."""
    import jax
    import jax.numpy as jnp

    from jaxattrib.authentication.cgi_dm import CGIDMConfig, checkerboard_mask
    members, pre, ft, sched = _toy_bench_models()
    masked = members * jnp.asarray(checkerboard_mask(members.shape))
    cgi = CGIDMConfig(t_min=20, t_max=300)
    key = jax.random.PRNGKey(1)
    same = CB.j_gain_scores({"recovered": masked, "masked": masked}, None, pre, ft, sched, cgi,
                            key, 4, 2)
    np.testing.assert_array_equal(same, 0.0)
    up = CB.j_gain_scores({"recovered": members, "masked": masked}, None, pre, ft, sched, cgi,
                          key, 4, 2)
    assert (up > 0.1).all(), up


def test_dreambooth_folder_splits(shared_data, tmp_path):
    """The real DreamBooth photos: per subject, equal member and hold-out counts, 16 px."""
    root = shared_data / "dreambooth"
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    c = load_config("cgi_dm_benchmark", ["source='folder'", f"data.path='{root}'",
                                         "data.subjects=('dog', 'cat')", "data.members=2"])
    pipe = types.SimpleNamespace(unet_config=types.SimpleNamespace(sample_size=16,
                                                                    in_channels=3),
                                 vae_config=None)
    d = CB.build_data(tmp_path, c, pipe)
    assert d["images"].shape[1:] == (16, 16, 3)
    assert -1.0 <= d["images"].min() and d["images"].max() <= 1.0
    for g in ("dog", "cat"):
        s = d["split"][d["group"] == g]
        assert (s == "member_val").sum() == (s == "holdout_val").sum() == 1
        assert (s == "member_test").sum() == (s == "holdout_test").sum() == 1
        assert (s == "calib").sum() == 1
    assert len(set(d["ids"])) == len(d["ids"]) == 10


@pytest.mark.slow
def test_benchmark_smoke_end_to_end_resumes(tmp_path):
    """Every stage on a tiny setting on the embedded latent model (about 3.5 min on 2 loaded
    cores); a rerun recomputes no recovery and gives the same tables; the report shows
    original | masked | recovered."""
    c = load_config("cgi_dm_benchmark:smoke")
    out = CB.run_cgi_benchmark(c, tmp_path, progress=False)
    assert [r["method"].split(" (")[0] for r in out["test"]] == [
        "CGI-DM", "loss gap, no inversion", "masked-input similarity"]
    for r in out["test"]:
        assert 0.0 <= r["AUC"] <= 1.0 and 0.0 <= r["calibrated 10%: FPR"] <= 1.0
    assert out["counts"]["member_test"] == out["counts"]["holdout_test"] == 4
    # the embedded latent model: 32-px images, PGD on its 16x16x4 VAE latents, said in the table
    assert np.load(tmp_path / "data" / "splits.npz")["images"].shape[1:] == (32, 32, 3)
    assert "PGD on VAE latents [16, 16, 4]" in (tmp_path / "tables" / "cgi_dm.md").read_text()
    doc = json.loads((tmp_path / "results" / "cgi_bench.json").read_text())
    assert {i["path"] for i in doc["images"]} == {"results/cgi_bench_images.png",
                                                  "results/cgi_bench_roc.png"}
    assert (tmp_path / "report.html").is_file()
    if out["verdict"] is not None:             # CGI-DM at or below a baseline: said in the report
        assert out["verdict"] in doc["text"]
    cache = sorted((tmp_path / "cgi").rglob("*.npz"))
    stamps = {p: p.stat().st_mtime_ns for p in cache}
    again = CB.run_cgi_benchmark(c, tmp_path, progress=False)
    assert {p: p.stat().st_mtime_ns for p in cache} == stamps
    assert again["test"] == out["test"]


def test_verdict_sentence_names_the_stronger_baseline_and_the_measured_separations():
    """By construction: a loss gap that separates members perfectly beats a CGI-DM score that
    does not; a model-free masked-input score that wins is said to use no model; a CGI-DM that
    wins gets no sentence."""
    from jaxattrib.metrics import roc_auc
    y = np.array([True] * 4 + [False] * 4)
    weak = np.array([0.5, 0.2, 0.6, 0.3, 0.4, 0.1, 0.7, 0.35])     # AUC 0.5
    perfect = np.r_[np.full(4, 2.0), np.zeros(4)] + np.arange(8) * 0.01
    rows = lambda c, g, m: [{"method": n, "AUC": roc_auc(x, y)} for n, x in  # noqa: E731
                            (("CGI-DM (v, ssim)", c), ("loss gap (r)", g), ("masked (v)", m))]
    base = lambda g, m: [("loss gap (r)", g, True), ("masked (v)", m, False)]  # noqa: E731
    s = CB.verdict_sentence(rows(weak, perfect, weak), weak, base(perfect, weak), y)
    assert s.startswith("CGI-DM test AUC 0.500 is below loss gap (r)'s 1.000: ")
    assert "+0.0125 (+0.06 pooled std), against +1.96 " in s and "uses no model" not in s and "denoising loss" not in s
    s = CB.verdict_sentence(rows(weak, weak, perfect), weak, base(weak, perfect), y)
    assert "below masked (v)'s 1.000" in s and "which uses no model" in s
    assert "denoising loss" in s                 # the loss-gap separation is added as context
    assert CB.verdict_sentence(rows(perfect, weak, weak), perfect, base(weak, weak), y) is None


def _subject_folder(root, sizes=(24, 20), n=5):
    """A DreamBooth-layout folder: two subjects of ``n`` smooth random PNGs, ``sizes[i]`` px
    (not the model's size: the loader resizes), captions in the synthetic vocabulary."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for subject, size, cap in (("dog", sizes[0], "a red circle on a black background"),
                               ("cat", sizes[1], "a blue square on a white background")):
        d = root / subject
        d.mkdir(parents=True)
        (d / "prompt.txt").write_text(cap)
        for i in range(n):
            low = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
            Image.fromarray(low).resize((size, size), Image.BICUBIC).save(d / f"{i:02d}.png")
    return root


def test_latent_benchmark_runs_pgd_on_the_vae_mean_latent(tiny_latent_pipeline, tmp_path):
    """The benchmark's stages on the tiny latent pipeline (16-px images, 8x8x4 latents): the
    folder loads at the pixel size (16, not the UNet's 8); a cache of another model's size is
    refused; fine-tuning trains on the posterior mean (recorded); the recoveries equal
    ``cgi_dm.recover`` through the shared VAE codec with the posterior mean (what the demo and
    ``Authenticator(vae_posterior='mean')`` run: PGD on the latent, mask [n, 8, 8, 4], pixels
    decoded); the masked-input baseline's start is the recoveries' masked image and the loss
    gap is taken on the mean latent."""
    import jax

    from jaxattrib.authentication import cgi_dm
    from jaxattrib.models.latent_io import vae_codec
    from jaxattrib.models.pipeline import load_pipeline
    pipe = load_pipeline(tiny_latent_pipeline)
    c = load_config("cgi_dm_benchmark:smoke", [
        "source='folder'", f"data.path='{_subject_folder(tmp_path / 'photos')}'",
        "finetune.steps=2", "finetune.learning_rate=0.01", "batch_size=2", "loss_gap_draws=2"])
    run = tmp_path / "run"
    data = CB.build_data(run, c, pipe)
    assert data["images"].shape == (10, 16, 16, 3)                # pixel size, not 8
    assert sorted(set(data["split"])) == ["calib", "holdout_test", "holdout_val",
                                          "member_test", "member_val"]
    pixel8 = types.SimpleNamespace(unet_config=types.SimpleNamespace(sample_size=8,
                                                                      in_channels=3),
                                   vae_config=None)
    with pytest.raises(ConfigError, match=r"splits.npz \(made with another base model"):
        CB.build_data(run, c, pixel8)                             # cached for another model
    np.savez(run / "data" / "class.npz", images=data["images"][:2],   # cached class images
             captions=np.array(["a green star on a gray background"] * 2))
    ft = CB.finetune_stage(run, c, pipe, data, progress=False)
    manifest = json.loads((run / "record" / "manifest.json").read_text())
    assert manifest["model"]["vae_latents"] == "mean"
    moved = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), ft, pipe.unet_params))
    assert max(moved) > 0
    m = CB.models(pipe, ft)
    ctx = np.asarray(pipe.encode_prompts(list(data["captions"])))
    v = cgi_dm.CGIDMConfig(num_steps=2, clamp=1.0)
    split = "member_val"
    sel = data["split"] == split
    rec = CB.recover_split(run, c, "v", v, split, data, ctx, m["eps_pre"], m["eps_ft"],
                           m["sched"], False, encode=m["encode"], decode=m["decode"])
    assert rec["mask"].shape == (sel.sum(), 8, 8, 4)              # PGD on the latent
    assert rec["recovered"].shape == rec["masked"].shape == (sel.sum(), 16, 16, 3)
    enc, dec = vae_codec(pipe, sample=False)
    ref = cgi_dm.recover(data["images"][sel], m["eps_pre"], m["eps_ft"], m["sched"], v,
                         CB._split_key(c.seed, split), cond=ctx[sel], encode=enc, decode=dec,
                         batch_size=c.batch_size)
    for k in ("original", "masked", "recovered", "mask"):
        np.testing.assert_allclose(rec[k], ref[k], rtol=0, atol=1e-6, err_msg=k)
    assert np.abs(rec["recovered"] - rec["masked"]).max() > 1e-3    # PGD moved the image
    mse = {"mse": lambda x, y: -((np.asarray(x) - np.asarray(y)) ** 2).mean(axis=(1, 2, 3))}
    base = CB.baseline_scores(run, c, data, ctx, m["eps_pre"], m["eps_ft"], m["sched"], mse,
                              {"v": v}, encode=m["encode"], decode=m["decode"])
    np.testing.assert_allclose(base["masked_v_mse"][sel],
                               mse["mse"](rec["original"], rec["masked"]), rtol=1e-5)
    gap = cgi_dm.loss_gap_scores(data["images"], m["eps_pre"], m["eps_ft"], m["sched"],
                                 CB._split_key(c.seed, "loss_gap"), cond=ctx, encode=enc,
                                 n_draws=c.loss_gap_draws, batch_size=c.batch_size)
    np.testing.assert_allclose(base["loss_gap_t1-999"], gap, rtol=1e-5, atol=1e-7)


def test_pixel_benchmark_masked_start_is_the_masked_image():
    """A pixel base model (no VAE maps, the computation before latent models): the
    masked-input start is the checkerboard times the image, exactly."""
    from jaxattrib.authentication.cgi_dm import CGIDMConfig, checkerboard_mask
    members, pre, ft, sched = _toy_bench_models()
    x = np.asarray(members)
    data = {"images": x, "split": np.array(["member_val", "holdout_val"])}
    cfg = types.SimpleNamespace(seed=0, loss_gap_draws=1, batch_size=2)
    sims = {"cut": lambda a, b: np.asarray(b)[:, 0, 1, 0],     # a pixel the mask removes
            "keep": lambda a, b: np.asarray(b)[:, 0, 0, 0]}    # one it keeps
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as d:
        base = CB.baseline_scores(Path(d), cfg, data, None, pre, ft, sched, sims,
                                  {"v": CGIDMConfig(block=2)})
    mask = checkerboard_mask(x.shape, 2)
    assert mask[0, 0, 0, 0] == 1 and mask[0, 0, 1, 0] == 0
    np.testing.assert_array_equal(base["masked_v_cut"], 0.0)
    np.testing.assert_array_equal(base["masked_v_keep"], x[:, 0, 0, 0])


def test_run_made_with_the_former_paper_variant_name_keeps_it(tmp_path, caplog):
    """'paper' was renamed 'authors_50x4' (same settings): a run directory made before keeps its
    name and resumes; a run with other variants is still refused."""
    from jaxattrib.runs.rundir import check_run_config
    c = load_config("cgi_dm_benchmark")
    old = c.copy_and_resolve_references()
    old.tune.variants = ("paper: ",) + tuple(c.tune.variants[1:])
    run = tmp_path / "run"
    check_run_config(run, old)                    # writes config.json as the older code did
    (run / "results").mkdir()
    (run / "results" / "cgi_bench.json").write_text("{}")
    with caplog.at_level("WARNING"):
        CB.keep_renamed_variants(run, c)
    assert c.tune.variants[0] == "paper: " and "authors_50x4" in caplog.text
    check_run_config(run, c)                      # resumes
    other = load_config("cgi_dm_benchmark:paper_budget")
    CB.keep_renamed_variants(run, other)
    assert other.tune.variants[0] == "authors_50x4: "
    with pytest.raises(ConfigError, match="another config"):
        check_run_config(run, other)


def test_cgi_dm_paired_script_by_construction(tmp_path):
    """benchmarks/cgi_dm_paired.py: variant 'b' recovers members exactly and hold-outs not at
    all (AUC 1), 'a' the reverse (AUC 0): B − A = 1 with the bootstrap CI at 1; a missing
    variant is refused naming the folder."""
    import importlib.util
    import io
    from pathlib import Path
    from jaxattrib import integrity
    spec = importlib.util.spec_from_file_location(
        "cgi_dm_paired", Path(__file__).resolve().parents[1] / "benchmarks" / "cgi_dm_paired.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rng = np.random.default_rng(0)
    for v, good in (("a", "holdout_val"), ("b", "member_val")):
        for split in ("member_val", "holdout_val"):
            x = rng.uniform(-1, 1, (6, 16, 16, 3)).astype(np.float32)
            rec = x if split == good else rng.uniform(-1, 1, x.shape).astype(np.float32)
            buf = io.BytesIO()
            np.savez(buf, original=x, masked=x * 0, recovered=rec)
            (tmp_path / "cgi" / v).mkdir(parents=True, exist_ok=True)
            integrity.write_checked(tmp_path / "cgi" / v / f"{split}_000000.npz", buf.getvalue())
    r = mod.compare(tmp_path, "a", "b", "ssim", n_bootstrap=200)
    assert (r["auc_a"], r["auc_b"], r["diff"]) == (0.0, 1.0, 1.0)
    assert r["ci_low"] == r["ci_high"] == 1.0 and (r["n_members"], r["n_holdouts"]) == (6, 6)
    assert r["mean_members"]["b"] == pytest.approx(1.0)
    with pytest.raises(FileNotFoundError, match="cgi/c: no member_val recoveries"):
        mod.compare(tmp_path, "a", "c")
