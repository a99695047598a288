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

Options:

* ``--baselines``: also the D-TRAK and TRAK rows (the run's feature stores).
* ``--project-out N``: also every row with the ``N`` leading directions of its training
  features' ``ΦᵀΦ`` removed from Φ and φ (:func:`~jaxattrib.eval.concept_benchmark.
  project_out_leading`; found on the training side only), λ chosen on validation as usual.
* ``--k K``: every feature set at projection dimension ``K`` instead of the run's
  ``attribution.k`` (same model, generations, rows, validation rule and λ grid). Nothing
  of the run's features is reused: Concept-TRAK's full method and the chosen variants are
  computed into ``RUN_DIR/features/k<K>/{concept-trak,concept-trak-variants}/`` (each folder
  guarded by a ``settings.json``: projector, k, Concept-TRAK settings, model step, data —
  another setting refuses to reuse it), the baselines into resumable feature stores under
  ``RUN_DIR/features/k<K>/{dtrak,trak}/`` (their metadata guard). Scores at another ``K`` use
  the dual ``N × N`` solve (:func:`~jaxattrib.attribution.concept_trak.scores_from_features`,
  the same ridge scores; at k = 32768 the ``k × k`` float64 kernel would be 8 GiB); at the
  run's ``k`` the benchmark's own primal path, so those rows reproduce ``scores/*.npy``.
  Tables: ``tables/variants_k<K>.md``.
* ``--lambda-curve``: a diagnostic, never a way to pick λ (λ is still chosen on the
  validation rows): every row's test P@10 ID / OOD (95% CIs), validation P@10 and the ridge's
  effective dimension at every ratio of ``attribution.lambda_ratios`` (or ``--curve-ratios``),
  and what the leading directions of ``ΦᵀΦ`` encode; ``tables/lambda_curve[_k<K>].{md,json}``.
  (λ = r · 0.1 · mean diag ΦᵀΦ = r · 0.1 · ||Φ||²_F / k while ΦΦᵀ barely depends on k, so
  the same ``r`` is a 16× smaller λ at k = 32768 than at 2048: compare curves by d_eff.)

    python benchmarks/concept_trak_variants.py --run-dir runs/concept_trak
    python benchmarks/concept_trak_variants.py --run-dir runs/concept_trak_v2 --variants "" \\
        --baselines --lambda-curve                   # k = 2048 (the run's), cached features
    python benchmarks/concept_trak_variants.py --run-dir runs/concept_trak_v2 --variants "" \\
        --baselines --lambda-curve --k 32768
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
    args = ap.parse_args(argv)
    import ml_collections

    from jaxattrib.attribution import concept_trak as ct
    from jaxattrib.base_model import base_model_info, load_base_model
    from jaxattrib.config import ConfigError, apply_overrides
    from jaxattrib.data.synthetic import SyntheticConceptSpec
    from jaxattrib.demo import _examples, _fingerprint_of
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
    pipe, info = load_base_model(config.base_model or None), base_model_info(
        config.base_model or None)
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
    img = queries["images"][plan["row_image"]]
    prompts = [str(queries["prompts"][i]) for i in plan["row_image"]]
    negs = [ct.remove_concept(p, c) for p, c in zip(prompts, plan["row_concept"])]
    ctx_q, ctx_tr = encode(prompts), encode(list(train["captions"]))
    base_cfg = dataclasses.replace(cb.concept_trak_config(config), proj_dim=K)
    val = plan["row_val"]
    cache: dict = {}
    ct_scorer = lambda q, P, r: ct.scores_from_features(q, P, r, solver=solver)  # noqa: E731

    def guard(folder):
        # features of another k live in plain .npy files: record what they were computed
        # with, and refuse to reuse them under other settings
        if not same_k:
            cb.check_feature_settings(folder, {
                "k": K, "projector": ct.make_concept_projector(params, base_cfg).meta(),
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
    proj = ct.make_concept_projector(params, base_cfg)
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
            model_fn, params, sched, train["images"], ctx_tr, base_cfg, proj, cache=cache))
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
            model_fn, params, sched, train["images"], ctx_tr, cfg, aproj, cache=acache))
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


if __name__ == "__main__":
    main()
