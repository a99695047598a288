"""Tests of jaxattrib.report: image grids, PNG plots, the HTML builder, run-dir rendering and a
headless-Chromium screenshot of a written report."""

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxattrib import metrics as M
from jaxattrib.report import html as H
from jaxattrib.report import images as I
from jaxattrib.report import plots as P

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")


def _decode_png(data: bytes) -> np.ndarray:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _data_uris(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def _images(n=6, h=8, w=8, seed=0):
    return np.tanh(np.random.default_rng(seed).normal(size=(n, h, w, 3)))


# ------------------------------------------------------------------ images


def test_to_uint8_mapping_and_types():
    x = np.array([-1.0, -0.5, 0.0, 0.5, 1.0, 3.0, -7.0]).reshape(1, 7, 1)
    np.testing.assert_array_equal(I.to_uint8(x).ravel(), [0, 64, 128, 191, 255, 255, 0])
    u = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    assert I.to_uint8(u) is u
    with pytest.raises(TypeError):
        I.to_uint8(np.zeros((2, 2, 3), np.int32))


def test_png_roundtrip_data_uri_and_atomic_save(tmp_path):
    img = I.to_uint8(_images(1, 5, 7)[0])
    data = I.png_bytes(img)
    np.testing.assert_array_equal(_decode_png(data), img)
    uri = I.png_data_uri(img)
    assert uri.startswith("data:image/png;base64,")
    assert base64.b64decode(uri.split(",", 1)[1]) == data
    out = I.save_png(tmp_path / "sub" / "a.png", img)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), img)
    assert sorted(p.name for p in out.parent.iterdir()) == ["a.png"]  # no temp file left
    gray = I.png_bytes(np.zeros((4, 4, 1)))
    np.testing.assert_array_equal(_decode_png(gray), np.full((4, 4, 3), 128, np.uint8))
    with pytest.raises(ValueError, match="not a PNG"):
        I.png_data_uri(b"GIF89a....")


def test_image_grid_layout_by_construction():
    imgs = _images(5, 4, 6)
    u8 = I.to_uint8(imgs)
    up, pad = 3, 2
    grid = I.image_grid(imgs, nrow=3, pad=pad, upscale=up)
    ch, cw = 4 * up, 6 * up
    assert grid.shape == (2 * ch + 3 * pad, 3 * cw + 4 * pad, 3) and grid.dtype == np.uint8
    for k in range(5):
        r, c = divmod(k, 3)
        y0, x0 = pad + r * (ch + pad), pad + c * (cw + pad)
        want = np.repeat(np.repeat(u8[k], up, 0), up, 1)  # nearest-neighbour upscale
        np.testing.assert_array_equal(grid[y0:y0 + ch, x0:x0 + cw], want)
    # The empty sixth cell and the padding are background.
    assert (grid[pad + ch + pad:, pad + 2 * (cw + pad):] == 255).all()
    assert (grid[:pad] == 255).all()
    # Default upscale makes 32-px images >= 96 px.
    assert I.image_grid(_images(2, 32, 32), nrow=2, pad=0).shape[:2] == (96, 192)


def test_image_grid_labels_and_borders():
    imgs = _images(3, 8, 8)
    plain = I.image_grid(imgs, nrow=3, pad=2, upscale=2)
    lab = I.image_grid(imgs, nrow=3, pad=2, upscale=2, labels=["a", "b\nc", "d"],
                       borders=[I.GREEN, None, I.RED], border_width=3)
    assert lab.shape[0] > plain.shape[0]  # room for two text lines
    # Frames: image k's frame is drawn around the image area.
    cw = 16 + 6
    assert tuple(lab[2, 2]) == I.GREEN and tuple(lab[2, 2 + 2 * (cw + 2)]) == I.RED
    assert tuple(lab[2, 2 + (cw + 2)]) == (255, 255, 255)  # None → no frame
    # Text is dark pixels below the images.
    below = lab[2 + cw:, :]
    assert (below.sum(-1) < 200).sum() > 10
    with pytest.raises(ValueError, match="labels"):
        I.image_grid(imgs, labels=["x"])


def test_topk_image_orders_by_score_and_frames_correct():
    imgs = _images(7, 8, 8, seed=1)
    scores = np.array([0.1, 0.9, 0.5, 0.9, -1.0, 0.7, 0.2])
    correct = np.array([0, 1, 0, 0, 0, 1, 0], bool)
    grid, idx = I.topk_image(imgs[0], imgs, scores, k=4, correct=correct, upscale=2)
    np.testing.assert_array_equal(idx, [1, 3, 5, 2])  # tie 1 vs 3 → lower index first
    np.testing.assert_array_equal(idx, M.ranking(scores)[:4])
    cw = 16 + 6
    frame_colors = [tuple(grid[4, 4 + j * (cw + 4)]) for j in range(1, 5)]
    assert frame_colors == [I.GREEN, I.RED, I.GREEN, I.RED]
    # The shown cell holds exactly the upscaled training image.
    x0 = 4 + 2 * (cw + 4) + 3
    want = np.repeat(np.repeat(I.to_uint8(imgs[3]), 2, 0), 2, 1)
    np.testing.assert_array_equal(grid[7:7 + 16, x0:x0 + 16], want)


# ------------------------------------------------------------------ plots


def test_plots_are_valid_nonblank_pngs():
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.5
    s = rng.normal(size=300) + y
    f, t, _ = M.roc_curve(s, y)
    roc = _decode_png(P.roc_curve_png({"ours": (f, t)}, "ROC", size=(5, 4.5)))
    assert roc.shape == (450, 500, 3)
    assert roc.std() > 20 and len(np.unique(roc.reshape(-1, 3), axis=0)) > 20
    # The curve is drawn: a different curve gives a different image.
    roc2 = _decode_png(P.roc_curve_png({"ours": (f, f)}, "ROC", size=(5, 4.5)))
    assert (roc != roc2).any(axis=-1).sum() > 200
    logroc = _decode_png(P.roc_curve_png({"a": (f, t)}, "ROC", log_x=True))
    assert logroc.std() > 20
    line = _decode_png(P.line_plot_png([1, 2, 3], {"a": [0.1, 0.4, 0.2], "b": [0.3, np.nan, 0]},
                                       "k", "recall", "Recall@K"))
    hist = _decode_png(P.histogram_png({"member": s[y], "holdout": s[~y]}, threshold=0.5))
    for im in (line, hist):
        assert im.shape == (400, 600, 3) and im.std() > 20
    with pytest.raises(ValueError, match="shape"):
        P.line_plot_png([1, 2], {"a": [1, 2, 3]})


# ------------------------------------------------------------------ HTML builder


def _build_report() -> H.Report:
    rng = np.random.default_rng(0)
    train = np.tanh(rng.normal(size=(12, 32, 32, 3)))
    query = np.clip(train[4] + 0.2 * rng.normal(size=(32, 32, 3)), -1, 1)
    scores = -((train - query) ** 2).mean(axis=(1, 2, 3))
    correct = np.zeros(12, bool)
    correct[[4, 7]] = True
    y = rng.random(400) < 0.5
    s = rng.normal(size=400) + 1.2 * y
    f, t, _ = M.roc_curve(s, y)
    rep = H.Report("Attribution <demo> & checks")
    rep.section("Top-k").topk_grid(query, train, scores, labels=[f"train {i}" for i in range(12)],
                                   correct_mask=correct, k=5)
    rep.section("Metrics").table(
        [{"method": "TRAK", "LDS": 0.2401, "Recall@10": 0.5},
         {"method": "D-TRAK <b>", "LDS": float("nan"), "split": "val"}], caption="Summary")
    rep.metrics({"AUC": M.roc_auc(s, y), "TPR@1%FPR": M.tpr_at_fpr(s, y, 0.01)})
    rep.image(P.roc_curve_png({f"ours (AUC {M.roc_auc(s, y):.3f})": (f, t)}, "ROC"), "ROC curve")
    rep.text("Scores use `sign=-1`.\n\nSecond **paragraph** <script>alert(1)</script>")
    return rep


def test_report_html_self_contained_and_escaped(tmp_path):
    rep = _build_report()
    out = rep.write(tmp_path / "r" / "report.html")
    page = out.read_text(encoding="utf-8")
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.html"]
    assert "http://" not in page and "https://" not in page
    without_images = re.sub(r"data:image/png;base64,[^\"]+", "", page)
    assert "://" not in without_images and "url(" not in without_images  # no external resource
    assert "<script" not in page and "&lt;script&gt;" in page
    assert "Attribution &lt;demo&gt; &amp; checks" in page
    assert "<code>sign=-1</code>" in page and "<b>paragraph</b>" in page
    assert "D-TRAK &lt;b&gt;" in page and ">NaN<" in page and ">0.2401<" in page
    assert "—" in page  # missing cells
    pngs = _data_uris(page)
    assert len(pngs) == 2
    grid = _decode_png(pngs[0])
    assert grid.shape[1] >= 6 * 96  # query + 5 cells, 32-px images enlarged
    assert (np.abs(grid.astype(int) - I.GREEN).sum(-1) == 0).sum() > 100  # green frames drawn


def test_write_result_and_render_run_report(tmp_path):
    run = tmp_path / "run"
    I.save_png(run / "figs" / "roc.png", P.roc_curve_png({"a": ([0, 0.5, 1], [0, 0.8, 1])}))
    I.save_png(run / "figs" / "grid.png", I.image_grid(_images(4), nrow=2))
    H.write_result(run, "b_lds", "LDS section", order=2,
                   metrics={"lds": np.float32(0.25), "ci": np.array([0.2, 0.3]), "bad": np.nan},
                   tables=[{"caption": "sweep", "rows": [{"lambda": 0.1, "lds": 0.2}]}],
                   images=["figs/roc.png", {"path": "figs/grid.png", "caption": "a grid"}],
                   text="computed on **val**")
    H.write_result(run, "a_first", "First section", order=1, metrics={"n": 3})
    doc = json.loads((run / "results" / "b_lds.json").read_text())
    assert doc["metrics"] == {"lds": 0.25, "ci": [0.2, 0.3], "bad": None}
    (run / "config.json").write_text(json.dumps({"seed": 7}))
    out = H.render_run_report(run)
    page = out.read_text()
    assert out == run / "report.html"
    assert page.index("First section") < page.index("LDS section") < page.index("Run configuration")
    assert "a grid" in page and "sweep" in page and "&quot;seed&quot;: 7" in page
    embedded = _data_uris(page)
    assert embedded == [(run / "figs" / "roc.png").read_bytes(),
                        (run / "figs" / "grid.png").read_bytes()]
    assert "http://" not in page and "https://" not in page


@pytest.mark.parametrize("doc, field", [
    ({"metrics": {"a": 1}}, "title"),
    ({"title": "t", "images": ["missing.png"]}, "images"),
    ({"title": "t", "images": ["../outside.png"]}, "images"),
    ({"title": "t", "images": ["/etc/passwd"]}, "images"),
    ({"title": "t", "tables": [{"rows": [1, 2]}]}, "tables[0].rows[0]"),
    ({"title": "t", "metrics": {"m": {"nested": 1}}}, "metrics.m"),
    ({"title": "t", "colour": "red"}, "colour"),
])
def test_render_run_report_rejects_bad_results(tmp_path, doc, field):
    (tmp_path / "results").mkdir()
    bad = tmp_path / "results" / "x.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(H.ReportError) as e:
        H.render_run_report(tmp_path)
    assert str(bad) in str(e.value) and field in str(e.value)
    assert not (tmp_path / "report.html").exists()


def test_render_run_report_rejects_invalid_json_and_missing_folder(tmp_path):
    with pytest.raises(H.ReportError, match="results"):
        H.render_run_report(tmp_path)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "y.json").write_text("{not json")
    with pytest.raises(H.ReportError, match="y.json: not valid JSON"):
        H.render_run_report(tmp_path)


# ------------------------------------------------------------------ headless browser


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium not installed "
                    "(apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    report = _build_report().write(tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    proc = subprocess.run([sys.executable, "-m", "jaxattrib.report.screenshot", str(report),
                           str(shot)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.stat().st_size > 10_000
    px = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert px.shape == (1600, 1200, 3)
    assert px.std() > 20  # not a blank page
    assert len(np.unique(px.reshape(-1, 3), axis=0)) > 200  # images and plots, not just text
    # The embedded top-k grid was decoded and painted: its green frames are on screen.
    assert (np.abs(px - np.array(I.GREEN)).sum(-1) <= 30).sum() > 100


# ------------------------------------------------------------------ a `jaxattrib train` run

def test_training_run_section_from_its_log_and_data(tmp_path):
    """`jaxattrib report` on a training run (no results/ yet): the section shows the losses the
    run logged at its checkpoints (metrics, table, plot) and its training images; a run whose
    data cannot be opened still gets its section, saying why the images are missing."""
    from jaxattrib.data.run_data import write_run_data
    from jaxattrib.data.source import DigitsSource
    from jaxattrib.progress import StageLog
    from jaxattrib.train.report_section import checkpoint_losses, write_training_section
    run = tmp_path / "run"
    assert write_training_section(run) is None           # not a training run
    with StageLog(run, "train", process_index=0) as log:
        log("checkpoint 1 saved (loss 0.5, lr 0.001)")
        log("checkpoint 2 saved (loss 0.25, lr 0.001)")
    with StageLog(run, "train", process_index=0) as log:  # a rerun redoes checkpoint 2
        log("checkpoint 2 saved (loss 0.125, lr 0.001)")
    (run / "record").mkdir()
    (run / "record" / "steps.jsonl").write_text('{"step": 0}\n{"step": 1}\n')
    (run / "config.json").write_text(json.dumps({"finetune": {"steps": 2, "mode": "lora"}}))
    assert checkpoint_losses(run / "logs" / "train.log") == {1: (0.5, 1e-3), 2: (0.125, 1e-3)}
    src = DigitsSource(size=8)
    write_run_data(run, src)
    write_training_section(run)
    doc = json.loads((run / "results" / "train.json").read_text())
    assert doc["metrics"]["steps done"] == 2 and doc["metrics"]["mode"] == "lora"
    assert doc["metrics"]["loss at checkpoint 2"] == 0.125
    assert doc["metrics"]["training examples"] == len(src)
    assert doc["tables"][0]["rows"] == [{"checkpoint": 1, "loss": 0.5, "lr": 0.001},
                                        {"checkpoint": 2, "loss": 0.125, "lr": 0.001}]
    assert doc["tables"][1]["rows"][0] == {"id": str(src.ids[0]), "caption": str(src.captions[0])}
    grid = np.asarray(Image.open(run / "results" / "train_images.png"))
    assert grid.std() > 10                                 # images, not a blank
    html = H.render_run_report(run).read_text()
    assert html.count("data:image/png;base64,") == 2 and "0.125" in html
    (run / "data" / "source.json").write_text("{}")       # the data reference is broken
    write_training_section(run)
    doc = json.loads((run / "results" / "train.json").read_text())
    assert "Training images not shown" in doc["text"] and "loss at checkpoint 2" in doc["metrics"]
