"""CPU LDS benchmark: TRAK (DSM), D-TRAK (square), Journey-TRAK, TracIn and baselines.

Setting (``jaxattrib/configs/lds.py``): scikit-learn's 8x8 digits (gray, 1 channel, in
[-1, 1]), a tiny class-conditional pixel UNet (context = one-hot digit ``[1, 10]``) trained
from scratch with AdamW. The model trained on all ``n_train`` images (seed 0) is attributed;
``n_gen`` images are generated from it. S subsets of fraction α are retrained with each seed;
a subset's actual output on a target is the DSM loss at ``eval_timesteps`` uniform timesteps ×
``eval_noise_draws`` fixed noises, averaged over seeds (D-TRAK's protocol, methods.md §1).
``--finetune`` (D-TRAK's SD-LoRA protocol): the attributed and every subset model fine-tune
from one model pretrained on digits in no other split; ``--config finetune_fit``: n_train = 200,
400 steps and K = 100, a fitting regime (reproduces D-TRAK > TRAK); ``--config`` takes any
``SETTINGS`` of ``configs/lds.py``, ``--smoke`` its CI-sized version. Both report the seed
agreement of the measured outputs and the LDS ceiling it implies
(:func:`jaxattrib.eval.lds.seed_agreement`).

Methods (:mod:`jaxattrib.attribution.diffusion_trak`, all parameters, projected to ``k``):
``trak``; ``dtrak`` (``square``); ``journey-trak`` [design] (its training feature for train *and*
targets: LDS targets are final images, not trajectory steps); ``tracin`` (``Σ_c η_c ⟨g_c(z),
g_c(z')⟩`` over ``tracin_checkpoints``, η_c from the schedule); ``pixel``; ``random``.

[design] λ (a ratio of mean(diag ΦᵀΦ)) *and the sign* of every method's scores are chosen on a
separate ``tune`` split of held-out images, by LDS, then fixed for ``val`` and ``gen`` (the
direction of D-TRAK's ``square`` output relative to the loss is not fixed by theory; the table
shows the chosen sign).

Everything is cached in the run directory (models, losses, feature stores, scores): a killed run
restarts where it stopped; features hold for the settings in ``features/settings.json`` (K, k,
projection, parameters, noise seed, generator version), others raise
:class:`jaxattrib.eval.lds.LDSRunMismatchError` naming the field (older caches:
``--features-generator``). ``attribution.noise``: modes other than 'shared' cache under their
own names; a run directory from before the field keeps 'shared' unless ``--set
attribution.noise=...``. ``attribution.checkpoints`` = M > 1 averages TRAK / D-TRAK / Journey
over the last M ``tracin_checkpoints``. Outputs: ``results/lds.json``, ``lds_table.md``,
``timings.json``, ``results/lds_per_target.npz`` (per-target LDS, for
``benchmarks/lds_paired.py``); results and history: docs/benchmarks/lds.md.

    python benchmarks/lds.py --smoke --run-dir runs/lds_smoke     # minutes
    python benchmarks/lds.py --run-dir runs/lds                   # the full setting
    python benchmarks/lds.py --finetune                           # fine-tuning setting
    python benchmarks/lds.py --config finetune_fit                # fitting regime
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxattrib.attribution import diffusion_trak as dt
from jaxattrib.attribution import projection
from jaxattrib.attribution.methods import method_scores
from jaxattrib.attribution.grads import per_example_grad_fn, projected_grads, select_params
from jaxattrib.diffusion.losses import dsm_loss, timesteps_uniform
from jaxattrib.diffusion.sampling import sample
from jaxattrib.diffusion.schedule import add_noise, make_schedule
from jaxattrib.eval import lds as lds_lib
from jaxattrib.metrics import lds
from jaxattrib.models.unet import UNet2DConditionModel, init_params, tiny_config

N_CLASSES = 10


# ----------------------------------------------------------------------------- data, model


def load_data(cfg):
    """Train / tune / val splits of the digits: ``{'x0': [n,8,8,1], 'ctx': [n,1,10], 'y'}``;
    with pretraining (``pretrain.steps > 0``) also ``'pretrain'``: ``pretrain.n`` further
    images, disjoint from the others (0 = all the rest)."""
    from jaxattrib.data.digits import load_digits
    ds = load_digits(size=8)
    x = ds.images[..., :1]
    y = np.asarray(ds.labels["digit"])
    perm = np.random.default_rng(cfg.seed).permutation(len(y))
    names, sizes = ["train", "tune", "val"], [cfg.data.n_train, cfg.data.n_tune, cfg.data.n_val]
    if pretrain_steps(cfg):
        names.append("pretrain")
        sizes.append(cfg.pretrain.n or len(y) - sum(sizes))
    if sum(sizes) > len(y) or min(sizes) < 1:
        raise ValueError(f"configs/lds.py: digits has {len(y)} images; data.n_train/n_tune/n_val"
                         f" (+ pretrain.n) ask for {dict(zip(names, sizes))}")
    cuts = np.cumsum([0] + sizes)
    return {name: make_examples(x[perm[a:b]], y[perm[a:b]])
            for name, a, b in zip(names, cuts[:-1], cuts[1:])}


def pretrain_steps(cfg) -> int:
    """Steps of the shared pretraining (0: every model is trained from scratch)."""
    return int(cfg.get("pretrain", {}).get("steps", 0))


def make_examples(x, y):
    y = np.asarray(y, np.int32)
    ctx = np.eye(N_CLASSES, dtype=np.float32)[y][:, None, :]
    return {"x0": np.asarray(x, np.float32), "ctx": ctx, "y": y}


def unet_config(cfg):
    m = cfg.model
    return tiny_config(block_out_channels=tuple(m.block_out_channels), sample_size=8,
                       in_channels=1, out_channels=1, cross_attention_dim=N_CLASSES,
                       norm_num_groups=m.norm_num_groups, layers_per_block=m.layers_per_block,
                       attention_head_dim=m.attention_head_dim)


def unet_apply(ucfg, params, x_t, t, ctx):
    """``eps_apply`` for :func:`jaxattrib.eval.lds.target_losses`."""
    return UNet2DConditionModel(ucfg).apply({"params": params}, x_t, t, ctx)


# ----------------------------------------------------------------------------- training


def lr_schedule(tcfg):
    """The learning rate of update ``i`` (0-based, optax's count): linear warm-up, then held
    (``schedule = 'constant'``, the default) or cosine-decayed to 0 at ``steps`` (``'cosine'``:
    the final iterate carries much less of the last batches' noise, so models of one subset
    agree better across seeds)."""
    after = tcfg.get("schedule", "constant")
    if after == "constant":
        tail = optax.constant_schedule(tcfg.learning_rate)
    elif after == "cosine":
        tail = optax.cosine_decay_schedule(tcfg.learning_rate,
                                           max(tcfg.steps - tcfg.warmup_steps, 1))
    else:
        raise ValueError(f"configs/lds.py: schedule={after!r}: expected 'constant' or 'cosine'")
    return optax.join_schedules([optax.linear_schedule(0.0, tcfg.learning_rate, tcfg.warmup_steps),
                                 tail], [tcfg.warmup_steps])


def make_optimizer(tcfg):
    """AdamW with :func:`lr_schedule`, gradients clipped to global norm 1."""
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(lr_schedule(tcfg), weight_decay=1e-4))


def checkpoint_lrs(tcfg, steps) -> list[float]:
    """TracIn's η_c per checkpoint: the learning rate of the update that produced checkpoint
    ``s`` (the ``s``-th update, optax count ``s - 1``), as ``runs.attribute.attribute_run`` reads it
    from the record (``step_info(s - 1)['lr']``). [paper] TracIn weights each checkpoint by its
    learning rate; under ``schedule = 'cosine'`` the last checkpoints weigh ~0."""
    sched = lr_schedule(tcfg)
    return [float(sched(int(s) - 1)) for s in steps]


@functools.partial(jax.jit, static_argnames=("ucfg", "opt"), donate_argnums=(0, 1))
def train_step(params, opt_state, x0, ctx, key, *, ucfg, opt, sched):
    """One AdamW step on the mean DSM loss (t ~ U{0..T-1}, fresh noise per example)."""
    B = x0.shape[0]
    t = jax.random.randint(jax.random.fold_in(key, 0), (B,), 0, sched.num_train_timesteps)
    noise = jax.random.normal(jax.random.fold_in(key, 1), x0.shape)

    def loss(p):
        out = unet_apply(ucfg, p, add_noise(sched, x0, noise, t), t, ctx)
        return dsm_loss(sched, out, x0, noise, t).mean()

    val, g = jax.value_and_grad(loss)(params)
    upd, opt_state = opt.update(g, opt_state, params)
    return optax.apply_updates(params, upd), opt_state, val


# jitted: the eager Flax init of the UNet costs about a minute on a loaded 2-core machine
init_unet = jax.jit(init_params, static_argnums=0)


def train(cfg, ucfg, sched, opt, data, idx, seed, checkpoints=(), init_seed=None, init=None,
          tc=None):
    """Trains on ``data[idx]`` with ``seed`` (init, batches, noise) and the settings ``tc``
    (default ``cfg.train``); with ``init_seed`` the initial parameters come from that seed
    instead (``lds.shared_init``); with ``init`` (a params pytree, e.g. the pretrained model)
    training starts from those parameters (fine-tuning; the seed then varies batches and noise
    only). Returns ``(params, {step: params})`` for the requested checkpoint steps."""
    tc = cfg.train if tc is None else tc
    key = jax.random.PRNGKey(seed)
    init_key = key if init_seed is None else jax.random.PRNGKey(init_seed)
    params = (init_unet(ucfg, jax.random.fold_in(init_key, 0)) if init is None
              else jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), init))
    opt_state = opt.init(params)
    rng = np.random.default_rng([seed, 1])
    idx = np.asarray(idx)
    order = np.empty(0, int)
    ckpts = {}
    for s in range(1, tc.steps + 1):
        if order.size < tc.batch_size:
            order = np.concatenate([order, rng.permutation(idx)])
        b, order = order[:tc.batch_size], order[tc.batch_size:]
        params, opt_state, _ = train_step(params, opt_state, data["x0"][b], data["ctx"][b],
                                          jax.random.fold_in(jax.random.fold_in(key, 1), s),
                                          ucfg=ucfg, opt=opt, sched=sched)
        if s in checkpoints:
            ckpts[s] = jax.tree_util.tree_map(np.asarray, params)
    return jax.tree_util.tree_map(np.asarray, params), ckpts


# ----------------------------------------------------------------------------- scores


def lds_of(scores, masks, actual, sign, cfg):
    return lds(sign * scores, masks, actual, n_bootstrap=cfg.lds.n_bootstrap, seed=cfg.seed)


def choose(candidates, masks, actual_tune, cfg):
    """``candidates``: {label: fn(split) -> scores}; picks (label, sign) with the best tune LDS.
    Returns ``(label, sign, tune_lds, sweep_rows)``."""
    rows, best = [], None
    for label, fn in candidates.items():
        s = fn("tune")
        for sign in (1.0, -1.0):
            v = lds_of(s, masks, actual_tune, sign, cfg).mean
            rows.append({"choice": label, "sign": sign, "lds_tune": v})
            if np.isfinite(v) and (best is None or v > best[2]):
                best = (label, sign, v)
    return best + (rows,)


# ----------------------------------------------------------------------------- main


def run(cfg, run_dir: Path, log=print, features_generator: int | None = None):
    """Runs (or resumes) the benchmark in ``run_dir``; returns the table rows.
    ``features_generator``: see :func:`check_feature_settings`."""
    t_start = time.time()
    timings = {}
    run_dir.mkdir(parents=True, exist_ok=True)
    # cached features hold only for the settings that made them (K, k, projection, generator)
    check_feature_settings(run_dir, cfg.to_dict(), features_generator)
    feat_dir = run_dir / "features"
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=list))
    ucfg = unet_config(cfg)
    sched = make_schedule(1000)
    opt = make_optimizer(cfg.train)
    data = load_data(cfg)
    train_data = data["train"]
    n = len(train_data["y"])
    eps_apply = functools.partial(unet_apply, ucfg)
    mesh = None
    if jax.device_count() > 1:
        from jaxattrib import parallel
        mesh = parallel.make_mesh()

    from flax import serialization
    load = lambda p: serialization.msgpack_restore(p.read_bytes())  # noqa: E731

    # 0. fine-tuning setting: one model pretrained (seed cfg.seed) on the disjoint 'pretrain'
    # images; the full model and every subset model fine-tune from it
    pretrained = None
    if pretrain_steps(cfg):
        t0 = time.time()
        pre_path = run_dir / "pretrained.msgpack"
        if not pre_path.is_file():
            pdata = data["pretrain"]
            params, _ = train(cfg, ucfg, sched, make_optimizer(cfg.pretrain), pdata,
                              np.arange(len(pdata["y"])), cfg.seed + 7, tc=cfg.pretrain)
            lds_lib.save_model(pre_path, params)
        pretrained = load(pre_path)
        timings["pretrain_s"] = time.time() - t0
        log(f"pretrained model ready ({timings['pretrain_s']:.0f} s)")

    # 1. the attributed model (all data, seed 0) and its TracIn checkpoints
    t0 = time.time()
    full_dir = run_dir / "full"
    ck_steps = tuple(int(s) for s in cfg.train.tracin_checkpoints)
    paths = [full_dir / "final.msgpack"] + [full_dir / f"step{s}.msgpack" for s in ck_steps]
    if not all(p.is_file() for p in paths):
        params, ckpts = train(cfg, ucfg, sched, opt, train_data, np.arange(n), 0, ck_steps,
                              init=pretrained)
        for s in ck_steps:
            lds_lib.save_model(full_dir / f"step{s}.msgpack", ckpts[s])
        lds_lib.save_model(full_dir / "final.msgpack", params)
    full = load(paths[0])
    ckpts = {s: load(p) for s, p in zip(ck_steps, paths[1:])}
    timings["train_full_s"] = time.time() - t0
    log(f"full model ready ({timings['train_full_s']:.0f} s)")

    # 2. generated targets
    gen_path = run_dir / "generated.npz"
    if not gen_path.is_file():
        y = np.arange(cfg.data.n_gen) % N_CLASSES
        ctx = np.eye(N_CLASSES, dtype=np.float32)[y][:, None, :]
        x = sample(lambda x_t, t, c: eps_apply(full, x_t, t, c), sched,
                   (cfg.data.n_gen, 8, 8, 1), jax.random.PRNGKey(cfg.seed + 123), cond=ctx,
                   num_inference_steps=cfg.generate.num_inference_steps)
        x = np.clip(np.asarray(x), -1, 1)
        np.savez(gen_path, x=x, y=y)
    g = np.load(gen_path)
    data["gen"] = make_examples(g["x"], g["y"])
    splits = ("tune", "val", "gen")

    # 3. subset retraining
    t0 = time.time()
    masks = lds_lib.draw_subsets(n, cfg.lds.num_subsets, cfg.lds.alpha,
                                 jax.random.PRNGKey(cfg.seed))
    shared_init = bool(cfg.lds.get("shared_init", False))
    fp_fields = {k: cfg.to_dict()[k] for k in ("seed", "data", "model", "train")}
    if shared_init:  # absent when False, so run dirs made before the option still match
        fp_fields["shared_init"] = True
    if pretrained is not None:  # likewise
        fp_fields["pretrain"] = cfg.to_dict()["pretrain"]
    fp = json.dumps(fp_fields, sort_keys=True, default=list)
    sub_dir = run_dir / "subsets"
    init_seed = cfg.seed if shared_init else None
    lds_lib.retrain_subsets(
        lambda idx, seed: train(cfg, ucfg, sched, opt, train_data, idx, seed,
                                init_seed=init_seed, init=pretrained)[0],
        masks, list(cfg.lds.seeds), sub_dir, fingerprint=fp,
        progress=lambda m: log(f"{m} [{time.time() - t_start:.0f} s]"))
    timings["retrain_s"] = time.time() - t0

    # 4. actual outputs (diffusion loss with fixed timesteps / noise, averaged over seeds)
    t0 = time.time()
    ts_eval = timesteps_uniform(cfg.lds.eval_timesteps, sched.num_train_timesteps)
    actual, agreement = {}, {}
    for split in splits:
        tg = {"x0": data[split]["x0"], "ctx": data[split]["ctx"]}
        measure = functools.partial(lds_lib.target_losses, eps_apply, sched=sched, targets=tg,
                                    timesteps=ts_eval, noise_seed=cfg.seed + 1,
                                    n_noise=cfg.lds.eval_noise_draws, mesh=mesh)
        actual[split] = lds_lib.actual_outputs(sub_dir, measure, name=f"loss_{split}")
        if len(cfg.lds.seeds) > 1:  # per-seed outputs are cached now: no model is reloaded
            agreement[split] = lds_lib.seed_agreement(np.stack([
                lds_lib.actual_outputs(sub_dir, measure, name=f"loss_{split}", seeds=[sd])
                for sd in cfg.lds.seeds]))
    timings["actual_outputs_s"] = time.time() - t0
    log(f"actual outputs ready ({timings['actual_outputs_s']:.0f} s); seed agreement "
        + ", ".join(f"{sp} r = {a['r']:.3f} (LDS ceiling {a['ceiling']:.2f})"
                    for sp, a in agreement.items()))
    if cfg.lds.get("stop_after_outputs", False):
        (run_dir / "seed_agreement.json").write_text(json.dumps(agreement, indent=2))
        return agreement

    # 5. features and scores
    ac = cfg.attribution

    feature_fns = {}
    noise = ac.get("noise", "shared")
    # checkpoint ensembles: the last M of the full model's saved checkpoints (the final model
    # is the one of step train.steps), or the listed steps
    ens_steps = dt.ensemble_steps(ac.get("checkpoints", 1),
                                  sorted(set(ck_steps) | {int(cfg.train.steps)}))
    ens_params = {s: (full, "final") if s == int(cfg.train.steps) else (ckpts[s], f"step{s}")
                  for s in ens_steps}

    def features(method, params, split, step_tag="final"):
        """Projected gradients ``[n_split, k]``, cached as ``features/{method}_{tag}_{split}.npy``.
        [design] One jitted feature function per method, parameters passed as arguments, so
        every split and checkpoint reuses one compile (``featurize_examples`` compiles per
        call, which costs minutes each on a loaded 2-core machine)."""
        # 'shared' noise (and Journey-TRAK, which ignores it): the names features had before
        # attribution.noise existed; other modes add theirs, so one run dir holds each mode
        tag = method if noise == "shared" or method == "journey-trak" else f"{method}-{noise}"
        path = feat_dir / f"{tag}_{step_tag}_{split}.npy"
        if path.is_file():
            return np.load(path)
        acfg = dt.AttributionConfig.from_section(ac, method=method, noise_seed=cfg.seed,
                                                 noise=noise)
        split_p = select_params(params, ac.params)
        if method not in feature_fns:
            projector = dt._projector(params, acfg)
            grad_fn = per_example_grad_fn(dt.make_train_out_fn(ucfg, sched, acfg))
            feature_fns[method] = jax.jit(
                lambda tr, fr, ex, keys: projector.project(grad_fn(tr, fr, ex, keys)))
        fn = feature_fns[method]
        ex = dt.with_index({"x0": data[split]["x0"], "ctx": data[split]["ctx"]})
        key = jax.random.PRNGKey(1000 + (splits.index(split) if split in splits else -1))
        phi = projected_grads(lambda e, k: fn(split_p.trainable, split_p.frozen, e, k), ex, key,
                              microbatch=ac.microbatch, mesh=mesh)
        feat_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp.npy")
        np.save(tmp, phi)
        os.replace(tmp, path)  # atomic: a killed run never leaves a partial store
        return phi

    t0 = time.time()
    results, sweeps, chosen = {}, [], {}
    for method in ac.methods:
        tm = time.time()
        if method in ("trak", "dtrak", "journey-trak"):   # one checkpoint, or an ensemble
            Phi_m = [features(method, p, "train", tag) for p, tag in ens_params.values()]
            phi_m = {sp: [features(method, p, sp, tag) for p, tag in ens_params.values()]
                     for sp in splits}
            cache = {}

            def make(r, cache=cache, Phi_m=Phi_m, phi_m=phi_m):
                def f(split):
                    if (r, split) not in cache:
                        cache[(r, split)] = method_scores(method, phi_m[split], Phi_m,
                                                          lam_ratio=r)
                    return cache[(r, split)]
                return f
            cands = {f"lambda_ratio={r:g}": make(r) for r in ac.lambda_ratios}
        elif method == "tracin":
            tr = {s: features("trak", ckpts[s], "train", f"step{s}") for s in ck_steps}
            qs = {sp: [features("trak", ckpts[s], sp, f"step{s}") for s in ck_steps]
                  for sp in splits}
            lr = checkpoint_lrs(cfg.train, ck_steps)
            cands = {"tracin": lambda sp: method_scores(
                "tracin", qs[sp], [tr[s] for s in ck_steps], learning_rates=lr,
                dtype=np.float64)}
        elif method == "pixel":
            cands = {"cosine": lambda sp: method_scores("pixel", data[sp]["x0"],
                                                        train_data["x0"], dtype=np.float64)}
        elif method == "random":
            cands = {"normal": lambda sp: np.random.default_rng(
                [cfg.seed, splits.index(sp)]).normal(size=(len(data[sp]["y"]), n))}
        else:
            raise ValueError(f"unknown method {method!r}")
        label, sign, v_tune, rows = choose(cands, masks, actual["tune"], cfg)
        sweeps += [{"method": method, **r} for r in rows]
        chosen[method] = {"choice": label, "sign": sign, "lds_tune": v_tune}
        results[method] = {sp: lds_of(cands[label](sp), masks, actual[sp], sign, cfg)
                           for sp in ("val", "gen")}
        timings[f"scores_{method}_s"] = time.time() - tm
        log(f"{method}: val {results[method]['val'].mean:.3f} gen "
            f"{results[method]['gen'].mean:.3f} ({label}, sign {sign:+g}) "
            f"[{time.time() - tm:.0f} s]")
    timings["attribution_s"] = time.time() - t0
    timings["total_s"] = time.time() - t_start

    # 6. tables
    rows = []
    for method, res in results.items():
        row = {"method": method, "choice": chosen[method]["choice"],
               "sign": chosen[method]["sign"], "lds_tune": chosen[method]["lds_tune"]}
        for sp in ("val", "gen"):
            r = res[sp]
            row.update({f"lds_{sp}": r.mean, f"lds_{sp}_ci_low": r.ci_low,
                        f"lds_{sp}_ci_high": r.ci_high, f"n_{sp}": r.n_valid})
        rows.append(row)
    md = format_table(rows, cfg, timings, agreement)
    save_per_target(run_dir, results, ac)
    (run_dir / "lds_table.md").write_text(md)
    (run_dir / "timings.json").write_text(json.dumps(timings, indent=2))
    from jaxattrib.report.html import write_result
    write_result(run_dir, "lds", "LDS benchmark (digits 8x8, tiny UNet)",
                 metrics={f"{m}_lds_{sp}": results[m][sp].mean for m in results
                          for sp in ("val", "gen")} | {"total_s": timings["total_s"]},
                 tables=[{"caption": "LDS (mean over targets, 95% bootstrap CI)", "rows": rows},
                         {"caption": "lambda / sign sweep on the tune split", "rows": sweeps},
                         {"caption": "seed agreement of the measured outputs (LDS ceiling)",
                          "rows": [{"split": sp, **a} for sp, a in agreement.items()]}],
                 text=md, order=30)
    log(md)
    return rows


PER_TARGET = "results/lds_per_target.npz"


def save_per_target(run_dir: Path, results: dict, ac) -> None:
    """``results/lds_per_target.npz``: each method's per-target LDS (``{method}/{split}``,
    ``[n_split]``, at its chosen λ and sign) and the attribution variant that made them
    (``noise``, ``checkpoints``), for paired comparisons across run directories
    (``benchmarks/lds_paired.py``)."""
    arrays = {f"{m}/{sp}": np.asarray(r.per_target, np.float64)
              for m, res in results.items() for sp, r in res.items()}
    arrays["noise"] = np.asarray(str(ac.get("noise", "shared")))
    arrays["checkpoints"] = np.asarray(json.dumps(ac.get("checkpoints", 1), default=list))
    path = run_dir / PER_TARGET
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def legacy_noise(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds features made before ``attribution.noise`` existed (its last
    ``config.json`` has no such field): such a run keeps 'shared' unless told otherwise."""
    prev = run_dir / "config.json"
    if not any((run_dir / "features").glob("*.npy")) or not prev.is_file():
        return False
    return "noise" not in (json.loads(prev.read_text()).get("attribution") or {})


def feature_settings(cfg: dict) -> dict:
    """The settings that determine the cached features (``features/*.npy``): those of a config
    dict (fields missing from an older config are None) and this code's projection generator
    version (:data:`jaxattrib.attribution.projection.GENERATOR_VERSION`)."""
    a = cfg.get("attribution", {})
    return {"k": a.get("k"), "num_timesteps": a.get("num_timesteps"),
            "projection": a.get("projection"), "params": a.get("params"),
            "noise_seed": cfg.get("seed"), "generator": projection.GENERATOR_VERSION}


#: generator version of a ``features/settings.json`` without the ``generator`` field: the record
#: was introduced in b27981a (2026-11-26 06:36 UTC), when ``GENERATOR_VERSION`` had been 2 since
#: 4530612 (00:20 UTC), and the field was added while it still was, so every such record was
#: written with version 2
RECORD_GENERATOR_BEFORE_FIELD = 2


def check_feature_settings(run_dir: Path, cfg: dict, features_generator: int | None = None
                           ) -> None:
    """Refuses cached features (``run_dir/features/*.npy``) made with other attribution settings
    or another projection generator than ``cfg`` with this code would use (naming the field,
    :class:`jaxattrib.eval.lds.LDSRunMismatchError`); writes ``features/settings.json`` if new.

    A record without ``generator`` is read as :data:`RECORD_GENERATOR_BEFORE_FIELD`. Features
    cached before any record existed are judged by the run's previous ``config.json``, which
    does not say which generator projected them (version 1 before commit 4530612, 2 from it on):
    they are refused unless ``features_generator`` (``--features-generator``) declares it.
    """
    feat_dir = run_dir / "features"
    path = feat_dir / "settings.json"
    want = feature_settings(cfg)
    older = None
    if not path.is_file() and any(feat_dir.glob("*.npy")):
        prev = run_dir / "config.json"
        older = {**feature_settings(json.loads(prev.read_text()) if prev.is_file() else {}),
                 "generator": features_generator}
    if older is not None and features_generator is None:
        hint = (f"generator None: these features predate {path.name}, so the projection "
                f"generator version that made them is not recorded (1 before commit 4530612 of "
                f"2026-11-26 00:20 UTC, 2 from it on); rerun with --features-generator N if you "
                f"know it was N, or delete {feat_dir} to recompute them (models and measured "
                f"outputs are kept)")
    else:
        hint = (f"generator: the cached features were projected with another P generator "
                f"(jaxattrib.attribution.projection.GENERATOR_VERSION) than this code's "
                f"version {want['generator']} and cannot be combined with new ones: delete "
                f"{feat_dir} to recompute them (models and measured outputs are kept), use "
                f"another --run-dir, or run the code of the stored version")
    lds_lib.check_settings(path, want, older, absent={"generator": RECORD_GENERATOR_BEFORE_FIELD},
                           hints={"generator": hint})


def format_table(rows, cfg, timings, agreement=None):
    how = (f"fine-tuned {cfg.train.steps} steps from one model pretrained "
           f"{pretrain_steps(cfg)} steps on disjoint images" if pretrain_steps(cfg)
           else f"trained from scratch {cfg.train.steps} steps")
    lines = [f"LDS, S = {cfg.lds.num_subsets} subsets (alpha = {cfg.lds.alpha}) x "
             f"{len(cfg.lds.seeds)} seeds ({how}), n_train = {cfg.data.n_train}, targets: "
             f"val {cfg.data.n_val}, gen {cfg.data.n_gen} (lambda/sign tuned on "
             f"{cfg.data.n_tune} other held-out images); total {timings['total_s']:.0f} s", ""]
    if agreement:
        lines += ["Seed agreement of the measured outputs (Spearman over subsets between two "
                  "seeds, mean over targets; ceiling = sqrt of the seed-mean's reliability): " +
                  "; ".join(f"{sp} r = {a['r']:.3f}, ceiling {a['ceiling']:.2f}"
                            for sp, a in agreement.items()), ""]
    lines += ["| method | chosen (tune) | sign | LDS val [95% CI] | LDS gen [95% CI] |",
              "|---|---|---|---|---|"]
    for r in rows:
        cell = lambda sp: (f"{r[f'lds_{sp}']:.3f} [{r[f'lds_{sp}_ci_low']:.3f}, "  # noqa: E731
                           f"{r[f'lds_{sp}_ci_high']:.3f}]")
        lines.append(f"| {r['method']} | {r['choice']} | {r['sign']:+g} | {cell('val')} | "
                     f"{cell('gen')} |")
    return "\n".join(lines) + "\n"


def setting_name(config: str | None, finetune: bool = False, smoke: bool = False) -> str:
    """The ``configs/lds.py`` setting that ``--config``, ``--finetune`` and ``--smoke`` select
    (``''`` = the full setting); e.g. ``('finetune_fit', smoke=True) -> 'finetune_fit_smoke'``."""
    if config and finetune and config != "finetune":
        raise ValueError(f"--finetune and --config {config} name two settings")
    base = config or ("finetune" if finetune else "")
    if base == "smoke" or base.endswith("_smoke"):
        raise ValueError(f"--config {base}: name the setting and add --smoke for its CI-sized "
                         f"version")
    base = "" if base == "full" else base
    return "_".join(([base] if base else []) + (["smoke"] if smoke else []))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--smoke", action="store_true", help="reduced setting (minutes)")
    ap.add_argument("--finetune", action="store_true",
                    help="fine-tuning setting: subset models fine-tune from one pretrained model "
                         "(configs/lds.py 'finetune'; with --smoke 'finetune_smoke')")
    ap.add_argument("--config", default=None, metavar="SETTING",
                    help="a named setting of configs/lds.py: full, finetune or finetune_fit "
                         "(fitting regime: n_train 200, 400 fine-tuning steps, K = 100 "
                         "timesteps; where D-TRAK > TRAK was reproduced); with --smoke its "
                         "CI-sized version; --finetune is --config finetune")
    ap.add_argument("--set", action="append", default=[], help="config override key=value")
    ap.add_argument("--features-generator", type=int, default=None, metavar="N",
                    help="projection generator version of features cached in the run directory "
                         "before features/settings.json existed (1 before commit 4530612, "
                         "2 from it on); such a cache is refused without it")
    args = ap.parse_args(argv)
    from jaxattrib.config import load_config
    spec = str(Path(__file__).resolve().parents[1] / "jaxattrib" / "configs" / "lds.py")
    try:
        setting = setting_name(args.config, args.finetune, args.smoke)
    except ValueError as e:
        ap.error(str(e))
    cfg = load_config(spec + (f":{setting}" if setting else ""), args.set)
    run_dir = Path(args.run_dir or f"runs/lds{'_' + setting if setting else ''}")
    if legacy_noise(run_dir) and not any(s.startswith("attribution.noise=") for s in args.set):
        print(f"notice: {run_dir} holds features made before attribution.noise existed; it "
              f"keeps noise='shared' (--set attribution.noise=per_position adds that mode's "
              f"features beside them)", flush=True)
        cfg.attribution.noise = "shared"
    run(cfg, run_dir, log=lambda m: print(m, flush=True),
        features_generator=args.features_generator)


if __name__ == "__main__":
    main()
