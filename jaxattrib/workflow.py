"""Run-directory workflows behind ``jaxattrib train`` and ``jaxattrib attribute``.

A *run directory* written by :func:`train_run` holds ``config.json``, ``data/train.npz``
(images [N,H,W,3] in [-1,1], captions, ids) and the trajectory ``record/``. :func:`attribute_run`
featurizes that training set at the record's checkpoints and scores query images (a folder of
PNGs with ``prompts.txt``, as written by ``jaxattrib generate``), writing
``features/``, ``scores/<method>.npy`` ([Q, N], larger = more attributed), a top-k table and a
report section. Both are resumable: the record resumes from its last checkpoint, feature stores
by chunk.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jaxattrib.config import ConfigError


def _load_model(model: str):
    from jaxattrib.base_model import load_base_model
    from jaxattrib.models.pipeline import load_pipeline
    return load_base_model() if model in ("", "embedded") else load_pipeline(model)


def load_training_data(config):
    """The configured data set as an :class:`~jaxattrib.data.dataset.ImageDataset`."""
    d = config.data
    if d.source == "synthetic":
        from jaxattrib.base_model import data_spec
        from jaxattrib.data.synthetic import make_synthetic
        import dataclasses
        ds = make_synthetic(dataclasses.replace(data_spec(), size=d.size, per_combination=1),
                            seed=config.seed)
    elif d.source == "folder":
        from jaxattrib.data.folder import load_folder
        if not d.path:
            raise ConfigError("data.path: required for data.source='folder'")
        ds = load_folder(d.path, size=d.size, subjects=list(d.subjects) or None)
    elif d.source == "digits":
        from jaxattrib.data.digits import load_digits
        ds = load_digits(size=d.size)
    else:
        raise ConfigError(f"data.source={d.source!r}: expected 'synthetic', 'folder' or 'digits'")
    if d.max_examples and len(ds) > d.max_examples:
        idx = np.random.default_rng(config.seed).choice(len(ds), d.max_examples, replace=False)
        ds = ds.subset(np.sort(idx))
    return ds


def train_run(config, run_dir: str | Path, progress: bool = True):
    """Fine-tunes ``config.model`` on ``config.data`` into ``run_dir`` (resumable)."""
    from jaxattrib import parallel
    from jaxattrib.diffusion.schedule import schedule_from_diffusers_config
    from jaxattrib.train.diffusion_task import make_diffusion_loss
    from jaxattrib.train.finetune import TrainConfig, finetune
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "config.json"
    current = json.loads(config.to_json())
    if cfg_path.exists() and json.loads(cfg_path.read_text()) != current:
        raise ConfigError(f"{cfg_path}: run directory was made with another config; use a new "
                          f"--run-dir")
    cfg_path.write_text(json.dumps(current, indent=2, sort_keys=True))
    pipe = _load_model(config.model)
    ds = load_training_data(config)
    want = pipe.unet_config.sample_size * (1 if pipe.vae_config is None else
                                           2 ** (len(pipe.vae_config.block_out_channels) - 1))
    if ds.images.shape[1] != want:
        raise ConfigError(f"data.size={ds.images.shape[1]}: the model generates {want}x{want} "
                          f"images; set --set data.size={want}")
    data_path = run_dir / "data" / "train.npz"
    if not data_path.exists():
        data_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = data_path.with_suffix(".tmp.npz")
        np.savez(tmp, images=ds.images, captions=np.array(ds.captions), ids=np.array(ds.ids))
        tmp.replace(data_path)
    sched = schedule_from_diffusers_config(pipe.scheduler_config)
    f = config.finetune
    loss_fn = make_diffusion_loss(pipe.unet_config, pipe.text_config, sched, pipe.vae_config,
                                  train_text_encoder=f.train_text_encoder)
    ids = pipe.tokenizer(list(ds.captions), max_length=pipe.text_config.max_position_embeddings)
    images = np.asarray(ds.images)
    tc = TrainConfig(steps=f.steps, batch_size=f.batch_size, learning_rate=f.learning_rate,
                     schedule=f.schedule, seed=config.seed, checkpoint_every=f.checkpoint_every,
                     mode=f.mode, lora_rank=f.lora_rank, train_text_encoder=f.train_text_encoder)
    params = {"unet": pipe.unet_params, "text_encoder": pipe.text_params}
    if pipe.vae_params is not None:
        params["vae"] = pipe.vae_params
    mesh = parallel.make_mesh(1) if f.batch_size % len(__import__("jax").devices()) else None
    return finetune(loss_fn, params, len(images),
                    lambda idx: {"images": images[idx], "input_ids": ids[idx]}, tc,
                    (run_dir / "record").resolve(), mesh=mesh, progress=progress,
                    model_info={"model": str(config.model)},
                    dataset_info={"fingerprint": ds.fingerprint(), "ids": list(ds.ids)})


def read_queries(folder: str | Path) -> tuple[np.ndarray, list[str]]:
    """PNG images (sorted by name) and ``prompts.txt`` lines of a ``jaxattrib generate`` folder."""
    from PIL import Image
    folder = Path(folder)
    paths = sorted(folder.glob("*.png"))
    if not paths:
        raise ConfigError(f"{folder}: no PNG query images")
    prompts_file = folder / "prompts.txt"
    if not prompts_file.is_file():
        raise ConfigError(f"{prompts_file}: missing; expected one prompt per image")
    prompts = [p for p in prompts_file.read_text().splitlines() if p.strip()]
    if len(prompts) != len(paths):
        raise ConfigError(f"{prompts_file}: {len(prompts)} prompts for {len(paths)} images")
    imgs = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32) / 127.5 - 1.0
                     for p in paths])
    return imgs, prompts


def attribute_run(run_dir: str | Path, queries: str | Path, method: str = "dtrak", *,
                  k: int = 2048, params: str = "attn", num_timesteps: int = 10,
                  lam_ratio: float = 1.0, topk: int = 10, journey_step: int | None = None,
                  progress: bool = True) -> np.ndarray:
    """Scores ``[Q, N]`` of the run's training images for the query images; see module doc.

    ``method``: 'trak' | 'dtrak' | 'journey-trak' | 'tracin'. TRAK/D-TRAK/Journey use the
    latest checkpoint; TracIn sums over every checkpoint of the record with its learning rate.
    ``journey_step``: for Journey-TRAK, the sampling step of ``queries/trajectory.npz`` whose
    x̂0 is attributed (default: the last step, i.e. the final image).
    """
    from jaxattrib.attribution import diffusion_trak as dt
    from jaxattrib.attribution import trak as trak_lib
    from jaxattrib.diffusion.schedule import schedule_from_diffusers_config
    from jaxattrib.report.html import write_result
    from jaxattrib.train.record import TrajectoryRecord
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file() or not (run_dir / "data" / "train.npz").is_file():
        raise ConfigError(f"{run_dir}: not a training run directory (needs config.json and "
                          f"data/train.npz from `jaxattrib train`)")
    config = json.loads(config_path.read_text())
    pipe = _load_model(config.get("model", "embedded"))
    sched = schedule_from_diffusers_config(pipe.scheduler_config)
    data = np.load(run_dir / "data" / "train.npz")
    q_images, q_prompts = read_queries(queries)
    if q_images.shape[1:] != data["images"].shape[1:]:
        raise ConfigError(f"{queries}: query images are {q_images.shape[1:]}, training images "
                          f"{data['images'].shape[1:]}")
    record = TrajectoryRecord.open((run_dir / "record").resolve())
    steps = record.steps()
    ac = dt.AttributionConfig(method=method, k=k, params=params, num_timesteps=num_timesteps)
    train_ex = {"x0": data["images"], "ctx": np.asarray(pipe.encode_prompts(list(data["captions"])))}
    query_ex = {"x0": q_images, "ctx": np.asarray(pipe.encode_prompts(q_prompts))}
    fp_train = str(record.manifest.get("dataset", {}).get("fingerprint", "")) or \
        __import__("hashlib").sha256(data["images"].tobytes()).hexdigest()
    fp_query = __import__("hashlib").sha256(q_images.tobytes()).hexdigest()
    qname = Path(queries).resolve().name
    use_steps = steps[1:] if method == "tracin" else [steps[-1]]
    Phis, phis, lrs = [], [], []
    for s in use_steps:
        p = record.load(s)["unet"]
        out_fn = dt.make_train_out_fn(pipe.unet_config, sched, ac)
        base = run_dir / "features" / method / f"step_{s}"
        Phis.append(dt.featurize_examples(out_fn, p, train_ex, ac, base / "train",
                                          fingerprint=fp_train, step=s, progress=progress))
        if method == "journey-trak":
            traj = np.load(Path(queries) / "trajectory.npz")
            i = traj["x0_preds"].shape[1] - 1 if journey_step is None else journey_step
            tg = {"x0": traj["x0_preds"][:, i], "ctx": query_ex["ctx"],
                  "t": np.asarray(traj["timesteps"][:, i] if traj["timesteps"].ndim == 2
                                  else np.full(len(q_images), traj["timesteps"][i]), np.int32)}
            q_fn = dt.make_journey_target_out_fn(pipe.unet_config, sched, ac)
            phis.append(dt.featurize_examples(q_fn, p, tg, ac, base / f"queries_{qname}_{i}",
                                              fingerprint=fp_query, step=s, role="query",
                                              progress=progress))
        else:
            phis.append(dt.featurize_examples(out_fn, p, query_ex, ac,
                                              base / f"queries_{qname}", fingerprint=fp_query,
                                              step=s, role="query", progress=progress))
        if method == "tracin":
            lrs.append(record.step_info(s - 1)["lr"])
    if method == "tracin":
        scores = np.asarray(trak_lib.tracin_scores(Phis, phis, lrs)).T * ac.sign
    else:
        lam = dt.relative_lambdas(Phis[0], [lam_ratio])[0]
        scores = dt.scores_from_features(phis[0], Phis[0], lam, ac.sign)
    out = run_dir / "scores" / f"{method}_{qname}.npy"
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, scores.astype(np.float32))
    top = np.argsort(-scores, axis=1, kind="stable")[:, :topk]
    rows = [{"query": i, "prompt": q_prompts[i],
             "top": ", ".join(str(data["ids"][j]) for j in top[i])} for i in range(len(q_prompts))]
    write_result(run_dir, f"attribute_{method}_{qname}", f"{method} attribution of {qname}",
                 tables=[{"caption": f"top-{topk} training examples per query (checkpoint(s) "
                          f"{use_steps}, k={k}, params={params!r})", "rows": rows}])
    return scores
