"""What the reports show: scores beside every image, blank generations flagged and never an
example, a losing method explained in one sentence from measured numbers, and ROC baselines
that stay visible (issue 20, item 6). Runs on constructed numbers and small constructed run
directories: no model is trained here."""

from __future__ import annotations

import io
import json
import re

import ml_collections
import numpy as np
import pytest
from PIL import Image

from jaxattrib.report import images as I
from jaxattrib.report import plots as P
from jaxattrib.report import verdict as V


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# ------------------------------------------------------------------ the sentence generator


def test_outcome_and_sentence_on_win_loss_tie():
    assert V.outcome(0.80, 0.70) == "win" and V.explain("m", 0.80, "b", 0.70, "AUC", "x",
                                                         "y") is None
    loss = V.explain("CGI-DM", 0.62, "pixel distance", 0.80, "AUC", "members moved by 0.01",
                     "AUC")
    assert loss == ("CGI-DM AUC 0.620 is below pixel distance's 0.800: members moved by "
                    "0.01.")
    tie = V.explain("D-TRAK", 0.501, "random", 0.499, "mAP", None, "per-query AP on 6 queries")
    assert V.outcome(0.501, 0.499) == "tie"
    assert tie.startswith("D-TRAK mAP 0.501 is level with") and "random's 0.499" in tie
    assert tie.endswith("measured: per-query AP on 6 queries; the cause is not established.")
    for sentence in (loss, tie):                              # one sentence each
        assert len(re.findall(r"\.(?:\s|$)", sentence)) == 1
    assert V.outcome(np.nan, 0.5) == "tie"                   # NaN is never a win


def test_separation_is_cohens_d():
    s = np.array([1.0, 2.0, 3.0, 10.0, 11.0, 12.0])
    y = np.array([0, 0, 0, 1, 1, 1], bool)
    diff, d = V.separation(s, y)
    assert diff == 9.0 and d == pytest.approx(9.0)          # pooled std of (1,2,3),(10,11,12) = 1
    assert V.separation(np.ones(4), np.array([1, 1, 0, 0], bool)) == (0.0, 0.0)
    assert V.separation(np.array([2, 2, 1, 1.0]), np.array([1, 1, 0, 0], bool))[1] == np.inf


def test_cgi_dm_cause_numbers_come_from_the_scores():
    y = np.r_[np.ones(4), np.zeros(4)].astype(bool)
    cgi = np.array([0.50, 0.52, 0.51, 0.49, 0.50, 0.50, 0.49, 0.51])      # no separation
    masked = np.array([0.9, 0.92, 0.91, 0.93, 0.5, 0.52, 0.51, 0.49])     # separates
    gap = np.array([0.2, 0.2, 0.2, 0.2, 0.1, 0.1, 0.1, 0.1])
    c = V.cgi_dm_cause(cgi, y, masked, "masked-input similarity", baseline_uses_model=False,
                       loss_gap=gap)
    d_m, e_m = V.separation(cgi, y)
    d_b, e_b = V.separation(masked, y)
    assert f"members' mean recovery SSIM minus hold-outs' is {d_m:+.3g} ({e_m:+.2f} pooled " \
           f"std)" in c
    assert f"against {d_b:+.3g} ({e_b:+.2f} std) for masked-input similarity, which uses no " \
           f"model" in c
    assert "(the loss-gap score), members' minus hold-outs', is +0.1 (+inf std)" in c


def test_attribution_cause_rules():
    m = np.array([0.2, 0.3, 0.9, 0.1])
    b = np.array([0.5, 0.5, 0.5, 0.5])                      # m loses on queries 0, 1, 3
    no = np.zeros(4, bool)
    # constant score rows on a losing query come first
    cause, _ = V.attribution_cause("random", m, b, blank=no, off_concept=no,
                                   constant=np.array([0, 0, 0, 1], bool))
    assert cause.startswith("its scores are the same for every training image on 1 of the 3")
    # most losing queries are blank / off-concept generations
    cause, measured = V.attribution_cause("pixel", m, b, blank=np.array([1, 0, 0, 0], bool),
                                          off_concept=np.array([0, 1, 0, 0], bool),
                                          constant=no)
    assert cause.startswith("2 of the 3 test queries on which its AP is lower than pixel's")
    assert "(1 blank, 1 read as another concept" in cause
    # otherwise no cause: what was measured is said
    cause, measured = V.attribution_cause("pixel", m, b, blank=no, off_concept=no, constant=no)
    assert cause is None
    assert measured == ("per-query AP on 4 test queries, lower than pixel's on 3, higher on 1; "
                        "0 of the 3 are blank or off-concept generations")


# ------------------------------------------------------------------ blank generations


def test_blank_mask_by_construction():
    from jaxattrib.data.synthetic import render
    normal = render("star", "red", "gray", size=16)
    white = np.ones((16, 16, 3), np.float32)
    black = -np.ones((16, 16, 3), np.float32)
    faint = white - 0.02 * np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    imgs = np.stack([normal, white, black, faint])
    np.testing.assert_array_equal(I.blank_mask(imgs), [False, True, True, True])
    np.testing.assert_array_equal(I.blank_mask(I.to_uint8(imgs)), [False, True, True, True])
    assert normal.std() > 2 * I.BLANK_STD
    from jaxattrib.runs.demo import example_queries
    np.testing.assert_array_equal(example_queries([1, 2, 3, 0], I.blank_mask(imgs), 2), [0])
    np.testing.assert_array_equal(example_queries([0, 1, 2], np.zeros(4, bool), 2), [0, 1])


def test_long_labels_are_cut_to_their_cell():
    imgs = np.zeros((2, 16, 16, 3), np.float32)
    long = "a/very/long/folder/name/of/training/images/img_000123.png"
    g = I.image_grid(imgs, nrow=2, labels=[long, "x"], upscale=4, pad=0)
    # nothing is drawn in the second cell's label area beyond its own short label
    cell_w = 64
    right = g[64:, cell_w + 12:]                            # past the 'x' of the second label
    assert (right == 255).all()
    from PIL import ImageDraw
    d = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    cut = I.fit_label(d, long, I._font(), 62)
    assert cut.startswith("..") and long.endswith(cut[2:]) and d.textlength(cut, I._font()) <= 62


# ------------------------------------------------------------------ ROC plot


def test_roc_baseline_on_the_border_stays_visible():
    f = np.array([0.0, 0.5, 1.0])
    t = np.array([0.0, 0.5, 1.0])
    perfect = (np.array([0.0, 0.0, 1.0]), np.array([0.0, 1.0, 1.0]))   # the left and top border
    with_base = _png(P.roc_curve_png({"method": (f, t), "baseline": perfect}))
    alone = _png(P.roc_curve_png({"method": (f, t)}))
    # the baseline's colour (matplotlib's second: orange) is drawn along the top border
    orange = np.all(np.abs(with_base.astype(int) - [255, 127, 14]) < 40, axis=-1)
    top_rows = orange[:80].sum()
    assert top_rows > 100 and not np.all(np.abs(alone.astype(int) - [255, 127, 14]) < 40,
                                         axis=-1).any()


# ------------------------------------------------------------------ the demo's report


def _demo_inputs(tmp_path, *, blank_query: int | None, dtrak_good: bool):
    from jaxattrib.data.synthetic import render
    held = [{"shape": "star", "color": "red"}, {"shape": "circle", "color": "blue"}]
    per = 4                                             # queries per concept; half validate
    rng = np.random.default_rng(0)
    q_img, q_con, prompts = [], [], []
    for c, h in enumerate(held):
        for j in range(per):
            q_img.append(render(h["shape"], h["color"], "gray", size=16, rng=rng,
                                position_jitter=0.1))
            q_con.append(c)
            prompts.append(f"a {h['color']} {h['shape']} on a gray background")
    q_img = np.stack(q_img).astype(np.float32)
    if blank_query is not None:
        q_img[blank_query] = 1.0                        # all white
    t_img, t_con = [], []
    for c, h in enumerate(held):
        for j in range(3):
            t_img.append(render(h["shape"], h["color"], "black", size=16, rng=rng,
                                position_jitter=0.1))
            t_con.append(c)
    for j in range(4):
        t_img.append(render("square", "green", "white", size=16, rng=rng))
        t_con.append(-1)
    train = {"images": np.stack(t_img).astype(np.float32), "concept": np.array(t_con)}
    queries = {"images": q_img, "concept": np.array(q_con), "prompts": np.array(prompts)}
    relevant = queries["concept"][:, None] == train["concept"][None, :]
    from jaxattrib.attribution.methods import method_scores
    good = relevant + 0.01 * rng.random(relevant.shape)
    scores = {"dtrak": (good if dtrak_good else -good).astype(np.float32),
              "pixel": method_scores("pixel", q_img, train["images"]),
              "random": method_scores("random", q_img, train["images"], seed=0)}
    config = ml_collections.ConfigDict({"attribution": {"topk": 3},
                                        "report": {"show_queries": 8},
                                        "generate": {"per_concept": per}})
    return config, train, queries, scores, held


def _section(run, name):
    return json.loads((run / "results" / f"{name}.json").read_text())


def test_demo_report_flags_blank_generation_and_explains_the_loser(tmp_path):
    from jaxattrib.runs import demo
    config, train, queries, scores, held = _demo_inputs(tmp_path, blank_query=2,
                                                        dtrak_good=False)
    metrics_before = {m: s.copy() for m, s in scores.items()}
    summary = demo.report_stage(tmp_path, config, train, queries, scores,
                                {"shape": 1.0, "color": 1.0}, held)
    for m, s in scores.items():                         # reporting changes no number
        np.testing.assert_array_equal(s, metrics_before[m])
    gens = _section(tmp_path, "generations")
    assert gens["metrics"]["blank generations"] == 1 and "(query 2)" in gens["text"]
    # test queries are 2, 3 (concept 0) and 6, 7: the blank query 2 is never an example
    topk = _section(tmp_path, "topk")
    shown = sorted(int(re.search(r"_(\d{3})\.png", i["path"]).group(1)) for i in topk["images"])
    assert shown == [3, 6, 7] and "1 blank test generation(s) skipped" in topk["text"]
    # the blank cell is framed red in the generations grid; the others are not
    grid = np.asarray(Image.open(tmp_path / "results" / "generations.png").convert("RGB"))
    red = np.all(grid == I.RED, axis=-1)
    cell = grid.shape[1] // 4
    assert red[:, 2 * cell:3 * cell].any() and not red[:, :2 * cell].any()
    # the sign-flipped D-TRAK loses to random: one sentence with the run's own numbers
    text = _section(tmp_path, "attribution")["text"]
    m, r = summary["dtrak"]["mAP"], summary["random"]["mAP"]
    assert f"dtrak mAP {m:.3f} is below random's {r:.3f}" in text
    assert "pixel mAP" not in text and "random mAP" not in text   # baselines are not explained
    html = (tmp_path / "report.html").read_text()
    assert "blank generations" in html and f"dtrak mAP {m:.3f}" in html


def test_demo_report_has_no_sentence_for_a_winner(tmp_path):
    from jaxattrib.runs import demo
    config, train, queries, scores, held = _demo_inputs(tmp_path, blank_query=None,
                                                        dtrak_good=True)
    scores["pixel"] = -scores["dtrak"]                  # a baseline that loses
    summary = demo.report_stage(tmp_path, config, train, queries, scores,
                                {"shape": 1.0, "color": 1.0}, held)
    assert summary["dtrak"]["mAP"] > summary["pixel"]["mAP"]
    text = _section(tmp_path, "attribution")["text"]
    assert "is below" not in text and "level with" not in text
    assert _section(tmp_path, "generations")["metrics"]["blank generations"] == 0
    assert "topk" in [p.stem for p in (tmp_path / "results").glob("*.json")]
    assert "text" not in _section(tmp_path, "topk")


def _cgi_inputs(separating: str):
    rng = np.random.default_rng(1)
    n1, n0 = 6, 6
    labels = np.r_[np.ones(n1), np.zeros(n0)].astype(bool)
    imgs = rng.uniform(-1, 1, (n1 + n0, 16, 16, 3)).astype(np.float32)
    noise = rng.normal(0, 0.01, n1 + n0)
    sep = 0.5 + 0.3 * labels + noise
    flat = 0.5 + noise
    return {"labels": labels, "threshold": np.float64(0.6),
            "scores": sep if separating == "cgi" else flat,
            "loss_gap": flat.copy(),
            "masked_similarity": sep if separating == "masked" else flat[::-1].copy(),
            "original": imgs, "masked": imgs * 0.5, "recovered": imgs * 0.8}


def test_cgi_dm_section_explains_a_loss_to_its_baseline(tmp_path):
    from jaxattrib.runs import demo
    cg = _cgi_inputs("masked")
    row = demo.cgi_dm_report(tmp_path, cg)
    doc = _section(tmp_path, "cgi_dm")
    auc = {r["method"]: r["AUC"] for r in doc["tables"][0]["rows"]}
    assert row["AUC"] == auc["CGI-DM (SSIM of own recovery)"] < auc["masked-input similarity"]
    d_m, e_m = V.separation(cg["scores"], cg["labels"])
    assert doc["text"].startswith(f"CGI-DM AUC {row['AUC']:.3f} is below masked-input "
                                  f"similarity's {auc['masked-input similarity']:.3f}: ")
    assert f"({e_m:+.2f} pooled std)" in doc["text"] and "which uses no model" in doc["text"]
    # a winning CGI-DM gets no sentence (and the pixel-model section keeps no text)
    demo.cgi_dm_report(tmp_path, _cgi_inputs("cgi"))
    assert "text" not in _section(tmp_path, "cgi_dm")
    demo.cgi_dm_report(tmp_path, _cgi_inputs("cgi"), "VAE latents [8, 8, 4]")
    assert _section(tmp_path, "cgi_dm")["text"].startswith("PGD on VAE latents")


# ------------------------------------------------------------------ `jaxattrib attribute`


def test_attribute_report_shows_each_query_its_top_images_and_scores(tmp_path):
    from jaxattrib.cli import app
    from jaxattrib.runs.attribute import TrainingExamples, _write_attribution_section
    from typer.testing import CliRunner
    rng = np.random.default_rng(0)
    n, q = 6, 3
    train_imgs = rng.uniform(-1, 1, (n, 8, 8, 3)).astype(np.float32)
    ids = np.array([f"images/class_{i}/photo_{i:05d}.png" for i in range(n)])
    train = TrainingExamples({}, "fp", ids, np.array(["c"] * n), train_imgs)
    shown = rng.uniform(-1, 1, (q, 8, 8, 3)).astype(np.float32)
    shown[1] = -1.0                                          # a blank (all black) query
    scores = rng.normal(size=(q, n))
    _write_attribution_section(tmp_path, "dtrak", "qs", scores, ["p0", "p1", "p2"], shown,
                               train, 4, "checkpoint(s) [2]", "query")
    doc = _section(tmp_path, "attribute_dtrak_qs")
    rows = doc["tables"][0]["rows"]
    assert [r["query"] for r in rows] == [0, 1, 2]
    for i, r in enumerate(rows):                              # ids with their scores, best first
        want = ", ".join(f"{ids[j]} ({scores[i, j]:.4g})" for j in np.argsort(-scores[i])[:4])
        assert r["top-4 training ids (score)"] == want
        assert r["blank query"] == (i == 1)
    assert "1 of 3 queries are blank" in doc["text"]
    grid = np.asarray(Image.open(tmp_path / doc["images"][0]["path"]).convert("RGB"))
    one = I.topk_image(shown[0], train_imgs[np.sort(np.argsort(-scores[0])[:4])],
                       np.sort(scores[0])[::-1][:4], k=4)[0]
    assert grid.shape[1] == one.shape[1] and grid.shape[0] >= 3 * one.shape[0]
    # `jaxattrib report RUN` shows the same: scores beside ids in the page, the grid embedded
    r = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert r.exit_code == 0, r.output
    html = (tmp_path / "report.html").read_text()
    assert f"{ids[np.argmax(scores[2])]} ({scores[2].max():.4g})" in html
    assert html.count("data:image/png;base64,") == 1


# ------------------------------------------------------------------ DreamBooth


def test_dreambooth_generations_figure_marks_what_the_classifier_reads(tmp_path):
    from jaxattrib.data.synthetic import SyntheticConceptSpec, render
    from jaxattrib.runs.dreambooth import generations_figure
    spec = SyntheticConceptSpec(size=16)
    concept = {"color": "red", "shape": "square"}
    hit = render("square", "red", "gray", size=16)
    miss = render("circle", "blue", "gray", size=16)
    gen = {"base": np.stack([miss, -np.ones_like(hit)]), "finetuned": np.stack([hit, hit])}
    fig = generations_figure(tmp_path, gen, concept, spec)
    assert fig["path"] == "results/dreambooth_generations.png" and "green = red square" in \
        fig["caption"]
    grid = np.asarray(Image.open(tmp_path / fig["path"]).convert("RGB"))
    # image_grid's layout: pad 2, frame 3, 16 px x 6, two label lines (4 + 2 x 12 px)
    frame = lambda r, c: tuple(grid[2 + r * (96 + 6 + 28 + 2), 2 + c * (96 + 6 + 2)])  # noqa
    assert [frame(0, 0), frame(0, 1)] == [I.RED, I.RED]      # base: a blue circle, an empty one
    assert [frame(1, 0), frame(1, 1)] == [I.GREEN, I.GREEN]  # fine-tuned: two red squares


# ------------------------------------------------------------------ concept-query


def _concept_query_run(tmp_path) -> dict:
    """A run folder with ``data/train.npz`` (7 random 16-px images) and a constructed
    :func:`~jaxattrib.runs.concept_query.concept_query` result for two concepts."""
    from jaxattrib.runs.rundir import save_npz
    rng = np.random.default_rng(0)
    n = 7
    ids = np.array([f"synthetic/{i:04d}" for i in range(n)])
    save_npz(tmp_path / "data" / "train.npz", images=rng.uniform(-1, 1, (n, 16, 16, 3))
             .astype(np.float32), ids=ids, captions=np.array([f"cap {i}" for i in range(n)]))
    queries = []
    for concept in ("red", "star"):
        s = rng.normal(size=n)
        order = np.argsort(-s, kind="stable")[:3]
        queries.append({"concept": concept, "negative": "x", "scores": s,
                        "top": [{"rank": r + 1, "index": int(i), "id": str(ids[i]),
                                 "caption": f"cap {i}", "score": float(s[i])}
                                for r, i in enumerate(order)]})
    image = rng.uniform(-1, 1, (16, 16, 3)).astype(np.float32)
    return {"image": image, "encoding": "pixels (no VAE)", "queries": queries}


def test_concept_query_section_shows_query_top_images_and_scores(tmp_path):
    from jaxattrib.report.html import render_run_report
    from jaxattrib.runs.concept_query import write_query_section
    res = _concept_query_run(tmp_path)
    queries, image = res["queries"], res["image"]
    path = write_query_section(tmp_path, "a red star", res)
    doc = json.loads(path.read_text())
    rows = doc["tables"][0]["rows"]
    assert [(r["concept"], r["rank"], r["id"]) for r in rows] == [
        (q["concept"], t["rank"], t["id"]) for q in queries for t in q["top"]]
    assert [r["score"] for r in rows] == [t["score"] for q in queries for t in q["top"]]
    grid = np.asarray(Image.open(tmp_path / doc["images"][0]["path"]).convert("RGB"))
    one = I.topk_image(image, np.zeros((3, 16, 16, 3), np.float32), np.arange(3.0), k=3,
                       labels=["a", "b", "c"], query_label="query\n'red'")[0]
    assert grid.shape == (2 * one.shape[0], one.shape[1], 3)     # one row per concept
    # the query image is the first cell of each row
    np.testing.assert_array_equal(grid[7:7 + 6 * 16:6, 7:7 + 6 * 16:6], I.to_uint8(image))
    # the same query again replaces its section; another one adds a section
    assert write_query_section(tmp_path, "a red star", res) == path
    assert write_query_section(tmp_path, "a red star!", res) != path
    html = render_run_report(tmp_path).read_text()
    assert html.count("Concept query:") == 2 and f"{queries[1]['top'][0]['score']:.4g}" in html


def test_cli_concept_query_writes_its_report_section(tmp_path, monkeypatch):
    """The command prints the ranking, then adds its section and renders RUN/report.html (the
    Concept-TRAK computation itself is stubbed: it is tested in test_concept_benchmark)."""
    from typer.testing import CliRunner
    from jaxattrib.cli import app
    from jaxattrib.runs import concept_query as cq
    res = _concept_query_run(tmp_path)
    seen = {}

    def fake(run_dir, prompt, concepts, *, seed, image, topk):
        seen.update(prompt=prompt, concepts=list(concepts), image=image)
        return {**res, "image": image}
    monkeypatch.setattr(cq, "concept_query", fake)
    png = tmp_path / "q.png"
    Image.fromarray(I.to_uint8(res["image"])).save(png)
    r = CliRunner().invoke(app, ["concept-query", str(tmp_path), "-p", "a red star", "-c", "red",
                                 "-c", "star", "--image", str(png)])
    assert r.exit_code == 0, r.output
    assert seen["concepts"] == ["red", "star"] and f"report: {tmp_path / 'report.html'}" in \
        r.output
    html = (tmp_path / "report.html").read_text()
    assert "Concept query: a red star" in html and html.count("data:image/png;base64,") == 1
