"""Reproducible pretraining of a tiny Stable-Diffusion-shaped *latent* base model (issue 21).

Trains from scratch and offline on the synthetic concept set (:mod:`jaxattrib.data.synthetic`),
a few (shape, color) combinations withheld: ``python -m jaxattrib.train.latent_base --out DIR
[--work-dir W] [--smoke]``.

* **Stage 1 — KL autoencoder** (our ``AutoencoderKL`` port, :mod:`jaxattrib.models.vae`):
  per-example loss ``mean|x − D(z)| + kl_weight · Σ KL(q(z|x) ‖ N(0, I)) / (H·W·3)`` with
  ``z`` a posterior sample (key ``fold_in(step_key, j)``), i.e. the L1 + KL part of the
  LDM autoencoder objective [paper: Rombach et al. 2022, taming ``LPIPSWithDiscriminator``]
  without LPIPS and without the GAN (nothing may be downloaded). ``kl_weight`` multiplies the
  *summed* KL against the *summed* L1, as there.
* **Latent scaling** [paper: LDM §4.3.2 / SD's ``scaling_factor``]: after stage 1, every
  training image is encoded to its posterior mean and ``scaling_factor = 1 / std`` of all
  those latent elements (``shift_factor`` unset, as SD-1/2); it is written into
  ``vae/config.json``.
* **Stage 2 — UNet + CLIP text encoder** on the scaled posterior-mean latents (the latent rule
  of :mod:`jaxattrib.diffusion.latents`: what the demo fine-tunes and attributes with),
  epsilon prediction, SD-1.5's DDIM/``scaled_linear`` schedule, the text encoder trained too.
  Caption dropout for classifier-free guidance as the pixel base model does: an extra 10 % of
  empty-caption examples.

Both stages run through :func:`jaxattrib.train.finetune.finetune`, so each has its own
trajectory record (``WORK/vae_record``, ``WORK/unet_record``) and a rerun resumes from the
latest checkpoint (bit-identical to an uninterrupted run on the same machine, see
``finetune``'s reproducibility contract); a finished stage is only restored. At each checkpoint
a fixed evaluation is appended to ``WORK/<stage>_eval.jsonl`` (stage 1: L1 / PSNR of the
reconstruction of ID and held-out renders; stage 2: the denoising loss of a fixed set with
fixed noise), so the manifest carries a loss curve.

The output is a diffusers pipeline folder (``model_index.json``, ``vae/``, ``unet/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``; safetensors) loadable by
:func:`jaxattrib.models.pipeline.load_pipeline` and by diffusers'
``StableDiffusionPipeline``, plus ``jaxattrib_base.json``: the manifest (data spec, held-out
concepts, architecture, steps, loss curves, latent statistics, wall time per stage, machine),
with the same ``data_spec`` / ``held_out`` keys as the pixel base model so
:func:`jaxattrib.train.base_model.spec_from_info` and the demo read it alike.

[design] Ours: 32 px with f = 2 (16 × 16 × 4 latents), the architectures, the concept set,
``kl_weight``, learning rates and steps; the defaults are the shipped model
(``jaxattrib/assets/base_model``), the measured reasons in ``docs/latent_base.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxattrib.train.base_model import save_pipeline

logger = logging.getLogger(__name__)

#: (shape, color) combinations withheld from pretraining: the demo's "new concepts" (the same
#: four as the pixel base model, so the demo's configs and held-out metrics carry over).
HELD_OUT = (
    {"shape": "star", "color": "purple"},
    {"shape": "cross", "color": "yellow"},
    {"shape": "triangle", "color": "green"},
    {"shape": "square", "color": "red"},
)

#: SD-1.5's scheduler (``scaled_linear`` betas 0.00085..0.012, epsilon prediction).
SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
    "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
    "timestep_spacing": "leading",
}

EXTRA_WORDS = ("with", "stripes", "dots", "solid", "sks", "photo", "of", "digit", "handwritten",
               "the", "in", "style", "and")


@dataclasses.dataclass(frozen=True)
class LatentBaseConfig:
    """Everything the pretraining depends on (all of it goes into the manifest).

    Data: ``shapes``/``colors``/``backgrounds``/``textures`` vocabularies, ``size`` px,
    ``per_combination`` renders per combination, ``position_jitter``/``scale_range`` (see
    :class:`jaxattrib.data.synthetic.SyntheticConceptSpec`). VAE: ``vae_channels``
    (``block_out_channels``; f = 2**(len − 1)), ``vae_layers``, ``vae_groups``,
    ``vae_mid_attention`` (self-attention in the mid blocks, as SD), ``latent_channels``,
    ``kl_weight``, ``vae_steps``/``vae_batch``/``vae_lr``. UNet: ``unet_channels``,
    ``unet_down`` (block kinds per level, 'c' = CrossAttnDownBlock2D, 'd' = DownBlock2D),
    ``unet_heads`` (diffusers' ``attention_head_dim``), ``unet_steps``/``unet_batch``/
    ``unet_lr``. Text: ``text_hidden``, ``text_layers``, ``max_length``.
    ``uncond_fraction``: extra empty-caption examples (classifier-free guidance).
    """

    shapes: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
    backgrounds: tuple[str, ...] = ("black", "white", "gray", "orange", "cyan", "pink")
    textures: tuple[str, ...] = ("solid",)
    size: int = 32
    per_combination: int = 16
    position_jitter: float = 0.15
    scale_range: tuple[float, float] = (0.45, 0.8)
    seed: int = 0
    vae_channels: tuple[int, ...] = (32, 64)
    vae_layers: int = 1
    vae_groups: int = 8
    vae_mid_attention: bool = False
    latent_channels: int = 4
    kl_weight: float = 1e-5
    vae_steps: int = 1500
    vae_batch: int = 16
    vae_lr: float = 2e-3
    unet_channels: tuple[int, ...] = (64, 128, 128)
    unet_down: str = "dcc"
    unet_heads: int = 8
    unet_groups: int = 8
    unet_layers: int = 1
    unet_steps: int = 4000
    unet_batch: int = 32
    unet_lr: float = 1e-3
    text_hidden: int = 64
    text_layers: int = 2
    max_length: int = 16
    uncond_fraction: float = 0.1
    checkpoints: int = 10          # checkpoints (and evaluations) per stage

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}


#: ``--smoke``: the same code path with tiny models, data and steps (tests; seconds).
SMOKE = dict(per_combination=1, shapes=("circle", "square", "triangle", "star", "cross"),
             backgrounds=("black", "white"), vae_channels=(8, 16, 16), vae_groups=4,
             vae_steps=4, vae_batch=8, unet_channels=(16, 32), unet_down="cd", unet_heads=2,
             unet_groups=4, unet_steps=4, unet_batch=8, text_hidden=16, text_layers=1,
             max_length=16, checkpoints=2)


def data_spec(cfg: LatentBaseConfig):
    from jaxattrib.data.synthetic import SyntheticConceptSpec
    return SyntheticConceptSpec(shapes=cfg.shapes, colors=cfg.colors,
                                backgrounds=cfg.backgrounds, textures=cfg.textures,
                                size=cfg.size, per_combination=cfg.per_combination,
                                position_jitter=cfg.position_jitter,
                                scale_range=cfg.scale_range)


def vocabulary() -> list[str]:
    """Every word a synthetic caption can use (all shapes, colors, backgrounds, textures of
    :mod:`jaxattrib.data.synthetic`, not only the trained ones), plus a few prompt words and
    digits: the demo and benchmarks may prompt any synthetic concept."""
    from jaxattrib.data.synthetic import BACKGROUND_COLORS, SHAPES, TEXTURES
    words = ["a", "on", "background"] + list(SHAPES) + list(BACKGROUND_COLORS) + list(TEXTURES)
    words += list(EXTRA_WORDS) + [str(d) for d in range(10)]
    return list(dict.fromkeys(words))


def model_configs(cfg: LatentBaseConfig, vocab_size: int):
    """``(vae_config, unet_config, text_config)``; ``vae_config.scaling_factor`` is a
    placeholder (1.0) until measured after stage 1."""
    from jaxattrib.models import vae as vae_lib
    from jaxattrib.models.clip_text import CLIPTextConfig
    from jaxattrib.models.unet import tiny_config
    vae = vae_lib.tiny_config(block_out_channels=cfg.vae_channels, norm_num_groups=cfg.vae_groups,
                              latent_channels=cfg.latent_channels, layers_per_block=cfg.vae_layers,
                              sample_size=cfg.size, scaling_factor=1.0,
                              mid_block_add_attention=cfg.vae_mid_attention)
    f = 2 ** (len(cfg.vae_channels) - 1)
    kinds = {"c": ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D"),
             "d": ("DownBlock2D", "UpBlock2D")}
    if len(cfg.unet_down) != len(cfg.unet_channels) or set(cfg.unet_down) - set(kinds):
        raise ValueError(f"unet_down={cfg.unet_down!r}: expected one of 'c'/'d' per level of "
                         f"unet_channels={cfg.unet_channels}")
    down = tuple(kinds[k][0] for k in cfg.unet_down)
    up = tuple(kinds[k][1] for k in reversed(cfg.unet_down))
    unet = tiny_config(block_out_channels=cfg.unet_channels, cross_attention_dim=cfg.text_hidden,
                       norm_num_groups=cfg.unet_groups, layers_per_block=cfg.unet_layers,
                       sample_size=cfg.size // f, in_channels=cfg.latent_channels,
                       out_channels=cfg.latent_channels, attention_head_dim=cfg.unet_heads,
                       down_block_types=down, up_block_types=up)
    text = CLIPTextConfig(vocab_size=vocab_size, hidden_size=cfg.text_hidden,
                          intermediate_size=4 * cfg.text_hidden,
                          num_hidden_layers=cfg.text_layers,
                          num_attention_heads=max(1, cfg.text_hidden // 16),
                          max_position_embeddings=cfg.max_length, hidden_act="quick_gelu",
                          projection_dim=cfg.text_hidden, pad_token_id=None,
                          bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1)
    return vae, unet, text


# ------------------------------------------------------------------------------ stage 1: VAE

def make_vae_loss(vae_config, kl_weight: float) -> Callable:
    """``loss_fn(params, batch, key) -> [B]`` for ``params['autoencoder']`` (not ``'vae'``,
    which ``finetune`` always freezes) and ``batch['images'] [B, H, W, 3]`` in [-1, 1]:
    ``mean|x − D(z)| + kl_weight · ΣKL / (H·W·3)``, ``z ~ q(z|x)`` from ``fold_in(key, j)``."""
    from jaxattrib.models.vae import AutoencoderKL
    model = AutoencoderKL(vae_config)

    def loss_fn(params, batch, key):
        x = batch["images"]
        mean, logvar = model.apply({"params": params["autoencoder"]}, x,
                                   method=AutoencoderKL.encode)
        keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(x.shape[0]))
        eps = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], mean.dtype))(keys)
        z = mean + jnp.exp(0.5 * logvar) * eps
        rec = model.apply({"params": params["autoencoder"]}, z, method=AutoencoderKL.decode)
        l1 = jnp.abs(rec - x).mean(axis=(1, 2, 3))
        kl = 0.5 * (mean ** 2 + jnp.exp(logvar) - 1.0 - logvar).sum(axis=(1, 2, 3))
        return l1 + kl_weight * kl / float(np.prod(x.shape[1:]))
    return loss_fn


def reconstruction_metrics(vae_config, vae_params, ds, spec) -> dict:
    """Of ``decode(posterior mean)`` of the images of ``ds``: L1, PSNR (dB, pixels in [-1, 1]
    → peak-to-peak 2) and the shape / color accuracy of the package's pixel classifier on the
    reconstructions (an upper bound of what generations through this decoder can score)."""
    from jaxattrib.data.synthetic import classify_concepts
    from jaxattrib.models.latent_io import decode_images, encode_images
    images = np.asarray(ds.images)
    rec = decode_images(vae_params, vae_config,
                        encode_images(vae_params, vae_config, images, batch_size=64),
                        batch_size=64)
    rec = np.clip(rec, -1, 1)
    mse = float(np.mean((rec - images) ** 2))
    pred = classify_concepts(rec, spec)
    return {"l1": float(np.mean(np.abs(rec - images))),
            "psnr": float(10 * np.log10(4.0 / max(mse, 1e-12))),
            "classifier_shape": float(np.mean(pred["shape"] == ds.labels["shape"])),
            "classifier_color": float(np.mean(pred["color"] == ds.labels["color"]))}


def latent_scaling(vae_config, vae_params, images):
    """SD's latent scaling: ``(vae_config with scaling_factor = 1/std, scaled latents
    float32 [N, h, w, c], stats)`` from the posterior means of ``images [N, H, W, 3]``
    (``vae_config.scaling_factor`` must still be the placeholder 1.0)."""
    from jaxattrib.models.latent_io import encode_images
    if vae_config.scaling_factor != 1.0:
        raise ValueError("latent_scaling: expected the unscaled VAE (scaling_factor 1.0)")
    raw = encode_images(vae_params, vae_config, images, batch_size=64)
    stats = {"mean": float(raw.mean()), "std": float(raw.std()),
             "per_channel_std": [float(s) for s in raw.std(axis=(0, 1, 2))]}
    vae_config = dataclasses.replace(vae_config, scaling_factor=float(1.0 / raw.std()))
    return vae_config, (raw * vae_config.scaling_factor).astype(np.float32), stats


def _machine() -> dict:
    return {"node": platform.node(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "jax_backend": jax.default_backend(), "devices": len(jax.devices()),
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


def _read_evals(path: Path) -> list[dict]:
    """The eval lines of a stage, one per step (a resumed run's repeat of a step wins)."""
    if not path.exists():
        return []
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            rows[r["step"]] = r
    return [rows[k] for k in sorted(rows)]


def _append(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------------------ pretraining

def pretrain(out, cfg: LatentBaseConfig = LatentBaseConfig(), *, work_dir=None,
             progress: bool = True, log: Callable[[str], None] | None = None,
             on_checkpoint: Callable[[str, int, dict], Any] | None = None) -> Path:
    """Pretrains the latent base model and writes it to ``out``; resumable (see module doc).

    ``on_checkpoint(stage, step, params)`` (stage ``'vae'`` | ``'unet'``) is called after each
    checkpoint (an exception stops training; the records stay resumable). Returns ``out``.
    """
    from jaxattrib import parallel
    from jaxattrib.data.synthetic import make_synthetic, make_withheld
    from jaxattrib.diffusion.schedule import schedule_from_diffusers_config
    from jaxattrib.models import clip_text, unet, vae as vae_lib
    from jaxattrib.models.tokenizer import CLIPTokenizer, build_word_tokenizer
    from jaxattrib.train.diffusion_task import make_diffusion_loss
    from jaxattrib.train.finetune import TrainConfig, finetune

    log = log or logger.info
    out = Path(out)
    work = Path(work_dir) if work_dir else out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    machine_start, t_all = _machine(), time.time()
    spec = data_spec(cfg)
    ds = make_synthetic(spec, seed=cfg.seed, withhold=HELD_OUT)
    images = np.asarray(ds.images)
    n = len(ds)
    tok_dir = build_word_tokenizer(vocabulary(), work / "tokenizer",
                                   model_max_length=cfg.max_length)
    tok = CLIPTokenizer.from_folder(tok_dir)
    vae_config, unet_config, text_config = model_configs(cfg, tok.vocab_size)
    key = jax.random.PRNGKey(cfg.seed)
    mesh = parallel.make_mesh(1)
    every = lambda steps: max(1, steps // max(cfg.checkpoints, 1))  # noqa: E731
    # fixed evaluation images: fresh renders of ID combinations and the held-out ones
    eval_spec = dataclasses.replace(spec, per_combination=1)
    eval_id = make_synthetic(eval_spec, seed=cfg.seed + 1000, withhold=HELD_OUT)
    eval_id = eval_id.subset(np.arange(min(128, len(eval_id))))
    eval_ood = make_withheld(eval_spec, cfg.seed + 1000, HELD_OUT)
    data_info = {"fingerprint": ds.fingerprint(), "size": n}
    walls = {}

    # ---- stage 1: the autoencoder
    vae_eval = work / "vae_eval.jsonl"

    def vae_checkpoint(step, params):
        p = jax.device_get(params["autoencoder"])
        row = {"step": step, "id": reconstruction_metrics(vae_config, p, eval_id, spec),
               "ood": reconstruction_metrics(vae_config, p, eval_ood, spec)}
        _append(vae_eval, row)
        log(f"vae step {step}: ID L1 {row['id']['l1']:.4f} PSNR {row['id']['psnr']:.2f} dB "
            f"shape/color {row['id']['classifier_shape']:.2f}/"
            f"{row['id']['classifier_color']:.2f}; held-out L1 {row['ood']['l1']:.4f} PSNR "
            f"{row['ood']['psnr']:.2f} dB shape/color {row['ood']['classifier_shape']:.2f}/"
            f"{row['ood']['classifier_color']:.2f} (classifier on reconstructions)")
        if on_checkpoint is not None:
            on_checkpoint("vae", step, params)

    tc1 = TrainConfig(steps=cfg.vae_steps, batch_size=cfg.vae_batch, learning_rate=cfg.vae_lr,
                      schedule="cosine", warmup_steps=min(100, cfg.vae_steps // 10),
                      final_lr_fraction=0.05, weight_decay=0.0, grad_clip_norm=1.0,
                      seed=cfg.seed, checkpoint_every=every(cfg.vae_steps), log_every=25)
    t0 = time.time()
    params1 = {"autoencoder": vae_lib.init_params(vae_config, jax.random.fold_in(key, 3))}
    trained1, rec1 = finetune(make_vae_loss(vae_config, cfg.kl_weight), params1, n,
                              lambda idx: {"images": images[np.asarray(idx)]}, tc1,
                              work / "vae_record", mesh=mesh, progress=progress,
                              model_info={"vae": vae_config.to_diffusers(),
                                          "kl_weight": cfg.kl_weight},
                              dataset_info=data_info, on_checkpoint=vae_checkpoint, log=log)
    rec1.close()
    vae_params = jax.device_get(trained1["autoencoder"])
    walls["vae"] = round(time.time() - t0, 1)

    # ---- latent scaling: 1 / std of the posterior-mean latents of the training images
    vae_config, latents, latent_stats = latent_scaling(vae_config, vae_params, images)
    log(f"latents {latents.shape[1:]}: std {latent_stats['std']:.4f} -> scaling_factor "
        f"{vae_config.scaling_factor:.6f}")

    # ---- stage 2: UNet + text encoder on the scaled posterior-mean latents
    sched = schedule_from_diffusers_config(SCHEDULER_CONFIG)
    n_uncond = int(round(n * cfg.uncond_fraction))
    ids = tok(list(ds.captions), max_length=cfg.max_length)
    empty = tok([""], max_length=cfg.max_length)[0]

    def get_batch(indices):
        indices = np.asarray(indices)
        src = indices % n
        batch_ids = ids[src].copy()
        batch_ids[indices >= n] = empty
        return {"images": latents[src], "input_ids": batch_ids}

    # the latents go in as the loss's "images" with no VAE: x0 = the scaled mean latent
    loss2 = make_diffusion_loss(unet_config, text_config, sched, None, train_text_encoder=True)
    ev = np.random.default_rng(cfg.seed + 2000).choice(n, size=min(128, n), replace=False)
    eval_batch = {"images": jnp.asarray(latents[ev]), "input_ids": jnp.asarray(ids[ev])}
    eval_keys = [jax.random.fold_in(jax.random.PRNGKey(cfg.seed + 2000), i) for i in range(4)]
    eval_loss = jax.jit(lambda p, k: loss2(p, eval_batch, k).mean())
    unet_eval = work / "unet_eval.jsonl"

    def unet_checkpoint(step, params):
        loss = float(np.mean([float(eval_loss(params, k)) for k in eval_keys]))
        _append(unet_eval, {"step": step, "eval_loss": loss})
        log(f"unet step {step}: eval denoising loss {loss:.5f}")
        if on_checkpoint is not None:
            on_checkpoint("unet", step, params)

    tc2 = TrainConfig(steps=cfg.unet_steps, batch_size=cfg.unet_batch,
                      learning_rate=cfg.unet_lr, schedule="cosine",
                      warmup_steps=min(200, cfg.unet_steps // 10), final_lr_fraction=0.05,
                      weight_decay=0.0, grad_clip_norm=1.0, seed=cfg.seed,
                      checkpoint_every=every(cfg.unet_steps), train_text_encoder=True,
                      log_every=25)
    t0 = time.time()
    params2 = {"unet": unet.init_params(unet_config, jax.random.fold_in(key, 1)),
               "text_encoder": clip_text.init_params(text_config, jax.random.fold_in(key, 2))}
    trained2, rec2 = finetune(loss2, params2, n + n_uncond, get_batch, tc2,
                              work / "unet_record", mesh=mesh, progress=progress,
                              model_info={"unet": unet_config.to_diffusers(),
                                          "text_encoder": text_config.to_transformers(),
                                          "vae": vae_config.to_diffusers(),
                                          "x0": "scaled VAE posterior mean (precomputed)"},
                              dataset_info=data_info, on_checkpoint=unet_checkpoint, log=log)
    rec2.close()
    walls["unet"] = round(time.time() - t0, 1)

    n_params = {name: int(sum(np.size(a) for a in jax.tree.leaves(p))) for name, p in
                (("vae", vae_params), ("unet", trained2["unet"]),
                 ("text_encoder", trained2["text_encoder"]))}
    manifest = {
        "kind": "latent", "generator": "python -m jaxattrib.train.latent_base",
        "data_spec": dataclasses.asdict(spec), "seed": cfg.seed, "held_out": list(HELD_OUT),
        "config": cfg.to_dict(), "train_examples": n, "uncond_examples": n_uncond,
        "steps": {"vae": cfg.vae_steps, "unet": cfg.unet_steps},
        "latent_shape": list(latents.shape[1:]), "latent_stats_unscaled": latent_stats,
        "scaling_factor": vae_config.scaling_factor, "params": n_params,
        "losses": {"vae": _read_evals(vae_eval), "unet": _read_evals(unet_eval)},
        "wall_seconds_this_run": {**walls, "total": round(time.time() - t_all, 1)},
        "note": "wall seconds of the last invocation only (stages restored from a finished "
                "record take ~0 s); see WORK/*.log for earlier ones",
        "machine": {"start": machine_start, "end": _machine()},
    }
    return save_pipeline(out, unet_config, trained2["unet"], text_config, trained2["text_encoder"],
                         tok_dir, SCHEDULER_CONFIG, manifest, vae_config=vae_config,
                         vae_params=vae_params)


def export_checkpoint(out, cfg: LatentBaseConfig, work_dir, unet_step: int | None = None,
                      log: Callable[[str], None] | None = None) -> Path:
    """Writes the pipeline folder of a run that has not finished (or of any checkpoint):
    the VAE of stage 1's latest checkpoint (stage 1 must be finished), its latent scaling, and
    the UNet / text encoder of stage 2's checkpoint ``unet_step`` (default: the latest). The
    manifest says ``"partial": true`` and which steps. Reads the records only."""
    from jaxattrib.data.synthetic import make_synthetic
    from jaxattrib.models.tokenizer import CLIPTokenizer
    from jaxattrib.train.record import TrajectoryRecord
    log = log or logger.info
    work = Path(work_dir)
    spec = data_spec(cfg)
    ds = make_synthetic(spec, seed=cfg.seed, withhold=HELD_OUT)
    tok_dir = work / "tokenizer"
    vae_config, unet_config, text_config = model_configs(
        cfg, CLIPTokenizer.from_folder(tok_dir).vocab_size)
    rec1 = TrajectoryRecord.open(work / "vae_record")
    if rec1.latest_step() != cfg.vae_steps:
        raise ValueError(f"{work / 'vae_record'}: stage 1 is at step {rec1.latest_step()} of "
                         f"{cfg.vae_steps}; export needs it finished")
    vae_params = jax.device_get(rec1.load(cfg.vae_steps)["autoencoder"])
    vae_config, _, stats = latent_scaling(vae_config, vae_params, np.asarray(ds.images))
    rec2 = TrajectoryRecord.open(work / "unet_record")
    step = rec2.latest_step() if unet_step is None else int(unet_step)
    params = jax.device_get(rec2.load(step))
    log(f"exporting vae step {cfg.vae_steps} (scaling_factor {vae_config.scaling_factor:.6f})"
        f" + unet step {step} of {cfg.unet_steps} to {out}")
    manifest = {
        "kind": "latent", "partial": step != cfg.unet_steps,
        "generator": "python -m jaxattrib.train.latent_base --export-step",
        "data_spec": dataclasses.asdict(spec), "seed": cfg.seed, "held_out": list(HELD_OUT),
        "config": cfg.to_dict(), "train_examples": len(ds),
        "steps": {"vae": cfg.vae_steps, "unet": step, "unet_planned": cfg.unet_steps},
        "latent_stats_unscaled": stats, "scaling_factor": vae_config.scaling_factor,
        "losses": {"vae": _read_evals(work / "vae_eval.jsonl"),
                   "unet": _read_evals(work / "unet_eval.jsonl")},
        "machine": {"end": _machine()},
    }
    return save_pipeline(out, unet_config, params["unet"], text_config, params["text_encoder"],
                         tok_dir, SCHEDULER_CONFIG, manifest, vae_config=vae_config,
                         vae_params=vae_params)


def config_from_args(a) -> LatentBaseConfig:
    over = dict(SMOKE) if a.smoke else {}
    for name in ("vae_steps", "unet_steps", "per_combination", "seed"):
        v = getattr(a, name)
        if v is not None:
            over[name] = v
    return LatentBaseConfig(**over)


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="pipeline folder to write")
    p.add_argument("--work-dir", default=None, help="records + logs (default OUT.work)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny models/data/steps: the same code path in seconds (tests)")
    p.add_argument("--vae-steps", dest="vae_steps", type=int, default=None)
    p.add_argument("--unet-steps", dest="unet_steps", type=int, default=None)
    p.add_argument("--per-combination", dest="per_combination", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--export-step", dest="export_step", type=int, default=None,
                   help="do not train: write OUT from WORK's finished stage 1 and stage 2's "
                        "checkpoint at this step (-1: the latest), e.g. while a long run is "
                        "still going")
    a = p.parse_args(argv)
    cfg = config_from_args(a)
    out = Path(a.out)
    if a.export_step is not None:
        if not a.work_dir:
            p.error("--export-step needs --work-dir (the run's work directory)")
        return export_checkpoint(out, cfg, a.work_dir,
                                 None if a.export_step < 0 else a.export_step)
    work = Path(a.work_dir) if a.work_dir else out.with_name(out.name + ".work")
    from jaxattrib.progress import StageLog
    with StageLog(work, "latent_base", process_index=0, echo=True) as log:
        log(f"config {json.dumps(cfg.to_dict())}")
        path = pretrain(out, cfg, work_dir=work, progress=not a.no_progress, log=log)
        log(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
