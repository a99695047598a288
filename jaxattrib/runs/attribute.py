"""The ``attribute`` command: featurize a run's training set and score query images.

A *run directory* written by :func:`jaxattrib.runs.train.train_run` holds ``config.json``,
``data/source.json`` (or ``data/train.npz`` in older runs) and the trajectory ``record/``.
:func:`attribute_run` featurizes that training set at the record's checkpoints and scores query
images (a folder of PNGs with ``prompts.txt``, as written by ``jaxattrib generate``), writing
``features/``, ``scores/<method>.npy`` ([Q, N], larger = more attributed), a top-k table and a
report section. Resumable: feature stores resume by chunk.

Latent pipelines (docs/latents.md): attribution uses the VAE posterior mean
(:mod:`jaxattrib.diffusion.latents`); the training set is encoded once into ``latents/train``
(:mod:`jaxattrib.runs.latent_cache`, keyed by the data and VAE fingerprints).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np

from jaxattrib.attribution.method_names import ATTRIBUTE_DEFAULTS
from jaxattrib.config import ConfigError
from jaxattrib.fingerprint import raw_arrays
from jaxattrib.fingerprint import text as _sha  # recipe of stored latent feature-store keys
from jaxattrib.runs.config_check import check_attribution_fields, read_run_config
from jaxattrib.runs.rundir import RunDir
from jaxattrib.runs.specs import load_model

logger = logging.getLogger(__name__)


def read_queries(folder: str | Path) -> tuple[np.ndarray, list[str]]:
    """PNG images (sorted by name) and ``prompts.txt`` lines of a ``jaxattrib generate`` folder."""
    from PIL import Image
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder}: a file, not a folder of query PNGs + prompts.txt")
    paths = sorted(folder.glob("*.png"))
    if not paths:
        raise ConfigError(f"{folder}: no PNG query images")
    others = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() !=
                    ".png" and p.name not in ("prompts.txt", "trajectory.npz"))
    if others:
        logger.warning("%s: using the %d PNG files; ignoring %d other file(s): %s%s", folder,
                       len(paths), len(others), ", ".join(others[:5]),
                       " ..." if len(others) > 5 else "")
    prompts_file = folder / "prompts.txt"
    if not prompts_file.is_file():
        raise ConfigError(f"{prompts_file}: missing; expected one prompt per image")
    prompts = [p for p in prompts_file.read_text().splitlines() if p.strip()]
    if not prompts:
        raise ConfigError(f"{prompts_file}: empty; expected one prompt per image "
                          f"({len(paths)} lines)")
    if len(prompts) != len(paths):
        raise ConfigError(f"{prompts_file}: {len(prompts)} prompts for {len(paths)} images")
    imgs = []
    for p in paths:
        try:
            with Image.open(p) as im:
                imgs.append(np.asarray(im.convert("RGB"), np.float32) / 127.5 - 1.0)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{p}: not a readable PNG image ({e}); replace or remove it "
                              f"(and its line in prompts.txt)") from e
    shapes = sorted({im.shape for im in imgs})
    if len(shapes) > 1:
        raise ConfigError(f"{folder}: query images of different sizes {shapes}: expected one "
                          f"size (the training images')")
    return np.stack(imgs), prompts


class PromptRows:
    """Lazy ``[N, L, D]`` float32 text-encoder states of ``captions``: ``a[lo:hi]`` encodes
    those captions only (``pipe.encode_prompts``), so a featurization chunk never needs the
    whole set's states (``N × 77 × 768`` floats at SD-1.5 size)."""

    def __init__(self, pipe, captions):
        self.pipe, self.captions = pipe, list(captions)
        first = np.asarray(pipe.encode_prompts(self.captions[:1]))
        self.shape = (len(self.captions), *first.shape[1:])
        self.dtype, self.ndim = first.dtype, first.ndim

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, slice):
            caps = self.captions[key]
        else:
            caps = [self.captions[int(i)] for i in np.asarray(key).reshape(-1)]
        if not caps:
            return np.zeros((0, *self.shape[1:]), self.dtype)
        return np.asarray(self.pipe.encode_prompts(caps))


def source_examples(pipe, source) -> dict:
    """Featurization inputs of a training source, both lazy: ``{'x0': source.images`` (an
    :class:`~jaxattrib.data.source.ImageRows` ``[N, H, W, 3]``), ``'ctx':`` :class:`PromptRows`
    ``[N, L, D]}``; ``trak.featurize`` reads one chunk of rows at a time."""
    return {"x0": source.images, "ctx": PromptRows(pipe, source.captions)}




def attribution_defaults(run_dir: str | Path) -> dict:
    """``jaxattrib attribute`` defaults for a run: :data:`ATTRIBUTE_DEFAULTS` updated with the
    ``attribution`` section of the run's ``config.json`` (e.g. ``sd15_lora``'s attn2 / k).

    A run made before ``attribution.noise`` / ``checkpoints`` existed (its config has an
    ``attribution`` section without them) keeps what it did:
    :data:`jaxattrib.config.ATTRIBUTION_LEGACY` ('shared' noise, one checkpoint), so its
    feature stores keep resuming. A run whose config has no ``attribution`` section at all
    (e.g. ``finetune_folder``) takes the defaults ('shared' noise since 2026-12-07); feature
    stores made with the former default 'per_position' are then refused with a message that
    says to pass ``--noise per_position``."""
    from jaxattrib.config import ATTRIBUTION_LEGACY
    out = dict(ATTRIBUTE_DEFAULTS)
    path = RunDir(run_dir).config
    if path.is_file():
        sec = read_run_config(path).get("attribution") or {}
        if isinstance(sec, dict) and sec:
            for dotted, value in ATTRIBUTION_LEGACY.items():
                if dotted.split(".", 1)[1] in out:     # (not Concept-TRAK's: not options here)
                    out[dotted.split(".", 1)[1]] = value   # overridden below when the run has it
        out.update({k: v for k, v in sec.items() if k in out})
    return out


class TrainingExamples(NamedTuple):
    """A run's training set as the UNet sees it (see :func:`training_examples`).

    ``examples``: ``{'x0': [N, h, w, c] float32 (VAE latents for latent pipelines, pixels
    otherwise), 'ctx': [N, L, D] text states}``; ``fingerprint``: key of feature stores made
    from it (data fingerprint, plus the latent rule and VAE fingerprint for latent pipelines);
    ``ids``, ``captions``: ``[N]``; ``images``: the pixel images ``[N, H, W, 3]`` (for reports)."""
    examples: dict
    fingerprint: str
    ids: np.ndarray
    captions: np.ndarray
    images: np.ndarray




def _require_run(run_dir: Path) -> dict:
    config_path = RunDir(run_dir).config
    from jaxattrib.data.run_data import has_run_data
    if not config_path.is_file() or not has_run_data(run_dir):
        raise ConfigError(f"{run_dir}: not a training run directory (needs config.json and "
                          f"data/source.json or data/train.npz from `jaxattrib train`)")
    return read_run_config(config_path)


def load_run_pipeline(run_dir: str | Path):
    """The pipeline a run was trained from (``model`` of its ``config.json``)."""
    return load_model(_require_run(Path(run_dir)).get("model", "embedded"))


def training_examples(run_dir: str | Path, pipe=None, *, progress: bool = True,
                      batch_size: int = 16, data=None) -> TrainingExamples:
    """The run's training set in the UNet's space, for featurization.

    The training data is the source ``data/source.json`` references (its fingerprint checked,
    :class:`~jaxattrib.data.run_data.DataChangedError` naming the path when it changed), or the
    copy ``data/train.npz`` of older runs. Pixel pipelines: its images, read lazily per
    featurization chunk. Latent pipelines: their VAE latents
    (posterior mean × scaling factor, :data:`jaxattrib.diffusion.latents.LATENT_RULE`), encoded
    once into the resumable store ``RUN/latents/train`` keyed by the data and VAE fingerprints
    (:mod:`jaxattrib.runs.latent_cache`; a store for other data or another VAE is refused), read
    back on later calls; the store is filled from the source's batches (:func:`~jaxattrib.data.source.
    iter_batches`), never the whole pixel set at once. Text states are encoded per chunk
    (:class:`PromptRows`); ``images`` is lazy (:class:`~jaxattrib.data.source.ImageRows`).
    ``data``: the run's source when already opened (:func:`~jaxattrib.data.run_data.
    open_run_data`). Errors (wrong image size for the model, refused cache) are
    :class:`ConfigError`."""
    from jaxattrib.diffusion import latents as lat
    from jaxattrib.data.run_data import LEGACY_FILE, SOURCE_FILE, open_run_data
    from jaxattrib.data.source import iter_batches
    from jaxattrib.runs.latent_cache import cached_training_latents
    run_dir = Path(run_dir)
    _require_run(run_dir)
    pipe = load_run_pipeline(run_dir) if pipe is None else pipe
    data = open_run_data(run_dir) if data is None else data   # pixels are read per chunk
    images, captions, ids = data.images, np.asarray(data.captions), np.asarray(data.ids)
    where = LEGACY_FILE if (run_dir / LEGACY_FILE).is_file() else SOURCE_FILE
    lat.check_pixel_images((len(data), *data.image_shape), pipe.unet_config, pipe.vae_config,
                           f"{run_dir / where} images")
    manifest = RunDir(run_dir).record / "manifest.json"
    fp, trained = "", {}
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        fp, trained = str(m.get("dataset", {}).get("fingerprint", "")), m.get("model", {})
    fp = fp or data.fingerprint()
    if pipe.is_latent:
        vfp = lat.vae_fingerprint(pipe.vae_config, pipe.vae_params)
        if trained.get("vae_fingerprint", vfp) != vfp:
            raise ConfigError(f"{pipe.folder}/vae: its weights (fingerprint {vfp[:12]}…) are not "
                              f"those {run_dir} was trained with ({manifest}: vae_fingerprint "
                              f"{trained['vae_fingerprint'][:12]}…); attribute with the "
                              f"model folder the run was made from")
        batches = ((int(lo), b["images"]) for lo, b in zip(
            range(0, len(data), batch_size), iter_batches(data, batch_size)))
        x0 = np.asarray(cached_training_latents(run_dir, pipe, len(data), batches,
                                                data_fingerprint=fp,
                                                vae_fingerprint=vfp, progress=progress),
                        np.float32)
        fp = _sha(fp, f"latents={lat.LATENT_RULE}", vfp)
    else:
        x0 = images
    return TrainingExamples({"x0": x0, "ctx": PromptRows(pipe, captions)}, fp, ids, captions,
                            images)


def feature_dir(run_dir: str | Path, method: str, step: int) -> Path:
    """Folder of the feature stores of ``method`` at checkpoint ``step`` (``train`` and
    ``queries_<name>`` inside)."""
    return RunDir(run_dir).feature_dir(method, step)


def featurize_training_set(run_dir: str | Path, config, step: int, *, pipe=None,
                           train: TrainingExamples | None = None, record=None, mesh=None,
                           progress: bool = True, chunk_size: int = 64, on_progress=None,
                           log=None) -> np.ndarray:
    """Projected gradient features ``[N, k]`` of the run's training set at checkpoint ``step``.

    ``config``: a :class:`jaxattrib.attribution.diffusion_trak.AttributionConfig`. Writes the
    resumable store ``feature_dir(run_dir, config.method, step) / 'train'`` (chunked; a killed
    call resumes; a store made with other settings, data or VAE is refused with
    :class:`~jaxattrib.attribution.store.StoreMismatchError`). ``pipe`` (default: the run's
    model), ``train`` (default: :func:`training_examples`) and ``record`` (default: the run's
    record, opened read-only) may be passed to avoid reloading them. ``mesh``, ``chunk_size``,
    ``on_progress``, ``log``: see :func:`jaxattrib.attribution.diffusion_trak.featurize_examples`
    (on several processes, call it on every process: each writes its share of the chunks)."""
    from jaxattrib.attribution import diffusion_trak as dt
    from jaxattrib.attribution import methods
    from jaxattrib.diffusion.schedule import schedule_from_diffusers_config
    from jaxattrib.train.record import TrajectoryRecord
    run_dir = Path(run_dir)
    pipe = load_run_pipeline(run_dir) if pipe is None else pipe
    train = training_examples(run_dir, pipe, progress=progress) if train is None else train
    record = TrajectoryRecord.open(RunDir(run_dir).record.resolve()) if record is None else record
    if step not in record.steps():
        raise ConfigError(f"{run_dir / 'record'}: no checkpoint at step {step} (has "
                          f"{record.steps()})")
    sched = schedule_from_diffusers_config(pipe.scheduler_config)
    out_fn = methods.train_out_fn(config.method, pipe.unet_config, sched, config)
    return dt.featurize_examples(out_fn, record.load(step)["unet"], train.examples, config,
                                 feature_dir(run_dir, config.method, step) / "train",
                                 fingerprint=train.fingerprint, step=step, mesh=mesh,
                                 progress=progress, chunk_size=chunk_size,
                                 on_progress=on_progress, log=log)


def attribute_run(run_dir: str | Path, queries: str | Path, method: str = "dtrak", *,
                  k: int = 2048, params: str = "attn", num_timesteps: int = 10,
                  lam_ratio: float = 1.0, topk: int = 10, journey_step: int | None = None,
                  projection: str = "rademacher", microbatch: int = 8,
                  precision: str = "float32", remat: str = "none",
                  matmul_precision: str = "default", chunk_size: int = 64,
                  noise: str = "shared", checkpoints=None,
                  progress: bool = True, mesh=None, on_progress=None) -> np.ndarray | None:
    """Scores ``[Q, N]`` of the run's training images for the query images; see module doc.

    ``method``: 'trak' | 'dtrak' | 'journey-trak' | 'tracin'. TRAK/D-TRAK/Journey score with a
    checkpoint ensemble: ``checkpoints`` = an int M (the last M checkpoints after step 0), a
    list of steps, or None (the method's default, D-TRAK 1, TRAK / Journey-TRAK 3:
    :data:`~jaxattrib.attribution.diffusion_trak.DEFAULT_CHECKPOINTS`); the scores are the
    mean of the checkpoints' scores, each with its own features and λ
    (:func:`~jaxattrib.attribution.diffusion_trak.ensemble_scores`). TracIn sums over every
    checkpoint of the record with its learning rate (``checkpoints`` unused). ``noise``:
    'per_position' | 'per_example' | 'shared' (TRAK / D-TRAK / TracIn features; see
    :class:`~jaxattrib.attribution.diffusion_trak.AttributionConfig`).
    ``journey_step``: for Journey-TRAK, the sampling step of ``queries/trajectory.npz`` whose
    x̂0 is attributed (default: the last step, i.e. the final image). ``precision`` /
    ``remat`` / ``matmul_precision``: see :class:`~jaxattrib.attribution.diffusion_trak.
    AttributionConfig` and docs/precision.md.

    Latent pipelines: training images come from the run's latent cache
    (:func:`training_examples`), query PNGs are encoded with the same rule, and Journey-TRAK's
    trajectory must hold latents (``jaxattrib generate --trajectory`` writes them in the
    UNet's space). The report section shows each query (for Journey-TRAK the VAE-decoded x̂0 of
    the attributed step) and its top training images, in pixels.

    ``queries=None``: only featurize the training set (returns None). ``chunk_size``: rows
    per store chunk (the unit of resumption and of the work dealt to processes; a store keeps
    the chunk size it was created with). ``mesh``: devices to featurize on (default: the
    first device). Multi-process (``python -m jaxattrib.launch attribute``, docs/scaling.md):
    call on every process with the same arguments; each process computes and writes its share
    of each store's chunks (latents and features, see
    :func:`jaxattrib.attribution.trak.featurize`), then process 0 alone scores and writes the
    results; the other processes return None. Progress (per microbatch, rate, ETA) is logged
    to ``run_dir/logs/attribute.log`` (process p > 0: ``attribute.process<p>.log``);
    ``on_progress(n)`` is called after every microbatch of ``n`` examples.
    """
    import jax

    from jaxattrib import precision as prec
    from jaxattrib.progress import StageLog
    prec.check_fields({"precision": precision, "remat": remat,
                       "matmul_precision": matmul_precision}, "attribute")  # before loading
    run_dir = Path(run_dir)
    _require_run(run_dir)
    with StageLog(run_dir, "attribute") as log:
        log(f"method={method} k={k} params={params!r} timesteps={num_timesteps} "
            f"projection={projection} microbatch={microbatch} chunk_size={chunk_size} "
            f"precision={precision} remat={remat} matmul_precision={matmul_precision} "
            f"noise={noise} checkpoints={checkpoints} "
            f"queries={queries} processes={jax.process_count()} "
            f"devices={1 if mesh is None else mesh.size}")
        return _attribute_run(run_dir, queries, method, k=k, params=params,
                              num_timesteps=num_timesteps, lam_ratio=lam_ratio, topk=topk,
                              journey_step=journey_step, projection=projection,
                              microbatch=microbatch, precision=precision, remat=remat,
                              matmul_precision=matmul_precision, chunk_size=chunk_size,
                              noise=noise, checkpoints=checkpoints,
                              progress=progress, mesh=mesh, on_progress=on_progress, log=log)


def _attribute_run(run_dir, queries, method, *, k, params, num_timesteps, lam_ratio, topk,
                   journey_step, projection, microbatch, precision, remat, matmul_precision,
                   chunk_size, noise, checkpoints, progress, mesh, on_progress, log):
    import jax

    from jaxattrib.attribution import diffusion_trak as dt
    from jaxattrib.attribution.methods import method_scores, query_out_fn
    from jaxattrib.diffusion import latents as lat
    from jaxattrib.diffusion.schedule import schedule_from_diffusers_config
    from jaxattrib.train.record import TrajectoryRecord
    run_dir = Path(run_dir)
    config = _require_run(run_dir)
    check_attribution_fields({"method": method, "k": k, "params": params,
                              "num_timesteps": num_timesteps, "projection": projection,
                              "microbatch": microbatch, "lam_ratio": lam_ratio, "topk": topk,
                              "chunk_size": chunk_size, "noise": noise,
                              "checkpoints": checkpoints}, "attribute")
    from jaxattrib.data.run_data import open_run_data
    data = open_run_data(run_dir)   # reference and fingerprint checked; pixels read per chunk
    if queries is not None:
        q_images, q_prompts = read_queries(queries)
        if q_images.shape[1:] != tuple(data.image_shape):
            hw = "x".join
            raise ConfigError(f"{queries}: query images are {q_images.shape[1:]} "
                              f"({hw(map(str, q_images.shape[1:]))}), training images "
                              f"{tuple(data.image_shape)} ({hw(map(str, data.image_shape))}) "
                              f"(H, W, C): generate the queries with the run's model, or resize "
                              f"them")
        if method == "journey-trak" and not (Path(queries) / "trajectory.npz").is_file():
            raise ConfigError(f"{Path(queries) / 'trajectory.npz'}: missing; journey-trak needs "
                              f"the sampling trajectory (`jaxattrib generate --trajectory`)")
    record = TrajectoryRecord.open(RunDir(run_dir).record.resolve())
    steps = record.steps()
    if not steps:
        raise ConfigError(f"{run_dir / 'record'}: no checkpoint yet; run `jaxattrib train` "
                          f"first")
    if method == "tracin":
        use_steps = steps[1:]
    else:
        try:
            use_steps = dt.ensemble_steps(checkpoints, steps, method)
        except ValueError as e:
            raise ConfigError(f"attribute: {e}") from e
    pipe = load_model(config.get("model", "embedded"))
    sched = schedule_from_diffusers_config(pipe.scheduler_config)
    if queries is not None:
        lat.check_pixel_images(q_images.shape, pipe.unet_config, pipe.vae_config,
                               f"{queries}: query images")
    ac = dt.AttributionConfig(method=method, k=k, params=params, num_timesteps=num_timesteps,
                              projection=projection, microbatch=microbatch,
                              precision=precision, remat=remat,
                              matmul_precision=matmul_precision, noise=noise)
    train = training_examples(run_dir, pipe, progress=progress, data=data)
    fkw = dict(progress=progress, mesh=mesh, on_progress=on_progress, log=log,
               chunk_size=chunk_size)
    if queries is None:  # the training features only
        for s in use_steps:
            featurize_training_set(run_dir, ac, s, pipe=pipe, train=train, record=record, **fkw)
        log(f"features of {len(train.ids)} training examples at checkpoint(s) {use_steps} "
            f"complete")
        return None
    q_ctx = np.asarray(pipe.encode_prompts(q_prompts))
    query_ex = {"x0": lat.encode_images(pipe.vae_config, pipe.vae_params, q_images),
                "ctx": q_ctx}
    fp_query = raw_arrays(q_images)
    if pipe.is_latent:
        fp_query = _sha(fp_query, f"latents={lat.LATENT_RULE}",
                        lat.vae_fingerprint(pipe.vae_config, pipe.vae_params))
    qname = Path(queries).resolve().name
    shown = q_images
    if method == "journey-trak":
        traj_path = Path(queries) / "trajectory.npz"     # presence checked before loading
        traj = dict(np.load(traj_path))
        x0s = traj["x0_preds"]
        lat.check_model_input(x0s.shape, pipe.unet_config, pipe.vae_config,
                              f"{traj_path} x0_preds")
        if x0s.shape[0] != len(q_images):
            raise ConfigError(f"{traj_path}: x0_preds has {x0s.shape[0]} trajectories for "
                              f"{len(q_images)} query images")
        i = x0s.shape[1] - 1 if journey_step is None else journey_step
        if not -x0s.shape[1] <= i < x0s.shape[1]:
            raise ConfigError(f"--journey-step={i}: the trajectory has {x0s.shape[1]} steps")
        from jaxattrib.diffusion.sampling import Trajectory
        tg = dt.journey_targets(Trajectory(timesteps=traj["timesteps"], xs=None,
                                           x0_preds=x0s), q_ctx, i)
        shown = lat.decode_latents(pipe.vae_config, pipe.vae_params, x0s[:, i])
    Phis, phis, lrs = [], [], []
    for s in use_steps:
        Phis.append(featurize_training_set(run_dir, ac, s, pipe=pipe, train=train,
                                           record=record, **fkw))
        p = record.load(s)["unet"]
        base = feature_dir(run_dir, method, s)
        if method == "journey-trak":
            q_fn = query_out_fn(method, pipe.unet_config, sched, ac)
            phis.append(dt.featurize_examples(q_fn, p, tg, ac, base / f"queries_{qname}_{i}",
                                              fingerprint=fp_query, step=s, role="query",
                                              **fkw))
        else:
            out_fn = query_out_fn(method, pipe.unet_config, sched, ac)
            phis.append(dt.featurize_examples(out_fn, p, query_ex, ac,
                                              base / f"queries_{qname}", fingerprint=fp_query,
                                              step=s, role="query", **fkw))
        if method == "tracin":
            lrs.append(record.step_info(s - 1)["lr"])
    if jax.process_index() != 0:  # process 0 scores and writes the results
        log(f"features at checkpoint(s) {use_steps} complete; process 0 scores")
        return None
    log(f"scoring {len(q_prompts)} queries against {len(train.ids)} training examples")
    # TracIn: Σ over checkpoints with their learning rates; the others: one checkpoint or the
    # mean over the ensemble's checkpoints
    scores = method_scores(method, phis, Phis, lam_ratio=lam_ratio,
                           learning_rates=lrs if method == "tracin" else None)
    out = RunDir(run_dir).scores / f"{method}_{qname}.npy"
    out.parent.mkdir(parents=True, exist_ok=True)
    from jaxattrib.fileio import atomic_save_npy
    atomic_save_npy(out, scores.astype(np.float32))
    _write_attribution_section(run_dir, method, qname, scores, q_prompts, shown, train, topk,
                               f"checkpoint(s) {use_steps}, k={k}, params={params!r}",
                               f"decoded x0, step {i}" if method == "journey-trak"
                               else "query")
    log(f"scores written to {out}")
    return scores


def _write_attribution_section(run_dir: Path, method: str, qname: str, scores: np.ndarray,
                               prompts, shown: np.ndarray, train: TrainingExamples, topk: int,
                               settings: str, query_label: str) -> None:
    """``results/attribute_<method>_<qname>.json``: per query, its top-k training ids *with
    their scores* (table) and one image row (the query in pixels, labelled ``query <i>``,
    then its top training images in pixels with id and score under each). Blank queries
    (:func:`jaxattrib.report.images.blank_mask`) are marked in the table."""
    from jaxattrib.report.html import write_result
    from jaxattrib.report.images import BLANK_STD, blank_mask, save_png, topk_image
    top = np.argsort(-scores, axis=1, kind="stable")[:, :topk]
    blank = blank_mask(np.clip(shown, -1, 1))
    rows = [{"query": i, "prompt": prompts[i],
             f"top-{topk} training ids (score)": ", ".join(
                 f"{train.ids[j]} ({scores[i, j]:.4g})" for j in top[i]),
             **({"blank query": bool(blank[i])} if blank.any() else {})}
            for i in range(len(prompts))]
    name = f"attribute_{method}_{qname}"
    labels = [str(x) for x in train.ids]
    kk = min(topk, 8, len(labels))

    def row(q):   # reads only this query's top training images (train.images may be lazy)
        sel = np.sort(top[q, :kk])
        lab = f"query {q}" if query_label == "query" else f"query {q}\n{query_label}"
        return topk_image(np.clip(shown[q], -1, 1), np.asarray(train.images[sel]),
                          scores[q][sel], k=kk, labels=[labels[j] for j in sel],
                          query_label=lab + ("\nBLANK" if blank[q] else ""))[0]
    grid = np.concatenate([row(q) for q in range(len(prompts))], axis=0)
    rel = Path(RunDir.RESULTS) / f"{name}_topk.png"
    save_png(run_dir / rel, grid)
    n_blank = int(blank.sum())
    write_result(run_dir, name, f"{method} attribution of {qname}",
                 tables=[{"caption": f"top-{topk} training examples per query, best first, "
                                     f"with their {method} scores (larger = more attributed; "
                                     f"{settings})",
                          "rows": rows}],
                 images=[{"path": rel.as_posix(),
                          "caption": f"row i: query i ({query_label}, left) and its top "
                                     f"{kk} training images (pixels), id and score under each"}],
                 **({"text": f"{n_blank} of {len(prompts)} queries are blank (pixel std "
                             f"below {BLANK_STD:g}, pixels in [-1, 1]): their attributions say "
                             f"nothing about the training data."} if n_blank else {}))


__all__ = ["ATTRIBUTE_DEFAULTS", "PromptRows", "TrainingExamples", "attribute_run",
           "attribution_defaults", "feature_dir", "featurize_training_set", "load_run_pipeline",
           "read_queries", "source_examples", "training_examples"]
