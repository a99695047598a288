"""Chunked, resumable on-disk arrays for features and scores.

Our design [design] (TRAK's library keeps features in memory-mapped ``.mmap`` files with a
``metadata.json``; this is the same idea with per-chunk files so a killed run resumes):

``folder/meta.json``         shape, dtype, chunk size and the caller's metadata (validated on reopen)
``folder/chunk_00000.npy``   rows ``[0, chunk_size)``; written to a temp file then ``os.replace``
``folder/chunk_00000.done``  done flag, created after the chunk file is in place; it holds
                             ``sha256 <hex>`` of the chunk file's bytes (empty in stores
                             written before checksums: such chunks are read unverified)
``folder/all.npy``           optional consolidated copy for memory-mapped reads (built on demand;
                             ``all.npy.sha256`` beside it)

A chunk counts as done only when both its ``.npy`` and ``.done`` exist and the file's SHA-256
matches the flag's (checked once per process, see :mod:`jaxattrib.integrity`), so a chunk
interrupted at any point, or corrupted on disk, is recomputed (a corrupt one with a notice on
stderr). Reopening a folder with different metadata raises
:class:`StoreMismatchError` listing every mismatched field with stored and requested values.

Suggested layout of a feature root (see :func:`feature_meta`): ``root/train`` for training
features (reused across query sets), ``root/queries/<name>`` and ``root/scores/<name>``.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from jaxattrib import integrity
from jaxattrib.fileio import atomic_save_npy as _atomic_save_npy, atomic_write_bytes  # noqa: F401
from jaxattrib.fingerprint import tree as tree_fingerprint

FORMAT = "jaxattrib.chunked_array.v1"


class StoreMismatchError(ValueError):
    """An existing store was opened with metadata that differs from what it was written with."""

    def __init__(self, folder, mismatches: dict[str, tuple[Any, Any]]):
        self.folder = str(folder)
        self.mismatches = mismatches
        lines = [f"  {k}: stored {s!r} vs requested {r!r}" for k, (s, r) in mismatches.items()]
        if "generator" in mismatches:
            lines.insert(0, "  (the features were drawn with another version of the projection "
                            "generator; delete this folder to recompute them)")
        if "dataset_fingerprint" in mismatches:
            lines.insert(0, "  (these features were computed for other examples: open another "
                            "folder for the new examples, or delete this one to recompute)")
        extra = mismatches.get("extra")
        if extra is not None and all(isinstance(e, dict) for e in extra):
            was, now = (e.get("noise", "shared") for e in extra)
            if was != now:
                lines.insert(0, f"  (noise: these features were made with noise={was!r} (absent "
                                f"= 'shared', the only mode before the field existed), the "
                                f"request is {now!r}: pass noise={was!r} (`--noise {was}`, "
                                f"attribution.noise) to reuse them, or use another folder)")
        super().__init__(f"{folder}: store metadata differs from the request:\n" + "\n".join(lines))


def _canonical(obj) -> Any:
    """JSON round trip so tuples/ndarrays/np scalars compare equal to what was stored."""
    return json.loads(json.dumps(obj, default=_json_default, sort_keys=True))


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"metadata value {o!r} of type {type(o).__name__} is not JSON-serializable")


def dataset_fingerprint(tree_or_arrays) -> str:
    """sha256 over the shapes, dtypes and bytes of a pytree's leaves / a list of arrays."""
    return tree_fingerprint(tree_or_arrays)


def feature_meta(*, projector_meta: dict, seed: int | None, output_fn: str,
                 dataset_fingerprint: str, timesteps: Sequence[int] | None = None,
                 checkpoint_steps: Sequence[int] | None = None, extra: dict | None = None) -> dict:
    """The standard metadata of a feature store (every field is validated on reopen).

    ``generator``: the projector's generator version (``projection.GENERATOR_VERSION``; absent
    from stores written before versions were recorded), so features drawn with another P
    generator are refused with a message naming it.
    """
    return {"k": projector_meta.get("k"), "seed": seed,
            "projection": projector_meta.get("kind"), "projector": projector_meta,
            "generator": projector_meta.get("generator"),
            "output_fn": output_fn, "dataset_fingerprint": dataset_fingerprint,
            "timesteps": list(timesteps) if timesteps is not None else None,
            "checkpoint_steps": list(checkpoint_steps) if checkpoint_steps is not None else None,
            "extra": extra or {}}


class ChunkedArray:
    """A ``[n_rows, n_cols]`` array stored as row chunks. Open with :meth:`open`."""

    def __init__(self, folder: Path, n_rows: int, n_cols: int, chunk_size: int, dtype, meta):
        self.folder = folder
        self.n_rows, self.n_cols, self.chunk_size = n_rows, n_cols, chunk_size
        self.dtype = np.dtype(dtype)
        self.meta = meta

    @classmethod
    def open(cls, folder, *, n_rows: int, n_cols: int, chunk_size: int, dtype="float32",
             meta: dict | None = None) -> "ChunkedArray":
        """Creates ``folder`` or reopens it, checking shape, dtype, chunk size and ``meta``.

        Raises :class:`StoreMismatchError` naming each field that differs.
        """
        folder = Path(folder)
        if n_rows < 0 or n_cols < 1 or chunk_size < 1:
            raise ValueError(f"{folder}: bad store shape n_rows={n_rows}, n_cols={n_cols}, "
                             f"chunk_size={chunk_size}")
        header = {"format": FORMAT, "n_rows": int(n_rows), "n_cols": int(n_cols),
                  "chunk_size": int(chunk_size), "dtype": np.dtype(dtype).name,
                  "meta": _canonical(meta or {})}
        path = folder / "meta.json"
        if path.exists():
            stored = json.loads(path.read_text())
            mismatches = {}
            for k in ("format", "n_rows", "n_cols", "chunk_size", "dtype"):
                if stored.get(k) != header[k]:
                    mismatches[k] = (stored.get(k), header[k])
            smeta, rmeta = stored.get("meta", {}), header["meta"]
            for k in sorted(set(smeta) | set(rmeta)):
                if smeta.get(k, "<absent>") != rmeta.get(k, "<absent>"):
                    mismatches[k] = (smeta.get(k, "<absent>"), rmeta.get(k, "<absent>"))
            if mismatches:
                raise StoreMismatchError(folder, mismatches)
        else:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, json.dumps(header, indent=1, sort_keys=True).encode())
        return cls(folder, n_rows, n_cols, chunk_size, dtype, header["meta"])

    # -- layout -----------------------------------------------------------------------------
    @property
    def n_chunks(self) -> int:
        return -(-self.n_rows // self.chunk_size)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_rows, self.n_cols)

    def chunk_range(self, i: int) -> tuple[int, int]:
        """Rows ``[start, stop)`` of chunk ``i``."""
        if not 0 <= i < self.n_chunks:
            raise IndexError(f"{self.folder}: chunk {i} out of range [0, {self.n_chunks})")
        return i * self.chunk_size, min((i + 1) * self.chunk_size, self.n_rows)

    def _paths(self, i: int) -> tuple[Path, Path]:
        return self.folder / f"chunk_{i:05d}.npy", self.folder / f"chunk_{i:05d}.done"

    # -- state ------------------------------------------------------------------------------
    def is_done(self, i: int) -> bool:
        """Chunk ``i`` is written and intact. A chunk whose bytes do not match its recorded
        SHA-256 is marked not done (its flag removed, a notice printed) so it is recomputed."""
        data, flag = self._paths(i)
        if not (data.exists() and flag.exists()):
            return False
        return self._verify(i)

    def _verify(self, i: int) -> bool:
        data, flag = self._paths(i)
        try:
            want = integrity.parse_digest(flag.read_bytes())
            if want is None:       # a store from before checksums: unverified
                return True
            got = integrity.sha256_file(data)
        except FileNotFoundError:
            return False
        if got == want:
            return True
        integrity.notice(f"{data}: checksum mismatch (stored sha256 {want[:12]}…, file has "
                         f"{got[:12]}…); chunk {i} is corrupt and will be recomputed")
        flag.unlink(missing_ok=True)
        (self.folder / "all.npy").unlink(missing_ok=True)
        return False

    def missing_chunks(self) -> list[int]:
        return [i for i in range(self.n_chunks) if not self.is_done(i)]

    def complete(self) -> bool:
        return not self.missing_chunks()

    # -- io ---------------------------------------------------------------------------------
    def write_chunk(self, i: int, arr) -> None:
        """Atomically writes chunk ``i`` (shape ``[stop-start, n_cols]``) and marks it done."""
        start, stop = self.chunk_range(i)
        arr = np.asarray(arr)
        if arr.shape != (stop - start, self.n_cols):
            raise ValueError(f"{self.folder}: chunk {i} must have shape "
                             f"{(stop - start, self.n_cols)}, got {arr.shape}")
        data, flag = self._paths(i)
        flag.unlink(missing_ok=True)
        buf = io.BytesIO()
        np.save(buf, arr.astype(self.dtype, copy=False))
        blob = buf.getvalue()
        atomic_write_bytes(data, blob)
        digest = integrity.sha256_bytes(blob)
        integrity.remember(data, digest)
        atomic_write_bytes(flag, integrity.format_digest(digest))
        (self.folder / "all.npy").unlink(missing_ok=True)  # stale consolidated copy

    def read_chunk(self, i: int, *, mmap: bool = False) -> np.ndarray:
        """Chunk ``i``, checksum-verified; raises ``FileNotFoundError`` if it is not written or
        was found corrupt (then it is marked for recomputation: rerun the command)."""
        if not self.is_done(i):
            raise FileNotFoundError(f"{self.folder}: chunk {i} has not been written (or was "
                                    f"corrupt and is now marked for recomputation; rerun)")
        arr = np.load(self._paths(i)[0], mmap_mode="r" if mmap else None)
        start, stop = self.chunk_range(i)
        if arr.shape != (stop - start, self.n_cols) or arr.dtype != self.dtype:
            raise ValueError(f"{self._paths(i)[0]}: shape {arr.shape} {arr.dtype}, expected "
                             f"{(stop - start, self.n_cols)} {self.dtype}")
        return arr

    def iter_chunks(self, *, mmap: bool = True) -> Iterator[tuple[int, np.ndarray]]:
        """Yields ``(start_row, rows)`` chunk by chunk (memory-mapped by default)."""
        for i in range(self.n_chunks):
            yield self.chunk_range(i)[0], self.read_chunk(i, mmap=mmap)

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as an in-memory array (reads only the chunks it needs)."""
        out = np.empty((stop - start, self.n_cols), self.dtype)
        for i in range(start // self.chunk_size, -(-stop // self.chunk_size)):
            c0, c1 = self.chunk_range(i)
            lo, hi = max(c0, start), min(c1, stop)
            out[lo - start:hi - start] = self.read_chunk(i, mmap=True)[lo - c0:hi - c0]
        return out

    def read_all(self, *, mmap: bool = False) -> np.ndarray:
        """The whole ``[n_rows, n_cols]`` array; raises if a chunk is missing.

        ``mmap=True`` consolidates the chunks once into ``all.npy`` (atomically) and returns a
        read-only memory map of it.
        """
        missing = self.missing_chunks()
        if missing:
            raise FileNotFoundError(f"{self.folder}: {len(missing)} chunk(s) not written yet, "
                                    f"first {missing[:5]}")
        if not mmap:
            if self.n_chunks == 0:
                return np.empty((0, self.n_cols), self.dtype)
            return np.concatenate([self.read_chunk(i) for i in range(self.n_chunks)], 0)
        path = self.folder / "all.npy"
        side = integrity.sidecar(path)
        if path.exists():
            # A consolidated copy is trusted only with a matching checksum; otherwise (corrupt,
            # or killed before its checksum was written) it is rebuilt from the chunks.
            want = integrity.parse_digest(side.read_bytes()) if side.exists() else None
            if want is None or integrity.sha256_file(path) != want:
                if want is not None:
                    integrity.notice(f"{path}: checksum mismatch; rebuilt from the chunks")
                path.unlink()
        if not path.exists():
            side.unlink(missing_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".all.npy.", suffix=".tmp")
            os.close(fd)
            try:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=self.dtype,
                                                shape=self.shape)
                for start, rows in self.iter_chunks():
                    out[start:start + rows.shape[0]] = rows
                out.flush()
                del out
                digest = integrity.sha256_file(tmp)
                os.replace(tmp, path)
                integrity.remember(path, digest)
                atomic_write_bytes(side, integrity.format_digest(digest))
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        return np.load(path, mmap_mode="r")


# Short alias used across the package.
open_store = ChunkedArray.open
