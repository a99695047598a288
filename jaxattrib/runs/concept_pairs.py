"""Concept-TRAK's query-side (x_t, t) pairs from the queries' own sampling trajectories, as the
reference's AbC query side takes them [code: enkeejunior1/concept-trak ``test_grad.py``]: each
query we generated is regenerated from its recorded key with DDIM (``inversion_steps`` steps,
η = ``query_eta``; the same starting noise, a stochastic path) and the states after every
``keep_every``-th step are kept (:func:`jaxattrib.attribution.concept_trak.trajectory_pairs`).
Used with ``attribution.concept_query_pairs = 'trajectory'`` by the demo, the Concept-TRAK
benchmark and ``concept-query --seed``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from jaxattrib.runs.rundir import RunDir

logger = logging.getLogger(__name__)


def query_trajectory_pairs(pipe, unet_params, prompts, key, guidance_scale: float, cfg):
    """``(xts [Q, K, ...], ts [Q, K], noise)``: each query's sampling trajectory regenerated
    from its key (query ``i``: ``fold_in(key, i)``, as :func:`jaxattrib.generate.generate`
    drew it) with its prompt and guidance, DDIM with ``cfg.inversion_steps`` steps and η =
    ``cfg.query_eta`` (the reference's AbC query side: 50 steps, η = 0.1 [code]; the same
    starting noise as the query, a stochastic path [design: the query's own guidance]), then
    :func:`~jaxattrib.attribution.concept_trak.trajectory_pairs` (the state after every
    ``keep_every``-th step; ``x0`` = the trajectory's last x̂0)."""
    from jaxattrib.attribution import concept_trak as ct
    from jaxattrib.generate import generate, pipeline_schedule
    g = generate(pipe, [str(p) for p in prompts], key, unet_params=unet_params,
                 num_inference_steps=cfg.inversion_steps, guidance_scale=guidance_scale,
                 eta=cfg.query_eta, return_trajectory=True)
    t = g.trajectory
    return ct.trajectory_pairs(pipeline_schedule(pipe), np.asarray(t.xs),
                               np.asarray(t.timesteps), np.asarray(t.x0_preds[:, -1]),
                               cfg.keep_every)


def cached_query_pairs(run_dir: Path, config, pipe, unet_params, prompts, cfg):
    """:func:`query_trajectory_pairs` of a run's generated queries (``prompts [Q]``, generated
    from :func:`jaxattrib.generate.query_key`), cached in ``generations/concept_pairs.npz``
    with the settings that made them (other settings recompute)."""
    from jaxattrib.generate import query_key
    from jaxattrib.runs.rundir import save_npz
    path = RunDir(run_dir).generations / "concept_pairs.npz"
    settings = json.dumps({"steps": cfg.inversion_steps, "eta": cfg.query_eta,
                           "keep_every": cfg.keep_every, "seed": int(config.seed),
                           "guidance": float(config.generate.guidance_scale),
                           "prompts": [str(p) for p in prompts]}, sort_keys=True)
    if path.exists():
        with np.load(path) as z:
            if str(z["settings"]) == settings:
                return z["xts"], z["ts"], z["noise"]
    logger.info("regenerating %d query trajectories (%d DDIM steps, eta %g) for Concept-TRAK's "
                "query pairs", len(prompts), cfg.inversion_steps, cfg.query_eta)
    xts, ts, nz = query_trajectory_pairs(pipe, unet_params, prompts, query_key(config.seed),
                                         config.generate.guidance_scale, cfg)
    save_npz(path, xts=xts, ts=ts, noise=nz, settings=np.asarray(settings))
    return xts, ts, nz


__all__ = ["cached_query_pairs", "query_trajectory_pairs"]
