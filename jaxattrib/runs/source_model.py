"""``jaxattrib source-model``: was a suspicious model trained on my model's generations?

The config is ``jaxattrib/configs/source_model.py`` (every field documented there); the
numerics are :mod:`jaxattrib.authentication.source_model` (key-sample strategies, same-seed
queries, instance ``conf``, calibration on innocent models). The run directory::

    config.json                    the resolved config (a rerun with another config is refused)
    source_model/key_samples.json  candidate prompts' fingerprint, strategy scores, chosen keys
    source_model/gen_<role>_<i>.npz  key-prompt generations per model [S, N, H, W, C]: cached
    source_model/results.json      conf, distances, decision per model; the threshold
    results/source_model*.json, *.png  report sections; report.html

Latent pipelines [design]: Strategy 1 (detection) runs the source's UNet on noise of the latent
shape (it needs no images, so nothing is encoded); every generation (Strategy 2's and the
same-seed queries) is sampled in latent space and VAE-decoded to pixels by
:func:`jaxattrib.generate.generate` before any distance, and the cached ``gen_*.npz`` hold those
pixels (checked: pixel images of the model's size). ``results.json``'s ``compared`` says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from jaxattrib.config import ConfigError
from jaxattrib.runs.rundir import RunDir
from jaxattrib.fingerprint import json_object as _sha  # recipe of stored cache keys


def check_config(config, source: str = "config") -> None:
    """Validates a ``source_model`` config; raises :class:`ConfigError` naming the field."""
    from jaxattrib.authentication.source_model import METRICS, STRATEGIES
    m, k, d, q = config.model, config.key_samples, config.decision, config.query

    def bad(field, value, expected):
        raise ConfigError(f"{source}: {field}={value!r}: expected {expected}")

    if not m.suspects:
        raise ConfigError(f"{source}: model.suspects is empty: give at least one model to test")
    for field, specs in (("model.suspects", m.suspects), ("model.innocent", m.innocent)):
        for spec in specs:
            if not isinstance(spec, str) or not spec:
                bad(field, spec, "a tuple of model specs (non-empty strings)")
    if not k.prompts and not k.prompts_file:
        raise ConfigError(f"{source}: key_samples.prompts and key_samples.prompts_file are both "
                          f"empty: give the candidate prompts")
    if k.prompts_file and not Path(k.prompts_file).is_file():
        bad("key_samples.prompts_file", k.prompts_file, "an existing text file (one prompt per "
                                                        "line)")
    if k.strategy not in STRATEGIES:
        bad("key_samples.strategy", k.strategy, f"one of {STRATEGIES}")
    if k.strategy == "generation" and not m.reference:
        raise ConfigError(f"{source}: model.reference is empty: key_samples.strategy="
                          f"'generation' compares the source with an independent reference model")
    if k.strategy == "generation" and len(set(k.generation_seeds)) < 2:
        bad("key_samples.generation_seeds", k.generation_seeds, "at least 2 distinct seeds")
    if not isinstance(k.n, int) or k.n < 1:
        bad("key_samples.n", k.n, "a positive integer")
    if not isinstance(k.detection_seeds, int) or k.detection_seeds < 1:
        bad("key_samples.detection_seeds", k.detection_seeds, "a positive integer")
    if d.metric not in METRICS:
        bad("decision.metric", d.metric, f"one of {METRICS}")
    if d.delta0 == "calibrated":
        if not m.innocent:
            raise ConfigError(f"{source}: decision.delta0='calibrated' is chosen on the innocent "
                              f"models, but model.innocent is empty")
    elif isinstance(d.delta0, str) or not d.delta0 > 0:
        bad("decision.delta0", d.delta0, "a positive distance or 'calibrated'")
    if not 0.0 < d.innocent_hit_rate < 1.0:
        bad("decision.innocent_hit_rate", d.innocent_hit_rate, "a number in (0, 1)")
    if not 0.0 <= d.fpr <= 1.0:
        bad("decision.fpr", d.fpr, "a number in [0, 1]")
    if not 0.0 <= d.threshold <= 1.0:
        bad("decision.threshold", d.threshold, "a conf threshold in [0, 1]")
    if not q.seeds or not all(isinstance(s, int) for s in q.seeds):
        bad("query.seeds", q.seeds, "a non-empty tuple of integer seeds")
    if not isinstance(q.num_inference_steps, int) or q.num_inference_steps < 1:
        bad("query.num_inference_steps", q.num_inference_steps, "a positive integer")
    if not isinstance(config.report_keys, int) or config.report_keys < 0:
        bad("report_keys", config.report_keys, "an integer >= 0")
    candidate_prompts(config, source)   # counts known before any model is loaded


def candidate_prompts(config, source: str = "config") -> list[str]:
    """``key_samples.prompts`` followed by the lines of ``key_samples.prompts_file`` (blank
    lines skipped). An empty prompt in ``key_samples.prompts``, a prompts file with no prompt,
    or fewer prompts than ``key_samples.n`` is a :class:`ConfigError`."""
    k = config.key_samples
    prompts = [str(p) for p in k.prompts]
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise ConfigError(f"{source}: key_samples.prompts[{empty[0]}] is empty: expected a "
                          f"non-empty prompt")
    if k.prompts_file:
        try:
            text = Path(k.prompts_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{source}: key_samples.prompts_file={k.prompts_file!r}: cannot be "
                              f"read as UTF-8 text ({e})") from e
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if not lines:
            raise ConfigError(f"{source}: key_samples.prompts_file={k.prompts_file!r} has no "
                              f"prompts (expected one prompt per line)")
        prompts += lines
    if k.n > len(prompts):
        raise ConfigError(f"{source}: key_samples.n={k.n}: only {len(prompts)} candidate "
                          f"prompts")
    return prompts




def select_keys(config, pipe, source_params, prompts, gen_fn, reference_fn, cache: Path):
    """Key samples on the source (cached in ``cache/key_samples.json``)."""
    from jaxattrib.authentication import source_model as sm
    from jaxattrib.diffusion.schedule import schedule_from_diffusers_config
    from jaxattrib.fileio import atomic_write_text
    from jaxattrib.generate import latent_shape, make_eps_fn
    path = cache / "key_samples.json"
    fp = _sha(prompts)
    if path.is_file():
        old = json.loads(path.read_text())
        if old["prompts_sha256"] != fp:
            raise ConfigError(f"{path}: the candidate prompts changed since this run directory "
                              f"was made; use a new --run-dir or --fresh")
        return old
    k = config.key_samples
    key = jax.random.PRNGKey(config.seed)
    kw = {}
    if k.strategy == "detection":
        sched = schedule_from_diffusers_config(pipe.scheduler_config)
        kw["memorization"] = np.asarray(sm.memorization_signal(
            make_eps_fn(pipe.unet_config, source_params), sched, pipe.encode_prompts(prompts),
            pipe.encode_prompts([""]), key, sample_shape=latent_shape(pipe, 1)[1:],
            n_seeds=k.detection_seeds))
    elif k.strategy == "generation":
        seeds = list(k.generation_seeds)
        src = sm.query(gen_fn, prompts, seeds)
        kw["consistency"] = np.asarray(sm.within_distance(src, config.decision.metric))
        kw["idiosyncrasy"] = np.asarray(sm.cross_distance(
            src, sm.query(reference_fn, prompts, seeds), config.decision.metric))
    chosen = sm.select_key_samples(prompts, k.strategy, k.n, key=key, **kw)
    out = {"prompts_sha256": fp, "strategy": k.strategy,
           "indices": [int(i) for i in chosen.indices], "prompts": list(chosen.prompts),
           "scores": [None if not np.isfinite(s) else float(s) for s in chosen.scores],
           "candidate_scores": {n: [float(x) for x in v] for n, v in kw.items()}}
    atomic_write_text(path, json.dumps(out, indent=1))
    return out


def run_source_model(config, run_dir: str | Path, progress: bool = True) -> dict:
    """Runs (or resumes) source-model attribution; writes the report; returns the results."""
    from jaxattrib.authentication import source_model as sm
    import io

    from jaxattrib import integrity
    from jaxattrib.runs.rundir import check_run_config
    from jaxattrib.fileio import atomic_write_text
    from jaxattrib.generate import latent_shape
    from jaxattrib.models.latent_io import check_pixel_images
    from jaxattrib.runs.specs import load_model, load_unet

    check_config(config)
    run_dir = Path(run_dir)
    check_run_config(run_dir, config)
    cache = RunDir(run_dir).cache("source_model")
    cache.mkdir(parents=True, exist_ok=True)
    pipe = load_model(config.model.pipeline)
    q = config.query

    def gen_fn(params):
        return sm.pipeline_generate_fn(pipe, params, num_inference_steps=q.num_inference_steps,
                                       guidance_scale=q.guidance_scale)

    models = [("source", 0, config.model.source, "model.source")]
    for role, specs in (("suspect", config.model.suspects), ("innocent", config.model.innocent)):
        field = "model.suspects" if role == "suspect" else "model.innocent"
        models += [(role, i, s, f"{field}[{i}]") for i, s in enumerate(specs)]
    loaded = {(r, i): load_unet(spec, pipe, field) for r, i, spec, field in models}
    ref_fn = None
    if config.key_samples.strategy == "generation":
        ref_fn = gen_fn(load_unet(config.model.reference, pipe, "model.reference")[0])
    prompts = candidate_prompts(config)
    keys = select_keys(config, pipe, loaded[("source", 0)][0], prompts,
                       gen_fn(loaded[("source", 0)][0]), ref_fn, cache)
    images = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(models), desc="source-model: generate key samples", unit="model",
                   dynamic_ncols=True)
    for role, i, spec, field in models:
        # each model's generations: a checksummed cache (a corrupt one is regenerated)
        path = cache / f"gen_{role}_{i}.npz"
        blob = integrity.read_checked(path, what="source-model generations")
        got = None if blob is None else dict(np.load(io.BytesIO(blob)))
        if got is not None and str(got["spec"]) == spec:
            images[(role, i)] = got["images"]
        else:
            imgs = np.asarray(sm.query(gen_fn(loaded[(role, i)][0]), keys["prompts"],
                                       list(q.seeds)), np.float32)
            # distances compare pixels: a latent model's generations are VAE-decoded
            # (jaxattrib.generate), never compared as latents
            check_pixel_images(imgs.reshape((-1,) + imgs.shape[2:]), pipe.unet_config,
                               pipe.vae_config, f"generations of {field}")
            buf = io.BytesIO()
            np.savez(buf, images=imgs, spec=np.array(spec))
            integrity.write_checked(path, buf.getvalue())
            images[(role, i)] = imgs
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    d = config.decision
    src = images[("source", 0)]
    rows = []
    dists = {(role, i): np.asarray(sm.instance_distances(src, images[(role, i)], d.metric))
             for role, i, _, _ in models[1:]}                                      # [S, N]
    delta0 = (sm.calibrate_delta0([v for (role, _), v in dists.items() if role == "innocent"],
                                  d.innocent_hit_rate)
              if d.delta0 == "calibrated" else float(d.delta0))
    for role, i, spec, _ in models[1:]:
        dist = dists[(role, i)]
        rows.append({"role": role, "index": i, "model": spec, "where": loaded[(role, i)][1],
                     "conf": float(np.mean(dist < delta0)),
                     "mean distance": float(dist.mean()), "distances": dist.mean(0).tolist()})
    innocent = [r["conf"] for r in rows if r["role"] == "innocent"]
    if innocent:
        thr = sm.calibrate_on_innocent(innocent, d.fpr)
        how = f"calibrated on {len(innocent)} innocent model(s) at FPR <= {d.fpr:g}"
    else:
        thr, how = float(d.threshold), "decision.threshold (no innocent models given)"
    for r in rows:
        r["flagged"] = bool(r["conf"] >= thr)      # trained on the source's generations
    px = list(src.shape[2:])
    space = (f"pixels {px} (pixel-space model)" if not pipe.is_latent else
             f"pixels {px}: generated as latents {list(latent_shape(pipe, 1)[1:])} and "
             f"VAE-decoded before any distance")
    result = {"threshold": thr, "threshold_from": how, "delta0": delta0, "compared": space,
              "delta0_from": (f"calibrated: innocent hit rate {d.innocent_hit_rate:g} on the "
                              f"innocent models" if d.delta0 == "calibrated"
                              else "decision.delta0"),
              "models": rows, "key_samples": keys}
    atomic_write_text(cache / "results.json", json.dumps(result, indent=1))
    report(run_dir, config, result, images, models)
    from jaxattrib.report.html import render_run_report
    render_run_report(run_dir, title="jaxattrib source-model attribution")
    return result


def report(run_dir: Path, config, result: dict, images: dict, models: list) -> None:
    """Writes the ``source_model`` report sections (verdicts, key samples, image grid)."""
    from jaxattrib.report.html import write_result
    from jaxattrib.report.images import image_grid, save_png
    d, keys = config.decision, result["key_samples"]
    rows = [{"model": r["model"], "role": r["role"], "conf": r["conf"],
             "mean distance": r["mean distance"],
             "trained on the source's generations": r["flagged"]}
            for r in result["models"]]
    write_result(run_dir, "source_model", "Source-model attribution", order=1,
                 metrics={"source": models[0][2], "key samples": len(keys["prompts"]),
                          "strategy": keys["strategy"],
                          "delta0": result.get("delta0", d.delta0),
                          "delta0 from": result.get("delta0_from", "decision.delta0"),
                          "metric": d.metric,
                          "compared": result.get("compared", "pixels"),
                          "seeds": list(config.query.seeds), "threshold": result["threshold"],
                          "threshold from": result["threshold_from"]},
                 text=("conf = fraction of (key sample, seed) pairs where the suspect's generation "
                       "is within delta0 of the source's generation from the same seed; a model "
                       "is flagged when conf >= threshold."),
                 tables=[{"caption": "per model", "rows": rows}])
    n = min(config.report_keys, len(keys["prompts"]))
    key_rows = [{"key sample": j, "prompt": p, "strategy score": s}
                for j, (p, s) in enumerate(zip(keys["prompts"], keys["scores"]))]
    imgs = []
    if n:
        order = [("source", 0)] + [(r, i) for r, i, _, _ in models[1:]]
        cells, labels = [], []
        for j in range(n):
            for role, i in order:
                cells.append(images[(role, i)][0, j])
                if role == "source":
                    labels.append(f"key {j} source")
                else:
                    dist = next(r for r in result["models"] if (r["role"], r["index"]) ==
                                (role, i))["distances"][j]
                    labels.append(f"{role[:4]}{i} d={dist:.2f}")
        save_png(RunDir(run_dir).results / "source_model_keys.png",
                 image_grid(np.stack(cells), nrow=len(order), labels=labels))
        imgs.append({"path": "results/source_model_keys.png",
                     "caption": f"first {n} key samples, seed {config.query.seeds[0]}: the "
                                f"source's generation, then each model's from the same seed "
                                f"(d = distance averaged over seeds)"})
    write_result(run_dir, "source_model_keys", "Key samples", order=2,
                 tables=[{"caption": f"{keys['strategy']} strategy", "rows": key_rows}],
                 images=imgs)
