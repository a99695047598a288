"""TRAK featurization and scoring, TracIn, and the λ sweep.

What follows the references (MadryLab/trak; methods.md §1):

* Features ``φ_i = Pᵀ∇_θ f(z_i; θ)`` (:func:`featurize`), ``Φ`` is ``n×k``.
* Score of query ``z`` on training example ``i`` for one model:
  ``τ(z)_i = φ(z)ᵀ (ΦᵀΦ + λI)⁻¹ φ_i`` (Q = 1, as for diffusion in the authors' code);
  ensembles average over the M models/checkpoints, each with its own features and projection.
* TracIn (Pruthi et al. 2020), on projected features: ``Σ_t η_t ⟨φ_t(z), φ_t(z_i)⟩``.

Our design [design]:

* The ``k×k`` solve is done on host in float64 with numpy/scipy (Cholesky when ``λ > 0``, a
  pseudo-inverse otherwise), without TRAK's fp16 mean-absolute-value rescaling, so scores keep
  their units. ``ΦᵀΦ`` is accumulated over row blocks, so ``Φ`` may be a memory-mapped store.
* Every public scoring function takes the query side first and returns ``[Q, N]`` (queries ×
  training examples), as :func:`jaxattrib.attribution.diffusion_trak.scores_from_features`
  and the method dispatch (:mod:`jaxattrib.attribution.methods`) do. Internally the product is
  computed in blocks of train rows (and query columns) and either returned (small sizes),
  written chunk by chunk to a train-major store (:func:`score_to_store`, resumable), or reduced
  on the fly to the top-k training examples per query (:func:`topk_scores`).
* The λ sweep (:func:`choose_lambda`) runs on a *validation* split with a caller-supplied metric;
  evaluation targets must never be passed to it.
* Multi-process featurization (``jax.distributed``): every process runs :func:`featurize`
  with the same arguments; the chunks still missing (process 0's view of the store) are dealt
  round-robin to the processes, and each process computes its own chunks on its own devices
  (the local part of the mesh; no collective per microbatch), reads only those rows and
  writes those chunks itself (atomically). A process killed mid-way leaves only whole chunks,
  so a rerun (with any number of processes) computes the rest. The store folder must be on a
  file system all processes share. Features do not depend on the number of processes.
* Output functions (DSM loss, D-TRAK's norms, …) live in ``jaxattrib/diffusion/losses.py``;
  here ``out_fn(params, example, key) -> scalar`` is arbitrary.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
import scipy.linalg
from jax.sharding import Mesh

from .grads import _num_examples, make_feature_fn, projected_grads, select_params
from .store import ChunkedArray, StoreMismatchError, _canonical

ArrayLike = Any  # np.ndarray | ChunkedArray


def featurize(out_fn, params, dataset_examples, projector, store: ChunkedArray, *,
              chunk_size: int | None = None, microbatch: int = 32, mesh: Mesh | None = None,
              progress: bool = True, key: jax.Array | int = 0, spec="all",
              remat: bool = False, on_chunk: Callable[[int], None] | None = None,
              proj_batch: int | None = None, feature_fn=None,
              on_progress: Callable[[int], None] | None = None,
              log: Callable[[str], None] | None = None) -> ChunkedArray:
    """Projected per-example gradients of every example into ``store`` (resumable).

    Args:
      out_fn: ``(params, example, key) -> scalar``.
      params: full parameter tree; gradients w.r.t. ``select_params(params, spec).trainable``
        (the projector must be built on that subset's shapes), or the Dense layers of a
        factored projector.
      dataset_examples: pytree of arrays with leading axis ``n`` (numpy or memory-mapped).
      projector: from :func:`jaxattrib.attribution.projection.make_projector`.
      store: ``ChunkedArray`` of shape ``[n, projector.k]``; only its missing chunks are
        computed, so a rerun after a crash continues where it stopped. If its metadata has a
        ``'projector'`` field (see ``store.feature_meta``) it must equal ``projector.meta()``.
      chunk_size: must equal ``store.chunk_size`` if given (kept for explicitness).
      microbatch: examples per ``vmap(grad)`` step (rounded up to a multiple of the mesh's data
        axis).
      proj_batch: examples per pass over P (rounded up to a multiple of ``microbatch``, capped
        at the store's chunk size rounded up likewise); default ``microbatch``. Each P block is
        generated once for ``proj_batch`` examples, whose gradients (``proj_batch × p`` floats,
        e.g. 64 × 793k × 4 B = 0.2 GB) are held together; the features do not depend on it
        (up to float rounding). Worth it for the dense families, whose cost is generating P.
      mesh: optional ``Mesh`` with a ``'data'`` axis; microbatches are sharded over it (on
        several processes: over its devices that belong to this process, see
        :func:`compute_mesh`).
      key: base key (or int seed); example ``i`` uses ``fold_in(key, i)``.
      on_chunk: called with the chunk index after this process wrote it.
      on_progress: called after every microbatch (every ``feature_fn`` call, i.e. every
        ``proj_batch`` examples when that is larger) with its number of examples.
      log: optional ``str -> None`` (e.g. :class:`jaxattrib.progress.StageLog`) for the
        progress lines (done/total, rate, ETA; at most every 30 s) and the chunk plan.
      feature_fn: optional ``(examples, keys) -> [B, k]`` to use instead of building one with
        :func:`~jaxattrib.attribution.grads.make_feature_fn` (so a caller can reuse one jitted
        function across calls); it must compute what ``make_feature_fn`` would, with
        ``grad_batch=microbatch`` when ``proj_batch > microbatch``.
    Returns:
      ``store``, complete (on process 0's file system when several processes run).

    On several processes, call it on every process with the same arguments (``mesh`` may span
    all of them; each process uses its local devices); the store's folder must have been
    opened (created) before, e.g. by process 0 then a barrier, on a file system all processes
    share. Process ``p`` of ``P`` computes and writes the missing chunks ``p, p+P, ...`` (of
    process 0's list), and all processes return after every chunk is written; a process that
    then cannot see all chunks raises ``FileNotFoundError`` (not a shared folder).
    """
    n = _num_examples(dataset_examples)
    if store.shape != (n, projector.k):
        raise ValueError(f"{store.folder}: store shape {store.shape} != (n examples, k) = "
                         f"{(n, projector.k)}")
    stored_proj = store.meta.get("projector") if isinstance(store.meta, dict) else None
    if stored_proj is not None and stored_proj != _canonical(projector.meta()):
        raise StoreMismatchError(store.folder, {"projector": (stored_proj, projector.meta())})
    if chunk_size is not None and chunk_size != store.chunk_size:
        raise ValueError(f"chunk_size={chunk_size} but {store.folder} has chunk_size "
                         f"{store.chunk_size}")
    if getattr(projector, "kind", None) != "factored":
        leaves, treedef = jax.tree_util.tree_flatten(select_params(params, spec).trainable)
        if treedef != projector.treedef or [tuple(np.shape(l)) for l in leaves] != [
                l.shape for l in projector.layouts]:
            raise ValueError(f"spec={spec!r} selects parameters whose tree or shapes differ from "
                             "the projector's; build the projector on "
                             "select_params(params, spec).trainable")
    key = jax.random.PRNGKey(key) if isinstance(key, (int, np.integer)) else key
    mesh = compute_mesh(mesh)
    microbatch, call_batch = batch_sizes(microbatch, proj_batch, store.chunk_size, mesh)
    fn = feature_fn or make_feature_fn(
        out_fn, params, projector, spec=spec, remat=remat,
        grad_batch=microbatch if call_batch > microbatch else None)
    from jaxattrib.parallel import my_share
    multi = jax.process_count() > 1
    me, n_proc = jax.process_index(), jax.process_count()
    todo = store.missing_chunks()
    mine = my_share(todo)  # process 0's list decides, so the processes split the same list
    rows = sum(stop - start for start, stop in map(store.chunk_range, mine))
    if log is not None:
        log(f"{store.folder}: {store.n_chunks - len(todo)}/{store.n_chunks} chunks done; "
            f"process {me}/{n_proc} computes {len(mine)} chunk(s), {rows} examples, "
            f"{microbatch} per microbatch on {1 if mesh is None else mesh.size} device(s)")
    from jaxattrib.progress import Progress
    prog = Progress(rows, f"featurize {store.folder.name}" + (f" [{me}/{n_proc}]" if multi
                                                              else ""),
                    "ex", bar=progress and rows > 0 and me == 0, log=log, callback=on_progress)
    try:
        for i in mine:
            start, stop = store.chunk_range(i)
            # a view (no copy for numpy / memmap leaves): projected_grads reads only these rows
            ex = jax.tree_util.tree_map(lambda a: a[start:stop], dataset_examples)
            feats = projected_grads(fn, ex, key, start=start, microbatch=call_batch, mesh=mesh,
                                    on_batch=prog.update)
            store.write_chunk(i, feats)
            if on_chunk is not None:
                on_chunk(i)
    finally:
        prog.close()
    if multi:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"featurize {store.folder}")
        missing = store.missing_chunks()
        if missing:
            raise FileNotFoundError(
                f"{store.folder}: process {me} cannot see {len(missing)} chunk(s) the other "
                f"processes wrote (first {missing[:5]}); put the store on a file system all "
                f"processes share")
    return store


def compute_mesh(mesh: Mesh | None) -> Mesh | None:
    """The mesh this process featurizes on: ``mesh`` itself on one process, its devices that
    belong to this process (``mesh.local_mesh``) on several (each process computes its own
    chunks, see :func:`featurize`)."""
    if mesh is None or jax.process_count() == 1:
        return mesh
    return mesh.local_mesh


def batch_sizes(microbatch: int, proj_batch: int | None, chunk_size: int,
                mesh: Mesh | None = None) -> tuple[int, int]:
    """``(microbatch, examples per feature call)`` as :func:`featurize` uses them: microbatch
    rounded up to the mesh's data axis, ``proj_batch`` (default ``microbatch``) rounded up to a
    multiple of it and capped at the chunk size rounded up likewise."""
    if microbatch < 1 or (proj_batch is not None and proj_batch < 1):
        raise ValueError(f"microbatch={microbatch}, proj_batch={proj_batch}: expected positive "
                         "numbers of examples")
    if mesh is not None:
        nd = mesh.shape["data"]
        microbatch = -(-microbatch // nd) * nd
    up = lambda v: -(-v // microbatch) * microbatch  # noqa: E731
    return microbatch, max(microbatch, min(up(proj_batch or microbatch), up(chunk_size)))


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------

def _rows(a: ArrayLike, start: int, stop: int) -> np.ndarray:
    if isinstance(a, ChunkedArray):
        return a.read_rows(start, stop)
    return np.asarray(a[start:stop])


def _n(a: ArrayLike) -> int:
    return a.shape[0]


def gram(Phi: ArrayLike, *, block: int = 8192) -> np.ndarray:
    """``ΦᵀΦ`` ``[k, k]`` in float64, accumulated over row blocks of ``Φ`` ``[n, k]``."""
    k = Phi.shape[1]
    out = np.zeros((k, k), np.float64)
    for lo in range(0, _n(Phi), block):
        b = _rows(Phi, lo, min(lo + block, _n(Phi))).astype(np.float64)
        out += b.T @ b
    return out


def trak_kernel_inverse(Phi: ArrayLike, lam: float, dtype=np.float64, *,
                        block: int = 8192) -> np.ndarray:
    """``(ΦᵀΦ + λI)⁻¹`` ``[k, k]``, solved in float64 on host, returned as ``dtype``.

    ``λ > 0``: Cholesky solve. ``λ = 0``: Moore–Penrose pseudo-inverse (``ΦᵀΦ`` is singular
    when ``n < k``).
    """
    if lam < 0:
        raise ValueError(f"lam={lam}: expected λ ≥ 0")
    g = gram(Phi, block=block)
    k = g.shape[0]
    if lam > 0:
        g[np.diag_indices(k)] += lam
        inv = scipy.linalg.cho_solve(scipy.linalg.cho_factor(g, lower=True), np.eye(k))
    else:
        inv = scipy.linalg.pinvh(g)
    return inv.astype(dtype)


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _blocked(train: list, queries: list, weights: list, *, block_train: int,
             block_query: int, dtype, out: ChunkedArray | None, reduce=None):
    """Σ_m w_m · Φ_m[rows] @ Q_mᵀ, block by block (``Q_m`` ``[n_q, k]`` already transformed).

    ``reduce(start, block[bt, n_q])`` consumes blocks when given; otherwise writes to ``out``
    (one store chunk per train block, train-major ``[n_train, n_q]``) or returns the dense
    ``[n_q, n_train]`` (query-major, the public orientation).
    """
    n = _n(train[0])
    n_q = queries[0].shape[0]
    if any(_n(t) != n for t in train) or any(q.shape[0] != n_q for q in queries):
        raise ValueError("all models must have the same numbers of training and query examples")
    if out is not None:
        if out.shape != (n, n_q):
            raise ValueError(f"{out.folder}: score store shape {out.shape} != {(n, n_q)}")
        block_train = out.chunk_size
        starts = [out.chunk_range(i)[0] for i in out.missing_chunks()]
    else:
        starts = list(range(0, n, block_train))
    dense = np.empty((n_q, n), dtype) if (out is None and reduce is None) else None
    for lo in starts:
        hi = min(lo + block_train, n)
        blk = np.zeros((hi - lo, n_q), dtype)
        for t, q, w in zip(train, queries, weights):
            rows = _rows(t, lo, hi).astype(dtype)
            for qlo in range(0, n_q, block_query):
                qhi = min(qlo + block_query, n_q)
                blk[:, qlo:qhi] += w * (rows @ q[qlo:qhi].T)
        if reduce is not None:
            reduce(lo, blk)
        elif out is not None:
            out.write_chunk(lo // block_train, blk)
        else:
            dense[:, lo:hi] = blk.T
    return out if out is not None else dense


def _transform_queries(phi_query, kernel_inv, dtype, block: int = 4096) -> np.ndarray:
    """``φ_q (ΦᵀΦ+λI)⁻¹`` ``[n_q, k]``: product in float64, stored as ``dtype``."""
    n_q = _n(phi_query)
    kinv = np.asarray(kernel_inv, np.float64)
    out = np.empty((n_q, kinv.shape[0]), dtype)
    for lo in range(0, n_q, block):
        hi = min(lo + block, n_q)
        out[lo:hi] = _rows(phi_query, lo, hi).astype(np.float64) @ kinv
    return out


def score(phi_query, Phi_train, kernel_inv, *, block_train: int = 8192,
          block_query: int = 4096, dtype=np.float32) -> np.ndarray:
    """TRAK scores ``[Q, N]`` (queries × training examples), averaged over models [paper].

    Each argument is one array/store or a list with one per model (M models, ensembles):
    ``phi_query`` ``[Q, k]``, ``Phi_train`` ``[N, k]`` (array or :class:`ChunkedArray`),
    ``kernel_inv`` ``[k, k]`` (:func:`trak_kernel_inverse` of that model's ``Phi_train``).
    ``score[q, i] = (1/M) Σ_m φ_m(q)ᵀ K_m Φ_m[i]``. Computed in blocks of ``block_train``
    train rows × ``block_query`` queries; for a matrix too large to hold use
    :func:`score_to_store` or :func:`topk_scores`.
    """
    return _score(phi_query, Phi_train, kernel_inv, block_train=block_train,
                  block_query=block_query, dtype=dtype, out=None)


def score_to_store(phi_query, Phi_train, kernel_inv, out: ChunkedArray, *,
                   block_query: int = 4096, dtype=np.float32) -> ChunkedArray:
    """:func:`score` written into ``out``, a **train-major** store ``[N, Q]`` [design].

    The store is chunked over training rows (one chunk per ``out.chunk_size`` train rows, so
    each training feature is read once and a killed call resumes from the missing chunks);
    its rows are training examples, i.e. ``out.read_all()`` is the transpose of :func:`score`'s
    ``[Q, N]``. Arguments as :func:`score`; returns ``out``.
    """
    return _score(phi_query, Phi_train, kernel_inv, block_train=out.chunk_size,
                  block_query=block_query, dtype=dtype, out=out)


def _score(phi_query, Phi_train, kernel_inv, *, block_train, block_query, dtype, out):
    qs, ts, ks = _as_list(phi_query), _as_list(Phi_train), _as_list(kernel_inv)
    if not len(qs) == len(ts) == len(ks):
        raise ValueError(f"ensemble sizes differ: {len(qs)} query, {len(ts)} train, "
                         f"{len(ks)} kernel inverses")
    transformed = [_transform_queries(q, kinv, dtype) for q, kinv in zip(qs, ks)]
    m = len(ts)
    return _blocked(ts, transformed, [1.0 / m] * m, block_train=block_train,
                    block_query=block_query, dtype=dtype, out=out)


def topk_scores(phi_query, Phi_train, kernel_inv, topk: int, *, block_train: int = 2048,
                block_query: int = 1024, largest: bool = True, dtype=np.float32):
    """Top-``topk`` training examples per query without the full score matrix.

    Returns ``(values [n_q, topk], indices [n_q, topk])`` sorted best first (largest scores when
    ``largest``, else smallest). Memory: the ``[block_train, n_q]`` block plus
    ``O(n_q · topk + block_query · (topk + block_train))``.
    """
    qs, ts, ks = _as_list(phi_query), _as_list(Phi_train), _as_list(kernel_inv)
    n = _n(ts[0])
    if not 0 < topk <= n:
        raise ValueError(f"topk={topk}: expected 1 ≤ topk ≤ n_train={n}")
    sign = 1.0 if largest else -1.0
    n_q = _n(qs[0])
    best_v = np.full((n_q, topk), -np.inf, dtype)  # sign-adjusted: larger is better
    best_i = np.full((n_q, topk), -1, np.int64)

    def reduce(lo, blk):
        # merge per query block so temporaries stay O(block_query · (topk + block_train))
        cand_i = np.arange(lo, lo + blk.shape[0])
        for qlo in range(0, n_q, block_query):
            qhi = min(qlo + block_query, n_q)
            v = np.concatenate([best_v[qlo:qhi], sign * blk[:, qlo:qhi].T], 1)
            i = np.concatenate([best_i[qlo:qhi], np.broadcast_to(cand_i, (qhi - qlo,
                                                                          cand_i.size))], 1)
            part = np.argpartition(-v, topk - 1, axis=1)[:, :topk]
            best_v[qlo:qhi] = np.take_along_axis(v, part, 1)
            best_i[qlo:qhi] = np.take_along_axis(i, part, 1)

    transformed = [_transform_queries(q, kinv, dtype) for q, kinv in zip(qs, ks)]
    m = len(ts)
    _blocked(ts, transformed, [1.0 / m] * m, block_train=block_train, block_query=block_query,
             dtype=dtype, out=None, reduce=reduce)
    order = np.argsort(-best_v, axis=1, kind="stable")
    return sign * np.take_along_axis(best_v, order, 1), np.take_along_axis(best_i, order, 1)


def trak_scores(phi_query, Phi_train, lam: float, **kwargs) -> np.ndarray:
    """Convenience: kernel inverses per model then :func:`score` (same list conventions);
    ``[Q, N]``."""
    kinvs = [trak_kernel_inverse(t, lam) for t in _as_list(Phi_train)]
    if not isinstance(Phi_train, (list, tuple)):
        kinvs = kinvs[0]
    return score(phi_query, Phi_train, kinvs, **kwargs)


def tracin_scores(query_feats: Sequence, train_feats: Sequence, learning_rates: Sequence[float],
                  *, block_train: int = 8192, block_query: int = 4096,
                  dtype=np.float32) -> np.ndarray:
    """TracIn on projected features [paper: Pruthi et al. 2020]: ``Σ_t η_t φ_t(z) Φ_tᵀ`` →
    ``[Q, N]``.

    ``query_feats[t]`` ``[Q, k_t]`` and ``train_feats[t]`` ``[N, k_t]`` are the features at
    checkpoint ``t`` (same projection within a checkpoint); ``learning_rates[t]`` = ``η_t``.
    Query side first, as :func:`score`. (The inner product is symmetric: a call with the two
    sides swapped returns the transpose ``[N, Q]``, which is what callers written before the
    orientation was unified get, and transpose.)
    """
    if not len(train_feats) == len(query_feats) == len(learning_rates):
        raise ValueError(f"TracIn needs one train/query feature set and one learning rate per "
                         f"checkpoint; got {len(train_feats)}, {len(query_feats)}, "
                         f"{len(learning_rates)}")
    qs = [np.asarray(_rows(q, 0, _n(q)), dtype) for q in query_feats]
    return _blocked(list(train_feats), qs, [float(lr) for lr in learning_rates],
                    block_train=block_train, block_query=block_query, dtype=dtype, out=None)


def choose_lambda(Phi_train, phi_val, lambdas: Sequence[float],
                  metric_fn: Callable[[np.ndarray], float], *, higher_is_better: bool = True,
                  **score_kwargs):
    """Sweeps λ on a validation split; returns ``(best_lambda, table)``.

    ``metric_fn(scores [n_val, n_train]) -> float`` (e.g. LDS on the validation targets).
    ``table``: list of ``{'lambda': λ, 'metric': value}`` in the order of ``lambdas``.
    Pass validation examples only — never the evaluation targets.
    """
    if not len(lambdas):
        raise ValueError("lambdas is empty")
    table = []
    for lam in lambdas:
        s = trak_scores(phi_val, Phi_train, float(lam), **score_kwargs)
        table.append({"lambda": float(lam), "metric": float(metric_fn(s))})
    pick = max if higher_is_better else min
    best = pick(table, key=lambda r: r["metric"] if np.isfinite(r["metric"]) else
                (-np.inf if higher_is_better else np.inf))
    return best["lambda"], table
