"""The model-zoo benchmark of source-model attribution (Zhang et al., methods.md §7).

``benchmarks/source_model_zoo.py`` runs :func:`run_source_zoo` with ``source_model:zoo`` (or
``source_model:smoke``; fields documented in :func:`jaxattrib.configs.source_model.zoo_config`).
Everything is built on this CPU from the embedded base model and cached in the run directory
(resumable: a rerun reuses every finished model and query):

1. **Data**: the base model's synthetic concept set; its captions are the candidate prompts.
   The *source* is the base fine-tuned on one render per caption for many epochs (it memorizes
   some captions, more or less strongly). It generates every caption once per
   ``generated.seeds``; those images (32-bit watermark embedded) are the data set an
   infringer takes. "Real" data = other renders of the same captions (another seed).
2. **Zoo** (:func:`jaxattrib.authentication.source_model_zoo.build_model_zoo`, one sub-zoo per ρ,
   built in ``zoo.rhos`` order so a cut-short run still has whole ρ groups): per ρ,
   ``n_shadow + n_cal + n_eval`` models fine-tuned from the base on ``n_train`` examples,
   ``round(ρ·n_train)`` of them the source's generations. Member index decides the split:
   shadow (discriminator training), calibration (every decision threshold), evaluation.
   A *reference* model (real data only, its own seed) serves Strategy 2.
3. **Queries**: the source and every model generate all candidate captions from the same
   ``query.seeds`` (images clipped to [-1, 1], as saved images would be); per model we keep the same-seed distances ``d [S, P]`` to the source, the
   images, and the watermark coefficients.
4. **Scores** per model: instance ``conf`` = ``mean(d[:, keys] < δ0)`` (δ0 as given, or with
   ``decision.delta0='calibrated'`` chosen on the innocent shadow + calibration models only,
   :func:`zoo_delta0`) for the keys of
   Strategy 1 (Wen et al.'s signal), Strategy 1's alternative (generation consistency),
   Strategy 2 (cross − within vs the reference) and random selection (mean over ``n_random``
   draws); the discriminator's logit on :func:`probe_features` (all candidates as probes);
   the watermark's bit accuracy (aggregated decode over all the model's generations).
5. **Metrics** on the evaluation split (:func:`evaluate`): Accuracy at the threshold calibrated
   on the calibration split (maximum balanced accuracy, :func:`balanced_threshold`), AUC and
   TPR at ``decision.fpr``, per ρ (that ρ's evaluation infringers vs the evaluation innocents)
   and overall; ``conf`` vs ρ (plot); the paired ρ = 0.3 comparison of the strategies with
   random selection over all ρ = 0.3 models (the strategies never see the zoo).

Outputs: ``RUN_DIR/tables/source_model_zoo.{md,json}``, ``RUN_DIR/plots/conf_vs_rho.png``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from jaxattrib.authentication import source_model as sm
from jaxattrib.authentication import source_model_zoo as zoo_lib
from jaxattrib.authentication import watermark as wm
from jaxattrib import metrics

logger = logging.getLogger(__name__)

#: instance-level methods (key-sample strategies) in table order
INSTANCE_METHODS = ("strategy1", "strategy1-consistency", "strategy2", "random")
METHOD_LABELS = {"strategy1": "instance, Strategy 1 (detection: Wen et al. signal)",
                 "strategy1-consistency": "instance, Strategy 1 alt. (detection: consistency)",
                 "strategy2": "instance, Strategy 2 (generation: cross - within)",
                 "random": "instance, random key samples (baseline)",
                 "discriminator": "statistical (discriminator on probe features)",
                 "watermark": "watermark, 32 bits (baseline)"}
SPLITS = ("shadow", "cal", "eval")


# ----------------------------------------------------------------------------- small pieces

def balanced_threshold(scores, labels) -> float:
    """Threshold τ (rule ``score >= τ`` ⇒ infringing) maximizing balanced accuracy on a
    calibration split; candidates are ±inf and midpoints of distinct scores; ties → the largest
    τ (fewest flags). ``scores``/``labels`` ``[M]``, both classes needed."""
    s = np.asarray(scores, np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(bool)
    if s.shape != y.shape or y.all() or not y.any():
        raise ValueError(f"balanced_threshold: need scores and labels of equal length with both "
                         f"classes; got {s.shape}, {int(y.sum())} positive")
    u = np.unique(s)
    cands = np.r_[-np.inf, (u[:-1] + u[1:]) / 2.0, np.inf]
    bal = [(np.mean(s[y] >= t) + np.mean(s[~y] < t)) / 2.0 for t in cands]
    return float(cands[np.flatnonzero(np.isclose(bal, np.max(bal)))[-1]])


def split_of(index: int, n_shadow: int, n_cal: int) -> str:
    """'shadow' | 'cal' | 'eval' by member index within its ρ group."""
    return "shadow" if index < n_shadow else ("cal" if index < n_shadow + n_cal else "eval")


def instance_confs(d, keys: Mapping[str, Sequence[np.ndarray]], delta0: float) -> dict:
    """``conf`` per method from same-seed distances ``d [S, P]``: ``keys[method]`` is a list of
    key index sets (one for a strategy, ``n_random`` for random); conf is averaged over sets."""
    d = np.asarray(d)
    return {m: float(np.mean([np.mean(d[:, np.asarray(k)] < delta0) for k in sets]))
            for m, sets in keys.items()}


def binary_metrics(scores, labels, threshold: float, fpr: float) -> dict:
    """Accuracy at ``threshold``, AUC, TPR at ``fpr`` of scores ``[M]`` vs 0/1 labels."""
    s, y = np.asarray(scores, np.float64), np.asarray(labels).astype(int)
    return {"accuracy": metrics.accuracy_at_threshold(s, y, threshold),
            "auc": metrics.roc_auc(s, y), f"tpr@{fpr:g}fpr": metrics.tpr_at_fpr(s, y, fpr),
            "n_pos": int(y.sum()), "n_neg": int((1 - y).sum())}


def evaluate(rows: Sequence[Mapping], fpr: float = 0.1,
             methods: Sequence[str] = INSTANCE_METHODS + ("discriminator", "watermark")) -> dict:
    """Per-method metrics on the evaluation split, thresholds from the calibration split.

    ``rows``: one dict per suspect with ``rho``, ``label`` (1 = infringing), ``split`` and a
    score per method (larger = more likely infringing). Returns ``{method: {"threshold": τ,
    "overall": {...}, "rho=0.3": {...}, ...}}`` (per ρ: that ρ's evaluation infringers vs all
    evaluation innocents).
    """
    cal = [r for r in rows if r["split"] == "cal"]
    ev = [r for r in rows if r["split"] == "eval"]
    rhos = sorted({r["rho"] for r in ev if r["label"] == 1})
    out = {}
    for m in methods:
        tau = balanced_threshold([r[m] for r in cal], [r["label"] for r in cal])
        res = {"threshold": tau,
               "overall": binary_metrics([r[m] for r in ev], [r["label"] for r in ev], tau, fpr)}
        for rho in rhos:
            sub = [r for r in ev if r["label"] == 0 or r["rho"] == rho]
            res[f"rho={rho:g}"] = binary_metrics([r[m] for r in sub], [r["label"] for r in sub],
                                                 tau, fpr)
        out[m] = res
    return out


def paired_comparison(a, b, n_boot: int = 2000, seed: int = 0) -> dict:
    """Paired comparison of per-model confs ``a`` vs ``b`` ``[M]``: mean difference with a 95%
    bootstrap CI, wins / ties / losses and the two-sided Wilcoxon signed-rank p-value."""
    from scipy import stats
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff = a - b
    ci = metrics.bootstrap_ci(diff, n=n_boot, seed=seed)
    nz = diff[diff != 0]
    p = float(stats.wilcoxon(nz).pvalue) if nz.size else 1.0
    return {"mean_a": float(a.mean()), "mean_b": float(b.mean()), "mean_diff": ci.estimate,
            "ci_low": ci.low, "ci_high": ci.high, "wins": int((diff > 0).sum()),
            "ties": int((diff == 0).sum()), "losses": int((diff < 0).sum()),
            "wilcoxon_p": p, "n": int(diff.size)}


# ----------------------------------------------------------------------------- tables

def _fmt(x):
    return "nan" if x is None or not np.isfinite(x) else f"{x:.2f}"


def markdown_table(results: Mapping, fpr: float) -> str:
    """The paper-style table: rows = methods, columns = Acc / AUC / TPR per ρ and overall."""
    groups = [k for k in next(iter(results.values())) if k != "threshold"]
    groups = [g for g in groups if g != "overall"] + ["overall"]
    t = f"tpr@{fpr:g}fpr"
    head = "| method | " + " | ".join(f"{g}: Acc / AUC / TPR@{fpr:.0%}FPR" for g in groups) + " |"
    lines = [head, "|---|" + "---|" * len(groups)]
    for m, res in results.items():
        cells = [f"{_fmt(res[g]['accuracy'])} / {_fmt(res[g]['auc'])} / {_fmt(res[g][t])}"
                 for g in groups]
        lines.append(f"| {METHOD_LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    ns = ", ".join(f"{g}: {results[next(iter(results))][g]['n_pos']} infringing vs "
                   f"{results[next(iter(results))][g]['n_neg']} innocent" for g in groups)
    return "\n".join(lines) + f"\n\nEvaluation models ({ns}).\n"


# ----------------------------------------------------------------------------- the run

def _data(config, pipe):
    """(source renders, real renders, candidate captions) of the synthetic concept set of
    ``pipe`` (:func:`~jaxattrib.runs.specs.synthetic_spec` of its folder: the embedded
    model's 32-px, 6-background set, 150 captions; a stand-in without a folder: the embedded
    model's), rendered at the pipeline's pixel size."""
    from jaxattrib.data.synthetic import make_synthetic
    from jaxattrib.runs.specs import synthetic_spec
    size = None
    if getattr(pipe, "unet_config", None) is not None:
        from jaxattrib.diffusion.latents import pixel_shape
        size = pixel_shape(pipe.unet_config, pipe.vae_config)[0]
    spec = synthetic_spec(getattr(pipe, "folder", None) or "embedded", size=size)
    d, seed = config.data, int(config.seed)
    src = make_synthetic(dataclasses.replace(spec, per_combination=d.source_per_caption),
                         seed=1000 * seed + 1)
    real = make_synthetic(dataclasses.replace(spec, per_combination=d.real_per_caption),
                          seed=1000 * seed + 2)
    captions = list(dict.fromkeys(src.captions))
    if d.captions:
        captions = captions[:int(d.captions)]
        keep = set(captions)
        src = src.subset(np.flatnonzero([c in keep for c in src.captions]))
        real = real.subset(np.flatnonzero([c in keep for c in real.captions]))
    return src, real, captions


def _watermark(config):
    rng = np.random.default_rng([int(config.seed), 32])
    return rng.integers(0, 2, wm.N_BITS).astype(np.uint8), jax.random.PRNGKey(
        int(config.seed) + 32)


def zoo_finetune_fn(pipe, train_config, mesh=None) -> Callable:
    """A ``finetune_fn`` (as :func:`~jaxattrib.authentication.source_model_zoo.diffusion_finetune_fn`:
    UNet only, the member's seed replaces ``train_config.seed``, same batch plan, keys, loss
    and optimizer as :func:`jaxattrib.train.finetune.finetune`) whose train step is jitted
    **once** for every model it trains, and which writes no trajectory record. ``finetune``
    builds a new jitted step per call, i.e. one UNet-gradient compilation per zoo member
    (about a minute each on the loaded 2-core CPU, measured); here the params are arguments
    of one compiled step."""
    import jax.numpy as jnp
    from jaxattrib import parallel
    from jaxattrib.diffusion.schedule import schedule_from_diffusers_config
    from jaxattrib.train import finetune as ft
    from jaxattrib.train.diffusion_task import make_diffusion_loss

    if train_config.mode != "full" or getattr(train_config, "train_text_encoder", False):
        raise ValueError("zoo_finetune_fn trains the full UNet only (mode='full', text encoder "
                         "frozen)")
    mesh = parallel.make_mesh(1) if mesh is None else mesh
    sched = schedule_from_diffusers_config(pipe.scheduler_config)
    loss_fn = make_diffusion_loss(pipe.unet_config, pipe.text_config, sched, pipe.vae_config)
    optimizer = ft.make_optimizer(train_config)
    train_step = ft.make_train_step(loss_fn, optimizer, train_config, mesh)
    opt_init = jax.jit(optimizer.init)

    def finetune_fn(init_params, dataset, seed, workdir=None):
        params = {"unet": init_params["unet"], "text_encoder": pipe.text_params}
        if pipe.vae_config is not None:
            params["vae"] = pipe.vae_params
        cfg = dataclasses.replace(train_config, seed=int(seed))
        trainable, frozen = ft.init_trainable(params, cfg)
        trainable = jax.tree.map(lambda x: jnp.array(x, copy=True), trainable)
        trainable, frozen = parallel.replicate((trainable, frozen), mesh)
        state = ft.TrainState(step=parallel.replicate(jnp.zeros((), jnp.int32), mesh),
                              params=trainable, opt_state=opt_init(trainable), frozen=frozen)
        ids = pipe.tokenizer(list(dataset.captions),
                             max_length=pipe.text_config.max_position_embeddings)
        for s in range(cfg.steps):
            idx, key = ft.batch_plan(cfg.seed, s, len(dataset), cfg.batch_size)
            batch = parallel.host_local_to_global(
                {"images": np.asarray(dataset.images[idx]), "input_ids": np.asarray(ids[idx])},
                mesh)
            state, _ = train_step(state, batch, parallel.replicate(key, mesh))
        out = ft.compose_params(state.params, state.frozen, cfg)
        return {"unet": jax.device_get(out["unet"])}
    return finetune_fn


def _cached(path: Path, make: Callable[[], Mapping[str, np.ndarray]]) -> dict:
    from jaxattrib.runs.rundir import save_npz
    if path.is_file():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    arrays = {k: np.asarray(v) for k, v in make().items()}
    save_npz(path, **arrays)
    return arrays


def run_source_zoo(config, run_dir: str | Path, progress: bool = True, *, pipe=None,
                   finetune_fn: Callable | None = None,
                   generate_fn_of: Callable[[Any], Callable] | None = None,
                   memorization_fn: Callable | None = None) -> dict:
    """Builds (or resumes) the zoo, queries every model, writes the tables and the plot.

    ``pipe`` (default: the embedded base model), ``finetune_fn`` (default
    :func:`~jaxattrib.authentication.source_model_zoo.diffusion_finetune_fn`), ``generate_fn_of(unet)
    -> generate_fn`` (default :func:`~jaxattrib.authentication.source_model.pipeline_generate_fn`)
    and ``memorization_fn(unet, prompts, key, n_seeds) -> [P]`` (default Wen et al.'s signal)
    can be replaced (tests use stand-ins). Returns the results dict written to
    ``tables/source_model_zoo.json``.
    """
    from jaxattrib import parallel
    from jaxattrib.runs.rundir import check_run_config
    from jaxattrib.fileio import atomic_write_text
    from jaxattrib.report.plots import line_plot_png
    from jaxattrib.train.finetune import TrainConfig

    run_dir = Path(run_dir)
    check_run_config(run_dir, config)
    t_start = time.time()
    timings: dict[str, float] = {}

    def log(msg):
        if progress:
            logger.info("[zoo %7.0f s] %s", time.time() - t_start, msg)

    if pipe is None:
        from jaxattrib.runs.specs import load_model
        pipe = load_model("embedded")
    q, k, dec = config.query, config.key_samples, config.decision
    if generate_fn_of is None:
        def generate_fn_of(unet):
            return sm.pipeline_generate_fn(pipe, unet, num_inference_steps=q.num_inference_steps,
                                           guidance_scale=q.guidance_scale)
    if memorization_fn is None:
        def memorization_fn(unet, prompts, key, n_seeds):
            from jaxattrib.generate import latent_shape, make_eps_fn, pipeline_schedule
            return sm.memorization_signal(
                make_eps_fn(pipe.unet_config, unet), pipeline_schedule(pipe),
                pipe.encode_prompts(prompts), pipe.encode_prompts([""]), key,
                sample_shape=latent_shape(pipe, 1)[1:], n_seeds=n_seeds)

    def tuner(c):
        if finetune_fn is not None:
            return finetune_fn
        cfg = TrainConfig.from_section(c, checkpoint_every=0)  # steps, batch_size, learning_rate
        key = (cfg.steps, cfg.batch_size, cfg.learning_rate)
        if key not in tuners:                  # one compiled train step per setting
            tuners[key] = zoo_finetune_fn(pipe, cfg, parallel.make_mesh(1))
        return tuners[key]

    tuners: dict = {}

    base = {"unet": pipe.unet_params}
    src_data, real, captions = _data(config, pipe)
    P = len(captions)
    if k.n > P:
        raise ValueError(f"key_samples.n={k.n}: only {P} candidate captions")

    # ---- source, its generated data set (watermarked), reference
    t0 = time.time()
    log(f"source: fine-tuning on {len(src_data)} images ({config.source.steps} steps)")
    source = zoo_lib.build_source_model(base, src_data, run_dir, tuner(config.source),
                                   seed=int(config.seed))["unet"]
    src_gen = generate_fn_of(source)
    bits, wm_key = _watermark(config)
    gen = _cached(run_dir / "generated.npz", lambda: {"images": np.asarray(wm.embed(
        np.clip(np.asarray(sm.query(src_gen, captions, list(config.generated.seeds))), -1, 1)
        .reshape(-1, *real.images.shape[1:]), bits, wm_key,
        config.generated.watermark_strength), np.float32)})
    from jaxattrib.data.dataset import ImageDataset
    n_seeds_gen = len(config.generated.seeds)
    generated = ImageDataset(
        images=gen["images"], captions=tuple(captions) * n_seeds_gen, labels={},
        label_names={}, ids=tuple(f"generated/{s}/{i:03d}" for s in config.generated.seeds
                                  for i in range(P)))
    log("reference model (real data only)")
    ref_data, _, _ = zoo_lib.mix_training_set(real, generated, 0.0, int(config.zoo.n_train),
                                         seed=int(config.seed) + 777)
    reference = zoo_lib.build_source_model(base, ref_data, run_dir / "reference",
                                      tuner(config.zoo), seed=int(config.seed) + 777)["unet"]
    timings["source, generated set, reference"] = time.time() - t0

    # ---- key samples
    t0 = time.time()
    key = jax.random.PRNGKey(int(config.seed))
    sel = _cached(run_dir / "key_scores.npz", lambda: _selection_scores(
        source, reference, captions, generate_fn_of, memorization_fn, key, k, dec.metric))
    keys = {"strategy1": [sm.select_key_samples(captions, "detection", k.n,
                                                memorization=sel["memorization"]).indices],
            "strategy1-consistency": [sm.select_key_samples(
                captions, "detection", k.n, consistency=sel["consistency"]).indices],
            "strategy2": [sm.select_key_samples(captions, "generation", k.n,
                                                consistency=sel["consistency"],
                                                idiosyncrasy=sel["idiosyncrasy"]).indices],
            "random": [sm.select_key_samples(captions, "random", k.n,
                                             key=jax.random.fold_in(key, 100 + r)).indices
                       for r in range(k.n_random)]}
    timings["key-sample selection"] = time.time() - t0
    src_q = _cached(run_dir / "queries" / "source.npz", lambda: {
        "images": np.clip(np.asarray(sm.query(src_gen, captions, list(q.seeds)), np.float32),
                          -1, 1)})["images"]

    # ---- zoo, one sub-zoo per rho, and every member's query
    z = config.zoo
    n_per = int(z.n_shadow + z.n_cal + z.n_eval)
    rows, dists, covered = [], {}, {}
    t_zoo = time.time()
    for rho in z.rhos:
        t0 = time.time()
        name = f"rho{int(round(rho * 100)):03d}"
        log(f"zoo rho={rho:g}: {n_per} models")
        zoo = zoo_lib.build_model_zoo(base, None, real, generated, run_dir / "zoo" / name,
                                 tuner(z), rhos=(float(rho),), n_models=n_per,
                                 n_train=int(z.n_train),
                                 seed=1000 * int(config.seed) + int(round(rho * 100)),
                                 progress=progress)
        for m in zoo.members:
            res = _cached(run_dir / "queries" / f"{m.name}.npz",
                          lambda: _query_member(generate_fn_of(zoo.load(m)["unet"]), captions,
                                                q.seeds, src_q, dec.metric, wm_key))
            row = {"name": m.name, "rho": float(m.rho), "label": int(m.label),
                   "index": int(m.index), "split": split_of(m.index, z.n_shadow, z.n_cal),
                   "n_generated": int(m.n_generated)}
            dists[m.name] = res["d"]
            covered[m.name] = _generated_captions(m.ids)
            row["features"] = sm.probe_features(src_q, res["images"], dec.metric).tolist()
            row["watermark"] = float(wm.bit_accuracy(np.asarray(res["wm_coef"] > 0, np.uint8),
                                                     bits))
            rows.append(row)
        timings[f"zoo rho={rho:g} ({n_per} models, fine-tune + query)"] = time.time() - t0
        log(f"zoo rho={rho:g} done in {time.time() - t0:.0f} s")
    timings["zoo total"] = time.time() - t_zoo

    # ---- hit threshold δ0 (a number, or calibrated on innocent shadow + calibration models)
    delta0, delta0_info = zoo_delta0(rows, dists, dec)
    log(f"delta0 = {delta0:.4g} ({delta0_info['how']})")
    for row in rows:
        row.update(instance_confs(dists[row["name"]], keys, delta0))
        row.update(coverage_confs(dists[row["name"]], keys, covered[row["name"]], delta0))

    # ---- discriminator on shadow models
    dc = config.discriminator
    disc = sm.Discriminator(hidden=int(dc.hidden), l2=float(dc.l2), steps=int(dc.steps),
                            learning_rate=float(dc.learning_rate))
    shadow = [r for r in rows if r["split"] == "shadow"]
    state = disc.fit(np.array([r["features"] for r in shadow]),
                     np.array([r["label"] for r in shadow]), jax.random.fold_in(key, 7))
    logits = np.asarray(disc.decision_function(state, np.array([r["features"] for r in rows])))
    for r, s in zip(rows, logits):
        r["discriminator"] = float(s)

    # ---- metrics, rho = 0.3 comparison, conf vs rho
    results = evaluate(rows, float(dec.fpr))
    comp = {}
    r03 = [r for r in rows if np.isclose(r["rho"], 0.3)]
    if r03:
        for m in ("strategy1", "strategy1-consistency", "strategy2"):
            comp[f"{m} vs random"] = paired_comparison([r[m] for r in r03],
                                                       [r["random"] for r in r03])
        # on the innocent models (a strategy whose keys are hit more often by innocents too
        # does not help the decision), and the same at the fixed tighter COMPARE_DELTAS
        for delta in (None,) + COMPARE_DELTAS:
            for rho, tag in ((0.3, ""), (0.0, ", innocent rho=0")):
                if delta is None and rho == 0.3:
                    continue                   # = "{m} vs random" above
                name = "" if delta is None else f", δ0={delta:g}"
                delta = delta0 if delta is None else delta
                sub = [r for r in rows if np.isclose(r["rho"], rho)]
                c = [instance_confs(dists[r["name"]], keys, delta) for r in sub]
                for m in ("strategy1", "strategy2"):
                    comp[f"{m} vs random{name}{tag}"] = paired_comparison(
                        [x[m] for x in c], [x["random"] for x in c])
    rhos_sorted = sorted({r["rho"] for r in rows})
    conf_vs_rho = {m: [float(np.mean([r[m] for r in rows if r["rho"] == rho]))
                       for rho in rhos_sorted] for m in INSTANCE_METHODS}
    (run_dir / "plots").mkdir(parents=True, exist_ok=True)
    from jaxattrib.fileio import atomic_write_bytes
    atomic_write_bytes(run_dir / "plots" / "conf_vs_rho.png", line_plot_png(
        rhos_sorted, {METHOD_LABELS[m].split(", ")[1]: v for m, v in conf_vs_rho.items()},
        xlabel="rho (generated fraction of the suspect's training set)",
        ylabel=f"mean conf (hit rate, d < {delta0:.3g}"
               f"{', calibrated' if delta0_info['calibrated'] else ''})",
        title=f"conf vs rho ({n_per} models per rho, N = {k.n} key samples)"))
    timings["total (this invocation)"] = time.time() - t_start
    cov = {f"rho={rho:g}": {f"{m}:{part}": float(np.nanmean([r[f"{m}:{part}"] for r in rows
                                                             if r["rho"] == rho]))
                           for m in INSTANCE_METHODS for part in COVERAGE_PARTS}
           for rho in rhos_sorted if rho > 0}
    src_render = np.stack([src_data.images[src_data.captions.index(c)] for c in captions])
    d_train = np.asarray(sm.instance_distances(src_q, np.broadcast_to(src_render, src_q.shape),
                                               dec.metric)).mean(0)          # [P]
    source_diag = {m: {"within-seed distance of the source": float(sel["consistency"][
                           np.concatenate(v)].mean()),
                       "source generation vs its training render": float(d_train[
                           np.concatenate(v)].mean())} for m, v in keys.items()}
    source_diag["all candidates"] = {
        "within-seed distance of the source": float(sel["consistency"].mean()),
        "source generation vs its training render": float(d_train.mean())}
    out = {"delta0": delta0, "delta0_calibration": delta0_info,
           "results": results, "rho0.3_vs_random": comp, "coverage": cov, "source": source_diag,
           "delta_sweep": delta_sweep(rows, dists, keys, float(dec.fpr)),
           "conf_vs_rho": {"rho": rhos_sorted, **conf_vs_rho},
           "key_samples": {m: [[captions[i] for i in s] for s in v[:1]] for m, v in keys.items()},
           "models": rows, "feature_names": list(sm.probe_feature_names()),
           "timings_s": timings, "n_candidates": P}
    (run_dir / "tables").mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "tables" / "source_model_zoo.json", json.dumps(out, indent=1))
    atomic_write_text(run_dir / "tables" / "source_model_zoo.md",
                      render_markdown(out, config))
    return out


def _selection_scores(source, reference, captions, generate_fn_of, memorization_fn, key, k,
                      metric) -> dict:
    seeds = list(k.generation_seeds)
    src = sm.query(generate_fn_of(source), captions, seeds)
    ref = sm.query(generate_fn_of(reference), captions, seeds)
    return {"memorization": np.asarray(memorization_fn(source, captions, key,
                                                       int(k.detection_seeds))),
            "consistency": np.asarray(sm.within_distance(src, metric)),
            "idiosyncrasy": np.asarray(sm.cross_distance(src, ref, metric))}


COVERAGE_PARTS = ("coverage", "conf_covered", "conf_uncovered")
#: tighter hit thresholds at which the ρ = 0.3 strategies-vs-random comparison is repeated
COMPARE_DELTAS = (0.03, 0.05)
#: hit thresholds of the post-hoc δ0 sweep (same cached distances; "mean d" = −mean distance)
DELTA_SWEEP = (0.03, 0.05, 0.075, 0.1, 0.15, 0.2)


def delta_sweep(rows: Sequence[Mapping], dists: Mapping[str, np.ndarray],
                keys: Mapping[str, Sequence[np.ndarray]], fpr: float,
                deltas: Sequence[float] = DELTA_SWEEP) -> dict:
    """Evaluation-split AUC and TPR at ``fpr`` (all infringers vs innocents) of the instance
    confs at other hit thresholds δ0, and of the threshold-free score −mean key distance;
    with the mean conf of innocent and of ρ = max models. ``dists[name]``: ``d [S, P]``."""
    ev = [r for r in rows if r["split"] == "eval"]
    y = np.array([r["label"] for r in ev])
    top = max(r["rho"] for r in ev)
    out = {}
    for delta in list(deltas) + ["mean d"]:
        res = {}
        for m, sets in keys.items():
            if delta == "mean d":
                sc = np.array([-np.mean([dists[r["name"]][:, np.asarray(k)].mean() for k in sets])
                               for r in ev])
            else:
                sc = np.array([instance_confs(dists[r["name"]], {m: sets}, delta)[m]
                               for r in ev])
            res[m] = {"auc": metrics.roc_auc(sc, y), "tpr": metrics.tpr_at_fpr(sc, y, fpr),
                      "innocent": float(sc[y == 0].mean()),
                      f"rho={top:g}": float(np.mean([v for v, r in zip(sc, ev)
                                                     if r["rho"] == top]))}
        out[str(delta) if delta == "mean d" else f"{delta:g}"] = res
    return out


def zoo_delta0(rows: Sequence[Mapping], dists: Mapping[str, np.ndarray], dec) -> tuple:
    """The hit threshold δ0 of the zoo and how it was chosen: ``dec.delta0`` as given, or with
    ``dec.delta0 == 'calibrated'`` :func:`~jaxattrib.authentication.source_model.calibrate_delta0`
    at ``dec.innocent_hit_rate`` on the pooled distances ``d [S, P]`` (all candidate captions,
    so δ0 does not depend on any key-sample strategy) of the innocent (label 0) models of the
    shadow and calibration splits; evaluation models are never used. Returns ``(δ0, info)``;
    ``info`` also holds the hit rate of innocent calibration and evaluation models (a check)."""
    inn = [r for r in rows if r["label"] == 0]
    calib = [r["name"] for r in inn if r["split"] in ("shadow", "cal")]
    if dec.delta0 != "calibrated":
        delta0 = float(dec.delta0)
        info = {"calibrated": False, "how": f"decision.delta0 = {delta0:g}"}
    else:
        if not calib:
            raise ValueError("decision.delta0='calibrated': no innocent (rho = 0) model in the "
                             "shadow or calibration split of zoo.rhos")
        q = float(dec.innocent_hit_rate)
        delta0 = sm.calibrate_delta0(np.stack([dists[n] for n in calib]), q)
        info = {"calibrated": True, "innocent_hit_rate": q, "models": calib,
                "n_distances": int(sum(dists[n].size for n in calib)),
                "how": f"calibrated: innocent hit rate {q:g} on {len(calib)} innocent "
                       f"shadow/calibration models"}
    for split, names in (("calibration", calib),
                         ("evaluation", [r["name"] for r in inn if r["split"] == "eval"])):
        if names:
            info[f"innocent hit rate, all candidates ({split} models)"] = float(np.mean(
                [np.mean(dists[n] < delta0) for n in names]))
    return delta0, info


def _generated_captions(ids: Sequence[str]) -> set[int]:
    """Caption indices of a member's generated training examples (ids ``generated/SEED/I``)."""
    return {int(i.split("/")[2]) for i in ids if i.startswith("generated/")}


def coverage_confs(d, keys: Mapping[str, Sequence[np.ndarray]], covered: set[int],
                   delta0: float) -> dict:
    """Why conf is what it is: per method, the fraction of key samples whose caption is among
    the model's generated training examples (``coverage``) and the hit rate on covered /
    uncovered key samples (NaN where there are none), pooled over the method's key sets."""
    d = np.asarray(d)
    out = {}
    for m, sets in keys.items():
        idx = np.concatenate([np.asarray(k) for k in sets])
        cov = np.isin(idx, sorted(covered))
        hits = (d[:, idx] < delta0).mean(axis=0)
        out[f"{m}:coverage"] = float(cov.mean())
        out[f"{m}:conf_covered"] = float(hits[cov].mean()) if cov.any() else float("nan")
        out[f"{m}:conf_uncovered"] = float(hits[~cov].mean()) if (~cov).any() else float("nan")
    return out


def _query_member(generate_fn, captions, seeds, src_q, metric, wm_key) -> dict:
    imgs = np.clip(np.asarray(sm.query(generate_fn, captions, list(seeds)), np.float32), -1, 1)
    flat = imgs.reshape(-1, *imgs.shape[2:])
    return {"images": imgs,
            "d": np.asarray(sm.instance_distances(src_q, imgs, metric)),
            "wm_coef": np.asarray(wm.coefficients(flat, wm_key).mean(axis=0))}


def render_markdown(out: Mapping, config) -> str:
    """The run's markdown: main table, ρ = 0.3 comparison, conf vs ρ, timings."""
    dec = config.decision
    info = out["delta0_calibration"]
    checks = "; ".join(f"{k}: {v:.3f}" for k, v in info.items() if k.startswith("innocent hit"))
    lines = [f"# Source-model attribution, model-zoo benchmark\n",
             f"N = {config.key_samples.n} key samples of {out['n_candidates']} candidate "
             f"captions, δ0 = {out['delta0']:.4g} ({dec.metric}; {info['how']}; {checks}), "
             f"query seeds "
             f"{tuple(config.query.seeds)}; thresholds calibrated on the calibration split "
             f"(max balanced accuracy); TPR at FPR {dec.fpr:g}.\n",
             markdown_table(out["results"], float(dec.fpr))]
    if out["rho0.3_vs_random"]:
        lines += ["## rho = 0.3: key-sample strategies vs random selection (paired, per model; "
                  f"δ0 = {out['delta0']:.4g} unless stated)\n",
                  "| comparison | mean conf (strategy) | mean conf (random) | diff [95% CI] | "
                  "wins / ties / losses | Wilcoxon p | models |", "|---|---|---|---|---|---|---|"]
        for name, c in out["rho0.3_vs_random"].items():
            lines.append(f"| {name} | {c['mean_a']:.3f} | {c['mean_b']:.3f} | "
                         f"{c['mean_diff']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] | "
                         f"{c['wins']} / {c['ties']} / {c['losses']} | {c['wilcoxon_p']:.3g} | "
                         f"{c['n']} |")
        lines.append("")
    cv = out["conf_vs_rho"]
    lines += ["## mean conf vs rho (all models of each rho)\n",
              "| method | " + " | ".join(f"rho={r:g}" for r in cv["rho"]) + " |",
              "|---|" + "---|" * len(cv["rho"])]
    for m in INSTANCE_METHODS:
        lines.append(f"| {m} | " + " | ".join(f"{v:.3f}" for v in cv[m]) + " |")
    if out.get("coverage"):
        lines += ["", "## coverage: key samples among an infringer's generated training "
                  "captions, conf on covered / uncovered keys (mean over models)\n",
                  "| rho | " + " | ".join(f"{m}: coverage / conf cov. / conf uncov."
                                          for m in INSTANCE_METHODS) + " |",
                  "|---|" + "---|" * len(INSTANCE_METHODS)]
        for g, v in out["coverage"].items():
            lines.append(f"| {g} | " + " | ".join(
                " / ".join(_fmt(v[f"{m}:{p}"]) for p in COVERAGE_PARTS)
                for m in INSTANCE_METHODS) + " |")
    if out.get("delta_sweep"):
        sw = out["delta_sweep"]
        top = [k for k in next(iter(next(iter(sw.values())).values())) if k.startswith("rho")][0]
        lines += ["", f"## other hit thresholds δ0 (evaluation split, all infringers vs "
                  f"innocents): AUC / TPR@{dec.fpr:.0%}FPR (mean score innocent / {top})\n",
                  "| δ0 | " + " | ".join(INSTANCE_METHODS) + " |",
                  "|---|" + "---|" * len(INSTANCE_METHODS)]
        for dl, v in sw.items():
            lines.append(f"| {dl} | " + " | ".join(
                f"{v[m]['auc']:.2f} / {v[m]['tpr']:.2f} ({v[m]['innocent']:.2f} / "
                f"{v[m][top]:.2f})" for m in INSTANCE_METHODS) + " |")
    if out.get("source"):
        lines += ["", "## the source on its key samples (mean distances, rmse)\n",
                  "| keys | within-seed distance | source generation vs its training render |",
                  "|---|---|---|"]
        for m, v in out["source"].items():
            lines.append(f"| {m} | {v['within-seed distance of the source']:.3f} | "
                         f"{v['source generation vs its training render']:.3f} |")
    lines += ["", "## wall time (s)\n"] + [f"- {k}: {v:.0f}" for k, v in
                                           out["timings_s"].items()]
    return "\n".join(lines) + "\n"
