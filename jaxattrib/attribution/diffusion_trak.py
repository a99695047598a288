"""TRAK, D-TRAK, Journey-TRAK and TracIn for text-to-image diffusion models.

Turns a UNet into the scalar output functions the generic engine (:mod:`jaxattrib.attribution.
trak`, :mod:`~jaxattrib.attribution.grads`) differentiates per example, and runs featurize →
kernel → score with resumable stores. What follows the references (methods.md §1–3):

* TRAK (DSM): ``f = (1/K) Σ_t ||ε − ε_θ(x_t, t, c)||²`` (``output='loss'``).
* D-TRAK: ``f = (1/K) Σ_t mean(ε_θ(x_t, t, c)²)`` (``output='square'``; other names of
  :func:`jaxattrib.diffusion.losses.output_function` are accepted), timesteps uniform
  ``{0, T/K, 2T/K, …}``, noise fixed per (seed, t) and batch position, one checkpoint.
* Noise (``AttributionConfig.noise``): ``'shared'`` (default [design]: one noise per timestep
  for every example; LDS +0.09 (TRAK) / +0.17 (D-TRAK) over the reference's mode, paired,
  docs/faithful.md); ``'per_position'`` [code] is D-TRAK's (``set_seeds(e_seed*1000 + t)``,
  ``randn_like`` over a batch of 52, repeated across batches), keyed here by row index mod
  ``noise_period`` (52), independent of the microbatch [design]; ``'per_example'`` by row index. Journey-TRAK: always fresh noise per example
  key. Row index = ``examples['index']`` (int ``[n]``, :func:`with_index`: ``arange(n)``).
* Checkpoint ensembles (:func:`ensemble_steps`, :func:`scores_from_features` with lists): M
  checkpoints' scores averaged, each with its own features and kernel (``trak.score``).
  Defaults (:data:`DEFAULT_CHECKPOINTS`): D-TRAK 1 [code]; TRAK and Journey-TRAK the record's
  last 3 [design] (their references ensemble every saved checkpoint, Journey-TRAK's scripts 20:
  unbounded cost on a long record, and checkpoints next to the base model); M = 1 vs 3: pending.
* Journey-TRAK: training features = the DSM loss at ``K`` random timesteps, fresh noise; the
  target of sampling step ``t`` is its ``x̂0`` re-noised to ``t`` with ``R`` fresh draws,
  the DSM-loss gradient averaged over the draws. TracIn: ``Σ_s η_s ⟨g_s(z), g_s(z')⟩``
  over the record's checkpoints, on projected gradients.
* Scores ``τ(z) = φ(z)ᵀ (ΦᵀΦ + λI)⁻¹ Φᵀ``, larger = more attributed (a proponent), for every
  method as computed (no negation): for the DSM loss the first-order influence of up-weighting
  ``z_i`` (Koh & Liang, ``dL_q/dε = −∇L_qᵀ H⁻¹ ∇L_i``), so positive means training on ``z_i``
  lowers the query's loss; D-TRAK's outputs use the same orientation (authors' notebooks).
  [measured] An earlier ``sign = −1`` for the loss-based methods lost on validation
  (docs/benchmarks/customization.md: TracIn val mAP 0.148 → 0.334 flipped; in LDS raw TRAK
  scores correlated negatively with the loss, like pixel similarity).

Examples: pytrees ``{'x0': [h, w, c], 'ctx': [L, D]}`` (latents for latent models); Journey
targets add ``'t'`` (int32 scalar). Parameters: the UNet's (text conditioning precomputed).
Compilation [design]: :func:`make_train_out_fn` / :func:`make_journey_target_out_fn` return one
function object per (UNet config, schedule, config); :func:`featurize_examples` keeps one jitted
feature function per (out_fn, projector, parameter subset, batching), UNet parameters as jit
*arguments*: splits and checkpoints share one compile (caches: last ``_CACHE_SIZE`` entries).
"""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxattrib.attribution import store as store_lib
from jaxattrib.attribution import trak as trak_lib
from jaxattrib.attribution.grads import params_feature_fn, select_params
from jaxattrib.attribution.method_names import DEFAULT_CHECKPOINTS
from jaxattrib.attribution.method_names import GRADIENT_METHODS as METHODS
from jaxattrib.attribution.projection import make_projector
from jaxattrib.diffusion import losses
from jaxattrib.diffusion.schedule import Schedule


@dataclasses.dataclass(frozen=True)
class AttributionConfig:
    """How features are computed (the fields that change features go into the feature stores'
    metadata; ``microbatch`` and ``proj_batch`` only change speed and memory).

    method: 'trak' | 'dtrak' | 'journey-trak' | 'tracin'. output: D-TRAK output function
    (default 'square'). num_timesteps: K. timestep_strategy: 'uniform' | 'cumulative' |
    'random'. noise_seed: seed of the fixed per-timestep noise. k: projection dimension.
    projection: 'gaussian' | 'rademacher' | 'sjlt'. proj_seed: projection seed. params:
    'all' or a regex over UNet parameter paths (e.g. 'attn2' = cross-attention). microbatch:
    examples per ``vmap(grad)`` step. proj_batch: examples per pass over the projection
    (0 = ``microbatch``; see ``trak.featurize``: each P block is generated once for that many
    examples, whose ``proj_batch × p`` float32 gradients are held at once).
    journey_resamples: R re-noisings of a trajectory target; 8 [design] (spec: K = R = 20;
    K = 20, R = 20 measured equal to K = 10, R = 8 on the customization benchmark,
    docs/faithful.md).
    noise: 'per_position' | 'per_example' | 'shared' — the noise of TRAK / D-TRAK features
    (module doc; :func:`jaxattrib.diffusion.losses.example_noise`); noise_period: positions of
    'per_position' (D-TRAK's batch size, 52). Both go into the feature stores' metadata only
    when ``noise`` is not 'shared' (so stores made before the field keep matching).
    precision: 'float32' | 'bfloat16' — UNet compute dtype of the forward/backward; the
    parameters, per-example gradients (w.r.t. the float32 parameters), the projection and
    the features stay float32. remat: UNet block rematerialization ('none' | 'full' | a
    ``jax.checkpoint_policies`` name); it changes memory, not features. matmul_precision:
    'default' | 'tensorfloat32' | 'highest' (``jax.default_matmul_precision`` around the
    jitted featurization). See :mod:`jaxattrib.precision` and docs/precision.md; the three go
    into the feature stores' metadata only when not the default.
    """

    method: str = "dtrak"
    output: str = "square"
    num_timesteps: int = 10
    timestep_strategy: str = "uniform"
    noise_seed: int = 0
    k: int = 2048
    projection: str = "rademacher"
    proj_seed: int = 0
    params: str = "all"
    microbatch: int = 8
    journey_resamples: int = 8
    proj_batch: int = 0
    precision: str = "float32"
    remat: str = "none"
    matmul_precision: str = "default"
    noise: str = "shared"
    noise_period: int = 52

    @classmethod
    def from_section(cls, section, *, strict: bool = False, **overrides) -> "AttributionConfig":
        """From an ``attribution`` config section: the fields it holds (other keys, e.g.
        ``methods``, ``lambda_ratios``, ``topk``, are ignored), then ``overrides`` (e.g. the
        method being scored); the rest keep the defaults above
        (:func:`jaxattrib.config.fields_from_section`)."""
        from jaxattrib.config import fields_from_section
        return cls(**fields_from_section(cls, section, strict=strict, **overrides))

    def __post_init__(self):
        from jaxattrib import precision as prec
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: expected one of {METHODS}")
        if self.noise not in losses.NOISE_MODES:
            raise ValueError(f"noise={self.noise!r}: expected one of {losses.NOISE_MODES}")
        if not (isinstance(self.noise_period, (int, np.integer)) and self.noise_period >= 1):
            raise ValueError(f"noise_period={self.noise_period!r}: expected a positive integer")
        if self.precision not in prec.PRECISIONS:
            raise ValueError(f"precision={self.precision!r}: expected one of {prec.PRECISIONS}")
        object.__setattr__(self, "remat", prec.remat_name(self.remat))
        if self.matmul_precision not in prec.MATMUL_PRECISIONS:
            raise ValueError(f"matmul_precision={self.matmul_precision!r}: expected one of "
                             f"{prec.MATMUL_PRECISIONS}")

    @property
    def output_name(self) -> str:
        return self.output if self.method == "dtrak" else "loss"

    def noise_meta(self) -> dict:
        """The noise fields of the feature stores' metadata: empty for 'shared' (as stores
        made before the field) and for Journey-TRAK (fresh noise per example key)."""
        if self.noise == "shared" or self.method == "journey-trak":
            return {}
        return {"noise": self.noise, "noise_period": int(self.noise_period)}


def ensemble_steps(checkpoints, steps: Sequence[int], method: str = "dtrak") -> list[int]:
    """The checkpoint steps a TRAK / D-TRAK / Journey-TRAK ensemble scores with.

    ``checkpoints``: None (the method's :data:`DEFAULT_CHECKPOINTS`); an int M (the last M
    checkpoints of ``steps`` after step 0 — fewer when the record has fewer; step 0 alone
    when it holds nothing else); or a sequence of steps, each of which must be in ``steps``.
    Raises ``ValueError`` naming the field otherwise.
    """
    steps = sorted(int(s) for s in steps)
    if not steps:
        raise ValueError("checkpoints: the record has no checkpoint")
    if checkpoints is None:
        checkpoints = DEFAULT_CHECKPOINTS.get(method, 1)
    if isinstance(checkpoints, (int, np.integer)) and not isinstance(checkpoints, bool):
        if checkpoints < 1:
            raise ValueError(f"checkpoints={checkpoints}: expected M >= 1 (the last M "
                             f"checkpoints) or a list of steps")
        later = [s for s in steps if s > 0] or steps
        return later[-int(checkpoints):]
    if isinstance(checkpoints, (list, tuple)) and checkpoints and all(
            isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in checkpoints):
        missing = [int(s) for s in checkpoints if int(s) not in steps]
        if missing:
            raise ValueError(f"checkpoints={list(checkpoints)}: no checkpoint at step(s) "
                             f"{missing} (the record has {steps})")
        return sorted(set(int(s) for s in checkpoints))
    raise ValueError(f"checkpoints={checkpoints!r}: expected an int M (the last M checkpoints) "
                     f"or a non-empty list of steps")


def timesteps_for(config: AttributionConfig, T: int, key=None) -> np.ndarray:
    """The K timesteps of the output function (int32)."""
    K = config.num_timesteps
    if config.timestep_strategy == "uniform":
        return np.asarray(losses.timesteps_uniform(K, T), np.int32)
    if config.timestep_strategy == "cumulative":
        return np.asarray(losses.timesteps_cumulative(K, T), np.int32)
    if config.timestep_strategy == "random":
        key = jax.random.PRNGKey(config.noise_seed) if key is None else key
        return np.asarray(losses.timesteps_random(key, K, T), np.int32)
    raise ValueError(f"timestep_strategy={config.timestep_strategy!r}: expected 'uniform', "
                     f"'cumulative' or 'random'")


def _eps_fn(unet_config, params, config: AttributionConfig | None = None):
    """The UNet as ``eps_fn(x_t, t, ctx)``, computing in ``config.precision`` with
    ``config.remat``; its output is cast to float32 (output functions run in float32)."""
    from jaxattrib.models.unet import UNet2DConditionModel
    from jaxattrib.precision import unet_kwargs
    kw = {} if config is None else unet_kwargs(config.precision, config.remat)
    model = UNet2DConditionModel(unet_config, **kw)
    return lambda x_t, t, ctx: model.apply({"params": params}, x_t, t, ctx).astype(jnp.float32)


_CACHE_SIZE = 16
_OUT_FNS: collections.OrderedDict = collections.OrderedDict()
_FEATURE_FNS: collections.OrderedDict = collections.OrderedDict()


def _lru(cache: collections.OrderedDict, key, make: Callable):
    """``cache[key]``, made with ``make()`` if absent; keeps the last ``_CACHE_SIZE`` entries."""
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    value = cache[key] = make()
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
    return value


def _memo_out_fn(kind: str, make: Callable, unet_config, sched: Schedule,
                 config: AttributionConfig):
    """One out_fn object per equal (kind, UNet config, schedule values, config)."""
    leaves, treedef = jax.tree_util.tree_flatten(sched)
    try:
        key = (kind, unet_config, treedef, tuple(np.asarray(l).tobytes() for l in leaves), config)
        hash(key)
    except TypeError:  # an unhashable config field: no sharing
        return make(unet_config, sched, config)
    return _lru(_OUT_FNS, key, lambda: make(unet_config, sched, config))


def make_train_out_fn(unet_config, sched: Schedule, config: AttributionConfig):
    """``out_fn(unet_params, {'x0','ctx'}, key) -> scalar`` for training examples (the same
    object for equal arguments, so its compiled feature function is reused)."""
    return _memo_out_fn("train", _train_out_fn, unet_config, sched, config)


def _train_out_fn(unet_config, sched: Schedule, config: AttributionConfig):
    T = sched.num_train_timesteps
    if config.method == "journey-trak":
        K = config.num_timesteps

        def out_fn(params, ex, key):
            ts = jax.random.randint(jax.random.fold_in(key, 0), (K,), 0, T)
            noise = jax.random.normal(jax.random.fold_in(key, 1), (K,) + ex["x0"].shape)
            return losses.averaged_output("loss", _eps_fn(unet_config, params, config), sched,
                                          ex["x0"], ex["ctx"], ts, noise=noise)
        return out_fn
    ts = jnp.asarray(timesteps_for(config, T))

    def out_fn(params, ex, key):
        del key  # D-TRAK / TRAK: noise fixed per (seed, t[, row index]), see config.noise
        noise = None
        if config.noise != "shared":
            if "index" not in ex:
                raise ValueError(f"noise={config.noise!r} needs each example's row index: "
                                 f"examples['index'] (int [n]); featurize_examples adds it, "
                                 f"elsewhere use diffusion_trak.with_index(examples)")
            noise = jax.vmap(lambda t: losses.example_noise(
                config.noise, config.noise_seed, t, ex["index"], ex["x0"].shape,
                config.noise_period, ex["x0"].dtype))(ts)
        return losses.averaged_output(config.output_name, _eps_fn(unet_config, params, config),
                                      sched, ex["x0"], ex["ctx"], ts, config.noise_seed,
                                      noise=noise)
    return out_fn


def with_index(examples: dict) -> dict:
    """``examples`` with ``'index': arange(n)`` (int32) added when absent (the row index that
    keys 'per_example' / 'per_position' noise); a given ``'index'`` is kept."""
    if "index" in examples:
        return examples
    return {**examples, "index": np.arange(trak_lib._num_examples(examples), dtype=np.int32)}


def data_fingerprint(examples: dict) -> str:
    """:func:`~jaxattrib.attribution.store.dataset_fingerprint` of an example dict (sha256 of
    its arrays' shapes, dtypes and bytes): a feature store's ``dataset_fingerprint`` when the
    caller gives none. Fields must be arrays in memory (numpy / JAX); lazy rows (e.g.
    ``runs.attribute.source_examples``) need an explicit fingerprint, since hashing them would read
    (or encode) the whole data set."""
    for name, a in examples.items():
        if not isinstance(a, (np.ndarray, jax.Array, np.generic)):
            raise ValueError(f"examples[{name!r}] is a {type(a).__name__}, not an array: pass "
                             f"fingerprint= (a key of this data) to featurize_examples")
    return store_lib.dataset_fingerprint(examples)


def make_journey_target_out_fn(unet_config, sched: Schedule, config: AttributionConfig):
    """``out_fn(params, {'x0': x̂0 at step t, 'ctx', 't'}, key)``: DSM loss of ``x̂0`` re-noised
    to ``t``, averaged over ``config.journey_resamples`` fresh draws (Journey-TRAK target).
    The same object for equal arguments."""
    return _memo_out_fn("journey-target", _journey_target_out_fn, unet_config, sched, config)


def _journey_target_out_fn(unet_config, sched: Schedule, config: AttributionConfig):
    R = config.journey_resamples

    def out_fn(params, ex, key):
        ts = jnp.full((R,), ex["t"], jnp.int32)
        noise = jax.random.normal(key, (R,) + ex["x0"].shape)
        return losses.averaged_output("loss", _eps_fn(unet_config, params, config), sched,
                                      ex["x0"], ex["ctx"], ts, noise=noise)
    return out_fn


def journey_targets(trajectory, ctx, step_index: int) -> dict:
    """Journey-TRAK target examples for sampling step ``step_index`` of a trajectory.

    ``trajectory``: :class:`jaxattrib.diffusion.sampling.Trajectory` with a leading image axis
    (``timesteps [B, S]`` or ``[S]``, ``x0_preds [B, S, h, w, c]``); ``ctx [B, L, D]``.
    """
    x0 = np.asarray(trajectory.x0_preds)[:, step_index]
    ts = np.asarray(trajectory.timesteps)
    t = ts[:, step_index] if ts.ndim == 2 else np.full((x0.shape[0],), ts[step_index])
    return {"x0": x0, "ctx": np.asarray(ctx), "t": np.asarray(t, np.int32)}


def _projector(unet_params, config: AttributionConfig):
    split = select_params(unet_params, config.params)
    shapes = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                    split.trainable)
    return make_projector(config.projection, config.k, config.proj_seed, shapes)


def featurize_examples(out_fn, unet_params, examples: dict, config: AttributionConfig,
                       folder: str | Path, *, fingerprint: str | None = None,
                       step: int | None = None,
                       role: str = "train", key_seed: int = 0, mesh=None,
                       progress: bool = True, chunk_size: int = 64,
                       on_progress=None, log=None) -> np.ndarray:
    """Projected gradients ``[n, k]`` of ``out_fn`` for ``examples``, cached in ``folder``.

    Resumable (per chunk). Reopening with another config, checkpoint or data set raises
    :class:`~jaxattrib.attribution.store.StoreMismatchError` naming the field. Calls with the
    same ``out_fn`` object, config and parameter shapes reuse one compiled feature function
    (see the module docstring). On several processes (``jax.distributed``) call it on every
    process: process 0 creates the store, then each process computes and writes its share of
    the chunks (:func:`~jaxattrib.attribution.trak.featurize`); all return the whole ``[n, k]``
    (``folder`` on a shared file system). ``on_progress`` / ``log``: see
    :func:`~jaxattrib.attribution.trak.featurize`.

    ``fingerprint``: the key of this data in the store's metadata. None (default): computed
    from the arrays themselves (:func:`data_fingerprint`, including ``examples['index']`` when
    given), so reopening ``folder`` with other examples is refused with a
    :class:`~jaxattrib.attribution.store.StoreMismatchError` naming ``dataset_fingerprint``
    instead of returning the old features. An explicit string overrides it (for lazy rows, or
    a caller that already keys its data, e.g. the run's data reference); it is then trusted.
    The noise settings, method, role, timesteps, projection and checkpoint are separate
    metadata fields, so a change of any of them is refused as well.
    ``examples`` gains ``'index'`` (:func:`with_index`) for the per-example noise modes.
    """
    from jaxattrib import precision as prec
    projector = _projector(unet_params, config)
    n = trak_lib._num_examples(examples)
    if fingerprint is None:
        fingerprint = data_fingerprint(examples)
    examples = with_index(examples)
    meta = store_lib.feature_meta(
        projector_meta=projector.meta(), seed=config.proj_seed, output_fn=config.output_name,
        dataset_fingerprint=fingerprint,
        timesteps=None if config.method == "journey-trak" else
        timesteps_for(config, 1000).tolist(),
        checkpoint_steps=None if step is None else [int(step)],
        extra={"method": config.method, "role": role, "params": config.params,
               "num_timesteps": config.num_timesteps, "noise_seed": config.noise_seed,
               "key_seed": key_seed, "journey_resamples": config.journey_resamples,
               **config.noise_meta(), **prec.non_default(config)})
    from jaxattrib.parallel import on_process0_first
    st = on_process0_first(lambda: store_lib.ChunkedArray.open(
        folder, n_rows=n, n_cols=config.k, chunk_size=min(chunk_size, max(n, 1)), meta=meta),
        f"feature store {folder}")
    proj_batch = config.proj_batch or None
    cmesh = trak_lib.compute_mesh(mesh)
    micro, call_batch = trak_lib.batch_sizes(config.microbatch, proj_batch, st.chunk_size, cmesh)
    if cmesh is not None:  # replicated on the devices that compute (not committed elsewhere)
        from jax.sharding import NamedSharding, PartitionSpec
        unet_params = jax.device_put(unet_params, NamedSharding(cmesh, PartitionSpec()))
    grad_batch = micro if call_batch > micro else None
    # (other parameter shapes only retrace the same jitted function)
    cache_key = (id(out_fn), json.dumps(store_lib._canonical(projector.meta()), sort_keys=True),
                 config.params, grad_batch)
    # the entry keeps out_fn alive, so its id cannot be reused by another function meanwhile
    _, fn = _lru(_FEATURE_FNS, cache_key, lambda: (out_fn, params_feature_fn(
        out_fn, projector, spec=config.params, grad_batch=grad_batch)))
    with prec.matmul_precision(config.matmul_precision):  # traced (and cached) under it
        trak_lib.featurize(out_fn, unet_params, examples, projector, st,
                           microbatch=config.microbatch, mesh=mesh, progress=progress,
                           key=jax.random.PRNGKey(key_seed), spec=config.params,
                           proj_batch=proj_batch, on_progress=on_progress, log=log,
                           feature_fn=lambda ex, keys: fn(unet_params, ex, keys))
    return st.read_all()


def scores_from_features(phi_query: np.ndarray | Sequence[np.ndarray],
                         Phi_train: np.ndarray | Sequence[np.ndarray], lam: float,
                         sign: float = 1.0) -> np.ndarray:
    """TRAK scores ``[Q, N]`` (queries × training examples; larger = more attributed) with an
    absolute ``λ``: ``φ_q (ΦᵀΦ + λI)⁻¹ Φᵀ`` [paper]. ``phi_query [Q, k]``, ``Phi_train [N, k]``;
    lists (one per model) = ensembles with a common ``λ`` (:func:`ensemble_scores` gives each
    checkpoint its own relative ``λ``)."""
    s = trak_lib.trak_scores(phi_query, Phi_train, lam)
    return sign * np.asarray(s)


def ensemble_scores(phi_query: Sequence[np.ndarray], Phi_train: Sequence[np.ndarray],
                    lam_ratio: float, sign: float = 1.0) -> np.ndarray:
    """``[n_query, n_train]`` scores of a checkpoint ensemble: the mean over the M checkpoints
    of each one's scores with its own ``λ_m = lam_ratio · mean(diag(Φ_mᵀΦ_m))``
    (:func:`relative_lambdas`), i.e. ``trak.score`` over M models [paper: methods.md §1];
    M = 1 is the single-checkpoint score."""
    if len(phi_query) != len(Phi_train) or not len(Phi_train):
        raise ValueError(f"ensemble: {len(phi_query)} query and {len(Phi_train)} train feature "
                         f"sets; expected one of each per checkpoint (at least one)")
    lams = [relative_lambdas(P, [lam_ratio])[0] for P in Phi_train]
    kinvs = [trak_lib.trak_kernel_inverse(P, lam) for P, lam in zip(Phi_train, lams)]
    return sign * np.asarray(trak_lib.score(list(phi_query), list(Phi_train), kinvs))


def relative_lambdas(Phi_train: np.ndarray, ratios: Sequence[float]) -> list[float]:
    """λ = r · mean(diag(ΦᵀΦ)) for each ratio r (the scale-free grid used by our λ sweeps)."""
    scale = float(np.mean(np.sum(np.asarray(Phi_train, np.float64) ** 2, axis=0)))
    return [float(r) * scale for r in ratios]
