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
