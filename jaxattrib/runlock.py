"""One writer per run directory: a lock file taken by every command that writes a run.

``RUN_DIR/.jaxattrib.lock`` holds one JSON object ``{pid, host, command, started, pid_start}``
(``started``: UTC ISO time; ``pid_start``: the process's start time in clock ticks from
``/proc/PID/stat``, so a reused pid is not mistaken for the holder). Mutual exclusion itself is an
exclusive, non-blocking ``fcntl.flock`` on that file, held for the command's lifetime: the kernel
releases it when the holder dies, however it dies (``kill -9`` included) [design].

* A second writer is refused at once with :class:`RunLockError`, naming the holder.
* A lock file left by a dead process (the flock is free and the file still names a pid) is
  *stale*: recovered, with a notice naming the dead holder.
* A lock file naming another host is refused (its process cannot be checked from here) unless
  its flock is free **and** the holder is known dead; the message says which file to delete.
* Readers (``report``, ``info``) take no lock. Multi-host launches take it once, on process 0.

Foundation layer: standard library only.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".jaxattrib.lock"


class RunLockError(RuntimeError):
    """The run directory is in use by another writer (or cannot hold a lock)."""


logger = logging.getLogger(__name__)


def _notice(msg: str) -> None:
    """A WARNING (the CLI prints ``notice: ...`` on stderr)."""
    logger.warning("%s", msg)


def _pid_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), or None if unknown/absent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def _pid_alive(pid: int, pid_start: int | None) -> bool:
    """Whether ``pid`` (started at ``pid_start``, if known) still runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    now = _pid_start(pid)
    return pid_start is None or now is None or now == pid_start


def describe(info: dict) -> str:
    """``pid 123 on host h (command 'demo', started 2026-...)`` for a lock's JSON."""
    if not info:
        return "another process (its details are not written yet)"
    return (f"pid {info.get('pid')} on host {info.get('host')} (command "
            f"{info.get('command')!r}, started {info.get('started')})")


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    try:
        info = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        info = {"unreadable": raw[:200].decode("utf-8", "replace")}
    return info if isinstance(info, dict) else {}


def read_lock(run_dir: str | os.PathLike) -> dict | None:
    """The lock file's JSON (``{}`` if empty), or None when there is no lock file."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        return _read(fd)
    finally:
        os.close(fd)


class RunLock:
    """An acquired run-directory lock; :meth:`release` (or ``with``) gives it back."""

    def __init__(self, run_dir: Path, fd: int, info: dict):
        self.run_dir, self.path, self._fd, self.info = run_dir, run_dir / LOCK_NAME, fd, info

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)   # while still holding the flock: no one can take it between
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check_run_dir(run_dir: str | os.PathLike) -> Path:
    """Creates ``run_dir`` (and parents) if needed; a path that is a file, or a folder that
    cannot be written, is a :class:`RunLockError` naming it and what is expected."""
    run_dir = Path(run_dir)
    for p in (run_dir, *run_dir.parents):
        if p.exists() and not p.is_dir():
            raise RunLockError(f"run directory {run_dir}: {p} is a file, not a folder; give a "
                               f"folder path (new or existing) for --run-dir")
        if p.is_dir():
            break
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunLockError(f"run directory {run_dir}: cannot be created ({e.strerror}); give "
                           f"a writable folder") from e
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise RunLockError(f"run directory {run_dir}: not writable by this user; give a "
                           f"writable folder (or fix its permissions)")
    return run_dir


def acquire(run_dir: str | os.PathLike, command: str) -> RunLock:
    """Takes the writer lock of ``run_dir`` (created if needed) for ``command``.

    Raises :class:`RunLockError` at once if another live process holds it (no waiting)."""
    import fcntl
    run_dir = check_run_dir(run_dir)
    path = run_dir / LOCK_NAME
    host = socket.gethostname()
    for _ in range(20):      # retries only when the file was replaced under us
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunLockError(f"run directory {run_dir}: cannot create the lock file {path} "
                               f"({e.strerror})") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            for _ in range(20):        # the holder writes its details right after locking
                if holder:
                    break
                time.sleep(0.05)
                holder = _read(fd)
            os.close(fd)
            raise RunLockError(f"run directory {run_dir} is in use by {describe(holder)}; "
                               f"only one command may write a run directory at a time: wait "
                               f"for it to finish, or use another --run-dir") from None
        except OSError as e:
            import errno
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise RunLockError(f"run directory {run_dir}: the lock file {path} cannot be "
                                   f"locked ({e.strerror})") from e
            # a file system without flock (some network mounts): the lock file's content
            # alone decides, checked below like a stale lock [design]
            _notice(f"{path}: this file system does not support flock ({e.strerror}); the "
                    f"lock relies on the file's content alone")
            holder = _read(fd)
            if holder.get("pid") is not None and (holder.get("host") != host or _pid_alive(
                    int(holder["pid"]), holder.get("pid_start"))) and \
                    int(holder["pid"]) != os.getpid():
                os.close(fd)
                raise RunLockError(f"run directory {run_dir} is in use by {describe(holder)}; "
                                   f"if that process is no longer running, delete {path} and "
                                   f"rerun") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:         # the previous holder unlinked it after we opened it: try again
            os.close(fd)
            continue
        old = _read(fd)
        if old.get("pid") is not None:
            if old.get("host") == host:
                if _pid_alive(int(old["pid"]), old.get("pid_start")) and \
                        int(old["pid"]) != os.getpid():
                    os.close(fd)
                    raise RunLockError(
                        f"run directory {run_dir} is in use by {describe(old)} (its lock "
                        f"{path} is not held, but that process is alive); wait for it, or "
                        f"stop it and rerun")
                _notice(f"{path}: recovered a stale lock left by {describe(old)}, which is no "
                        f"longer running")
            else:
                os.close(fd)
                raise RunLockError(
                    f"run directory {run_dir} is locked by {describe(old)}; a process on "
                    f"another host cannot be checked from {host}: if it is no longer running, "
                    f"delete {path} and rerun")
        info = {"pid": os.getpid(), "host": host, "command": command,
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "pid_start": _pid_start(os.getpid())}
        data = (json.dumps(info) + "\n").encode("utf-8")
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, data)
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            raise RunLockError(f"run directory {run_dir}: cannot write the lock file {path} "
                               f"({e.strerror})") from e
        return RunLock(run_dir, fd, info)
    raise RunLockError(f"run directory {run_dir}: the lock file {path} keeps being replaced; "
                       f"is another command starting on it?")


#: files that do not count as results: a run directory holding only these has computed nothing
BOOKKEEPING = (LOCK_NAME, "config.json", "errors")


def has_results(run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir`` holds any file besides :data:`BOOKKEEPING` (empty folders do not
    count): a run that failed before computing anything can be retried with another config."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return False
    for p in run_dir.iterdir():
        if p.name in BOOKKEEPING:
            continue
        if p.is_file() or p.is_symlink():
            return True
        if p.is_dir() and any(q.is_file() for q in p.rglob("*")):
            return True
    return False


def clear_run_dir(run_dir: str | os.PathLike) -> None:
    """``--fresh``: deletes everything in ``run_dir`` except the lock file (which the calling
    command holds)."""
    import shutil
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    for p in run_dir.iterdir():
        if p.name == LOCK_NAME:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
