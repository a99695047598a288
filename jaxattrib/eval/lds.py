"""LDS evaluation harness: subset retraining, cached models, measured target outputs.

What follows the references (methods.md §1, TRAK [code: MadryLab/trak], D-TRAK
[code: sail-sg/D-TRAK]):

* Draw S random subsets of the n training examples, each of fraction α (default 0.5); train one
  model per (subset, seed); the *actual* output of subset j on target z is the diffusion loss on
  z with fixed timesteps and fixed noise, averaged over noise draws and over training seeds.
  :func:`jaxattrib.metrics.lds` then correlates it with ``Σ_{i∈S_j} τ(z)_i``.

[design] Ours:

* Every subset has *exactly* ``round(α n)`` members (D-TRAK also uses fixed-size subsets):
  ``masks[j]`` marks the first ``m`` entries of ``permutation(fold_in(key, j), n)``, so subset
  ``j`` does not depend on S (growing S keeps the first subsets).
* Numeric core is pure (:func:`draw_subsets`, :func:`target_losses`); the edges
  (:func:`retrain_subsets`, :func:`actual_outputs`) cache to a run directory and resume:
  ``run_dir/lds_manifest.json`` fixes the masks (hash), seeds and a caller fingerprint (rerunning
  with different ones raises :class:`LDSRunMismatchError`); each (subset, seed) model is one
  msgpack file ``models/s{j:04d}_seed{seed}.msgpack`` written atomically; the measured outputs of
  each model are cached as ``outputs/{name}/s{j:04d}_seed{seed}.npy``. A killed run restarts
  where it stopped.
* Target loss noise: draw ``r`` at timestep ``t`` uses ``normal(fold_in(fold_in(key(noise_seed),
  r), t))``, shared by every target and every model (common random numbers across subsets, so
  differences between subsets are not drowned in noise-draw variance).
* Parallelism: :func:`target_losses` shards the targets over a ``'data'`` mesh axis (padding
  to a multiple of the device count); models are trained one after another (each training run
  may itself be data-parallel).
"""

from __future__ import annotations

import functools
import hashlib
import io
import re
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxattrib.diffusion.losses import dsm_loss
from jaxattrib.diffusion.schedule import Schedule, add_noise
from jaxattrib.fileio import atomic_write_bytes as _atomic_write

__all__ = ["LDSRunMismatchError", "check_settings", "draw_subsets", "masks_fingerprint",
           "retrain_subsets", "model_path", "load_model", "save_model", "noise_for",
           "target_losses", "actual_outputs", "seed_agreement"]

MANIFEST = "lds_manifest.json"


class LDSRunMismatchError(ValueError):
    """A run directory was created for other subsets, seeds or settings."""


# --------------------------------------------------------------------------------------------
# Pure core
# --------------------------------------------------------------------------------------------


def draw_subsets(n: int, S: int, alpha: float = 0.5, key: jax.Array | int = 0) -> np.ndarray:
    """``[S, n]`` boolean masks, each with exactly ``round(alpha * n)`` True entries.

    Subset ``j`` is the first ``m`` entries of ``permutation(fold_in(key, j), n)``: deterministic
    in ``(key, j)`` and independent of ``S``.
    """
    if n < 1 or S < 1:
        raise ValueError(f"draw_subsets: need n >= 1 and S >= 1; got n={n}, S={S}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"draw_subsets: alpha must be in (0, 1); got {alpha}")
    m = int(round(alpha * n))
    if not 1 <= m <= n - 1:
        raise ValueError(f"draw_subsets: alpha={alpha} of n={n} gives {m} members; need 1..n-1")
    key = jax.random.PRNGKey(key) if isinstance(key, int) else key
    masks = np.zeros((S, n), bool)
    for j in range(S):
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, j), n))
        masks[j, perm[:m]] = True
    return masks


def masks_fingerprint(masks: np.ndarray) -> str:
    """sha256 of the packed boolean masks and their shape (hex, 16 chars)."""
    masks = np.asarray(masks, bool)
    h = hashlib.sha256(str(masks.shape).encode())
    h.update(np.packbits(masks, axis=None).tobytes())
    return h.hexdigest()[:16]


def noise_for(noise_seed: int, draw: int, t, shape: Sequence[int], dtype=jnp.float32):
    """The fixed noise of draw ``draw`` at timestep ``t`` (shared by all targets and models)."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(noise_seed), draw), t)
    return jax.random.normal(key, tuple(shape), dtype)


def target_losses(eps_apply: Callable, params: Any, sched: Schedule, targets: dict,
                  timesteps: Sequence[int], noise_seed: int = 0, n_noise: int = 1, *,
                  mesh=None, batch_size: int | None = None) -> np.ndarray:
    """Diffusion (DSM) loss of each target with fixed timesteps and noise, ``[T]`` float64.

    ``loss(z) = 1/(R K) Σ_r Σ_k mean_{hwc}((target_{r,k} − out(x_t, t_k, ctx))²)`` with
    ``x_t = add_noise(x0, noise_for(noise_seed, r, t_k), t_k)``; ``target`` is the schedule's
    training target (noise / velocity / x0).

    Args:
      eps_apply: ``(params, x_t [B,h,w,c], t [B] int32, ctx [B,...]) -> out [B,h,w,c]``; a
        hashable callable that is a static jit argument: pass the *same* object for every model
        (e.g. one ``functools.partial(apply, config)``) so all models share one compile.
      targets: ``{'x0': [T, h, w, c], 'ctx': [T, ...]}`` (``ctx`` may be omitted -> None).
      timesteps: int ``[K]``. n_noise: R noise draws.
      mesh: optional mesh with a ``'data'`` axis; targets are sharded over it (padded).
      batch_size: targets per jitted call (default: all; rounded up to the device count).
    """
    x0 = np.asarray(targets["x0"], np.float32)
    ctx = targets.get("ctx")
    n = x0.shape[0]
    ts = jnp.asarray(np.asarray(timesteps, np.int32))
    ndev = 1 if mesh is None else mesh.shape["data"]
    bs = n if batch_size is None else min(batch_size, n)
    bs = -(-bs // ndev) * ndev
    out = []
    for start in range(0, n, bs):
        xb = x0[start:start + bs]
        cb = None if ctx is None else np.asarray(ctx[start:start + bs])
        real = xb.shape[0]
        if real < bs:
            pad = bs - real
            xb = np.concatenate([xb, np.repeat(xb[-1:], pad, 0)])
            cb = None if cb is None else np.concatenate([cb, np.repeat(cb[-1:], pad, 0)])
        if mesh is not None:
            from jaxattrib import parallel
            xb = parallel.shard_batch(xb, mesh)
            cb = None if cb is None else parallel.shard_batch(cb, mesh)
        out.append(np.asarray(_losses_batch(params, sched, xb, cb, ts, eps_apply=eps_apply,
                                            noise_seed=int(noise_seed),
                                            n_noise=int(n_noise)), np.float64)[:real])
    return np.concatenate(out)


@functools.partial(jax.jit, static_argnames=("eps_apply", "noise_seed", "n_noise"))
def _losses_batch(params, sched, x0, ctx, ts, *, eps_apply, noise_seed, n_noise):
    """``[B]`` DSM loss averaged over ``n_noise`` draws x ``ts``. One compile per
    ``(eps_apply, shapes)``: pass the same ``eps_apply`` object for every model."""
    B = x0.shape[0]

    def one(carry, rt):
        r, t = rt
        noise = jnp.broadcast_to(noise_for(noise_seed, r, t, x0.shape[1:], x0.dtype)[None],
                                 x0.shape)
        tb = jnp.full((B,), t, jnp.int32)
        out = eps_apply(params, add_noise(sched, x0, noise, tb), tb, ctx)
        return carry + dsm_loss(sched, out.astype(jnp.float32), x0, noise, tb), None

    rs, tt = jnp.meshgrid(jnp.arange(n_noise), ts, indexing="ij")
    total, _ = jax.lax.scan(one, jnp.zeros((B,), jnp.float32), (rs.reshape(-1), tt.reshape(-1)))
    return total / (n_noise * ts.shape[0])


def seed_agreement(outputs: np.ndarray) -> dict:
    """How reproducible the measured outputs are across training seeds: the noise ceiling of LDS.

    Args:
      outputs: ``[R, S, T]`` measured outputs of R >= 2 seeds (e.g. :func:`actual_outputs` with
        ``seeds=[s]`` for each seed), S subsets, T targets.

    Returns ``{'r', 'r_mean', 'ceiling', 'n_seeds'}``: ``r`` = Spearman over subsets between two
    seeds' outputs, averaged over targets (targets with a constant row are skipped) and over seed
    pairs; ``r_mean`` = Spearman–Brown reliability of the R-seed mean, ``R r / (1 + (R−1) r)``;
    ``ceiling = sqrt(r_mean)`` (clipped at 0): the correlation with the noise-free output that
    the seed-averaged ground truth allows, an approximate upper bound on any method's LDS.
    """
    from jaxattrib.metrics import spearman_columns
    outputs = np.asarray(outputs, np.float64)
    if outputs.ndim != 3 or outputs.shape[0] < 2:
        raise ValueError(f"seed_agreement: outputs must be [R >= 2 seeds, S, T]; got "
                         f"{outputs.shape}")
    R = outputs.shape[0]
    pair_means = []
    for a in range(R):
        for b in range(a + 1, R):
            rho = spearman_columns(outputs[a], outputs[b])
            pair_means.append(float(np.nanmean(rho)) if np.isfinite(rho).any() else np.nan)
    r = float(np.mean(pair_means))
    r_mean = R * r / (1 + (R - 1) * r) if np.isfinite(r) and 1 + (R - 1) * r > 0 else float("nan")
    ceiling = float(np.sqrt(max(r_mean, 0.0))) if np.isfinite(r_mean) else float("nan")
    return {"r": r, "r_mean": float(r_mean), "ceiling": ceiling, "n_seeds": R}


# --------------------------------------------------------------------------------------------
# Cached edges
# --------------------------------------------------------------------------------------------


def model_path(run_dir: str | os.PathLike, j: int, seed: int) -> Path:
    return Path(run_dir) / "models" / f"s{j:04d}_seed{seed}.msgpack"


def save_model(path: str | os.PathLike, params: Any) -> None:
    """Writes a params pytree (nested dicts of arrays) as msgpack, atomically."""
    from flax import serialization
    state = jax.tree_util.tree_map(np.asarray, serialization.to_state_dict(params))
    _atomic_write(Path(path), serialization.msgpack_serialize(state))


def load_model(run_dir: str | os.PathLike, j: int, seed: int) -> Any:
    """Params of the model trained on subset ``j`` with ``seed`` (nested dicts of numpy)."""
    from flax import serialization
    path = model_path(run_dir, j, seed)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no model for subset {j}, seed {seed}")
    return serialization.msgpack_restore(path.read_bytes())


def check_settings(path: str | os.PathLike, want: dict, stored: dict | None = None, *,
                   absent: dict | None = None, hints: dict | None = None) -> bool:
    """Guards a cache by the settings that made it: the JSON record ``path`` must equal ``want``.

    If ``path`` exists, every field of ``want`` must match it, else :class:`LDSRunMismatchError`
    names the file and each mismatching field. If it does not exist, ``stored`` (settings known
    to have made an older cache without a record, or None) is checked the same way, then
    ``want`` is written. Returns True when the record was created by this call.

    ``absent``: ``{field: value}`` for fields added to the record later: an existing record
    without one is read as ``value`` (the value in force whenever such records were written);
    the record is not rewritten. ``hints``: ``{field: text}`` appended to the error when that
    field mismatches (what to do about it).
    """
    path = Path(path)
    have = {**(absent or {}), **json.loads(path.read_text())} if path.is_file() else stored
    if have is not None:
        diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
        if diff:
            raise LDSRunMismatchError(
                f"{path}: run directory was made with other settings: " +
                ", ".join(f"{k}: stored {a!r} vs given {b!r}" for k, (a, b) in diff.items()) +
                "".join(f". {hints[k]}" for k in diff if k in (hints or {})))
    if path.is_file():
        return False
    _atomic_write(path, json.dumps(want, indent=2).encode())
    return True


def _check_manifest(run_dir: Path, masks: np.ndarray, seeds: Sequence[int],
                    fingerprint: str) -> None:
    want = {"n_subsets": int(masks.shape[0]), "n_train": int(masks.shape[1]),
            "masks_sha256": masks_fingerprint(masks), "seeds": [int(s) for s in seeds],
            "fingerprint": str(fingerprint)}
    if check_settings(run_dir / MANIFEST, want):
        buf = io.BytesIO()
        np.save(buf, masks)
        _atomic_write(run_dir / "masks.npy", buf.getvalue())


def retrain_subsets(train_fn: Callable[[np.ndarray, int], Any], masks: np.ndarray,
                    seeds: Sequence[int], run_dir: str | os.PathLike, *,
                    fingerprint: str = "", progress: Callable[[str], None] | None = print
                    ) -> list[tuple[int, int]]:
    """Trains (or finds cached) one model per ``(subset j, seed)``.

    Args:
      train_fn: ``(indices int [m], seed) -> params`` trains on the training examples
        ``indices`` (sorted; ``np.nonzero(masks[j])[0]``).
      masks: ``[S, n]`` bool from :func:`draw_subsets`.
      seeds: training seeds; every subset is trained with each.
      run_dir: cache folder (created). ``fingerprint``: caller's description of data/model/
        training settings; stored in the manifest and checked on resume.
      progress: called with a one-line message per trained model (None = silent).
    Returns:
      the ``(j, seed)`` pairs trained in this call (cached ones are skipped).
    """
    masks = np.asarray(masks)
    if masks.ndim != 2 or masks.dtype != np.bool_:
        raise ValueError(f"retrain_subsets: masks must be a boolean [S, n] array; got "
                         f"{masks.dtype} {masks.shape}")
    if len(seeds) == 0 or len(set(int(s) for s in seeds)) != len(seeds):
        raise ValueError(f"retrain_subsets: seeds must be non-empty and distinct; got {seeds}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_manifest(run_dir, masks, seeds, fingerprint)
    trained = []
    total = masks.shape[0] * len(seeds)
    for j in range(masks.shape[0]):
        for seed in seeds:
            path = model_path(run_dir, j, int(seed))
            if path.is_file():
                continue
            params = train_fn(np.nonzero(masks[j])[0], int(seed))
            save_model(path, params)
            trained.append((j, int(seed)))
            if progress is not None:
                done = sum(model_path(run_dir, a, int(b)).is_file()
                           for a in range(masks.shape[0]) for b in seeds)
                progress(f"lds: trained subset {j} seed {seed} ({done}/{total})")
    return trained


def actual_outputs(run_dir: str | os.PathLike, measure_fn: Callable[[Any], np.ndarray], *,
                   name: str = "loss", seeds: Sequence[int] | None = None) -> np.ndarray:
    """``[S, T]`` measured outputs averaged over seeds, each model's ``[T]`` cached.

    Args:
      run_dir: a folder prepared by :func:`retrain_subsets` (its manifest gives S and seeds).
      measure_fn: ``params -> [T]`` (e.g. a closure over :func:`target_losses`).
      name: cache name of this measurement (e.g. ``'loss_val'``); a cached output with a
        different T raises :class:`LDSRunMismatchError`.
      seeds: subset of the manifest's seeds to average (default all).
    """
    run_dir = Path(run_dir)
    if not re_name(name):
        raise ValueError(f"actual_outputs: name {name!r} must be a plain file stem")
    man_path = run_dir / MANIFEST
    if not man_path.is_file():
        raise FileNotFoundError(f"{man_path}: not an LDS run directory (run retrain_subsets)")
    man = json.loads(man_path.read_text())
    seeds = man["seeds"] if seeds is None else [int(s) for s in seeds]
    rows = []
    T = None
    for j in range(man["n_subsets"]):
        per_seed = []
        for seed in seeds:
            cache = run_dir / "outputs" / name / f"s{j:04d}_seed{seed}.npy"
            if cache.is_file():
                v = np.load(cache)
            else:
                v = np.asarray(measure_fn(load_model(run_dir, j, seed)), np.float64)
                if v.ndim != 1:
                    raise ValueError(f"actual_outputs: measure_fn must return [T]; got {v.shape}")
                buf = io.BytesIO()
                np.save(buf, v)
                _atomic_write(cache, buf.getvalue())
            if T is None:
                T = v.shape[0]
            if v.shape != (T,):
                raise LDSRunMismatchError(f"{cache}: cached output has shape {v.shape}, "
                                          f"expected ({T},); delete outputs/{name} to remeasure")
            per_seed.append(v)
        rows.append(np.mean(per_seed, axis=0))
    return np.stack(rows)


def re_name(name: str) -> bool:
    """Whether ``name`` is a plain file stem."""
    return re.fullmatch(r"[A-Za-z0-9_.\-]+", name) is not None
