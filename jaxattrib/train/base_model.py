"""The embedded default base model (where it lives, how it is read) and the 16-px *pixel* model.

The shipped base model (``ASSET_DIR`` = ``jaxattrib/assets/base_model``) is the tiny
Stable-Diffusion-shaped **latent** pipeline of :mod:`jaxattrib.train.latent_base` (issue 21):
a KL VAE (32 px, f = 2, 16×16×4 latents), a UNet over its latents, a 2-layer CLIP text encoder
and a word-level CLIP BPE tokenizer, pretrained on the synthetic concept set with four
(shape, color) combinations withheld, in diffusers' layout with safetensors. It is made by
``python -m jaxattrib.train.latent_base --out jaxattrib/assets/base_model`` (its defaults are
the shipped design); :func:`load_base_model` loads it like any SD folder and
:func:`base_model_info` reads its manifest ``jaxattrib_base.json`` (``data_spec``,
``held_out``, architecture, loss curves, machine).

The former default, a 16-px pixel-space UNet (no VAE), is still defined here: :func:`data_spec`,
:func:`vocabulary`, :func:`model_configs` and :func:`pretrain` (``python -m
jaxattrib.train.base_model --out DIR``, ~1 h on 2 cores) rebuild it for the 16-px comparison
numbers of the benchmark docs, and the tests' tiny random-weight fixtures use its 16-px spec
(``tests/tiny.py``). :func:`save_pipeline` writes either kind of pipeline folder.

[design] Everything here is ours: architecture sizes, data, withheld concepts, schedule, and
the caption dropout (an extra 10% of empty-caption examples, so classifier-free guidance works).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

logger = logging.getLogger(__name__)

ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "base_model"

#: (shape, color) combinations withheld from pretraining: the demo's "new concepts".
HELD_OUT = (
    {"shape": "star", "color": "purple"},
    {"shape": "cross", "color": "yellow"},
    {"shape": "triangle", "color": "green"},
    {"shape": "square", "color": "red"},
)

EXTRA_WORDS = ("with", "stripes", "dots", "sks", "photo", "of", "digit", "handwritten", "the",
               "in", "style", "and")


def data_spec():
    from jaxattrib.data.synthetic import SyntheticConceptSpec
    return SyntheticConceptSpec(shapes=("circle", "square", "triangle", "star", "cross"),
                                colors=("red", "green", "blue", "yellow", "purple"),
                                backgrounds=("black", "white", "gray"), textures=("solid",),
                                size=16, per_combination=12)


def vocabulary(spec) -> list[str]:
    words = ["a", "on", "background"]
    words += list(spec.shapes) + list(spec.colors) + list(spec.backgrounds)
    words += [w for w in EXTRA_WORDS if w not in words]
    words += [str(d) for d in range(10)]
    return list(dict.fromkeys(words))


def model_configs(vocab_size: int, max_length: int = 16):
    from jaxattrib.models.clip_text import CLIPTextConfig
    from jaxattrib.models.unet import tiny_config
    text = CLIPTextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=256,
                          num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=max_length, hidden_act="quick_gelu",
                          projection_dim=64, pad_token_id=None, bos_token_id=vocab_size - 2,
                          eos_token_id=vocab_size - 1)
    # [design] no attention at full resolution (it dominated the step time on CPU).
    unet = tiny_config(block_out_channels=(32, 64, 64), cross_attention_dim=64,
                       norm_num_groups=8, layers_per_block=1, sample_size=16,
                       in_channels=3, out_channels=3, attention_head_dim=4,
                       down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                         "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                       "UpBlock2D"))
    return unet, text


SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001,
    "beta_end": 0.02, "beta_schedule": "linear", "prediction_type": "epsilon",
    "clip_sample": False, "set_alpha_to_one": True, "steps_offset": 0,
    "timestep_spacing": "leading",
}


def save_pipeline(folder, unet_config, unet_params, text_config, text_params,
                  tokenizer_dir, scheduler_config, extra: dict | None = None, *,
                  vae_config=None, vae_params=None) -> Path:
    """Writes a diffusers pipeline folder atomically (temp dir in the same parent + rename):
    pixel-space without ``vae_config``, latent with it (``vae/``, ``AutoencoderKL``).
    ``extra`` becomes ``jaxattrib_base.json`` (the base model's manifest)."""
    from jaxattrib.models import clip_text, unet, vae
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    if vae_config is not None:
        vae.save_pretrained(tmp / "vae", vae_config, vae_params)
    unet.save_pretrained(tmp / "unet", unet_config, unet_params)
    clip_text.save_pretrained(tmp / "text_encoder", text_config, text_params)
    shutil.copytree(tokenizer_dir, tmp / "tokenizer")
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(scheduler_config, indent=2))
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "unet": ["diffusers", "UNet2DConditionModel"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "DDIMScheduler"], "vae": [None, None],
             "safety_checker": [None, None], "feature_extractor": [None, None],
             "requires_safety_checker": False}
    if vae_config is not None:
        index |= {"vae": ["diffusers", "AutoencoderKL"], "image_encoder": [None, None]}
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    if extra is not None:
        (tmp / "jaxattrib_base.json").write_text(json.dumps(extra, indent=2))
    if folder.exists():   # move the old folder aside first: `folder` is never half-written
        old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old."))
        os.replace(folder, old / "x")
        os.replace(tmp, folder)
        shutil.rmtree(old)
    else:
        os.replace(tmp, folder)
    return folder


def load_base_model(folder: str | os.PathLike | None = None):
    """The shipped base model as a :class:`~jaxattrib.models.pipeline.Pipeline` (offline)."""
    from jaxattrib.models.convert import CheckpointError
    from jaxattrib.models.pipeline import load_pipeline
    folder = Path(folder) if folder is not None else ASSET_DIR
    if not (folder / "model_index.json").is_file():
        raise CheckpointError(
            f"{folder}: the embedded base model is missing. Recreate it with "
            f"`python -m jaxattrib.train.latent_base --out {folder}` "
            "(about 1.5-2 hours on 2 CPU cores).")
    return load_pipeline(folder)


def base_model_info(folder: str | os.PathLike | None = None) -> dict:
    """The metadata the pretraining wrote (data spec, held-out concepts, steps, final loss)."""
    folder = Path(folder) if folder is not None else ASSET_DIR
    return json.loads((folder / "jaxattrib_base.json").read_text())


def spec_from_info(info: dict, **overrides):
    """The :class:`~jaxattrib.data.synthetic.SyntheticConceptSpec` a base model was pretrained
    on, from its :func:`base_model_info` (JSON lists back to tuples), with ``overrides``
    (e.g. ``per_combination``) applied."""
    from jaxattrib.data.synthetic import SyntheticConceptSpec
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in info["data_spec"].items()}
    return SyntheticConceptSpec(**(fields | overrides))


def pretrain(out: str | os.PathLike, *, steps: int = 4000, batch_size: int = 32,
             learning_rate: float = 1e-3, seed: int = 0, work_dir: str | None = None,
             progress: bool = True) -> Path:
    """Pretrains the 16-px pixel base model from scratch and writes it to ``out`` (a pipeline
    folder; no longer the shipped default, see the module docstring).

    Resumable: the training run's trajectory record lives in ``work_dir`` (default
    ``out + '.work'``); rerunning continues from its last checkpoint.
    """
    import dataclasses

    from jaxattrib import parallel
    from jaxattrib.data.synthetic import make_synthetic
    from jaxattrib.diffusion.schedule import schedule_from_diffusers_config
    from jaxattrib.models import clip_text, unet
    from jaxattrib.models.tokenizer import CLIPTokenizer, build_word_tokenizer
    from jaxattrib.train.diffusion_task import make_diffusion_loss
    from jaxattrib.train.finetune import TrainConfig, finetune

    out = Path(out)
    work = Path(work_dir) if work_dir else out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    spec = data_spec()
    ds = make_synthetic(spec, seed=seed, withhold=HELD_OUT)
    max_len = 16
    tok_dir = build_word_tokenizer(vocabulary(spec), work / "tokenizer",
                                   model_max_length=max_len)
    tok = CLIPTokenizer.from_folder(tok_dir)
    unet_config, text_config = model_configs(tok.vocab_size, max_len)
    key = jax.random.PRNGKey(seed)
    params = {"unet": unet.init_params(unet_config, jax.random.fold_in(key, 1)),
              "text_encoder": clip_text.init_params(text_config, jax.random.fold_in(key, 2))}
    sched = schedule_from_diffusers_config(SCHEDULER_CONFIG)
    loss_fn = make_diffusion_loss(unet_config, text_config, sched, train_text_encoder=True)

    n = len(ds)
    n_uncond = n // 10                        # caption dropout as extra empty-caption examples
    ids = tok(list(ds.captions), max_length=max_len)
    empty = tok([""], max_length=max_len)[0]
    images = np.asarray(ds.images)

    def get_batch(indices):
        indices = np.asarray(indices)
        src = indices % n
        batch_ids = ids[src].copy()
        batch_ids[indices >= n] = empty
        return {"images": images[src], "input_ids": batch_ids}

    config = TrainConfig(steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                         schedule="cosine", warmup_steps=min(200, steps // 10),
                         final_lr_fraction=0.05, weight_decay=0.0, grad_clip_norm=1.0,
                         seed=seed, checkpoint_every=max(1, steps // 10),
                         train_text_encoder=True, log_every=25)
    t0 = time.time()
    trained, record = finetune(loss_fn, params, n + n_uncond, get_batch, config, work / "record",
                               mesh=parallel.make_mesh(1), progress=progress,
                               model_info={"unet": unet_config.to_diffusers(),
                                           "text_encoder": text_config.to_transformers()},
                               dataset_info={"fingerprint": ds.fingerprint(), "size": n})
    record.close()
    extra = {"data_spec": dataclasses.asdict(spec), "seed": seed, "held_out": list(HELD_OUT),
             "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate,
             "train_examples": n, "uncond_examples": n_uncond,
             "wall_seconds_this_run": round(time.time() - t0, 1)}
    return save_pipeline(out, unet_config, trained["unet"], text_config,
                         trained["text_encoder"], tok_dir, SCHEDULER_CONFIG, extra)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True,
                   help="pipeline folder to write (the shipped default is the latent model "
                        "of `python -m jaxattrib.train.latent_base`)")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=None)
    a = p.parse_args(argv)
    from jaxattrib.logs import configure
    configure(0)                     # an entry point: INFO lines of the jaxattrib loggers shown
    path = pretrain(a.out, steps=a.steps, batch_size=a.batch_size, learning_rate=a.lr,
                    seed=a.seed, work_dir=a.work_dir)
    logger.info("wrote %s", path)


if __name__ == "__main__":
    main()
