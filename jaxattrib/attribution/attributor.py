"""``Attributor``: featurize a training set once, score queries against it, ``[Q, N]``.

The public face of the gradient methods (D-TRAK, TRAK, Journey-TRAK, TracIn) in the style of
MadryLab/trak's ``TRAKer`` (``featurize`` / ``finalize_features`` / ``score``) and dattri's
``Attributor`` [code], over this package's functions [design]:

* features: :func:`~jaxattrib.attribution.diffusion_trak.featurize_examples` with the method's
  output functions (:func:`~jaxattrib.attribution.methods.train_out_fn` /
  :func:`~jaxattrib.attribution.methods.query_out_fn`), one resumable, fingerprinted
  :class:`~jaxattrib.attribution.store.ChunkedArray` per (checkpoint, side) under ``store``:
  ``store/<method>/step_<s>/train`` and ``store/<method>/step_<s>/queries_<fingerprint>``
  (``model`` instead of ``step_<s>`` without a record). With ``store = RUN/features`` this is
  the layout ``jaxattrib attribute`` writes (``workflow.feature_dir``), so its training
  features are reused when the data key (``fingerprint``) is the run's.
* checkpoints: a trajectory ``record`` gives the ensemble of
  :func:`~jaxattrib.attribution.diffusion_trak.ensemble_steps` (``checkpoints``: the last M or
  listed steps; default per method, D-TRAK 1, TRAK / Journey-TRAK 3); TracIn uses every
  checkpoint after step 0 with its learning rate [paper]. Without a record, one model
  (``params``, default the pipeline's UNet).
* scores: :func:`~jaxattrib.attribution.methods.method_scores`: TRAK's kernel
  ``φ_q (ΦᵀΦ + λI)⁻¹ Φᵀ`` with ``λ = lam_ratio · mean(diag(ΦᵀΦ))`` per checkpoint, averaged over
  the ensemble [paper: methods.md §1]; TracIn ``Σ_s η_s φ_s(q) Φ_sᵀ``. Always ``[Q, N]``,
  larger = more attributed.

Examples are ``{'x0': [n, h, w, c] model inputs (VAE latents for a latent pipeline), 'ctx':
[n, L, D] text states}`` or ``{'images': [n, H, W, 3] pixels in [-1, 1], 'captions': [n]}``
(encoded with the pipeline: :func:`~jaxattrib.attribution.methods.model_inputs`).
Journey-TRAK's queries are trajectory targets ``{'x0': x̂0 [Q, h, w, c], 'ctx', 't': [Q]}``
(:func:`~jaxattrib.attribution.diffusion_trak.journey_targets`).
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from jaxattrib.attribution import diffusion_trak as dt
from jaxattrib.attribution import methods as methods_lib
from jaxattrib.attribution.diffusion_trak import AttributionConfig


class TopK(NamedTuple):
    """Each query's most attributed training examples, best first (as ``torch.topk`` and
    :func:`~jaxattrib.attribution.trak.topk_scores`: values, then indices)."""

    scores: np.ndarray    # [Q, k] float
    indices: np.ndarray   # [Q, k] int64, rows of the training set


class Attributor:
    """Data attribution of a diffusion pipeline's generations to its training examples.

    ``Attributor(pipe, method='dtrak', config=AttributionConfig(...), store=path)``, then
    ``.featurize(train)`` (once; resumable), ``.score(queries) -> [Q, N]``, ``.topk(k)``.

    Args:
      pipe: a :class:`jaxattrib.models.pipeline.Pipeline` (UNet config, scheduler, text
        encoder, VAE for latent pipelines).
      method: one of :func:`~jaxattrib.attribution.methods.gradient_methods` ('dtrak',
        'trak', 'journey-trak', 'tracin'); default ``config.method``.
      config: :class:`~jaxattrib.attribution.diffusion_trak.AttributionConfig` (k,
        projection, parameter subset, timesteps, noise, precision, ...); default
        ``AttributionConfig(method=method)``; a given ``method`` replaces ``config.method``.
      store: folder of the feature stores (resumable; a store made with other settings or
        other data is refused with
        :class:`~jaxattrib.attribution.store.StoreMismatchError`); ``None``: a temporary
        folder removed with the object.
      params: UNet parameters of the one model to attribute when there is no ``record``
        (default ``pipe.unet_params``).
      record: a :class:`~jaxattrib.train.record.TrajectoryRecord` or its folder: the
        checkpoints of the fine-tuning run (required for TracIn).
      checkpoints: the ensemble (an int M = the last M checkpoints after step 0, or a list of
        steps; ``None``: the method's default); needs ``record``; not for TracIn (every
        checkpoint after step 0).
      lam_ratio: ``λ / mean(diag(ΦᵀΦ))`` of the TRAK kernel (per checkpoint).
      chunk_size: rows per store chunk (the unit of resumption).
      key_seed: base PRNG seed of the per-example keys (Journey-TRAK's fresh noise).
      mesh, progress, on_progress, log: passed to
        :func:`~jaxattrib.attribution.diffusion_trak.featurize_examples`.
    """

    def __init__(self, pipe, method: str | None = None, config: AttributionConfig | None = None,
                 store: str | Path | None = None, *, params: Any = None, record: Any = None,
                 checkpoints: int | Sequence[int] | None = None, lam_ratio: float = 1.0,
                 chunk_size: int = 64, key_seed: int = 0, mesh=None, progress: bool = False,
                 on_progress: Callable[[int], None] | None = None,
                 log: Callable[[str], None] | None = None):
        method = (config.method if config is not None else "dtrak") if method is None else method
        if method not in methods_lib.gradient_methods():
            spec = methods_lib.method_spec(method)  # unknown names: ValueError listing all
            raise ValueError(f"method={method!r} ({spec.family}): the Attributor runs "
                             f"{methods_lib.gradient_methods()}; score the others with "
                             f"jaxattrib.attribution.methods.method_scores")
        config = AttributionConfig(method=method) if config is None else config
        if config.method != method:   # the method argument wins (config's default is 'dtrak')
            config = dataclasses.replace(config, method=method)
        self.pipe, self.method, self.config = pipe, method, config
        self.spec = methods_lib.method_spec(method)
        self.lam_ratio, self.chunk_size, self.key_seed = float(lam_ratio), chunk_size, key_seed
        self._fkw = dict(mesh=mesh, progress=progress, on_progress=on_progress, log=log,
                         chunk_size=chunk_size, key_seed=key_seed)
        if store is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="jaxattrib-attributor-")
            store = self._tmp.name
        self.store = Path(store)
        self._record = self._open_record(record)
        self.steps, self.learning_rates = self._plan(checkpoints)
        self._params = pipe.unet_params if params is None else params
        if params is not None and self._record is not None:
            raise ValueError("pass params (one model) or record (its checkpoints), not both")
        from jaxattrib.diffusion.schedule import schedule_from_diffusers_config
        sched = schedule_from_diffusers_config(pipe.scheduler_config)
        self._train_fn = methods_lib.train_out_fn(method, pipe.unet_config, sched, config)
        self._query_fn = methods_lib.query_out_fn(method, pipe.unet_config, sched, config)
        self.train_features: list[np.ndarray] | None = None
        self.train_fingerprint: str | None = None
        self.scores: np.ndarray | None = None

    def close(self) -> None:
        """Closes the record if this object opened it (from a path) and removes the temporary
        store (``store=None``). Also on leaving a ``with Attributor(...) as att:`` block."""
        if self._owns_record and self._record is not None:
            self._record.close()
        if getattr(self, "_tmp", None) is not None:
            self._tmp.cleanup()

    def __enter__(self) -> "Attributor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------- set-up
    def _open_record(self, record):
        self._owns_record = isinstance(record, (str, Path))
        if not self._owns_record:
            return record
        from jaxattrib.train.record import TrajectoryRecord
        path = Path(record)
        if (path / "record").is_dir():  # a `jaxattrib train` run directory
            path = path / "record"
        return TrajectoryRecord.open(path.resolve())

    def _plan(self, checkpoints) -> tuple[list[int | None], list[float] | None]:
        """``(steps, learning rates)``: the checkpoints scored (``[None]`` = ``params``)."""
        if self._record is None:
            if self.spec.family == "tracin":
                raise ValueError("method='tracin' sums over the checkpoints of a fine-tuning "
                                 "run: pass record= (a TrajectoryRecord or its folder)")
            if checkpoints is not None:
                raise ValueError(f"checkpoints={checkpoints!r} needs record= (the checkpoints "
                                 f"of a fine-tuning run)")
            return [None], None
        steps = self._record.steps()
        if self.spec.family == "tracin":
            if checkpoints is not None:
                raise ValueError("method='tracin' uses every checkpoint after step 0; "
                                 "checkpoints= is for TRAK / D-TRAK / Journey-TRAK ensembles")
            use = [s for s in steps if s > 0]
            if not use:
                raise ValueError(f"{self._record.directory}: TracIn needs a checkpoint after "
                                 f"step 0 (the record has {steps})")
            return use, [float(self._record.step_info(s - 1)["lr"]) for s in use]
        return dt.ensemble_steps(checkpoints, steps, self.method), None

    def _folder(self, step: int | None) -> Path:
        return self.store / self.method / ("model" if step is None else f"step_{int(step)}")

    def _unet(self, step: int | None):
        return self._params if step is None else self._record.load(step)["unet"]

    def _inputs(self, examples: dict, role: str) -> dict:
        if "x0" in examples and "ctx" in examples:
            out = dict(examples)
        elif "images" in examples and ("captions" in examples or "prompts" in examples):
            caps = examples["captions"] if "captions" in examples else examples["prompts"]
            out = methods_lib.model_inputs(self.pipe, examples["images"], caps)
            out.update({k: v for k, v in examples.items() if k in ("t", "index")})
        else:
            raise ValueError(f"{role} examples: expected keys {{'x0', 'ctx'}} (model inputs) "
                             f"or {{'images', 'captions'}} (pixels), got {sorted(examples)}")
        if role == "queries" and self.spec.query == "trajectory" and "t" not in out:
            raise ValueError(f"method={self.method!r}: queries are trajectory targets "
                             f"{{'x0': x̂0, 'ctx', 't'}} (diffusion_trak.journey_targets); "
                             f"'t' is missing")
        return out

    # ------------------------------------------------------------------------- API
    def featurize(self, train: dict, *, fingerprint: str | None = None) -> "Attributor":
        """Features ``[N, k]`` of the training examples at every checkpoint, into the store.

        Resumable: chunks already in the store are kept, a killed call continues. The store
        is keyed by ``fingerprint`` (default: sha256 of the example arrays,
        :func:`~jaxattrib.attribution.diffusion_trak.data_fingerprint`); a store made from
        other data (or other settings) is refused with
        :class:`~jaxattrib.attribution.store.StoreMismatchError` naming
        ``dataset_fingerprint``. Returns ``self``; the features are
        ``self.train_features`` (one ``[N, k]`` per checkpoint of ``self.steps``).
        """
        ex = self._inputs(train, "train")
        fp = dt.data_fingerprint(ex) if fingerprint is None else fingerprint
        feats = [dt.featurize_examples(self._train_fn, self._unet(s), ex, self.config,
                                       self._folder(s) / "train", fingerprint=fp, step=s,
                                       role="train", **self._fkw)
                 for s in self.steps]
        self.train_features, self.train_fingerprint = feats, fp
        return self

    def query_features(self, queries: dict, *, fingerprint: str | None = None,
                       folder: str | None = None) -> list[np.ndarray]:
        """Features ``[Q, k]`` of the queries, one per checkpoint, cached in the store under
        ``folder`` (default ``queries_<fingerprint[:16]>``; ``jaxattrib attribute`` names it
        ``queries_<query folder name>``)."""
        ex = self._inputs(queries, "queries")
        fp = dt.data_fingerprint(ex) if fingerprint is None else fingerprint
        name = f"queries_{fp[:16]}" if folder is None else folder
        return [dt.featurize_examples(self._query_fn, self._unet(s), ex, self.config,
                                      self._folder(s) / name, fingerprint=fp,
                                      step=s, role="query", **self._fkw)
                for s in self.steps]

    def score(self, queries: dict, *, fingerprint: str | None = None,
              folder: str | None = None, lam_ratio: float | None = None) -> np.ndarray:
        """Scores ``[Q, N]`` (queries × training examples, larger = more attributed).

        ``queries``: examples as in the module doc (Journey-TRAK: trajectory targets).
        ``fingerprint``, ``folder``: see :meth:`query_features`.
        ``lam_ratio``: overrides the constructor's for this call. Needs :meth:`featurize`
        first. The result is also kept as ``self.scores`` (for :meth:`topk`).
        """
        if self.train_features is None:
            raise ValueError("Attributor.score: call featurize(train) first")
        phis = self.query_features(queries, fingerprint=fingerprint, folder=folder)
        ratio = self.lam_ratio if lam_ratio is None else float(lam_ratio)
        self.scores = methods_lib.method_scores(self.method, phis, self.train_features,
                                                lam_ratio=ratio,
                                                learning_rates=self.learning_rates)
        return self.scores

    def topk(self, k: int, queries: dict | None = None) -> TopK:
        """:class:`TopK` ``(scores [Q, k], indices [Q, k] int64)``: each query's ``k`` most
        attributed training examples, best first (ties: lower index first, i.e.
        ``np.argsort(-scores, kind='stable')[:, :k]``). Scores ``queries`` first when given,
        else uses the last :meth:`score`."""
        if queries is not None:
            self.score(queries)
        if self.scores is None:
            raise ValueError("Attributor.topk: call score(queries) first, or pass queries")
        n = self.scores.shape[1]
        if not 1 <= k <= n:
            raise ValueError(f"topk: k={k}, expected 1 ≤ k ≤ N = {n} training examples")
        idx = np.argsort(-self.scores, axis=1, kind="stable")[:, :k].astype(np.int64)
        return TopK(np.take_along_axis(self.scores, idx, 1), idx)


__all__ = ["Attributor", "AttributionConfig", "TopK"]
