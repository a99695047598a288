"""``jaxattrib cgi-dm``: CGI-DM copyright authentication of an image folder, into a run directory.

The config is ``jaxattrib/configs/cgi_dm.py`` (every field documented there). The run
directory::

    config.json              the resolved config (a rerun with another config is refused)
    cgi_dm/inputs.json       fingerprints of the candidate and reference images (checked on rerun)
    cgi_dm/<set>_<lo>.npz    recovered batches (original / masked / recovered / trace): resumable
    cgi_dm/scores.npz        scores, p-values, decisions, threshold, labels
    results/cgi_dm_*.json, *.png   report sections; report.html

The numerics are :mod:`jaxattrib.authentication.cgi_dm` (:func:`~jaxattrib.authentication.
cgi_dm.recover` and the decision :func:`~jaxattrib.authentication.cgi_dm.decide`: threshold,
p-values); this module only loads, caches and reports. [design] Per-batch caching:
batch ``[lo, hi)`` is recovered with ``index_offset=lo`` and the set's key, which is what
:func:`~jaxattrib.authentication.cgi_dm.recover` does for the whole set (per-image keys from the
global index), so a resumed run equals an uninterrupted one. The candidate and reference sets
get ``split(key(seed), 3)[0]`` and ``[1]``, as :func:`~jaxattrib.authentication.cgi_dm.
authenticate` does for queries and hold-outs. SSIM uses the largest odd window <= 11 that
fits the image (11 for any real SD resolution; 7 for 8-px test images).

Latent pipelines: PGD runs on the VAE latent, as the authors' code (Revelio ``Extractor.py``
attacks ``vae.encode(x).latent_dist.sample() * scaling_factor``) [code]; images are encoded once
per role with a posterior sample per image from ``fold_in(fold_in(split(key(seed), 3)[2], set),
image index)`` (``data.vae_posterior='sample'``, the authors' code's choice; 'mean'
for the posterior mean); the masked start and the recovery are decoded to pixels for the
similarity and the report (docs/latent_methods.md). ``data.size`` must be the UNet's sample
size × the VAE factor (:func:`jaxattrib.models.latent_io.check_image_size`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np

from jaxattrib import integrity
from jaxattrib.config import ConfigError
from jaxattrib.runs.rundir import RunDir
from jaxattrib.fileio import atomic_write_bytes
from jaxattrib.models.latent_io import check_image_size
from jaxattrib.fingerprint import raw_arrays as _fingerprint  # recipe of stored inputs.json

SIMILARITIES = ("ssim", "psnr")

#: ``cgi.*`` fields added to the ``cgi_dm`` config (and so to ``cgi_dm_benchmark``'s ``cgi``)
#: after run directories were made, with the values those runs used (no manifold projection):
#: a stored config.json without them still resumes
#: (:func:`~jaxattrib.runs.rundir.check_run_config`'s ``added``)
CGI_ADDED_FIELDS = {"cgi.project_t": 0, "cgi.project_model": "finetuned",
                    "cgi.project_every": 1, "data.vae_posterior": "mean"}
POSTERIORS = ("sample", "mean")


def check_config(config, source: str = "config"):
    """Validates a ``cgi_dm`` config; returns its :class:`~jaxattrib.authentication.cgi_dm.
    CGIDMConfig`. Raises :class:`ConfigError` naming the field."""
    from jaxattrib.authentication.cgi_dm import CGIDMConfig
    for field in ("model.finetuned", "data.candidates", "data.reference"):
        sec, name = field.split(".")
        if not str(config[sec][name]):
            raise ConfigError(f"{source}: {field} is empty (required; see the config's "
                              f"docstring)")
    if not isinstance(config.data.size, int) or config.data.size < 0:
        raise ConfigError(f"{source}: data.size={config.data.size!r}: expected an integer >= 0 "
                          f"(0 = the model's image size)")
    if config.data.vae_posterior not in POSTERIORS:
        raise ConfigError(f"{source}: data.vae_posterior={config.data.vae_posterior!r}: "
                          f"expected one of {POSTERIORS}")
    if config.similarity not in SIMILARITIES:
        raise ConfigError(f"{source}: similarity={config.similarity!r}: expected one of "
                          f"{SIMILARITIES}")
    if config.calibration.target not in ("fpr", "accuracy"):
        raise ConfigError(f"{source}: calibration.target={config.calibration.target!r}: "
                          f"expected 'fpr' or 'accuracy'")
    if not 0.0 <= config.calibration.fpr <= 1.0:
        raise ConfigError(f"{source}: calibration.fpr={config.calibration.fpr!r}: expected a "
                          f"number in [0, 1]")
    for name in ("batch_size", "report_images"):
        v = config[name]
        if not isinstance(v, int) or v < (1 if name == "batch_size" else 0):
            raise ConfigError(f"{source}: {name}={v!r}: expected an integer >= "
                              f"{1 if name == 'batch_size' else 0}")
    fields = {f.name for f in dataclasses.fields(CGIDMConfig)}
    unknown = sorted(set(config.cgi) - fields)
    if unknown:
        raise ConfigError(f"{source}: cgi.{unknown[0]}: not a CGIDMConfig field {sorted(fields)}")
    try:
        return CGIDMConfig.from_section(config.cgi)   # every key is a field (checked above)
    except (ValueError, TypeError) as e:
        msg = str(e).replace("CGIDMConfig.", "cgi.").replace("CGIDMConfig:", "cgi:")
        raise ConfigError(f"{source}: {msg}") from e




def _check_inputs(run_dir: Path, fingerprints: dict) -> None:
    from jaxattrib.fileio import atomic_write_text
    path = RunDir(run_dir).cache("cgi_dm") / "inputs.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(fingerprints) if old.get(k) != fingerprints.get(k))
        if diff:
            raise ConfigError(f"{path}: the {diff} images changed since this run directory was "
                              f"made; use a new --run-dir or --fresh")
    else:
        atomic_write_text(path, json.dumps(fingerprints, indent=1))


def recover_cached(name: str, images, cond, eps_pre, eps_ft, sched, cgi, key, cache: Path, *,
                   encode=None, decode=None, batch_size: int = 8, progress: bool = True,
                   encode_key=None) -> dict:
    """:func:`~jaxattrib.authentication.cgi_dm.recover` of ``images [N,H,W,C]`` batch by batch,
    each batch cached as ``cache/<name>_<lo>.npz`` with a checksum sidecar (reused on rerun;
    a corrupt batch is recomputed with a notice). Same result as one call
    (``encode_key``: per-image posterior samples, see ``recover``)."""
    import io
    from jaxattrib.authentication.cgi_dm import recover
    n = len(images)
    parts = []
    starts = range(0, n, batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, desc=f"CGI-DM {name}", unit="img", dynamic_ncols=True)
    for lo in starts:
        hi = min(n, lo + batch_size)
        path = cache / f"{name}_{lo:06d}.npz"
        blob = integrity.read_checked(path, what="CGI-DM batch")
        if blob is not None:
            parts.append(dict(np.load(io.BytesIO(blob))))
        else:
            r = recover(images[lo:hi], eps_pre, eps_ft, sched, cgi, key,
                        cond=None if cond is None else cond[lo:hi], encode=encode,
                        decode=decode, batch_size=batch_size, index_offset=lo,
                        encode_key=encode_key)
            buf = io.BytesIO()
            np.savez(buf, **r)
            integrity.write_checked(path, buf.getvalue())
            parts.append(r)
        if bar is not None:
            bar.update(hi - lo)
    if bar is not None:
        bar.close()
    out = {k: np.concatenate([p[k] for p in parts], axis=0)
           for k in ("original", "masked", "recovered", "mask")}
    out["trace"] = np.concatenate([p["trace"] for p in parts], axis=1)
    return out


def run_cgi_dm(config, run_dir: str | Path, progress: bool = True) -> dict:
    """Runs (or resumes) CGI-DM on ``config``; writes the report; returns the summary."""
    from jax.tree_util import Partial

    from jaxattrib.authentication import cgi_dm
    from jaxattrib.runs.rundir import check_run_config
    from jaxattrib.diffusion.schedule import schedule_from_diffusers_config
    from jaxattrib.models.unet import UNet2DConditionModel
    from jaxattrib.runs.specs import load_model, image_folder, load_unet, model_image_size

    cgi = check_config(config)
    for field in ("data.candidates", "data.reference"):   # before any model is loaded
        sec, name = field.split(".")
        folder = Path(str(config[sec][name])).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"{field}={str(config[sec][name])!r}: expected an existing image "
                              f"folder")
    run_dir = Path(run_dir)
    check_run_config(run_dir, config, added=CGI_ADDED_FIELDS)
    pipe = load_model(config.model.pipeline)
    p_pre, d_pre = load_unet(config.model.pretrained, pipe, "model.pretrained")
    p_ft, d_ft = load_unet(config.model.finetuned, pipe, "model.finetuned")
    size = config.data.size or model_image_size(pipe)
    check_image_size(size, pipe.unet_config, pipe.vae_config, "data.size")
    cand = image_folder(config.data.candidates, size, "data.candidates",
                        default_caption=config.data.caption, labelled=True)
    ref = image_folder(config.data.reference, size, "data.reference",
                       default_caption=config.data.caption)
    if config.calibration.target == "accuracy" and not (cand["labels"] == 1).any():
        raise ConfigError("calibration.target='accuracy' needs known members: put some "
                          "candidates in data.candidates/member/")
    _check_inputs(run_dir, {"candidates": _fingerprint(cand["images"], cand["captions"]),
                            "reference": _fingerprint(ref["images"], ref["captions"])})

    model = UNet2DConditionModel(pipe.unet_config)
    apply = lambda p, z, t, c: model.apply({"params": p}, z, t, c)  # noqa: E731
    eps_pre, eps_ft = Partial(apply, p_pre), Partial(apply, p_ft)
    sched = schedule_from_diffusers_config(pipe.scheduler_config)
    # [code] PGD runs on the VAE latent (see authentication/cgi_dm.py); the VAE only encodes the
    # images and decodes the masked start and the recovery for the similarity and the report
    from jaxattrib.models.latent_io import vae_codec
    k_cand, k_ref, k_enc = jax.random.split(jax.random.PRNGKey(config.seed), 3)
    sample = pipe.is_latent and config.data.vae_posterior == "sample"
    encode, decode = vae_codec(pipe, sample)
    ctx = lambda caps: np.asarray(pipe.encode_prompts(list(caps)))  # noqa: E731
    common = dict(encode=encode, decode=decode, batch_size=config.batch_size,
                  progress=progress)
    cache = RunDir(run_dir).cache("cgi_dm")
    rc = recover_cached("candidates", cand["images"], ctx(cand["captions"]), eps_pre, eps_ft,
                        sched, cgi, k_cand, cache,
                        encode_key=jax.random.fold_in(k_enc, 0) if sample else None, **common)
    rr = recover_cached("reference", ref["images"], ctx(ref["captions"]), eps_pre, eps_ft,
                        sched, cgi, k_ref, cache,
                        encode_key=jax.random.fold_in(k_enc, 1) if sample else None, **common)
    # [design] SSIM: the largest odd window <= 11 that fits (cgi_dm.similarity_fn)
    s_cand, s_ref = (cgi_dm.recovery_scores(r["original"], r["recovered"], config.similarity,
                                            batch_size=config.batch_size) for r in (rc, rr))
    for name, s in (("candidate", s_cand), ("reference", s_ref)):
        bad = np.flatnonzero(~np.isfinite(s))
        if bad.size:
            raise cgi_dm.NonFiniteObjectiveError(f"{name} similarity scores are not finite for "
                                                 f"images {bad.tolist()}")
    labels = cand["labels"]
    members = s_cand[labels == 1] if config.calibration.target == "accuracy" else None
    d = cgi_dm.decide(s_cand, s_ref, members, target=config.calibration.target,
                      fpr=config.calibration.fpr)
    out = {"scores": s_cand, "p_values": d["p_values"], "decisions": d["decisions"],
           "threshold": np.float64(d["threshold"]), "labels": labels,
           "reference_scores": s_ref, "ids": cand["ids"]}
    from jaxattrib.runs.rundir import save_npz
    save_npz(cache / "scores.npz", **out)
    space = ("pixels (no VAE)" if not pipe.is_latent else
             f"VAE latents {list(rc['mask'].shape[1:])} of {size} px images; "
             + ("VAE posterior sample per image, key fold_in(fold_in(split(PRNGKey(seed), 3)"
                "[2], set), image index), set 0 = candidates, 1 = reference" if sample
                else "VAE posterior mean"))
    summary = report(run_dir, config, out, rc, {"pretrained": d_pre, "finetuned": d_ft},
                     space=space)
    from jaxattrib.report.html import render_run_report
    render_run_report(run_dir, title="jaxattrib CGI-DM authentication")
    return summary


def write_section(run_dir: Path, name: str, title: str, *, order: int, roc: dict | None = None,
                  examples: dict | None = None, examples_first: bool = False,
                  **fields) -> None:
    """Writes a CGI-DM report section ``results/<name>.json`` with its figures; the one
    writer behind the demo's, the ``cgi-dm`` command's and the CGI-DM benchmark's sections.

    ``roc``: ``{'file', 'curves': {label: (fpr, tpr)}, 'title', 'caption'}`` → an ROC plot at
    ``results/<file>``. ``examples``: ``{'file', 'original', 'masked', 'recovered'}`` (pixel
    images ``[n, H, W, 3]``), ``'labels'`` (3 per row) and ``'caption'`` → an ``original |
    masked | recovered`` grid at ``results/<file>``, two rows of three per line.
    ``examples_first`` puts the grid before the ROC plot. ``fields`` go to
    :func:`jaxattrib.report.html.write_result` (``metrics``, ``tables``, ``text``).
    """
    from jaxattrib.report.html import write_result
    from jaxattrib.report.images import image_grid, save_png
    from jaxattrib.report.plots import roc_curve_png
    results = RunDir(run_dir).results
    results.mkdir(parents=True, exist_ok=True)
    figs = []
    if roc is not None:
        atomic_write_bytes(results / roc["file"], roc_curve_png(roc["curves"], title=roc["title"]))
        figs.append({"path": f"{RunDir.RESULTS}/{roc['file']}", "caption": roc["caption"]})
    if examples is not None:
        trip = np.stack([examples["original"], examples["masked"], examples["recovered"]], 1)
        save_png(results / examples["file"], image_grid(trip.reshape(-1, *trip.shape[2:]),
                                                        nrow=6, labels=examples["labels"]))
        fig = {"path": f"{RunDir.RESULTS}/{examples['file']}", "caption": examples["caption"]}
        figs.insert(0, fig) if examples_first else figs.append(fig)
    write_result(run_dir, name, title, order=order, images=figs, **fields)


def report(run_dir: Path, config, out: dict, rec: dict, models: dict,
           space: str = "") -> dict:
    """Writes the ``cgi_dm_*`` report sections; returns the summary metrics. ``rec``'s
    ``original`` / ``masked`` / ``recovered`` are pixel images (decoded for a latent model);
    ``space`` says where PGD ran (shown in the report)."""
    from jaxattrib.metrics import accuracy_at_threshold, roc_auc, roc_curve, tpr_at_fpr
    s, labels, dec = out["scores"], out["labels"], out["decisions"]
    thr = float(out["threshold"])
    summary = {"candidates": int(len(s)), "reference images": int(len(out["reference_scores"])),
               "threshold": thr, "flagged as used": int(dec.sum()),
               "calibration": f"{config.calibration.target} "
                              f"(fpr={config.calibration.fpr:g}) on the reference set"}
    if space:
        summary["PGD on"] = space.split(" of ")[0]
    known = labels >= 0
    roc = examples = None
    if known.any() and len(np.unique(labels[known])) == 2:
        y = labels[known] == 1
        fpr, tpr, _ = roc_curve(s[known], y)
        summary.update({"AUC": roc_auc(s[known], y), "TPR@1%FPR": tpr_at_fpr(s[known], y, 0.01),
                        "TPR@10%FPR": tpr_at_fpr(s[known], y, 0.10),
                        "accuracy at threshold": accuracy_at_threshold(s[known], y, thr)})
        roc = {"file": "cgi_dm_roc.png", "curves": {f"CGI-DM ({config.similarity})": (fpr, tpr)},
               "title": "CGI-DM: labelled candidates (member/ vs non_member/)",
               "caption": "ROC curve"}
    n = min(config.report_images, len(s))
    if n:
        lab = []
        for i in range(n):
            lab += [str(out["ids"][i])[-14:], "masked",
                    f"{s[i]:.2f} {'USED' if dec[i] else 'not'}"]
        examples = {"file": "cgi_dm_images.png", "original": rec["original"][:n],
                    "masked": rec["masked"][:n], "recovered": rec["recovered"][:n],
                    "labels": lab, "caption": f"original | masked | recovered, first {n} "
                                              f"candidates (similarity, decision)"}
    names = {1: "member", 0: "non_member", -1: "?"}
    rows = [{"image": str(out["ids"][i]), "label": names[int(labels[i])],
             f"{config.similarity}(original, recovered)": float(s[i]),
             "p-value": float(out["p_values"][i]), "used in fine-tuning": bool(dec[i])}
            for i in range(len(s))]
    write_section(run_dir, "cgi_dm", "CGI-DM copyright authentication", order=1,
                  roc=roc, examples=examples, metrics=summary,
                  text=(f"Pretrained: {models['pretrained']}. Fine-tuned: {models['finetuned']}. "
                        f"{config.cgi.num_steps} PGD steps, mask {config.cgi.mask_kind!r}"
                        f"{f', PGD on {space}' if space else ''}. The masked and recovered "
                        "images are decoded to pixels. "
                        "A candidate is flagged when the similarity of its recovery is at least "
                        "the threshold calibrated on the reference (non-member) images; p-values "
                        "are empirical against the reference scores."),
                  tables=[{"caption": "per candidate", "rows": rows}])
    return summary
