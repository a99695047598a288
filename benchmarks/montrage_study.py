"""Why does MONTRAGE's monitoring not beat the final checkpoint in the demo? (issue #7)

Reads a finished demo run directory (default ``runs/demo``: its data, queries and trajectory
record; nothing there is written) and writes its own caches under ``--out`` (default
``runs/montrage_study``): representations of the 60 fine-tuning images and the queries at every
checkpoint, for *all* UNet taps at t = 200 (the demo's), 50 and 500 (resumable); and
``--fresh-per-concept`` new queries per concept from the final checkpoint with another seed (a
held-out set nothing was chosen on; ``0`` disables).

Query splits: ``val`` / ``test`` = the first / second half of each concept's demo queries (the
demo's split), ``fresh`` = the new generations. Ground truth: the training images of the
query's concept (AbC-style, as in the demo).

Printed tables (mAP and Recall@10 per split): (1) each single checkpoint (step 0 = base model);
(2) how much the trajectory changes (|sim_s − sim_final| vs the spread, rank correlation with
the final scores, exemplar vs distractor movement and its AUC, the spread of the movement ×
seen weights); (3) aggregations fixed before looking at test / fresh (``final``, ``mean``,
``mean of steps >= 1`` — added after seeing that ``movement`` gives step 0 no weight —,
``movement`` with ``seen`` in {ignore, count, mask}, ``base``, ``delta`` = final − base,
``seen-delta``, ``learned``), with the paired bootstrap 95% CI of the AP gain over final on
test + fresh; (4) per tap and timestep; (5) each tap's raw pooled-feature norm; (6) final vs
mean vs movement over a grid of representations; (7) the best setting on val mAP within
"final only", "trajectory" and overall; (8) in that representation, each aggregation vs its
own final checkpoint; (9) ``--probe-steps``: the demo's first updates replayed (same config
and seed) with a checkpoint per update, monitored live: do the images of update s's batch move
more than the others? Every table in full and the results: docs/benchmarks/montrage.md.

Decision rule (fixed in advance): an aggregation replaces the default only if its mAP beats
``final`` on val, on test and on fresh, and the CI of its paired AP gain over test + fresh
excludes 0.

    python benchmarks/montrage_study.py --run-dir runs/demo --out runs/montrage_study
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

K = 10


def _split_masks(concept: np.ndarray) -> np.ndarray:
    """The demo's validation split: the first half of each concept's queries."""
    val = np.zeros(len(concept), bool)
    for c in np.unique(concept):
        idx = np.flatnonzero(concept == c)
        val[idx[: len(idx) // 2]] = True
    return val


def _fresh_queries(out: Path, pipe, record, held, per_concept: int, seed: int,
                   backgrounds=("black", "white", "gray")) -> dict:
    """``per_concept`` new generations per held-out concept from the final checkpoint, each
    on a background drawn uniformly from ``backgrounds`` (the base model's, as the demo's
    queries; the 16-px pixel model's three give the draws this study was first run with)."""
    path = out / "fresh_queries.npz"
    if path.exists():
        return dict(np.load(path))
    import jax

    from jaxattrib.data.synthetic import caption
    from jaxattrib.generate import generate
    rng = np.random.default_rng(seed)
    prompts, concept = [], []
    for ci, h in enumerate(held):
        for _ in range(per_concept):
            prompts.append(caption(h["shape"], h["color"],
                                   backgrounds[rng.integers(len(backgrounds))]))
            concept.append(ci)
    unet = record.load(record.latest_step())["unet"]
    g = generate(pipe, prompts, jax.random.PRNGKey(seed), unet_params=unet,
                 num_inference_steps=25, guidance_scale=3.0)
    d = {"images": np.clip(np.asarray(g.images), -1, 1).astype(np.float32),
         "prompts": np.array(prompts), "concept": np.array(concept)}
    out.mkdir(parents=True, exist_ok=True)
    np.savez(path, **d)
    return d


def _rounded(x) -> list:
    return [round(float(v), 3) for v in np.asarray(x)]


def _metrics(scores, relevant):
    from jaxattrib.metrics import average_precision, recall_at_k
    ap = np.asarray(average_precision(scores, relevant), np.float64)
    return ap, float(np.nanmean(recall_at_k(scores, relevant, K)))


def main() -> None:
    ap_ = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap_.add_argument("--run-dir", default="runs/demo")
    ap_.add_argument("--out", default="runs/montrage_study")
    ap_.add_argument("--fresh-per-concept", type=int, default=12)
    ap_.add_argument("--fresh-seed", type=int, default=101)
    ap_.add_argument("--timesteps", default="200,50,500", help="first = the main setting")
    ap_.add_argument("--probe-steps", type=int, default=12,
                     help="section 9: replay this many demo updates with a checkpoint after "
                          "each (0 disables)")
    args = ap_.parse_args()
    t_start = time.time()

    import jax

    from jaxattrib.attribution import montrage as M
    from jaxattrib.train.base_model import base_model_info, load_base_model
    from jaxattrib.metrics import bootstrap_ci
    from jaxattrib.train.record import TrajectoryRecord

    run, out = Path(args.run_dir), Path(args.out)
    cfg = json.loads((run / "config.json").read_text())
    from jaxattrib.runs.demo import check_run_data_size
    info = base_model_info(cfg.get("base_model") or None)
    check_run_data_size(run, info, cfg.get("base_model") or None)  # made with this model?
    pipe = load_base_model(cfg.get("base_model") or None)
    held = [dict(h) for h in info["held_out"]]
    train = dict(np.load(run / "data" / "train.npz"))
    demo_q = dict(np.load(run / "generations" / "queries.npz"))
    record = TrajectoryRecord.open((run / "record").resolve())
    fresh = (_fresh_queries(out, pipe, record, held, args.fresh_per_concept, args.fresh_seed,
                            tuple(info["data_spec"]["backgrounds"]))
             if args.fresh_per_concept > 0 else None)

    q_images, q_prompts, q_concept = demo_q["images"], list(demo_q["prompts"]), demo_q["concept"]
    val = _split_masks(q_concept)
    split = np.where(val, "val", "test").astype(object)
    if fresh is not None:
        q_images = np.concatenate([q_images, fresh["images"]])
        q_prompts += list(fresh["prompts"])
        q_concept = np.concatenate([q_concept, fresh["concept"]])
        split = np.concatenate([split, np.full(len(fresh["images"]), "fresh", object)])
    splits = [s for s in ("val", "test", "fresh") if (split == s).any()]
    relevant = q_concept[:, None] == train["concept"][None, :]
    exemplar = train["concept"] >= 0
    ctx_tr = np.asarray(pipe.encode_prompts(list(train["captions"])))
    ctx_q = np.asarray(pipe.encode_prompts(q_prompts))
    nb = len(pipe.unet_config.block_out_channels)
    taps = tuple([f"down_{i}" for i in range(nb)] + ["mid"] + [f"up_{i}" for i in range(nb)])
    ts = [int(t) for t in args.timesteps.split(",")]
    # the UNet's inputs: VAE latents (posterior mean x scaling factor) for a latent base model,
    # as the demo's MONTRAGE features; the pixels for a pixel one
    from jaxattrib.diffusion.latents import encode_images
    train_x = encode_images(pipe.vae_config, pipe.vae_params, train["images"])
    q_x = encode_images(pipe.vae_config, pipe.vae_params, q_images)
    trajs = {}
    for t in ts:
        spec = M.RepresentationSpec(taps=taps, t=t, batch_size=64)
        trajs[t] = M.representation_trajectory(
            record, pipe.unet_config, train_x, ctx_tr, q_x, ctx_q, spec=spec,
            cache_dir=out / f"reps_t{t}", progress=False)
    main_t = ts[0]
    traj = trajs[main_t]
    steps = [int(s) for s in traj.steps]
    counts = M.seen_counts(record, steps, len(train["images"]))
    demo_taps = M.DEFAULT_TAPS

    # sanity: the demo's own cache (taps mid+up_0 at t=200) is reproduced
    demo_cache = run / "features" / "montrage"
    if main_t == 200 and (demo_cache / f"step_{steps[-1]:010d}.npz").exists():
        with np.load(demo_cache / f"step_{steps[-1]:010d}.npz") as z:
            sl = traj._slices(demo_taps)
            mine = np.concatenate([traj.train[-1][:, s] for s in sl], -1)
            print(f"check: demo cache vs this study, final-step train features max |diff| = "
                  f"{np.abs(mine - z['train']).max():.2e}")

    def table(title, rows, cols):
        print(f"\n## {title}\n")
        print("| " + " | ".join(cols) + " |")
        print("|" + "|".join("---" for _ in cols) + "|")
        for r in rows:
            print("| " + " | ".join(r) + " |")

    def evaluate(scores):
        res = {}
        for s in splits:
            m = split == s
            ap, rec = _metrics(scores[m], relevant[m])
            res[s] = (float(np.nanmean(ap)), rec, ap)
        return res

    def cells(res):
        return [f"{res[s][0]:.3f} / {res[s][1]:.3f}" for s in splits]

    mcols = [f"{s} mAP / R@{K}" for s in splits]
    n_q = {s: int((split == s).sum()) for s in splits}
    print(f"run {run}: N={len(train['images'])} training images ({int(exemplar.sum())} "
          f"exemplars), queries {n_q}; checkpoints {steps}; taps {taps}; t {ts}")
    print(f"seen counts per interval: min {counts[1:].min()}, max {counts[1:].max()} "
          f"(every image is trained on in every interval: "
          f"{bool((counts[1:] > 0).all())})")

    # 1. single checkpoints
    sims = traj.similarities(demo_taps)                       # [S, Q, N]
    rows = [[str(s)] + cells(evaluate(sims[j])) for j, s in enumerate(steps)]
    table(f"1. one checkpoint only (taps {'+'.join(demo_taps)}, t={main_t})", rows,
          ["step"] + mcols)

    # 2. how much the trajectory changes
    from jaxattrib.metrics import spearman_columns
    mv = traj.movement(demo_taps)                             # [S, N]
    w = M.movement_weights(mv, counts, "count")
    wn = w / w.sum(0, keepdims=True)
    spread = sims[-1].std(axis=1).mean()
    rows = []
    for j, s in enumerate(steps):
        rho = np.nanmean(spearman_columns(sims[j].T, sims[-1].T))
        qmove = np.linalg.norm(traj.representations("query", demo_taps)[j]
                               - traj.representations("query", demo_taps)[-1], axis=-1).mean()
        rows.append([str(s), f"{np.abs(sims[j] - sims[-1]).mean():.4f}", f"{rho:.3f}",
                     f"{mv[j][exemplar].mean():.4f}", f"{mv[j][~exemplar].mean():.4f}",
                     f"{qmove:.4f}", f"{wn[j].mean():.3f} [{wn[j].min():.3f}, "
                     f"{wn[j].max():.3f}]"])
    table(f"2. trajectory change (mean over queries x images; spread of final sims over "
          f"training images = {spread:.4f})", rows,
          ["step", "mean |sim_s - sim_final|", "rank corr. with final",
           "movement exemplars", "movement distractors", "query rep. distance to final",
           "movement x count weight: mean [min, max] over images"])
    from jaxattrib.metrics import roc_auc
    total_mv = mv.sum(0)
    reps = traj.representations("train", demo_taps)
    base_to_final = np.linalg.norm(reps[-1] - reps[0], axis=-1)
    print(f"\nAUC of total movement for exemplar vs distractor: "
          f"{roc_auc(total_mv, exemplar):.3f}; movement of base->final (exemplars "
          f"{base_to_final[exemplar].mean():.4f}, distractors "
          f"{base_to_final[~exemplar].mean():.4f})")
    agg_mv = M.aggregate(sims, "movement", movement=mv, counts=counts, seen="count")
    print(f"movement-count vs final scores: max |diff| {np.abs(agg_mv - sims[-1]).max():.4f}, "
          f"mean rank corr. {np.nanmean(spearman_columns(agg_mv.T, sims[-1].T)):.4f}; "
          f"vs mean: max |diff| {np.abs(agg_mv - sims.mean(0)).max():.4f}")

    # 3. aggregations
    def aggregations(tr, taps_sel, fit_learned=True):
        s_ = tr.similarities(taps_sel)
        m_ = tr.movement(taps_sel)
        out_ = {"final": s_[-1], "mean": s_.mean(0), "mean of steps >= 1": s_[1:].mean(0),
                "base (step 0)": s_[0],
                "movement/ignore": M.aggregate(s_, "movement", movement=m_),
                "movement/count (demo)": M.aggregate(s_, "movement", movement=m_,
                                                     counts=counts, seen="count"),
                "movement/mask": M.aggregate(s_, "movement", movement=m_, counts=counts,
                                             seen="mask"),
                "delta = final - base": s_[-1] - s_[0]}
        c_ = counts[1:].astype(np.float64)
        out_["seen-delta"] = np.einsum("sqn,sn->qn", np.diff(s_, axis=0),
                                       c_ / c_.sum(0, keepdims=True)) * (len(steps) - 1)
        if fit_learned:
            vm = split == "val"
            sub = M.RepTrajectory(tr.steps, tr.train, tr.query, tr.taps, tr.tap_dims)
            tsims = np.stack([sub.similarities((n,)) for n in taps_sel], axis=1)
            wts, losses = M.fit_learned_weights(tsims[:, :, vm], relevant[vm],
                                                jax.random.PRNGKey(0))
            out_["learned (fit on val)"] = np.asarray(M.learned_scores(wts, tsims))
            out_["_learned"] = (wts, losses)
        return out_

    aggs = aggregations(traj, demo_taps)
    wts, losses = aggs.pop("_learned")
    every = aggregations(traj, taps)
    aggs["learned, all taps (fit on val)"] = every["learned (fit on val)"]
    wts_all = every["_learned"][0]
    held_out = np.isin(split, ["test", "fresh"])
    base_res = evaluate(aggs["final"])
    rows = []
    for name, sc in aggs.items():
        res = evaluate(sc)
        ap_all, _ = _metrics(sc[held_out], relevant[held_out])
        ap_fin, _ = _metrics(aggs["final"][held_out], relevant[held_out])
        ci = bootstrap_ci(ap_all - ap_fin, n=2000, seed=0)
        beats = all(res[s][0] > base_res[s][0] for s in splits)
        rows.append([name] + cells(res) + [f"{ci.estimate:+.3f} [{ci.low:+.3f}, "
                                           f"{ci.high:+.3f}]",
                                           "yes" if beats and ci.low > 0 else "no"])
    table(f"3. aggregations (taps {'+'.join(demo_taps)}, t={main_t})", rows,
          ["aggregation"] + mcols + ["AP gain vs final, test+fresh [95% CI]",
                                     "meets the rule"])
    print(f"\nlearned weights (fit on {n_q['val']} val queries, 200 Adam steps): checkpoints "
          f"{_rounded(jax.nn.softmax(wts['step_logits']))}, taps "
          f"{_rounded(jax.nn.softmax(wts['tap_logits']))}; "
          f"val InfoNCE {losses[0]:.3f} -> {losses[-1]:.3f} (val metrics are in-sample); "
          f"all taps: checkpoints "
          f"{_rounded(jax.nn.softmax(wts_all['step_logits']))}, taps "
          f"{_rounded(jax.nn.softmax(wts_all['tap_logits']))}")

    # 4. per tap and per timestep
    rows = []
    for t in ts:
        for tap in (demo_taps,) + tuple((x,) for x in taps):
            a = aggregations(trajs[t], tap, fit_learned=False)
            for name in ("final", "delta = final - base", "movement/count (demo)"):
                rows.append([f"t={t}", "+".join(tap), name] + cells(evaluate(a[name])))
    table("4. per tap and timestep", rows, ["t", "taps", "aggregation"] + mcols)

    # 5. is the concatenation dominated by one tap? raw pooled-feature norms per tap
    norms = {n: float(np.linalg.norm(traj.train[-1][:, sl], axis=-1).mean())
             for n, sl in zip(taps, traj._slices(taps))}
    print("\nmean L2 norm of the raw pooled features per tap (final checkpoint, t="
          f"{main_t}): " + ", ".join(f"{n} {v:.2f}" for n, v in norms.items()))

    # 6. monitoring vs final over a grid of representations fixed in advance; every choice
    #    made on the val queries only
    sets = [(n,) for n in taps] + [("concat", demo_taps), ("tapnorm", demo_taps),
                                   ("tapnorm", taps)]
    grid_aggs = ("final", "mean", "movement/ignore", "movement/count (demo)")
    grid = {}
    for t in ts:
        for ts_ in sets:
            kind, sel = ts_ if len(ts_) == 2 and isinstance(ts_[1], tuple) else ("concat", ts_)
            tr = trajs[t] if kind == "concat" else _tap_normalized(trajs[t], sel)
            a = aggregations(tr, sel, fit_learned=False)
            label = ("+".join(sel) if len(sel) < len(taps) else "all taps") + (
                " (per-tap normalised)" if kind == "tapnorm" else "")
            for name in grid_aggs:
                grid[(t, label, name)] = evaluate(a[name])
    wins = {s: 0 for s in splits}
    configs = sorted({(t, lab) for t, lab, _ in grid})
    for t, lab in configs:
        for s in splits:
            wins[s] += grid[(t, lab, "movement/count (demo)")][s][0] > grid[(t, lab, "final")][s][0]
    up = [(t, lab) for t, lab in configs if lab.startswith("up_") and "+" not in lab]
    wins_up = {s: sum(grid[(t, lab, "movement/count (demo)")][s][0]
                      > grid[(t, lab, "final")][s][0] for t, lab in up) for s in splits}
    print(f"\nmovement/count beats final (mAP) in {wins} of {len(configs)} representations "
          f"(t x tap sets); for the single up-block taps in {wins_up} of {len(up)}")
    rows = []
    for t, lab in configs:
        if "normalised" in lab or "+" in lab:
            for name in grid_aggs:
                rows.append([f"t={t}", lab, name] + cells(grid[(t, lab, name)]))
    table("6. tap combinations", rows, ["t", "taps", "aggregation"] + mcols)

    def pick(names):
        keys = [k for k in grid if k[2] in names]
        return max(keys, key=lambda k: (grid[k]["val"][0], grid[k]["val"][1]))

    rows = []
    for fam, names in [("final only", ("final",)),
                       ("trajectory (mean / movement)", grid_aggs[1:]),
                       ("any", grid_aggs)]:
        k = pick(names)
        rows.append([fam, f"t={k[0]}, {k[1]}, {k[2]}"] + cells(grid[k]))
    table("7. chosen on val mAP over the grid of section 6 (t x tap sets x aggregation)", rows,
          ["family", "val-chosen setting"] + mcols)

    # 8. in the val-chosen representation: does the trajectory beat its own final checkpoint?
    t_b, lab_b, _ = pick(grid_aggs)
    kind_b = "tapnorm" if "normalised" in lab_b else "concat"
    sel_b = taps if lab_b.startswith("all taps") else tuple(lab_b.split(" ")[0].split("+"))
    tr_b = trajs[t_b] if kind_b == "concat" else _tap_normalized(trajs[t_b], sel_b)
    a_b = aggregations(tr_b, sel_b, fit_learned=False)
    ap_fin, _ = _metrics(a_b["final"][held_out], relevant[held_out])
    rows = []
    for name in grid_aggs + ("mean of steps >= 1",):
        ap_all, _ = _metrics(a_b[name][held_out], relevant[held_out])
        ci = bootstrap_ci(ap_all - ap_fin, n=2000, seed=0)
        rows.append([name] + cells(evaluate(a_b[name])) +
                     [f"{ci.estimate:+.3f} [{ci.low:+.3f}, {ci.high:+.3f}]"])
    table(f"8. the val-chosen representation (t={t_b}, {lab_b}): trajectory vs its final "
          f"checkpoint", rows, ["aggregation"] + mcols + ["AP gain vs final, test+fresh "
                                                          "[95% CI]"])
    if args.probe_steps > 0:
        _probe(out, run, cfg, pipe, train, ctx_tr, demo_q, ctx_q[: len(demo_q["images"])],
               train_x, q_x[: len(demo_q["images"])],
               args.probe_steps, taps, ts, demo_taps, table)
    print(f"\n(done in {time.time() - t_start:.0f} s)")


def _probe(out, run, cfg, pipe, train, ctx_tr, demo_q, ctx_q, train_x, q_x, n_steps, taps, ts,
           demo_taps, table):
    """9. Does an image's representation move more in the update that trains on it?

    Replays the demo's first ``n_steps`` updates (same config and seed, so the same batches
    and updates as the demo's record) with a checkpoint after every update and
    ``MontrageMonitor.on_checkpoint`` as ``finetune``'s hook, then compares the movement of
    the images in update s's batch with the others' (AUC, ratio of means). ``train_x`` /
    ``q_x``: the UNet inputs of the training images / demo queries (latents for a latent base
    model, which trains on the VAE posterior mean as the demo's fine-tuning does)."""
    from jaxattrib import parallel
    from jaxattrib.attribution import montrage as M
    from jaxattrib.diffusion.schedule import schedule_from_diffusers_config
    from jaxattrib.metrics import roc_auc
    from jaxattrib.train.diffusion_task import make_diffusion_loss
    from jaxattrib.train.finetune import TrainConfig, finetune

    f = cfg["finetune"]
    tc = TrainConfig(steps=n_steps, batch_size=f["batch_size"], learning_rate=f["learning_rate"],
                     schedule="constant", warmup_steps=0, weight_decay=0.0, seed=cfg["seed"],
                     checkpoint_every=1, mode=f["mode"], log_every=20)
    sched = schedule_from_diffusers_config(pipe.scheduler_config)
    loss_fn = make_diffusion_loss(pipe.unet_config, pipe.text_config, sched, pipe.vae_config,
                                  sample_posterior=not pipe.is_latent)   # as demo.finetune_stage
    params = {"unet": pipe.unet_params, "text_encoder": pipe.text_params}
    if pipe.is_latent:
        params["vae"] = pipe.vae_params
    ids = pipe.tokenizer(list(train["captions"]),
                         max_length=pipe.text_config.max_position_embeddings)
    images = train["images"]
    mesh = parallel.make_mesh(1)
    rec_dir = (out / f"probe_record_{n_steps}").resolve()
    specs = {t: M.RepresentationSpec(taps=taps, t=t, batch_size=64) for t in ts}
    mons = {t: M.MontrageMonitor(pipe.unet_config, train_x, ctx_tr, q_x, ctx_q,
                                 spec=specs[t], mesh=mesh, cache_dir=out / f"probe_reps_t{t}",
                                 source=rec_dir) for t in ts}
    t0 = time.time()
    _, rec = finetune(loss_fn, params, len(images),
                      lambda idx: {"images": images[idx], "input_ids": ids[idx]}, tc, rec_dir,
                      mesh=mesh,
                      progress=False, on_checkpoint=lambda s, p: [m.on_checkpoint(s, p)
                                                                  for m in mons.values()])
    exemplar = train["concept"] >= 0
    rows = []
    for t in ts:
        # the monitors' live caches; a rerun (or resumed) probe fills in what they missed
        tr = M.representation_trajectory(rec, pipe.unet_config, train_x, ctx_tr,
                                         q_x, ctx_q, spec=specs[t], mesh=mesh,
                                         cache_dir=out / f"probe_reps_t{t}", progress=False)
        for sel in (demo_taps,) + tuple((x,) for x in taps):
            mv = tr.movement(sel)[1:]                                  # [n_steps, N]
            inb = np.zeros_like(mv, bool)
            for s in range(n_steps):
                inb[s, rec.step_info(s)["indices"]] = True
            aucs = [roc_auc(mv[s], inb[s]) for s in range(n_steps)]
            ratio = mv[inb].mean() / mv[~inb].mean()
            rows.append([f"t={t}", "+".join(sel), f"{np.mean(aucs):.3f} "
                         f"[{np.min(aucs):.2f}, {np.max(aucs):.2f}]", f"{ratio:.3f}",
                         f"{mv.mean():.4f}",
                         f"{roc_auc(mv.sum(0), exemplar):.3f}"])
    table(f"9. per-update probe: the demo's first {n_steps} updates, a checkpoint after each "
          f"(probe {time.time() - t0:.0f} s)", rows,
          ["t", "taps", "AUC movement: in batch vs not, mean [min, max] over updates",
           "mean movement in batch / not", "mean movement per update",
           "AUC total movement: exemplar vs distractor"])


def _tap_normalized(traj, taps):
    """The trajectory restricted to ``taps`` with each tap's pooled features L2-normalised
    before concatenation (every tap weighs the same in the cosine: the mean of the per-tap
    cosines)."""
    from jaxattrib.attribution import montrage as M
    sl = traj._slices(taps)

    def norm(x):
        return np.concatenate([M.l2_normalize(x[..., s]) for s in sl], -1)

    return M.RepTrajectory(traj.steps, norm(traj.train), norm(traj.query), tuple(taps),
                           tuple(s.stop - s.start for s in sl))


if __name__ == "__main__":
    main()
