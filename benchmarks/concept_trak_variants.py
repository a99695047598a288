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

    python benchmarks/concept_trak_variants.py --run-dir runs/concept_trak
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", default="runs/concept_trak", help="a finished benchmark run")
    ap.add_argument("--variants", default="empty,attn,dsm-query",
                    help="comma-separated subset of empty, attn, dsm-query")
    args = ap.parse_args(argv)
    import ml_collections

    from jaxattrib.attribution import concept_trak as ct
    from jaxattrib.base_model import base_model_info, load_base_model
    from jaxattrib.config import apply_overrides
    from jaxattrib.data.synthetic import SyntheticConceptSpec
    from jaxattrib.diffusion.schedule import schedule_from_diffusers_config
    from jaxattrib.eval import concept_benchmark as cb
    from jaxattrib.eval.benchmarks import markdown_table
    from jaxattrib.train.record import TrajectoryRecord

    t0 = time.time()
    run = Path(args.run_dir)
    config = apply_overrides(ml_collections.ConfigDict(
        json.loads((run / "config.json").read_text())), [])
    pipe, info = load_base_model(config.base_model or None), base_model_info(
        config.base_model or None)
    spec = SyntheticConceptSpec(**{k: tuple(v) if isinstance(v, list) else v
                                   for k, v in info["data_spec"].items()})
    rec = TrajectoryRecord.open((run / "record").resolve())
    params = rec.load(rec.latest_step())["unet"]
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
    base_cfg = cb.concept_trak_config(config)
    cached = run / "features" / "concept-trak"
    out_dir = run / "features" / "concept-trak-variants"
    out_dir.mkdir(parents=True, exist_ok=True)
    val = plan["row_val"]

    def stored(name, fn):
        p = out_dir / f"{name}.npy"
        if not p.exists():
            print(f"[{time.strftime('%H:%M:%S')}] computing {name}", flush=True)
            np.save(p, np.asarray(fn()))
        return np.load(p)

    def full_rows(name):
        # the benchmark stored test and validation rows separately (ablation_table)
        q, v = np.load(cached / f"query_{name}.npy"), np.load(cached / f"val_{name}.npy")
        out = np.zeros((len(val), q.shape[1]), q.dtype)
        out[~val], out[val] = q, v
        return out

    Phi_full = np.load(cached / "train_tl1_inv1_norm1.npy")
    variants = {"Concept-TRAK (benchmark)": (Phi_full, full_rows("cl1_inv1_norm1"))}
    chosen_vars = [v.strip() for v in args.variants.split(",") if v.strip()]
    cache: dict = {}
    if "empty" in chosen_vars:
        proj = ct.make_concept_projector(params, base_cfg)
        phi = stored("query_empty_negative", lambda: ct.query_features(
            model_fn, params, sched, img, ctx_q, encode([""] * len(prompts)), base_cfg, proj,
            cache=cache))
        variants["c⁻ = empty prompt"] = (Phi_full, phi)
    if "dsm-query" in chosen_vars:
        proj = ct.make_concept_projector(params, base_cfg)
        cfg = dataclasses.replace(base_cfg, concept_loss=False)
        phi = stored("query_dsm", lambda: ct.query_features(
            model_fn, params, sched, img, ctx_q, None, cfg, proj, cache=cache))
        variants["query side: DSM (no concept loss)"] = (Phi_full, phi)
    if "attn" in chosen_vars:
        cfg = dataclasses.replace(base_cfg, param_spec="attn")
        proj = ct.make_concept_projector(params, cfg)
        acache: dict = {}
        Phi = stored("train_attn", lambda: ct.train_features(
            model_fn, params, sched, train["images"], ctx_tr, cfg, proj, cache=acache))
        phi = stored("query_attn", lambda: ct.query_features(
            model_fn, params, sched, img, ctx_q, encode(negs), cfg, proj, cache=acache))
        variants["params = attn (self + cross)"] = (Phi, phi)
    scores, chosen = {}, {}
    for name, (Phi, phi) in variants.items():
        s, sweep = cb._choose_and_score(
            phi, Phi, rel, val, config.attribution.lambda_ratios, k=config.eval.topk,
            scorer=lambda q, P, r: ct.scores_from_features(q, P, r))
        scores[name], chosen[name] = s, f"{sweep['chosen']:g}"
    table, raw = cb.method_rows(scores, rel, ~val, plan["row_split"], verified, chosen,
                                k=config.eval.topk, n_bootstrap=config.eval.n_bootstrap,
                                seed=config.seed, kinds=plan["row_kind"])
    by_kind = cb._by_kind_rows(raw, config.eval.concepts, config.eval.topk)
    diag = [{"features": name, **cb.neighbour_purity(P, train["captions"]),
             "query color-vs-shape row cosine": cb._concept_row_cosine(p[~val],
                                                                       plan["row_image"][~val])}
            for name, (P, p) in variants.items()]
    diag = [{c: (f"{v:.3f}" if isinstance(v, float) else v) for c, v in r.items()} for r in diag]
    md = "\n\n".join([
        "Concept-TRAK variants (same test rows and validation rule as the benchmark)",
        markdown_table([{"variant": r.pop("method"), **r} for r in table]),
        markdown_table(by_kind), markdown_table(diag)]) + "\n"
    (run / "tables").mkdir(exist_ok=True)
    (run / "tables" / "variants.md").write_text(md)
    print(md)
    print(f"wall time {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
