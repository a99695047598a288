"""The ``train`` command for a ``dreambooth`` config: class images, pair data, fine-tuning, report.

The DreamBooth objective, pair batches and concept evaluation live in
:mod:`jaxattrib.train.dreambooth`; this module is the run-directory half (config check, model
loading, ``record/``, ``results/``, report).
"""

from __future__ import annotations

import jax
import numpy as np

from jaxattrib.train.dreambooth import (check_identifier, evaluate_concept, generate_class_images,
                                        make_dreambooth_loss, pair_dataset)


def _prompt(template: str, field: str, **values) -> str:
    try:
        return template.format(**values)
    except (KeyError, IndexError) as e:
        raise _config_error(f"dreambooth.{field}={template!r}: unknown placeholder {e}; "
                            f"expected some of {sorted(values)}") from None


def _config_error(msg: str):
    from jaxattrib.config import ConfigError
    return ConfigError(msg)


def _synthetic_instances(config, pipe):
    """Instance images of a held-out synthetic concept (renders the base model never saw)."""
    import dataclasses

    from jaxattrib.train.base_model import base_model_info, spec_from_info
    from jaxattrib.data.synthetic import make_withheld
    d = config.dreambooth
    try:
        info = base_model_info(pipe.folder)
    except FileNotFoundError:
        raise _config_error(f"dreambooth.source='synthetic' needs a model pretrained by "
                            f"jaxattrib.train.base_model ({pipe.folder} has no "
                            f"jaxattrib_base.json)")
    spec = spec_from_info(info)
    words = str(d.concept).split()
    held = [dict(h) for h in info["held_out"]]
    concept = dict(zip(("color", "shape"), words)) if len(words) == 2 else None
    if concept not in held:
        raise _config_error(f"dreambooth.concept={d.concept!r}: expected 'color shape' of a "
                            f"concept withheld from the base model, one of "
                            f"{[h['color'] + ' ' + h['shape'] for h in held]}")
    per = -(-int(d.num_instance) // len(spec.backgrounds))
    ds = make_withheld(dataclasses.replace(spec, per_combination=max(per, 1)),
                       1000 + int(config.seed), [concept])
    # round-robin over backgrounds: k-th render of each background, then the next k
    order = sorted(range(len(ds)), key=lambda i: (ds.ids[i][-3:], ds.ids[i]))
    idx = order[:int(d.num_instance)]
    bgs = [ds.label_strings("background")[i] for i in idx]
    return spec, concept, ds.images[idx].astype(np.float32), bgs, [ds.ids[i] for i in idx]


def _folder_instances(config, size: int):
    from jaxattrib.data.folder import load_folder
    d = config.dreambooth
    if not d.path or not d.subject:
        raise _config_error("dreambooth.source='folder' needs dreambooth.path and "
                            "dreambooth.subject")
    if not d.class_noun:
        raise _config_error("dreambooth.source='folder' needs dreambooth.class_noun")
    ds = load_folder(d.path, size=size, subjects=[d.subject])
    n = min(int(d.num_instance), len(ds))
    return np.asarray(ds.images[:n], np.float32), list(ds.ids[:n])


def dreambooth_run(config, run_dir, progress: bool = True) -> dict:
    """``jaxattrib train dreambooth``: instance + class data, fine-tuning, evaluation.

    Writes into ``run_dir`` (rerunning reuses the class images and resumes the record; the
    evaluation is recomputed): ``config.json``,
    ``data/train.npz`` (instance images then class images, with captions and ids, for
    ``jaxattrib attribute``), the trajectory ``record/`` (one example = one instance/class
    pair, see :func:`pair_dataset`), and with ``evaluate.enabled`` (synthetic concepts only)
    ``generations/{base,finetuned}.npz`` and ``results/dreambooth.json``. Returns the
    evaluation metrics (empty without evaluation).
    """
    import json
    from pathlib import Path

    from jaxattrib import parallel
    from jaxattrib.diffusion.latents import training_latent_rule
    from jaxattrib.diffusion.schedule import schedule_from_diffusers_config
    from jaxattrib.train.finetune import TrainConfig, finetune
    from jaxattrib.runs.rundir import RunDir, check_run_config, save_npz
    from jaxattrib.runs.specs import load_model

    from jaxattrib import precision
    run_dir = Path(run_dir)
    # finetune.precision/remat/matmul_precision: checked before anything is loaded; run
    # directories made before they existed read them as the defaults (what they did)
    precision.check_fields(config.finetune, "finetune")
    check_run_config(run_dir, config, added=precision.added_defaults("finetune"))
    d, f, e = config.dreambooth, config.finetune, config.evaluate
    prec = {k: f.get(k, v) for k, v in precision.DEFAULTS.items()}
    pipe = load_model(config.model)
    size = pipe.unet_config.sample_size * (1 if pipe.vae_config is None else
                                           2 ** (len(pipe.vae_config.block_out_channels) - 1))
    spec = concept = None
    if d.source == "synthetic":
        spec, concept, inst_images, inst_bgs, inst_ids = _synthetic_instances(config, pipe)
        class_noun = d.class_noun or concept["shape"]
        others = [c for c in spec.colors if c != concept["color"]]
    elif d.source == "folder":
        inst_images, inst_ids = _folder_instances(config, size)
        for field in ("instance_prompt", "class_prompt"):
            if any(k in d[field] for k in ("{background}", "{color}", "{other_color}")):
                raise _config_error(
                    f"dreambooth.{field}={d[field]!r}: {{background}}, {{color}} and "
                    f"{{other_color}} describe synthetic concepts; for a folder use e.g. "
                    f"'a {{identifier}} {{class_noun}}' and 'a {{class_noun}}'")
        inst_bgs = [""] * len(inst_images)
        class_noun, others = d.class_noun, [""]
    else:
        raise _config_error(f"dreambooth.source={d.source!r}: expected 'synthetic' or 'folder'")
    bgs = list(d.backgrounds) or [""]

    def fill(template, field, i, background):
        return _prompt(template, field, identifier=d.identifier, class_noun=class_noun,
                       color=concept["color"] if concept else "",
                       other_color=others[i % len(others)], background=background)

    # instance images keep their own background; class prompts cycle other colors first,
    # then backgrounds; evaluation prompts cycle backgrounds
    inst_prompts = [fill(d.instance_prompt, "instance_prompt", i, b)
                    for i, b in enumerate(inst_bgs)]
    class_prompts = [fill(d.class_prompt, "class_prompt", i,
                          bgs[(i // len(others)) % len(bgs)])
                     for i in range(int(d.num_class_images))]
    if d.identifier not in d.instance_prompt and "{identifier}" not in d.instance_prompt:
        raise _config_error(f"dreambooth.instance_prompt={d.instance_prompt!r}: does not use "
                            f"the identifier")
    try:
        check_identifier(pipe.tokenizer, d.identifier, class_prompts)
    except ValueError as err:
        raise _config_error(f"dreambooth.identifier: {err}") from None

    data_path = RunDir(run_dir).data_file("train")
    if data_path.exists():
        class_images = np.load(data_path)["images"][len(inst_images):]
    else:
        class_images = generate_class_images(
            pipe, class_prompts, jax.random.fold_in(jax.random.PRNGKey(config.seed), 101),
            num_inference_steps=d.class_inference_steps, guidance_scale=d.class_guidance_scale)
        save_npz(data_path, images=np.concatenate([inst_images, class_images]),
                  captions=np.array(inst_prompts + class_prompts),
                  ids=np.array([f"instance/{i}" for i in inst_ids] +
                               [f"class/{i:04d}" for i in range(len(class_images))]),
                  is_prior=np.r_[np.zeros(len(inst_images), bool),
                                 np.ones(len(class_images), bool)])

    L = pipe.text_config.max_position_embeddings
    n_pairs, get_batch = pair_dataset(
        {"images": inst_images, "input_ids": pipe.tokenizer(inst_prompts, max_length=L)},
        {"images": class_images, "input_ids": pipe.tokenizer(class_prompts, max_length=L)})
    sched = schedule_from_diffusers_config(pipe.scheduler_config)
    model_info, sample_posterior = training_latent_rule(pipe, RunDir(run_dir).record,
                                                        {"model": str(config.model)})
    loss_fn = make_dreambooth_loss(pipe.unet_config, pipe.text_config, sched,
                                   prior_loss_weight=d.prior_loss_weight,
                                   vae_config=pipe.vae_config, sample_posterior=sample_posterior,
                                   train_text_encoder=f.train_text_encoder,
                                   precision=prec["precision"], remat=prec["remat"])
    tc = TrainConfig.from_section(f, weight_decay=0.0, seed=config.seed,
                                  lora_alpha=float(f.lora_rank), **prec)
    params = {"unet": pipe.unet_params, "text_encoder": pipe.text_params}
    if pipe.vae_params is not None:
        params["vae"] = pipe.vae_params
    mesh = parallel.make_mesh(1) if f.batch_size % jax.device_count() else None
    trained, record = finetune(
        loss_fn, params, n_pairs, get_batch, tc, RunDir(run_dir).record.resolve(), mesh=mesh,
        progress=progress, model_info=model_info,
        dataset_info={"kind": "dreambooth pairs (instance j % n_inst, class j % n_class)",
                      "instance_ids": list(inst_ids), "instance_prompts": inst_prompts,
                      "class_prompts": class_prompts,
                      "prior_loss_weight": float(d.prior_loss_weight)})
    record.close()
    if not (e.enabled and concept is not None):
        return {}
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 202)
    eval_prompts = [fill(d.instance_prompt, "instance_prompt", i, bgs[i % len(bgs)])
                    for i in range(int(e.num_images))]
    metrics, rows, generated = {}, [], {}
    import dataclasses
    tuned = dataclasses.replace(pipe, unet_params=trained["unet"],
                                text_params=trained["text_encoder"])
    for name, model in (("base", pipe), ("finetuned", tuned)):
        acc, images = evaluate_concept(model, eval_prompts, concept, spec, key,
                                       num_inference_steps=e.num_inference_steps,
                                       guidance_scale=e.guidance_scale)
        save_npz(RunDir(run_dir).generations / f"{name}.npz", images=images,
                  prompts=np.array(eval_prompts))
        metrics.update({f"{name}_{k}_accuracy" if k != "empty" else f"{name}_empty_fraction":
                        v for k, v in acc.items()})
        rows.append({"model": name, **acc})
        generated[name] = images
    from jaxattrib.report.html import write_result
    write_result(run_dir, "dreambooth", f"DreamBooth: {d.concept} as '{d.identifier}'",
                 metrics=metrics, images=[generations_figure(run_dir, generated, concept, spec)],
                 tables=[{"caption": f"{len(eval_prompts)} generations per model for "
                          f"{d.instance_prompt!r} (backgrounds {list(d.backgrounds)}), "
                          f"classified by classify_concepts", "rows": rows}],
                 text=json.dumps({"instance_prompts": inst_prompts,
                                  "class_prompts": class_prompts[:4] + ["..."]}))
    return metrics


def generations_figure(run_dir, generated: dict, concept: dict, spec) -> dict:
    """Writes ``results/dreambooth_generations.png``: one row per model (``generated``: name ->
    ``[n, H, W, 3]`` pixels in [-1, 1]), each image labelled with what
    :func:`~jaxattrib.data.synthetic.classify_concepts` reads in it ('<color> <shape>', or
    'empty' without foreground) and framed green when that is ``concept`` (both colour and
    shape: the table's ``both``), red otherwise. Returns its ``{'path', 'caption'}``."""
    from jaxattrib.data.synthetic import classify_concepts
    from jaxattrib.report.images import GREEN, RED, image_grid, save_png
    from jaxattrib.runs.rundir import RunDir
    cells, labels, frames = [], [], []
    for name, images in generated.items():
        pred = classify_concepts(images, spec)
        for i, im in enumerate(images):
            color, shape = spec.colors[pred["color"][i]], spec.shapes[pred["shape"][i]]
            drawn = pred["foreground_fraction"][i] > 0
            hit = drawn and color == concept["color"] and shape == concept["shape"]
            cells.append(im)
            labels.append(f"{name} {i}\n" + (f"{color} {shape}" if drawn else "empty"))
            frames.append(GREEN if hit else RED)
    rel = f"{RunDir.RESULTS}/dreambooth_generations.png"
    save_png(RunDir(run_dir).results / "dreambooth_generations.png",
             image_grid(np.stack(cells), nrow=max(len(v) for v in generated.values()),
                        labels=labels, borders=frames))
    return {"path": rel, "caption": f"one row per model ({', '.join(generated)}): what the "
                                    f"classifier reads in each generation; green = "
                                    f"{concept['color']} {concept['shape']}, red = not"}


__all__ = ["dreambooth_run", "generations_figure"]
