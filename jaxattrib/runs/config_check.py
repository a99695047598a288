"""Config checks shared by the commands: every field is checked before anything is loaded.

Each check raises :class:`~jaxattrib.config.ConfigError` naming the field and what was
expected; :func:`read_run_config` reads a run directory's ``config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path


from jaxattrib.config import ConfigError


DATA_SOURCES = ("synthetic", "folder", "digits", "tfds")


def _field(config, dotted: str, default=None):
    node = config
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            return default
        node = node[part]
    return node


def check_train_config(config, source: str = "config") -> None:
    """Checks a fine-tuning config (``finetune_folder``, ``sd15_lora``, ``sd21`` layout) before
    anything is loaded; raises :class:`ConfigError` naming the field and what was expected.

    Optional fields (``finetune.warmup_steps``, ``lora_alpha``, ``lora_target``, ``precision``,
    ``remat``, ``matmul_precision``, ``model_prediction_type``, ``attribution.*``) are checked
    when present.
    """
    import re

    def bad(field, value, expected):
        raise ConfigError(f"{source}: {field}={value!r}: expected {expected}")

    model = str(_field(config, "model", ""))
    if not model and _field(config, "model_prediction_type") is not None:
        raise ConfigError(f"{source}: model is empty: set --set model=/path/to/a/local/diffusers"
                          f"/folder (nothing is downloaded)")
    d = config.data
    if d.source not in DATA_SOURCES:
        bad("data.source", d.source, " or ".join(repr(x) for x in DATA_SOURCES))
    if d.source == "tfds" and not (_field(d, "name", "") and d.path):
        raise ConfigError(f"{source}: data.source='tfds' needs data.name (a tfds name, e.g. "
                          f"'mnist') and data.path (the data_dir where it was prepared with "
                          f"`tfds build NAME --data_dir DIR --file_format=array_record`)")
    if d.source == "tfds" and not Path(d.path).is_dir():
        bad("data.path", d.path, "an existing folder (the tfds data_dir)")
    if d.source == "folder" and not d.path:
        raise ConfigError(f"{source}: data.path is empty: required for data.source='folder' "
                          f"(a DreamBooth-layout image folder)")
    if d.source == "folder" and not Path(d.path).is_dir():
        bad("data.path", d.path, "an existing folder")
    if not isinstance(d.size, int) or d.size < 1:
        bad("data.size", d.size, "a positive integer (image side in pixels)")
    if not isinstance(d.max_examples, int) or d.max_examples < 0:
        bad("data.max_examples", d.max_examples, "an integer >= 0 (0 = all)")
    f = config.finetune
    for name, lo in (("steps", 0), ("batch_size", 1), ("checkpoint_every", 0),
                     ("lora_rank", 1), ("warmup_steps", 0)):
        v = _field(f, name)
        if v is not None and (not isinstance(v, int) or v < lo):
            bad(f"finetune.{name}", v, f"an integer >= {lo}")
    if not f.learning_rate > 0:
        bad("finetune.learning_rate", f.learning_rate, "a positive number")
    if f.schedule not in ("constant", "cosine", "linear"):
        bad("finetune.schedule", f.schedule, "'constant', 'cosine' or 'linear'")
    if f.mode not in ("full", "lora"):
        bad("finetune.mode", f.mode, "'full' or 'lora'")
    if _field(f, "lora_target") is not None:
        try:
            re.compile(f.lora_target)
        except re.error as e:
            bad("finetune.lora_target", f.lora_target, f"a regular expression ({e})")
    from jaxattrib import precision
    precision.check_fields(f, f"{source}: finetune")
    pt = _field(config, "model_prediction_type")
    if pt is not None and pt not in ("epsilon", "v_prediction", "sample"):
        bad("model_prediction_type", pt, "'epsilon', 'v_prediction' or 'sample'")
    nd = _field(config, "num_devices")
    if nd is not None and (not isinstance(nd, int) or nd < 0):
        bad("num_devices", nd, "an integer >= 0 (0 = every device)")
    if _field(config, "attribution") is not None:
        check_attribution_fields(config.attribution, f"{source}: attribution")


def check_attribution_fields(a, where: str = "attribution") -> None:
    """Checks a D-TRAK-family attribution section (method, params, k, projection, ...)."""
    import re
    from jaxattrib.attribution.diffusion_trak import METHODS
    from jaxattrib.attribution.projection import KINDS
    from jaxattrib.diffusion.losses import NOISE_MODES

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    checks = (("method", lambda v: v in METHODS, f"one of {METHODS}"),
              ("noise", lambda v: v in NOISE_MODES, f"one of {NOISE_MODES}"),
              ("noise_period", lambda v: is_int(v) and v >= 1, "a positive integer"),
              ("checkpoints", lambda v: v is None or (is_int(v) and v >= 1) or (
                  isinstance(v, (list, tuple)) and len(v) > 0 and all(
                      is_int(s) and s >= 0 for s in v)),
               "an int M >= 1 (the last M checkpoints) or a non-empty list of steps"),
              ("projection", lambda v: v in KINDS[:3], f"one of {KINDS[:3]}"),
              ("k", lambda v: isinstance(v, int) and v >= 1, "a positive integer"),
              ("num_timesteps", lambda v: isinstance(v, int) and v >= 1, "a positive integer"),
              ("microbatch", lambda v: isinstance(v, int) and v >= 1, "a positive integer"),
              ("chunk_size", lambda v: isinstance(v, int) and v >= 1, "a positive integer"),
              ("topk", lambda v: isinstance(v, int) and v >= 1, "a positive integer"),
              ("lam_ratio", lambda v: isinstance(v, (int, float)) and v > 0,
               "a positive number"))
    for name, ok, expected in checks:
        if name in a and not ok(a[name]):
            raise ConfigError(f"{where}.{name}={a[name]!r}: expected {expected}")
    from jaxattrib import precision
    precision.check_fields(a, where)
    spec = a["params"] if "params" in a else "all"
    if spec != "all":
        try:
            re.compile(spec)
        except re.error as e:
            raise ConfigError(f"{where}.params={spec!r}: expected 'all' or a regular "
                              f"expression ({e})") from e


def check_pipeline_matches(config, pipe, source: str = "config") -> None:
    """The loaded pipeline's scheduler ``prediction_type`` equals ``model_prediction_type``."""
    want = _field(config, "model_prediction_type")
    got = pipe.scheduler_config.get("prediction_type", "epsilon")
    if want is not None and got != want:
        raise ConfigError(
            f"{source}: model_prediction_type={want!r} but {pipe.folder}/scheduler/"
            f"scheduler_config.json has prediction_type={got!r}; this config is for "
            f"{want!r} models (use the config written for this model, or --set "
            f"model_prediction_type={got!r} if the folder is right)")


def check_data_size(config, pipe, field: str = "data.size") -> None:
    """``data.size`` must be the UNet's sample size × the VAE factor (the pixel side the model
    takes); else one :class:`ConfigError` naming the field and both shapes."""
    from jaxattrib.diffusion.latents import pixel_shape, sample_shape, vae_factor
    size = int(config.data.size)
    want = pixel_shape(pipe.unet_config, pipe.vae_config)
    if (size, size) != want[:2]:
        lat = sample_shape(pipe.unet_config)
        how = (f"the UNet takes {lat[0]}x{lat[1]}x{lat[2]} latents x VAE factor "
               f"{vae_factor(pipe.vae_config)}" if pipe.is_latent else
               f"the pixel-space UNet takes {lat[0]}x{lat[1]}x{lat[2]} images")
        raise ConfigError(f"{field}={size}: images would be {size}x{size}x3 but {pipe.folder} "
                          f"expects {want[0]}x{want[1]}x3 ({how}); set --set "
                          f"{field}={want[0]}")


def read_run_config(path: str | Path) -> dict:
    """A run directory's ``config.json``; unreadable or not a JSON object: :class:`ConfigError`
    saying how to recover."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: unreadable ({e}); this run directory's config is damaged: "
                          f"use a new --run-dir, or --fresh to start over") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object (the run's config); use a new "
                          f"--run-dir, or --fresh to start over")
    return data


__all__ = ["DATA_SOURCES", "check_attribution_fields", "check_data_size", "check_pipeline_matches",
           "check_train_config", "read_run_config"]
