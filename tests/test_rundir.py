"""Run directories: a run directory refuses another config once something is computed
(jaxattrib.runs.rundir), and the recorded base model resumes after the checkout moves
(jaxattrib.runs.demo.base_model_ref)."""

import pytest

from jaxattrib.config import ConfigError, apply_overrides, load_config
from jaxattrib.train import base_model as bm


def test_demo_refuses_run_dir_with_other_config(tmp_path):
    from jaxattrib.runs.rundir import check_run_config
    c = load_config("demo")
    check_run_config(tmp_path, c)
    check_run_config(tmp_path, c)  # same config: fine
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.npz").write_bytes(b"x")  # something computed
    with pytest.raises(ConfigError, match="finetune"):
        check_run_config(tmp_path, apply_overrides(c, ["finetune.steps=1"]))


def test_record_names_embedded_base_model_independently_of_the_checkout(tmp_path):
    """A demo/benchmark run directory must resume after the checkout (or the run) moves: the
    embedded base model is recorded as 'embedded', not by its absolute path; records written
    with another checkout's asset path keep resuming; a user's folder stays a path."""
    from jaxattrib.runs.demo import base_model_ref
    from jaxattrib.train.record import TrajectoryRecord
    rec_dir = tmp_path / "record"
    assert base_model_ref(str(bm.ASSET_DIR), rec_dir) == "embedded"
    assert base_model_ref(str(tmp_path / "mine"), rec_dir) == str(tmp_path / "mine")
    old = "/elsewhere/checkout/jaxattrib/assets/base_model"
    TrajectoryRecord.create(rec_dir, {"model": {"base_model": old}})
    ref = base_model_ref(str(bm.ASSET_DIR), rec_dir)
    assert ref == old
    TrajectoryRecord.create(rec_dir, {"model": {"base_model": ref}})   # reopens, no mismatch
    # a record of a user's model is not silently taken for the embedded one
    other = tmp_path / "other"
    TrajectoryRecord.create(other, {"model": {"base_model": "/data/my_model"}})
    assert base_model_ref(str(bm.ASSET_DIR), other) == "embedded"


def test_added_fields_apply_only_to_configs_that_have_them(tmp_path):
    """The cgi-dm command's added fields (``data.vae_posterior`` ...) are filled into an older
    stored config only where the current config has them: the CGI-DM benchmark shares the
    list, and its ``data`` section has no ``vae_posterior``, so a rerun of the same benchmark
    config must resume (it was refused: 'fields ['data'] differ')."""
    from jaxattrib.runs.cgi_dm import CGI_ADDED_FIELDS
    from jaxattrib.runs.rundir import check_run_config
    c = load_config("cgi_dm_benchmark:smoke")
    assert "vae_posterior" not in c.data
    check_run_config(tmp_path, c, added=CGI_ADDED_FIELDS)
    (tmp_path / "scores").mkdir()
    (tmp_path / "scores" / "baselines.npz").write_bytes(b"x")      # something computed
    check_run_config(tmp_path, c, added=CGI_ADDED_FIELDS)          # same config: resumes
    with pytest.raises(ConfigError, match="data"):
        check_run_config(tmp_path, apply_overrides(c, ["data.members=3"]), added=CGI_ADDED_FIELDS)
