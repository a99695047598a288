"""Packaged experiment configs load, validate, and refuse bad values naming the field."""

from pathlib import Path

import pytest

from jaxattrib.config import ConfigError, apply_overrides, load_config, resolve_config_path

import jaxattrib.configs

# every packaged config module, so a new config cannot be left out of these checks
EXPERIMENTS = tuple(sorted(p.stem for p in Path(jaxattrib.configs.__file__).parent.glob("*.py")
                           if p.stem != "__init__"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_config_loads_and_is_documented(name):
    c = load_config(name)
    assert len(c) > 0
    doc = resolve_config_path(name).read_text().split('"""')[1]
    assert len(doc.split()) > 30, f"{name}: module docstring too short"


def test_sd_configs_sizes_and_prediction_types():
    sd15, sd21 = load_config("sd15_lora"), load_config("sd21")
    assert (sd15.data.size, sd15.model_prediction_type) == (512, "epsilon")
    assert (sd21.data.size, sd21.model_prediction_type) == (768, "v_prediction")
    assert sd15.finetune.mode == sd21.finetune.mode == "lora"
    assert sd15.attribution.params == "attn2" and sd15.attribution.method == "dtrak"
    with pytest.raises(ValueError, match="unknown variant"):
        load_config("sd21:big")


def _train_ok(tmp_path, name="sd15_lora"):
    (tmp_path / "dog").mkdir(exist_ok=True)
    return load_config(name, [f"model={tmp_path}", f"data.path={tmp_path}"])


@pytest.mark.parametrize("override, field", [
    ("model=''", "model is empty"),
    ("data.path=''", "data.path is empty"),
    ("data.path='/nonexistent/x'", "data.path='/nonexistent/x'"),
    ("data.source='web'", "data.source='web'"),
    ("finetune.mode='qlora'", "finetune.mode='qlora'"),
    ("finetune.batch_size=0", "finetune.batch_size=0"),
    ("finetune.lora_rank=0", "finetune.lora_rank=0"),
    ("finetune.learning_rate=-1.0", "finetune.learning_rate=-1.0"),
    ("finetune.lora_target='(('", "finetune.lora_target"),
    ("finetune.precision='float16'", "finetune.precision='float16'.*'bfloat16'"),
    ("finetune.remat='blocks'", "finetune.remat='blocks'.*dots_saveable"),
    ("finetune.matmul_precision='tf32'", "finetune.matmul_precision='tf32'.*highest"),
    ("attribution.precision='fp16'", "attribution.precision='fp16'"),
    ("attribution.remat='all'", "attribution.remat='all'"),
    ("attribution.matmul_precision='low'", "attribution.matmul_precision='low'"),
    ("model_prediction_type='v'", "model_prediction_type='v'"),
    ("attribution.method='magic'", "attribution.method='magic'"),
    ("attribution.projection='dense'", "attribution.projection='dense'"),
    ("attribution.k=0", "attribution.k=0"),
    ("attribution.params='['", "attribution.params='\\['"),
    ("num_devices=-1", "num_devices=-1"),
])
def test_train_config_errors_name_the_field(tmp_path, override, field):
    from jaxattrib.runs.config_check import check_train_config
    c = _train_ok(tmp_path)
    check_train_config(c, "sd15_lora")            # the base is valid
    with pytest.raises(ConfigError, match=field):
        check_train_config(apply_overrides(c, [override]), "sd15_lora")


def _cgi_ok():
    return load_config("cgi_dm", ["model.finetuned=runs/x", "data.candidates=a",
                                  "data.reference=b"])


@pytest.mark.parametrize("override, field", [
    ("model.finetuned=''", "model.finetuned is empty"),
    ("data.reference=''", "data.reference is empty"),
    ("cgi.mask_kind='stripes'", "cgi.mask_kind='stripes'"),
    ("cgi.block=3", "cgi.block=3"),
    ("cgi.keep_rate=2.0", "cgi.keep_rate=2.0"),
    ("cgi.scale='log'", "cgi.scale='log'"),
    ("cgi.project_t=-1", "cgi.project_t=-1; expected an integer >= 0"),
    ("cgi.project_model='vae'", "cgi.project_model='vae'"),
    ("cgi.project_every=0", "cgi.project_every=0; expected an integer >= 1"),
    ("similarity='lpips'", "similarity='lpips'"),
    ("calibration.target='auc'", "calibration.target='auc'"),
    ("calibration.fpr=1.5", "calibration.fpr=1.5"),
    ("batch_size=0", "batch_size=0"),
    ("data.size=-8", "data.size=-8"),
])
def test_cgi_dm_config_errors_name_the_field(override, field):
    from jaxattrib.runs.cgi_dm import check_config
    cgi = check_config(_cgi_ok(), "cgi_dm")
    assert cgi.num_steps == 1000 and cgi.eps_radius == 70.0   # the authors' defaults
    assert cgi.project_t == 0                                # no manifold projection (paper)
    with pytest.raises(ConfigError, match=field):
        check_config(apply_overrides(_cgi_ok(), [override]), "cgi_dm")


def _src_ok():
    return load_config("source_model", ["model.suspects=('runs/a',)",
                                        "key_samples.prompts=('a', 'b', 'c')",
                                        "key_samples.n=2"])


@pytest.mark.parametrize("override, field", [
    ("model.suspects=()", "model.suspects is empty"),
    ("key_samples.prompts=()", "key_samples.prompts and key_samples.prompts_file"),
    ("key_samples.prompts_file='/nonexistent.txt'", "key_samples.prompts_file"),
    ("key_samples.strategy='oracle'", "key_samples.strategy='oracle'"),
    ("key_samples.strategy='generation'", "model.reference is empty"),
    ("key_samples.n=0", "key_samples.n=0"),
    ("decision.metric='l1'", "decision.metric='l1'"),
    ("decision.delta0=0.0", "decision.delta0=0.0"),
    ("decision.delta0='auto'", "decision.delta0='auto'"),
    ("decision.delta0=calibrated", "decision.delta0='calibrated' is chosen on the innocent"),
    ("decision.innocent_hit_rate=0.0", "decision.innocent_hit_rate=0.0"),
    ("decision.fpr=2.0", "decision.fpr=2.0"),
    ("query.seeds=()", "query.seeds"),
    ("query.num_inference_steps=0", "query.num_inference_steps=0"),
])
def test_source_model_config_errors_name_the_field(override, field):
    from jaxattrib.runs.source_model import candidate_prompts, check_config
    check_config(_src_ok(), "source_model")
    assert candidate_prompts(_src_ok()) == ["a", "b", "c"]
    with pytest.raises(ConfigError, match=field):
        check_config(apply_overrides(_src_ok(), [override]), "source_model")
    with pytest.raises(ConfigError, match="key_samples.n=5: only 3"):
        candidate_prompts(apply_overrides(_src_ok(), ["key_samples.n=5"]))


def test_delta0_takes_a_number_or_calibrated():
    """``decision.delta0`` switches between a number and 'calibrated' from the command line;
    other fields keep their type."""
    from jaxattrib.runs.source_model import check_config
    c = apply_overrides(_src_ok(), ["decision.delta0=calibrated", "model.innocent=('runs/b',)"])
    assert c.decision.delta0 == "calibrated"
    check_config(c, "source_model")
    back = apply_overrides(c, ["decision.delta0=1"])
    assert back.decision.delta0 == 1.0 and isinstance(back.decision.delta0, float)
    assert load_config("source_model:zoo").decision.delta0 == "calibrated"
    assert load_config("source_model:zoo", ["decision.delta0=0.15"]).decision.delta0 == 0.15
    with pytest.raises(ConfigError, match="decision.fpr"):
        apply_overrides(_src_ok(), ["decision.fpr=calibrated"])


def test_config_overrides_typed_and_checked():
    c = load_config("demo", ["finetune.steps=7", "attribution.methods=['dtrak']",
                             "finetune.learning_rate=1"])
    assert c.finetune.steps == 7 and c.attribution.methods == ("dtrak",)
    assert isinstance(c.finetune.learning_rate, float)
    with pytest.raises(ConfigError, match="no field 'finetune.stepz'"):
        apply_overrides(c, ["finetune.stepz=3"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides(c, ["finetune.steps"])
    with pytest.raises(ConfigError, match="finetune.steps"):
        apply_overrides(c, ["finetune.steps='many'"])
    with pytest.raises(ConfigError, match="not one of the packaged configs"):
        load_config("no_such_config")
