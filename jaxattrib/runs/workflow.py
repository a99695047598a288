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

Latent pipelines (docs/latents.md): fine-tuning and attribution both use the VAE posterior mean
(:mod:`jaxattrib.diffusion.latents`); the training set is encoded once into ``latents/train``
(:mod:`jaxattrib.runs.latent_cache`, keyed by the data and VAE fingerprints).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

from jaxattrib.config import ConfigError


def _load_model(model: str):
    from jaxattrib.train.base_model import load_base_model
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
        from jaxattrib.train.base_model import data_spec
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
    ``remat``, ``matmul_precision``, ``model_prediction_type``, ``attribution.*``) are checked
    when present.
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
    from jaxattrib import precision
    precision.check_fields(f, f"{source}: finetune")
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
    from jaxattrib.diffusion.losses import NOISE_MODES

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    checks = (("method", lambda v: v in METHODS, f"one of {METHODS}"),
              ("noise", lambda v: v in NOISE_MODES, f"one of {NOISE_MODES}"),
              ("noise_period", lambda v: is_int(v) and v >= 1, "a positive integer"),
              ("checkpoints", lambda v: v is None or (is_int(v) and v >= 1) or (
                  isinstance(v, (list, tuple)) and len(v) > 0 and all(
                      is_int(s) and s >= 0 for s in v)),
               "an int M >= 1 (the last M checkpoints) or a non-empty list of steps"),
              ("projection", lambda v: v in KINDS[:3], f"one of {KINDS[:3]}"),
              ("k", lambda v: isinstance(v, int) and v >= 1, "a positive integer"),
              ("num_timesteps", lambda v: isinstance(v, int) and v >= 1, "a positive integer"),
              ("microbatch", lambda v: isinstance(v, int) and v >= 1, "a positive integer"),
              ("chunk_size", lambda v: isinstance(v, int) and v >= 1, "a positive integer"),
              ("topk", lambda v: isinstance(v, int) and v >= 1, "a positive integer"),
              ("lam_ratio", lambda v: isinstance(v, (int, float)) and v > 0,
               "a positive number"))
    for name, ok, expected in checks:
        if name in a and not ok(a[name]):
            raise ConfigError(f"{where}.{name}={a[name]!r}: expected {expected}")
    from jaxattrib import precision
    precision.check_fields(a, where)
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


def check_data_size(config, pipe, field: str = "data.size") -> None:
    """``data.size`` must be the UNet's sample size × the VAE factor (the pixel side the model
    takes); else one :class:`ConfigError` naming the field and both shapes."""
    from jaxattrib.diffusion.latents import pixel_shape, sample_shape, vae_factor
    size = int(config.data.size)
    want = pixel_shape(pipe.unet_config, pipe.vae_config)
    if (size, size) != want[:2]:
        lat = sample_shape(pipe.unet_config)
        how = (f"the UNet takes {lat[0]}x{lat[1]}x{lat[2]} latents x VAE factor "
               f"{vae_factor(pipe.vae_config)}" if pipe.is_latent else
               f"the pixel-space UNet takes {lat[0]}x{lat[1]}x{lat[2]} images")
        raise ConfigError(f"{field}={size}: images would be {size}x{size}x3 but {pipe.folder} "
                          f"expects {want[0]}x{want[1]}x3 ({how}); set --set "
                          f"{field}={want[0]}")


def read_run_config(path: str | Path) -> dict:
    """A run directory's ``config.json``; unreadable or not a JSON object: :class:`ConfigError`
    saying how to recover."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: unreadable ({e}); this run directory's config is damaged: "
                          f"use a new --run-dir, or --fresh to start over") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object (the run's config); use a new "
                          f"--run-dir, or --fresh to start over")
    return data


def train_run(config, run_dir: str | Path, progress: bool = True, mesh=None):
    """Fine-tunes ``config.model`` on ``config.data`` into ``run_dir`` (resumable).

    ``mesh``: the data mesh (default: every device, or one device when the batch does not
    divide); on several processes only process 0 writes ``config.json`` and ``data/``.
    Progress (steps, rate, ETA, checkpoints with their loss) is logged to
    ``run_dir/logs/train.log`` (process p > 0: ``train.process<p>.log``).
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
    from jaxattrib import precision
    stored = read_run_config(cfg_path) if cfg_path.exists() else None
    if isinstance(stored.get("data") if stored else None, dict):
        # run directories made before data.{name,split,caption_key} existed (data.source='tfds')
        for k, v in _NEW_DATA_FIELDS.items():
            if k not in stored["data"] and current.get("data", {}).get(k) == v:
                stored["data"][k] = v
    # run directories made before finetune/attribution.{precision,remat,matmul_precision}
    # existed did what their defaults do; before attribution.{noise,checkpoints}: shared noise,
    # one checkpoint (kept in the config.json written below, so `attribute` resumes with them)
    from jaxattrib.config import ATTRIBUTION_LEGACY, adopt_legacy
    adopted = adopt_legacy(stored, current) if stored is not None else []
    if adopted:
        print(f"notice: {cfg_path} was made before these attribution fields existed; it keeps "
              f"what it did: {', '.join(adopted)}", file=sys.stderr, flush=True)
    added = {**precision.added_defaults("finetune", "attribution"), **ATTRIBUTION_LEGACY}
    if stored is not None and precision.fill_added(stored, added) != current:
        from jaxattrib.runlock import has_results
        if has_results(run_dir):
            raise ConfigError(f"{cfg_path}: run directory was made with another config; use "
                              f"a new --run-dir")
        print(f"notice: {cfg_path}: nothing was computed in this run directory yet; its "
              f"config is replaced by the new one", file=sys.stderr, flush=True)
        if jax.process_index() == 0:    # the old config's data reference goes with it
            from jaxattrib.data import run_data
            for stale in (run_data.SOURCE_FILE, run_data.LEGACY_FILE):
                (run_dir / stale).unlink(missing_ok=True)
    writer = jax.process_index() == 0
    if writer:
        from jaxattrib.fileio import atomic_write_text
        atomic_write_text(cfg_path, json.dumps(current, indent=2, sort_keys=True))
    # opens and checks the training data (legacy runs: data/train.npz) before the model loads
    ds, dataset_info = _run_training_data(config, run_dir, writer)
    pipe = _load_model(config.model)
    check_pipeline_matches(config, pipe)
    check_data_size(config, pipe)
    sched = schedule_from_diffusers_config(pipe.scheduler_config)
    f = config.finetune
    prec = {k: _field(f, k, v) for k, v in precision.DEFAULTS.items()}
    from jaxattrib.diffusion.latents import training_latent_rule
    model_info, sample_posterior = training_latent_rule(pipe, run_dir / "record",
                                                        {"model": str(config.model)})
    loss_fn = make_diffusion_loss(pipe.unet_config, pipe.text_config, sched, pipe.vae_config,
                                  train_text_encoder=f.train_text_encoder,
                                  precision=prec["precision"], remat=prec["remat"],
                                  sample_posterior=sample_posterior)
    ids = pipe.tokenizer(list(ds.captions), max_length=pipe.text_config.max_position_embeddings)
    tc = TrainConfig(steps=f.steps, batch_size=f.batch_size, learning_rate=f.learning_rate,
                     schedule=f.schedule, seed=config.seed, checkpoint_every=f.checkpoint_every,
                     mode=f.mode, lora_rank=f.lora_rank, train_text_encoder=f.train_text_encoder,
                     warmup_steps=_field(f, "warmup_steps", 0),
                     lora_alpha=float(_field(f, "lora_alpha", 4.0)),
                     lora_target=_field(f, "lora_target",
                                        f"{UNET_ATTENTION_TARGET}|{TEXT_ATTENTION_TARGET}"),
                     **prec)
    params = {"unet": pipe.unet_params, "text_encoder": pipe.text_params}
    if pipe.vae_params is not None:
        params["vae"] = pipe.vae_params
    if mesh is None:
        nd = _field(config, "num_devices", 0) or None
        mesh = parallel.make_mesh(nd) if f.batch_size % (nd or len(jax.devices())) == 0 \
            else parallel.make_mesh(1)
    from jaxattrib.progress import StageLog
    with StageLog(run_dir, "train") as log:
        log(f"{len(ds)} examples, steps={f.steps}, batch_size={f.batch_size}, "
            f"mode={f.mode}, processes={jax.process_count()}, devices={mesh.size}")
        # pixels are read per step (this process's rows only), ahead of the step by grain threads
        return finetune(loss_fn, params, len(ds),
                        lambda idx: {"images": ds.read(idx), "input_ids": ids[idx]}, tc,
                        (run_dir / "record").resolve(), mesh=mesh, progress=progress,
                        model_info=model_info, dataset_info=dataset_info, prefetch=2, log=log)


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
    else:
        _check_images_readable(ds)
        if writer:
            run_data.write_run_data(run_dir, ds)
    return ds, {"fingerprint": ds.fingerprint(), "ids": list(ds.ids),
                "reference": run_data.SOURCE_FILE.as_posix(), "kind": ds.kind,
                "order": "steps.jsonl 'indices' of each update index these ids"}


def _check_images_readable(ds) -> None:
    """Decodes every image of a folder-backed source once (streamed in batches, nothing kept),
    so a bad file stops ``train`` with :class:`~jaxattrib.data.dataset.DataError` naming it
    before the model loads, not mid-run. Done when a run directory first references its data;
    on resume the fingerprint (file bytes) proves the files are the ones checked. Other kinds
    (synthetic, digits, tfds) are generated or were validated when they were prepared."""
    from jaxattrib.data.source import iter_batches
    root = ds.parent if ds.kind == "subset" else ds
    if root.kind != "folder":
        return
    for _ in iter_batches(ds, 32, num_threads=0):
        pass


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
        print(f"notice: {folder}: using the {len(paths)} PNG files; ignoring "
              f"{len(others)} other file(s): {', '.join(others[:5])}"
              f"{' ...' if len(others) > 5 else ''}", file=sys.stderr, flush=True)
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


ATTRIBUTE_DEFAULTS = {"method": "dtrak", "k": 2048, "params": "attn", "num_timesteps": 10,
                      "lam_ratio": 1.0, "topk": 10, "projection": "rademacher",
                      "microbatch": 8, "precision": "float32", "remat": "none",
                      "matmul_precision": "default", "chunk_size": 64,
                      "noise": "per_position", "checkpoints": None}


def attribution_defaults(run_dir: str | Path) -> dict:
    """``jaxattrib attribute`` defaults for a run: :data:`ATTRIBUTE_DEFAULTS` updated with the
    ``attribution`` section of the run's ``config.json`` (e.g. ``sd15_lora``'s attn2 / k).

    A run made before ``attribution.noise`` / ``checkpoints`` existed (its config has an
    ``attribution`` section without them) keeps what it did:
    :data:`jaxattrib.config.ATTRIBUTION_LEGACY` ('shared' noise, one checkpoint), so its
    feature stores keep resuming. A run whose config has no ``attribution`` section at all
    (e.g. ``finetune_folder``) takes the defaults; feature stores it made before with 'shared'
    noise are then refused with a message that says to pass ``--noise shared``."""
    from jaxattrib.config import ATTRIBUTION_LEGACY
    out = dict(ATTRIBUTE_DEFAULTS)
    path = Path(run_dir) / "config.json"
    if path.is_file():
        sec = read_run_config(path).get("attribution") or {}
        if isinstance(sec, dict) and sec:
            for dotted, value in ATTRIBUTION_LEGACY.items():
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


def _sha(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def _require_run(run_dir: Path) -> dict:
    config_path = run_dir / "config.json"
    from jaxattrib.data.run_data import has_run_data
    if not config_path.is_file() or not has_run_data(run_dir):
        raise ConfigError(f"{run_dir}: not a training run directory (needs config.json and "
                          f"data/source.json or data/train.npz from `jaxattrib train`)")
    return read_run_config(config_path)


def load_run_pipeline(run_dir: str | Path):
    """The pipeline a run was trained from (``model`` of its ``config.json``)."""
    return _load_model(_require_run(Path(run_dir)).get("model", "embedded"))


def training_examples(run_dir: str | Path, pipe=None, *, progress: bool = True,
                      batch_size: int = 16, data=None) -> TrainingExamples:
    """The run's training set in the UNet's space, for featurization.

    The training data is the source ``data/source.json`` references (its fingerprint checked,
    :class:`~jaxattrib.data.run_data.DataChangedError` naming the path when it changed), or the
    copy ``data/train.npz`` of older runs. Pixel pipelines: its images, read lazily per
    featurization chunk. Latent pipelines: their VAE latents
    (posterior mean × scaling factor, :data:`jaxattrib.diffusion.latents.LATENT_RULE`), encoded
    once into the resumable store ``RUN/latents/train`` keyed by the data and VAE fingerprints
    (:mod:`jaxattrib.runs.latent_cache`; a store for other data or another VAE is refused), read back
    on later calls; the store is filled from the source's batches (:func:`~jaxattrib.data.source.
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
    manifest = run_dir / "record" / "manifest.json"
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
    return Path(run_dir) / "features" / method / f"step_{int(step)}"


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
    from jaxattrib.diffusion.schedule import schedule_from_diffusers_config
    from jaxattrib.train.record import TrajectoryRecord
    run_dir = Path(run_dir)
    pipe = load_run_pipeline(run_dir) if pipe is None else pipe
    train = training_examples(run_dir, pipe, progress=progress) if train is None else train
    record = TrajectoryRecord.open((run_dir / "record").resolve()) if record is None else record
    if step not in record.steps():
        raise ConfigError(f"{run_dir / 'record'}: no checkpoint at step {step} (has "
                          f"{record.steps()})")
    sched = schedule_from_diffusers_config(pipe.scheduler_config)
    out_fn = dt.make_train_out_fn(pipe.unet_config, sched, config)
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
                  noise: str = "per_position", checkpoints=None,
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
    from jaxattrib.attribution import trak as trak_lib
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
    record = TrajectoryRecord.open((run_dir / "record").resolve())
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
    pipe = _load_model(config.get("model", "embedded"))
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
    fp_query = hashlib.sha256(q_images.tobytes()).hexdigest()
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
        tg = {"x0": x0s[:, i], "ctx": q_ctx,
              "t": np.asarray(traj["timesteps"][:, i] if traj["timesteps"].ndim == 2
                              else np.full(len(q_images), traj["timesteps"][i]), np.int32)}
        shown = lat.decode_latents(pipe.vae_config, pipe.vae_params, x0s[:, i])
    Phis, phis, lrs = [], [], []
    for s in use_steps:
        Phis.append(featurize_training_set(run_dir, ac, s, pipe=pipe, train=train,
                                           record=record, **fkw))
        p = record.load(s)["unet"]
        base = feature_dir(run_dir, method, s)
        if method == "journey-trak":
            q_fn = dt.make_journey_target_out_fn(pipe.unet_config, sched, ac)
            phis.append(dt.featurize_examples(q_fn, p, tg, ac, base / f"queries_{qname}_{i}",
                                              fingerprint=fp_query, step=s, role="query",
                                              **fkw))
        else:
            out_fn = dt.make_train_out_fn(pipe.unet_config, sched, ac)
            phis.append(dt.featurize_examples(out_fn, p, query_ex, ac,
                                              base / f"queries_{qname}", fingerprint=fp_query,
                                              step=s, role="query", **fkw))
        if method == "tracin":
            lrs.append(record.step_info(s - 1)["lr"])
    if jax.process_index() != 0:  # process 0 scores and writes the results
        log(f"features at checkpoint(s) {use_steps} complete; process 0 scores")
        return None
    log(f"scoring {len(q_prompts)} queries against {len(train.ids)} training examples")
    if method == "tracin":
        scores = np.asarray(trak_lib.tracin_scores(Phis, phis, lrs)).T
    else:  # one checkpoint or the mean over the ensemble's checkpoints
        scores = dt.ensemble_scores(phis, Phis, lam_ratio)
    out = run_dir / "scores" / f"{method}_{qname}.npy"
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
    """``results/attribute_<method>_<qname>.json``: the top-k table and one image row per query
    (the query in pixels, then its top training images in pixels, with scores)."""
    from jaxattrib.report.html import write_result
    from jaxattrib.report.images import save_png, topk_image
    top = np.argsort(-scores, axis=1, kind="stable")[:, :topk]
    rows = [{"query": i, "prompt": prompts[i],
             "top": ", ".join(str(train.ids[j]) for j in top[i])} for i in range(len(prompts))]
    name = f"attribute_{method}_{qname}"
    labels = [str(x) for x in train.ids]
    kk = min(topk, 8, len(labels))

    def row(q):   # reads only this query's top training images (train.images may be lazy)
        sel = np.sort(top[q, :kk])
        return topk_image(np.clip(shown[q], -1, 1), np.asarray(train.images[sel]),
                          scores[q][sel], k=kk, labels=[labels[j] for j in sel],
                          query_label=query_label)[0]
    grid = np.concatenate([row(q) for q in range(len(prompts))], axis=0)
    rel = Path("results") / f"{name}_topk.png"
    save_png(run_dir / rel, grid)
    write_result(run_dir, name, f"{method} attribution of {qname}",
                 tables=[{"caption": f"top-{topk} training examples per query ({settings})",
                          "rows": rows}],
                 images=[{"path": rel.as_posix(),
                          "caption": f"each row: {query_label} (left) and its top "
                                     f"{min(topk, 8, len(labels))} training images (pixels)"}])


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
    from jaxattrib.authentication.cgi_dm import IncompatibleModelsError, check_compatible
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
    from jaxattrib.data.folder import (IMAGE_EXTENSIONS, load_image, notice_ignored_files,
                                       read_captions_jsonl)
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
            notice_ignored_files(d, len(found), ("prompts.txt", "captions.jsonl",
                                                 "trajectory.npz"))
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
