"""The embedded default demo: fine-tune → record → generate → attribute → report, on CPU.

Each stage caches its outputs in the run directory, so a second run reuses what is done and a
killed run continues (fine-tuning resumes from the record's last checkpoint; feature stores
resume by chunk). The run directory::

    config.json           the resolved config (a rerun with another config is refused)
    data/train.npz        fine-tuning set (exemplars of new concepts + distractors)
    data/holdout.npz      unseen images of the new concepts (CGI-DM negatives)
    record/               trajectory record (orbax checkpoints + manifest + per-step log)
    generations/          queries.npz (+ PNGs): generated images of each new concept
    features/<method>/    resumable feature stores; scores/<method>.npy [Q, N]
    results/*.json, *.png report sections; report.html

Ground truth is by construction (AbC-style): a query generated for concept c is attributed
correctly when the training images of c (its exemplars) rank on top. λ is chosen on a
validation half of the queries; metrics are reported on the other half.

The stages are shared with the customization benchmark (:mod:`jaxattrib.eval.benchmarks`),
which passes a stratified exemplar choice, its own query plan and two ground truths
(:class:`Variant`) to the same functions.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import jax
import numpy as np

from jaxattrib.attribution.methods import METHODS
from jaxattrib.config import ConfigError
from jaxattrib.fingerprint import raw_arrays as _fingerprint_of  # recipe of stored cache keys
from jaxattrib.runs.rundir import RunDir, check_run_config, save_npz
from jaxattrib.runs.demo_attribute import _validation_mask, attribute_stage

logger = logging.getLogger(__name__)


def _log(msg: str) -> None:
    logger.info("[jaxattrib demo %s] %s", time.strftime('%H:%M:%S'), msg)


# Every registered method, in registry order (Journey-TRAK's queries are the generations'
# sampling trajectories, which generate_stage then records).
DEMO_METHODS = tuple(METHODS)


def check_demo_config(config, source: str = "demo config") -> None:
    """Checks every field of a ``demo``-layout config before anything is loaded or computed;
    raises :class:`ConfigError` naming the field and what was expected."""
    from jaxattrib.runs.config_check import _field

    def need(field, ok, expected):
        v = _field(config, field)
        if v is not None and not ok(v):
            raise ConfigError(f"{source}: {field}={v!r}: expected {expected}")

    def int_at_least(lo):
        return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo

    def number(lo, hi=float("inf"), open_lo=True):
        return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and \
            np.isfinite(v) and (v > lo if open_lo else v >= lo) and v <= hi

    for field, lo in (("seed", 0), ("data.exemplars_per_concept", 1),
                      ("data.holdouts_per_concept", 0), ("data.distractors", 0),
                      ("data.per_combination", 1), ("finetune.steps", 0),
                      ("finetune.batch_size", 1), ("finetune.checkpoint_every", 0),
                      ("generate.per_concept", 2), ("generate.num_inference_steps", 1),
                      ("attribution.k", 1), ("attribution.num_timesteps", 1),
                      ("attribution.microbatch", 1), ("attribution.topk", 1),
                      ("attribution.concept_inversion_steps", 0), ("cgi_dm.num_steps", 1),
                      ("cgi_dm.batch_size", 1), ("report.show_queries", 0)):
        need(field, int_at_least(lo), f"an integer >= {lo}")
    need("finetune.learning_rate", number(0.0), "a positive finite number")
    need("finetune.mode", lambda v: v in ("full", "lora"), "'full' or 'lora'")
    need("generate.guidance_scale", number(0.0, open_lo=False), "a finite number >= 0")
    need("attribution.methods", lambda v: len(v) > 0 and all(m in DEMO_METHODS for m in v),
         f"a non-empty tuple of {DEMO_METHODS}")
    need("attribution.lambda_ratios", lambda v: len(v) > 0 and all(number(0.0)(r) for r in v),
         "a non-empty tuple of positive numbers")
    from jaxattrib.runs.config_check import check_attribution_fields
    a = {k: v for k, v in (config.attribution.to_dict() if "attribution" in config else {}
                           ).items() if k in ("params", "projection")}
    check_attribution_fields(a, f"{source}: attribution")
    need("cgi_dm.t_min", int_at_least(0), "an integer >= 0")
    need("cgi_dm.t_max", int_at_least(1), "an integer >= 1")
    if _field(config, "cgi_dm.t_min", 0) >= _field(config, "cgi_dm.t_max", 1):
        raise ConfigError(f"{source}: cgi_dm.t_min={config.cgi_dm.t_min} >= cgi_dm.t_max="
                          f"{config.cgi_dm.t_max}: expected t_min < t_max")
    need("cgi_dm.calibration_fpr", number(0.0, 1.0, open_lo=False), "a number in [0, 1]")
    if _field(config, "cgi_dm.enabled") and _field(config, "data.holdouts_per_concept") == 0:
        raise ConfigError(f"{source}: data.holdouts_per_concept=0 but cgi_dm.enabled: CGI-DM "
                          f"calibrates on hold-outs (set cgi_dm.enabled=False or give "
                          f"hold-outs)")


def build_data(run_dir: Path, config, base_info: dict, stratify: str | None = None) -> dict:
    """Fine-tuning set (exemplars + distractors) and hold-outs, from the synthetic generator.

    ``stratify``: a synthetic concept (e.g. ``'background'``); if given, each new concept's
    exemplars cycle through that concept's values in the spec's order (``exemplars_per_concept``
    must be a multiple of their number), so every exemplar carries a known variation; hold-outs
    come from the remaining renders. ``None`` (the demo): a random draw.
    """
    path, hold_path = RunDir(run_dir).data_file("train"), RunDir(run_dir).data_file("holdout")
    if path.exists() and hold_path.exists():
        return {"train": dict(np.load(path)), "holdout": dict(np.load(hold_path))}
    from jaxattrib.train.base_model import spec_from_info
    from jaxattrib.data.synthetic import make_synthetic, make_withheld
    spec = spec_from_info(base_info, per_combination=config.data.per_combination)
    held = [dict(h) for h in base_info["held_out"]]
    seed = 1000 + config.seed                  # renders the base model has never seen
    new = make_withheld(spec, seed, held)
    rng = np.random.default_rng(config.seed)
    ex_idx, ho_idx, concept_of = [], [], {}
    for ci, h in enumerate(held):
        members = [i for i in range(len(new)) if
                   new.label_strings("shape")[i] == h["shape"] and
                   new.label_strings("color")[i] == h["color"]]
        members = list(rng.permutation(members))
        ne, nh = config.data.exemplars_per_concept, config.data.holdouts_per_concept
        if len(members) < ne + nh:
            raise ConfigError(f"data: concept {h} has {len(members)} renders; exemplars + "
                              f"holdouts = {ne + nh} (raise data.per_combination)")
        if stratify is not None:
            members = _stratified_order(members, new.label_strings(stratify),
                                        spec.vocab(stratify), ne, f"data (concept {h})")
        for i in members[:ne]:
            concept_of[i] = ci
        ex_idx += members[:ne]
        ho_idx += members[ne:ne + nh]
    known = make_synthetic(spec, seed, withhold=held)
    dis_idx = rng.choice(len(known), config.data.distractors, replace=False)
    images = np.concatenate([new.images[ex_idx], known.images[dis_idx]])
    captions = [new.captions[i] for i in ex_idx] + [known.captions[i] for i in dis_idx]
    ids = [new.ids[i] for i in ex_idx] + [known.ids[i] for i in dis_idx]
    concept = np.array([concept_of[i] for i in ex_idx] + [-1] * len(dis_idx), np.int32)
    ho_concept = np.repeat(np.arange(len(held)), config.data.holdouts_per_concept)
    train = {"images": images.astype(np.float32), "captions": np.array(captions),
             "ids": np.array(ids), "concept": concept}
    holdout = {"images": new.images[ho_idx].astype(np.float32),
               "captions": np.array([new.captions[i] for i in ho_idx]),
               "ids": np.array([new.ids[i] for i in ho_idx]), "concept": ho_concept}
    save_npz(path, **train)
    save_npz(hold_path, **holdout)
    return {"train": train, "holdout": holdout}


def _stratified_order(members: list, values: tuple, vocab: tuple, ne: int, where: str) -> list:
    """``members`` reordered so the first ``ne`` cycle through ``vocab`` (each value's members in
    their given order); the rest keep their order."""
    if ne % len(vocab):
        raise ConfigError(f"{where}: exemplars_per_concept={ne} must be a multiple of the "
                          f"{len(vocab)} variations {vocab}")
    by_value = {v: [i for i in members if values[i] == v] for v in vocab}
    short = {v: len(m) for v, m in by_value.items() if len(m) < ne // len(vocab)}
    if short:
        raise ConfigError(f"{where}: too few renders per variation {short} for "
                          f"{ne // len(vocab)} exemplars each (raise data.per_combination)")
    head = [by_value[v][j] for j in range(ne // len(vocab)) for v in vocab]
    taken = set(head)
    return head + [i for i in members if i not in taken]


def base_model_ref(folder: str, record_dir: Path) -> str:
    """How a fine-tuning record names its base model: ``'embedded'`` for the package's own
    model (so a run directory stays valid when it or the checkout moves), a user's folder by
    its path. A record written before this convention holds the embedded model's absolute
    path (``.../jaxattrib/assets/base_model``, from any checkout); that value is kept so the
    record still resumes."""
    from jaxattrib.train.base_model import ASSET_DIR
    if not folder or Path(folder).resolve() != ASSET_DIR:
        return str(folder)
    manifest = Path(record_dir) / "manifest.json"
    if manifest.is_file():
        try:
            old = json.loads(manifest.read_text()).get("model", {}).get("base_model")
        except (json.JSONDecodeError, AttributeError):
            old = None   # the record itself reports a broken manifest when it is opened
        if isinstance(old, str) and Path(old).parts[-3:] == ("jaxattrib", "assets",
                                                             "base_model"):
            return old
    return "embedded"


def finetune_stage(run_dir: Path, config, pipe, train: dict, progress: bool = True):
    """Fine-tunes the UNet on the fine-tuning set, writing the trajectory record."""
    from jaxattrib import parallel
    from jaxattrib.diffusion.schedule import schedule_from_diffusers_config
    from jaxattrib.train.diffusion_task import make_diffusion_loss
    from jaxattrib.train.finetune import TrainConfig, finetune

    sched = schedule_from_diffusers_config(pipe.scheduler_config)
    # latent base models train on the VAE posterior mean, what attribution encodes with
    loss_fn = make_diffusion_loss(pipe.unet_config, pipe.text_config, sched, pipe.vae_config,
                                  sample_posterior=not pipe.is_latent)
    ids = pipe.tokenizer(list(train["captions"]),
                         max_length=pipe.text_config.max_position_embeddings)
    images = train["images"]
    f = config.finetune
    tc = TrainConfig.from_section(f, schedule="constant", warmup_steps=0, weight_decay=0.0,
                                  seed=config.seed, log_every=20)
    params = {"unet": pipe.unet_params, "text_encoder": pipe.text_params}
    model_info = {"base_model": base_model_ref(pipe.folder, RunDir(run_dir).record)}
    if pipe.is_latent:
        from jaxattrib.diffusion.latents import LATENT_RULE
        params["vae"] = pipe.vae_params
        model_info["vae_latents"] = LATENT_RULE
    trained, record = finetune(
        loss_fn, params, len(images), lambda idx: {"images": images[idx], "input_ids": ids[idx]},
        tc, RunDir(run_dir).record.resolve(), mesh=parallel.make_mesh(1), progress=progress,
        model_info=model_info, dataset_info={"ids": [str(i) for i in train["ids"]]})
    return trained["unet"], record


def demo_query_plan(config, held: list[dict],
                    backgrounds: tuple[str, ...] = ("black", "white", "gray")) -> dict:
    """The demo's queries: ``per_concept`` prompts of each new concept, each on a background
    drawn uniformly from ``backgrounds`` (the base model's ``data_spec.backgrounds``).
    Returns ``{'prompts': [Q] str, 'concept': [Q] int}`` (concept = index into ``held``)."""
    from jaxattrib.data.synthetic import caption
    spec_bg = tuple(backgrounds)
    rng = np.random.default_rng(config.seed + 7)
    prompts, concept = [], []
    for ci, h in enumerate(held):
        for j in range(config.generate.per_concept):
            bg = spec_bg[rng.integers(len(spec_bg))]
            prompts.append(caption(h["shape"], h["color"], bg))
            concept.append(ci)
    return {"prompts": np.array(prompts), "concept": np.array(concept)}


def generate_stage(run_dir: Path, config, pipe, unet_params, held: list[dict],
                   plan: dict | None = None, backgrounds: tuple[str, ...] | None = None) -> dict:
    """Generates the queries of ``plan`` (default :func:`demo_query_plan` over ``backgrounds``,
    the base model's ``data_spec.backgrounds``; ``None``: the pixel model's three): a dict with
    ``prompts [Q]``, ``concept [Q]`` and any other ``[Q]`` arrays, which are stored alongside
    ``images [Q, H, W, 3]`` in ``generations/queries.npz`` (cached).

    With ``journey-trak`` among ``attribution.methods`` the sampling trajectories are kept too,
    in ``generations/trajectory.npz`` (``x0_preds [Q, S, h, w, c]`` in the UNet's space,
    ``timesteps [Q, S]``). A run whose queries were generated without them regenerates them
    (same prompts and keys) and keeps its stored images, after checking the regenerated ones
    match them (max |Δ| ≤ 0.02), so every other cached stage stays valid."""
    gens = RunDir(run_dir).generations
    path, tpath = gens / "queries.npz", gens / "trajectory.npz"
    need_traj = "journey-trak" in tuple(config.attribution.methods)
    if path.exists() and (not need_traj or tpath.exists()):
        return dict(np.load(path))
    from jaxattrib.generate import generate, query_key, save_images
    if plan is None:
        plan = (demo_query_plan(config, held) if backgrounds is None
                else demo_query_plan(config, held, backgrounds))
    prompts = [str(p) for p in plan["prompts"]]
    _log(f"generating {len(prompts)} queries" + (" with their sampling trajectories"
                                                  if need_traj else ""))
    g = generate(pipe, prompts, query_key(config.seed), unet_params=unet_params,
                 num_inference_steps=config.generate.num_inference_steps,
                 guidance_scale=config.generate.guidance_scale, return_trajectory=need_traj)
    images = np.clip(np.asarray(g.images), -1, 1).astype(np.float32)
    if need_traj:
        stored = dict(np.load(path)) if path.exists() else None
        if stored is not None:
            if [str(p) for p in stored["prompts"]] != prompts:
                raise ConfigError(f"{path}: its prompts differ from this config's query plan; "
                                  f"use a new --run-dir or pass --fresh")
            err = float(np.max(np.abs(stored["images"] - images)))
            if err > 0.02:
                raise ConfigError(f"{path}: regenerating its queries with their sampling "
                                  f"trajectories gave other images (max |Δ| = {err:.3g}); "
                                  f"use a new --run-dir or pass --fresh")
        save_npz(tpath, x0_preds=np.asarray(g.trajectory.x0_preds, np.float32),
                 timesteps=np.asarray(g.trajectory.timesteps, np.int32))
        if stored is not None:
            return stored
    out = {**{k: np.asarray(v) for k, v in plan.items()}, "images": images,
           "prompts": np.array(prompts)}
    save_images(RunDir(run_dir).generations, images, prompts, prefix="query")
    save_npz(path, **out)
    return out


def cgi_dm_stage(run_dir: Path, config, pipe, ft_params, train: dict, holdout: dict,
                 progress: bool = True) -> dict:
    """CGI-DM: members (fine-tuning exemplars) vs hold-outs of the same concepts.

    The first half of the hold-outs calibrates the threshold (known non-members); the rest of
    the hold-outs and the members are the evaluation set. Baselines: the plain loss gap between
    the two models without inversion, and the similarity of the masked input alone.

    Latent base models: PGD runs on the VAE latent, as in ``jaxattrib cgi-dm`` and the authors'
    code [code] (:func:`jaxattrib.models.latent_io.vae_codec`); the images are encoded with
    the VAE posterior **mean** — what the demo fine-tuned on (``vae_latents: 'mean'``), so a
    member's ``z0`` is exactly the latent the model was trained on [design]. The similarities
    and the report's images are on pixels: ``original`` is the image, ``masked`` and
    ``recovered`` are decoded (``[N, H, W, 3]``).
    """
    path = RunDir(run_dir).cache("cgi_dm") / "scores.npz"
    if path.exists():
        return dict(np.load(path, allow_pickle=False))
    from jax.tree_util import Partial

    from jaxattrib.authentication import cgi_dm
    from jaxattrib.diffusion.schedule import schedule_from_diffusers_config
    from jaxattrib.models.latent_io import vae_codec
    from jaxattrib.models.unet import UNet2DConditionModel

    encode, decode = vae_codec(pipe, sample=False)   # (None, None): a pixel base model
    model = UNet2DConditionModel(pipe.unet_config)
    apply = lambda p, z, t, c: model.apply({"params": p}, z, t, c)  # noqa: E731
    eps_pre, eps_ft = Partial(apply, pipe.unet_params), Partial(apply, ft_params)
    sched = schedule_from_diffusers_config(pipe.scheduler_config)
    c = config.cgi_dm
    cfg = cgi_dm.CGIDMConfig.from_section(c)   # num_steps, t_min, t_max; the rest default
    members = train["concept"] >= 0
    m_img, m_cap = train["images"][members], train["captions"][members]
    n_cal = len(holdout["images"]) // 2
    cal_img, cal_cap = holdout["images"][:n_cal], holdout["captions"][:n_cal]
    ev_img = np.concatenate([m_img, holdout["images"][n_cal:]])
    ev_cap = np.concatenate([m_cap, holdout["captions"][n_cal:]])
    labels = np.r_[np.ones(len(m_img)), np.zeros(len(holdout["images"]) - n_cal)].astype(bool)
    ctx = lambda caps: np.asarray(pipe.encode_prompts(list(caps)))  # noqa: E731
    key = jax.random.PRNGKey(config.seed + 23)
    _log(f"CGI-DM: {len(ev_img)} images ({int(labels.sum())} members), {n_cal} calibration "
         f"hold-outs, {c.num_steps} PGD steps")
    res = cgi_dm.authenticate(ev_img, eps_pre, eps_ft, sched, cfg, key, holdout_images=cal_img,
                              cond=ctx(ev_cap), holdout_cond=ctx(cal_cap), similarity="ssim",
                              image_size=ev_img.shape[1], fpr=c.calibration_fpr,
                              check_params=(pipe.unet_params, ft_params),
                              batch_size=c.batch_size, encode=encode, decode=decode)
    gap = cgi_dm.loss_gap_scores(ev_img, eps_pre, eps_ft, sched, key, cond=ctx(ev_cap),
                                 batch_size=c.batch_size, encode=encode)
    masked = cgi_dm.masked_similarity_scores(ev_img, cfg, key, batch_size=c.batch_size,
                                             encode=encode, decode=decode)
    out = {"labels": labels, "scores": np.asarray(res["scores"]),
           "p_values": np.asarray(res["p_values"]), "decisions": np.asarray(res["decisions"]),
           "threshold": np.asarray(res["threshold"]), "loss_gap": np.asarray(gap),
           "masked_similarity": np.asarray(masked), "original": res["original"],
           "masked": res["masked"], "recovered": res["recovered"],
           "holdout_scores": np.asarray(res["calibration"]["holdout_scores"])}
    save_npz(path, **out)
    return out


def cgi_dm_report(run_dir: Path, cg: dict, space: str = "") -> dict:
    """Writes the ``cgi_dm`` report section (ROC, examples grid of ``cg``'s pixel images);
    ``space``, if given, says where PGD ran (latent base models). Returns the CGI-DM row."""
    from jaxattrib.metrics import accuracy_at_threshold, roc_auc, roc_curve, tpr_at_fpr
    from jaxattrib.runs.cgi_dm import write_section
    labels = cg["labels"].astype(bool)
    rows, curves = [], {}
    for name, key in (("CGI-DM (SSIM of own recovery)", "scores"),
                      ("loss gap, no inversion", "loss_gap"),
                      ("masked-input similarity", "masked_similarity")):
        s = cg[key]
        fpr, tpr, _ = roc_curve(s, labels)
        curves[name] = (fpr, tpr)
        rows.append({"method": name, "AUC": roc_auc(s, labels),
                     "TPR@1%FPR": tpr_at_fpr(s, labels, 0.01),
                     "TPR@10%FPR": tpr_at_fpr(s, labels, 0.10)})
    thr = float(cg["threshold"])
    rows[0]["accuracy at calibrated threshold"] = accuracy_at_threshold(cg["scores"], labels, thr)
    sentence = cgi_dm_sentence(cg, rows)
    n = min(8, len(labels))
    pick = np.r_[np.flatnonzero(labels)[: n // 2], np.flatnonzero(~labels)[: n - n // 2]]
    lab = []
    for i in pick:
        lab += [("member" if labels[i] else "hold-out"), "masked",
                f"rec. {cg['scores'][i]:.2f}"]
    write_section(run_dir, "cgi_dm", "CGI-DM copyright authentication", order=3,
                  roc={"file": "cgi_dm_roc.png", "curves": curves, "caption": "ROC curves",
                       "title": "CGI-DM: fine-tuning members vs hold-outs"},
                  examples={"file": "cgi_dm_examples.png", "original": cg["original"][pick],
                            "masked": cg["masked"][pick], "recovered": cg["recovered"][pick],
                            "labels": lab, "caption": "original | masked | recovered (SSIM to "
                                                      "the original)"},
                  **({"text": " ".join(t for t in (
                      sentence, f"PGD on {space}; the masked and recovered images are "
                                f"VAE-decoded to pixels." if space else "") if t)}
                     if sentence or space else {}),
                  tables=[{"caption": "members (fine-tuning exemplars) vs hold-outs of the same "
                           "concepts; threshold calibrated on a separate half of the hold-outs",
                           "rows": rows}])
    return rows[0]


#: the demo's CGI-DM rows (name, key of the ``cgi_dm_stage`` output, uses a model)
_CGI_SCORES = (("CGI-DM (SSIM of own recovery)", "scores", True),
               ("loss gap, no inversion", "loss_gap", True),
               ("masked-input similarity", "masked_similarity", False))


def cgi_dm_sentence(cg: dict, rows: list) -> str | None:
    """The report's sentence when CGI-DM's AUC (``rows[0]``) is at or below its strongest
    baseline's (``rows[1:]``, in :data:`_CGI_SCORES` order), from the run's scores
    (:func:`jaxattrib.report.verdict.cgi_dm_cause`); None when CGI-DM wins."""
    from jaxattrib.report.verdict import cgi_dm_cause, explain
    j = 1 + int(np.argmax([r["AUC"] for r in rows[1:]]))
    name, key, uses_model = _CGI_SCORES[j]
    labels = cg["labels"].astype(bool)
    cause = cgi_dm_cause(cg["scores"], labels, cg[key], name, baseline_uses_model=uses_model,
                         loss_gap=None if key == "loss_gap" else cg["loss_gap"])
    return explain("CGI-DM", rows[0]["AUC"], name, rows[j]["AUC"], "AUC", cause,
                   measured="AUC and member/hold-out score separations")


def _attribution_sentences(scores: dict, relevant: np.ndarray, test: np.ndarray,
                           blank: np.ndarray, off: np.ndarray, maps: dict) -> list[str]:
    """One sentence per method whose test mAP (``maps``) is at or below a baseline's
    ('random', then 'pixel', when present in ``scores``), the cause from the per-query APs,
    blank / off-concept generations and constant score rows
    (:func:`jaxattrib.report.verdict.attribution_cause`)."""
    from jaxattrib.metrics import average_precision
    from jaxattrib.report.verdict import attribution_cause, explain, outcome
    baselines = [b for b in ("random", "pixel") if b in scores]
    rt = relevant[test]
    ap = {m: np.atleast_1d(average_precision(s[test], rt)) for m, s in scores.items()}
    out = []
    for method, s in scores.items():
        if method in ("random", "pixel"):
            continue
        for b in baselines:
            if outcome(maps[method], maps[b]) == "win":
                continue
            st = s[test]
            cause, measured = attribution_cause(b, ap[method], ap[b], blank=blank[test],
                                                off_concept=off[test],
                                                constant=st.max(1) == st.min(1))
            out.append(explain(method, maps[method], b, maps[b], "mAP", cause, measured))
            break
    return out


def example_queries(candidates: np.ndarray, blank: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` of ``candidates`` (query indices, in order) whose generation is not
    blank (``blank [Q]`` bool): a blank generation is never an attribution example."""
    candidates = np.asarray(candidates, int)
    return candidates[~np.asarray(blank, bool)[candidates]][:n]


def report_stage(run_dir: Path, config, train, queries, scores, gen_acc, held,
                 spec=None) -> dict:
    """Writes the demo's report sections and ``report.html``; returns the per-method test
    metrics. ``spec``: the base model's :class:`~jaxattrib.data.synthetic.SyntheticConceptSpec`
    (its vocabularies classify the generations; default: the pixel model's)."""
    from jaxattrib.metrics import mean_average_precision, recall_at_k
    from jaxattrib.report.html import render_run_report, write_result
    from jaxattrib.report.images import image_grid, save_png, topk_image
    test = ~_validation_mask(queries["concept"])
    relevant = queries["concept"][:, None] == train["concept"][None, :]
    K = config.attribution.topk
    rows, summary = [], {}
    for method, s in scores.items():
        st, rt = s[test], relevant[test]
        top = np.argsort(-st, axis=1, kind="stable")[:, :K]
        hit = np.take_along_axis(rt, top, 1).any(1)
        row = {"method": method, f"Recall@{K}": float(np.nanmean(recall_at_k(st, rt, K))),
               "mAP": float(mean_average_precision(st, rt)),
               f"correct concept in top-{K}": float(hit.mean())}
        rows.append(row)
        summary[method] = row
    concepts = [f"{h['color']} {h['shape']}" for h in held]
    from jaxattrib.report.images import BLANK_STD, RED, blank_mask
    blank = blank_mask(queries["images"])
    if spec is None:
        from jaxattrib.data.synthetic import SyntheticConceptSpec
        spec = SyntheticConceptSpec()
    shape_hit, color_hit = _concept_hits(queries, held, spec)
    off = ~blank & ~(shape_hit & color_hit)
    why = _attribution_sentences(scores, relevant, test, blank, off,
                                 {m: r["mAP"] for m, r in summary.items()})
    write_result(run_dir, "attribution", "Attribution of generated images to fine-tuning data",
                 tables=[{"caption": f"Test queries ({int(test.sum())}), ground truth = the "
                          f"query concept's exemplars; λ chosen on the validation queries", "rows": rows}],
                 text=("Fine-tuning set: exemplars of the new concepts "
                       f"({', '.join(concepts)}) plus distractors the base model already knew. "
                       "Each query is a generation of one new concept."
                       + "".join("\n\n" + w for w in why)), order=1)
    # top-k grids for the best gradient method
    best = max(rows, key=lambda r: r["mAP"])["method"]
    s = scores[best]
    images = []
    shown = example_queries(np.flatnonzero(test), blank, config.report.show_queries)
    for q in shown:
        grid, _ = topk_image(queries["images"][q], train["images"], s[q], k=8,
                             correct=relevant[q], query_label=concepts[queries["concept"][q]])
        path = RunDir(run_dir).results / f"topk_{best}_{q:03d}.png"
        save_png(path, grid)
        images.append({"path": str(path.relative_to(run_dir)),
                       "caption": f"query {q} ({queries['prompts'][q]}): top-8 by {best}; "
                                  f"green = exemplar of the query's concept"})
    n_blank_test = int((blank & test).sum())
    write_result(run_dir, "topk", f"Top attributions ({best})", images=images, order=2,
                 **({"text": f"{n_blank_test} blank test generation(s) skipped (never shown as "
                             f"an example)."} if n_blank_test else {}))
    gens = image_grid(queries["images"], nrow=config.generate.per_concept,
                      labels=[_short(p) + ("\nBLANK" if b else "")
                              for p, b in zip(queries["prompts"], blank)],
                      borders=[RED if b else None for b in blank])
    save_png(RunDir(run_dir).results / "generations.png", gens)
    write_result(run_dir, "generations", "Generated queries",
                 metrics={**{f"{k} accuracy": v for k, v in gen_acc.items()},
                          "blank generations": int(blank.sum())},
                 images=[{"path": "results/generations.png",
                          "caption": "one row per new concept (prompt under each image; a "
                                     "blank generation is framed red and marked BLANK)"}],
                 text="Concept accuracy: the package's pixel-statistics classifier applied to the "
                      "generations, compared with the prompted concept. "
                      f"A generation is blank when the standard deviation of its pixel values "
                      f"is below {BLANK_STD:g} (pixels in [-1, 1]): "
                      f"{int(blank.sum())} of {len(blank)} are"
                      + (f" ({'query' if blank.sum() == 1 else 'queries'} "
                         f"{', '.join(map(str, np.flatnonzero(blank)))}); they are never picked "
                         f"as attribution examples." if blank.any() else "."),
                 order=0)
    render_run_report(run_dir, title="jaxattrib demo")
    return summary


def _short(prompt: str) -> str:
    """'a red star on a gray background' -> 'red star/gray' (fits under a 16-px image)."""
    words = str(prompt).replace(" background", "").split()
    return " ".join(words[1:3]) + ("/" + words[-1] if "on" in words else "")


def open_base_run(run_dir: str | Path, config):
    """Opens a run directory of a config built on a pretrained base model (the demo and the
    synthetic-concept benchmarks): checks ``config`` against the run's saved one, then loads
    ``config.base_model`` (empty: the embedded model). Returns ``(run_dir, pipe, info)``,
    ``info`` being the base model's :func:`~jaxattrib.train.base_model.base_model_info`."""
    run_dir = Path(run_dir)
    from jaxattrib.config import ATTRIBUTION_LEGACY
    check_run_config(run_dir, config, adopt=ATTRIBUTION_LEGACY)
    pipe, info = load_base(config.base_model, run_dir)
    return run_dir, pipe, info


def load_base(base_model: str = "", run_dir: str | Path | None = None):
    """``(pipe, info)`` of a base model pretrained on the synthetic concept set: ``base_model``
    a pipeline folder with a ``jaxattrib_base.json`` (``''``: the embedded model); a latent
    one's ``data_spec.size`` is checked against UNet ``sample_size`` × VAE factor. With
    ``run_dir``, a run directory made with another base model is refused first
    (:func:`check_run_data_size`), before the model loads."""
    from jaxattrib.train.base_model import base_model_info, load_base_model
    folder = base_model or None
    if folder is not None and not (Path(folder) / "jaxattrib_base.json").is_file():
        raise ConfigError(f"base_model={folder!r}: no jaxattrib_base.json there; the demo needs a "
                          f"base model pretrained on the synthetic concept set, described by that "
                          f"file (data_spec, held_out; see jaxattrib/assets/base_model)")
    info = base_model_info(folder)
    if run_dir is not None:
        check_run_data_size(Path(run_dir), info, folder)
    pipe = load_base_model(folder)
    if pipe.is_latent:
        from jaxattrib.diffusion.latents import check_pixel_images
        size = int(info["data_spec"]["size"])
        check_pixel_images((size, size, 3), pipe.unet_config, pipe.vae_config,
                           f"{folder}/jaxattrib_base.json data_spec.size")
    return pipe, info


def pgd_space(pipe) -> str:
    """Where CGI-DM's PGD runs on a latent base model, for reports (``''`` for a pixel one):
    the VAE posterior-mean latent the model was fine-tuned on."""
    if not pipe.is_latent:
        return ""
    from jaxattrib.diffusion.latents import sample_shape
    return (f"VAE latents {list(sample_shape(pipe.unet_config))} (VAE posterior mean, "
            f"as fine-tuned)")


def check_run_data_size(run_dir: Path, info: dict, folder=None) -> None:
    """A run directory whose cached ``data/train.npz`` holds images of another size than the
    base model's ``data_spec.size`` was made with another base model, typically the former
    16-px pixel embedded default (the embedded model is the 32-px latent one since issue 21):
    one :class:`ConfigError` naming the file, both sizes and the way back, before any model
    is loaded (resuming would mix that run's record with this model). ``info``: the base
    model's :func:`~jaxattrib.train.base_model.base_model_info`; ``folder``: its folder
    (``None``: the embedded model)."""
    size = int(info["data_spec"]["size"])
    path = RunDir(run_dir).data_file("train")
    if not path.is_file():
        return
    import zipfile
    try:
        with np.load(path) as z:
            shape = tuple(z["images"].shape[1:]) if "images" in z.files else None
    except (OSError, ValueError, zipfile.BadZipFile):
        return                           # unreadable: the stage that reads it says so
    if shape is not None and shape[:2] != (size, size):
        which = f"base_model={str(folder)!r}" if folder else "the embedded base model"
        raise ConfigError(
            f"{path}: images are {shape[0]}x{shape[1]} px but {which} takes {size}x{size} "
            f"(data_spec.size): this run directory was made with another base model (the "
            f"embedded default was the 16-px pixel model before 2026-12-07). Use a new run "
            f"directory, or resume it with that model: rebuild it with `python -m "
            f"jaxattrib.train.base_model --out DIR` and --set base_model=DIR")


def run_demo(config, run_dir: str | Path = "runs/demo", progress: bool = True) -> dict:
    """Runs (or resumes) the demo; returns the per-method test metrics."""
    t0 = time.time()
    check_demo_config(config)
    run_dir, pipe, info = open_base_run(run_dir, config)
    _log(f"base model: {pipe.folder}")
    data = build_data(run_dir, config, info)
    train, holdout = data["train"], data["holdout"]
    _log(f"fine-tuning set: {len(train['images'])} images "
         f"({int((train['concept'] >= 0).sum())} exemplars); {len(holdout['images'])} hold-outs")
    unet_params, record = finetune_stage(run_dir, config, pipe, train, progress)
    step = record.latest_step()
    record.close()
    held = [dict(h) for h in info["held_out"]]
    from jaxattrib.train.base_model import spec_from_info
    spec = spec_from_info(info)
    queries = generate_stage(run_dir, config, pipe, unet_params, held,
                             backgrounds=spec.backgrounds)
    gen_acc = _generation_accuracy(queries, held, spec)
    _log(f"generated {len(queries['images'])} queries; concept accuracy {gen_acc}")
    scores = attribute_stage(run_dir, config, pipe, unet_params, train, queries,
                             _fingerprint_of(train["images"]), step, progress)
    if config.cgi_dm.enabled:
        cg = cgi_dm_stage(run_dir, config, pipe, unet_params, train, holdout, progress)
        cg_row = cgi_dm_report(run_dir, cg, pgd_space(pipe))
        _log("CGI-DM: " + ", ".join(f"{k}={v:.3f}" for k, v in cg_row.items()
                                     if isinstance(v, float)))
    summary = report_stage(run_dir, config, train, queries, scores, gen_acc, held, spec)
    _log(f"done in {time.time() - t0:.0f} s; report: {run_dir / 'report.html'}")
    return summary


def _concept_hits(queries: dict, held: list[dict], spec) -> tuple[np.ndarray, np.ndarray]:
    """``(shape [Q] bool, color [Q] bool)``: the package's pixel classifier, over the base
    model's :class:`~jaxattrib.data.synthetic.SyntheticConceptSpec` ``spec`` (its vocabularies;
    the image size is read from the images), reads the prompted shape / colour in each
    generated ``queries['images'] [Q, H, W, 3]``."""
    import dataclasses
    from jaxattrib.data.synthetic import classify_concepts
    spec = dataclasses.replace(spec, size=queries["images"].shape[1])
    pred = classify_concepts(queries["images"], spec)
    want_shape = np.array([spec.shapes.index(held[c]["shape"]) for c in queries["concept"]])
    want_color = np.array([spec.colors.index(held[c]["color"]) for c in queries["concept"]])
    return pred["shape"] == want_shape, pred["color"] == want_color


def _generation_accuracy(queries: dict, held: list[dict], spec) -> dict:
    """Shape and color accuracy of the generated queries against the prompted held-out
    concepts (:func:`_concept_hits`)."""
    shape_hit, color_hit = _concept_hits(queries, held, spec)
    return {"shape": float(np.mean(shape_hit)), "color": float(np.mean(color_hit))}


__all__ = ["DEMO_METHODS", "base_model_ref", "build_data", "cgi_dm_report", "cgi_dm_sentence",
           "cgi_dm_stage", "check_demo_config", "check_run_data_size", "demo_query_plan",
           "example_queries",
           "finetune_stage", "generate_stage", "load_base", "open_base_run", "pgd_space",
           "report_stage", "run_demo"]
