"""CGI-DM benchmark: fine-tuning members vs equal-size hold-outs of the same concepts.

The base model is fine-tuned DreamBooth-style (few images of new concepts, prior preservation on
its own generations: :mod:`jaxattrib.train.dreambooth`) on the *member* images; the
*hold-outs* are other images of the same concepts. Every method scores every image (larger ⇒
member) and is measured on members vs hold-outs:

* **CGI-DM** (:mod:`jaxattrib.authentication.cgi_dm`): masked latent recovered by contrastive
  gradient inversion, score = similarity(original, recovered) ('ssim', 'psnr', 'tap'), or
  'j_gain' = J(recovered) − J(start), the rise of the contrastive objective [design].
* **loss gap** (baseline 1): ``L_pre − L_ft`` on the unmasked image, no inversion.
* **masked-input similarity** (baseline 2): similarity(original, masked start), no model.

Splits (per concept, seeded; ground truth by construction): ``members`` (fine-tuned on),
``holdouts`` (as many, not trained on), ``calib`` (extra known non-members). Members and
hold-outs alternate into a **validation** and a **test** half. Everything tunable (the CGI-DM
variants of ``tune.variants``, the similarity, the loss-gap timestep range) is chosen by
validation AUC only; AUC and TPR@1%/10%FPR are reported on the test half, with thresholds
calibrated on the ``calib`` images (never on the test half).

Sources: ``source='synthetic'`` — renders of the base model's four withheld (shape, color)
concepts at its ``data_spec.size``, captioned as in pretraining; ``'folder'`` — a
DreamBooth-layout folder resized to the model's pixel size (UNet ``sample_size`` × VAE factor),
one concept per subject. [design] The text encoder is not trained, so both models see the same
conditioning (``c = c'``). ``base_model``: '' = the embedded model, else a folder with a
``jaxattrib_base.json``.

Latent base models (the embedded one), as the demo's CGI-DM stage: every image is encoded once
with the VAE posterior **mean** (:func:`jaxattrib.models.latent_io.vae_codec`), the rule
fine-tuning trains on (:data:`jaxattrib.diffusion.latents.LATENT_RULE`); PGD, the loss gap and
the masked start run on that latent [code]; the masked and recovered images are VAE-decoded,
and the similarities and the report see pixels ('j_gain': J at the re-encoded decoded images
[design]). Pixel base models: no VAE, the same computation as before.

The run directory::

    config.json, data/splits.npz, data/class.npz, record/   data, trajectory record (resumable)
    cgi/<variant>/<split>_<lo>.npz    recovered batches (resumable)
    scores/*.npz                      per-method scores
    tables/cgi_dm.{md,json}           the tables; results/*.json, *.png, report.html
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from pathlib import Path

import jax
import numpy as np

from jaxattrib.config import ConfigError
from jaxattrib.runs.rundir import RunDir

IMAGE_SIMILARITIES = ("ssim", "psnr", "tap")
# 'j_gain': J(recovered) − J(start), not an image similarity (scores CGI-DM only) [design]
SIMILARITIES = IMAGE_SIMILARITIES + ("j_gain",)
#: fields added after run directories were made, with what older runs did
ADDED_FIELDS = {"base_model": ""}


logger = logging.getLogger(__name__)


def _log(msg: str) -> None:
    logger.info("[cgi-dm benchmark %s] %s", time.strftime('%H:%M:%S'), msg)


# ----------------------------------------------------------------------------- config


def parse_variant(spec: str, base) -> tuple[str, object]:
    """``'name: field=value, field=value'`` -> ``(name, CGIDMConfig)`` (``base`` with the
    fields replaced). Raises :class:`ConfigError` naming the variant and field."""
    import dataclasses

    from jaxattrib.authentication.cgi_dm import CGIDMConfig
    name, _, rest = spec.partition(":")
    name = name.strip()
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"tune.variants: {spec!r}: expected 'name: field=value, ...' with a "
                          f"plain name")
    fields = {f.name: f for f in dataclasses.fields(CGIDMConfig)}
    kw = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        k, eq, v = item.partition("=")
        k = k.strip()
        if not eq or k not in fields:
            raise ConfigError(f"tune.variants[{name}]: {item!r}: expected field=value with a "
                              f"CGIDMConfig field {sorted(fields)}")
        v = v.strip()
        cur = getattr(base, k)
        try:
            kw[k] = type(cur)(v) if not isinstance(cur, str) else v.strip("'\"")
        except ValueError:
            raise ConfigError(f"tune.variants[{name}]: {k}={v!r} is not a "
                              f"{type(cur).__name__}") from None
    try:
        return name, dataclasses.replace(base, **kw)
    except ValueError as e:
        raise ConfigError(f"tune.variants[{name}]: {e}") from None


#: variant names of earlier run directories -> their names now (same settings): 'paper' ran the
#: authors' settings with 50 steps of size 4, not the paper's budget (issue 19 item 6)
RENAMED_VARIANTS = {"paper": "authors_50x4"}


def keep_renamed_variants(run_dir: Path, config) -> None:
    """A run directory whose stored ``tune.variants`` differ from ``config``'s only by
    :data:`RENAMED_VARIANTS` keeps its names (``config`` changed in place, with a notice), so
    its cached recoveries and results still resume."""
    from jaxattrib.runs.rundir import read_run_config
    path = RunDir(run_dir).config
    if not path.is_file():
        return
    try:
        stored = list((read_run_config(path).get("tune") or {}).get("variants") or ())
    except ConfigError:
        return                                 # unreadable: check_run_config says so
    def renamed(spec):
        name, _, rest = str(spec).partition(":")
        return f"{RENAMED_VARIANTS.get(name.strip(), name.strip())}:{rest}"
    now = list(config.tune.variants)
    if stored != now and [renamed(v) for v in stored] == now:
        logger.warning("%s: this run keeps its variant names %s (now %s; same settings)", path,
                       [v.split(":")[0] for v in stored if v not in now],
                       [v.split(":")[0] for v in now if v not in stored])
        config.tune.variants = tuple(stored)


def check_config(config) -> dict:
    """Validates the benchmark config; returns ``{name: CGIDMConfig}`` of the variants."""
    from jaxattrib.authentication.cgi_dm import CGIDMConfig
    if config.source not in ("synthetic", "folder"):
        raise ConfigError(f"source={config.source!r}: expected 'synthetic' or 'folder'")
    if config.source == "folder" and not config.data.path:
        raise ConfigError("source='folder' needs data.path (a DreamBooth-layout folder)")
    for f in ("members", "calib"):
        if not isinstance(config.data[f], int) or config.data[f] < 1:
            raise ConfigError(f"data.{f}={config.data[f]!r}: expected an integer >= 1")
    if config.data.members < 2:
        raise ConfigError("data.members must be >= 2 (one validation and one test member per "
                          "concept)")
    bad = [s for s in config.tune.similarities if s not in SIMILARITIES]
    if bad or not config.tune.similarities:
        raise ConfigError(f"tune.similarities={tuple(config.tune.similarities)}: expected a "
                          f"non-empty subset of {SIMILARITIES}")
    base = CGIDMConfig.from_section(config.cgi, strict=True)
    variants = dict(parse_variant(s, base) for s in config.tune.variants)
    if not variants:
        raise ConfigError("tune.variants is empty")
    if len(variants) != len(config.tune.variants):
        raise ConfigError("tune.variants: names must be distinct")
    return variants


# ----------------------------------------------------------------------------- data


def assign_splits(groups: np.ndarray, members: int, calib: int, seed: int) -> np.ndarray:
    """Per image, its split: 'member_val', 'member_test', 'holdout_val', 'holdout_test',
    'calib' or '' (unused). In each group (concept) the images are shuffled
    (``default_rng([seed, crc32(group)])``); the first ``members`` are members, the next
    ``members`` hold-outs, the next up to ``calib`` calibration non-members; members and
    hold-outs alternate val / test (val first). A group with fewer than ``2 * members + 1``
    images takes ``m = (n - 1) // 2`` members (needs ``m >= 2``), else it is left out."""
    out = np.full(len(groups), "", dtype=object)
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        rng = np.random.default_rng([int(seed), zlib.crc32(str(g).encode())])
        idx = idx[rng.permutation(len(idx))]
        m = min(members, (len(idx) - 1) // 2)
        if m < 2:
            continue
        for j in range(m):
            half = "val" if j % 2 == 0 else "test"
            out[idx[j]] = f"member_{half}"
            out[idx[m + j]] = f"holdout_{half}"
        out[idx[2 * m: 2 * m + calib]] = "calib"
    return out.astype(str)


def build_data(run_dir: Path, config, pipe, info: dict | None = None) -> dict:
    """The images ``[N, S, S, 3]`` (``S`` = the pipeline's pixel size: UNet ``sample_size`` ×
    VAE factor) with captions, concept groups and splits (cached in ``data/splits.npz``).
    ``info``: the base model's ``jaxattrib_base.json`` (``data_spec``, ``held_out``) for the
    synthetic source (default: the embedded model's)."""
    from jaxattrib.diffusion.latents import check_pixel_images, pixel_shape
    from jaxattrib.runs.rundir import save_npz
    path = RunDir(run_dir).data_file("splits")
    if path.exists():
        out = dict(np.load(path))
        # e.g. a run of the 16-px pixel model, the embedded default before 1cbc1e1
        check_pixel_images(out["images"].shape, pipe.unet_config, pipe.vae_config,
                           f"{path} (made with another base model? use a new run directory "
                           f"or that run's base_model)")
        return out
    size = pixel_shape(pipe.unet_config, pipe.vae_config)[0]
    if config.source == "synthetic":
        import dataclasses

        from jaxattrib.train.base_model import base_model_info, spec_from_info
        from jaxattrib.data.synthetic import make_withheld
        info = base_model_info(None) if info is None else info
        spec = spec_from_info(info)
        check_pixel_images((spec.size, spec.size, 3), pipe.unet_config, pipe.vae_config,
                           "jaxattrib_base.json data_spec.size")
        need = 2 * config.data.members + config.data.calib
        per = -(-need // len(spec.backgrounds))
        ds = make_withheld(dataclasses.replace(spec, per_combination=per),
                           1000 + int(config.seed), [dict(h) for h in info["held_out"]])
        groups = np.array([f"{spec.colors[c]} {spec.shapes[s]}" for c, s in
                           zip(ds.labels["color"], ds.labels["shape"])])
    else:
        from jaxattrib.data.folder import load_folder
        subjects = list(config.data.subjects) or None
        ds = load_folder(config.data.path, size=size, subjects=subjects,
                         caption_template=config.data.caption or None)
        groups = np.array([ds.label_names["subject"][i] for i in ds.labels["subject"]])
    check_pixel_images(np.shape(ds.images), pipe.unet_config, pipe.vae_config,
                       f"data ({config.source})")
    split = assign_splits(groups, config.data.members, config.data.calib, config.seed)
    if not (split == "member_test").any():
        raise ConfigError(f"data: no concept has >= 5 images ({config.source})")
    keep = split != ""
    out = {"images": np.asarray(ds.images, np.float32)[keep],
           "captions": np.asarray(ds.captions)[keep], "ids": np.asarray(ds.ids)[keep],
           "group": groups[keep], "split": split[keep]}
    save_npz(path, **out)
    return out


def class_data(run_dir: Path, config, pipe) -> dict:
    """Prior-preservation (class) images: the base model's generations for prompts of concepts
    it knows (``finetune.class_prompts``, cycled), cached in ``data/class.npz``."""
    from jaxattrib.runs.rundir import save_npz
    from jaxattrib.train.dreambooth import generate_class_images
    path = RunDir(run_dir).data_file("class")
    if path.exists():
        return dict(np.load(path))
    f = config.finetune
    prompts = [f.class_prompts[i % len(f.class_prompts)] for i in range(f.num_class_images)]
    images = generate_class_images(pipe, prompts,
                                   jax.random.fold_in(jax.random.PRNGKey(config.seed), 101),
                                   num_inference_steps=f.class_inference_steps,
                                   guidance_scale=f.class_guidance_scale)
    out = {"images": images, "captions": np.array(prompts)}
    save_npz(path, **out)
    return out


def finetune_stage(run_dir: Path, config, pipe, data: dict, progress: bool = True) -> dict:
    """DreamBooth-style fine-tuning of the UNet on the member images; returns its params.
    Latent base models train on the VAE posterior mean (``vae_latents: 'mean'`` in the record
    manifest), as the demo's fine-tuning."""
    from jaxattrib import parallel
    from jaxattrib.diffusion.schedule import schedule_from_diffusers_config
    from jaxattrib.train.dreambooth import make_dreambooth_loss, pair_dataset
    from jaxattrib.train.finetune import TrainConfig, finetune
    f = config.finetune
    members = np.char.startswith(data["split"].astype(str), "member")
    cls = class_data(run_dir, config, pipe)
    L = pipe.text_config.max_position_embeddings
    n_pairs, get_batch = pair_dataset(
        {"images": data["images"][members],
         "input_ids": pipe.tokenizer(list(data["captions"][members]), max_length=L)},
        {"images": cls["images"], "input_ids": pipe.tokenizer(list(cls["captions"]),
                                                              max_length=L)})
    sched = schedule_from_diffusers_config(pipe.scheduler_config)
    loss_fn = make_dreambooth_loss(pipe.unet_config, pipe.text_config, sched,
                                   prior_loss_weight=f.prior_loss_weight,
                                   vae_config=pipe.vae_config,
                                   sample_posterior=not pipe.is_latent)
    tc = TrainConfig.from_section(f, schedule="constant", weight_decay=0.0, seed=config.seed,
                                  checkpoint_every=f.steps, lora_alpha=float(f.lora_rank))
    mesh = parallel.make_mesh(1) if f.batch_size % jax.device_count() else None
    params = {"unet": pipe.unet_params, "text_encoder": pipe.text_params}
    model_info = {"model": "embedded"}
    if pipe.is_latent:
        from jaxattrib.diffusion.latents import LATENT_RULE
        params["vae"] = pipe.vae_params
        model_info["vae_latents"] = LATENT_RULE
    trained, record = finetune(
        loss_fn, params, n_pairs,
        get_batch, tc, RunDir(run_dir).record.resolve(), mesh=mesh, progress=progress,
        model_info=model_info,
        dataset_info={"kind": "cgi-dm benchmark members (DreamBooth pairs)",
                      "instance_ids": [str(i) for i in data["ids"][members]]})
    record.close()
    return jax.device_get(trained["unet"])


# ----------------------------------------------------------------------------- scoring


def _split_key(seed: int, split: str) -> jax.Array:
    return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(split.encode()))


def similarity_fns(pipe, sched, batch_size: int, encode=None) -> dict:
    """``name -> sim(x[B,H,W,C], y) -> [B]`` on pixel images for :data:`IMAGE_SIMILARITIES`.
    'tap': cosine of the pretrained UNet's pooled mid-block features at t = 100 (fixed noise,
    empty prompt) of ``encode(x)`` (the VAE posterior mean on latent models) — the model's own
    encoder [design], used where CLIP / DINO weights are not available."""
    from jaxattrib.authentication import similarity as simlib
    from jaxattrib.diffusion.latents import pixel_shape
    from jaxattrib.models.unet import UNet2DConditionModel
    size = pixel_shape(pipe.unet_config, pipe.vae_config)[0]
    win = min(11, size)
    win -= 1 - win % 2
    empty = np.asarray(pipe.encode_prompts([""]))
    embed = simlib.tap_embedding_fn(UNet2DConditionModel(pipe.unet_config).apply,
                                    pipe.unet_params, cond=empty, taps=("mid",), t=100,
                                    sched=sched, encode=encode)
    return {"ssim": lambda x, y: simlib.ssim(x, y, data_range=2.0, win_size=win),
            "psnr": lambda x, y: simlib.psnr(x, y, data_range=2.0),
            "tap": simlib.embedding_similarity(embed)}


def j_gain_scores(rec: dict, cond, eps_pre, eps_ft, sched, cgi, key, n_draws: int,
                  batch_size: int, encode=None) -> np.ndarray:
    """``J(recovered) − J(start)`` per image [design]: how much PGD raised the contrastive
    objective ``L_pre − L_ft`` (``n_draws`` shared (t, ε) draws in the variant's timestep range,
    the same draws at both points). ``rec``'s images are pixels; ``encode`` (latent models: the
    VAE posterior mean) maps them to model inputs. ``[N]``, larger ⇒ member."""
    from jaxattrib.authentication.cgi_dm import loss_gap_scores
    j = {k: loss_gap_scores(rec[k], eps_pre, eps_ft, sched, key, cond=cond, n_draws=n_draws,
                            t_min=cgi.t_min, t_max=cgi.t_max, batch_size=batch_size,
                            encode=encode)
         for k in ("recovered", "masked")}
    return (j["recovered"] - j["masked"]).astype(np.float64)


def _sim(fn, a, b, bs):
    return np.concatenate([np.asarray(fn(a[i:i + bs], b[i:i + bs]))
                           for i in range(0, len(a), bs)]).astype(np.float64)


def models(pipe, ft_params) -> dict:
    """What every score needs: ``eps_pre`` / ``eps_ft`` (the pretrained and fine-tuned UNets as
    ``(z, t, c) -> prediction``), ``sched``, and ``encode`` / ``decode`` between pixels and model
    inputs (:func:`jaxattrib.models.latent_io.vae_codec` with the posterior mean; ``None`` for a
    pixel model) [code]."""
    from jax.tree_util import Partial

    from jaxattrib.diffusion.schedule import schedule_from_diffusers_config
    from jaxattrib.models.latent_io import vae_codec
    from jaxattrib.models.unet import UNet2DConditionModel
    model = UNet2DConditionModel(pipe.unet_config)
    apply = lambda p, z, t, c: model.apply({"params": p}, z, t, c)  # noqa: E731
    encode, decode = vae_codec(pipe, sample=False)
    return {"eps_pre": Partial(apply, pipe.unet_params), "eps_ft": Partial(apply, ft_params),
            "sched": schedule_from_diffusers_config(pipe.scheduler_config),
            "encode": encode, "decode": decode}


def recover_split(run_dir, config, name, cgi, split, data, ctx, eps_pre, eps_ft, sched,
                  progress, encode=None, decode=None):
    """The CGI-DM recoveries of split ``split`` (``cgi/<name>/``, resumable): pixel
    ``original`` / ``masked`` / ``recovered`` ``[n, S, S, 3]``, PGD on ``encode(x)``."""
    from jaxattrib.runs.cgi_dm import recover_cached
    sel = data["split"] == split
    return recover_cached(split, data["images"][sel], ctx[sel], eps_pre, eps_ft, sched, cgi,
                          _split_key(config.seed, split), run_dir / "cgi" / name,
                          encode=encode, decode=decode, batch_size=config.batch_size,
                          progress=progress)


def baseline_scores(run_dir, config, data, ctx, eps_pre, eps_ft, sched, sims, variants,
                    encode=None, decode=None) -> dict:
    """Loss gap (per candidate timestep range) on ``encode(x)`` and masked-input similarity of
    the pixel masked start (``decode(z_init)``, what :func:`recover_split` starts from), all
    images. Cached in ``scores/baselines.npz``; a rerun with more variants or similarities
    computes only the missing entries."""
    from jaxattrib.authentication import cgi_dm
    from jaxattrib.runs.rundir import save_npz
    path = RunDir(run_dir).scores / "baselines.npz"
    out = dict(np.load(path)) if path.exists() else {}
    n_cached = len(out)
    ranges = sorted({(1, 999)} | {(v.t_min, v.t_max) for v in variants.values()})
    for lo, hi in ranges:
        if f"loss_gap_t{lo}-{hi}" in out:
            continue
        out[f"loss_gap_t{lo}-{hi}"] = cgi_dm.loss_gap_scores(
            data["images"], eps_pre, eps_ft, sched, _split_key(config.seed, "loss_gap"),
            cond=ctx, n_draws=config.loss_gap_draws, t_min=lo, t_max=hi,
            batch_size=config.batch_size, encode=encode).astype(np.float64)
    # the masked start of each split as CGI-DM makes it (same keys); checkerboard/blur: no key
    for name, v in variants.items():
        if all(f"masked_{name}_{s}" in out for s in sims):
            continue
        masked = np.zeros(data["images"].shape, np.float32)
        for split in np.unique(data["split"]):
            sel = data["split"] == split
            masked[sel] = cgi_dm.masked_starts(data["images"][sel], v,
                                               _split_key(config.seed, split), encode=encode,
                                               decode=decode, batch_size=config.batch_size)
        for s, fn in sims.items():
            out[f"masked_{name}_{s}"] = _sim(fn, data["images"], masked, config.batch_size)
    if len(out) > n_cached:
        save_npz(path, **out)
    keep = ({f"loss_gap_t{lo}-{hi}" for lo, hi in ranges}
            | {f"masked_{n}_{s}" for n in variants for s in sims})
    return {k: a for k, a in out.items() if k in keep}


def _metrics(scores, labels, cal_scores) -> dict:
    from jaxattrib.authentication.cgi_dm import decide
    from jaxattrib.metrics import roc_auc, roc_auc_ci, tpr_at_fpr
    y = labels.astype(bool)
    ci = roc_auc_ci(scores, y)    # members and hold-outs resampled separately, 1000 draws
    row = {"AUC": roc_auc(scores, y), "AUC 95% CI": f"[{ci.low:.2f}, {ci.high:.2f}]",
           "TPR@1%FPR": tpr_at_fpr(scores, y, 0.01),
           "TPR@10%FPR": tpr_at_fpr(scores, y, 0.10)}
    for f in (0.01, 0.10):
        flagged = decide(scores, cal_scores, target="fpr", fpr=f)["decisions"]
        row[f"calibrated {f:.0%}: TPR"] = float(np.mean(flagged[y]))
        row[f"calibrated {f:.0%}: FPR"] = float(np.mean(flagged[~y]))
    return row


def run_cgi_benchmark(config, run_dir: str | Path, progress: bool = True) -> dict:
    """Runs (or resumes) the benchmark; writes tables and the report; returns the tables."""
    from jaxattrib.runs.cgi_dm import CGI_ADDED_FIELDS
    from jaxattrib.runs.demo import load_base, pgd_space
    from jaxattrib.runs.rundir import check_run_config, save_npz
    from jaxattrib.metrics import roc_auc
    t0 = time.time()
    run_dir = Path(run_dir)
    keep_renamed_variants(run_dir, config)
    variants = check_config(config)
    check_run_config(run_dir, config, added={**CGI_ADDED_FIELDS, **ADDED_FIELDS})
    pipe, info = load_base(config.base_model)
    data = build_data(run_dir, config, pipe, info)
    split = data["split"]
    counts = {s: int((split == s).sum()) for s in np.unique(split)}
    _log(f"{len(split)} images in {len(np.unique(data['group']))} concepts: {counts}")
    ft_params = finetune_stage(run_dir, config, pipe, data, progress)
    from jaxattrib.authentication.cgi_dm import check_compatible
    check_compatible(pipe.unet_params, ft_params)
    m = models(pipe, ft_params)
    eps_pre, eps_ft, sched, codec = m["eps_pre"], m["eps_ft"], m["sched"], \
        {"encode": m["encode"], "decode": m["decode"]}
    space = pgd_space(pipe)      # where PGD runs, said in the tables and the report
    space = (f"PGD on {space}; the masked and recovered images are VAE-decoded to pixels."
             if space else f"PGD on pixels {list(data['images'].shape[1:])} (pixel-space "
                           f"model).")
    _log(space)
    ctx = np.asarray(pipe.encode_prompts(list(data["captions"])))
    sims = similarity_fns(pipe, sched, config.batch_size, encode=m["encode"])
    sims = {k: v for k, v in sims.items() if k in config.tune.similarities}
    bs = config.batch_size

    def score(s, rec_, h, v):
        """CGI-DM score ``s`` of the recoveries ``rec_`` of split ``h`` (variant ``v``)."""
        if s == "j_gain":
            return j_gain_scores(rec_, ctx[split == h], eps_pre, eps_ft, sched, v,
                                 _split_key(config.seed, "j_gain"), config.loss_gap_draws, bs,
                                 encode=m["encode"])
        return _sim(sims[s], rec_["original"], rec_["recovered"], bs)
    scorers = list(sims) + [s for s in config.tune.similarities if s not in sims]

    _log("baselines")
    base = baseline_scores(run_dir, config, data, ctx, eps_pre, eps_ft, sched, sims, variants,
                           **codec)

    def val_test(scores, half):
        sel = (split == f"member_{half}") | (split == f"holdout_{half}")
        return scores[sel], (split[sel] == f"member_{half}")

    # ---- validation: every variant x similarity (CGI-DM), every range (loss gap), every
    # variant x similarity (masked input)
    val_rows, rec = [], {}
    for name, v in variants.items():
        for half in ("member_val", "holdout_val"):
            rec[(name, half)] = recover_split(run_dir, config, name, v, half, data, ctx,
                                              eps_pre, eps_ft, sched, progress, **codec)
        for s in scorers:
            sc = np.r_[score(s, rec[(name, "member_val")], "member_val", v),
                       score(s, rec[(name, "holdout_val")], "holdout_val", v)]
            y = np.r_[np.ones(counts["member_val"]), np.zeros(counts["holdout_val"])]
            val_rows.append({"method": "CGI-DM", "variant": name, "similarity": s,
                             "val AUC": roc_auc(sc, y.astype(bool))})
    for k in base:
        sv, yv = val_test(base[k], "val")
        val_rows.append({"method": "loss gap" if k.startswith("loss_gap") else "masked input",
                         "variant": k, "similarity": "", "val AUC": roc_auc(sv, yv)})

    def best(method):
        rows = [r for r in val_rows if r["method"] == method]
        return max(rows, key=lambda r: r["val AUC"])

    pick = {m: best(m) for m in ("CGI-DM", "loss gap", "masked input")}
    _log("validation picks: " + "; ".join(f"{m}: {r['variant']} {r['similarity']} "
                                          f"(val AUC {r['val AUC']:.3f})" for m, r in pick.items()))

    # ---- test + calibration with the picks
    name, s = pick["CGI-DM"]["variant"], pick["CGI-DM"]["similarity"]
    v = variants[name]
    parts = {h: recover_split(run_dir, config, name, v, h, data, ctx, eps_pre, eps_ft, sched,
                              progress, **codec)
             for h in ("member_test", "holdout_test", "calib")}
    sc = {h: score(s, r, h, v) for h, r in parts.items()}
    y_test = np.r_[np.ones(counts["member_test"]), np.zeros(counts["holdout_test"])].astype(bool)
    cgi_test = np.r_[sc["member_test"], sc["holdout_test"]]

    def test_of(key):
        a = base[key]
        return np.r_[a[split == "member_test"], a[split == "holdout_test"]], a[split == "calib"]

    rows = [{"method": f"CGI-DM ({name}, {s})", **_metrics(cgi_test, y_test, sc["calib"])}]
    base_test = []                     # [(row label, test scores [n_test], uses a model)]
    for m, label in (("loss gap", "loss gap, no inversion"),
                     ("masked input", "masked-input similarity")):
        k = pick[m]["variant"]
        st, sc_cal = test_of(k)
        rows.append({"method": f"{label} ({k})", **_metrics(st, y_test, sc_cal)})
        base_test.append((rows[-1]["method"], st, m == "loss gap"))
    # all validation candidates on the test half too, for context (not used for choices)
    all_test = []
    for k in base:
        st, _ = test_of(k)
        all_test.append({"scores": k, "test AUC": roc_auc(st, y_test)})
    save_npz(RunDir(run_dir).scores / "cgi_test.npz", labels=y_test, cgi=cgi_test,
              calib=sc["calib"])
    summary = {"counts": counts, "pgd": space, "picks": pick, "test": rows, "validation": val_rows,
               "baselines_on_test": all_test,
               "verdict": verdict_sentence(rows, cgi_test, base_test, y_test),
               "wall_s": time.time() - t0}
    _write_tables(run_dir, config, summary)
    _report(run_dir, config, summary, parts, sc, y_test, v)
    return summary


def verdict_sentence(rows: list[dict], cgi_scores: np.ndarray, baselines: list[tuple],
                     labels: np.ndarray) -> str | None:
    """The report's one sentence when CGI-DM's test AUC (``rows[0]``) is at or below the
    stronger baseline's (``rows[1:]``, same order as ``baselines``), with the measured
    member/hold-out separations of both scores (:func:`jaxattrib.report.verdict.cgi_dm_cause`);
    ``None`` when CGI-DM wins. ``cgi_scores [n]``, ``labels [n]`` (True = member) are the test
    half; ``baselines``: ``(row label, scores [n], uses a model)`` per baseline row, the loss
    gap first [design]."""
    from jaxattrib.report.verdict import cgi_dm_cause, explain
    j = int(np.argmax([r["AUC"] for r in rows[1:]]))
    label, scores, uses_model = baselines[j]
    loss_gap = baselines[0][1] if j != 0 else None
    cause = cgi_dm_cause(cgi_scores, labels, scores, label, score_name="CGI-DM score",
                         baseline_uses_model=uses_model, loss_gap=loss_gap)
    return explain("CGI-DM", rows[0]["AUC"], label, rows[1 + j]["AUC"], "test AUC", cause,
                   measured="test AUC and member/hold-out score separations")


def _md_table(rows) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda x: f"{x:.3f}" if isinstance(x, float) else str(x)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def _write_tables(run_dir: Path, config, summary: dict) -> None:
    from jaxattrib.fileio import atomic_write_text
    c = summary["counts"]
    md = (f"CGI-DM benchmark ({config.source}): test half {c['member_test']} members vs "
          f"{c['holdout_test']} hold-outs; thresholds calibrated on {c['calib']} other "
          f"non-members; choices by validation AUC ({c['member_val']} + {c['holdout_val']}). "
          f"{summary.get('pgd', '')}\n\n"
          + _md_table(summary["test"])
          + (f"\n\n{summary['verdict']}" if summary.get("verdict") else "")
          + "\n\nValidation:\n\n" + _md_table(summary["validation"]) + "\n")
    atomic_write_text(run_dir / "tables" / "cgi_dm.md", md)
    atomic_write_text(run_dir / "tables" / "cgi_dm.json",
                      json.dumps(summary, indent=1, default=float))


def _report(run_dir, config, summary, parts, sc, y_test, cgi) -> None:
    from jaxattrib.metrics import roc_curve
    from jaxattrib.report.html import render_run_report
    from jaxattrib.runs.cgi_dm import write_section
    n = min(config.report_images, len(sc["member_test"]), len(sc["holdout_test"]))
    trip, lab = {"original": [], "masked": [], "recovered": []}, []
    for h, who in (("member_test", "member"), ("holdout_test", "hold-out")):
        r = parts[h]
        for i in range(n):
            for k in trip:
                trip[k].append(r[k][i])
            lab += [who, "masked", f"rec. {sc[h][i]:.2f}"]
    examples = None
    if lab:
        examples = {"file": "cgi_bench_images.png", "labels": lab,
                    **{k: np.stack(v) for k, v in trip.items()},
                    "caption": "original | masked | recovered (similarity to the original), "
                               "test members then test hold-outs"}
    s = np.r_[sc["member_test"], sc["holdout_test"]]
    f, t, _ = roc_curve(s, y_test)
    write_section(run_dir, "cgi_bench", f"CGI-DM benchmark ({config.source})", order=1,
                  roc={"file": "cgi_bench_roc.png", "curves": {summary["test"][0]["method"]: (f, t)},
                       "title": "CGI-DM test half", "caption": "ROC (test half)"},
                  examples=examples, examples_first=True,
                  tables=[{"caption": "test half; thresholds calibrated on the calib split",
                           "rows": summary["test"]},
                          {"caption": "validation (all choices)", "rows": summary["validation"]}],
                  text=" ".join(t for t in (summary.get("verdict"), summary.get("pgd", ""),
                                            f"counts {summary['counts']}; PGD variant used: "
                                            f"{cgi}") if t))
    render_run_report(run_dir, title="jaxattrib CGI-DM benchmark")
