"""`jaxattrib info` and `jaxattrib generate` on a tiny pixel pipeline, and a missing folder
refused with exit 2."""

import numpy as np


def test_cli_info_generate_and_errors(tiny_pipeline_dir, tmp_path):
    from typer.testing import CliRunner
    from jaxattrib.cli import app
    r = CliRunner().invoke(app, ["info", str(tiny_pipeline_dir)])
    assert r.exit_code == 0, r.output
    assert "unet:" in r.output and "pixel space" in r.output
    r = CliRunner().invoke(app, ["generate", "--model", str(tiny_pipeline_dir), "-p", "a red circle",
                                 "--num", "2", "--steps", "3", "--out", str(tmp_path / "g"),
                                 "--trajectory"])
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "g").glob("*.png"))) == 2
    assert np.load(tmp_path / "g" / "trajectory.npz")["xs"].shape[:2] == (2, 3)
    r = CliRunner().invoke(app, ["info", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "not a directory" in r.output
