"""MONTRAGE: attribution by monitoring internal representations along the training trajectory.

Brokman et al., "MONTRAGE: Monitoring Training for Attribution of Generative Diffusion Models"
(ECCV 2024). The authors' code is not public and the layers, the added loss and the numbers were
not available to us, so most of this module is **jaxattrib's design**. What is from the paper and
what is ours:

From the paper [paper]:

* Attribution of a *customized* (fine-tuned) model whose training dynamics are available: the
  model's internal representations are monitored throughout training (here: at every checkpoint
  of the :class:`jaxattrib.train.record.TrajectoryRecord`, or live with :class:`MontrageMonitor`).
* Similarity of a generation and a training image is the cosine similarity of representations
  mapped to [0, 1] as ``(1 + cos) / 2`` (:func:`shifted_cosine`).
* Evaluation *between* concepts (which concept a generation comes from:
  :func:`concept_scores`, :func:`between_concept_accuracy`) and *within* a concept (which
  training image), and comparison with a *soft* ground truth by rank correlation
  (:func:`within_concept_spearman`). How the paper builds its soft ground truth is not
  available to us.

Ours [design]:

* Representation of an image ``x`` (model input: pixels, or latents for a latent model) under
  UNet parameters θ: ``x_t = add_noise(x, ε, t)`` at one fixed timestep ``t`` with a fixed noise
  ``ε = fixed_noise(noise_seed, t, x.shape)`` that is *shared by every image and every
  checkpoint* (``per_example_noise=True`` instead draws ``ε_i`` from ``(noise_seed, t, i)`` for
  the example's index ``i`` in its set, again the same at every checkpoint); one UNet call; the
  sown taps (default ``('mid', 'up_0')``) are global-average-pooled over H, W and
  concatenated (:func:`pooled_representations`); :func:`extract_representations`
  L2-normalises the concatenation. The raw pooled features are what is stored, so that
  per-tap similarities can be formed later (each tap normalised on its own).
* Latent models: the representation is taken on the UNet's model inputs, i.e. the VAE
  latents (encoded once by the caller, e.g. :func:`jaxattrib.models.latent_io.pipeline_inputs`
  with a recorded key); pixel images given to a latent UNet, or inputs whose size is not the
  UNet's ``sample_size``, raise :class:`MontrageInputError` (a ``ConfigError``) naming both
  shapes.
* Aggregation of the per-checkpoint similarities ``sims[s, q, i]`` into scores ``[Q, N]``
  (:func:`aggregate`):

  - ``'final'``: the last checkpoint only (= the representation-similarity baseline);
  - ``'mean'``: the mean over checkpoints;
  - ``'movement'``: checkpoint ``s >= 1`` is weighted, for training image ``i``, by how far
    ``i``'s (normalised) representation moved over the interval ending at ``s``,
    ``w[s, i] = ||r_s(i) − r_{s−1}(i)||``; optionally only intervals in which the record says
    ``i`` was trained on count (``seen='mask'``), or the weight is multiplied by the number of
    times it was seen (``seen='count'``); see :func:`seen_counts`. Images whose weights are
    all zero fall back to the mean;
  - ``'learned'``: softmax-parameterised checkpoint weights ``α = softmax(a)`` and tap weights
    ``β = softmax(b)`` with ``score = Σ_s Σ_l α_s β_l sim_{s,l}`` (per-tap shifted cosines),
    trained with a multi-positive InfoNCE loss on validation queries with known ground truth
    (:func:`fit_learned_weights`, optax Adam, explicit PRNG key), then applied to the test
    queries (:func:`learned_scores`).

* Mixed-concept generations with a soft ground truth (:mod:`jaxattrib.eval.mixed`,
  ``benchmarks/montrage_mixed.py``): two fine-tuned concepts A, B mixed in the text
  conditioning, ``α · E(prompt_A) + (1 − α) · E(prompt_B)``; ground truth ``α`` on A's
  exemplars, ``1 − α`` on B's, 0 elsewhere; Spearman ρ over all training images and how the
  A-vs-B split of the scores tracks ``α``. Only "rank correlation against a soft ground
  truth" is from the paper; the mixtures, the ground truth, the other metrics and the
  reuse of the customization benchmark's model are ours. Measured (BENCHMARKS.md,
  2026-11-26): the default trajectory aggregation does not beat the final checkpoint there
  either (ρ gain −0.003 [−0.009, +0.003]); the learned one gains +0.005 [+0.003, +0.008] over
  its final-checkpoint-only control; the A-vs-B split is already in the base model.
* The paper also adds a loss to the *training* objective; we do not change training (the
  fine-tuning loss is untouched). Our only loss is the post-hoc InfoNCE of the learned
  aggregation weights.
* Execution: data-parallel over the mesh's ``'data'`` axis (images sharded, parameters
  replicated; each image's result does not depend on the other images of its batch: with the
  same per-device batch size 1 and 8 devices agree bit for bit, otherwise to float32 rounding,
  ~3e-7 measured on CPU). Batches are padded to a fixed size so one compiled program serves every
  checkpoint. :func:`representation_trajectory` caches each checkpoint's arrays in a directory
  (one ``.npz`` per step, written atomically, plus a ``meta.json`` that must match) and
  resumes from it; :class:`MontrageMonitor` writes the same cache live during training
  (reusable by :func:`representation_trajectory` when its ``source`` is the record directory).
* Training-callback mode: ``finetune(..., on_checkpoint=monitor.on_checkpoint)``
  (:func:`jaxattrib.train.finetune.finetune`) monitors at every checkpoint as it is saved;
  the similarities equal the post-hoc ones to float32 rounding. Cost in the demo's
  fine-tuning setting (400 steps, 5 checkpoints, 60 + 24 images, loaded 2-core CPU):
  0.45–1 s per checkpoint, 1.0–2.4% of the fine-tuning time, against +12% for the post-hoc
  pass that reloads the checkpoints (BENCHMARKS.md).

Measured (demo run, BENCHMARKS.md "MONTRAGE: why monitoring does not beat the final
checkpoint in the demo", 2026-11-25;
``benchmarks/montrage_study.py``): with the default representation, no aggregation of the
trajectory beats the final checkpoint (movement-weighted −0.007 mAP, CI below 0; learned
+0.003, CI spans 0), because (1) the similarity ranking barely changes along training (rank
correlation 0.94–0.98 with the final one; the base model before fine-tuning already reaches
mAP 0.434 vs 0.452): pooled-tap similarity is mostly the base model's generic image
similarity; (2) the movement weights carry no image-specific information: representations
drift together (exemplars and distractors move the same, AUC 0.55), every image is trained
on 26–28 times between two checkpoints so ``seen`` counts are flat, and even after a single
update the images of its batch move only 1–8% more than the others (AUC 0.50–0.57), so the
weights are near-uniform and ``'movement'`` ≈ the mean of the checkpoints after step 0
(whose weight is 0 by construction); (3) the change of similarity
from the base model (final − step 0) is dominated by that drift and ranks far worse. Over 30
(t, tap) representations movement beats final about half the time (14/16/17 of 30 on the
val/test/fresh queries), but for the single up-block taps in 7/8/8 of 9 (up to +0.06
mAP); the choice of tap and ``t`` moves test mAP from 0.28 to 0.53. The plain
concatenation is dominated by the tap with the larger activations (``mid`` over ``up_0``:
mean pooled norms 16.9 vs 7.6 at t=200), so the default behaves like ``mid`` alone.
Defaults are unchanged: no aggregation beat the final checkpoint on the validation and both
held-out query sets with the default representation (the rule fixed before the study).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxattrib import integrity, parallel
from jaxattrib.authentication.similarity import pool_taps
from jaxattrib.diffusion.losses import fixed_noise
from jaxattrib.diffusion.schedule import Schedule, add_noise, make_schedule
from jaxattrib.fileio import atomic_write_bytes as _atomic_write
from jaxattrib.models.latent_io import ModelInputError, check_model_inputs
from jaxattrib.fingerprint import typed_arrays as _fingerprint  # recipe of stored caches

DEFAULT_TAPS = ("mid", "up_0")
META = "meta.json"
FORMAT = "jaxattrib.montrage_cache/1"


class MontrageError(ValueError):
    """Bad input to a MONTRAGE function (the message names the argument and expectation)."""


class MontrageInputError(MontrageError, ModelInputError):
    """Images that are not the UNet's model inputs (e.g. pixels given to a latent model); also a
    :class:`~jaxattrib.config.ConfigError`, so the CLI exits 2 with its one-line message."""


class MontrageCacheError(MontrageError):
    """A representation cache directory belongs to a different configuration or is corrupt."""


# ============================================================================ representations
@dataclasses.dataclass(frozen=True)
class RepresentationSpec:
    """How representations are taken (everything that changes them, except the parameters).

    taps: sown UNet intermediates (``down_i`` / ``mid`` / ``up_i``). t: integer timestep.
    noise_seed: seed of the fixed noise. per_example_noise: one ε per example index instead
    of one shared ε (see module docstring). batch_size: global batch (rounded up to a multiple
    of the data axis size).
    """

    taps: tuple[str, ...] = DEFAULT_TAPS
    t: int = 200
    noise_seed: int = 0
    per_example_noise: bool = False
    batch_size: int = 64

    def __post_init__(self):
        object.__setattr__(self, "taps", tuple(self.taps))
        if not self.taps:
            raise MontrageError("RepresentationSpec.taps: need at least one tap name")
        if self.batch_size <= 0:
            raise MontrageError(f"RepresentationSpec.batch_size must be > 0, got "
                                f"{self.batch_size}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"taps": list(self.taps)}


def _cross_dim(unet_config) -> int:
    d = unet_config.cross_attention_dim
    return int(d[0] if isinstance(d, (tuple, list)) else d)


def _check_images(images, ctx, unet_config, name: str, vae_config=None):
    """Model inputs ``[N, h, w, c]`` (the UNet's sample size and channels: VAE latents for a
    latent model, never its pixels) and ``ctx``; :class:`MontrageInputError` otherwise."""
    images = np.asarray(images, np.float32)
    try:
        check_model_inputs(images, unet_config, f"{name} images", vae_config)
    except ModelInputError as e:
        raise MontrageInputError(str(e)) from None
    if ctx is None:
        ctx = np.zeros((images.shape[0], 1, _cross_dim(unet_config)), np.float32)
    ctx = np.asarray(ctx, np.float32)
    if ctx.ndim != 3 or ctx.shape[0] != images.shape[0] \
            or ctx.shape[-1] != _cross_dim(unet_config):
        raise MontrageError(f"{name}: expected ctx [N={images.shape[0]}, L, "
                            f"{_cross_dim(unet_config)}] or None, got shape {ctx.shape}")
    return images, ctx


def _pool_fn(unet_config, taps: tuple[str, ...]) -> Callable:
    """``fn(params, sched, x[B,H,W,C], ctx[B,L,D], index[B], t, seed, per_example)`` -> list of
    pooled taps ``[B, C_tap]``; ``t``, ``seed``, ``per_example`` are traced (no recompiles)."""
    from jaxattrib.models.unet import UNet2DConditionModel
    unet = UNet2DConditionModel(unet_config)

    def fn(params, sched, x, ctx, index, t, seed, per_example):
        b = x.shape[0]
        tt = jnp.full((b,), t, jnp.int32)
        shared = jnp.broadcast_to(fixed_noise(seed, t, x.shape[1:], x.dtype), x.shape)
        own = jax.vmap(lambda i: jax.random.normal(
            jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), t), i),
            x.shape[1:], x.dtype))(index)
        eps = jnp.where(per_example, own, shared)
        x_t = add_noise(sched, x, eps, tt)
        _, state = unet.apply({"params": params}, x_t, tt, ctx, mutable=["intermediates"])
        inter = state["intermediates"]
        return [pool_taps(inter, (name,)) for name in taps]

    return fn


@functools.lru_cache(maxsize=16)
def _compiled_pool_fn(unet_config, taps: tuple[str, ...], mesh) -> Callable:
    # [design] a memo of jitted programs (like jax's own compilation cache), so that every
    # extractor with the same model config, taps and mesh reuses one compiled program.
    rep = parallel.replicated_sharding(mesh)
    data = parallel.data_sharding(mesh)
    return jax.jit(_pool_fn(unet_config, taps),
                   in_shardings=(rep, rep, data, data, data, rep, rep, rep),
                   out_shardings=data)


@functools.lru_cache(maxsize=16)
def _tap_dims(unet_config, taps: tuple[str, ...], image_shape: tuple[int, ...]) -> tuple[int, ...]:
    from jaxattrib.models.unet import param_shapes
    s = jax.ShapeDtypeStruct
    out = jax.eval_shape(
        _pool_fn(unet_config, taps), param_shapes(unet_config), make_schedule(),
        s((1,) + image_shape, jnp.float32), s((1, 1, _cross_dim(unet_config)), jnp.float32),
        s((1,), jnp.int32), 0, 0, False)
    return tuple(int(o.shape[-1]) for o in out)


class RepresentationExtractor:
    """Mesh-sharded ``(unet params, images, ctx) -> pooled taps [N, D_raw]``.

    Build it once and call it for every checkpoint: batches are padded to
    ``spec.batch_size`` so one compiled program (shared by extractors with the same config,
    taps and mesh; ``t`` and the noise settings are runtime values) serves every checkpoint.
    :meth:`tap_dims_for` gives the channel count of each tap in the concatenation.
    """

    def __init__(self, unet_config, spec: RepresentationSpec = RepresentationSpec(),
                 schedule: Schedule | None = None, mesh=None):
        self.unet_config = unet_config
        self.spec = spec
        self.schedule = make_schedule() if schedule is None else schedule
        self.mesh = parallel.make_mesh() if mesh is None else mesh
        n_dev = self.mesh.shape[parallel.DATA_AXIS]
        self.batch_size = -(-spec.batch_size // n_dev) * n_dev
        self._jitted = _compiled_pool_fn(unet_config, spec.taps, self.mesh)
        self._sched = None
        self._tap_dims: tuple[int, ...] | None = None

    def tap_dims_for(self, image_shape: Sequence[int]) -> tuple[int, ...]:
        """Channels of each tap for images ``[H, W, C]`` (shape evaluation, no compute)."""
        if self._tap_dims is None:
            self._tap_dims = _tap_dims(self.unet_config, self.spec.taps,
                                       tuple(int(d) for d in image_shape))
        return self._tap_dims

    def replicate_params(self, params: Any) -> Any:
        return parallel.replicate(params, self.mesh)

    def __call__(self, params: Any, images, ctx=None) -> np.ndarray:
        """Pooled (not normalised) taps ``float32 [N, sum(tap_dims)]`` of ``images [N,H,W,C]``
        with ``ctx [N, L, D]`` (None: one zero token). ``params``: UNet params (ideally
        already replicated with :meth:`replicate_params`)."""
        images, ctx = _check_images(images, ctx, self.unet_config, "RepresentationExtractor")
        n, b = images.shape[0], self.batch_size
        if self._sched is None:
            self._sched = parallel.replicate(self.schedule, self.mesh)
        scalars = parallel.replicate((np.int32(self.spec.t), np.int32(self.spec.noise_seed),
                                      np.bool_(self.spec.per_example_noise)), self.mesh)
        outs = []
        for start in range(0, n, b):
            x, c = images[start:start + b], ctx[start:start + b]
            m = x.shape[0]
            idx = np.arange(start, start + b, dtype=np.int32)
            if m < b:  # pad with copies of the last row (results dropped)
                x = np.concatenate([x, np.repeat(x[-1:], b - m, 0)])
                c = np.concatenate([c, np.repeat(c[-1:], b - m, 0)])
            xs, cs, ids = parallel.shard_batch((x, c, idx), self.mesh)
            feats = self._jitted(params, self._sched, xs, cs, ids, *scalars)
            outs.append([np.asarray(f)[:m] for f in feats])
        if not outs:
            return np.zeros((0, sum(self.tap_dims_for(images.shape[1:]))), np.float32)
        self._tap_dims = tuple(int(f.shape[-1]) for f in outs[0])
        return np.concatenate([np.concatenate(o, axis=-1) for o in outs]).astype(np.float32)


def pooled_representations(unet_config, unet_params, images, ctx=None, *,
                           taps: Sequence[str] = DEFAULT_TAPS, t: int = 200,
                           noise_seed: int = 0, per_example_noise: bool = False,
                           batch_size: int = 64, schedule: Schedule | None = None,
                           mesh=None) -> np.ndarray:
    """Global-average-pooled, concatenated taps ``float32 [N, sum C_tap]`` (not normalised).

    See :func:`extract_representations` for the arguments.
    """
    spec = RepresentationSpec(taps=tuple(taps), t=t, noise_seed=noise_seed,
                              per_example_noise=per_example_noise, batch_size=batch_size)
    ext = RepresentationExtractor(unet_config, spec, schedule, mesh)
    return ext(ext.replicate_params(unet_params), images, ctx)


def l2_normalize(x, axis: int = -1, eps: float = 1e-12):
    """``x`` scaled to unit L2 norm along ``axis`` (numpy or jax arrays; zero rows stay 0)."""
    xp = jnp if isinstance(x, jax.Array) else np
    return x / xp.maximum(xp.linalg.norm(x, axis=axis, keepdims=True), eps)


def extract_representations(unet_config, unet_params, images, ctx=None, *,
                            taps: Sequence[str] = DEFAULT_TAPS, t: int = 200,
                            noise_seed: int = 0, per_example_noise: bool = False,
                            batch_size: int = 64, schedule: Schedule | None = None,
                            mesh=None) -> np.ndarray:
    """MONTRAGE representations ``float32 [N, D_rep]`` of ``images`` under ``unet_params``.

    ``x_t = add_noise(schedule, images, ε, t)`` with the fixed ε of the module docstring, one
    UNet call, global average pool of each tap, concatenation, L2 normalisation [design].

    Args:
      unet_config: ``jaxattrib.models.unet.UNetConfig``.
      unet_params: the UNet's parameters.
      images: ``[N, H, W, C]`` model inputs (pixels in [-1, 1], or VAE latents for a latent
        model), NHWC.
      ctx: ``encoder_hidden_states [N, L, D]`` or None (one zero token per image).
      taps: sown intermediates to use (``down_i``, ``mid``, ``up_i``).
      t: integer timestep (0 .. T-1). noise_seed: seed of the fixed ε.
      per_example_noise: one ε per example index instead of one shared by all.
      batch_size: images per UNet call (rounded up to a multiple of the devices).
      schedule: forward-noising schedule (default: ``make_schedule()``, DDPM linear).
      mesh: device mesh with a ``'data'`` axis (default: all devices).
    """
    return l2_normalize(pooled_representations(
        unet_config, unet_params, images, ctx, taps=taps, t=t, noise_seed=noise_seed,
        per_example_noise=per_example_noise, batch_size=batch_size, schedule=schedule,
        mesh=mesh))


# ============================================================================ similarities
def shifted_cosine(a, b):
    """``(1 + cos(a_q, b_i)) / 2`` for all pairs: ``a [Q, D]``, ``b [N, D]`` -> ``[Q, N]`` in
    [0, 1] [paper]. Rows need not be normalised (zero rows give 0.5)."""
    a, b = l2_normalize(a), l2_normalize(b)
    xp = jnp if isinstance(a, jax.Array) or isinstance(b, jax.Array) else np
    return xp.clip((1.0 + a @ b.T) / 2.0, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class RepTrajectory:
    """Pooled tap features along training.

    steps: ``int [S]`` checkpoint steps, ascending. train: ``float32 [S, N, D_raw]``.
    query: ``float32 [S, Q, D_raw]``. taps / tap_dims: the concatenated taps and their
    channel counts (``sum(tap_dims) == D_raw``).
    """

    steps: np.ndarray
    train: np.ndarray
    query: np.ndarray
    taps: tuple[str, ...]
    tap_dims: tuple[int, ...]

    def _slices(self, taps: Sequence[str] | None) -> list[slice]:
        bounds = np.concatenate([[0], np.cumsum(self.tap_dims)])
        names = self.taps if taps is None else tuple(taps)
        out = []
        for name in names:
            if name not in self.taps:
                raise MontrageError(f"tap {name!r} is not in the trajectory's taps {self.taps}")
            j = self.taps.index(name)
            out.append(slice(int(bounds[j]), int(bounds[j + 1])))
        return out

    def representations(self, which: str = "train", taps: Sequence[str] | None = None):
        """L2-normalised concatenation of ``taps`` (default all) -> ``[S, N or Q, D]``."""
        x = {"train": self.train, "query": self.query}[which]
        return l2_normalize(np.concatenate([x[..., s] for s in self._slices(taps)], -1))

    def similarities(self, taps: Sequence[str] | None = None) -> np.ndarray:
        """Shifted cosine per checkpoint ``[S, Q, N]`` of the concatenated ``taps``."""
        tr, qu = self.representations("train", taps), self.representations("query", taps)
        return np.stack([shifted_cosine(qu[s], tr[s]) for s in range(len(self.steps))])

    def tap_similarities(self) -> np.ndarray:
        """Shifted cosine per checkpoint and tap (each tap normalised alone) ``[S, T, Q, N]``."""
        return np.stack([self.similarities((name,)) for name in self.taps], axis=1)

    def movement(self, taps: Sequence[str] | None = None) -> np.ndarray:
        """``[S, N]``: ``||r_s(i) − r_{s−1}(i)||`` of the normalised train representations;
        row 0 is 0."""
        r = self.representations("train", taps)
        out = np.zeros(r.shape[:2], np.float32)
        out[1:] = np.linalg.norm(np.diff(r, axis=0), axis=-1)
        return out


# ============================================================================ cache


class TrajectoryCache:
    """A directory of per-checkpoint representation arrays (``step_<k>.npz`` with ``train``
    and ``query``) and a ``meta.json`` describing how they were made; writes are atomic and
    each step file has a checksum sidecar (``step_<k>.npz.sha256``): a step whose bytes do not
    match is dropped with a notice (:meth:`has` is false) and recomputed.

    Opening a directory whose ``meta.json`` differs raises :class:`MontrageCacheError` naming
    the first differing field; nothing is written then.
    """

    def __init__(self, directory: str | os.PathLike, meta: Mapping):
        self.directory = Path(directory)
        self.meta = json.loads(json.dumps(dict(meta) | {"format": FORMAT}))
        path = self.directory / META
        if path.exists():
            try:
                old = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise MontrageCacheError(f"{path}: not valid JSON ({e})") from e
            for k in sorted(set(old) | set(self.meta)):
                if old.get(k) != self.meta.get(k):
                    raise MontrageCacheError(
                        f"{self.directory}: cache was made with {k}={old.get(k)!r}, requested "
                        f"{k}={self.meta.get(k)!r}; use another cache directory")
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            _atomic_write(path, json.dumps(self.meta, indent=2, sort_keys=True).encode())

    def _path(self, step: int) -> Path:
        return self.directory / f"step_{int(step):010d}.npz"

    def steps(self) -> list[int]:
        return sorted(int(p.stem[5:]) for p in self.directory.glob("step_*.npz"))

    def has(self, step: int) -> bool:
        return integrity.read_checked(self._path(step), what="MONTRAGE step") is not None

    def load(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        blob = integrity.read_checked(self._path(step), what="MONTRAGE step")
        if blob is None:
            raise MontrageCacheError(f"{self._path(step)}: missing or corrupt; rerun to "
                                     f"recompute it")
        try:
            with np.load(io.BytesIO(blob)) as z:
                return z["train"], z["query"]
        except (OSError, KeyError, ValueError) as e:
            raise MontrageCacheError(f"{self._path(step)}: unreadable ({e})") from e

    def save(self, step: int, train: np.ndarray, query: np.ndarray) -> None:
        buf = io.BytesIO()
        np.savez(buf, train=np.asarray(train, np.float32), query=np.asarray(query, np.float32))
        integrity.write_checked(self._path(step), buf.getvalue())


def _cache_meta(spec: RepresentationSpec, unet_config, schedule: Schedule, train_images,
                train_ctx, query_images, query_ctx, source: str | None) -> dict:
    return {"spec": spec.to_dict() | {"batch_size": None},  # batch size does not matter
            "unet_config": repr(unet_config),
            "schedule": _fingerprint(schedule.alphas_cumprod),
            "train": _fingerprint(train_images, train_ctx),
            "query": _fingerprint(query_images, query_ctx),
            "source": source}


def _source_ref(source: str | os.PathLike | None, cache_dir: str | os.PathLike) -> str | None:
    """The cache's name for the record it was computed from: the record's path relative to the
    cache directory, so a run directory holding both stays valid when moved. A cache written
    before this convention holds the absolute path; it is kept while it still names the same
    directory."""
    if source is None:
        return None
    absolute = str(Path(source).resolve())
    meta = Path(cache_dir) / META
    if meta.is_file():
        try:
            if json.loads(meta.read_text()).get("source") == absolute:
                return absolute
        except (json.JSONDecodeError, AttributeError):
            pass   # TrajectoryCache reports the broken meta.json
    return os.path.relpath(absolute, Path(cache_dir).resolve())


def _unet_params(params: Any, params_key: str | None):
    if params_key is None:
        return params
    if not isinstance(params, Mapping) or params_key not in params:
        raise MontrageError(f"params have no {params_key!r} entry (keys "
                            f"{list(params) if isinstance(params, Mapping) else type(params)});"
                            f" pass params_key=None if they are the UNet's own parameters")
    return params[params_key]


def representation_trajectory(record, unet_config, train_images, train_ctx, query_images,
                              query_ctx, *, steps: Sequence[int] | None = None,
                              spec: RepresentationSpec = RepresentationSpec(),
                              schedule: Schedule | None = None, mesh=None,
                              cache_dir: str | os.PathLike | None = None,
                              params_key: str | None = "unet",
                              progress: bool = True) -> RepTrajectory:
    """Pooled tap features of training images and queries at every checkpoint of ``record``.

    Args:
      record: a :class:`jaxattrib.train.record.TrajectoryRecord` (``record.load(step)`` gives
        the model parameters; the UNet's are ``[params_key]``).
      unet_config: the UNet's config.
      train_images, query_images: ``[N, H, W, C]`` / ``[Q, H, W, C]`` model inputs (NHWC).
      train_ctx, query_ctx: ``[N, L, D]`` / ``[Q, L, D]`` text states, or None.
      steps: checkpoints to use (default: all of the record's), sorted ascending.
      spec: :class:`RepresentationSpec` (taps, t, noise seed, batch size).
      schedule: forward-noising schedule (default ``make_schedule()``).
      mesh: device mesh (default: all devices).
      cache_dir: per-checkpoint cache; checkpoints already there are not recomputed (resume).
      params_key: key of the UNet parameters in the record's params (None: the whole tree).
      progress: tqdm bar over checkpoints.
    """
    schedule = make_schedule() if schedule is None else schedule
    train_images, train_ctx = _check_images(train_images, train_ctx, unet_config, "train")
    query_images, query_ctx = _check_images(query_images, query_ctx, unet_config, "query")
    all_steps = record.steps()
    steps = all_steps if steps is None else sorted(int(s) for s in steps)
    missing = sorted(set(steps) - set(all_steps))
    if missing or not steps:
        raise MontrageError(f"steps {missing or steps} are not checkpoints of "
                            f"{record.directory} (it has {all_steps})")
    ext = RepresentationExtractor(unet_config, spec, schedule, mesh)
    cache = None
    if cache_dir is not None:
        cache = TrajectoryCache(cache_dir, _cache_meta(
            spec, unet_config, schedule, train_images, train_ctx, query_images, query_ctx,
            _source_ref(record.directory, cache_dir)))
    it = steps
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(steps, desc="montrage", unit="ckpt", dynamic_ncols=True)
    train, query = [], []
    for s in it:
        if cache is not None and cache.has(s):
            tr, qu = cache.load(s)
        else:
            p = ext.replicate_params(_unet_params(record.load(s), params_key))
            tr, qu = ext(p, train_images, train_ctx), ext(p, query_images, query_ctx)
            if cache is not None:
                cache.save(s, tr, qu)
        train.append(tr)
        query.append(qu)
    return RepTrajectory(np.asarray(steps, np.int64), np.stack(train), np.stack(query),
                         spec.taps, ext.tap_dims_for(train_images.shape[1:]))


def similarity_trajectory(record, unet_config, train_images, train_ctx, query_images,
                          query_ctx, *, steps: Sequence[int] | None = None,
                          **kwargs) -> np.ndarray:
    """Shifted cosine ``(1 + cos)/2`` per checkpoint ``[n_steps, Q, N]`` of the concatenated
    taps; arguments as :func:`representation_trajectory` (resumable with ``cache_dir``)."""
    return representation_trajectory(record, unet_config, train_images, train_ctx,
                                     query_images, query_ctx, steps=steps,
                                     **kwargs).similarities()


class MontrageMonitor:
    """Takes MONTRAGE representations live during fine-tuning (no checkpoint reloading).

    Call :meth:`on_checkpoint` with the full model parameters at each checkpoint; it has the
    signature of :func:`jaxattrib.train.finetune.finetune`'s checkpoint hook, so monitoring
    runs on the fly during fine-tuning::

        mon = MontrageMonitor(unet_config, x_train, ctx_train, x_query, ctx_query,
                              cache_dir=run_dir / "montrage", source=record_dir)
        finetune(loss_fn, params, n, get_batch, config, record_dir,
                 on_checkpoint=mon.on_checkpoint)
        traj = mon.trajectory()

    :meth:`trajectory` returns the :class:`RepTrajectory` of the checkpoints seen by this
    monitor (a resumed ``finetune`` announces only its new checkpoints). With ``cache_dir``
    every checkpoint is also written to a :class:`TrajectoryCache` (the same format
    :func:`representation_trajectory` reads when given the same ``cache_dir`` and the record
    directory as ``source``), so after a resumed run ``representation_trajectory`` with that
    cache gives the whole trajectory, recomputing only the checkpoints the monitor missed.
    Live and post-hoc similarities agree to float32 rounding (``tests/test_montrage.py``
    asserts 1e-6; bit-identical in that test). Overhead: see BENCHMARKS.md.
    """

    def __init__(self, unet_config, train_images, train_ctx, query_images, query_ctx, *,
                 spec: RepresentationSpec = RepresentationSpec(),
                 schedule: Schedule | None = None, mesh=None,
                 params_key: str | None = "unet", cache_dir: str | os.PathLike | None = None,
                 source: str | None = None):
        schedule = make_schedule() if schedule is None else schedule
        self._train = _check_images(train_images, train_ctx, unet_config, "train")
        self._query = _check_images(query_images, query_ctx, unet_config, "query")
        self._ext = RepresentationExtractor(unet_config, spec, schedule, mesh)
        self._spec = spec
        self._params_key = params_key
        self._cache = None if cache_dir is None else TrajectoryCache(cache_dir, _cache_meta(
            spec, unet_config, schedule, *self._train, *self._query,
            _source_ref(source, cache_dir)))
        self._steps: list[int] = []
        self._reps: list[tuple[np.ndarray, np.ndarray]] = []

    def on_checkpoint(self, step: int, params: Any) -> None:
        """Computes and stores the representations under ``params`` (full model params; the
        UNet's are ``[params_key]``) for checkpoint ``step`` (steps must increase)."""
        if self._steps and step <= self._steps[-1]:
            raise MontrageError(f"on_checkpoint: step {step} after step {self._steps[-1]}; "
                                f"steps must increase")
        p = self._ext.replicate_params(_unet_params(params, self._params_key))
        tr, qu = self._ext(p, *self._train), self._ext(p, *self._query)
        if self._cache is not None:
            self._cache.save(step, tr, qu)
        self._steps.append(int(step))
        self._reps.append((tr, qu))

    def trajectory(self) -> RepTrajectory:
        if not self._steps:
            raise MontrageError("MontrageMonitor.trajectory: no checkpoint recorded yet")
        return RepTrajectory(np.asarray(self._steps, np.int64),
                             np.stack([r[0] for r in self._reps]),
                             np.stack([r[1] for r in self._reps]), self._spec.taps,
                             self._ext.tap_dims_for(self._train[0].shape[1:]))


# ============================================================================ aggregation
def seen_counts(record, steps: Sequence[int], num_examples: int | None = None) -> np.ndarray:
    """``int64 [S, N]``: how many times example ``i`` was in the batches of the interval
    ``(steps[s-1], steps[s]]`` (updates ``steps[s-1] .. steps[s]-1`` of ``record.step_info``);
    row 0 counts the updates before ``steps[0]`` (0 when ``steps[0] == 0``).

    ``num_examples`` defaults to the record manifest's ``dataset.size``.
    """
    if num_examples is None:
        num_examples = record.manifest.get("dataset", {}).get("size")
        if num_examples is None:
            raise MontrageError(f"{record.directory}: manifest has no dataset.size; pass "
                                f"num_examples")
    steps = [int(s) for s in steps]
    out = np.zeros((len(steps), int(num_examples)), np.int64)
    prev = 0
    for j, s in enumerate(steps):
        for u in range(prev, s):
            idx = record.step_info(u)["indices"]
            if idx.size and (idx.min() < 0 or idx.max() >= num_examples):
                raise MontrageError(f"{record.directory}: step {u} has indices outside "
                                    f"[0, {num_examples})")
            np.add.at(out[j], idx, 1)
        prev = s
    return out


def movement_weights(movement: np.ndarray, counts: np.ndarray | None = None,
                     seen: str = "ignore") -> np.ndarray:
    """Checkpoint weights ``[S, N]`` for the ``'movement'`` aggregation [design].

    movement: ``[S, N]`` from :meth:`RepTrajectory.movement` (row 0 is 0). counts: ``[S, N]``
    from :func:`seen_counts` (needed unless ``seen='ignore'``). seen: ``'ignore'`` (weight =
    movement), ``'mask'`` (only intervals in which the image was trained on), ``'count'``
    (movement times the number of times it was seen).
    """
    movement = np.asarray(movement, np.float64)
    if seen == "ignore":
        return movement
    if seen not in ("mask", "count"):
        raise MontrageError(f"seen must be 'ignore', 'mask' or 'count', got {seen!r}")
    if counts is None or np.shape(counts) != movement.shape:
        raise MontrageError(f"seen={seen!r} needs counts of shape {movement.shape}, got "
                            f"{None if counts is None else np.shape(counts)}")
    counts = np.asarray(counts, np.float64)
    return movement * (counts > 0) if seen == "mask" else movement * counts


def weighted_scores(sims: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``[Q, N]``: ``Σ_s w[s,i] sims[s,q,i] / Σ_s w[s,i]``; images with all-zero weights get
    the unweighted mean. sims ``[S, Q, N]``, weights ``[S, N]`` (non-negative)."""
    sims = np.asarray(sims, np.float64)
    w = np.asarray(weights, np.float64)
    if sims.ndim != 3 or w.shape != (sims.shape[0], sims.shape[2]):
        raise MontrageError(f"weighted_scores: sims [S, Q, N] and weights [S, N]; got "
                            f"{sims.shape} and {w.shape}")
    if (w < 0).any():
        raise MontrageError("weighted_scores: weights must be non-negative")
    total = w.sum(0)
    w = np.where(total > 0, w / np.where(total > 0, total, 1.0), 1.0 / sims.shape[0])
    return np.einsum("sqn,sn->qn", sims, w)


def aggregate(sims: np.ndarray, method: str = "mean", *, movement: np.ndarray | None = None,
              counts: np.ndarray | None = None, seen: str = "ignore") -> np.ndarray:
    """Trajectory similarities ``[S, Q, N]`` -> scores ``[Q, N]`` (module docstring).

    method: ``'final'`` | ``'mean'`` | ``'movement'`` (needs ``movement [S, N]``, and
    ``counts`` for ``seen != 'ignore'``). For ``'learned'`` use :func:`fit_learned_weights`
    and :func:`learned_scores`.
    """
    sims = np.asarray(sims, np.float64)
    if sims.ndim != 3 or sims.shape[0] == 0:
        raise MontrageError(f"aggregate: sims must be [S>0, Q, N], got {sims.shape}")
    if method == "final":
        return sims[-1]
    if method == "mean":
        return sims.mean(0)
    if method == "movement":
        if movement is None:
            raise MontrageError("aggregate(method='movement') needs movement [S, N]")
        return weighted_scores(sims, movement_weights(movement, counts, seen))
    raise MontrageError(f"aggregate: method must be 'final', 'mean' or 'movement', got "
                        f"{method!r}")


def trajectory_scores(traj: RepTrajectory, method: str = "mean", *, record=None,
                      seen: str = "ignore") -> np.ndarray:
    """Scores ``[Q, N]`` from a :class:`RepTrajectory` (``record`` gives the seen counts for
    ``method='movement'`` with ``seen != 'ignore'``)."""
    sims = traj.similarities()
    counts = None
    if method == "movement" and seen != "ignore":
        if record is None:
            raise MontrageError(f"seen={seen!r} needs the record")
        counts = seen_counts(record, traj.steps, traj.train.shape[1])
    return aggregate(sims, method, movement=traj.movement() if method == "movement" else None,
                     counts=counts, seen=seen)


# ---------------------------------------------------------------------------- learned weights
def learned_scores(weights: Mapping, tap_sims) -> jax.Array:
    """``[Q, N]``: ``Σ_s Σ_l softmax(a)_s softmax(b)_l tap_sims[s, l]``.

    weights: ``{'step_logits': [S], 'tap_logits': [T]}``; tap_sims ``[S, T, Q, N]``
    (:meth:`RepTrajectory.tap_similarities`).
    """
    a = jax.nn.softmax(weights["step_logits"])
    b = jax.nn.softmax(weights["tap_logits"])
    return jnp.einsum("s,l,slqn->qn", a, b, jnp.asarray(tap_sims))


def infonce_loss(weights: Mapping, tap_sims, relevant, temperature: float = 0.05) -> jax.Array:
    """Multi-positive InfoNCE over training images, mean over queries [design]:
    ``-log Σ_{i ∈ pos(q)} exp(s_qi/τ) / Σ_i exp(s_qi/τ)`` with ``s = learned_scores``.

    relevant: bool ``[Q, N]``; every query needs at least one positive.
    """
    logits = learned_scores(weights, tap_sims) / temperature
    pos = jnp.where(jnp.asarray(relevant), logits, -jnp.inf)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - jax.nn.logsumexp(pos, axis=-1))


def init_learned_weights(num_steps: int, num_taps: int, key: jax.Array | None = None,
                         scale: float = 1e-2) -> dict:
    """Logits ``{'step_logits': [S], 'tap_logits': [T]}``: zeros (uniform weights = the mean
    aggregation) plus ``scale``-sized normal noise from ``key`` (None: exactly zeros)."""
    w = {"step_logits": jnp.zeros((num_steps,), jnp.float32),
         "tap_logits": jnp.zeros((num_taps,), jnp.float32)}
    if key is not None:
        k1, k2 = jax.random.split(key)
        w = {"step_logits": scale * jax.random.normal(k1, (num_steps,)),
             "tap_logits": scale * jax.random.normal(k2, (num_taps,))}
    return w


def fit_learned_weights(tap_sims, relevant, key: jax.Array, *, num_iters: int = 200,
                        learning_rate: float = 0.05, temperature: float = 0.05,
                        query_batch: int | None = None) -> tuple[dict, np.ndarray]:
    """Learns checkpoint/tap weights on validation queries with known ground truth.

    Args:
      tap_sims: ``[S, T, Qv, N]`` per-tap shifted cosines of the validation queries.
      relevant: bool ``[Qv, N]`` ground truth (each query needs one positive or more).
      key: PRNG key (initial logits noise, query mini-batches); same key -> same weights.
      num_iters: Adam iterations. learning_rate: Adam step size. temperature: InfoNCE τ.
      query_batch: queries per iteration (None: all, full batch).

    Returns:
      ``(weights, losses)``: the weights for :func:`learned_scores` and the full-batch
      validation loss before the first and after every iteration (``float64 [num_iters+1]``).
    """
    tap_sims = jnp.asarray(tap_sims, jnp.float32)
    relevant = jnp.asarray(relevant, bool)
    if tap_sims.ndim != 4 or relevant.shape != tap_sims.shape[2:]:
        raise MontrageError(f"fit_learned_weights: tap_sims [S, T, Q, N] and relevant [Q, N]; "
                            f"got {tap_sims.shape} and {relevant.shape}")
    if not bool(relevant.any(-1).all()):
        raise MontrageError("fit_learned_weights: every validation query needs a relevant "
                            "training image")
    S, T, Q, _ = tap_sims.shape
    k_init, k_batch = jax.random.split(key)
    weights = init_learned_weights(S, T, k_init)
    qb = None if query_batch is None or query_batch >= Q else int(query_batch)
    weights, losses = _fit(weights, tap_sims, relevant, k_batch, jnp.float32(learning_rate),
                           jnp.float32(temperature), int(num_iters), qb)
    return jax.tree.map(np.asarray, weights), np.asarray(losses, np.float64)


@functools.partial(jax.jit, static_argnums=(6, 7))
def _fit(weights, tap_sims, relevant, k_batch, learning_rate, temperature, num_iters,
         query_batch):
    """Adam on :func:`infonce_loss` for ``num_iters`` steps (``lax.scan``); returns the
    weights and the full-batch loss before and after every step."""
    opt = optax.adam(learning_rate)
    Q = tap_sims.shape[2]

    def body(carry, i):
        w, state = carry
        if query_batch is None:
            ts, rel = tap_sims, relevant
        else:
            sel = jax.random.choice(jax.random.fold_in(k_batch, i), Q, (query_batch,),
                                    replace=False)
            ts, rel = tap_sims[:, :, sel], relevant[sel]
        g = jax.grad(infonce_loss)(w, ts, rel, temperature)
        upd, state = opt.update(g, state, w)
        w = optax.apply_updates(w, upd)
        return (w, state), infonce_loss(w, tap_sims, relevant, temperature)

    (w, _), losses = jax.lax.scan(body, (weights, opt.init(weights)), jnp.arange(num_iters))
    return w, jnp.concatenate([infonce_loss(weights, tap_sims, relevant, temperature)[None],
                               losses])


# ============================================================================ evaluation [paper]
def concept_scores(scores: np.ndarray, train_concepts: np.ndarray, num_concepts: int | None = None,
                   reduce: str = "max") -> np.ndarray:
    """Per-concept scores ``[Q, C]`` from image scores ``[Q, N]``: the max (or mean) over the
    training images of each concept (``train_concepts`` int ``[N]`` in ``[0, C)``) [design].
    Concepts without images get ``-inf``."""
    if reduce not in ("max", "mean"):
        raise MontrageError(f"concept_scores: reduce must be 'max' or 'mean', got {reduce!r}")
    scores = np.asarray(scores, np.float64)
    c = np.asarray(train_concepts, np.int64)
    if c.shape != scores.shape[-1:]:
        raise MontrageError(f"concept_scores: train_concepts must be [N={scores.shape[-1]}], "
                            f"got {c.shape}")
    C = int(c.max()) + 1 if num_concepts is None else int(num_concepts)
    out = np.full((scores.shape[0], C), -np.inf)
    for k in range(C):
        m = c == k
        if m.any():
            out[:, k] = scores[:, m].max(1) if reduce == "max" else scores[:, m].mean(1)
    return out


def between_concept_accuracy(scores: np.ndarray, train_concepts: np.ndarray,
                             query_concepts: np.ndarray, reduce: str = "max") -> float:
    """Between-concept evaluation [paper]: fraction of queries whose top-scoring concept
    (:func:`concept_scores`) is their true concept (``query_concepts`` int ``[Q]``)."""
    cs = concept_scores(scores, train_concepts, None, reduce)
    q = np.asarray(query_concepts, np.int64)
    if q.shape != (cs.shape[0],):
        raise MontrageError(f"query_concepts must be [Q={cs.shape[0]}], got {q.shape}")
    return float(np.mean(np.argmax(cs, axis=1) == q))


def within_concept_spearman(scores: np.ndarray, soft_truth: np.ndarray,
                            train_concepts: np.ndarray,
                            query_concepts: np.ndarray) -> np.ndarray:
    """Within-concept evaluation [paper]: per query, the Spearman rank correlation between its
    scores and the soft ground truth over the training images of its own concept -> ``[Q]``
    (NaN when either is constant there). scores, soft_truth ``[Q, N]``."""
    from jaxattrib.metrics import spearman_columns
    scores = np.asarray(scores, np.float64)
    soft = np.asarray(soft_truth, np.float64)
    if soft.shape != scores.shape:
        raise MontrageError(f"soft_truth must have the scores' shape {scores.shape}, got "
                            f"{soft.shape}")
    tc = np.asarray(train_concepts, np.int64)
    qc = np.asarray(query_concepts, np.int64)
    out = np.full(scores.shape[0], np.nan)
    for q in range(scores.shape[0]):
        m = tc == qc[q]
        if m.sum() >= 2:
            out[q] = spearman_columns(scores[q, m][:, None], soft[q, m][:, None])[0]
    return out
