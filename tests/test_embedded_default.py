"""What the embedded default being the 32-px latent model (issue 21) means for the commands: the
synthetic concept set a command renders for a model (runs/specs.synthetic_spec: the embedded
model's own, 32 px and 6 backgrounds; a folder's jaxattrib_base.json; else the 16-px pixel
spec), `train`'s data.source='synthetic' following it, and a run directory made with the former
16-px pixel default refused with one clear error. No model is loaded."""

import dataclasses
import json

import pytest

from jaxattrib.config import ConfigError, load_config
from jaxattrib.runs.specs import synthetic_spec
from jaxattrib.train import base_model as bm


def test_embedded_folder_and_fallback_specs(tmp_path):
    emb = bm.spec_from_info(bm.base_model_info())
    assert synthetic_spec("embedded") == synthetic_spec("") == emb
    assert emb.size == 32 and len(emb.backgrounds) == 6            # the latent default
    assert synthetic_spec(str(bm.ASSET_DIR)) == emb
    assert synthetic_spec("embedded", size=16) == dataclasses.replace(emb, size=16)
    # a folder naming its own spec (the 16-px pixel one here)
    own = tmp_path / "own"
    own.mkdir()
    (own / "jaxattrib_base.json").write_text(json.dumps(
        {"data_spec": dataclasses.asdict(bm.data_spec())}))
    assert synthetic_spec(own) == bm.data_spec()
    # a pipeline folder without a spec (a user's SD model): the 16-px pixel spec, as before
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "jaxattrib_base.json").write_text(json.dumps({"note": "test"}))
    assert synthetic_spec(bare) == bm.data_spec() == synthetic_spec(tmp_path / "none")
    (bare / "jaxattrib_base.json").write_text("{not json")
    with pytest.raises(ConfigError, match="jaxattrib_base.json: unreadable"):
        synthetic_spec(bare)


def test_train_synthetic_source_is_the_embedded_models_set():
    """`jaxattrib train finetune_folder`'s defaults (model 'embedded', data.source 'synthetic')
    render the embedded model's 32-px set: its 6 backgrounds, one image per combination."""
    from jaxattrib.data.synthetic import parse_caption
    from jaxattrib.runs.train import load_training_data
    c = load_config("finetune_folder", ["data.max_examples=0"])
    assert c.model == "embedded" and c.data.source == "synthetic" and c.data.size == 32
    src = load_training_data(c)
    emb = bm.spec_from_info(bm.base_model_info())
    assert len(src) == len(emb.combinations()) == 150
    assert {parse_caption(str(t))["background"] for t in src.captions} == set(emb.backgrounds)
    assert src.read([0]).shape == (1, 32, 32, 3)


def test_a_run_made_with_the_16px_pixel_default_is_refused_before_loading(tmp_path,
                                                                           monkeypatch):
    """demo / customization / concept benchmark run directories cache data/train.npz at the
    base model's size: 16-px images under the 32-px embedded model are one ConfigError naming
    the file, both sizes and the way back, before any model is loaded; a run at the right size
    (or with no data yet) passes the check."""
    import numpy as np

    from jaxattrib.runs import demo
    from jaxattrib.runs.rundir import save_npz

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the run directory was checked")
    monkeypatch.setattr(bm, "load_base_model", refuse)
    c = load_config("demo")
    run = tmp_path / "old"
    (run / "data").mkdir(parents=True)
    save_npz(run / "data" / "train.npz", images=np.zeros((2, 16, 16, 3), np.float32))
    with pytest.raises(ConfigError) as e:
        demo.open_base_run(run, c)
    msg = str(e.value)
    assert "train.npz: images are 16x16 px but the embedded base model takes 32x32" in msg
    assert "python -m jaxattrib.train.base_model --out DIR" in msg and "\n" not in msg
    ok = tmp_path / "new"
    (ok / "data").mkdir(parents=True)
    save_npz(ok / "data" / "train.npz", images=np.zeros((2, 32, 32, 3), np.float32))
    for d in (ok, tmp_path / "empty"):
        with pytest.raises(AssertionError, match="model was loaded"):   # the check passed
            demo.open_base_run(d, c)


def test_concept_query_on_a_16px_run_is_refused_before_loading(tmp_path, monkeypatch):
    """`jaxattrib concept-query` on a Concept-TRAK run made with the former 16-px default."""
    import numpy as np

    from jaxattrib.runs.concept_query import concept_query
    from jaxattrib.runs.rundir import save_npz

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the run directory was checked")
    monkeypatch.setattr(bm, "load_base_model", refuse)
    run = tmp_path / "ct"
    (run / "data").mkdir(parents=True)
    (run / "record").mkdir()
    (run / "config.json").write_text(load_config("concept_trak:smoke").to_json())
    save_npz(run / "data" / "train.npz", images=np.zeros((2, 16, 16, 3), np.float32))
    with pytest.raises(ConfigError, match="images are 16x16 px but the embedded base model "
                                          "takes 32x32"):
        concept_query(run, "a red circle on a black background", ["red"], seed=0)
