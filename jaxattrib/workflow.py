"""Run-directory workflows behind ``jaxattrib train`` and ``jaxattrib attribute``.

A *run directory* written by :func:`train_run` holds ``config.json``, ``data/source.json`` (a
reference to the training data with its fingerprint, not a copy; older runs hold
``data/train.npz`` instead, see :mod:`jaxattrib.data.run_data`) and the trajectory
``record/``. :func:`attribute_run`
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


DATA_SOURCES = ("synthetic", "folder", "digits", "tfds")
# data.* fields added after run directories existed: a stored config.json without them is
# compared as if it had these values, so such runs keep resuming
_NEW_DATA_FIELDS = {"name": "", "split": "train", "caption_key": ""}


def load_training_data(config):
    """The configured training set as a :class:`~jaxattrib.data.source.DataSource` (pixels
    are read on demand; ``len()``, ``ids``, ``captions``, ``fingerprint()``, ``read(idx)``).

    ``data.source``: 'synthetic' (the base model's concept spec at ``data.size``, one image per
    combination, seed = ``config.seed``), 'folder' (``data.path``, ``data.subjects``), 'digits',
    or 'tfds' (``data.name`` prepared as array_record in ``data.path`` = its ``data_dir``,
    ``data.split``, captions from ``data.caption_key`` or the class name). ``data.max_examples``
    keeps a random subset (seed = ``config.seed``) in data set order.
    """
    from jaxattrib.data import source as S
    d = config.data
    if d.source == "synthetic":
        from jaxattrib.base_model import data_spec
        import dataclasses
        src = S.SyntheticSource(dataclasses.replace(data_spec(), size=d.size, per_combination=1),
                                seed=config.seed)
    elif d.source == "folder":
        if not d.path:
            raise ConfigError("data.path: required for data.source='folder'")
        src = S.FolderSource(d.path, d.size, subjects=list(d.subjects) or None)
    elif d.source == "digits":
        src = S.DigitsSource(size=d.size)
    elif d.source == "tfds":
        name = str(_field(d, "name", "") or "")
        if not name or not d.path:
            raise ConfigError("data.source='tfds' needs data.name (the tfds name) and data.path "
                              "(the data_dir it was prepared in, as array_record)")
        try:
            src = S.TfdsSource(name, str(_field(d, "split", "train")), d.path, d.size,
                               caption_key=str(_field(d, "caption_key", "") or "") or None)
        except ImportError as e:
            raise ConfigError(f"data.source='tfds': {e}") from e
    else:
        raise ConfigError(f"data.source={d.source!r}: expected one of {DATA_SOURCES}")
    if d.max_examples and len(src) > d.max_examples:
        idx = np.random.default_rng(config.seed).choice(len(src), d.max_examples, replace=False)
        src = src.subset(np.sort(idx))
    return src


_PRECISIONS = ("float32",)


def _field(config, dotted: str, default=None):
    node = config
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            return default
        node = node[part]
    return node


def check_train_config(config, source: str = "config") -> None:
    """Checks a fine-tuning config (``finetune_folder``, ``sd15_lora``, ``sd21`` layout) before
    anything is loaded; raises :class:`ConfigError` naming the field and what was expected.

    Optional fields (``finetune.warmup_steps``, ``lora_alpha``, ``lora_target``, ``precision``,
    ``model_prediction_type``, ``attribution.*``) are checked when present.
    """
    import re

    def bad(field, value, expected):
        raise ConfigError(f"{source}: {field}={value!r}: expected {expected}")

    model = str(_field(config, "model", ""))
    if not model and _field(config, "model_prediction_type") is not None:
        raise ConfigError(f"{source}: model is empty: set --set model=/path/to/a/local/diffusers"
                          f"/folder (nothing is downloaded)")
    d = config.data
    if d.source not in DATA_SOURCES:
        bad("data.source", d.source, " or ".join(repr(x) for x in DATA_SOURCES))
    if d.source == "tfds" and not (_field(d, "name", "") and d.path):
        raise ConfigError(f"{source}: data.source='tfds' needs data.name (a tfds name, e.g. "
                          f"'mnist') and data.path (the data_dir where it was prepared with "
                          f"`tfds build NAME --data_dir DIR --file_format=array_record`)")
    if d.source == "tfds" and not Path(d.path).is_dir():
        bad("data.path", d.path, "an existing folder (the tfds data_dir)")
    if d.source == "folder" and not d.path:
        raise ConfigError(f"{source}: data.path is empty: required for data.source='folder' "
                          f"(a DreamBooth-layout image folder)")
    if d.source == "folder" and not Path(d.path).is_dir():
        bad("data.path", d.path, "an existing folder")
    if not isinstance(d.size, int) or d.size < 1:
        bad("data.size", d.size, "a positive integer (image side in pixels)")
    if not isinstance(d.max_examples, int) or d.max_examples < 0:
        bad("data.max_examples", d.max_examples, "an integer >= 0 (0 = all)")
    f = config.finetune
    for name, lo in (("steps", 0), ("batch_size", 1), ("checkpoint_every", 0),
                     ("lora_rank", 1), ("warmup_steps", 0)):
        v = _field(f, name)
        if v is not None and (not isinstance(v, int) or v < lo):
            bad(f"finetune.{name}", v, f"an integer >= {lo}")
    if not f.learning_rate > 0:
        bad("finetune.learning_rate", f.learning_rate, "a positive number")
    if f.schedule not in ("constant", "cosine", "linear"):
        bad("finetune.schedule", f.schedule, "'constant', 'cosine' or 'linear'")
    if f.mode not in ("full", "lora"):
        bad("finetune.mode", f.mode, "'full' or 'lora'")
    if _field(f, "lora_target") is not None:
        try:
            re.compile(f.lora_target)
        except re.error as e:
            bad("finetune.lora_target", f.lora_target, f"a regular expression ({e})")
    prec = _field(f, "precision", "float32")
    if prec not in _PRECISIONS:
        raise ConfigError(f"{source}: finetune.precision={prec!r}: only {_PRECISIONS} is "
                          f"supported (the training step has no mixed-precision path yet)")
    pt = _field(config, "model_prediction_type")
    if pt is not None and pt not in ("epsilon", "v_prediction", "sample"):
        bad("model_prediction_type", pt, "'epsilon', 'v_prediction' or 'sample'")
    nd = _field(config, "num_devices")
    if nd is not None and (not isinstance(nd, int) or nd < 0):
        bad("num_devices", nd, "an integer >= 0 (0 = every device)")
    if _field(config, "attribution") is not None:
        check_attribution_fields(config.attribution, f"{source}: attribution")


def check_attribution_fields(a, where: str = "attribution") -> None:
    """Checks a D-TRAK-family attribution section (method, params, k, projection, ...)."""
    import re
    from jaxattrib.attribution.diffusion_trak import METHODS
    from jaxattrib.attribution.projection import KINDS
    checks = (("method", lambda v: v in METHODS, f"one of {METHODS}"),
              ("projection", lambda v: v in KINDS[:3], f"one of {KINDS[:3]}"),
              ("k", lambda v: isinstance(v, int) and v >= 1, "a positive integer"),
              ("num_timesteps", lambda v: isinstance(v, int) and v >= 1, "a positive integer"),
              ("microbatch", lambda v: isinstance(v, int) and v >= 1, "a positive integer"),
              ("topk", lambda v: isinstance(v, int) and v >= 1, "a positive integer"),
              ("lam_ratio", lambda v: isinstance(v, (int, float)) and v > 0,
               "a positive number"))
    for name, ok, expected in checks:
        if name in a and not ok(a[name]):
            raise ConfigError(f"{where}.{name}={a[name]!r}: expected {expected}")
    spec = a["params"] if "params" in a else "all"
    if spec != "all":
        try:
            re.compile(spec)
        except re.error as e:
            raise ConfigError(f"{where}.params={spec!r}: expected 'all' or a regular "
                              f"expression ({e})") from e


def check_pipeline_matches(config, pipe, source: str = "config") -> None:
    """The loaded pipeline's scheduler ``prediction_type`` equals ``model_prediction_type``."""
    want = _field(config, "model_prediction_type")
    got = pipe.scheduler_config.get("prediction_type", "epsilon")
    if want is not None and got != want:
        raise ConfigError(
            f"{source}: model_prediction_type={want!r} but {pipe.folder}/scheduler/"
            f"scheduler_config.json has prediction_type={got!r}; this config is for "
            f"{want!r} models (use the config written for this model, or --set "
            f"model_prediction_type={got!r} if the folder is right)")


def train_run(config, run_dir: str | Path, progress: bool = True, mesh=None):
    """Fine-tunes ``config.model`` on ``config.data`` into ``run_dir`` (resumable).

    ``mesh``: the data mesh (default: every device, or one device when the batch does not
    divide); on several processes only process 0 writes ``config.json`` and ``data/``.
    """
    import jax

    from jaxattrib import parallel
    from jaxattrib.diffusion.schedule import schedule_from_diffusers_config
    from jaxattrib.models.lora import TEXT_ATTENTION_TARGET, UNET_ATTENTION_TARGET
    from jaxattrib.train.diffusion_task import make_diffusion_loss
    from jaxattrib.train.finetune import TrainConfig, finetune
    check_train_config(config)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "config.json"
    current = json.loads(config.to_json())
    stored = json.loads(cfg_path.read_text()) if cfg_path.exists() else None
    if isinstance(stored, dict) and isinstance(stored.get("data"), dict):
        for k, v in _NEW_DATA_FIELDS.items():
            if k not in stored["data"] and current.get("data", {}).get(k) == v:
                stored["data"][k] = v
    if stored is not None and stored != current:
        raise ConfigError(f"{cfg_path}: run directory was made with another config; use a new "
                          f"--run-dir")
    writer = jax.process_index() == 0
    if writer:
        from jaxattrib.fileio import atomic_write_text
        atomic_write_text(cfg_path, json.dumps(current, indent=2, sort_keys=True))
    pipe = _load_model(config.model)
    check_pipeline_matches(config, pipe)
    ds, dataset_info = _run_training_data(config, run_dir, writer)
    want = model_image_size(pipe)
    if ds.image_shape[0] != want:
        raise ConfigError(f"data.size={ds.image_shape[0]}: the model generates {want}x{want} "
                          f"images; set --set data.size={want}")
    sched = schedule_from_diffusers_config(pipe.scheduler_config)
    f = config.finetune
    loss_fn = make_diffusion_loss(pipe.unet_config, pipe.text_config, sched, pipe.vae_config,
                                  train_text_encoder=f.train_text_encoder)
    ids = pipe.tokenizer(list(ds.captions), max_length=pipe.text_config.max_position_embeddings)
    tc = TrainConfig(steps=f.steps, batch_size=f.batch_size, learning_rate=f.learning_rate,
                     schedule=f.schedule, seed=config.seed, checkpoint_every=f.checkpoint_every,
                     mode=f.mode, lora_rank=f.lora_rank, train_text_encoder=f.train_text_encoder,
                     warmup_steps=_field(f, "warmup_steps", 0),
                     lora_alpha=float(_field(f, "lora_alpha", 4.0)),
                     lora_target=_field(f, "lora_target",
                                        f"{UNET_ATTENTION_TARGET}|{TEXT_ATTENTION_TARGET}"))
    params = {"unet": pipe.unet_params, "text_encoder": pipe.text_params}
    if pipe.vae_params is not None:
        params["vae"] = pipe.vae_params
    if mesh is None:
        nd = _field(config, "num_devices", 0) or None
        mesh = parallel.make_mesh(nd) if f.batch_size % (nd or len(jax.devices())) == 0 \
            else parallel.make_mesh(1)
    # pixels are read per step (this process's rows only), ahead of the step by grain threads
    return finetune(loss_fn, params, len(ds),
                    lambda idx: {"images": ds.read(idx), "input_ids": ids[idx]}, tc,
                    (run_dir / "record").resolve(), mesh=mesh, progress=progress,
                    model_info={"model": str(config.model)}, dataset_info=dataset_info,
                    prefetch=2)


def _run_training_data(config, run_dir: Path, writer: bool):
    """The run's training source and the manifest's ``dataset`` entry.

    A run directory holding ``data/train.npz`` (made before data were referenced) trains on
    that copy, with the manifest entry it always had. Otherwise the configured source is
    referenced in ``data/source.json`` (written once, by process 0); on resume its fingerprint
    must equal the recorded one (:class:`~jaxattrib.data.run_data.DataChangedError` naming the
    data's path otherwise).
    """
    from jaxattrib.data import run_data
    from jaxattrib.data.source import NpzSource
    legacy = run_dir / run_data.LEGACY_FILE
    if legacy.is_file():
        ds = NpzSource(legacy)
        return ds, {"fingerprint": ds.fingerprint(), "ids": list(ds.ids)}
    ds = load_training_data(config)
    ref = run_dir / run_data.SOURCE_FILE
    if ref.is_file():
        run_data.check_same_data(run_data.read_run_data_ref(run_dir), ds, ref)
    elif writer:
        run_data.write_run_data(run_dir, ds)
    return ds, {"fingerprint": ds.fingerprint(), "ids": list(ds.ids),
                "reference": run_data.SOURCE_FILE.as_posix(), "kind": ds.kind,
                "order": "steps.jsonl 'indices' of each update index these ids"}


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


def training_examples(pipe, source) -> dict:
    """Featurization inputs of a training source, both lazy: ``{'x0': source.images`` (an
    :class:`~jaxattrib.data.source.ImageRows` ``[N, H, W, 3]``), ``'ctx':`` :class:`PromptRows`
    ``[N, L, D]}``; ``trak.featurize`` reads one chunk of rows at a time."""
    return {"x0": source.images, "ctx": PromptRows(pipe, source.captions)}


ATTRIBUTE_DEFAULTS = {"method": "dtrak", "k": 2048, "params": "attn", "num_timesteps": 10,
                      "lam_ratio": 1.0, "topk": 10, "projection": "rademacher",
                      "microbatch": 8}


def attribution_defaults(run_dir: str | Path) -> dict:
    """``jaxattrib attribute`` defaults for a run: :data:`ATTRIBUTE_DEFAULTS` updated with the
    ``attribution`` section of the run's ``config.json`` (e.g. ``sd15_lora``'s attn2 / k)."""
    out = dict(ATTRIBUTE_DEFAULTS)
    path = Path(run_dir) / "config.json"
    if path.is_file():
        sec = json.loads(path.read_text()).get("attribution") or {}
        out.update({k: v for k, v in sec.items() if k in out})
    return out


def attribute_run(run_dir: str | Path, queries: str | Path, method: str = "dtrak", *,
                  k: int = 2048, params: str = "attn", num_timesteps: int = 10,
                  lam_ratio: float = 1.0, topk: int = 10, journey_step: int | None = None,
                  projection: str = "rademacher", microbatch: int = 8,
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
    from jaxattrib.data.run_data import has_run_data, open_run_data
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file() or not has_run_data(run_dir):
        raise ConfigError(f"{run_dir}: not a training run directory (needs config.json and "
                          f"data/source.json or data/train.npz from `jaxattrib train`)")
    config = json.loads(config_path.read_text())
    pipe = _load_model(config.get("model", "embedded"))
    sched = schedule_from_diffusers_config(pipe.scheduler_config)
    data = open_run_data(run_dir)  # pixels are read per featurization chunk
    q_images, q_prompts = read_queries(queries)
    if q_images.shape[1:] != data.image_shape:
        raise ConfigError(f"{queries}: query images are {q_images.shape[1:]}, training images "
                          f"{data.image_shape}")
    record = TrajectoryRecord.open((run_dir / "record").resolve())
    steps = record.steps()
    check_attribution_fields({"method": method, "k": k, "params": params,
                              "num_timesteps": num_timesteps, "projection": projection,
                              "microbatch": microbatch, "lam_ratio": lam_ratio, "topk": topk},
                             "attribute")
    ac = dt.AttributionConfig(method=method, k=k, params=params, num_timesteps=num_timesteps,
                              projection=projection, microbatch=microbatch)
    train_ex = training_examples(pipe, data)
    query_ex = {"x0": q_images, "ctx": np.asarray(pipe.encode_prompts(q_prompts))}
    fp_train = str(record.manifest.get("dataset", {}).get("fingerprint", "")) or \
        data.fingerprint()
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
        scores = np.asarray(trak_lib.tracin_scores(Phis, phis, lrs)).T
    else:
        lam = dt.relative_lambdas(Phis[0], [lam_ratio])[0]
        scores = dt.scores_from_features(phis[0], Phis[0], lam)
    out = run_dir / "scores" / f"{method}_{qname}.npy"
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, scores.astype(np.float32))
    top = np.argsort(-scores, axis=1, kind="stable")[:, :topk]
    rows = [{"query": i, "prompt": q_prompts[i],
             "top": ", ".join(str(data.ids[j]) for j in top[i])} for i in range(len(q_prompts))]
    write_result(run_dir, f"attribute_{method}_{qname}", f"{method} attribution of {qname}",
                 tables=[{"caption": f"top-{topk} training examples per query (checkpoint(s) "
                          f"{use_steps}, k={k}, params={params!r})", "rows": rows}])
    return scores


# ----------------------------------------------------------------------------- model specs

MODEL_SPEC_HELP = ("'pipeline' (the UNet of model.pipeline), 'embedded' (the shipped base "
                   "model), a diffusers pipeline folder, or a trajectory record / `jaxattrib "
                   "train` run directory with an optional @STEP ('@0' = the weights it started "
                   "from, '@last' = the default)")


def load_unet(spec: str, pipe, field: str = "model") -> tuple[dict, str]:
    """UNet parameters named by a model spec, and a description of where they came from.

    ``spec`` (see :data:`MODEL_SPEC_HELP`): ``'pipeline'`` = ``pipe.unet_params``;
    ``'embedded'``; a pipeline folder (its UNet config must equal ``pipe``'s); ``PATH[@STEP]``
    where PATH is a record folder (``manifest.json``) or a run directory holding ``record/``.
    Errors are :class:`ConfigError` naming ``field``.
    """
    import dataclasses

    from jaxattrib.models.convert import CheckpointError
    spec = str(spec).strip()
    if not spec:
        raise ConfigError(f"{field} is empty: expected {MODEL_SPEC_HELP}")
    if spec == "pipeline":
        return pipe.unet_params, f"UNet of {pipe.folder}"
    path_s, _, step_s = spec.rpartition("@") if "@" in spec else (spec, "", "")
    path = Path(path_s).expanduser()
    record_dir = path if (path / "manifest.json").is_file() else path / "record"
    if spec != "embedded" and (record_dir / "manifest.json").is_file():
        from jaxattrib.train.record import TrajectoryRecord
        rec = TrajectoryRecord.open(record_dir.resolve())
        try:
            steps = rec.steps()
            if step_s in ("", "last"):
                step = steps[-1] if steps else None
            else:
                try:
                    step = int(step_s)
                except ValueError:
                    raise ConfigError(f"{field}={spec!r}: @{step_s}: expected an integer step or "
                                      f"'last'") from None
            if step not in steps:
                raise ConfigError(f"{field}={spec!r}: {record_dir} has checkpoints {steps}, not "
                                  f"{step}")
            params = rec.load(step)["unet"]
        finally:
            rec.close()
        desc = f"{record_dir} step {step}"
    elif step_s:
        raise ConfigError(f"{field}={spec!r}: @STEP needs a record or run directory; "
                          f"{path} has no manifest.json or record/manifest.json")
    else:
        try:
            other = _load_model(spec)
        except CheckpointError as e:
            raise ConfigError(f"{field}={spec!r}: expected {MODEL_SPEC_HELP}; loading it as a "
                              f"pipeline failed: {e}") from e
        if dataclasses.asdict(other.unet_config) != dataclasses.asdict(pipe.unet_config):
            raise ConfigError(f"{field}={spec!r}: its UNet config differs from model.pipeline's "
                              f"({pipe.folder}); both models must share one architecture")
        params, desc = other.unet_params, f"UNet of {other.folder}"
    from jaxattrib.attribution.cgi_dm import IncompatibleModelsError, check_compatible
    try:
        check_compatible(pipe.unet_params, params)
    except IncompatibleModelsError as e:
        raise ConfigError(f"{field}={spec!r} does not fit model.pipeline's UNet: {e}") from e
    return params, desc


def image_folder(folder: str | Path, size: int, field: str, *, default_caption: str = "",
                 labelled: bool = False) -> dict:
    """Images of a folder for authentication-style commands, sorted by relative path.

    Images directly in ``folder`` have label -1 (unknown); with ``labelled``, images in the
    sub-folders ``member/`` and ``non_member/`` have labels 1 and 0. Captions: ``prompts.txt``
    (one line per top-level image, as ``jaxattrib generate`` writes), else ``captions.jsonl``
    (``file_name`` relative to ``folder``), else ``default_caption``.

    Returns ``{'images': [N, size, size, 3] float32 in [-1, 1], 'captions': [N] str, 'ids':
    [N] str, 'labels': [N] int8}``; errors are :class:`ConfigError` naming ``field``.
    """
    from jaxattrib.data.dataset import DataError
    from jaxattrib.data.folder import IMAGE_EXTENSIONS, load_image, read_captions_jsonl
    root = Path(folder).expanduser()
    if not str(folder) or not root.is_dir():
        raise ConfigError(f"{field}={str(folder)!r}: expected an existing image folder")

    def images_in(d):
        return sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    groups = [(root, -1)] + ([(root / "member", 1), (root / "non_member", 0)] if labelled
                             else [])
    paths, labels = [], []
    for d, lab in groups:
        if d.is_dir():
            found = images_in(d)
            paths += found
            labels += [lab] * len(found)
    if not paths:
        where = f"{root}" + (" (or its member/ and non_member/ sub-folders)" if labelled else "")
        raise ConfigError(f"{field}: no images in {where}")
    ids = [p.relative_to(root).as_posix() for p in paths]
    captions = [default_caption] * len(paths)
    prompts, jsonl = root / "prompts.txt", root / "captions.jsonl"
    if prompts.is_file():
        lines = [ln for ln in prompts.read_text().splitlines() if ln.strip()]
        top = [i for i, lab in enumerate(labels) if lab == -1]
        if len(lines) != len(top):
            raise ConfigError(f"{field}: {prompts} has {len(lines)} prompts for {len(top)} "
                              f"images in {root}")
        for i, line in zip(top, lines):
            captions[i] = line
    elif jsonl.is_file():
        try:
            caps = read_captions_jsonl(jsonl)
        except DataError as e:
            raise ConfigError(f"{field}: {e}") from e
        captions = [caps.get(i, default_caption) for i in ids]
    try:
        images = np.stack([load_image(p, size, min_size=1) for p in paths]).astype(np.float32)
    except DataError as e:
        raise ConfigError(f"{field}: {e}") from e
    return {"images": images, "captions": np.array(captions), "ids": np.array(ids),
            "labels": np.array(labels, np.int8)}


def model_image_size(pipe) -> int:
    """Pixel side of the pipeline's images (UNet sample size × the VAE's down-sampling)."""
    vae = pipe.vae_config
    return pipe.unet_config.sample_size * (1 if vae is None else
                                           2 ** (len(vae.block_out_channels) - 1))
