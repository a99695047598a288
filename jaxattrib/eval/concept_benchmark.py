"""The Concept-TRAK benchmark: concept-level attribution, in- and out-of-distribution queries.

As in Concept-TRAK's synthetic benchmark [paper, methods.md §5]: every training image carries
known concepts (color, shape, background), some (shape, color) combinations are withheld from
training, and a *concept query* = (generated image, concept phrase) is relevant to exactly the
training images that carry that concept. Here [design]:

* The generator is the shipped base model (pretrained with the four ``held_out`` combinations
  withheld), fine-tuned on a fresh draw of the same generator with the *same* combinations
  withheld (``data.per_combination`` renders of every remaining (shape, color, background));
  that fine-tuning set is the attributed training set.
* Queries: ``generate.per_combo`` generations of each in-distribution combination
  (``generate.id_combos``, in the training set) and of each withheld one (out-of-distribution),
  backgrounds cycling black/white/gray; every generation is queried once per concept kind of
  ``eval.concepts`` (its color and its shape), with ``c⁻`` = the prompt without that word.
* Relevance of training image ``i`` to query ``(x, concept kind, value)``: the caption of ``i``
  has that value (``parse_caption``), ``[Q, N]`` bool.
* Split: the first half of every combination's generations (with all their concept rows)
  is the validation split that chooses each method's λ ratio by mean Precision@10
  (:func:`~jaxattrib.attribution.concept_trak.choose_lambda_ratio`'s rule); the rest are test
  queries. Metrics: Precision@10 and mAP, means over test rows with percentile-bootstrap 95%
  CIs, per split (ID / OOD); also on the rows whose queried concept the pixel classifier
  (:func:`~jaxattrib.data.synthetic.classify_concepts`) reads in the generation ("verified").
* D-TRAK and TRAK score an *image*: every concept row of a generation gets that generation's
  scores (they cannot tell which concept is asked — the point of the comparison).
* The ablation (TRAK → +concept loss → +training loss → +DDIM inversion → +normalization) is
  :func:`~jaxattrib.attribution.concept_trak.ablation_table` on the same queries; its last row
  *is* Concept-TRAK, its first row is TRAK in Concept-TRAK's setting (cross-attention
  parameters, K fixed noises) — not the same as the TRAK baseline row (``attribution.params``,
  ``attribution.num_timesteps``).

Run directory (every stage cached; a killed run continues)::

    config.json, data/train.npz, record/, generations/queries.npz (+ PNGs)
    features/{dtrak,trak}/...          feature stores; features/concept-trak/*.npy (per switch set)
    scores/<method>.npy [Q, N], scores/<method>_lambda.json (the validation sweep)
    tables/concept_trak.{md,json}, tables/ablation.{md,json}
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxattrib.config import ConfigError
from jaxattrib.runs.concept_pairs import cached_query_pairs
from jaxattrib.runs.concept_query import concept_inputs, concept_trak_config
from jaxattrib.runs.rundir import RunDir


logger = logging.getLogger(__name__)   # benchmarks/concept_trak.py configures it (INFO)


def _log(msg: str) -> None:
    """A stage line of the benchmark (INFO, with the wall-clock time)."""
    logger.info("[concept-trak %s] %s", time.strftime("%H:%M:%S"), msg)


# ----------------------------------------------------------------------------- plan, truth

def parse_combo(text: str, spec, where: str) -> dict:
    """``'<color> <shape>'`` → ``{'color', 'shape'}``, checked against ``spec``'s vocabularies."""
    words = str(text).split()
    if len(words) != 2 or words[0] not in spec.colors or words[1] not in spec.shapes:
        raise ConfigError(f"{where}: {text!r} is not '<color> <shape>' with a color of "
                          f"{spec.colors} and a shape of {spec.shapes}")
    return {"color": words[0], "shape": words[1]}


def query_plan(id_combos: Sequence[dict], ood_combos: Sequence[dict], backgrounds: Sequence[str],
               per_combo: int, concepts: Sequence[str] = ("color", "shape")) -> dict:
    """Generations and their concept rows.

    Returns ``images``-side arrays ``prompts [G]``, ``split [G]`` (``'id'`` / ``'ood'``),
    ``group [G]`` (combination index) and row-side arrays ``row_image [R]`` (index into the
    generations), ``row_kind [R]`` (e.g. ``'color'``), ``row_concept [R]`` (e.g. ``'red'``),
    ``row_split [R]``, ``row_val [R]`` bool (the first ``per_combo // 2`` generations of each
    combination validate λ). Generations are ordered (combination, repeat), backgrounds cycle.
    """
    from jaxattrib.data.synthetic import caption
    if per_combo < 2:
        raise ConfigError(f"generate.per_combo={per_combo}: need >= 2 (half of each "
                          f"combination validates λ, the rest is tested)")
    prompts, split, group, val = [], [], [], []
    combos = [(c, "id") for c in id_combos] + [(c, "ood") for c in ood_combos]
    for gi, (c, sp) in enumerate(combos):
        for j in range(per_combo):
            prompts.append(caption(c["shape"], c["color"], backgrounds[j % len(backgrounds)]))
            split.append(sp)
            group.append(gi)
            val.append(j < per_combo // 2)
    rows = {"row_image": [], "row_kind": [], "row_concept": [], "row_split": [], "row_val": []}
    for i, p in enumerate(prompts):
        c = combos[group[i]][0]
        for kind in concepts:
            if kind not in c:
                raise ConfigError(f"eval.concepts: {kind!r} is not one of {sorted(c)}")
            rows["row_image"].append(i)
            rows["row_kind"].append(kind)
            rows["row_concept"].append(c[kind])
            rows["row_split"].append(split[i])
            rows["row_val"].append(val[i])
    out = {"prompts": np.array(prompts), "split": np.array(split),
           "group": np.array(group, np.int32)}
    out.update({k: np.array(v) for k, v in rows.items()})
    out["row_image"] = out["row_image"].astype(np.int32)
    out["row_val"] = out["row_val"].astype(bool)
    return out


def concept_ground_truth(train_captions: Sequence[str], row_kind: Sequence[str],
                         row_concept: Sequence[str]) -> np.ndarray:
    """``[R, N]`` bool: training caption ``i`` has value ``row_concept[r]`` for ``row_kind[r]``."""
    from jaxattrib.data.synthetic import parse_caption
    parsed = [parse_caption(str(c)) for c in train_captions]
    return np.array([[p[k] == v for p in parsed] for k, v in zip(row_kind, row_concept)], bool)


def verified_rows(images: np.ndarray, row_image, row_kind, row_concept, spec) -> np.ndarray:
    """``[R]`` bool: the pixel classifier reads the queried concept in the row's generation."""
    from jaxattrib.data.synthetic import classify_concepts
    pred = classify_concepts(images, spec)
    return np.array([spec.vocab(k)[pred[k][i]] == v
                     for i, k, v in zip(row_image, row_kind, row_concept)], bool)


# ----------------------------------------------------------------------------- metrics

def split_metrics(scores: np.ndarray, relevant: np.ndarray, rows: np.ndarray, *, k: int = 10,
                  n_bootstrap: int = 1000, seed: int = 0) -> dict | None:
    """Precision@k and mAP (bootstrap 95% CIs over the selected rows); ``None`` if no row."""
    from jaxattrib.metrics import average_precision, bootstrap_ci, precision_at_k
    rows = np.asarray(rows, bool)
    if not rows.any():
        return None
    s, r = np.asarray(scores)[rows], np.asarray(relevant)[rows]
    return {"n": int(rows.sum()),
            "precision": bootstrap_ci(precision_at_k(s, r, k), np.nanmean, n=n_bootstrap,
                                      seed=seed),
            "map": bootstrap_ci(average_precision(s, r), np.nanmean, n=n_bootstrap, seed=seed)}


def _fmt(m) -> str:
    if m is None:
        return "-"
    return f"{m.estimate:.3f} [{m.low:.2f}, {m.high:.2f}]"


def method_rows(scores: dict, relevant: np.ndarray, test: np.ndarray, split: np.ndarray,
                verified: np.ndarray, chosen: dict, *, k: int = 10, n_bootstrap: int = 1000,
                seed: int = 0, kinds: np.ndarray | None = None) -> tuple[list[dict], dict]:
    """Table rows (one per method: P@k / mAP for ID and OOD test rows, OOD verified) and the raw
    metrics ``{method: {subset: {...}}}``; with ``kinds [R]`` (the concept kind of each row)
    also the subsets ``'<split>_<kind>'``."""
    from jaxattrib.eval.benchmarks import METHOD_NAMES
    table, raw = [], {}
    subsets = {"id": test & (split == "id"), "ood": test & (split == "ood"),
               "id_verified": test & (split == "id") & verified,
               "ood_verified": test & (split == "ood") & verified}
    if kinds is not None:
        for sp in ("id", "ood"):
            for kind in np.unique(kinds):
                subsets[f"{sp}_{kind}"] = test & (split == sp) & (kinds == kind)
    for method, s in scores.items():
        m = {name: split_metrics(s, relevant, sel, k=k, n_bootstrap=n_bootstrap, seed=seed)
             for name, sel in subsets.items()}
        raw[method] = m
        get = lambda name, key: None if m[name] is None else m[name][key]  # noqa: E731
        table.append({"method": METHOD_NAMES.get(method, method),
                      f"P@{k} ID": _fmt(get("id", "precision")),
                      f"P@{k} OOD": _fmt(get("ood", "precision")),
                      "mAP ID": _fmt(get("id", "map")), "mAP OOD": _fmt(get("ood", "map")),
                      f"P@{k} OOD verified": _fmt(get("ood_verified", "precision")),
                      "λ ratio (val)": chosen.get(method, "-")})
    return table, raw


# ----------------------------------------------------------------------------- stages

def build_train(run_dir: Path, config, info: dict) -> dict:
    """The attributed training set: ``per_combination`` renders of every (shape, color,
    background) except the base model's withheld (shape, color) combinations (cached)."""
    path = RunDir(run_dir).data_file("train")
    if path.exists():
        return dict(np.load(path))
    from jaxattrib.train.base_model import spec_from_info
    from jaxattrib.data.synthetic import make_synthetic
    from jaxattrib.runs.rundir import save_npz
    held = [dict(h) for h in info["held_out"]]
    ds = make_synthetic(spec_from_info(info, per_combination=config.data.per_combination),
                        1000 + config.seed, withhold=held)
    train = {"images": ds.images.astype(np.float32), "captions": np.array(ds.captions),
             "ids": np.array(ds.ids)}
    save_npz(path, **train)
    return train


def _choose_and_score(phi, Phi, relevant, val, ratios, *, k: int, scorer):
    """Picks the ratio with the best mean P@k on the ``val`` rows; returns (scores, sweep)."""
    from jaxattrib.metrics import precision_at_k
    sweep = []
    best = None
    for r in ratios:
        s = scorer(phi, Phi, float(r))
        p = float(np.nanmean(precision_at_k(s[val], relevant[val], k)))
        sweep.append({"ratio": float(r), "val_precision_at_k": p})
        if best is None or p > best[0]:
            best = (p, float(r), s)
    return best[2], {"split": "validation rows", "sweep": sweep, "chosen": best[1]}


def effective_dimension(Phi: np.ndarray, lam: float) -> float:
    """``Σ_j σ_j² / (σ_j² + λ)`` over the squared singular values of ``Φ [N, k]``: how many
    directions of ``ΦᵀΦ`` the ridge ``(ΦᵀΦ + λI)⁻¹`` whitens (≈ rank at λ → 0, → 0 as λ → ∞)."""
    P = np.asarray(Phi, np.float64)
    ev = np.clip(np.linalg.eigvalsh(P @ P.T if P.shape[0] <= P.shape[1] else P.T @ P), 0, None)
    return float(np.sum(ev / (ev + lam)))


def lambda_curve(phi, Phi, relevant, val, split, ratios, *, scorer, k: int = 10,
                 n_bootstrap: int = 1000, seed: int = 0) -> list[dict]:
    """Diagnostic only — never for choosing λ: per ratio ``r``, the validation rows' mean
    P@k (what :func:`_choose_and_score` maximizes) and the *test* rows' P@k per split.

    ``phi [R, k]`` query rows, ``Phi [N, k]``, ``relevant [R, N]`` bool, ``val [R]`` bool (the
    rest are test rows), ``split [R]`` ('id' / 'ood'), ``scorer(phi, Phi, r) -> [R, N]``.
    Returns ``[{'ratio', 'val_precision', 'd_eff', 'id', 'ood'}]`` (``id`` / ``ood``:
    :func:`split_metrics` of the test rows; ``d_eff``: :func:`effective_dimension` at
    λ = r · 0.1 · mean diag ΦᵀΦ).
    """
    from jaxattrib.attribution.concept_trak import lambda_from_ratio
    from jaxattrib.metrics import precision_at_k
    val = np.asarray(val, bool)
    split = np.asarray(split)
    rows = []
    for r in ratios:
        s = scorer(phi, Phi, float(r))
        rows.append({
            "ratio": float(r),
            "val_precision": float(np.nanmean(precision_at_k(s[val], relevant[val], k))),
            "d_eff": effective_dimension(Phi, lambda_from_ratio(Phi, float(r))),
            **{sp: split_metrics(s, relevant, ~val & (split == sp), k=k,
                                 n_bootstrap=n_bootstrap, seed=seed) for sp in ("id", "ood")}})
    return rows


def leading_directions(Phi: np.ndarray, train_captions: Sequence[str], n: int = 3) -> list[dict]:
    """What the dominant directions of ``ΦᵀΦ`` encode: for each of the ``n`` leading left
    singular vectors ``u_j [N]`` of ``Φ [N, k]`` (the directions a small λ whitens first), its
    share of the trace ``σ_j² / Σ σ²`` and, per concept kind, η² = between-group / total
    variance of ``u_j``'s entries grouped by the training captions' value (1 = ``u_j`` is a
    function of that concept alone, ≈ 0 = unrelated)."""
    from jaxattrib.data.synthetic import parse_caption
    U, S, _ = np.linalg.svd(np.asarray(Phi, np.float64), full_matrices=False)
    parsed = [parse_caption(str(c)) for c in train_captions]
    rows = []
    for j in range(min(n, len(S))):
        u = U[:, j] - U[:, j].mean()
        row = {"direction": j + 1, "share of trace": float(S[j] ** 2 / np.sum(S ** 2))}
        for kind in ("background", "color", "shape"):
            v = np.array([p[kind] for p in parsed])
            between = sum(np.sum(v == g) * u[v == g].mean() ** 2 for g in np.unique(v))
            row[f"η² {kind}"] = float(between / max(np.sum(u ** 2), 1e-300))
        rows.append(row)
    return rows


def project_out_leading(Phi: np.ndarray, phi: np.ndarray, n: int):
    """``(Φ P, φ P)`` with ``P = I − V_n V_nᵀ``, ``V_n [k, n]`` the leading right singular
    vectors of the *training* features ``Φ [N, k]`` (queries ``φ [R, k]`` never enter): the
    ``n`` dominant directions of ``ΦᵀΦ`` removed from both sides, the rest left unwhitened.
    Returns float64 arrays of the input shapes."""
    P = np.asarray(Phi, np.float64)
    q = np.asarray(phi, np.float64)
    if not 0 <= n < min(P.shape):
        raise ValueError(f"n={n}: expected 0 <= n < min(N, k) = {min(P.shape)}")
    V = np.linalg.svd(P, full_matrices=False)[2][:n].T  # [k, n]
    return P - (P @ V) @ V.T, q - (q @ V) @ V.T


def check_feature_settings(folder: Path, settings: dict) -> None:
    """Guards a folder of plain ``.npy`` feature files: the first call records ``settings``
    (JSON-able: projection, k, seeds, model step, data fingerprints, …) in
    ``folder/settings.json``; later calls raise :class:`ConfigError` naming the file and the
    first field that differs. A folder holding ``.npy`` files but no ``settings.json`` is
    refused too (its features' settings are unknown)."""
    folder = Path(folder)
    path = folder / "settings.json"
    want = json.loads(json.dumps(settings))
    if path.exists():
        have = json.loads(path.read_text())
        for key in sorted(set(have) | set(want)):
            if have.get(key) != want.get(key):
                raise ConfigError(f"{path}: feature setting {key!r} is {have.get(key)!r}, this "
                                  f"run asks for {want.get(key)!r}; use another folder")
        return
    if folder.exists() and any(folder.glob("*.npy")):
        raise ConfigError(f"{folder}: holds features but no settings.json; their settings "
                          f"are unknown, use another folder")
    from jaxattrib.fileio import atomic_write_text
    atomic_write_text(path, json.dumps(want, indent=2, sort_keys=True))  # creates the folder


def _trak_family_features(method: str, run_dir: Path, config, pipe, unet_params, sched,
                          train_ex, gen_ex, fingerprint: str, step: int, progress: bool = False,
                          features_dir: Path | None = None):
    """D-TRAK / TRAK ``(Phi [N, k], phi [G, k])`` (resumable stores; loaded when complete) in
    ``features_dir / method`` (default ``run_dir / 'features'``)."""
    from jaxattrib.attribution import diffusion_trak as dt
    from jaxattrib.runs.demo_attribute import _fingerprint_of
    a = config.attribution
    ac = dt.AttributionConfig.from_section(a, method=method, noise=a.get("noise", "shared"))
    out_fn = dt.make_train_out_fn(pipe.unet_config, sched, ac)
    feats = Path(features_dir or RunDir(run_dir).features) / method
    Phi = dt.featurize_examples(out_fn, unet_params, train_ex, ac, feats / "train",
                                fingerprint=fingerprint, step=step, progress=progress)
    phi = dt.featurize_examples(out_fn, unet_params, gen_ex, ac, feats / "queries",
                                fingerprint=_fingerprint_of(gen_ex["x0"]), step=step,
                                role="query", progress=progress)
    return np.asarray(Phi), np.asarray(phi)


def _trak_family_scorer(q, P, r):
    """D-TRAK / TRAK scores ``[Q, N]`` at ratio ``r`` through the engine (primal kernel)."""
    from jaxattrib.attribution.methods import method_scores
    # the TRAK family's λ is lam_ratio·mean diag(ΦᵀΦ); 0.1·r makes it Concept-TRAK's ratio rule
    return method_scores("trak", q, P, lam_ratio=0.1 * r)


def _trak_family_scores(Phi, phi, config, plan: dict, relevant):
    phi_rows = phi[plan["row_image"]]  # every concept row gets its image's scores
    return _choose_and_score(phi_rows, Phi, relevant, plan["row_val"],
                             config.attribution.lambda_ratios, k=config.eval.topk,
                             scorer=_trak_family_scorer)


def neighbour_purity(Phi: np.ndarray, train_captions: Sequence[str], k: int = 10) -> dict:
    """What training features encode: for each training image, the fraction of its ``k``
    nearest other training images (cosine of the feature rows) that share its color / shape /
    background; means over images. Chance = the fraction of images sharing that value."""
    from jaxattrib.data.synthetic import parse_caption
    P = np.asarray(Phi, np.float64)
    P = P / np.maximum(np.linalg.norm(P, axis=1, keepdims=True), 1e-30)
    sim = P @ P.T
    np.fill_diagonal(sim, -np.inf)
    nn = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    parsed = [parse_caption(str(c)) for c in train_captions]
    out = {}
    for kind in ("color", "shape", "background"):
        v = np.array([p[kind] for p in parsed])
        out[kind] = float(np.mean(v[nn] == v[:, None]))
    return out


def _concept_row_cosine(phi_rows: np.ndarray, row_image: np.ndarray) -> float:
    """Mean cosine between the feature rows of the same generation (its color vs shape row)."""
    cos = []
    for i in np.unique(row_image):
        r = np.asarray(phi_rows[row_image == i], np.float64)
        if len(r) < 2:
            continue
        r = r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-30)
        cos.append(float(r[0] @ r[1]))
    return float(np.mean(cos)) if cos else float("nan")


def _ablation(run_dir: Path, config, pipe, unet_params, sched, train, train_ctx, queries, plan,
              relevant, settings):
    """:func:`concept_trak.ablation_table` rows on the test rows, λ chosen on the val rows
    (on VAE latents for a latent pipeline, :func:`concept_inputs`)."""
    from jaxattrib.attribution import concept_trak as ct
    val = plan["row_val"]
    q_in, _ = concept_inputs(pipe, queries["images"], config, "query",
                             f"{run_dir}/generations/queries.npz")
    img = q_in[plan["row_image"]]
    train_in, _ = concept_inputs(pipe, train["images"], config, "train",
                                 f"{run_dir}/data/train.npz")
    prompts = [str(queries["prompts"][i]) for i in plan["row_image"]]
    concepts = [str(c) for c in plan["row_concept"]]
    encode = lambda p: np.asarray(pipe.encode_prompts(list(p)))  # noqa: E731
    pick = lambda seq, m: [x for x, keep in zip(seq, m) if keep]  # noqa: E731
    cfg = concept_trak_config(config)
    pairs = {"query_pairs": None, "val_pairs": None}
    if cfg.query_pairs == "trajectory":
        rows = np.asarray(plan["row_image"])
        xts, ts, nz = cached_query_pairs(run_dir, config, pipe, unet_params,
                                         queries["prompts"], cfg)
        pairs = {"query_pairs": (xts[rows][~val], ts[rows][~val], nz[rows][~val]),
                 "val_pairs": (xts[rows][val], ts[rows][val], nz[rows][val])}
    rows = ct.ablation_table(
        pipe.unet_config, unet_params, encode, train_in, list(train["captions"]),
        img[~val], pick(prompts, ~val), pick(concepts, ~val), cfg,
        sched, k=config.eval.topk, val_images=img[val], val_prompts=pick(prompts, val),
        val_concepts=pick(concepts, val), ratios=config.attribution.lambda_ratios,
        settings=settings, relevant=relevant[~val], val_relevant=relevant[val],
        features_dir=RunDir(run_dir).features / "concept-trak", train_contexts=train_ctx,
        **pairs)
    # back to all rows (validation rows get their scores too, never evaluated)
    for r in rows:
        full = np.full((len(val), relevant.shape[1]), np.nan)
        full[~val] = r["scores"]
        r["scores"] = full
    return rows


METHOD_LABEL = {"concept-trak": "Concept-TRAK", "dtrak": "D-TRAK", "trak": "TRAK"}


def _by_kind_rows(raw: dict, kinds: Sequence[str], k: int) -> list[dict]:
    """P@k per (split, concept kind) of every method / ablation setting (test rows)."""
    rows = []
    for name, m in raw.items():
        row = {"method / setting": name}
        for sp in ("id", "ood"):
            for kind in kinds:
                got = m.get(f"{sp}_{kind}")
                row[f"P@{k} {sp.upper()} {kind}"] = _fmt(None if got is None
                                                         else got["precision"])
        rows.append(row)
    return rows


def _diagnostics(run_dir: Path, config, pipe, unet_params, sched, train, train_ex, gen_ex,
                 fingerprint, step, plan, methods, ablation: bool) -> list[dict]:
    """Per feature set: training-side neighbour purity (:func:`neighbour_purity`) and the
    query-side cosine between a generation's color and shape rows (1 = the query feature does
    not depend on the concept asked)."""
    from jaxattrib.attribution import concept_trak as ct
    rows = []
    fdir = RunDir(run_dir).features / "concept-trak"
    val = plan["row_val"]
    settings = ct.ABLATION if ablation else ct.ABLATION[-1:]
    for name, sw in settings:
        tname = f"train_tl{int(sw['training_loss'])}_inv{int(sw['ddim_inversion'])}" \
                f"_norm{int(sw['normalize'])}.npy"
        qname = f"query_cl{int(sw['concept_loss'])}_inv{int(sw['ddim_inversion'])}" \
                f"_norm{int(sw['normalize'])}.npy"
        if not (fdir / tname).exists() or not (fdir / qname).exists():
            continue
        purity = neighbour_purity(np.load(fdir / tname), train["captions"])
        cos = _concept_row_cosine(np.load(fdir / qname), plan["row_image"][~val])
        rows.append({"features": f"Concept-TRAK machinery: {name}", **purity,
                     "query color-vs-shape row cosine": cos})
    for m in methods:
        if m == "concept-trak":
            continue
        Phi, _ = _trak_family_features(m, run_dir, config, pipe, unet_params, sched, train_ex,
                                       gen_ex, fingerprint, step)
        rows.append({"features": METHOD_LABEL[m], **neighbour_purity(Phi, train["captions"]),
                     "query color-vs-shape row cosine": 1.0})
    from jaxattrib.data.synthetic import parse_caption
    parsed = [parse_caption(str(c)) for c in train["captions"]]
    chance = {}
    for kind in ("color", "shape", "background"):
        v = np.array([p[kind] for p in parsed])
        chance[kind] = float(np.mean([(np.sum(v == x) - 1) / (len(v) - 1) for x in v]))
    rows.append({"features": "chance (random neighbours)", **chance,
                 "query color-vs-shape row cosine": float("nan")})
    return rows


def _finetuned(run_dir: Path, config, pipe, train: dict, progress: bool):
    """``(unet_params, step)`` of the fine-tuned model: loaded from a complete record (so a run
    made from another checkout or worktree, whose record names another base-model path, still
    resumes), else fine-tuned / resumed by :func:`jaxattrib.runs.demo.finetune_stage`."""
    from jaxattrib.runs import demo
    from jaxattrib.train.record import TrajectoryRecord
    rec_dir = RunDir(run_dir).record.resolve()
    if (rec_dir / "manifest.json").exists():
        record = TrajectoryRecord.open(rec_dir)
        step = record.latest_step()
        if step == config.finetune.steps:
            params = record.load(step)["unet"]
            record.close()
            return params, step
        record.close()
    unet_params, record = demo.finetune_stage(run_dir, config, pipe, train, progress)
    step = record.latest_step()
    record.close()
    return unet_params, step


def run_concept_benchmark(config, run_dir: str | Path = "runs/concept_trak",
                          progress: bool = True, ablation_only: bool = False) -> dict:
    """Runs (or resumes) the benchmark; returns ``{'table', 'ablation', 'raw', 'counts',
    'generation_accuracy', 'wall_s_this_run'}``. ``ablation_only``: skip the D-TRAK / TRAK
    baselines (the ablation's rows are computed either way when ``attribution.ablation``)."""
    from jaxattrib.runs import demo, demo_attribute
    from jaxattrib.attribution import concept_trak as ct
    from jaxattrib.train.base_model import spec_from_info
    from jaxattrib.diffusion.schedule import schedule_from_diffusers_config
    t0 = time.time()
    run_dir, pipe, info = demo.open_base_run(run_dir, config)
    spec = spec_from_info(info)
    held = [{"color": h["color"], "shape": h["shape"]} for h in info["held_out"]]
    ood = ([parse_combo(c, spec, "generate.ood_combos") for c in config.generate.ood_combos]
           or held)
    for c in ood:
        if c not in held:
            raise ConfigError(f"generate.ood_combos: {c['color']} {c['shape']} is not withheld "
                              f"from training (withheld: {held})")
    ids = [parse_combo(c, spec, "generate.id_combos") for c in config.generate.id_combos]
    for c in ids:
        if c in held:
            raise ConfigError(f"generate.id_combos: {c['color']} {c['shape']} is withheld "
                              f"from training; ID combinations must be trained on")
    train = build_train(run_dir, config, info)
    _log(f"training set: {len(train['images'])} images; withheld {held}")
    unet_params, step = _finetuned(run_dir, config, pipe, train, progress)
    plan = query_plan(ids, ood, spec.backgrounds, config.generate.per_combo,
                      config.eval.concepts)
    gen_plan = {k: plan[k] for k in ("prompts", "split", "group")}
    queries = demo.generate_stage(run_dir, config, pipe, unet_params, held, gen_plan)
    relevant = concept_ground_truth(train["captions"], plan["row_kind"], plan["row_concept"])
    verified = verified_rows(queries["images"], plan["row_image"], plan["row_kind"],
                             plan["row_concept"], spec)
    gen_acc = {f"{sp} {kind}": float(verified[(plan["row_split"] == sp)
                                              & (plan["row_kind"] == kind)].mean())
               for sp in ("id", "ood") for kind in config.eval.concepts}
    _log(f"{len(queries['images'])} generations, {len(relevant)} concept rows; classifier "
         f"agreement with the queried concept {gen_acc}")
    sched = schedule_from_diffusers_config(pipe.scheduler_config)
    train_ex = demo_attribute._examples(pipe, train["images"], train["captions"])
    gen_ex = demo_attribute._examples(pipe, queries["images"], queries["prompts"])
    fingerprint = demo_attribute._fingerprint_of(train["images"])
    a = config.attribution
    scores, chosen = {}, {}
    sdir = RunDir(run_dir).scores
    sdir.mkdir(parents=True, exist_ok=True)
    abl_rows = None
    methods = [m for m in a.methods if not (ablation_only and m != "concept-trak")]
    for m in methods:
        if m not in ("concept-trak", "dtrak", "trak"):
            raise ConfigError(f"attribution.methods: unknown method {m!r}; expected "
                              f"'concept-trak', 'dtrak' or 'trak'")
    if "concept-trak" in methods or a.ablation:
        settings = ct.ABLATION if a.ablation else ct.ABLATION[-1:]
        _log(f"Concept-TRAK: {len(settings)} setting(s) of the ablation")
        abl_rows = _ablation(run_dir, config, pipe, unet_params, sched, train, train_ex["ctx"],
                             queries, plan, relevant, settings)
        full = abl_rows[-1]
        if "concept-trak" in methods:
            scores["concept-trak"], chosen["concept-trak"] = full["scores"], f"{full['ratio']:g}"
            np.save(sdir / "concept-trak.npy", full["scores"])
            (sdir / "concept-trak_lambda.json").write_text(json.dumps(
                {"split": "validation rows", "sweep": full["sweep"], "chosen": full["ratio"]},
                indent=2))
    for m in methods:
        if m == "concept-trak":
            continue
        path = sdir / f"{m}.npy"
        if path.exists():
            scores[m] = np.load(path)
            chosen[m] = f"{json.loads((sdir / f'{m}_lambda.json').read_text())['chosen']:g}"
            continue
        _log(f"attribution: {m}")
        Phi, phi = _trak_family_features(m, run_dir, config, pipe, unet_params, sched, train_ex,
                                         gen_ex, fingerprint, step, progress)
        s, sweep = _trak_family_scores(Phi, phi, config, plan, relevant)
        np.save(path, s)
        (sdir / f"{m}_lambda.json").write_text(json.dumps(sweep, indent=2))
        scores[m], chosen[m] = s, f"{sweep['chosen']:g}"
    e = config.eval
    test = ~plan["row_val"]
    split = plan["row_split"]
    kinds = plan["row_kind"]
    table, raw = method_rows(scores, relevant, test, split, verified, chosen, k=e.topk,
                             n_bootstrap=e.n_bootstrap, seed=config.seed, kinds=kinds)
    ablation = []
    if abl_rows is not None and a.ablation:
        abl_scores = {r["setting"]: r["scores"] for r in abl_rows}
        abl_table, abl_raw = method_rows(abl_scores, relevant, test, split, verified,
                                         {r["setting"]: f"{r['ratio']:g}" for r in abl_rows},
                                         k=e.topk, n_bootstrap=e.n_bootstrap, seed=config.seed,
                                         kinds=kinds)
        for row in abl_table:
            row["setting"] = row.pop("method")
        ablation = [{"setting": r["setting"], **{c: v for c, v in r.items() if c != "setting"}}
                    for r in abl_table]
        raw["ablation"] = abl_raw
    by_kind = _by_kind_rows({**{METHOD_LABEL.get(m, m): raw[m] for m in scores},
                             **{f"ablation: {n}": v for n, v in raw.get("ablation", {}).items()}},
                            config.eval.concepts, e.topk)
    diag = _diagnostics(run_dir, config, pipe, unet_params, sched, train, train_ex, gen_ex,
                        fingerprint, step, plan, methods, a.ablation and abl_rows is not None)
    counts = {"train": int(len(train["images"])), "generations": int(len(queries["images"])),
              "rows": int(len(relevant)), "val_rows": int(plan["row_val"].sum()),
              "test_rows_id": int((test & (split == "id")).sum()),
              "test_rows_ood": int((test & (split == "ood")).sum()),
              "test_rows_ood_verified": int((test & (split == "ood") & verified).sum()),
              "relevant_per_row_mean": float(relevant.sum(1).mean())}
    out = {"table": table, "ablation": ablation, "by_kind": by_kind, "diagnostics": diag,
           "raw": raw, "counts": counts,
           "generation_accuracy": gen_acc, "wall_s_this_run": round(time.time() - t0, 1)}
    _write_tables(run_dir, config, out, ablation_only)
    _log(f"done in {time.time() - t0:.0f} s; tables: {run_dir / 'tables'}")
    return out


def inversion_label(cfg) -> str:
    """What the (x_t, t) pairs of the settings with inversion are, in words."""
    train = (f"training images DDIM-inverted with CFG {cfg.inversion_guidance:g} against the "
             f"empty prompt" if cfg.inversion_guidance != 1.0 else
             "training images DDIM-inverted on their prompt without CFG")
    if cfg.query_pairs == "trajectory":
        return (f"{train}; queries' states from their sampling trajectories regenerated from "
                f"their seeds ({cfg.inversion_steps} DDIM steps, η = {cfg.query_eta:g})")
    return f"{train}; queries inverted the same way"


def _write_tables(run_dir: Path, config, out: dict, ablation_only: bool = False) -> None:
    """``tables/*.md`` and ``concept_trak.json``; ``ablation_only`` (a run without the
    baselines) writes ``ablation.{md,json}`` only, so it never overwrites a full run's tables."""
    from jaxattrib.eval.benchmarks import _jsonable_metrics, markdown_table
    from jaxattrib.fileio import atomic_write_text
    c, k = out["counts"], config.eval.topk
    cap = (f"Concept queries (generation × concept phrase {tuple(config.eval.concepts)}); "
           f"relevant = the training images carrying the queried concept (N = {c['train']}, "
           f"{c['relevant_per_row_mean']:.1f} relevant per row on average); test rows: "
           f"{c['test_rows_id']} ID, {c['test_rows_ood']} OOD ({c['test_rows_ood_verified']} "
           f"whose concept the classifier reads in the generation = 'verified'); λ ratio chosen "
           f"per method on {c['val_rows']} validation rows by P@{k}; mean [95% bootstrap CI]. "
           f"Concept-TRAK's (x_t, t) pairs: {inversion_label(concept_trak_config(config))}")
    (run_dir / "tables").mkdir(parents=True, exist_ok=True)
    if ablation_only:
        if out["ablation"]:
            atomic_write_text(run_dir / "tables" / "ablation.md",
                              "Ablation (Concept-TRAK's machinery; TRAK = all switches off). "
                              + cap + "\n\n" + markdown_table(out["ablation"]) + "\n")
            atomic_write_text(run_dir / "tables" / "ablation.json", json.dumps(
                {"ablation": out["ablation"], "metrics": _jsonable_metrics(
                    out["raw"].get("ablation", {})), "counts": c}, indent=2))
        return
    if out["table"]:
        atomic_write_text(run_dir / "tables" / "concept_trak.md",
                          cap + "\n\n" + markdown_table(out["table"]) + "\n")
    if out["ablation"]:
        atomic_write_text(run_dir / "tables" / "ablation.md",
                          "Ablation (Concept-TRAK's machinery; TRAK = all switches off). " + cap
                          + "\n\n" + markdown_table(out["ablation"]) + "\n")
    if out.get("by_kind"):
        atomic_write_text(run_dir / "tables" / "by_kind.md",
                          f"P@{k} per concept kind (test rows; same λ as the main tables)\n\n"
                          + markdown_table(out["by_kind"]) + "\n")
    if out.get("diagnostics"):
        fmt = [{c_: (f"{v:.3f}" if isinstance(v, float) else v) for c_, v in r.items()}
               for r in out["diagnostics"]]
        atomic_write_text(run_dir / "tables" / "diagnostics.md",
                          "Training features: fraction of each training image's 10 nearest "
                          "training neighbours (feature cosine) sharing its color / shape / "
                          "background. Query features: mean cosine between the color row and the "
                          "shape row of a test generation.\n\n" + markdown_table(fmt) + "\n")
    doc = _jsonable_metrics(out)
    atomic_write_text(run_dir / "tables" / "concept_trak.json", json.dumps(doc, indent=2))


__all__ = ["check_feature_settings", "concept_ground_truth",
           "concept_trak_config", "effective_dimension", "lambda_curve", "leading_directions",
           "method_rows", "project_out_leading",
           "neighbour_purity", "parse_combo", "query_plan", "run_concept_benchmark",
           "split_metrics", "verified_rows"]
