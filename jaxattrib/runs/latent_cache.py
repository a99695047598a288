"""Cached VAE latents of a run's training set: a resumable chunked store (the edge around
:func:`jaxattrib.diffusion.latents.encode_images`).

Layout [design] (the conventions of :mod:`jaxattrib.attribution.store`)::

    RUN/latents/train/meta.json          shape [N, h*w*c] float32, chunk size, and the key below
    RUN/latents/train/chunk_00000.npy    rows [0, chunk) of the flattened latents (+ .done flag)

The store is keyed by the **data fingerprint** (the training set the run was made with) and the
**VAE weights' fingerprint** (:func:`~jaxattrib.diffusion.latents.vae_fingerprint`), plus the
latent rule, scaling/shift factors and latent shape. A store written for other data or another
VAE is refused with :class:`LatentCacheError` (a :class:`~jaxattrib.config.ConfigError`: CLI exit
2) naming each differing field — never silently reused; delete the folder to re-encode.

Filling is chunk-wise and resumable (a killed encode restarts at the first missing chunk) and
takes an *iterator of batches* ``(start_row, images [b, H, W, 3])``, so the pixels never have to
be in memory at once: any data source that yields its rows in batches can fill it
(:func:`array_batches` adapts an in-memory array).
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np

from jaxattrib.attribution import store as store_lib
from jaxattrib.config import ConfigError
from jaxattrib.runs.rundir import RunDir


class LatentCacheError(ConfigError):
    """A latent store exists for other data, another VAE or another latent rule."""


def latent_meta(pipe, *, data_fingerprint: str, vae_fingerprint: str) -> dict:
    """The key of a latent store (every field is compared on reopen)."""
    from jaxattrib.diffusion.latents import LATENT_RULE, sample_shape
    v = pipe.vae_config
    return {"kind": "vae_latents", "rule": LATENT_RULE,
            "sample_shape": list(sample_shape(pipe.unet_config)),
            "scaling_factor": float(v.scaling_factor),
            "shift_factor": None if v.shift_factor is None else float(v.shift_factor),
            "data_fingerprint": str(data_fingerprint), "vae_fingerprint": str(vae_fingerprint)}


def open_latent_store(folder, pipe, n: int, *, data_fingerprint: str, vae_fingerprint: str,
                      chunk_size: int = 64) -> store_lib.ChunkedArray:
    """Creates or reopens the latent store of ``n`` images at ``folder``; refuses a store with
    another key (:class:`LatentCacheError` naming the fields)."""
    from jaxattrib.diffusion.latents import sample_shape
    h, w, c = sample_shape(pipe.unet_config)
    meta = latent_meta(pipe, data_fingerprint=data_fingerprint,
                       vae_fingerprint=vae_fingerprint)
    try:
        return store_lib.ChunkedArray.open(folder, n_rows=n, n_cols=h * w * c,
                                           chunk_size=max(1, min(chunk_size, n)), meta=meta)
    except store_lib.StoreMismatchError as e:
        what = ("the VAE weights differ from those it was encoded with"
                if "vae_fingerprint" in e.mismatches else
                "the training data differ from those it was encoded from"
                if "data_fingerprint" in e.mismatches else "its settings differ")
        lines = "\n".join(f"  {k}: stored {s!r} vs now {r!r}" for k, (s, r) in
                          e.mismatches.items())
        raise LatentCacheError(f"{folder}: cached VAE latents refused: {what}:\n{lines}\n"
                               f"(delete {folder} to re-encode; feature stores computed from "
                               f"the old latents are refused as well)") from None


def array_batches(images, batch_size: int = 16) -> Iterator[tuple[int, np.ndarray]]:
    """``(start_row, images[start:start+batch_size])`` over an array (or memory map)."""
    for start in range(0, len(images), batch_size):
        yield start, np.asarray(images[start:start + batch_size], np.float32)


def fill_latent_store(st: store_lib.ChunkedArray, batches: Iterable[tuple[int, np.ndarray]],
                      encode: Callable[[np.ndarray], np.ndarray], *, progress: bool = True,
                      desc: str = "VAE-encode",
                      chunks: Iterable[int] | None = None) -> store_lib.ChunkedArray:
    """Encodes the rows of the store's missing chunks from ``batches`` and writes them.

    ``batches``: ``(start_row, images [b, H, W, 3])`` in any order; batches whose rows all lie
    in finished chunks are skipped without encoding (nothing is consumed when the store is
    complete). ``encode``: ``images -> latents [b, h, w, c]`` (e.g. ``lambda x:
    encode_images(vae_config, vae_params, x)``). A chunk is written (atomically) as soon as all
    its rows have arrived. Progress: a tqdm bar over rows with rate and ETA. Raises ValueError
    if the batches end before every chunk is filled. ``chunks``: fill only these of the
    missing chunks (one process's share on several hosts; default: all)."""
    missing = set(st.missing_chunks())
    if chunks is not None:
        missing &= {int(i) for i in chunks}
    if not missing:
        return st
    cs = st.chunk_size
    pending: dict[int, np.ndarray] = {}
    filled: dict[int, int] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm
        total = sum(st.chunk_range(i)[1] - st.chunk_range(i)[0] for i in missing)
        bar = tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)
    try:
        for start, images in batches:
            rows = np.arange(start, start + len(images))
            need = np.isin(rows // cs, list(missing))
            if not need.any():
                continue
            z = np.asarray(encode(np.asarray(images)[need]), np.float32).reshape(int(need.sum()),
                                                                                  -1)
            for row, zr in zip(rows[need], z):
                i = int(row) // cs
                c0, c1 = st.chunk_range(i)
                if i not in pending:
                    pending[i], filled[i] = np.zeros((c1 - c0, st.n_cols), np.float32), 0
                pending[i][row - c0] = zr
                filled[i] += 1
                if filled[i] == c1 - c0:
                    st.write_chunk(i, pending.pop(i))
                    missing.discard(i)
            if bar is not None:
                bar.update(int(need.sum()))
            if not missing:
                break
    finally:
        if bar is not None:
            bar.close()
    if missing:
        raise ValueError(f"{st.folder}: the batches ended with {len(missing)} chunk(s) of "
                         f"latents unfilled (first {sorted(missing)[:5]})")
    return st


def read_latents(st: store_lib.ChunkedArray) -> np.ndarray:
    """The whole store as ``[N, h, w, c]`` float32."""
    h, w, c = st.meta["sample_shape"]
    return st.read_all().reshape(st.n_rows, h, w, c)


def cached_training_latents(run_dir, pipe, n: int, batches: Iterable[tuple[int, np.ndarray]],
                            *, data_fingerprint: str, vae_fingerprint: str | None = None,
                            progress: bool = True, chunk_size: int = 64) -> np.ndarray:
    """``RUN/latents/train`` filled from ``batches`` (encoded once; later calls read the cache)
    -> latents ``[n, h, w, c]``.

    On several processes (``jax.distributed``) call it on every process: process 0 creates the
    store, each process encodes and writes its round-robin share of the missing chunks
    (:func:`jaxattrib.parallel.my_share`), and all read the whole store after a barrier (the
    run directory on a shared file system)."""
    import jax

    from jaxattrib.diffusion.latents import encode_images, vae_fingerprint as vfp
    from jaxattrib.parallel import my_share, on_process0_first
    vf = vfp(pipe.vae_config, pipe.vae_params) if vae_fingerprint is None else vae_fingerprint
    folder = RunDir(run_dir).latents / "train"
    st = on_process0_first(lambda: open_latent_store(
        folder, pipe, n, data_fingerprint=data_fingerprint, vae_fingerprint=vf,
        chunk_size=chunk_size), f"latent store {folder}")
    multi = jax.process_count() > 1
    fill_latent_store(st, batches,
                      lambda x: encode_images(pipe.vae_config, pipe.vae_params, x),
                      progress=progress and jax.process_index() == 0,
                      chunks=my_share(st.missing_chunks()) if multi else None)
    if multi:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"filled latent store {folder}")
    return read_latents(st)
