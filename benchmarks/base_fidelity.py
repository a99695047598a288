"""Generation fidelity of a base model (no fine-tuning) on its own synthetic concept set.

Prompts every (shape, color) combination of the model's pretraining spec (``jaxattrib_base.json``
or the latent base's manifest) on random backgrounds, generates, and classifies the generations
with the package's pixel-statistics classifier (:func:`jaxattrib.data.synthetic.classify_concepts`,
which never saw them). Reports shape/color accuracy on in-distribution (ID) combinations (seen in
pretraining) and on the held-out (OOD, compositional) combinations, plus the classifier's own
accuracy on *real* renders of the same combinations at the model's resolution (is the classifier
reliable at this size?) and, for a latent model, on their VAE reconstructions (the decoder's
ceiling).

    PYTHONPATH=$PWD JAX_PLATFORMS=cpu nice -n 19 python benchmarks/base_fidelity.py \
        [--model FOLDER] [--per-combo 4] [--steps 25] [--guidance 3] [--out results.json]

[design] Ours: the sampler settings follow the demo (DDIM, 25 steps, CFG 3).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np


def model_spec(folder: Path):
    """``(spec, held_out)`` of a base model folder (pixel ``jaxattrib_base.json`` or latent
    ``jaxattrib_base.json`` written by :mod:`jaxattrib.train.latent_base`)."""
    from jaxattrib.train.base_model import spec_from_info
    info = json.loads((folder / "jaxattrib_base.json").read_text())
    return spec_from_info(info), [dict(h) for h in info["held_out"]]


def classify_acc(images, shapes, colors, spec) -> dict:
    from jaxattrib.data.synthetic import classify_concepts
    pred = classify_concepts(np.asarray(images), spec)
    s = np.array([spec.shapes.index(x) for x in shapes])
    c = np.array([spec.colors.index(x) for x in colors])
    return {"shape": float(np.mean(pred["shape"] == s)),
            "color": float(np.mean(pred["color"] == c)),
            "n": int(len(s)),
            "per_shape": {sh: float(np.mean(pred["shape"][s == i] == i))
                          for i, sh in enumerate(spec.shapes) if np.any(s == i)}}


def main(argv=None) -> dict:
    from jaxattrib.data.synthetic import caption, make_synthetic, make_withheld
    from jaxattrib.generate import generate
    from jaxattrib.models.pipeline import load_pipeline

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(Path(__file__).resolve().parents[1]
                                          / "jaxattrib" / "assets" / "base_model"))
    p.add_argument("--per-combo", type=int, default=4)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    folder = Path(a.model)
    spec, held = model_spec(folder)
    pipe = load_pipeline(folder)
    rng = np.random.default_rng(a.seed)
    held_keys = {(h["shape"], h["color"]) for h in held}
    prompts, shapes, colors, is_ood = [], [], [], []
    for s in spec.shapes:
        for c in spec.colors:
            bgs = [b for b in spec.backgrounds if b != c]
            for _ in range(a.per_combo):
                bg = bgs[rng.integers(len(bgs))]
                tex = spec.textures[rng.integers(len(spec.textures))]
                prompts.append(caption(s, c, bg, tex))
                shapes.append(s)
                colors.append(c)
                is_ood.append((s, c) in held_keys)
    is_ood = np.array(is_ood)
    t0 = time.time()
    g = generate(pipe, prompts, jax.random.PRNGKey(a.seed + 11), num_inference_steps=a.steps,
                 guidance_scale=a.guidance)
    images = np.clip(np.asarray(g.images), -1, 1)
    gen_s = time.time() - t0
    shapes, colors = np.array(shapes), np.array(colors)
    res = {"model": str(folder), "size": int(images.shape[1]), "prompts": len(prompts),
           "generation_seconds_incl_compile": round(gen_s, 1),
           "generated_id": classify_acc(images[~is_ood], shapes[~is_ood], colors[~is_ood], spec),
           "generated_ood": classify_acc(images[is_ood], shapes[is_ood], colors[is_ood], spec)}
    # the classifier on real renders of the same spec (ID: a fresh seed; OOD: the withheld set)
    real_id = make_synthetic(spec, seed=a.seed + 1000, withhold=held)
    real_ood = make_withheld(spec, a.seed + 1000, held)
    for name, ds in (("classifier_on_real_id", real_id), ("classifier_on_real_ood", real_ood)):
        res[name] = classify_acc(ds.images, ds.label_strings("shape"), ds.label_strings("color"),
                                 spec)
        if pipe.is_latent:   # through the VAE (posterior mean): the decoder's ceiling
            from jaxattrib.models.latent_io import decode_images, encode_images
            rec = decode_images(pipe.vae_params, pipe.vae_config,
                                encode_images(pipe.vae_params, pipe.vae_config, ds.images))
            res[name.replace("real", "vae_reconstructions")] = classify_acc(
                np.clip(rec, -1, 1), ds.label_strings("shape"), ds.label_strings("color"), spec)
    res["env"] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  "machine": f"{platform.node()} {os.cpu_count()} cpus",
                  "load": os.getloadavg()}
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return res


if __name__ == "__main__":
    main()
