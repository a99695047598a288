"""The base model's pretraining entry point (``python -m jaxattrib.train.base_model``)."""

from pathlib import Path

from jaxattrib.train import base_model


def test_main_reports_through_the_configured_jaxattrib_logger(monkeypatch, tmp_path, capsys):
    """main() configures the jaxattrib loggers (an entry point) and logs what it wrote, so the
    line is visible as a script and nothing goes to stdout (no print)."""
    from jaxattrib import logs
    seen = {}

    def fake_pretrain(out, **kw):
        seen.update(kw, out=out)
        return Path(out)
    monkeypatch.setattr(base_model, "pretrain", fake_pretrain)
    try:
        base_model.main(["--out", str(tmp_path / "bm"), "--steps", "7", "--lr", "0.5"])
    finally:
        logs.unconfigure()
    out = capsys.readouterr()
    assert out.out == "" and f"wrote {tmp_path / 'bm'}" in out.err
    assert seen == {"out": str(tmp_path / "bm"), "steps": 7, "batch_size": 32,
                    "learning_rate": 0.5, "seed": 0, "work_dir": None}
