"""The customization benchmark: ground truth by construction (AbC-style), two variants.

The shipped base model (:mod:`jaxattrib.train.base_model`; four (shape, color) concepts withheld from
pretraining) is fine-tuned, with a trajectory record, on a small set = exemplars of the four
new concepts + distractor images of concepts it already knows. Queries are generated from the
fine-tuned model, each prompted with one new concept *and* one variation; the generator's own
training data then defines the ground truth:

* **between-concept** (which concept's exemplars): relevant = every exemplar of the query's
  concept, ranked among all ``N`` fine-tuning images (as in AbC and the demo).
* **within-concept** (which exemplar) [design]: every exemplar of a concept carries a distinct,
  identifiable *variation* — its background (``black`` / ``white`` / ``gray``; the base model
  knows all three, the synthetic renderer draws them exactly, and
  :func:`jaxattrib.data.synthetic.classify_concepts` recovers them from pixels). Exemplars are
  chosen so the variations cycle (``exemplars_per_concept / 3`` per background). A query
  prompted "a red square on a white background" is relevant to the red-square exemplars on
  white. Reported ranked *among the query concept's exemplars* (mAP, top-1 accuracy; chance:
  ``1 / #variations``) and among all ``N`` images (Recall@10, mAP). Queries whose generated
  background the classifier reads as another one are left out of the within-concept
  validation and test sets (their ground truth would be wrong); the count is reported.

Queries are ordered (concept, variation, repeat); the first half of every (concept, variation)
group is the validation split that chooses each method's λ (and, with
``attribution.tune_sign``, the sign of the gradient methods), separately per variant — never
evaluated. Metrics are means over the test queries with percentile-bootstrap 95% CIs over
queries. The stages (data, fine-tuning + record, generation, attribution) are the demo's
(:mod:`jaxattrib.runs.demo`), so both share one implementation and one run-directory layout::

    config.json, data/train.npz, record/, generations/queries.npz (+ PNGs)
    features/<method>/...            resumable feature stores (TracIn: one per checkpoint)
    scores/{between,within}/<method>.npy  [Q, N]; <method>_lambda.json = the validation sweep
    tables/customization.{md,json}   the tables; results/*.json + report.html (jaxattrib report)

Every stage is cached, so a rerun reuses everything and a killed run continues.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxattrib.attribution.methods import METHODS
from jaxattrib.config import ConfigError
from jaxattrib.runs.rundir import RunDir

logger = logging.getLogger(__name__)


def _log(msg: str) -> None:
    logger.info("[jaxattrib customization %s] %s", time.strftime('%H:%M:%S'), msg)


# ----------------------------------------------------------------------------- ground truth

def query_plan(held: Sequence[dict], variations: Sequence[str], per_variation: int,
               variation: str = "background") -> dict:
    """Prompts for every (new concept, variation) pair, ``per_variation`` each.

    Returns ``prompts [Q]`` (synthetic captions), ``concept [Q]`` (index into ``held``),
    ``variation [Q]`` (the prompted value, str) and ``group [Q]`` (``concept * V + variation
    index``: the strata of the validation split), ordered (concept, variation, repeat).
    """
    from jaxattrib.data.synthetic import caption
    if variation != "background":
        raise ConfigError(f"variation={variation!r}: only 'background' is supported (the base "
                          f"model was pretrained on solid shapes over black/white/gray)")
    if per_variation < 2:
        raise ConfigError(f"generate.per_variation={per_variation}: need >= 2 (half of each "
                          f"group validates λ, the rest is tested)")
    prompts, concept, var, group = [], [], [], []
    for ci, h in enumerate(held):
        for vi, v in enumerate(variations):
            for _ in range(per_variation):
                prompts.append(caption(h["shape"], h["color"], v))
                concept.append(ci)
                var.append(v)
                group.append(ci * len(variations) + vi)
    return {"prompts": np.array(prompts), "concept": np.array(concept, np.int32),
            "variation": np.array(var), "group": np.array(group, np.int32)}


def caption_variations(captions: Sequence[str], variation: str = "background") -> np.ndarray:
    """The value of ``variation`` each synthetic caption states, ``[N]`` str."""
    from jaxattrib.data.synthetic import parse_caption
    return np.array([parse_caption(str(c))[variation] for c in captions])


def ground_truth(train_concept: np.ndarray, train_variation: np.ndarray,
                 query_concept: np.ndarray, query_variation: np.ndarray) -> dict:
    """Relevance matrices of both variants.

    Args:
      train_concept: ``[N]`` int, new-concept index of each exemplar, ``-1`` for distractors.
      train_variation: ``[N]`` str, each training image's variation.
      query_concept, query_variation: ``[Q]``, what each query was prompted with.

    Returns:
      ``between`` ``[Q, N]`` bool (exemplars of the query's concept), ``within`` ``[Q, N]``
      (those with the query's variation), ``candidates`` ``[Q, N]`` (= ``between``: the items
      within-concept rankings are restricted to).
    """
    tc, qc = np.asarray(train_concept), np.asarray(query_concept)
    if (qc < 0).any():
        raise ValueError("ground_truth: query_concept must be >= 0 (a new concept)")
    between = (qc[:, None] == tc[None, :]) & (tc[None, :] >= 0)
    same = np.asarray(query_variation)[:, None] == np.asarray(train_variation)[None, :]
    counts = between.sum(1)
    if len(counts) and (counts.min() != counts.max() or counts.min() == 0):
        raise ValueError(f"ground_truth: every query concept needs the same, non-zero number of "
                         f"exemplars; got {sorted(set(counts.tolist()))}")
    return {"between": between, "within": between & same, "candidates": between}


def variation_check(images: np.ndarray, prompted: np.ndarray, spec,
                    variation: str = "background") -> np.ndarray:
    """``[Q]`` bool: the classifier reads the prompted ``variation`` in each generated image."""
    from jaxattrib.data.synthetic import classify_concepts
    pred = classify_concepts(images, spec)[variation]
    return np.array([spec.vocab(variation)[p] for p in pred]) == np.asarray(prompted)


# ----------------------------------------------------------------------------- metrics

def retrieval_metrics(scores: np.ndarray, relevant: np.ndarray, queries: np.ndarray, *,
                      k: int = 10, candidates: np.ndarray | None = None,
                      n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Recall@k, mAP and top-1 accuracy over the ``queries`` (bool ``[Q]``), with bootstrap CIs.

    ``candidates`` (``[Q, N]`` bool, same count ``M`` per row) ranks each query among its
    candidates only; ``k`` is then capped at ``M``. Returns ``{'n', 'k', 'recall', 'map',
    'top1'}``, each metric a :class:`~jaxattrib.metrics.CI` (95%, over queries).
    """
    from jaxattrib.metrics import (average_precision, bootstrap_ci, precision_at_k,
                                        recall_at_k, restrict_to_candidates)
    s, r = np.asarray(scores)[queries], np.asarray(relevant)[queries]
    if candidates is not None:
        s, r = restrict_to_candidates(s, r, np.asarray(candidates)[queries])
    if not len(s):
        raise ValueError("retrieval_metrics: no query selected")
    k = min(int(k), s.shape[1])
    per_query = {"recall": recall_at_k(s, r, k), "map": average_precision(s, r),
                 "top1": precision_at_k(s, r, 1)}
    out = {"n": int(len(s)), "k": k}
    for name, v in per_query.items():
        out[name] = bootstrap_ci(v, np.nanmean, n=n_bootstrap, seed=seed)
    return out


def paired_ap_difference(scores_a: np.ndarray, scores_b: np.ndarray, relevant: np.ndarray,
                         queries: np.ndarray, *, candidates: np.ndarray | None = None,
                         n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Paired comparison of two score matrices ``[Q, N]`` of the *same* queries and training
    set (e.g. one method under two settings): per selected query (``queries`` ``[Q]`` bool) the
    average precision under each, and the mean of ``AP_b − AP_a`` with a 95 % bootstrap CI over
    queries, resampling the pairs together [design]. ``candidates`` as in
    :func:`retrieval_metrics`. Returns ``{'n', 'a', 'b', 'diff'}`` (:class:`CI` each)."""
    from jaxattrib.metrics import average_precision, bootstrap_ci, restrict_to_candidates
    r = np.asarray(relevant)[queries]
    aps = []
    for sc in (scores_a, scores_b):
        s = np.asarray(sc)[queries]
        rr = r
        if candidates is not None:
            s, rr = restrict_to_candidates(s, r, np.asarray(candidates)[queries])
        aps.append(average_precision(s, rr))
    if not len(aps[0]):
        raise ValueError("paired_ap_difference: no query selected")
    ci = lambda v: bootstrap_ci(v, np.nanmean, n=n_bootstrap, seed=seed)  # noqa: E731
    return {"n": int(len(aps[0])), "a": ci(aps[0]), "b": ci(aps[1]), "diff": ci(aps[1] - aps[0])}


def _fmt_ci(ci) -> str:
    return f"{ci.estimate:.3f} [{ci.low:.2f}, {ci.high:.2f}]"


def markdown_table(rows: Sequence[dict]) -> str:
    """A GitHub markdown table of ``rows`` (keys of the first row are the columns)."""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


METHOD_NAMES = {name: spec.label for name, spec in METHODS.items()}  # names in the tables


def benchmark_tables(scores: dict, gt: dict, test: np.ndarray, within_ok: np.ndarray,
                     chosen: dict, *, k: int = 10, n_bootstrap: int = 1000,
                     seed: int = 0) -> dict:
    """Rows of the between- and within-concept tables.

    ``scores``: ``{'between': {method: [Q, N]}, 'within': {...}}`` (λ chosen per variant);
    ``test``: ``[Q]`` bool test queries; ``within_ok``: ``[Q]`` bool, queries whose variation
    the classifier confirms (the within-concept test set is ``test & within_ok``); ``chosen``:
    ``{variant: {method: label}}`` of the validation choice. Returns ``{'between': rows,
    'within': rows, 'raw': {...}}`` (rows for :func:`markdown_table`, raw: floats + CIs).
    """
    between, within, raw = [], [], {"between": {}, "within": {}}
    for method, s in scores["between"].items():
        m = retrieval_metrics(s, gt["between"], test, k=k, n_bootstrap=n_bootstrap, seed=seed)
        raw["between"][method] = m
        between.append({"method": METHOD_NAMES.get(method, method),
                        f"Recall@{k}": _fmt_ci(m["recall"]), "mAP": _fmt_ci(m["map"]),
                        "chosen on val": chosen["between"].get(method, "-")})
    wt = test & within_ok
    for method, s in scores["within"].items():
        among = retrieval_metrics(s, gt["within"], wt, k=k, candidates=gt["candidates"],
                                  n_bootstrap=n_bootstrap, seed=seed)
        overall = retrieval_metrics(s, gt["within"], wt, k=k, n_bootstrap=n_bootstrap,
                                    seed=seed)
        raw["within"][method] = {"among_concept": among, "overall": overall}
        within.append({"method": METHOD_NAMES.get(method, method),
                       "mAP among concept": _fmt_ci(among["map"]),
                       "top-1 among concept": _fmt_ci(among["top1"]),
                       f"Recall@{k} (all N)": _fmt_ci(overall["recall"]),
                       "mAP (all N)": _fmt_ci(overall["map"]),
                       "chosen on val": chosen["within"].get(method, "-")})
    return {"between": between, "within": within, "raw": raw}


def top_k_composition(scores: dict, train_captions, query_prompts, queries: np.ndarray, *,
                      k: int = 10) -> list[dict]:
    """What each method's top-``k`` training images share with the query [design]: per method
    of ``scores`` (``{method: [Q, N]}``), the fraction of the top-``k`` of the selected
    ``queries`` (``[Q]`` bool) with the query's background, color, shape, and (color, shape)
    concept, parsed from the synthetic captions (:func:`~jaxattrib.data.synthetic.parse_caption`);
    a last row gives the base rates over all ``N`` (what random ranking gets on average).
    Says which attribute a method's ranking is organised by (e.g. background first)."""
    from jaxattrib.data.synthetic import parse_caption
    fields = ("background", "color", "shape")
    tr = [parse_caption(str(c)) for c in train_captions]
    qu = [parse_caption(str(p)) for i, p in enumerate(query_prompts) if queries[i]]
    match = {f: np.array([[t[f] == q[f] for t in tr] for q in qu]) for f in fields}
    match["concept"] = match["color"] & match["shape"]
    cols = {"background": "same background", "color": "same color", "shape": "same shape",
            "concept": "query concept"}

    def row(name, frac):
        return {"method": name, **{cols[f]: f"{frac(match[f]):.2f}" for f in cols}}
    rows = []
    for method, s in scores.items():
        top = np.argsort(-np.asarray(s)[queries], axis=1, kind="stable")[:, :k]
        rows.append(row(METHOD_NAMES.get(method, method),
                        lambda m: np.take_along_axis(m, top, axis=1).mean()))
    rows.append(row(f"base rate (all {len(tr)})", lambda m: m.mean()))
    return rows


def _jsonable_metrics(raw: dict) -> dict:
    def conv(x):
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        if hasattr(x, "_asdict"):
            return dict(x._asdict())
        return x
    return conv(raw)


# ----------------------------------------------------------------------------- the run

def customization_truth(train: dict, queries: dict, spec, variation: str):
    """``(gt, ok, val)`` of a customization run: :func:`ground_truth` of its training set and
    queries, which queries show their prompted ``variation`` (:func:`variation_check`), and the
    validation half (the first half of each (concept, variation) group)."""
    from jaxattrib.runs.demo_attribute import _validation_mask
    gt = ground_truth(train["concept"], caption_variations(train["captions"], variation),
                      queries["concept"], queries["variation"])
    ok = variation_check(queries["images"], queries["variation"], spec, variation)
    return gt, ok, _validation_mask(queries["group"])


def run_customization(config, run_dir: str | Path = "runs/customization",
                      progress: bool = True) -> dict:
    """Runs (or resumes) the customization benchmark; returns the tables (see
    :func:`benchmark_tables`) plus ``counts``, ``generation_accuracy`` and ``wall_s``."""
    from jaxattrib.runs import demo, demo_attribute
    from jaxattrib.train.base_model import spec_from_info
    from jaxattrib.data.synthetic import classify_concepts
    t0 = time.time()
    run_dir, pipe, info = demo.open_base_run(run_dir, config)
    spec = spec_from_info(info)
    variations = spec.vocab(config.variation)
    train = demo.build_data(run_dir, config, info, stratify=config.variation)["train"]
    _log(f"fine-tuning set: {len(train['images'])} images "
         f"({int((train['concept'] >= 0).sum())} exemplars, variations {variations})")
    unet_params, record = demo.finetune_stage(run_dir, config, pipe, train, progress)
    step = record.latest_step()
    record.close()
    held = [dict(h) for h in info["held_out"]]
    plan = query_plan(held, variations, config.generate.per_variation, config.variation)
    queries = demo.generate_stage(run_dir, config, pipe, unet_params, held, plan)
    gt, ok, val = customization_truth(train, queries, spec, config.variation)
    pred = classify_concepts(queries["images"], spec)
    gen_acc = {"shape": float(np.mean([spec.shapes[p] == held[c]["shape"] for p, c in
                                       zip(pred["shape"], queries["concept"])])),
               "color": float(np.mean([spec.colors[p] == held[c]["color"] for p, c in
                                       zip(pred["color"], queries["concept"])])),
               config.variation: float(ok.mean())}
    _log(f"{len(queries['images'])} queries; classifier agreement with the prompt {gen_acc}")
    variants = {"between": demo_attribute.Variant(gt["between"], val),
                "within": demo_attribute.Variant(gt["within"], val & ok, gt["candidates"])}
    scores = demo_attribute.attribute_variants(
        run_dir, config, pipe, unet_params, train, queries,
        demo_attribute._fingerprint_of(train["images"]), step, variants, progress)
    chosen = {}
    for name in variants:
        chosen[name] = {}
        for method in scores[name]:
            p = RunDir(run_dir).scores / name / f"{method}_lambda.json"
            if p.exists():
                chosen[name][method] = json.loads(p.read_text())["chosen"]
    e = config.eval
    tables = benchmark_tables(scores, gt, ~val, ok, chosen, k=e.topk,
                              n_bootstrap=e.n_bootstrap, seed=config.seed)
    tables["composition"] = top_k_composition(scores["between"], train["captions"],
                                              queries["prompts"], ~val, k=e.topk)
    counts = {"train": int(len(train["images"])), "exemplars": int((train["concept"] >= 0).sum()),
              "queries": int(len(val)), "val": int(val.sum()), "test": int((~val).sum()),
              "within_val": int((val & ok).sum()), "within_test": int((~val & ok).sum())}
    out = {**tables, "counts": counts, "generation_accuracy": gen_acc,
           "wall_s_this_run": round(time.time() - t0, 1)}
    _write_outputs(run_dir, config, out, queries)
    _log(f"done in {time.time() - t0:.0f} s; tables: {run_dir / 'tables'}")
    return out


def _write_outputs(run_dir: Path, config, out: dict, queries: dict) -> None:
    from jaxattrib.fileio import atomic_write_text
    from jaxattrib.report.html import render_run_report, write_result
    from jaxattrib.report.images import image_grid, save_png
    c, k = out["counts"], config.eval.topk
    cap_b = (f"Between-concept: relevant = the {config.data.exemplars_per_concept} exemplars of "
             f"the query's concept among all {c['train']} fine-tuning images; {c['test']} test "
             f"queries (λ chosen on {c['val']} others); mean [95% bootstrap CI over queries]")
    cap_w = (f"Within-concept: relevant = the query concept's exemplars on the prompted "
             f"{config.variation}; ranked among the concept's exemplars and among all "
             f"{c['train']} images; {c['within_test']} test queries whose {config.variation} "
             f"the classifier confirms (λ chosen on {c['within_val']} validation queries); "
             f"chance top-1 among concept = 1/#variations")
    cap_c = (f"What the top-{k} share with the query (between-concept scores, {c['test']} test "
             f"queries): fraction with its background / color / shape / concept; the last row is "
             f"the base rate over all {c['train']} images")
    md = "\n\n".join([cap_b, markdown_table(out["between"]), cap_w,
                      markdown_table(out["within"]), cap_c,
                      markdown_table(out["composition"])]) + "\n"
    (run_dir / "tables").mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "tables" / "customization.md", md)
    doc = {"between": out["between"], "within": out["within"],
           "composition": out["composition"],
           "metrics": _jsonable_metrics(out["raw"]), "counts": c,
           "generation_accuracy": out["generation_accuracy"], "topk": k}
    atomic_write_text(run_dir / "tables" / "customization.json", json.dumps(doc, indent=2))
    write_result(run_dir, "customization_between", "Customization benchmark: between-concept",
                 tables=[{"caption": cap_b, "rows": out["between"]}], order=1)
    write_result(run_dir, "customization_within", "Customization benchmark: within-concept",
                 tables=[{"caption": cap_w, "rows": out["within"]}], order=2)
    write_result(run_dir, "customization_composition", "What the top-ranked images share",
                 tables=[{"caption": cap_c, "rows": out["composition"]}], order=3)
    per_row = int(np.sum(queries["concept"] == 0))
    grid = image_grid(queries["images"], nrow=per_row,
                      labels=[str(v) for v in queries["variation"]])
    save_png(RunDir(run_dir).results / "customization_queries.png", grid)
    write_result(run_dir, "customization_queries", "Generated queries",
                 metrics={f"{k_} agreement": v for k_, v in out["generation_accuracy"].items()},
                 images=[{"path": "results/customization_queries.png",
                          "caption": "one row per new concept; prompted variation under each"}],
                 text="Classifier agreement: the package's pixel-statistics classifier applied "
                      "to the generations, compared with the prompt.", order=0)
    render_run_report(run_dir, title="jaxattrib customization benchmark")


__all__ = ["benchmark_tables", "caption_variations", "ground_truth", "markdown_table",
           "paired_ap_difference", "query_plan", "retrieval_metrics", "run_customization",
           "top_k_composition",
           "variation_check"]
