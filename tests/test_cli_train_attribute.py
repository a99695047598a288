"""`jaxattrib train` → `attribute` → `report` on a tiny pixel pipeline: resumable training,
D-TRAK/TracIn scores, checkpoint ensembles, option errors, and the run's report."""

import numpy as np


def test_cli_train_then_attribute_resumable(tiny_pipeline_dir, tmp_path):
    """`jaxattrib train` writes a record; rerun resumes (no new steps); `attribute` scores."""
    from typer.testing import CliRunner
    from jaxattrib.cli import app
    run = tmp_path / "run"
    args = ["train", "finetune_folder", "--run-dir", str(run), "--no-progress",
            "--set", f"model='{tiny_pipeline_dir}'", "--set", "data.source=digits",
            "--set", "data.size=8", "--set", "data.max_examples=8",
            "--set", "finetune.steps=2", "--set", "finetune.batch_size=4",
            "--set", "finetune.checkpoint_every=1"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "checkpoints [0, 1, 2]" in r.output
    log = (run / "record" / "steps.jsonl").read_text()
    r = CliRunner().invoke(app, args)            # resumes: nothing left to do
    assert r.exit_code == 0 and (run / "record" / "steps.jsonl").read_text() == log
    bad = CliRunner().invoke(app, args[:-2] + ["--set", "finetune.checkpoint_every=2"])
    assert bad.exit_code == 2 and "another config" in bad.output
    q = tmp_path / "q"
    r = CliRunner().invoke(app, ["generate", "--model", str(tiny_pipeline_dir), "-p", "a red",
                                 "-p", "a blue", "--steps", "2", "--out", str(q)])
    assert r.exit_code == 0, r.output
    for method in ("dtrak", "tracin"):
        r = CliRunner().invoke(app, ["attribute", str(run), "--queries", str(q), "--method",
                                     method, "--k", "16", "--timesteps", "2", "--no-progress"])
        assert r.exit_code == 0, r.output
        s = np.load(run / "scores" / f"{method}_q.npy")
        assert s.shape == (2, 8) and np.isfinite(s).all()
    # a checkpoint ensemble scores the mean of its checkpoints' scores (issue 19)
    dtrak = ["attribute", str(run), "--queries", str(q), "--method", "dtrak", "--k", "16",
             "--timesteps", "2", "--no-progress"]
    single = []
    for steps in ("1,", "2,"):
        r = CliRunner().invoke(app, dtrak + ["--checkpoints", steps])
        assert r.exit_code == 0, r.output
        single.append(np.load(run / "scores" / "dtrak_q.npy"))
    r = CliRunner().invoke(app, dtrak + ["--checkpoints", "2"])   # the last 2: steps 1, 2
    assert r.exit_code == 0, r.output
    np.testing.assert_allclose(np.load(run / "scores" / "dtrak_q.npy"), np.mean(single, 0),
                               rtol=1e-5, atol=1e-6 * np.abs(single).max())
    assert not np.allclose(single[0], single[1])
    r = CliRunner().invoke(app, dtrak + ["--checkpoints", "2,5"])
    assert r.exit_code == 2 and "no checkpoint at step(s) [5]" in r.output
    r = CliRunner().invoke(app, dtrak + ["--checkpoints", "last"])
    assert r.exit_code == 2 and "--checkpoints='last'" in r.output
    # the stores were made with the default noise ('shared'): another mode is refused
    r = CliRunner().invoke(app, dtrak + ["--noise", "per_position"])
    assert r.exit_code == 2 and "noise='shared'" in r.output, r.output
    r = CliRunner().invoke(app, dtrak + ["--noise", "fresh"])     # not a choice: click refuses
    assert r.exit_code == 2 and "Invalid value for '--noise'" in r.output, r.output
    r = CliRunner().invoke(app, ["attribute", str(run), "--queries", str(tmp_path / "none")])
    assert r.exit_code == 2 and "no PNG query images" in r.output
    # the run's report shows images and scores: the training section (loss per checkpoint from
    # logs/train.log, training images) and the attribution sections (top-k grids with scores)
    r = CliRunner().invoke(app, ["report", str(run)])
    assert r.exit_code == 0, r.output
    html = (run / "report.html").read_text()
    import re
    logged = re.findall(r"checkpoint (\d+) saved \(loss ([^,]+),", (run / "logs" / "train.log")
                        .read_text())
    assert {int(s) for s, _ in logged} == {1, 2}
    assert "Training run" in html and f"{float(logged[-1][1]):.4g}" in html
    for pic in ("train_loss.png", "train_images.png", "attribute_dtrak_q_topk.png",
                "attribute_tracin_q_topk.png"):
        assert (run / "results" / pic).is_file(), pic
    assert html.count("data:image/png;base64,") >= 4
    assert "digits/" in html                                  # training ids and captions
