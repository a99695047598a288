"""Mixed-concept generations with a soft ground truth: MONTRAGE vs the other methods (issue #7).

Our design (:mod:`jaxattrib.eval.mixed`; MONTRAGE's own mixed-concept protocol is not public).
Reads a finished customization run (``--source-run``, default ``runs/customization``: its
config, fine-tuning set and trajectory record; nothing there is written) and writes under
``--run-dir`` (default ``runs/montrage_mixed``): ``config.json`` (a rerun with other settings
is refused; ``--fresh`` deletes first), ``record`` (a link to the source's),
``generations/mixed.npz`` (+ ``mixed_queries.png``), ``features/<method>/`` (resumable; the
source's training features copied in), ``scores/<method>.npy [Q, N]`` (+ ``_choice.json``),
``tables/mixed.{md,json}``.

Queries: for each pair (A, B) of the four new concepts, α in ``--alphas`` and ``--repeats``
seeds, the fine-tuned model generates from α·E(A) + (1−α)·E(B) (same background in both
prompts). Soft ground truth: α/n_A on A's exemplars, (1−α)/n_B on B's, 0 elsewhere. The first
⌊repeats / 2⌋ queries of every (pair, α) choose each method's λ ratio and the sign of TRAK /
D-TRAK / TracIn by mean validation ρ; the rest are the test set. Tables (test queries; mean
[95% bootstrap CI]): (1) how often the classifier reads A's / B's colour and shape per α;
(2) per method ρ (Spearman vs the soft ground truth over all N), mAP of A ∪ B, tracking
(Spearman of α vs the A-over-B AUC), the same on the mixtures alone, and a ceiling row;
(3) monitoring: every single checkpoint and the trajectory aggregations (mean, movement ×
count, final − base, learned weights and their final-only control), each with its paired ρ
gain over the final checkpoint; (4) the same in ``--alt-representation`` (default t = 500,
tap ``up_1``). Every table in full and the results: docs/benchmarks/mixed_concept.md.

    python benchmarks/montrage_mixed.py --source-run runs/customization \
        --run-dir runs/montrage_mixed     # 7 min on the 2-core CPU, latent default, load 3-4
    python benchmarks/montrage_mixed.py --smoke --run-dir runs/montrage_mixed_smoke
        # as long (11 min there: compiling the gradient methods dominates); without them,
        # --smoke --methods pixel,random,montrage,montrage-final: 1.5 min
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

METHODS = ("pixel", "random", "montrage", "montrage-final", "dtrak", "trak", "tracin")
NAMES = {"montrage": "MONTRAGE (trajectory, movement × count)",
         "montrage-final": "MONTRAGE final-only (representation similarity)",
         "dtrak": "D-TRAK", "trak": "TRAK", "tracin": "TracIn", "pixel": "pixel similarity",
         "random": "random",
         "oracle": "reference: soft ground truth, ties broken at random (ceiling)"}


def _log(msg: str) -> None:
    print(f"[montrage_mixed {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _settings(args) -> dict:
    smoke = args.smoke
    return {"source_run": str(Path(args.source_run).resolve()),
            "alphas": [float(a) for a in (args.alphas or ("0,0.5,1" if smoke else
                                                          "0,0.25,0.5,0.75,1")).split(",")],
            "repeats": args.repeats or (2 if smoke else 3),
            "pairs": [[0, 1]] if smoke else None,
            "num_inference_steps": args.steps or (5 if smoke else 25),
            "guidance_scale": args.guidance_scale, "seed": args.seed,
            "methods": list(args.methods.split(",")) if args.methods else list(METHODS),
            "alt_representation": args.alt_representation,
            "n_bootstrap": 100 if smoke else 1000}


def generate_from_contexts(pipe, contexts, key, *, unet_params, num_inference_steps: int,
                           guidance_scale: float, batch_size: int = 16) -> np.ndarray:
    """Images ``[Q, H, W, 3]`` in [-1, 1] sampled from text states ``contexts [Q, L, D]``
    (DDIM, guidance against the empty prompt; image ``i`` uses ``fold_in(key, i)``)."""
    import jax
    import jax.numpy as jnp

    from jaxattrib.diffusion import sampling
    from jaxattrib.generate import latent_shape, make_eps_fn, pipeline_schedule
    eps_fn = make_eps_fn(pipe.unet_config, unet_params)
    sched = pipeline_schedule(pipe)
    uncond = None if guidance_scale == 1.0 else pipe.encode_prompts([""])

    def one(k, c):
        return sampling.sample(eps_fn, sched, latent_shape(pipe, 1), k, cond=c, uncond=uncond,
                               guidance_scale=guidance_scale,
                               num_inference_steps=num_inference_steps)

    batched = jax.jit(jax.vmap(one))
    out = []
    for start in range(0, len(contexts), batch_size):
        c = jnp.asarray(contexts[start:start + batch_size])[:, None]
        keys = jnp.stack([jax.random.fold_in(key, start + i) for i in range(len(c))])
        out.append(batched(keys, c)[:, 0])
    x0 = jnp.concatenate(out)
    if pipe.is_latent:
        from jaxattrib.models.vae import decode_latents
        x0 = decode_latents(pipe.vae_params, pipe.vae_config, x0)
    return np.clip(np.asarray(x0), -1, 1).astype(np.float32)


def _queries(run: Path, s: dict, pipe, unet_params, held: list,
             backgrounds=("black", "white", "gray")) -> dict:
    """The mixed queries (cached in ``generations/mixed.npz``), backgrounds cycled over
    ``backgrounds`` (the base model's; the 16-px pixel model's three reproduce the first runs)."""
    path = run / "generations" / "mixed.npz"
    if path.exists():
        return dict(np.load(path))
    import jax

    from jaxattrib.eval import mixed
    from jaxattrib.report.images import image_grid, save_png
    plan = mixed.mixture_plan(held, s["alphas"], s["repeats"], backgrounds, pairs=s["pairs"])
    ctx = mixed.mixed_contexts(pipe.encode_prompts, plan["prompt_a"], plan["prompt_b"],
                               plan["alpha"])
    t0 = time.time()
    images = generate_from_contexts(pipe, ctx, jax.random.PRNGKey(s["seed"] + 31),
                                    unet_params=unet_params,
                                    num_inference_steps=s["num_inference_steps"],
                                    guidance_scale=s["guidance_scale"])
    _log(f"generated {len(images)} mixed queries in {time.time() - t0:.0f} s")
    out = {**plan, "images": images, "ctx": ctx,
           "prompts": np.array([f"{a} | {b} | alpha={al:g}" for a, b, al in
                                zip(plan["prompt_a"], plan["prompt_b"], plan["alpha"])])}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    per_row = len(s["alphas"]) * s["repeats"]
    save_png(run / "generations" / "mixed_queries.png",
             image_grid(images, nrow=per_row, labels=[f"{a:g}" for a in plan["alpha"]]))
    return out


def _copy_train_features(src: Path, run: Path) -> None:
    """The source run's training-image feature stores (same model, images, settings)."""
    for d in sorted((src / "features").glob("**/train")):
        dst = run / d.relative_to(src)
        if d.is_dir() and not dst.exists():
            shutil.copytree(d, dst)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source-run", default="runs/customization",
                    help="finished customization run (read only)")
    ap.add_argument("--run-dir", default=None,
                    help="output (default runs/montrage_mixed[_smoke]); reused on rerun")
    ap.add_argument("--smoke", action="store_true",
                    help="one pair, alpha in {0, 0.5, 1}, 5 sampling steps")
    ap.add_argument("--alphas", default=None, help="comma-separated (default 0,0.25,0.5,0.75,1)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="queries per (pair, alpha) (default 3, smoke 2)")
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (default 25)")
    ap.add_argument("--guidance-scale", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default=None, help=f"comma-separated subset of {METHODS}")
    ap.add_argument("--alt-representation", default="500:up_1",
                    help="t:tap[+tap] for table 4 ('' disables)")
    ap.add_argument("--fresh", action="store_true", help="delete the run directory first")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    t_start = time.time()
    s = _settings(args)
    bad = sorted(set(s["methods"]) - set(METHODS))
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; choose from {METHODS}")
    src = Path(s["source_run"])
    run = Path(args.run_dir or ("runs/montrage_mixed_smoke" if args.smoke
                                else "runs/montrage_mixed"))
    for need in ("config.json", "data/train.npz", "record"):
        if not (src / need).exists():
            raise SystemExit(f"--source-run {src}: no {need} (run benchmarks/customization.py "
                             f"first)")
    if args.fresh and run.exists():
        shutil.rmtree(run)
    import ml_collections

    from jaxattrib.runs import demo_attribute
    from jaxattrib.runs.rundir import check_run_config
    check_run_config(run, ml_collections.ConfigDict(s))   # a rerun with other settings fails
    progress = not args.no_progress

    from jaxattrib.attribution import montrage as M
    from jaxattrib.attribution.methods import method_scores
    from jaxattrib.train.base_model import base_model_info, load_base_model
    from jaxattrib.data.synthetic import SyntheticConceptSpec, classify_concepts
    from jaxattrib.diffusion.schedule import schedule_from_diffusers_config
    from jaxattrib.eval import mixed
    from jaxattrib.fileio import atomic_write_text
    from jaxattrib.train.record import TrajectoryRecord

    cfg = ml_collections.ConfigDict(json.loads((src / "config.json").read_text()))
    folder = cfg.get("base_model") or None
    from jaxattrib.runs.demo import check_run_data_size
    info = base_model_info(folder)
    check_run_data_size(src, info, folder)     # the source run was made with this base model?
    pipe = load_base_model(folder)
    held = [dict(h) for h in info["held_out"]]
    spec = SyntheticConceptSpec(**{k: tuple(v) if isinstance(v, list) else v
                                   for k, v in info["data_spec"].items()})
    train = dict(np.load(src / "data" / "train.npz"))
    link = run / "record"
    if not link.exists():
        os.symlink((src / "record").resolve(), link)
    _copy_train_features(src, run)
    record = TrajectoryRecord.open(link.resolve())
    step = record.latest_step()
    unet_params = record.load(step)["unet"]
    q = _queries(run, s, pipe, unet_params, held, spec.backgrounds)
    plan = {k: q[k] for k in ("concept_a", "concept_b", "alpha", "group")}
    val = demo_attribute._validation_mask(q["group"])
    test = ~val
    tc = train["concept"]
    pq = lambda sc: mixed.per_query(sc, plan, tc)  # noqa: E731
    nb = s["n_bootstrap"]

    # 1. is the mixture rendered?
    pred = classify_concepts(q["images"], spec)
    gen_mix = mixed.generation_mix(pred["color"], pred["shape"], plan, held, spec)

    # 2. every method; λ ratio / sign chosen on the validation half by mean ρ
    sched = schedule_from_diffusers_config(pipe.scheduler_config)
    train_ex = demo_attribute._examples(pipe, train["images"], train["captions"])
    # the queries' UNet inputs: VAE latents (posterior mean) for a latent base model, as
    # train_ex's; their contexts are the mixed text states they were generated from
    from jaxattrib.diffusion.latents import encode_images
    query_ex = {"x0": encode_images(pipe.vae_config, pipe.vae_params, q["images"]),
                "ctx": q["ctx"]}
    queries = {"images": q["images"], "prompts": q["prompts"]}
    # the training features' fingerprint as the customization run stored them (latent models:
    # keyed also by the VAE), so its copied feature stores are reused
    fp = demo_attribute._space_fingerprint(pipe, demo_attribute._fingerprint_of(train["images"]))
    scores, chosen, traj = {}, {}, None
    for method in s["methods"]:
        path = run / "scores" / f"{method}.npy"
        if method.startswith("montrage") and traj is None:
            t0 = time.time()
            traj = M.representation_trajectory(
                record, pipe.unet_config, train_ex["x0"], train_ex["ctx"], query_ex["x0"],
                query_ex["ctx"], cache_dir=run / "features" / "montrage", progress=progress)
            _log(f"MONTRAGE representations at {len(traj.steps)} checkpoints: "
                 f"{time.time() - t0:.0f} s")
        if path.exists():
            scores[method] = np.load(path)
            chosen[method] = json.loads(path.with_name(f"{method}_choice.json").read_text())[
                "chosen"]
            continue
        t0 = time.time()
        if method in ("montrage", "montrage-final"):
            cands = {method: method_scores(method, traj, record=record)}
        else:
            cands, _ = demo_attribute._candidate_scores(method, run, cfg, pipe, unet_params, sched,
                                              train_ex, query_ex, train, queries, fp, step,
                                              progress)
        sweep = {label: float(np.nanmean(pq(c)["rho"][val])) for label, c in cands.items()}
        best = max(sweep, key=sweep.get)
        scores[method], chosen[method] = np.asarray(cands[best], np.float32), best
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, scores[method])
        atomic_write_text(path.with_name(f"{method}_choice.json"), json.dumps(
            {"split": "validation queries", "metric": "mean Spearman vs soft ground truth",
             "val": sweep, "chosen": best}, indent=2))
        _log(f"{method}: {time.time() - t0:.0f} s (chosen {best})")
    # reference: the ground truth's own order with ties broken at random (the ceiling of ρ
    # for scores without ties: the 52-odd zero-truth images still get distinct ranks)
    soft = mixed.soft_ground_truth(tc, q["concept_a"], q["concept_b"], q["alpha"])
    ref = {"oracle": soft + 1e-9 * np.random.default_rng(s["seed"]).random(soft.shape)}
    per = {m: pq(sc) for m, sc in {**scores, **ref}.items()}
    summ = {m: mixed.summarize(per[m], q["alpha"], test, n_bootstrap=nb, seed=s["seed"])
            for m in per}
    # the mixtures alone (0 < α < 1: the anchors α = 0, 1 are single-concept queries)
    mix = test & (q["alpha"] > 0) & (q["alpha"] < 1)
    summ_mix = {m: mixed.summarize(per[m], q["alpha"], mix, n_bootstrap=nb, seed=s["seed"])
                for m in per} if mix.any() else {}

    doc = {"settings": s, "counts": {"train": int(len(tc)), "queries": int(len(val)),
                                     "val": int(val.sum()), "test": int(test.sum())},
           "generation_mix": gen_mix, "chosen": chosen,
           "methods": {m: _jsonable(v) for m, v in summ.items()},
           "methods_mixtures_only": {m: _jsonable(v) for m, v in summ_mix.items()}}
    md = [_generation_table(gen_mix), _method_table(summ, summ_mix, chosen, s["alphas"])]
    if traj is not None:
        steps = [int(x) for x in traj.steps]
        counts = M.seen_counts(record, steps, len(tc))
        mon, rows = _monitoring(traj, M.DEFAULT_TAPS, counts, tc, pq, q, val, test, nb, s["seed"])
        doc["monitoring"] = mon
        md.append(_table(f"3. monitoring (default representation: taps "
                         f"{'+'.join(M.DEFAULT_TAPS)}, t = 200; test queries)", rows))
        if s["alt_representation"]:
            t_alt, taps_alt = s["alt_representation"].split(":")
            spec_alt = M.RepresentationSpec(taps=tuple(taps_alt.split("+")), t=int(t_alt))
            tr_alt = M.representation_trajectory(
                record, pipe.unet_config, train_ex["x0"], train_ex["ctx"], query_ex["x0"],
                query_ex["ctx"], spec=spec_alt, progress=progress,
                cache_dir=run / "features" / f"montrage_t{t_alt}_{taps_alt}")
            mon2, rows2 = _monitoring(tr_alt, spec_alt.taps, counts, tc, pq, q, val, test, nb,
                                      s["seed"])
            doc["monitoring_alt"] = mon2
            md.append(_table(f"4. monitoring in the alternative representation (t = {t_alt}, "
                             f"taps {taps_alt}; test queries)", rows2))
    record.close()
    doc["wall_s_this_run"] = round(time.time() - t_start, 1)
    (run / "tables").mkdir(parents=True, exist_ok=True)
    head = (f"Mixed-concept queries: {doc['counts']['queries']} ({doc['counts']['val']} "
            f"validation, {doc['counts']['test']} test), {len(tc)} training images; source "
            f"run {src}. Cells: mean over test queries [95% bootstrap CI over queries].")
    atomic_write_text(run / "tables" / "mixed.md", "\n\n".join([head] + md) + "\n")
    atomic_write_text(run / "tables" / "mixed.json", json.dumps(doc, indent=2))
    print((run / "tables" / "mixed.md").read_text())
    print(f"(done in {time.time() - t_start:.0f} s)")


def _fmt(ci) -> str:
    return f"{ci.estimate:.3f} [{ci.low:.2f}, {ci.high:.2f}]"


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if hasattr(x, "_asdict"):
        return dict(x._asdict())
    return x


def _table(title: str, rows: list[dict]) -> str:
    from jaxattrib.eval.benchmarks import markdown_table
    return f"## {title}\n\n" + markdown_table(rows)


def _generation_table(gen_mix: dict) -> str:
    rows = [{"α (weight of A)": f"{a:g}", "n": v["n"], "colour A": f"{v['color A']:.2f}",
             "colour B": f"{v['color B']:.2f}", "shape A": f"{v['shape A']:.2f}",
             "shape B": f"{v['shape B']:.2f}"} for a, v in gen_mix.items()]
    return _table("1. generations: fraction classified as A's / B's colour and shape "
                  "(all queries)", rows)


def _method_table(summ: dict, summ_mix: dict, chosen: dict, alphas) -> str:
    rows = []
    for m, v in summ.items():
        r = {"method": NAMES.get(m, m), "ρ vs mixture": _fmt(v["rho"]),
             "mAP (A ∪ B)": _fmt(v["map_both"]), "tracking ρ(α, AUC_A>B)": _fmt(v["tracking"])}
        if m in summ_mix:
            r["ρ, 0<α<1 only"] = _fmt(summ_mix[m]["rho"])
            r["tracking, 0<α<1 only"] = _fmt(summ_mix[m]["tracking"])
        r.update({f"AUC_A>B α={a:g}": f"{v['auc_by_alpha'].get(float(a), float('nan')):.2f}"
                  for a in alphas})
        r["chosen on val"] = chosen.get(m, "-")
        rows.append(r)
    return _table("2. methods (test queries)", rows)


def _monitoring(traj, taps, counts, tc, pq, q, val, test, nb, seed):
    """Per-checkpoint similarities and trajectory aggregations vs the final checkpoint."""
    import jax

    from jaxattrib.attribution import montrage as M
    from jaxattrib.eval import mixed
    from jaxattrib.metrics import spearman_columns
    sims = traj.similarities(taps)                                   # [S, Q, N]
    mv = traj.movement(taps)
    cands = {f"step {int(st)}" + (" (base model)" if j == 0 else "") +
             (" = final" if j == len(sims) - 1 else ""): sims[j] for j, st in enumerate(traj.steps)}
    cands["mean over checkpoints"] = sims.mean(0)
    cands["mean of steps >= 1"] = sims[1:].mean(0)
    cands["movement × count (MONTRAGE default)"] = M.aggregate(sims, "movement", movement=mv,
                                                               counts=counts, seen="count")
    cands["delta = final − base"] = sims[-1] - sims[0]
    # the learned aggregation, fit on the validation queries with positives = A ∪ B exemplars
    tc_pos = mixed.soft_ground_truth(tc, q["concept_a"], q["concept_b"], q["alpha"]) > 0
    tsims = np.stack([traj.similarities((n,)) for n in taps], axis=1)   # [S, T, Q, N]
    w, _ = M.fit_learned_weights(tsims[:, :, val], tc_pos[val], jax.random.PRNGKey(seed))
    cands["learned (InfoNCE on val, positives A ∪ B)"] = np.asarray(M.learned_scores(w, tsims))
    # control: the same fit with the final checkpoint only (tap weights alone), so a gain of
    # 'learned' over final is not credited to the trajectory when it comes from tap weights
    w1, _ = M.fit_learned_weights(tsims[-1:, :, val], tc_pos[val], jax.random.PRNGKey(seed))
    cands["learned, final checkpoint only (tap weights)"] = np.asarray(
        M.learned_scores(w1, tsims[-1:]))
    final = pq(sims[-1])
    rows, out, per = [], {}, {}
    for name, sc in cands.items():
        m = per[name] = pq(sc)
        su = mixed.summarize(m, q["alpha"], test, n_bootstrap=nb, seed=seed)
        gain = mixed.paired_gain(m["rho"], final["rho"], test, n_bootstrap=nb, seed=seed)
        mix = test & (q["alpha"] > 0) & (q["alpha"] < 1)
        gmix = mixed.paired_gain(m["rho"], final["rho"], mix, n_bootstrap=nb, seed=seed) \
            if mix.any() else None
        rank = float(np.nanmean(spearman_columns(sc[test].T, sims[-1][test].T)))
        out[name] = {**_jsonable(su), "rho_gain_vs_final": _jsonable(gain),
                     "rho_gain_vs_final_mixtures_only": _jsonable(gmix),
                     "rank_corr_with_final": rank}
        rows.append({"scores": name, "ρ vs mixture": _fmt(su["rho"]),
                     "tracking ρ(α, AUC_A>B)": _fmt(su["tracking"]),
                     "mAP (A ∪ B)": _fmt(su["map_both"]),
                     "ρ gain vs final [paired CI]": f"{gain.estimate:+.3f} [{gain.low:+.3f}, "
                                                   f"{gain.high:+.3f}]",
                     "same, 0<α<1 only": "-" if gmix is None else
                     f"{gmix.estimate:+.3f} [{gmix.low:+.3f}, {gmix.high:+.3f}]",
                     "rank corr. with final": f"{rank:.3f}"})
    sm = lambda x: [round(float(v), 3) for v in jax.nn.softmax(x)]  # noqa: E731
    out["learned_weights"] = {"steps": sm(w["step_logits"]), "taps": sm(w["tap_logits"]),
                              "final_only_taps": sm(w1["tap_logits"])}
    out["movement_auc_exemplar_vs_distractor"] = _auc(mv.sum(0), tc >= 0)
    g = mixed.paired_gain(per["learned (InfoNCE on val, positives A ∪ B)"]["rho"],
                          per["learned, final checkpoint only (tap weights)"]["rho"], test,
                          n_bootstrap=nb, seed=seed)
    out["learned_rho_gain_vs_learned_final_only"] = _jsonable(g)
    rows.append({"scores": f"(learned weights: checkpoints {out['learned_weights']['steps']}, "
                           f"taps {list(taps)} {out['learned_weights']['taps']}; final-only "
                           f"taps {out['learned_weights']['final_only_taps']}. AUC of total "
                           f"movement, exemplars vs distractors: "
                           f"{out['movement_auc_exemplar_vs_distractor']:.3f}. ρ gain of "
                           f"learned over its final-only control: {g.estimate:+.3f} "
                           f"[{g.low:+.3f}, {g.high:+.3f}])",
                 **{k: "" for k in list(rows[0])[1:]}})
    return out, rows


def _auc(x, labels):
    from jaxattrib.metrics import roc_auc
    return float(roc_auc(x, labels))


if __name__ == "__main__":
    main()
