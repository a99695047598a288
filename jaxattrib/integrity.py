"""Checksums of run artefacts: SHA-256 of what was written, verified on read (docs/integrity.md).

[design] Ours. Every cached artefact a run directory reuses (feature/score store chunks, the
trajectory record's checkpoints, per-step / per-batch caches) records the SHA-256 of its bytes
when it is written; a reader recomputes it before trusting the file. What a mismatch means is
the caller's business: a cache entry is recomputed (with a :func:`notice`), a checkpoint is an
error naming the step (``train.record.CorruptCheckpointError``).

Verification results are cached per process by ``(path, size, mtime_ns, inode)``, so a file is
hashed once per process however often it is read, and a rewritten file is hashed again.

Sidecars (:func:`write_checked` / :func:`read_checked`): ``<file>.sha256`` holds
``sha256 <hex>\\n``; it is written after the file (both atomically; the old sidecar is removed
first). A file without a sidecar (a run directory from before checksums, or a run killed between
the two renames, which leaves a complete file) is read unverified, silently.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from jaxattrib.fileio import atomic_write_bytes

logger = logging.getLogger(__name__)

_BUF = 1 << 22
_verified: dict[str, tuple] = {}   # path -> (stat key, hex) of a file hashed in this process


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _stat_key(path: Path) -> tuple:
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, cached per process by its size/mtime/inode."""
    path = Path(path)
    key = _stat_key(path)
    hit = _verified.get(str(path))
    if hit is not None and hit[0] == key:
        return hit[1]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(_BUF)
            if not b:
                break
            h.update(b)
    _verified[str(path)] = (key, h.hexdigest())
    return h.hexdigest()


def remember(path: str | os.PathLike, hexdigest: str) -> None:
    """Records that ``path`` (just written by this process) has ``hexdigest``, so reading it
    back in the same process does not hash it again."""
    path = Path(path)
    _verified[str(path)] = (_stat_key(path), hexdigest)


def format_digest(hexdigest: str) -> bytes:
    return f"sha256 {hexdigest}\n".encode()


def parse_digest(data: bytes) -> str | None:
    """The hex digest of a ``sha256 <hex>`` line; ``None`` for an empty / legacy / torn one."""
    parts = data.decode("ascii", "replace").split()
    if len(parts) == 2 and parts[0] == "sha256" and len(parts[1]) == 64:
        return parts[1].lower()
    return None


_notices: set[str] = set()


def notice(msg: str, *, once_key: str | None = None) -> None:
    """A WARNING on the ``jaxattrib.integrity`` logger (the CLI prints ``notice: ...`` on
    stderr), once per ``once_key`` per process."""
    if once_key is not None:
        if once_key in _notices:
            return
        _notices.add(once_key)
    logger.warning("%s", msg)


def sidecar(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def write_checked(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically writes ``data`` to ``path``, then its checksum to ``<path>.sha256``."""
    path = Path(path)
    side = sidecar(path)
    side.unlink(missing_ok=True)   # never leave an old checksum beside new bytes
    atomic_write_bytes(path, data)
    digest = sha256_bytes(data)
    remember(path, digest)
    atomic_write_bytes(side, format_digest(digest))
    return path


def read_checked(path: str | os.PathLike, *, what: str = "cached file") -> bytes | None:
    """The bytes of ``path``; ``None`` if it is missing or does not match its sidecar checksum
    (then the file and sidecar are removed and a notice says it is recomputed). Without a
    sidecar the bytes are returned unverified."""
    path = Path(path)
    if not path.is_file():
        return None
    side = sidecar(path)
    data = path.read_bytes()
    want = parse_digest(side.read_bytes()) if side.is_file() else None
    if want is None:
        return data
    got = sha256_bytes(data)
    if got != want:
        notice(f"{path}: checksum mismatch (stored sha256 {want[:12]}…, file has {got[:12]}…); "
               f"the corrupt {what} is recomputed")
        side.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        return None
    return data
