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
