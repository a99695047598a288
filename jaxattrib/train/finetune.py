"""Data-parallel fine-tuning (full or LoRA) that writes a trajectory record.

The numeric core is generic: a pure ``loss_fn(params, batch, key) -> per-example losses [B]``
is minimised with AdamW (optax ``clip_by_global_norm`` + ``adamw`` with a warm-up + constant /
cosine / linear schedule), the objective being the mean of the per-example losses over the
global batch. One jitted :func:`train_step` runs on a ``jax.sharding.Mesh``: the batch is
sharded over the ``'data'`` axis, parameters, optimizer state and the step key are replicated;
XLA inserts the gradient all-reduce.

[design] Reproducibility contract (ours):

* The batch of update ``s`` is a pure function of ``(seed, s)``: :func:`batch_plan` walks
  epoch-wise permutations ``permutation(fold_in(fold_in(key(seed), 0), epoch), N)``
  concatenated end to end (a batch may straddle two epochs) and the step key is
  ``fold_in(fold_in(key(seed), 1), s)``. LoRA ``A`` matrices use ``fold_in(key(seed), 2)``.
* Any update can be replayed from the record (indices, key, learning rate in
  ``steps.jsonl``). Per-example randomness inside ``loss_fn`` should derive from
  ``fold_in(key, position_in_batch)`` so that it does not depend on the device count.
* Resuming: if the record has checkpoints, the latest (params + optimizer state + step) is
  restored and the run continues; the step log is truncated to that checkpoint. A run killed
  at any point (even SIGKILL) and restarted ends bit-identical to an uninterrupted run on the
  same device count (XLA CPU/GPU reductions are deterministic for a fixed program).
* Checkpoint hook: ``finetune(..., on_checkpoint=fn)`` calls ``fn(step, params)`` right after
  each checkpoint this call saves (step 0 of a fresh run included, after the save has been
  started), with the full composed model parameters, so per-checkpoint work (e.g.
  :class:`jaxattrib.attribution.montrage.MontrageMonitor`) runs during training without
  reloading checkpoints. An exception in ``fn`` stops training and propagates; checkpoints
  saved before it (including the one just announced) are finalized first and a rerun resumes
  from the latest one.
* Parameter partition: ``init_params`` is a dict; in ``'full'`` mode every top-level subtree
  is trained except ``'vae'`` and, unless ``train_text_encoder``, ``'text_encoder'``. In
  ``'lora'`` mode the same subtrees receive LoRA adapters on the kernels matched by
  ``lora_target`` and only the adapters are trained.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxattrib import parallel
from jaxattrib.models import lora as lora_lib
from jaxattrib.models.lora import compose_params  # noqa: F401 (re-export)
from jaxattrib.train.record import TrajectoryRecord

FROZEN_ALWAYS = ("vae",)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of a fine-tuning run (all of them go into the record's manifest).

    steps: number of optimizer updates. batch_size: *global* batch size (examples per update,
    divisible by the mesh's data axis). learning_rate: peak LR. schedule: 'constant' |
    'cosine' | 'linear' (decay to ``final_lr_fraction * learning_rate`` at ``steps``), after a
    linear warm-up from 0 over ``warmup_steps``. weight_decay, b1, b2, eps: AdamW.
    grad_clip_norm: global-norm clipping (<= 0 disables). checkpoint_every: save every N
    updates (0 disables); checkpoint_steps: additional steps to save; step 0 and the final
    step are always saved. mode: 'full' | 'lora'. lora_rank / lora_alpha / lora_target (regex
    over '/'-joined parameter paths). train_text_encoder: also train ``params['text_encoder']``.
    log_every: progress-bar loss refresh interval (forces a device sync).
    precision: 'float32' | 'bfloat16' — compute dtype of the loss (the ``loss_fn`` must be
    built with the same, e.g. ``make_diffusion_loss(..., precision=...)``; checked when it
    carries a ``precision`` attribute). Trained parameters ("master weights") and the AdamW
    state are float32 in both cases. remat: UNet block rematerialization of the ``loss_fn``
    (see :mod:`jaxattrib.precision`; checked likewise). matmul_precision: 'default' |
    'tensorfloat32' | 'highest', applied with ``jax.default_matmul_precision`` around the
    jitted step. The three go into the manifest only when not the default, so records made
    before they existed still resume.
    """

    steps: int = 100
    batch_size: int = 8
    learning_rate: float = 1e-4
    schedule: str = "constant"
    warmup_steps: int = 0
    final_lr_fraction: float = 0.0
    weight_decay: float = 1e-2
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 100
    checkpoint_steps: tuple[int, ...] = ()
    mode: str = "full"
    lora_rank: int = 4
    lora_alpha: float = 4.0
    lora_target: str = f"{lora_lib.UNET_ATTENTION_TARGET}|{lora_lib.TEXT_ATTENTION_TARGET}"
    train_text_encoder: bool = False
    log_every: int = 10
    precision: str = "float32"
    remat: str = "none"
    matmul_precision: str = "default"

    @classmethod
    def from_section(cls, section, *, strict: bool = False, **overrides) -> "TrainConfig":
        """From a ``finetune`` / ``train`` config section: the fields it holds, then
        ``overrides``; the rest keep the defaults above (:func:`jaxattrib.config.
        fields_from_section`)."""
        from jaxattrib.config import fields_from_section
        return cls(**fields_from_section(cls, section, strict=strict, **overrides))

    def __post_init__(self):
        from jaxattrib import precision as prec
        if self.precision not in prec.PRECISIONS:
            raise ValueError(f"TrainConfig.precision must be one of {prec.PRECISIONS}, got "
                             f"{self.precision!r}")
        object.__setattr__(self, "remat", prec.remat_name(self.remat))
        if self.matmul_precision not in prec.MATMUL_PRECISIONS:
            raise ValueError(f"TrainConfig.matmul_precision must be one of "
                             f"{prec.MATMUL_PRECISIONS}, got {self.matmul_precision!r}")
        if self.mode not in ("full", "lora"):
            raise ValueError(f"TrainConfig.mode must be 'full' or 'lora', got {self.mode!r}")
        if self.schedule not in ("constant", "cosine", "linear"):
            raise ValueError(f"TrainConfig.schedule must be 'constant', 'cosine' or 'linear', "
                             f"got {self.schedule!r}")
        if self.steps < 0 or self.batch_size <= 0:
            raise ValueError(f"TrainConfig: steps={self.steps}, batch_size={self.batch_size} "
                             f"must be >= 0 and > 0")
        object.__setattr__(self, "checkpoint_steps",
                           tuple(sorted(int(s) for s in self.checkpoint_steps)))

    def to_dict(self) -> dict:
        """JSON-able fields; ``precision``/``remat``/``matmul_precision`` only when not the
        default (manifests of records made before they existed keep matching)."""
        from jaxattrib import precision as prec
        d = dataclasses.asdict(self)
        d["checkpoint_steps"] = list(self.checkpoint_steps)
        for k in prec.DEFAULTS:
            d.pop(k)
        d.update(prec.non_default(self))
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"TrainConfig: unknown fields {sorted(unknown)}")
        d = dict(d)
        if "checkpoint_steps" in d:
            d["checkpoint_steps"] = tuple(d["checkpoint_steps"])
        return cls(**d)


def _cfg_get(cfg, name, default):
    return cfg.get(name, default) if isinstance(cfg, Mapping) else getattr(cfg, name, default)


# ---------------------------------------------------------------------- schedule / optimizer
def make_lr_schedule(config: TrainConfig) -> optax.Schedule:
    """LR at update ``s`` (0-based): linear warm-up 0 -> peak, then constant/cosine/linear."""
    peak, warm = config.learning_rate, config.warmup_steps
    decay_steps = max(config.steps - warm, 1)
    final = peak * config.final_lr_fraction
    if config.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif config.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps,
                                            alpha=config.final_lr_fraction)
    else:
        after = optax.linear_schedule(peak, final, decay_steps)
    if warm <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), after], [warm])


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """``clip_by_global_norm(grad_clip_norm)`` (if > 0) followed by AdamW on the schedule."""
    parts = []
    if config.grad_clip_norm and config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    parts.append(optax.adamw(make_lr_schedule(config), b1=config.b1, b2=config.b2,
                             eps=config.eps, weight_decay=config.weight_decay))
    return optax.chain(*parts)


# ---------------------------------------------------------------------- batch plan
@functools.lru_cache(maxsize=8)
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), 0), epoch)
    return np.asarray(jax.random.permutation(key, n), dtype=np.int64)


def step_key(seed: int, step: int) -> jax.Array:
    """The PRNG key (uint32[2]) passed to ``loss_fn`` at update ``step``."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), 1), step)


def batch_plan(seed: int, step: int, dataset_size: int,
               batch_size: int) -> tuple[np.ndarray, jax.Array]:
    """Example indices (int64 [batch_size]) and PRNG key of update ``step``; pure.

    The stream of examples is the concatenation of per-epoch permutations of
    ``range(dataset_size)``; update ``s`` takes positions ``[s*B, (s+1)*B)`` of it.
    """
    if dataset_size <= 0:
        raise ValueError(f"batch_plan: dataset_size must be positive, got {dataset_size}")
    start = step * batch_size
    out = np.empty(batch_size, np.int64)
    filled = 0
    while filled < batch_size:
        pos = start + filled
        epoch, off = divmod(pos, dataset_size)
        take = min(batch_size - filled, dataset_size - off)
        out[filled:filled + take] = _epoch_permutation(seed, epoch, dataset_size)[off:off + take]
        filled += take
    return out, step_key(seed, step)


# ---------------------------------------------------------------------- parameter partition
def trainable_keys(params: Mapping, config) -> list[str]:
    """Top-level keys of ``params`` that are trained (see module docstring)."""
    frozen = set(FROZEN_ALWAYS)
    if not _cfg_get(config, "train_text_encoder", False):
        frozen.add("text_encoder")
    keys = [k for k in params if k not in frozen]
    if not keys:
        raise ValueError(f"nothing to train: params has keys {list(params)}, all frozen")
    return keys


def split_params(params: Mapping, config) -> tuple[dict, dict]:
    """Full mode: ``(trainable subtrees, frozen subtrees)`` split by top-level key."""
    keys = set(trainable_keys(params, config))
    return ({k: v for k, v in params.items() if k in keys},
            {k: v for k, v in params.items() if k not in keys})


def init_trainable(init_params: Mapping, config: TrainConfig) -> tuple[dict, dict]:
    """``(trainable, frozen)`` at step 0: full mode splits; LoRA mode inits adapters."""
    if config.mode == "full":
        return split_params(init_params, config)
    keys = trainable_keys(init_params, config)
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 2)
    lora = {}
    for i, k in enumerate(keys):
        if lora_lib.lora_targets(init_params[k], config.lora_target):
            lora[k] = lora_lib.lora_init(init_params[k], jax.random.fold_in(key, i),
                                         config.lora_rank, target=config.lora_target)
    if not lora:
        raise ValueError(f"LoRA target {config.lora_target!r} matches nothing in "
                         f"{keys}")
    return lora, dict(init_params)


# ---------------------------------------------------------------------- train step
@flax.struct.dataclass
class TrainState:
    """``step`` (int32 scalar: updates done), ``params`` (trainable), ``opt_state``,
    ``frozen`` (frozen subtrees in full mode, the whole base in LoRA mode)."""

    step: jax.Array
    params: Any
    opt_state: Any
    frozen: Any

    def checkpoint(self) -> dict:
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state}


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation,
                    config: TrainConfig, mesh) -> Callable:
    """Jitted ``train_step(state, batch, key) -> (state, metrics)`` over ``mesh``.

    ``batch`` leaves are ``[B, ...]`` sharded over ``'data'``; ``state`` and ``key`` are
    replicated. metrics: ``loss`` (mean per-example loss before the update), ``grad_norm``
    (global norm before clipping). ``state.step/params/opt_state`` are donated (the input
    state's arrays are invalid afterwards), ``state.frozen`` is not.
    """
    def step_fn(step, trainable, opt_state, frozen, batch, key):
        def objective(trainable):
            losses = loss_fn(compose_params(trainable, frozen, config), batch, key)
            return jnp.mean(losses)

        loss, grads = jax.value_and_grad(objective)(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return step + 1, trainable, opt_state, {"loss": loss,
                                                "grad_norm": optax.tree.norm(grads)}

    from jaxattrib import precision as prec
    rep = parallel.replicated_sharding(mesh)
    # step, trainable params and optimizer state are donated (updated in place); the frozen
    # params are not, so arrays the caller still holds are never invalidated.
    jitted = jax.jit(step_fn, in_shardings=(rep, rep, rep, rep, parallel.data_sharding(mesh),
                                            rep),
                     out_shardings=rep, donate_argnums=(0, 1, 2))

    def train_step(state: TrainState, batch, key):
        with prec.matmul_precision(config.matmul_precision):  # traced (and cached) under it
            step, params, opt_state, metrics = jitted(state.step, state.params,
                                                      state.opt_state, state.frozen, batch, key)
        return state.replace(step=step, params=params, opt_state=opt_state), metrics

    return train_step


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN/inf: the stage stopped; the record keeps its
    last good checkpoint (every checkpoint it holds was saved from finite steps)."""


def _check_finite(pending: list, record: TrajectoryRecord, last_good: int) -> None:
    """Raises :class:`NonFiniteLossError` if any ``(step, metrics)`` in ``pending`` has a
    non-finite loss or gradient norm (one device sync for the lot); the step log is cut back
    to ``last_good`` so the record stays consistent with its checkpoints."""
    if not pending:
        return
    values = jax.device_get([m for _, m in pending])
    for (s, _), m in zip(pending, values):
        bad = {k: float(v) for k, v in m.items() if not np.isfinite(v)}
        if bad:
            record.truncate_steps(last_good)
            what = ", ".join(f"{k}={v}" for k, v in bad.items())
            raise NonFiniteLossError(
                f"finetune: {what} at update step {s} (not finite): the stage stopped; the "
                f"record {record.directory} keeps its last good checkpoint, step {last_good}. "
                f"Fix the cause (e.g. a lower finetune.learning_rate, or bad pixels in the data) "
                f"and rerun in a new run directory (or with --fresh)")
    pending.clear()


def _should_save(k: int, config: TrainConfig) -> bool:
    return (k == config.steps or k in config.checkpoint_steps
            or (config.checkpoint_every > 0 and k % config.checkpoint_every == 0))


def make_manifest(config: TrainConfig, dataset_size: int, model_info: Mapping | None,
                  dataset_info: Mapping | None) -> dict:
    """The record manifest of a run (config, seed, model, dataset, LR schedule)."""
    return {
        "config": config.to_dict(),
        "seed": config.seed,
        "model": dict(model_info or {}),
        "dataset": {"size": int(dataset_size), **dict(dataset_info or {})},
        "lr_schedule": {"kind": config.schedule, "peak": config.learning_rate,
                        "warmup_steps": config.warmup_steps, "total_steps": config.steps,
                        "final_fraction": config.final_lr_fraction,
                        "note": "lr of each update is in steps.jsonl"},
        "batch_plan": "indices: epoch permutations fold_in(fold_in(key(seed),0),epoch); "
                      "key: fold_in(fold_in(key(seed),1),step)",
    }


def finetune(loss_fn: Callable, init_params: Mapping, dataset_size: int,
             get_batch: Callable[[np.ndarray], Mapping], config: TrainConfig,
             record_dir, mesh=None, progress: bool = True,
             model_info: Mapping | None = None, dataset_info: Mapping | None = None,
             describe_step: Callable | None = None,
             on_checkpoint: Callable[[int, dict], Any] | None = None,
             log: Callable[[str], None] | None = None,
             prefetch: int = 0) -> tuple[dict, TrajectoryRecord]:
    """Trains ``init_params`` and writes the trajectory record at ``record_dir``; resumable.

    Args:
      loss_fn: pure ``(params, batch, key) -> per-example losses [B]``.
      init_params: dict of pretrained parameters (see the partition rule above).
      dataset_size: number of training examples ``N``.
      get_batch: ``indices (int64 [b]) -> dict of numpy arrays [b, ...]``; on several
        processes it is called with this process's rows of the global batch only.
      config: :class:`TrainConfig`.
      record_dir: record directory; an existing record is resumed (its manifest must match).
      mesh: device mesh with a ``'data'`` axis (default: all devices).
      progress: show a tqdm bar (loss, steps/s, ETA).
      model_info, dataset_info: JSON-able descriptions stored in the manifest (e.g. model
        name/config, dataset fingerprint and ids); they take part in the manifest check.
      describe_step: ``(key, batch_size) -> dict of arrays`` with task-specific per-update
        randomness to log (default: ``loss_fn.describe_step`` if present), e.g. timesteps.
      on_checkpoint: ``(step, params) -> None``, called after each checkpoint this call
        saves (``record.save`` started; step 0 of a fresh run included; on resume, the
        restored checkpoint and earlier ones are *not* announced again; read them from the
        record). ``params`` are the full composed model parameters at ``step`` (LoRA merged),
        replicated over ``mesh``; their buffers may be donated to the next update, so copy
        (``jax.device_get``) anything kept after the call returns. Its time counts as
        training time. An exception in it stops training and propagates after the saved
        checkpoints are finalized (the record stays resumable). On several processes it is
        called on every process with the same global arrays.
      log: optional ``str -> None`` (e.g. :class:`jaxattrib.progress.StageLog`): steps done,
        rate and ETA (at most every 30 s) and each checkpoint saved, with its step's loss.
      prefetch: read this many updates' batches ahead (``get_batch`` runs in a grain worker
        thread, :func:`jaxattrib.data.source.prefetch_map`); 0 = call it in the loop. The
        batches, hence the trajectory, are the same either way.

    Returns:
      ``(model params after config.steps updates, TrajectoryRecord)``.
    """
    mesh = parallel.make_mesh() if mesh is None else mesh
    n_data = mesh.shape[parallel.DATA_AXIS]
    if config.batch_size % n_data:
        raise ValueError(f"global batch size {config.batch_size} is not divisible by the "
                         f"{n_data} devices of the mesh's data axis")
    for name in ("precision", "remat"):
        have = getattr(loss_fn, name, None)
        if have is not None and have != getattr(config, name):
            raise ValueError(f"TrainConfig.{name}={getattr(config, name)!r} but loss_fn was "
                             f"built with {name}={have!r}")
    describe_step = describe_step or getattr(loss_fn, "describe_step", None)
    if describe_step is not None:
        describe_step = jax.jit(describe_step, static_argnums=1)
    record = TrajectoryRecord.create(
        record_dir, make_manifest(config, dataset_size, model_info, dataset_info))

    optimizer = make_optimizer(config)
    schedule = make_lr_schedule(config)
    trainable, frozen = init_trainable(init_params, config)
    # own copies of the trainable arrays: they are donated to the train step, and replicating
    # may reuse the caller's device buffers
    trainable = jax.tree.map(lambda x: jnp.array(x, copy=True), trainable)
    trainable, frozen = parallel.replicate((trainable, frozen), mesh)
    state = TrainState(step=parallel.replicate(jnp.zeros((), jnp.int32), mesh),
                       params=trainable, opt_state=jax.jit(optimizer.init, out_shardings=
                       parallel.replicated_sharding(mesh))(trainable), frozen=frozen)

    latest = record.latest_step()
    announce_start = False
    if latest is None:
        record.truncate_steps(0)
        base = frozen if config.mode == "lora" else {**frozen, **trainable}  # = init_params
        record.save(0, state.checkpoint(), base=base)
        record.wait()
        start = 0
        announce_start = True
    else:
        restored = record.load_train_state(latest, template=state.checkpoint())
        state = state.replace(**restored)
        record.truncate_steps(latest)
        start = latest
    if int(state.step) != start:
        raise RuntimeError(f"restored state has step {int(state.step)}, expected {start}")

    train_step = make_train_step(loss_fn, optimizer, config, mesh)
    rows = parallel.process_slice(config.batch_size)
    bar = None
    if progress and jax.process_index() == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=config.steps, initial=start, desc="finetune", unit="step",
                   dynamic_ncols=True)
    prog = None
    if log is not None:
        from jaxattrib.progress import Progress
        prog = Progress(config.steps - start, "finetune", "step", bar=False, log=log)

    def announce(step: int) -> None:
        if on_checkpoint is not None:
            on_checkpoint(step, compose_params(state.params, state.frozen, config))

    def local_batch(s: int) -> dict:
        indices, _ = batch_plan(config.seed, s, dataset_size, config.batch_size)
        return {k: np.asarray(v) for k, v in get_batch(indices[rows]).items()}

    from jaxattrib.data.source import prefetch_map
    batches = prefetch_map(local_batch, range(start, config.steps),
                           num_threads=1 if prefetch > 0 else 0, prefetch=prefetch)
    pending, last_good = [], start   # metrics not yet checked for NaN/inf; last checkpoint
    try:
        if announce_start:
            announce(0)
        for s in range(start, config.steps):
            indices, key = batch_plan(config.seed, s, dataset_size, config.batch_size)
            local = next(batches)
            batch = parallel.host_local_to_global(local, mesh)
            key = parallel.replicate(key, mesh)
            state, metrics = train_step(state, batch, key)
            info = {"step": s, "lr": float(schedule(s)), "indices": indices,
                    "key": np.asarray(jax.device_get(key))}
            if describe_step is not None:
                info.update({k: np.asarray(v) for k, v in
                             describe_step(key, config.batch_size).items()})
            record.append_step(info)
            pending.append((s, metrics))
            if _should_save(s + 1, config) or len(pending) >= max(config.log_every, 1):
                _check_finite(pending, record, last_good)   # NaN/inf: stop, keep last good
            if _should_save(s + 1, config):
                record.save(s + 1, state.checkpoint())
                last_good = s + 1
                announce(s + 1)
                if log is not None:
                    log(f"checkpoint {s + 1} saved (loss {float(metrics['loss']):.6g}, "
                        f"lr {info['lr']:.3g})")
            if prog is not None:
                prog.update(1)
            if bar is not None:
                bar.update(1)
                if (s + 1) % max(config.log_every, 1) == 0 or s + 1 == config.steps:
                    bar.set_postfix(loss=f"{float(metrics['loss']):.4g}",
                                    lr=f"{info['lr']:.3g}")
    finally:
        record.wait()  # finalize checkpoints already started, even when failing
        if bar is not None:
            bar.close()
    params = compose_params(state.params, state.frozen, config)
    return params, record
