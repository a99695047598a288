"""from_section: each caller's config dataclass is what its hand-written mapping built before
(the expected values below are those mappings, verbatim), so no default changed; and strict
mode names unknown keys."""

import pytest

from jaxattrib import precision
from jaxattrib.authentication.cgi_dm import CGIDMConfig
from jaxattrib.config import fields_from_section, load_config
from jaxattrib.models.lora import TEXT_ATTENTION_TARGET, UNET_ATTENTION_TARGET
from jaxattrib.runs.config_check import _field
from jaxattrib.train.finetune import TrainConfig


def _prec(f):
    return {k: _field(f, k, v) for k, v in precision.DEFAULTS.items()}


@pytest.mark.parametrize("name", ["finetune_folder", "sd15_lora", "sd21"])
def test_train_command(name):
    config = load_config(name)
    f = config.finetune
    old = TrainConfig(steps=f.steps, batch_size=f.batch_size, learning_rate=f.learning_rate,
                      schedule=f.schedule, seed=config.seed, checkpoint_every=f.checkpoint_every,
                      mode=f.mode, lora_rank=f.lora_rank, train_text_encoder=f.train_text_encoder,
                      warmup_steps=_field(f, "warmup_steps", 0),
                      lora_alpha=float(_field(f, "lora_alpha", 4.0)),
                      lora_target=_field(f, "lora_target",
                                         f"{UNET_ATTENTION_TARGET}|{TEXT_ATTENTION_TARGET}"),
                      **_prec(f))
    assert TrainConfig.from_section(f, seed=config.seed,
                                    lora_alpha=float(_field(f, "lora_alpha", 4.0)),
                                    **_prec(f)) == old


@pytest.mark.parametrize("name", ["demo", "concept_trak", "customization"])
def test_demo_finetune_stage(name):
    config = load_config(name)
    f = config.finetune
    old = TrainConfig(steps=f.steps, batch_size=f.batch_size, learning_rate=f.learning_rate,
                      schedule="constant", warmup_steps=0, weight_decay=0.0, seed=config.seed,
                      checkpoint_every=f.checkpoint_every, mode=f.mode, log_every=20)
    assert TrainConfig.from_section(f, schedule="constant", warmup_steps=0, weight_decay=0.0,
                                    seed=config.seed, log_every=20) == old


def test_dreambooth_and_cgi_benchmark():
    config = load_config("dreambooth")
    f = config.finetune
    old = TrainConfig(steps=f.steps, batch_size=f.batch_size, learning_rate=f.learning_rate,
                      schedule=f.schedule, weight_decay=0.0, seed=config.seed,
                      checkpoint_every=f.checkpoint_every, mode=f.mode, lora_rank=f.lora_rank,
                      lora_alpha=float(f.lora_rank), train_text_encoder=f.train_text_encoder,
                      **_prec(f))
    assert TrainConfig.from_section(f, weight_decay=0.0, seed=config.seed,
                                    lora_alpha=float(f.lora_rank), **_prec(f)) == old
    config = load_config("cgi_dm_benchmark")
    f = config.finetune        # holds DreamBooth keys too (prior_loss_weight...): ignored
    old = TrainConfig(steps=f.steps, batch_size=f.batch_size, learning_rate=f.learning_rate,
                      schedule="constant", weight_decay=0.0, seed=config.seed,
                      checkpoint_every=f.steps, mode=f.mode, lora_rank=f.lora_rank,
                      lora_alpha=float(f.lora_rank))
    assert TrainConfig.from_section(f, schedule="constant", weight_decay=0.0, seed=config.seed,
                                    checkpoint_every=f.steps,
                                    lora_alpha=float(f.lora_rank)) == old


def test_cgi_dm_config():
    c = load_config("demo").cgi_dm    # enabled, batch_size, calibration_fpr are not fields
    assert CGIDMConfig.from_section(c) == CGIDMConfig(num_steps=c.num_steps, t_min=c.t_min,
                                                      t_max=c.t_max)
    for name in ("cgi_dm", "cgi_dm_benchmark"):
        cgi = load_config(name).cgi
        assert CGIDMConfig.from_section(cgi, strict=True) == CGIDMConfig(**cgi.to_dict())
    with pytest.raises(TypeError, match=r"CGIDMConfig: not a field: .*'enabled'"):
        CGIDMConfig.from_section(c, strict=True)
    assert fields_from_section(CGIDMConfig, {"num_steps": 3, "x": 1}, num_steps=5) == \
        {"num_steps": 5}


# ----------------------------------------------------------------------------- attribution

def _nondefault(cls, choices: dict) -> dict:
    """A value != the default for every field of ``cls`` (valid ones for the checked fields)."""
    import dataclasses
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in choices:
            out[f.name] = choices[f.name]
        elif isinstance(f.default, bool):
            out[f.name] = not f.default
        elif isinstance(f.default, (int, float)):
            out[f.name] = f.default + 3
        else:
            out[f.name] = f.default + "-x"
    return out


def test_attribution_config_every_field_defaults_and_strict():
    import dataclasses

    from jaxattrib.attribution.diffusion_trak import AttributionConfig
    section = _nondefault(AttributionConfig, {
        "method": "trak", "timestep_strategy": "random", "projection": "sjlt",
        "precision": "bfloat16", "remat": "full", "matmul_precision": "highest",
        "noise": "per_example"})
    got = AttributionConfig.from_section(section, strict=True)
    assert dataclasses.asdict(got) == section                     # every field round-trips
    assert all(getattr(got, n) != getattr(AttributionConfig(), n) for n in section)
    assert AttributionConfig.from_section({}) == AttributionConfig()     # the defaults
    a = load_config("demo").attribution
    with pytest.raises(TypeError, match=r"AttributionConfig: not a field: .*'lambda_ratios'"):
        AttributionConfig.from_section(a, strict=True)
    assert AttributionConfig.from_section(a, method="trak").method == "trak"


@pytest.mark.parametrize("name", ["demo", "customization", "customization:smoke",
                                  "concept_trak", "concept_trak:smoke"])
@pytest.mark.parametrize("method", ["trak", "dtrak", "tracin"])
def test_attribution_config_of_the_demo_and_concept_benchmark(name, method):
    """runs/demo_attribute._candidate_scores and eval/concept_benchmark._trak_family_features
    (same mapping), also for a stored run config made before ``attribution.noise``."""
    from jaxattrib.attribution import diffusion_trak as dt
    a = load_config(name).attribution
    for sec in (a, {k: v for k, v in a.items() if k != "noise"}):
        old = dt.AttributionConfig(method=method, k=sec["k"], num_timesteps=sec["num_timesteps"],
                                   params=sec["params"], projection=sec["projection"],
                                   microbatch=sec["microbatch"],
                                   noise=sec.get("noise", "shared"))
        assert dt.AttributionConfig.from_section(
            sec, method=method, noise=sec.get("noise", "shared")) == old


@pytest.mark.parametrize("spec", ["lds", "lds:finetune_fit_smoke"])
def test_attribution_config_of_the_lds_benchmark(spec):
    """benchmarks/lds.py's ``features``."""
    from jaxattrib.attribution import diffusion_trak as dt
    cfg = load_config(spec)
    ac = cfg.attribution
    noise = ac.get("noise", "shared")
    for method in ("trak", "dtrak", "journey-trak", "tracin"):
        old = dt.AttributionConfig(method=method, output="square", k=ac.k,
                                   num_timesteps=ac.num_timesteps, projection=ac.projection,
                                   params=ac.params, microbatch=ac.microbatch,
                                   noise_seed=cfg.seed, noise=noise)
        assert dt.AttributionConfig.from_section(ac, method=method, noise_seed=cfg.seed,
                                                 noise=noise) == old


def test_concept_trak_config_every_field_defaults_and_strict():
    from jaxattrib.attribution.concept_trak_features import SECTION_KEYS, ConceptTRAKConfig
    section = {"k": 64, "concept_params": "attn1", "projection": "sjlt",
               "concept_inversion_steps": 20, "concept_scale": 2.5,
               "concept_num_timesteps": 4, "microbatch": 3,
               "concept_inversion_guidance": 7.5, "concept_query_pairs": "trajectory",
               "concept_query_eta": 0.3}
    assert set(section) == set(SECTION_KEYS.values())
    got = ConceptTRAKConfig.from_section(section, strict=True)
    assert {f: getattr(got, f) for f in SECTION_KEYS} == {
        f: section[k] for f, k in SECTION_KEYS.items()}
    assert all(getattr(got, f) != getattr(ConceptTRAKConfig(), f) for f in SECTION_KEYS)
    # the section's own num_timesteps is D-TRAK's: not read; every other field: the default
    assert ConceptTRAKConfig.from_section({"num_timesteps": 2, "noise_seed": 5}) == \
        ConceptTRAKConfig()
    assert ConceptTRAKConfig.from_section({}) == ConceptTRAKConfig()
    with pytest.raises(TypeError, match=r"ConceptTRAKConfig: not a field: .*'num_timesteps'"):
        ConceptTRAKConfig.from_section({"k": 8, "num_timesteps": 2}, strict=True)
    # every override field is still a real field
    for overrides in ({"proj_seed": 3}, {"normalize": False}):
        assert ConceptTRAKConfig.from_section(section, **overrides) == \
            ConceptTRAKConfig(**{**{f: section[k] for f, k in SECTION_KEYS.items()},
                                 **overrides})
    with pytest.raises(TypeError, match="keys names no field"):
        fields_from_section(ConceptTRAKConfig, {}, keys={"nope": "k"})


@pytest.mark.parametrize("spec", ["concept_trak", "concept_trak:smoke"])
def test_concept_query_config(spec):
    """runs/concept_query.concept_trak_config: the benchmark config's mapping, verbatim."""
    from jaxattrib.attribution import concept_trak as ct
    from jaxattrib.runs.concept_query import concept_trak_config
    config = load_config(spec)
    a = config.attribution
    old = ct.ConceptTRAKConfig(proj_dim=a.k, param_spec=a.concept_params,
                               proj_kind=a.projection, inversion_steps=a.concept_inversion_steps,
                               concept_scale=a.concept_scale,
                               num_timesteps=a.concept_num_timesteps, microbatch=a.microbatch,
                               proj_seed=config.seed)
    assert concept_trak_config(config) == old


@pytest.mark.parametrize("spec", ["demo", "customization", "customization:smoke"])
def test_concept_trak_config_of_the_demo(spec):
    """runs/demo_attribute._concept_trak_candidates: the configs it runs on (demo,
    customization) set no concept_params / concept_scale / concept_num_timesteps, so the
    section gives what the hand mapping (param_spec 'attn2', the rest default) gave."""
    from jaxattrib.attribution import concept_trak as ct
    a = load_config(spec).attribution
    old = ct.ConceptTRAKConfig(proj_dim=a.k, param_spec="attn2", proj_kind=a.projection,
                               inversion_steps=a.concept_inversion_steps,
                               microbatch=a.microbatch)
    assert ct.ConceptTRAKConfig.from_section(a) == old


def test_launch_train_config():
    from jaxattrib.launch import _train_config
    for spec in ("featurize_digits", "featurize_digits:tiny"):
        config = load_config(spec)
        t = config.train
        old = TrainConfig(steps=int(t.steps), batch_size=int(t.batch_size),
                          learning_rate=float(t.learning_rate),
                          checkpoint_every=int(t.checkpoint_every), seed=int(t.seed),
                          mode="full", schedule="constant", warmup_steps=0)
        assert _train_config(config) == old


def test_source_zoo_fine_tuning_sections():
    """eval/source_zoo's ``tuner``: the source, zoo and reference sections of
    ``source_model:zoo`` (the zoo's n_train, rhos, ... are not TrainConfig fields)."""
    for spec in ("source_model:zoo", "source_model:smoke"):
        config = load_config(spec)
        for name in ("source", "zoo", "reference"):
            if name not in config:
                continue
            c = config[name]
            old = TrainConfig(steps=int(c.steps), batch_size=int(c.batch_size),
                              learning_rate=float(c.learning_rate), checkpoint_every=0)
            assert TrainConfig.from_section(c, checkpoint_every=0) == old
