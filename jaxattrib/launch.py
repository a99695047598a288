"""Entry point for single- and multi-host runs: ``python -m jaxattrib.launch CMD CONFIG``.

``CMD`` is ``featurize`` (TRAK features of the training set into a resumable store),
``train`` (fine-tuning with a trajectory record) or ``attribute`` (a pipeline fine-tuning run's
attribution: :func:`jaxattrib.runs.attribute.attribute_run` on every process). ``CONFIG`` is an
ml_collections config (``path.py``, ``path.py:arg`` or a packaged name such as
``featurize_digits``; see
:mod:`jaxattrib.config`), ``--set key=value`` overrides fields, ``--dry-run`` validates the
config (loads it, checks the required fields and values, resolves paths, builds the dataset
arrays with numpy) and prints the plan without touching any accelerator or starting
``jax.distributed``.

Every process of a launch runs the same command line (see ``launch/``). The process calls
:func:`jaxattrib.parallel.initialize_distributed` (SLURM, TPU pod slice, Open MPI, or
``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``), builds a 1-D ``'data'``
mesh over all global devices (or ``config.num_devices`` of them), and runs the command.

[design] Multi-host I/O: every process loads the (small, deterministic) dataset description
but only reads the rows it computes. Featurization: process 0 creates each feature store, the
missing chunks are dealt round-robin to the processes, and every process computes its chunks
on its own devices and writes them itself (``trak.featurize``); a killed launch leaves whole
chunks only and a rerun computes the rest. Training: process 0 writes the run's files, orbax
coordinates the record's checkpoints. ``out_dir`` must be on a file system shared by all hosts
(NFS, Lustre, a GCS FUSE mount); featurization checks that every process sees every chunk.

Tasks: ``'digits_mlp'`` (``configs/featurize_digits.py``); adding a task means adding a
builder to ``_TASKS`` that returns a :class:`Task`. Pipeline fine-tuning configs
(``configs/sd15_lora.py``, ``sd21.py``: a ``finetune`` section and no ``task``) run ``train``
through :func:`jaxattrib.runs.train.train_run` on the launch mesh, and ``attribute`` through
:func:`jaxattrib.runs.attribute.attribute_run` on the run directory ``out_dir`` (options as
``jaxattrib attribute`` takes them: the run's ``attribution`` settings, then ``--set
attribution.X=...``; see :func:`attribute_options`; ``--queries DIR`` scores a query folder on
process 0, without it only the training features are computed); ``featurize`` is for ``task``
configs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from jaxattrib.config import ConfigError, load_config

COMMANDS = ("featurize", "train", "attribute")

# Required config fields per command (dotted names).
_COMMON = ("task", "out_dir", "num_devices", "model.seed")
_REQUIRED = {
    "featurize": _COMMON + ("featurize.params", "featurize.k", "featurize.projection",
                            "featurize.proj_seed", "featurize.chunk_size",
                            "featurize.microbatch", "featurize.key"),
    "train": _COMMON + ("train.steps", "train.batch_size", "train.learning_rate",
                        "train.checkpoint_every", "train.seed"),
}


@dataclasses.dataclass(frozen=True)
class Task:
    """What a config describes, built identically on every process.

    examples: pytree of numpy arrays with leading axis ``n`` (rows are read lazily per process).
    init_params: ``{top_key: flax params}`` (the layout :func:`finetune` expects).
    out_fn: ``(params, example, key) -> scalar`` (featurization output function).
    loss_fn: ``(params, batch, key) -> [B]`` per-example training losses.
    info: JSON-able description (dataset fingerprint, model) for store/record metadata.
    """

    examples: Any
    init_params: Any
    out_fn: Callable
    loss_fn: Callable
    output_name: str
    info: dict


# --------------------------------------------------------------------------- validation
def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def paths(config) -> dict[str, Path]:
    """Absolute output paths: ``record`` (train) and ``features`` (featurize store)."""
    out = Path(os.path.expanduser(str(config.out_dir))).resolve()
    return {"out_dir": out, "record": out / "record",
            "features": out / "features" / str(config.featurize.params)
            if "featurize" in config else out / "features"}


def validate(config, command: str, *, source: str = "config",
             overrides: Sequence[str] = ()) -> dict:
    """Checks ``config`` for ``command``; returns the plan (JSON-able). Raises ConfigError.

    Uses no JAX device (the dataset is built with numpy only), so it runs before
    ``jax.distributed.initialize``.
    """
    if command not in COMMANDS:
        raise ConfigError(f"command {command!r}: expected one of {COMMANDS}")
    if is_pipeline_config(config):
        return _validate_pipeline(config, command, source, overrides)
    if command == "attribute":
        raise ConfigError(f"{source}: 'attribute' needs a pipeline fine-tuning config (a "
                          f"'finetune' section, e.g. sd15_lora, sd21, finetune_folder); for "
                          f"task configs use 'featurize'")
    missing = []
    for name in _REQUIRED[command]:
        try:
            _get(config, name)
        except KeyError:
            missing.append(name)
    if missing:
        raise ConfigError(f"{source}: missing required field(s) {missing} for {command!r}")
    if config.task not in _TASKS:
        raise ConfigError(f"{source}: task={config.task!r}: expected one of {sorted(_TASKS)}")
    if not str(config.out_dir):
        raise ConfigError(f"{source}: out_dir is empty")
    if int(config.num_devices) < 0:
        raise ConfigError(f"{source}: num_devices={config.num_devices}: expected >= 0 "
                          f"(0 = all devices)")
    positive = (("featurize.k", "featurize.chunk_size", "featurize.microbatch")
                if command == "featurize" else ("train.batch_size",))
    for name in positive:
        if not isinstance(_get(config, name), int) or _get(config, name) < 1:
            raise ConfigError(f"{source}: {name}={_get(config, name)!r}: expected a positive "
                              f"integer")
    p = paths(config)
    plan = {"command": command, "task": config.task, "out_dir": str(p["out_dir"])}
    if command == "featurize":
        from jaxattrib.attribution.projection import KINDS
        f = config.featurize
        if f.params not in ("init", "record"):
            raise ConfigError(f"{source}: featurize.params={f.params!r}: expected 'init' or "
                              f"'record'")
        if f.projection not in KINDS:
            raise ConfigError(f"{source}: featurize.projection={f.projection!r}: expected one "
                              f"of {KINDS}")
        plan.update(store=str(p["features"]), k=int(f.k), projection=f.projection,
                    params=f.params)
        if f.params == "record":
            plan["record"] = str(p["record"])
            plan["record_exists"] = p["record"].is_dir()
    else:
        if int(config.train.steps) < 0:
            raise ConfigError(f"{source}: train.steps={config.train.steps}: expected >= 0")
        plan.update(record=str(p["record"]), steps=int(config.train.steps),
                    batch_size=int(config.train.batch_size))
    try:
        examples, _ = _TASKS[config.task][0](config)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ConfigError(f"{source}: task {config.task!r}: its data could not be built: "
                          f"{type(e).__name__}: {e}") from e
    n = _num_rows(examples)
    plan["n_examples"] = n
    if command == "train" and config.train.batch_size > n:
        raise ConfigError(f"{source}: train.batch_size={config.train.batch_size} > "
                          f"{n} examples")
    return plan


def is_pipeline_config(config) -> bool:
    """A ``jaxattrib train``-layout config (``sd15_lora``, ``sd21``): ``finetune`` and no
    ``task``; ``train`` runs :func:`jaxattrib.runs.train.train_run` on the launch mesh."""
    return "task" not in config and "finetune" in config


def _validate_pipeline(config, command: str, source: str,
                       overrides: Sequence[str] = ()) -> dict:
    """Dry-run checks of a pipeline fine-tuning config (numpy only; no model weights read)."""
    from jaxattrib.runs.config_check import check_train_config
    from jaxattrib.runs.train import load_training_data
    if "dreambooth" in config:
        raise ConfigError(f"{source}: DreamBooth configs (a 'dreambooth' section) are not "
                          f"supported by the launcher; run them with `jaxattrib train`")
    if command == "featurize":
        raise ConfigError(f"{source}: 'featurize' is for task configs (a 'task' field); for "
                          f"pipeline fine-tuning configs use 'attribute' (the training set of "
                          f"the run in out_dir)")
    for name in ("out_dir", "num_devices"):
        if name not in config:
            raise ConfigError(f"{source}: missing required field {name!r} for a launch")
    if command == "attribute":
        return _validate_attribute(config, source, overrides)
    check_train_config(config, source)
    model = str(config.model)
    if model not in ("", "embedded") and not (Path(model).expanduser() /
                                              "model_index.json").is_file():
        raise ConfigError(f"{source}: model={model!r}: no model_index.json there (expected a "
                          f"local diffusers pipeline folder, the same path on every host)")
    p = paths(config)
    plan = {"command": command, "task": "pipeline_finetune", "out_dir": str(p["out_dir"]),
            "record": str(p["record"]), "model": model or "embedded",
            "steps": int(config.finetune.steps), "batch_size": int(config.finetune.batch_size),
            "mode": config.finetune.mode}
    try:
        plan["n_examples"] = len(load_training_data(config))
    except (ValueError, OSError) as e:
        raise ConfigError(f"{source}: data could not be read: {e}") from e
    if config.finetune.batch_size > plan["n_examples"]:
        raise ConfigError(f"{source}: finetune.batch_size={config.finetune.batch_size} > "
                          f"{plan['n_examples']} examples")
    return plan


def attribute_options(config, overrides: Sequence[str] = ()) -> dict:
    """``attribute_run`` keyword options, as ``jaxattrib attribute RUN`` takes them: the run's
    own settings (``runs.attribute.attribution_defaults``: ``ATTRIBUTE_DEFAULTS`` updated with the
    ``attribution`` section of ``out_dir/config.json``), or the config's ``attribution`` section
    when the run does not exist yet (dry runs); then every ``--set attribution.X=...`` of
    ``overrides`` on top."""
    from jaxattrib.runs.attribute import ATTRIBUTE_DEFAULTS, attribution_defaults
    from jaxattrib.runs.rundir import RunDir
    run = paths(config)["out_dir"]
    section = config.attribution.to_dict() if "attribution" in config else {}
    if RunDir(run).config.is_file():
        opts = attribution_defaults(run)
    else:
        opts = dict(ATTRIBUTE_DEFAULTS)
        opts.update({k: v for k, v in section.items() if k in opts})
    for o in overrides:
        name = o.split("=", 1)[0].strip()
        if name.startswith("attribution.") and name[len("attribution."):] in opts:
            opts[name[len("attribution."):]] = section[name[len("attribution."):]]
    return opts


def _validate_attribute(config, source: str, overrides: Sequence[str] = ()) -> dict:
    """Dry-run checks of ``attribute`` on a pipeline config (no model or run is loaded)."""
    from jaxattrib.runs.config_check import check_attribution_fields
    opts = attribute_options(config, overrides)
    check_attribution_fields(opts, f"{source}: attribution")
    out = paths(config)["out_dir"]
    return {"command": "attribute", "task": "pipeline_attribute", "out_dir": str(out),
            "run_exists": (out / "config.json").is_file() and (out / "record").is_dir(),
            "logs": str(out / "logs" / "attribute.log"), **opts}


def _num_rows(tree) -> int:
    import jax
    return int({np.shape(a)[0] for a in jax.tree_util.tree_leaves(tree)}.pop())


# --------------------------------------------------------------------------- tasks
def _digits_data(config) -> tuple[dict, dict]:
    """``({'image': [n, s, s, 1] float32 in [-1, 1], 'label': [n] int32}, info)``; numpy only."""
    from jaxattrib.attribution.store import dataset_fingerprint
    from jaxattrib.data.digits import load_digits

    ds = load_digits(int(config.data.size), digits=tuple(config.data.digits),
                     max_per_digit=config.data.max_per_digit)
    images = np.asarray(ds.images[..., :1], np.float32)  # gray: the 3 channels are equal
    labels = np.asarray(ds.labels["digit"], np.int32)
    hidden = tuple(int(h) for h in config.model.hidden)
    if not hidden or min(hidden) < 1:
        raise ValueError(f"model.hidden={hidden}: expected positive layer widths")
    info = {"task": "digits_mlp", "hidden": list(hidden), "model_seed": int(config.model.seed),
            "dataset_fingerprint": dataset_fingerprint([images, labels])}
    return {"image": images, "label": labels}, info


def _digits_mlp(config) -> Task:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    examples, info = _digits_data(config)
    images = examples["image"]
    hidden = tuple(info["hidden"])

    class MLP(nn.Module):
        """One example ``[h, w, 1]`` → logits ``[10]``."""

        @nn.compact
        def __call__(self, x):
            x = x.reshape(-1)
            for i, h in enumerate(hidden):
                x = jnp.tanh(nn.Dense(h, name=f"dense_{i}")(x))
            return nn.Dense(10, name="head")(x)

    model = MLP()
    params = {"mlp": model.init(jax.random.PRNGKey(int(config.model.seed)), images[0])["params"]}

    def out_fn(params, ex, key):
        """TRAK's margin ``logit_y − logsumexp_{j≠y} logit_j`` (scalar)."""
        del key
        logits = model.apply({"params": params["mlp"]}, ex["image"])
        others = jnp.where(jnp.arange(10) == ex["label"], -jnp.inf, logits)
        return logits[ex["label"]] - jax.nn.logsumexp(others)

    def loss_fn(params, batch, key):
        del key
        logits = jax.vmap(lambda x: model.apply({"params": params["mlp"]}, x))(batch["image"])
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["label"][:, None],
                                    1)[:, 0]

    return Task(examples, params, out_fn, loss_fn, "margin", info)


# task name -> (data builder: config -> (examples, info), numpy only; full builder -> Task)
_TASKS: dict[str, tuple[Callable, Callable[[Any], Task]]] = {
    "digits_mlp": (_digits_data, _digits_mlp)}


# --------------------------------------------------------------------------- commands
def _barrier(name: str) -> None:
    import jax
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def make_launch_mesh(config):
    """The ``'data'`` mesh over all global devices (or the first ``config.num_devices``)."""
    from jaxattrib import parallel
    return parallel.make_mesh(int(config.num_devices) or None)


def _train_config(config):
    from jaxattrib.train.finetune import TrainConfig
    # train: steps, batch_size, learning_rate, checkpoint_every, seed
    return TrainConfig.from_section(config.train, mode="full", schedule="constant",
                                    warmup_steps=0)


def run_train(config, mesh, *, progress: bool = True):
    """Fine-tunes the task's model; returns ``(params, TrajectoryRecord)``. Progress lines go
    to ``out_dir/logs/train.log``."""
    from jaxattrib.progress import StageLog
    from jaxattrib.train.finetune import finetune
    task = _TASKS[config.task][1](config)
    ex = task.examples
    with StageLog(paths(config)["out_dir"], "train") as log:
        return finetune(task.loss_fn, task.init_params, _num_rows(ex),
                        lambda idx: {k: v[idx] for k, v in ex.items()}, _train_config(config),
                        paths(config)["record"], mesh=mesh, progress=progress,
                        model_info=task.info, log=log)


def run_featurize(config, mesh, *, progress: bool = True):
    """Featurizes the task's examples into ``out_dir/features/<params>``; returns the store.

    Process 0 creates the store (``meta.json``) before the others open it; every process then
    writes its own share of the chunks (see :func:`jaxattrib.attribution.trak.featurize`).
    Progress lines go to ``out_dir/logs/featurize.log`` (process p > 0:
    ``featurize.process<p>.log``).
    """
    from jaxattrib.progress import StageLog
    import jax

    from jaxattrib.attribution import store as store_lib
    from jaxattrib.attribution import trak
    from jaxattrib.attribution.grads import select_params
    from jaxattrib.attribution.projection import make_projector

    f = config.featurize
    task = _TASKS[config.task][1](config)
    params = task.init_params
    checkpoint = None
    if f.params == "record":
        from jaxattrib.train.record import TrajectoryRecord
        rec = TrajectoryRecord.open(paths(config)["record"])
        checkpoint = rec.latest_step()
        if checkpoint is None:
            raise ConfigError(f"{rec.directory}: the record has no checkpoint; run train first")
        params = jax.tree.map(np.asarray, rec.load(checkpoint))
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype),
                          select_params(params, "all").trainable)
    projector = make_projector(f.projection, int(f.k), int(f.proj_seed), shapes)
    n = _num_rows(task.examples)
    meta = store_lib.feature_meta(
        projector_meta=projector.meta(), seed=int(f.key), output_fn=task.output_name,
        dataset_fingerprint=task.info["dataset_fingerprint"],
        checkpoint_steps=None if checkpoint is None else [int(checkpoint)],
        extra={"task": task.info})

    def open_store():
        return store_lib.ChunkedArray.open(paths(config)["features"], n_rows=n,
                                           n_cols=int(f.k), chunk_size=int(f.chunk_size),
                                           meta=meta)

    if jax.process_index() == 0:
        store = open_store()
    _barrier("jaxattrib.launch: store created")
    if jax.process_index() != 0:
        store = open_store()
    with StageLog(paths(config)["out_dir"], "featurize") as log:
        return trak.featurize(task.out_fn, params, task.examples, projector, store,
                              microbatch=int(f.microbatch), mesh=mesh, key=int(f.key),
                              progress=progress, log=log)


# --------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m jaxattrib.launch",
                                 description="Run featurization or fine-tuning from a config "
                                             "on one or many processes.")
    ap.add_argument("command", choices=COMMANDS)
    ap.add_argument("config", help="config file, file.py:arg, or packaged config name")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="override a config field (repeatable)")
    ap.add_argument("--dry-run", action="store_true",
                    help="validate the config and print the plan; start nothing")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("-v", "--verbose", action="count", default=0,
                    help="more messages on stderr (-v debug, -vv also third-party noise)")
    ap.add_argument("-q", "--quiet", action="count", default=0,
                    help="fewer messages on stderr (-q notices and errors only)")
    ap.add_argument("--queries", default=None, metavar="DIR",
                    help="attribute: query PNGs + prompts.txt (from `jaxattrib generate`) to "
                         "score on process 0; without it only the training set is featurized")
    ap.add_argument("--journey-step", type=int, default=None,
                    help="attribute, method journey-trak: the sampling step to attribute")
    ap.add_argument("--chunk-size", type=int, default=None,
                    help="attribute: rows per feature-store chunk, the unit of resumption and "
                         "of the work dealt to processes (default: attribution.chunk_size if "
                         "the config has it, else 64)")
    ap.add_argument("--distributed", choices=("auto", "on", "off"), default="auto",
                    help="auto: jaxattrib.parallel.initialize_distributed() (environment "
                         "detection); on: also call jax.distributed.initialize() when the "
                         "environment shows nothing (GCE TPU VM pods are found through the "
                         "metadata server, not the environment); off: one process")
    ap.add_argument("--local-device-ids", default=None, metavar="I,J,...",
                    help="devices this process drives (e.g. all GPUs of a node with one "
                         "SLURM task per node; JAX defaults to one GPU per SLURM task)")
    return ap


def start_distributed(mode: str = "auto", local_device_ids: Sequence[int] | None = None) -> bool:
    """Starts ``jax.distributed`` per ``mode`` (see ``--distributed``); True if started."""
    if mode == "off":
        return False
    from jaxattrib import parallel
    kwargs = {} if local_device_ids is None else {"local_device_ids": list(local_device_ids)}
    if parallel.initialize_distributed(**kwargs):
        return True
    if mode == "on":
        import jax
        jax.distributed.initialize(**kwargs)
        return True
    return False


def main(argv: Sequence[str] | None = None) -> int:
    from jaxattrib.logs import configure, unconfigure
    args = _parser().parse_args(argv)
    configure(args.verbose - args.quiet)
    try:
        return _main(args, argv)
    finally:
        unconfigure()


def _main(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    try:
        config = load_config(args.config, args.overrides)
        plan = validate(config, args.command, source=args.config, overrides=args.overrides)
        if args.command == "attribute" and args.chunk_size is not None:
            if args.chunk_size < 1:
                raise ConfigError(f"--chunk-size={args.chunk_size}: expected a positive "
                                  f"integer")
            plan["chunk_size"] = args.chunk_size
    except ConfigError as e:
        print(f"jaxattrib.launch: invalid config: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        from jaxattrib.parallel import _env_num_processes
        plan["env_num_processes"] = _env_num_processes()
        print("jaxattrib.launch dry-run: config OK")
        print(json.dumps(plan, indent=1, sort_keys=True))
        return 0

    ids = None
    if args.local_device_ids:
        try:
            ids = [int(i) for i in args.local_device_ids.split(",") if i.strip()]
        except ValueError:
            print(f"jaxattrib.launch: --local-device-ids={args.local_device_ids!r}: expected "
                  f"comma-separated integers", file=sys.stderr)
            return 2
    start_distributed(args.distributed, ids)
    import jax
    me = jax.process_index()
    lock = None
    if me == 0:   # one writer per run directory: taken once, by process 0, for the whole launch
        from jaxattrib.runlock import RunLockError, acquire
        try:
            lock = acquire(paths(config)["out_dir"],
                           " ".join(["python -m jaxattrib.launch", *(argv or sys.argv[1:])]))
        except RunLockError as e:
            print(f"jaxattrib.launch: {e}", file=sys.stderr)
            return 2
    try:
        return _run(args, config, me)
    finally:
        if lock is not None:
            lock.release()


def _run(args, config, me: int) -> int:
    import jax
    mesh = make_launch_mesh(config)
    if me == 0:
        print(f"jaxattrib.launch {args.command}: {jax.process_count()} process(es), "
              f"{jax.device_count()} device(s), mesh {dict(mesh.shape)}", flush=True)
    progress = not args.no_progress
    if args.command == "attribute":
        from jaxattrib.attribution.store import StoreMismatchError
        from jaxattrib.runs.attribute import attribute_run
        opts = attribute_options(config, args.overrides)
        if args.chunk_size is not None:
            opts["chunk_size"] = args.chunk_size
        try:
            scores = attribute_run(paths(config)["out_dir"], args.queries, opts.pop("method"),
                                   journey_step=args.journey_step, progress=progress,
                                   mesh=mesh, **opts)
        except (ConfigError, StoreMismatchError) as e:
            print(f"jaxattrib.launch: process {me}: {e}", file=sys.stderr, flush=True)
            return 2
        done = (f"training features in {paths(config)['out_dir'] / 'features'}" if
                scores is None else f"scores {scores.shape} in "
                                    f"{paths(config)['out_dir'] / 'scores'}")
    elif args.command == "train" and is_pipeline_config(config):
        from jaxattrib.runs.train import train_run
        _, rec = train_run(config, paths(config)["out_dir"], progress=progress, mesh=mesh)
        done = f"record {rec.directory} steps {rec.steps()}"
    elif args.command == "train":
        _, rec = run_train(config, mesh, progress=progress)
        done = f"record {rec.directory} steps {rec.steps()}"
    else:
        store = run_featurize(config, mesh, progress=progress)
        done = f"store {store.folder} complete={store.complete()}"
    print(f"jaxattrib.launch {args.command} done on process {me}: {done}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
