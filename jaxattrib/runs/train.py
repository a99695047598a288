"""The ``train`` command: fine-tune a pipeline on a training source into a run directory.

A run directory written by :func:`train_run` holds ``config.json``, ``data/source.json`` (a
reference to the training data with its fingerprint, not a copy; older runs hold
``data/train.npz`` instead, see :mod:`jaxattrib.data.run_data`) and the trajectory
``record/``. Resumable: the record resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from jaxattrib.config import ConfigError
from jaxattrib.runs.config_check import (DATA_SOURCES, _field, check_data_size,
                                         check_pipeline_matches, check_train_config,
                                         read_run_config)
from jaxattrib.runs.specs import load_model
from jaxattrib.runs.rundir import RunDir

logger = logging.getLogger(__name__)


# data.* fields added after run directories existed: a stored config.json without them is
# compared as if it had these values, so such runs keep resuming
_NEW_DATA_FIELDS = {"name": "", "split": "train", "caption_key": ""}


def load_training_data(config):
    """The configured training set as a :class:`~jaxattrib.data.source.DataSource` (pixels
    are read on demand; ``len()``, ``ids``, ``captions``, ``fingerprint()``, ``read(idx)``).

    ``data.source``: 'synthetic' (the concept spec of ``config.model``'s
    ``jaxattrib_base.json`` (the embedded model's: 6 backgrounds), else the package's 16-px
    spec (:func:`~jaxattrib.runs.specs.synthetic_spec`), rendered at ``data.size``, one image
    per combination, seed = ``config.seed``), 'folder' (``data.path``, ``data.subjects``),
    'digits', or 'tfds' (``data.name`` prepared as array_record in ``data.path`` = its ``data_dir``,
    ``data.split``, captions from ``data.caption_key`` or the class name). ``data.max_examples``
    keeps a random subset (seed = ``config.seed``) in data set order, with a notice.
    """
    from jaxattrib.data import source as S
    d = config.data
    if d.source == "synthetic":
        import dataclasses

        from jaxattrib.runs.specs import synthetic_spec
        spec = synthetic_spec(_field(config, "model", "embedded"), size=d.size)
        src = S.SyntheticSource(dataclasses.replace(spec, per_combination=1), seed=config.seed)
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
        logger.warning("data.max_examples=%d: using a random subset of %d of the %d training "
                       "examples (seed %d; data.max_examples=0 uses all)", d.max_examples,
                       d.max_examples, len(src), config.seed)
        idx = np.random.default_rng(config.seed).choice(len(src), d.max_examples, replace=False)
        src = src.subset(np.sort(idx))
    return src


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
    from jaxattrib.train.diffusion_task import make_diffusion_loss
    from jaxattrib.train.finetune import TrainConfig, finetune
    check_train_config(config)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = RunDir(run_dir).config
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
        logger.warning("%s was made before these attribution fields existed; it keeps what "
                       "it did: %s", cfg_path, ", ".join(adopted))
    added = {**precision.added_defaults("finetune", "attribution"), **ATTRIBUTION_LEGACY}
    if stored is not None and precision.fill_added(stored, added, current) != current:
        from jaxattrib.runlock import has_results
        if has_results(run_dir):
            raise ConfigError(f"{cfg_path}: run directory was made with another config; use "
                              f"a new --run-dir")
        logger.warning("%s: nothing was computed in this run directory yet; its config is "
                       "replaced by the new one", cfg_path)
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
    pipe = load_model(config.model)
    check_pipeline_matches(config, pipe)
    check_data_size(config, pipe)
    sched = schedule_from_diffusers_config(pipe.scheduler_config)
    f = config.finetune
    prec = {k: _field(f, k, v) for k, v in precision.DEFAULTS.items()}
    from jaxattrib.diffusion.latents import training_latent_rule
    model_info, sample_posterior = training_latent_rule(pipe, RunDir(run_dir).record,
                                                        {"model": str(config.model)})
    loss_fn = make_diffusion_loss(pipe.unet_config, pipe.text_config, sched, pipe.vae_config,
                                  train_text_encoder=f.train_text_encoder,
                                  precision=prec["precision"], remat=prec["remat"],
                                  sample_posterior=sample_posterior)
    ids = pipe.tokenizer(list(ds.captions), max_length=pipe.text_config.max_position_embeddings)
    # absent warmup_steps / lora_target take TrainConfig's defaults (0, UNet|text attention)
    tc = TrainConfig.from_section(f, seed=config.seed,
                                  lora_alpha=float(_field(f, "lora_alpha", 4.0)), **prec)
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
                        RunDir(run_dir).record.resolve(), mesh=mesh, progress=progress,
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


__all__ = ["load_training_data", "train_run"]
