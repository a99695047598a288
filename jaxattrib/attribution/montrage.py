"""MONTRAGE: attribution by monitoring internal representations along the training trajectory.

Brokman et al., "MONTRAGE: Monitoring Training for Attribution of Generative Diffusion Models"
(ECCV 2024). The authors' code, layers, added loss and numbers are not public, so most of this
module is **jaxattrib's design** (docs/methods.md "MONTRAGE"). From the paper [paper]: a
*customized* (fine-tuned) model's representations are monitored throughout training (here:
every checkpoint of a :class:`jaxattrib.train.record.TrajectoryRecord`, or live with
:class:`MontrageMonitor`); similarity = ``(1 + cos) / 2`` (:func:`shifted_cosine`); evaluation
between concepts (:func:`concept_scores`, :func:`between_concept_accuracy`), within a concept,
and against a *soft* ground truth by rank correlation (:func:`within_concept_spearman`; the
paper's soft ground truth is not available to us).

Ours [design]:

* Representation of a model input ``x`` (pixels, or VAE latents ``[N, h, w, c]`` for a latent
  model, encoded once by the caller) under UNet parameters θ: ``x_t = add_noise(x, ε, t)`` at
  one fixed ``t`` with ``ε = fixed_noise(noise_seed, t, x.shape)`` shared by every image and
  checkpoint (``per_example_noise=True``: ``ε_i`` from ``(noise_seed, t, i)``); one UNet call;
  the sown taps (default ``('mid', 'up_0')``) global-average-pooled over H, W and concatenated
  (:func:`pooled_representations`, raw, so per-tap similarities can be formed later);
  :func:`extract_representations` L2-normalises. Wrong inputs (pixels to a latent UNet, a size
  not the UNet's ``sample_size``) raise :class:`MontrageInputError` naming both shapes.
* Aggregation of ``sims[s, q, i]`` into scores ``[Q, N]`` (:func:`aggregate`): ``'final'``
  (last checkpoint = the representation-similarity baseline); ``'mean'``; ``'movement'``
  (checkpoint ``s >= 1`` weighted for image ``i`` by ``w[s, i] = ||r_s(i) − r_{s−1}(i)||``,
  with ``seen='mask'|'count'`` from the record's step log, :func:`seen_counts`; all-zero
  weights fall back to the mean); ``'learned'`` (``α = softmax(a)`` over checkpoints, ``β =
  softmax(b)`` over taps, ``score = Σ_s Σ_l α_s β_l sim_{s,l}``, fitted by multi-positive
  InfoNCE on validation queries, :func:`fit_learned_weights` / :func:`learned_scores`).
* Training is unchanged (the paper adds a loss; ours is only the learned weights' InfoNCE).
  The mixed-concept soft ground truth (:mod:`jaxattrib.eval.mixed`) is ours.
* Execution: data-parallel over the mesh's ``'data'`` axis (1 vs 8 devices agree bit for bit
  at the same per-device batch, else to float32 rounding, ~3e-7 on CPU); batches padded to one
  size, one compiled program for every checkpoint; :func:`representation_trajectory` caches an
  atomic ``.npz`` per step (and a ``meta.json`` that must match) and resumes;
  ``finetune(..., on_checkpoint=monitor.on_checkpoint)`` writes the same cache live (equal to
  the post-hoc pass to float32 rounding).

Measured (overhead, the demo study: no aggregation beats the final checkpoint, and why; mixed
concepts): docs/benchmarks/montrage.md, docs/benchmarks/mixed_concept.md.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxattrib import integrity
from jaxattrib.diffusion.schedule import Schedule, make_schedule
from jaxattrib.fileio import atomic_write_bytes as _atomic_write
from jaxattrib.fingerprint import typed_arrays as _fingerprint  # recipe of stored caches
from jaxattrib.attribution.montrage_reps import (DEFAULT_TAPS, MontrageCacheError, MontrageError,
                                                 MontrageInputError, RepresentationExtractor,
                                                 RepresentationSpec, _check_images,
                                                 extract_representations, l2_normalize,
                                                 pooled_representations)
from jaxattrib.attribution.montrage_weights import (aggregate, between_concept_accuracy,
                                                    concept_scores, fit_learned_weights,
                                                    infonce_loss, init_learned_weights,
                                                    learned_scores, movement_weights, seen_counts,
                                                    weighted_scores, within_concept_spearman)


META = "meta.json"


FORMAT = "jaxattrib.montrage_cache/1"


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


__all__ = ["DEFAULT_TAPS", "FORMAT", "META", "MontrageCacheError", "MontrageError",
           "MontrageInputError", "MontrageMonitor", "RepTrajectory", "RepresentationExtractor",
           "RepresentationSpec", "TrajectoryCache", "aggregate", "between_concept_accuracy",
           "concept_scores", "extract_representations", "fit_learned_weights", "infonce_loss",
           "init_learned_weights", "l2_normalize", "learned_scores", "movement_weights",
           "pooled_representations", "representation_trajectory", "seen_counts", "shifted_cosine",
           "similarity_trajectory", "trajectory_scores", "weighted_scores",
           "within_concept_spearman"]
