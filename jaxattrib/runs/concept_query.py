"""The ``concept-query`` command: Concept-TRAK for a free-text concept on a finished run.

The run is one written by ``benchmarks/concept_trak.py`` (:mod:`jaxattrib.eval.concept_benchmark`):
its ``config.json``, ``data/train.npz``, ``record/``, the cached training features under
``features/concept-trak/`` and the validation-chosen λ in ``scores/concept-trak_lambda.json``.
[design] The query reads only those files; it does not import the benchmark harness.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxattrib.config import ConfigError
from jaxattrib.runs.rundir import RunDir

logger = logging.getLogger(__name__)


def concept_trak_config(config):
    """The :class:`ConceptTRAKConfig` of the benchmark config (all switches on)."""
    from jaxattrib.attribution import concept_trak as ct
    a = config.attribution
    return ct.ConceptTRAKConfig.from_section(a, proj_seed=config.seed)


def concept_inputs(pipe, images, config, role: str, field: str) -> tuple[np.ndarray, str]:
    """Concept-TRAK's model inputs of pixel ``images [N, H, W, 3]``: the images for a pixel
    pipeline; for a latent one their VAE latents, encoded **once** with the VAE posterior
    **mean** (deterministic: no key to record). [design] The mean is the project's rule for the
    latents that are attributed (the ``attribute`` path's training images and queries, and what
    ``jaxattrib train`` fine-tunes latent pipelines on once the latent-path branch is in; D-TRAK's
    SD code featurizes ``latent_dist.mode()``); the benchmark's cached training features and a
    later ``concept-query`` therefore see the same latents. ``role`` ('train' | 'query') is
    informational. Returns ``(inputs, how)`` (``how`` says what was done, for the output).
    Shape errors are :class:`~jaxattrib.models.latent_io.ModelInputError` naming ``field``."""
    from jaxattrib.models.latent_io import check_pixel_images, pipeline_inputs
    check_pixel_images(images, pipe.unet_config, pipe.vae_config, field)
    if not pipe.is_latent:
        return np.asarray(images, np.float32), "pixels (no VAE)"
    z = pipeline_inputs(pipe, images, field, key=None)
    return z, f"VAE latents {list(z.shape[1:])}: the VAE posterior mean, encoded once"


def concept_query(run_dir: str | Path, prompt: str, concepts: Sequence[str], *,
                  seed: int | None = None, image: np.ndarray | None = None,
                  topk: int = 10) -> dict:
    """Concept-TRAK on a finished benchmark run, for a free-text query.

    The query is ``image [H, W, 3]`` in [-1, 1], or the generation of ``prompt`` from ``seed``
    with the run's fine-tuned model and generation settings. Every concept phrase is
    attributed separately; a concept the prompt lacks raises ``ValueError`` naming both
    (before any model is loaded). The run's cached training features and validation-chosen
    λ ratio are used (ratio 1 if the run has none).

    Latent pipelines: the query image (and the training images, when no cached features
    exist) is VAE-encoded once (:func:`concept_inputs`: the posterior mean); the DDIM
    inversion and the gradients run on the latents.
    An image of the wrong size raises :class:`~jaxattrib.models.latent_io.ModelInputError`
    (a ``ConfigError``) naming ``--image`` and both shapes.

    Returns ``{'image', 'encoding', 'queries': [{'concept', 'negative', 'scores' [N], 'top':
    [{'rank', 'index', 'id', 'caption', 'score'}]}]}`` (``encoding`` says how the query became
    a model input; ``index`` is the training example's row in ``data/train.npz``).
    :func:`write_query_section` puts the result in the run's report.
    """
    from jaxattrib.attribution import concept_trak as ct
    from jaxattrib.train.base_model import load_base_model
    from jaxattrib.config import apply_overrides
    from jaxattrib.diffusion.schedule import schedule_from_diffusers_config
    from jaxattrib.train.record import TrajectoryRecord
    import ml_collections
    queries = ct.concept_queries(prompt, concepts)  # the clear error comes first
    if (image is None) == (seed is None):
        raise ValueError("concept_query: give exactly one of image and seed")
    run_dir = Path(run_dir)
    rd = RunDir(run_dir)
    for need in (rd.config, rd.data_file("train"), rd.record):
        if not need.exists():
            raise ConfigError(f"{need}: missing; run benchmarks/concept_trak.py with "
                              f"--run-dir {run_dir} first")
    config = apply_overrides(ml_collections.ConfigDict(
        json.loads(RunDir(run_dir).config.read_text())), [])
    from jaxattrib.runs.demo import check_run_data_size
    from jaxattrib.train.base_model import ASSET_DIR, base_model_info
    folder = config.base_model or None
    if (Path(folder or ASSET_DIR) / "jaxattrib_base.json").is_file():  # a model with a spec
        check_run_data_size(run_dir, base_model_info(folder), folder)
    pipe = load_base_model(config.base_model or None)
    record = TrajectoryRecord.open(RunDir(run_dir).record.resolve())
    unet_params = record.load(record.latest_step())["unet"]
    record.close()
    train = dict(np.load(RunDir(run_dir).data_file("train")))
    cfg = concept_trak_config(config)
    pairs = None
    if image is None:
        import jax
        from jaxattrib.generate import generate
        g = generate(pipe, [prompt], jax.random.PRNGKey(int(seed)), unet_params=unet_params,
                     num_inference_steps=config.generate.num_inference_steps,
                     guidance_scale=config.generate.guidance_scale)
        image = np.clip(np.asarray(g.images[0]), -1, 1).astype(np.float32)
        if cfg.query_from_trajectory:   # the query's own trajectory, regenerated from its seed
            from jaxattrib.runs.concept_pairs import query_trajectory_pairs
            pairs = query_trajectory_pairs(pipe, unet_params, [prompt],
                                           jax.random.PRNGKey(int(seed)),
                                           config.generate.guidance_scale, cfg)
            pairs = tuple(a[0] for a in pairs)
    elif cfg.query_from_trajectory:
        logger.warning("concept_query_pairs='trajectory': an --image query has no recorded "
                       "seed, so its (x_t, t) pairs come from DDIM inversion")
        cfg = dataclasses.replace(cfg, query_pairs="invert")
    q_in, how = concept_inputs(pipe, np.asarray(image, np.float32)[None], config, "query",
                               "--image" if seed is None else "the generated query")
    lam = RunDir(run_dir).scores / "concept-trak_lambda.json"
    if lam.exists():
        cfg = dataclasses.replace(cfg, lam_ratio=float(json.loads(lam.read_text())["chosen"]))
    cached = (RunDir(run_dir).features / "concept-trak"
              / f"train_{ct.feature_tag('train', cfg)}.npy")
    encode = lambda p: np.asarray(pipe.encode_prompts(list(p)))  # noqa: E731
    train_in = None
    if not cached.exists():
        train_in, _ = concept_inputs(pipe, train["images"], config, "train",
                                     f"{run_dir / 'data' / 'train.npz'} images")
    qs, scores = ct.attribute_concepts(
        pipe.unet_config, unet_params, encode, train_in, list(train["captions"]),
        q_in[0], prompt, [q.concept for q in queries], cfg,
        schedule_from_diffusers_config(pipe.scheduler_config),
        Phi_train=np.load(cached) if cached.exists() else None, query_pairs=pairs)
    out = []
    for q, s in zip(qs, scores):
        order = np.argsort(-s, kind="stable")[:topk]
        out.append({"concept": q.concept, "negative": q.negative, "scores": s,
                    "top": [{"rank": r + 1, "index": int(i), "id": str(train["ids"][i]),
                             "caption": str(train["captions"][i]), "score": float(s[i])}
                            for r, i in enumerate(order)]})
    return {"image": np.asarray(image), "encoding": how, "queries": out}


def write_query_section(run_dir: str | Path, prompt: str, res: dict, *,
                        k: int = 8) -> Path:
    """Writes the report section of one :func:`concept_query` result ``res``:
    ``results/concept_query_<key>.json`` (``key`` = a fingerprint of the prompt, the concepts
    and the query image, so another query adds a section and the same one replaces its own)
    with, per concept, a table of its top training examples (rank, id, caption, score) and an
    image row ``results/concept_query_<key>.png``: the query image, then its top ``k`` training
    images (``data/train.npz``) with id and score under each. Returns the JSON's path."""
    from jaxattrib.fingerprint import raw_arrays, text
    from jaxattrib.report.html import write_result
    from jaxattrib.report.images import save_png, topk_image
    run_dir = Path(run_dir)
    image = np.asarray(res["image"], np.float32)
    concepts = [q["concept"] for q in res["queries"]]
    key = text(prompt, *concepts, raw_arrays(image))[:10]
    train = np.load(RunDir(run_dir).data_file("train"))
    ids = np.asarray(train["ids"])
    rows, grids = [], []
    for q in res["queries"]:
        rows += [{"concept": q["concept"], "rank": t["rank"], "id": t["id"],
                  "caption": t["caption"], "score": t["score"]} for t in q["top"]]
        sel = np.sort([t["index"] for t in q["top"][:k]])
        grids.append(topk_image(np.clip(image, -1, 1), np.asarray(train["images"][sel]),
                                np.asarray(q["scores"])[sel], k=len(sel),
                                labels=[str(ids[i]) for i in sel],
                                query_label=f"query\n'{q['concept']}'")[0])
    width = max(g.shape[1] for g in grids)
    grid = np.concatenate([np.pad(g, ((0, 0), (0, width - g.shape[1]), (0, 0)),
                                  constant_values=255) for g in grids], axis=0)
    rel = f"{RunDir.RESULTS}/concept_query_{key}.png"
    save_png(run_dir / rel, grid)
    return write_result(
        run_dir, f"concept_query_{key}", f"Concept query: {prompt}", order=50,
        text=(f"Concept-TRAK for each concept phrase of the prompt (c⁻ = the prompt without "
              f"it): which training images gave the query that concept. Query as model input: "
              f"{res['encoding']}."),
        tables=[{"caption": "top training examples per concept, best first (larger score = "
                            "more attributed)", "rows": rows}],
        images=[{"path": rel, "caption": "one row per concept: the query (left) and its top "
                                         "training images, id and score under each"}])


__all__ = ["concept_inputs", "concept_query", "concept_trak_config", "write_query_section"]
