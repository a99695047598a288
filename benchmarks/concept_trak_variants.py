"""Why does Concept-TRAK underperform here? Variants of the full method on a finished Concept-TRAK
benchmark run (``benchmarks/concept_trak.py``), each scored on the same concept rows with λ
chosen on the same validation rows (issue #6, item 3):

* ``c⁻ = empty prompt``: the unconditional prompt (which the base model was trained on for
  classifier-free guidance) instead of the prompt with the concept removed (e.g. "a star on a
  black background", a caption form the model never saw).
* ``params = attn``: gradients w.r.t. all attention parameters (self + cross), D-TRAK's set,
  instead of cross-attention only.
* ``query side DSM, training side full``: plain DSM gradients of the query image at its inverted
  states (no concept loss) against the full training side.

Reuses the run's cached Concept-TRAK features where a variant shares a side with the full
method; new features go to ``RUN_DIR/features/concept-trak-variants/``. Writes
``RUN_DIR/tables/variants.md`` and prints it.

Options (each in full, with its folders, guards and the [design] choices of ``--per-timestep``:
docs/benchmarks/concept_trak.md "concept_trak_variants.py options"): ``--baselines`` (the D-TRAK
and TRAK rows), ``--project-out N`` (the ``N`` leading directions of the training ``ΦᵀΦ``
removed), ``--k K`` (every feature set at projection dimension ``K``, under
``RUN_DIR/features/k<K>/``, scored by the dual ``N × N`` solve: the same ridge scores),
``--per-timestep`` (each inverted state's query gradient scored alone, and one query-side
timestep weighting chosen on validation from a family fixed in advance), ``--lambda-curve`` (a
diagnostic, never a way to pick λ: test / validation P@10 and effective dimension per ratio; the
same ``r`` is a 16× smaller λ at k = 32768 than at 2048, so compare curves by d_eff).

    python benchmarks/concept_trak_variants.py --run-dir runs/concept_trak
    python benchmarks/concept_trak_variants.py --run-dir runs/concept_trak_v2 --variants "" \\
        --baselines --lambda-curve                   # k = 2048 (the run's), cached features
    python benchmarks/concept_trak_variants.py --run-dir runs/concept_trak_v2 --variants "" \\
        --baselines --lambda-curve --k 32768
    python benchmarks/concept_trak_variants.py --run-dir runs/concept_trak_v2 --variants "" \\
        --per-timestep
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np


VARIANTS = ("empty", "attn", "dsm-query")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", default="runs/concept_trak", help="a finished benchmark run")
    ap.add_argument("--variants", default="empty,attn,dsm-query",
                    help="comma-separated subset of empty, attn, dsm-query ('' = none)")
    ap.add_argument("--baselines", action="store_true",
                    help="also the D-TRAK and TRAK rows")
    ap.add_argument("--k", type=int, default=0,
                    help="projection dimension of every feature set (0 = the run's "
                         "attribution.k, cached features reused); another k computes the "
                         "features afresh under RUN_DIR/features/k<K>/ and scores with the "
                         "dual N x N solve")
    ap.add_argument("--lambda-curve", action="store_true",
                    help="also every row's test P@10 ID / OOD at every λ ratio (diagnostic; "
                         "λ is still chosen on the validation rows)")
    ap.add_argument("--project-out", type=int, default=0,
                    help="also every row with the N leading directions of its training "
                         "features' ΦᵀΦ removed from both sides (the rest not whitened)")
    ap.add_argument("--curve-ratios", default="",
                    help="comma-separated λ ratios of the curve (default: the run's "
                         "attribution.lambda_ratios, the grid validation chooses from)")
    ap.add_argument("--per-timestep", action="store_true",
                    help="also score each inverted state's query gradient alone (concept loss "
                         "and DSM), the norms per timestep, and a query-side timestep weighting "
                         "chosen on the validation rows (tables/per_timestep.md)")
    args = ap.parse_args(argv)
    import ml_collections

    from jaxattrib.attribution import concept_trak as ct
    from jaxattrib.train.base_model import base_model_info, load_base_model
    from jaxattrib.config import ConfigError, apply_overrides
    from jaxattrib.data.synthetic import SyntheticConceptSpec
    from jaxattrib.runs.demo_attribute import _examples, _fingerprint_of
    from jaxattrib.diffusion.schedule import schedule_from_diffusers_config
    from jaxattrib.eval import concept_benchmark as cb
    from jaxattrib.eval.benchmarks import markdown_table
    from jaxattrib.train.record import TrajectoryRecord

    chosen_vars = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in chosen_vars:
        if v not in VARIANTS:
            raise ConfigError(f"--variants: unknown variant {v!r}; expected some of {VARIANTS}")
    t0 = time.time()
    run = Path(args.run_dir)
    config = apply_overrides(ml_collections.ConfigDict(
        json.loads((run / "config.json").read_text())), [])
    run_k = int(config.attribution.k)
    K = args.k or run_k
    same_k = K == run_k
    if not same_k:
        config = apply_overrides(config, [f"attribution.k={K}"], source=str(run / "config.json"))
    feat_root = run / "features" if same_k else run / "features" / f"k{K}"
    suffix = "" if same_k else f"_k{K}"
    solver = "primal" if same_k else "dual"
    from jaxattrib.runs.demo import check_run_data_size
    info = base_model_info(config.base_model or None)
    check_run_data_size(run, info, config.base_model or None)   # made with this base model?
    pipe = load_base_model(config.base_model or None)
    spec = SyntheticConceptSpec(**{k: tuple(v) if isinstance(v, list) else v
                                   for k, v in info["data_spec"].items()})
    rec = TrajectoryRecord.open((run / "record").resolve())
    step = rec.latest_step()
    params = rec.load(step)["unet"]
    rec.close()
    train = dict(np.load(run / "data" / "train.npz"))
    queries = dict(np.load(run / "generations" / "queries.npz"))
    held = [{"color": h["color"], "shape": h["shape"]} for h in info["held_out"]]
    ood = ([cb.parse_combo(c, spec, "ood") for c in config.generate.ood_combos] or held)
    ids = [cb.parse_combo(c, spec, "id") for c in config.generate.id_combos]
    plan = cb.query_plan(ids, ood, spec.backgrounds, config.generate.per_combo,
                         config.eval.concepts)
    rel = cb.concept_ground_truth(train["captions"], plan["row_kind"], plan["row_concept"])
    verified = cb.verified_rows(queries["images"], plan["row_image"], plan["row_kind"],
                                plan["row_concept"], spec)
    sched = schedule_from_diffusers_config(pipe.scheduler_config)
    encode = lambda p: np.asarray(pipe.encode_prompts(list(p)))  # noqa: E731
    model_fn = ct.unet_model_fn(pipe.unet_config)
    # the UNet's inputs: VAE latents (posterior mean, encoded once) for a latent base model,
    # as the benchmark's own Concept-TRAK features (concept_benchmark._ablation)
    from jaxattrib.runs.concept_query import concept_inputs
    img = concept_inputs(pipe, queries["images"], config, "query",
                         f"{run}/generations/queries.npz")[0][plan["row_image"]]
    train_in = concept_inputs(pipe, train["images"], config, "train",
                              f"{run}/data/train.npz")[0]
    prompts = [str(queries["prompts"][i]) for i in plan["row_image"]]
    negs = [ct.remove_concept(p, c) for p, c in zip(prompts, plan["row_concept"])]
    ctx_q, ctx_tr = encode(prompts), encode(list(train["captions"]))
    base_cfg = dataclasses.replace(cb.concept_trak_config(config), proj_dim=K)
    val = plan["row_val"]
    cache: dict = {}
    ct_scorer = lambda q, P, r: ct.scores_from_features(q, P, r, solver=solver)  # noqa: E731
    proj = ct.make_concept_projector(params, base_cfg)

    def guard(folder):
        # features of another k live in plain .npy files: record what they were computed
        # with, and refuse to reuse them under other settings
        if not same_k:
            cb.check_feature_settings(folder, {
                "k": K, "projector": proj.meta(),
                "concept_trak": {f: str(v) for f, v in dataclasses.asdict(base_cfg).items()
                                 if f not in ("microbatch", "lam_ratio")},
                "record_step": int(step), "train": _fingerprint_of(train["images"]),
                "queries": _fingerprint_of(queries["images"]),
                "rows": [[p, str(c)] for p, c in zip(prompts, plan["row_concept"])]})
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def stored(folder, name, fn):
        p = folder / f"{name}.npy"
        if not p.exists():
            print(f"[{time.strftime('%H:%M:%S')}] computing {p}", flush=True)
            t = time.time()
            np.save(p, np.asarray(fn()))
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {time.time() - t:.0f} s", flush=True)
        return np.load(p)

    # name -> (Phi [N, k], phi rows [R, k], scorer)
    rows: dict = {}
    if same_k:
        cached = run / "features" / "concept-trak"
        # the benchmark stored test and validation rows separately (ablation_table)
        q = np.load(cached / "query_cl1_inv1_norm1.npy")
        v = np.load(cached / "val_cl1_inv1_norm1.npy")
        phi_full = np.zeros((len(val), q.shape[1]), q.dtype)
        phi_full[~val], phi_full[val] = q, v
        Phi_full = np.load(cached / "train_tl1_inv1_norm1.npy")
    else:
        ct_dir = guard(feat_root / "concept-trak")
        Phi_full = stored(ct_dir, "train_tl1_inv1_norm1", lambda: ct.train_features(
            model_fn, params, sched, train_in, ctx_tr, base_cfg, proj, cache=cache))
        phi_full = stored(ct_dir, "rows_cl1_inv1_norm1", lambda: ct.query_features(
            model_fn, params, sched, img, ctx_q, encode(negs), base_cfg, proj, cache=cache))
    rows["Concept-TRAK (benchmark)"] = (Phi_full, phi_full, ct_scorer)
    out_dir = (guard(feat_root / "concept-trak-variants") if chosen_vars else None)
    if "empty" in chosen_vars:
        phi = stored(out_dir, "query_empty_negative", lambda: ct.query_features(
            model_fn, params, sched, img, ctx_q, encode([""] * len(prompts)), base_cfg, proj,
            cache=cache))
        rows["c⁻ = empty prompt"] = (Phi_full, phi, ct_scorer)
    if "dsm-query" in chosen_vars:
        cfg = dataclasses.replace(base_cfg, concept_loss=False)
        phi = stored(out_dir, "query_dsm", lambda: ct.query_features(
            model_fn, params, sched, img, ctx_q, None, cfg, proj, cache=cache))
        rows["query side: DSM (no concept loss)"] = (Phi_full, phi, ct_scorer)
    if "attn" in chosen_vars:
        cfg = dataclasses.replace(base_cfg, param_spec="attn")
        aproj = ct.make_concept_projector(params, cfg)
        acache: dict = {}
        Phi = stored(out_dir, "train_attn", lambda: ct.train_features(
            model_fn, params, sched, train_in, ctx_tr, cfg, aproj, cache=acache))
        phi = stored(out_dir, "query_attn", lambda: ct.query_features(
            model_fn, params, sched, img, ctx_q, encode(negs), cfg, aproj, cache=acache))
        rows["params = attn (self + cross)"] = (Phi, phi, ct_scorer)
    if args.baselines:
        train_ex = _examples(pipe, train["images"], train["captions"])
        gen_ex = _examples(pipe, queries["images"], queries["prompts"])
        for m in ("dtrak", "trak"):
            t = time.time()
            Phi, phi = cb._trak_family_features(
                m, run, config, pipe, params, sched, train_ex, gen_ex,
                _fingerprint_of(train["images"]), step, features_dir=feat_root)
            print(f"[{time.strftime('%H:%M:%S')}] {m} features (k = {K}): "
                  f"{time.time() - t:.0f} s", flush=True)
            rows[cb.METHOD_LABEL[m]] = (Phi, phi[plan["row_image"]],
                                        cb._trak_family_scorer if same_k else ct_scorer)
    if args.project_out:
        for name, (Phi, phi, scorer) in list(rows.items()):
            rows[f"{name}, top {args.project_out} directions removed"] = (
                *cb.project_out_leading(Phi, phi, args.project_out), scorer)
    scores, chosen = {}, {}
    for name, (Phi, phi, scorer) in rows.items():
        s, sweep = cb._choose_and_score(phi, Phi, rel, val, config.attribution.lambda_ratios,
                                        k=config.eval.topk, scorer=scorer)
        scores[name], chosen[name] = s, f"{sweep['chosen']:g}"
    if same_k:  # the benchmark's own path: its stored scores must come back
        for name, f in (("Concept-TRAK (benchmark)", "concept-trak"), ("D-TRAK", "dtrak"),
                        ("TRAK", "trak")):
            if name in scores and (run / "scores" / f"{f}.npy").exists():
                ref = np.load(run / "scores" / f"{f}.npy")
                d = np.nanmax(np.abs(np.where(np.isnan(ref), 0, ref - scores[name])))
                print(f"{name}: max |score - scores/{f}.npy| = {d:.3g}")
    table, raw = cb.method_rows(scores, rel, ~val, plan["row_split"], verified, chosen,
                                k=config.eval.topk, n_bootstrap=config.eval.n_bootstrap,
                                seed=config.seed, kinds=plan["row_kind"])
    by_kind = cb._by_kind_rows(raw, config.eval.concepts, config.eval.topk)
    diag = [{"features": name, **cb.neighbour_purity(P, train["captions"]),
             "query color-vs-shape row cosine": cb._concept_row_cosine(p[~val],
                                                                       plan["row_image"][~val])}
            for name, (P, p, _) in rows.items()]
    diag = [{c: (f"{v:.3f}" if isinstance(v, float) else v) for c, v in r.items()} for r in diag]
    head = (f"Concept-TRAK variants (same test rows and validation rule as the benchmark; "
            f"k = {K}, {solver} solve)")
    md = "\n\n".join([
        head, markdown_table([{"variant": r.pop("method"), **r} for r in table]),
        markdown_table(by_kind), markdown_table(diag)]) + "\n"
    (run / "tables").mkdir(exist_ok=True)
    (run / "tables" / f"variants{suffix}.md").write_text(md)
    print(md)
    if args.per_timestep:
        pt_dir = guard(feat_root / "concept-trak-variants")

        def per_t(name, cfg, neg_ctx):
            path = pt_dir / f"{name}.npz"
            if not path.exists():
                print(f"[{time.strftime('%H:%M:%S')}] computing {path}", flush=True)
                t = time.time()
                d = ct.per_timestep_query_features(model_fn, params, sched, img, ctx_q, neg_ctx,
                                                   cfg, proj, cache=cache)
                np.savez(path, **d)
                print(f"[{time.strftime('%H:%M:%S')}] {name}: {time.time() - t:.0f} s",
                      flush=True)
            return dict(np.load(path))

        concept = per_t("per_timestep_concept", base_cfg, encode(negs))
        dsm = per_t("per_timestep_dsm", dataclasses.replace(base_cfg, concept_loss=False), None)
        refs = {"concept, normalized": (concept, True, phi_full)}
        if same_k:
            refs["concept, unnormalized"] = (concept, False, np.concatenate(
                [np.load(run / "features" / "concept-trak" / f"{s}_cl1_inv1_norm0.npy")
                 for s in ("query", "val")])[np.argsort(np.r_[np.flatnonzero(~val),
                                                               np.flatnonzero(val)])])
        if (feat_root / "concept-trak-variants" / "query_dsm.npy").exists():
            refs["DSM, normalized"] = (dsm, True, np.load(
                feat_root / "concept-trak-variants" / "query_dsm.npy"))
        for name, (d, norm, ref) in refs.items():
            w = 1.0 / d["grad_norm"][..., None] if norm else 1.0
            got = np.sum(d["grads"] * w, axis=1)
            print(f"check: Σ_t per-timestep gradients ({name}) vs the cached query features: "
                  f"max |Δ| / max |φ| = {np.abs(got - ref).max() / np.abs(ref).max():.2e}")
        text = per_timestep_report(concept, dsm, Phi_full, rel, val, plan, verified, config,
                                   K, solver, train["captions"], queries["prompts"],
                                   args.project_out)
        (run / "tables").mkdir(exist_ok=True)
        (run / "tables" / f"per_timestep{suffix}.md").write_text(text)
        print(text)
    if args.lambda_curve:
        k10 = config.eval.topk
        ratios = ([float(r) for r in args.curve_ratios.split(",") if r.strip()]
                  or config.attribution.lambda_ratios)
        curve_md, curve_json, lead, seen = [], {}, [], set()
        for name, (Phi, phi, scorer) in rows.items():
            curve = cb.lambda_curve(phi, Phi, rel, val, plan["row_split"], ratios,
                                    scorer=scorer, k=k10,
                                    n_bootstrap=config.eval.n_bootstrap, seed=config.seed)
            if id(Phi) not in seen:  # variants sharing the training side: listed once
                seen.add(id(Phi))
                lead += [{"features": name, **{c: (f"{v:.3f}" if isinstance(v, float) else v)
                                               for c, v in d.items()}}
                         for d in cb.leading_directions(Phi, train["captions"], n=5)]
            curve_json[name] = [{"ratio": c["ratio"], "val_precision": c["val_precision"],
                                 "d_eff": c["d_eff"],
                                 **{f"{sp}_{f}": getattr(c[sp]["precision"], f)
                                    for sp in ("id", "ood") for f in ("estimate", "low", "high")}}
                                for c in curve]
            curve_md.append({"features": name, "chosen (val)": chosen[name]})
            curve_md[-1]["table"] = markdown_table([
                {"λ ratio": f"{c['ratio']:g}" + (" ← val" if f"{c['ratio']:g}" == chosen[name]
                                                 else ""),
                 f"val P@{k10}": f"{c['val_precision']:.3f}",
                 f"test P@{k10} ID": cb._fmt(c["id"]["precision"]),
                 f"test P@{k10} OOD": cb._fmt(c["ood"]["precision"]),
                 "d_eff": f"{c['d_eff']:.1f}"} for c in curve])
        text = (f"λ curve (diagnostic only; λ is chosen on the validation rows): test P@{k10} "
                f"per λ ratio, k = {K}, {solver} solve; d_eff = Σ σ²/(σ²+λ) over ΦΦᵀ "
                f"(N = {len(train['images'])})\n\n"
                + "\n\n".join(f"{c['features']} (val chose {c['chosen (val)']})\n\n{c['table']}"
                              for c in curve_md)
                + "\n\nLeading directions of ΦᵀΦ (the first a small λ whitens): share of the "
                  "trace and η² of each concept over the training images\n\n"
                + markdown_table(lead) + "\n")
        (run / "tables" / f"lambda_curve{suffix}.md").write_text(text)
        (run / "tables" / f"lambda_curve{suffix}.json").write_text(json.dumps(
            {"k": K, "solver": solver, "curves": curve_json, "leading_directions": lead},
            indent=2))
        print(text)
    print(f"wall time {time.time() - t0:.0f} s")


def timestep_weightings(concept: dict) -> dict:
    """The query-side weighting family of ``--per-timestep`` (fixed before any result): name →
    query rows ``[R, k]`` from the per-timestep gradients ``grads [R, K, k]``, ``grad_norm`` and
    ``concept_norm [R, K]``. The first entry is the benchmark's feature (ties go to it)."""
    G, gn, cn = concept["grads"], concept["grad_norm"], concept["concept_norm"]
    ts = concept["ts"][0]
    unit = G / gn[..., None]
    out = {"normalized sum (benchmark)": unit.sum(1), "unnormalized sum": G.sum(1),
           "normalized, weighted by ‖ε(c) − ε(c⁻)‖": (unit * cn[..., None]).sum(1)}
    for m in range(len(ts)):
        if m > 0:
            out[f"normalized sum over t ≤ {ts[len(ts) - 1 - m]}"] = unit[:, :len(ts) - m].sum(1)
            out[f"normalized sum over t ≥ {ts[m]}"] = unit[:, m:].sum(1)
    return out


def per_timestep_report(concept, dsm, Phi, rel, val, plan, verified, config, K, solver,
                        train_captions, query_prompts, project_out=0):
    """``--per-timestep``'s tables (markdown): every timestep alone (concept loss, DSM), the
    norms per timestep, and the validation-chosen weighting against the benchmark; with
    ``project_out`` also the concept-loss timesteps with the training side's leading
    ``project_out`` directions removed from both sides."""
    from jaxattrib.attribution.concept_trak import lambda_from_ratio, scores_from_features
    from jaxattrib.attribution.trak import score, trak_kernel_inverse
    from jaxattrib.data.synthetic import parse_caption
    from jaxattrib.eval import concept_benchmark as cb
    from jaxattrib.eval.benchmarks import markdown_table
    from jaxattrib.metrics import bootstrap_ci, precision_at_k
    k10, ratios = config.eval.topk, config.attribution.lambda_ratios
    split, kinds = plan["row_split"], plan["row_kind"]
    test = ~val
    V3 = np.linalg.svd(np.asarray(Phi, np.float64), full_matrices=False)[2][:3].T  # [k, 3]
    bg = cb.concept_ground_truth(train_captions, ["background"] * len(val), [
        parse_caption(str(query_prompts[i]))["background"] for i in plan["row_image"]])
    kinvs: dict = {}

    def scorer(q, P, r):
        # scores_from_features (the benchmark's path), the k x k inverse kept per (Φ, ratio):
        # every row here shares one training side
        if solver != "primal":
            return scores_from_features(q, P, r, solver=solver)
        key = (id(P), r)
        if key not in kinvs:
            kinvs[key] = (P, trak_kernel_inverse(P, lambda_from_ratio(P, r)))
        return np.asarray(score(q, P, kinvs[key][1], dtype=np.float64))  # [Q, N]

    def evaluate(rows, Phi=Phi):
        scores, chosen, valp = {}, {}, {}
        for name, phi in rows.items():
            s, sweep = cb._choose_and_score(phi, Phi, rel, val, ratios, k=k10, scorer=scorer)
            scores[name], chosen[name] = s, f"{sweep['chosen']:g}"
            valp[name] = max(r["val_precision_at_k"] for r in sweep["sweep"])
        _, raw = cb.method_rows(scores, rel, test, split, verified, chosen, k=k10,
                                n_bootstrap=config.eval.n_bootstrap, seed=config.seed,
                                kinds=kinds)
        return scores, chosen, valp, raw

    def cells(raw, name, scores):
        m = raw[name]
        out = {f"test P@{k10} ID": cb._fmt(m["id"]["precision"]),
               f"test P@{k10} OOD": cb._fmt(m["ood"]["precision"])}
        for sp in ("id", "ood"):
            for kind in config.eval.concepts:
                out[f"{sp.upper()} {kind}"] = f"{m[f'{sp}_{kind}']['precision'].estimate:.3f}"
        # how much of the top 10 shares the generation's background (chance 1/3)
        out["top-10 same background"] = (
            f"{np.nanmean(precision_at_k(scores[name][test], bg[test], k10)):.3f}")
        return out

    def top3_share(phi):
        q = np.asarray(phi, np.float64)
        return float(np.mean(np.sum((q @ V3) ** 2, 1) / np.maximum(np.sum(q * q, 1), 1e-300)))

    ts = concept["ts"][0]
    full = (concept["grads"] / concept["grad_norm"][..., None]).sum(1)  # the benchmark's φ
    full = full / np.linalg.norm(full, axis=1, keepdims=True)
    tables = []
    for label, d in (("concept loss (Concept-TRAK's query side)", concept),
                     ("DSM at the inverted states (no concept loss)", dsm)):
        unit = d["grads"] / d["grad_norm"][..., None]
        rows = {f"t = {t}": d["grads"][:, j] for j, t in enumerate(ts)}
        rows["all (normalized sum)"] = unit.sum(1)
        sc, chosen, valp, raw = evaluate(rows)
        lines = []
        for j, name in enumerate(rows):
            line = {"timestep": name, f"val P@{k10}": f"{valp[name]:.3f}",
                    **cells(raw, name, sc),
                    "λ ratio (val)": chosen[name]}
            sel = {kind: kinds == kind for kind in config.eval.concepts}
            if label.startswith("concept"):
                line.update({f"‖ε(c)−ε(c⁻)‖ {kind}": (
                    f"{np.mean(d['concept_norm'][m, j]):.3g}" if j < len(ts) else "")
                    for kind, m in sel.items()})
            line.update({f"‖∇θ‖ {kind}": (f"{np.mean(d['grad_norm'][m, j]):.3g}"
                                           if j < len(ts) else "") for kind, m in sel.items()})
            line["cos to Concept-TRAK φ"] = (
                f"{np.mean(np.sum(unit[:, j] * full, 1)):.3f}" if j < len(ts) else "")
            line["top-3 training directions' share of ‖φ‖²"] = f"{top3_share(rows[name]):.3f}"
            lines.append(line)
        tables.append(f"{label}: each timestep's projected query gradient alone (norm means "
                      f"over all {len(val)} rows)\n\n" + markdown_table(lines))

    fam = timestep_weightings(concept)
    scores, chosen, valp, raw = evaluate(fam)
    best = max(fam, key=lambda n: valp[n])  # max returns the first maximum
    fam_lines = [{"query-side weighting": n + (" ← chosen on val" if n == best else ""),
                  f"val P@{k10}": f"{valp[n]:.3f}", **cells(raw, n, scores),
                  "λ ratio (val)": chosen[n]} for n in fam]
    bench = "normalized sum (benchmark)"
    p_b = precision_at_k(scores[bench], rel, k10)
    p_c = precision_at_k(scores[best], rel, k10)
    paired = []
    for sp in ("id", "ood"):
        sel = test & (split == sp)
        ci = bootstrap_ci(p_c[sel] - p_b[sel], np.nanmean, n=config.eval.n_bootstrap,
                          seed=config.seed)
        paired.append(f"{sp.upper()} {ci.estimate:+.3f} [{ci.low:+.2f}, {ci.high:+.2f}]")
    if project_out:
        rows = {f"t = {t}": concept["grads"][:, j] for j, t in enumerate(ts)}
        rows.update({n: fam[n] for n in ("normalized sum (benchmark)", "unnormalized sum")})
        # one SVD of the training side for every row: project all rows at once, then split
        P_out, Q = cb.project_out_leading(Phi, np.concatenate(list(rows.values())), project_out)
        rows = dict(zip(rows, np.split(Q, len(rows))))
        sc, chosen_o, valp_o, raw_o = evaluate(rows, Phi=P_out)
        tables.append(
            f"concept loss with the top {project_out} directions of the training features "
            f"removed from both sides (as --project-out)\n\n" + markdown_table([
                {"timestep": n, f"val P@{k10}": f"{valp_o[n]:.3f}", **cells(raw_o, n, sc),
                 "λ ratio (val)": chosen_o[n]} for n in rows]))
    text = (f"Concept-TRAK query side per timestep (k = {K}, {solver} solve; training side "
            f"unchanged; λ chosen on the validation rows for every row)\n\n"
            + "\n\n".join(tables)
            + "\n\nQuery-side timestep weighting, chosen on the validation rows only (the "
              "test columns of the other rows are diagnostics)\n\n"
            + markdown_table(fam_lines)
            + f"\n\nChosen on val: {best}; test P@{k10} minus the benchmark's, paired "
              f"(95% bootstrap CI over test rows): {', '.join(paired)}\n")
    return text


if __name__ == "__main__":
    main()
