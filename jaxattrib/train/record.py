"""The trajectory record: checkpoints of a fine-tuning run plus what each step saw.

Every attribution method reads parameters from the record by step; nothing re-trains to
attribute. A record directory holds::

    manifest.json     config, seed, model description, dataset fingerprint/ids, LR schedule
    steps.jsonl       one JSON line per optimizer step s (the update params_s -> params_s+1):
                      {"step", "lr", "indices", "key", ...task fields such as "timesteps"}
    checkpoints/<k>/  orbax checkpoint of the state after k updates:
                      item "train" = {"step", "params" (trainable part), "opt_state"};
                      step 0 additionally holds item "base" = the full pretrained parameters.

[design] Conventions (ours, not from a paper):

* Checkpoint ``k`` holds the parameters after ``k`` optimizer updates; ``0`` is the pretrained
  model and is always saved. ``steps.jsonl`` line ``s`` describes the update from ``k = s`` to
  ``k = s + 1``, so batches of checkpoint interval ``(k0, k1]`` are lines ``k0 .. k1-1``.
* Model parameters at step ``k`` = ``base`` with the trainable part of checkpoint ``k``
  composed in (full mode: the trainable top-level subtrees replace base's; LoRA mode:
  ``lora_merge(base, lora_k, alpha)``); :meth:`TrajectoryRecord.load` does that.
* Writes: the manifest is written to a temporary file and renamed; ``steps.jsonl`` is appended
  one line per ``write`` + ``fsync`` (a torn last line from a killed process is ignored by
  readers and dropped on resume); checkpoints are finalized atomically by orbax (a checkpoint
  directory is renamed into place only when complete; unfinished ``*.orbax-checkpoint-tmp-*``
  folders are ignored). The record never deletes or overwrites a checkpoint: ``max_to_keep``
  is unlimited and saving an existing step is refused.
* Opening an existing record with a different manifest raises :class:`RecordMismatchError`
  naming the first differing field, before anything is written.
* Integrity (docs/integrity.md): ``checksums/<k>.json`` lists the SHA-256 of every file of
  checkpoint ``k`` (written by process 0 once orbax has finalized the step: after the next
  save, :meth:`TrajectoryRecord.wait` / ``close``, and on reopening for writing, which fills in
  the checksums of steps finalized by a killed run). Loading a checkpoint verifies its files
  (once per process per file) and raises :class:`CorruptCheckpointError` naming the step, the
  file and how to recover. A checkpoint without checksums (a record from before checksums) is
  loaded unverified, with one notice per record and process.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
from jaxattrib import integrity
from jaxattrib.fileio import atomic_write_text as _atomic_write_text
from jaxattrib.models.convert import CheckpointError

MANIFEST = "manifest.json"
STEPS = "steps.jsonl"
CHECKPOINTS = "checkpoints"
CHECKSUMS = "checksums"
FORMAT = "jaxattrib.trajectory_record/1"
CHECKSUM_FORMAT = "jaxattrib.checkpoint_checksums/1"


class RecordError(RuntimeError):
    """A trajectory record is missing, corrupt or used inconsistently."""


class RecordMismatchError(RecordError):
    """An existing record's manifest differs from the requested one (field named)."""


class CorruptCheckpointError(RecordError, CheckpointError):
    """A checkpoint's files do not match the checksums recorded when it was written (the
    message names the step, the file and how to recover). Both a :class:`RecordError` and a
    ``models.convert.CheckpointError``, so every command reports it as a user error (exit 2)."""


def _to_jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_jsonable(v) for v in x]
    if isinstance(x, (np.ndarray, jax.Array)):
        return _to_jsonable(np.asarray(x).tolist())
    if isinstance(x, np.generic):
        return x.item()
    return x


def dataset_fingerprint(data: Any) -> str:
    """SHA-256 (hex) of a dataset description for the manifest: a sequence of example ids
    (strings/ints) or a pytree of arrays (shapes, dtypes and bytes, leaves in key order)."""
    h = hashlib.sha256()
    if isinstance(data, (list, tuple)) and all(isinstance(x, (str, int)) for x in data):
        for x in data:
            h.update(repr(x).encode() + b"\0")
        return h.hexdigest()
    for path, leaf in jax.tree_util.tree_leaves_with_path(data):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            sub = f"{path}.{k}" if path else str(k)
            if k not in a or k not in b:
                return sub
            d = _first_difference(a[k], b[k], sub)
            if d is not None:
                return d
        return None
    return None if a == b else (path or "<root>")


def _lookup(d: Any, dotted: str) -> Any:
    for k in dotted.split("."):
        if not isinstance(d, dict) or k not in d:
            return "<absent>"
        d = d[k]
    return d


def _read_steps_file(path: Path) -> list[dict]:
    """Parsed lines of steps.jsonl; a torn (unparsable / unterminated) last line is skipped."""
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        last = i == len(lines) - 1  # no trailing newline: possibly torn
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if last:
                break
            raise RecordError(f"{path}: line {i + 1} is not valid JSON")
        if last:
            break  # a complete line always ends with a newline
        out.append(rec)
    return out


class TrajectoryRecord:
    """Checkpoints + manifest + per-step log of one fine-tuning run (see module docstring).

    Use :meth:`create` for a new record (or to reopen one with a manifest check) and
    :meth:`open` for reading an existing one.
    """

    def __init__(self, directory: Path, manifest: dict, read_only: bool):
        import orbax.checkpoint as ocp
        # orbax needs absolute paths; a relative one (e.g. from the CLI) is made absolute here.
        self.directory = Path(directory).absolute()
        self.manifest = manifest
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None, create=not read_only, read_only=read_only,
            enable_async_checkpointing=not read_only)
        self._ocp = ocp
        self._manager = ocp.CheckpointManager(
            self.directory / CHECKPOINTS, options=options,
            item_handlers={"train": ocp.StandardCheckpointHandler(),
                           "base": ocp.StandardCheckpointHandler()})
        self._steps_cache: dict[int, dict] | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, directory: str | os.PathLike, manifest: Mapping) -> "TrajectoryRecord":
        """Creates a record at ``directory`` or reopens an existing one for writing.

        An existing record must have an identical manifest (JSON-normalized), else
        :class:`RecordMismatchError` names the first differing field; nothing is changed.
        """
        directory = Path(directory)
        manifest = dict(_to_jsonable(dict(manifest)))
        manifest.setdefault("format", FORMAT)
        path = directory / MANIFEST
        if path.exists():
            existing = cls._read_manifest(directory)
            diff = _first_difference(existing, manifest)
            if diff is not None:
                raise RecordMismatchError(
                    f"{directory}: existing trajectory record differs in field {diff!r}: "
                    f"record has {_lookup(existing, diff)!r}, requested "
                    f"{_lookup(manifest, diff)!r}; use a new record directory")
        else:
            if jax.process_index() == 0:
                directory.mkdir(parents=True, exist_ok=True)
                _atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=True))
        rec = cls(directory, manifest, read_only=False)
        rec._write_missing_checksums()   # steps finalized by a run killed before their checksums
        return rec

    @classmethod
    def open(cls, directory: str | os.PathLike,
             expect: Mapping | None = None) -> "TrajectoryRecord":
        """Opens an existing record read-only; ``expect`` (a partial manifest) must match."""
        directory = Path(directory)
        manifest = cls._read_manifest(directory)
        if expect is not None:
            expect = _to_jsonable(dict(expect))
            for k, v in expect.items():
                diff = _first_difference({k: manifest.get(k, "<absent>")}, {k: v})
                if diff is not None:
                    raise RecordMismatchError(
                        f"{directory}: trajectory record differs in field {diff!r}: record "
                        f"has {_lookup(manifest, diff)!r}, expected {_lookup(expect, diff)!r}")
        return cls(directory, manifest, read_only=True)

    @staticmethod
    def _read_manifest(directory: Path) -> dict:
        path = directory / MANIFEST
        if not path.is_file():
            raise RecordError(f"{path}: missing; {directory} is not a trajectory record")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise RecordError(f"{path}: not valid JSON ({e})") from e

    # ------------------------------------------------------------------ checkpoints
    def steps(self) -> list[int]:
        """Checkpointed steps (finalized only), ascending."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        s = self.steps()
        return s[-1] if s else None

    def save(self, step: int, train_state: Mapping, base: Any = None) -> None:
        """Saves ``train_state`` (``{'step', 'params', 'opt_state'}``) as checkpoint ``step``.

        ``base`` (the full pretrained parameters) is required at step 0 and refused elsewhere.
        Raises :class:`RecordError` if ``step`` already exists (nothing is overwritten).
        """
        if self.read_only:
            raise RecordError(f"{self.directory}: record opened read-only")
        if (step == 0) != (base is not None):
            raise RecordError("save: base params are saved with step 0 and only there")
        if step in self._manager.all_steps():
            raise RecordError(f"{self.directory}: checkpoint {step} exists; refusing to "
                              f"overwrite it")
        items = {"train": self._ocp.args.StandardSave(dict(train_state))}
        if base is not None:
            items["base"] = self._ocp.args.StandardSave(base)
        if jax.process_index() == 0:   # a stale list (the step was deleted to recover)
            self._checksum_path(step).unlink(missing_ok=True)
        if not self._manager.save(step, args=self._ocp.args.Composite(**items), force=True):
            raise RecordError(f"{self.directory}: orbax did not save step {step}")
        # orbax finishes the previous (asynchronous) save before starting this one
        self._write_missing_checksums(below=step)

    def wait(self) -> None:
        """Blocks until pending (asynchronous) checkpoint writes are finalized (and their
        checksums written)."""
        self._manager.wait_until_finished()
        self._write_missing_checksums()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._write_missing_checksums()
        self._manager.close()

    # ------------------------------------------------------------------ integrity
    def _step_dir(self, step: int) -> Path:
        return self.directory / CHECKPOINTS / str(step)

    def _checksum_path(self, step: int) -> Path:
        return self.directory / CHECKSUMS / f"{step}.json"

    def _hash_step(self, step: int) -> dict[str, str]:
        root = self._step_dir(step)
        files = sorted(p for p in root.rglob("*") if p.is_file())
        return {p.relative_to(root).as_posix(): integrity.sha256_file(p) for p in files}

    def _write_missing_checksums(self, below: int | None = None) -> None:
        """Writes ``checksums/<k>.json`` for finalized steps (``< below``) that lack one."""
        if self.read_only or jax.process_index() != 0:
            return
        for step in sorted(self._manager.all_steps()):
            if below is not None and step >= below:
                continue
            path = self._checksum_path(step)
            if path.exists() or not self._step_dir(step).is_dir():
                continue
            doc = {"format": CHECKSUM_FORMAT, "step": int(step), "algorithm": "sha256",
                   "files": self._hash_step(step)}
            _atomic_write_text(path, json.dumps(doc, indent=1, sort_keys=True))

    def verify_step(self, step: int) -> bool:
        """Checks checkpoint ``step``'s files against ``checksums/<step>.json``.

        Returns ``True`` if verified, ``False`` if the step has no checksums (a record from
        before checksums, or a run killed before they were written: loaded unverified, one
        notice per record). Raises :class:`CorruptCheckpointError` on any difference.
        """
        path = self._checksum_path(step)
        if not path.is_file():
            integrity.notice(f"{self.directory}: checkpoint {step} has no checksums (written "
                             f"before checkpoints were checksummed); loaded unverified",
                             once_key=f"record-unverified:{self.directory}")
            return False
        try:
            want = json.loads(path.read_text())["files"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise self._corrupt(step, f"{path} is unreadable ({e})") from e
        root = self._step_dir(step)
        for rel, digest in sorted(want.items()):
            f = root / rel
            if not f.is_file():
                raise self._corrupt(step, f"file {rel} is missing")
            got = integrity.sha256_file(f)
            if got != digest:
                raise self._corrupt(step, f"file {rel} has sha256 {got[:12]}…, recorded "
                                          f"{digest[:12]}…")
        extra = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                       if p.is_file() and p.relative_to(root).as_posix() not in want)
        if extra:
            raise self._corrupt(step, f"unexpected file(s) {extra[:3]}")
        return True

    def _corrupt(self, step: int, what: str) -> CorruptCheckpointError:
        steps = self.steps()
        later = [s for s in steps if s >= step]
        earlier = [s for s in steps if s < step]
        if earlier:
            how = (f"delete checkpoint(s) {later} (rm -r " +
                   " ".join(str(self._step_dir(s)) for s in later) +
                   f") and rerun the fine-tuning command: it resumes from checkpoint "
                   f"{earlier[-1]} and rewrites them (deterministically, same result)")
        else:
            how = (f"checkpoint 0 holds the base model: delete the record directory "
                   f"{self.directory} and rerun the fine-tuning command")
        return CorruptCheckpointError(
            f"{self._step_dir(step)}: checkpoint of step {step} is corrupt ({what}; it no "
            f"longer matches {self._checksum_path(step)}). To recover: {how}.")

    def _restore(self, step: int, item: str, template: Any) -> Any:
        self.verify_step(step)
        if template is None:
            # [design] Without a template, restore every array onto this process's first
            # device, whatever topology wrote the record (orbax otherwise tries to rebuild
            # the writer's shardings and fails on a different device set).
            meta = self._manager.item_metadata(step)[item]
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            template = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                getattr(meta, "tree", meta))
        args = self._ocp.args.StandardRestore(template)
        return self._manager.restore(step, args=self._ocp.args.Composite(**{item: args}))[item]

    def load_train_state(self, step: int, template: Any = None) -> dict:
        """The raw ``{'step', 'params', 'opt_state'}`` of checkpoint ``step``.

        ``template`` (a pytree of arrays or ``jax.ShapeDtypeStruct`` with shardings, same
        structure) restores optimizer-state types and target shardings; without it, nested
        dicts/lists of arrays on this process's first device are returned (works whatever
        device topology wrote the record).
        """
        self._check_step(step)
        return self._restore(step, "train", template)

    def load_base(self, template: Any = None) -> Any:
        """The full pretrained parameters saved with checkpoint 0."""
        self._check_step(0)
        return self._restore(0, "base", template)

    def _check_step(self, step: int) -> None:
        if step not in self.steps():
            raise RecordError(f"{self.directory}: no checkpoint for step {step}; "
                              f"checkpointed steps: {self.steps()}")

    def load(self, step: int, template: Any = None) -> Any:
        """Model parameters after ``step`` updates (base composed with the trainable part).

        ``template``: optional pytree (arrays or ``ShapeDtypeStruct``) of the *full* model
        parameters; the result is cast/placed to its dtypes and shardings.
        """
        from jaxattrib.models.lora import compose_params
        cfg = self.manifest.get("config", {})
        base = self.load_base()
        params = base if step == 0 else compose_params(
            self.load_train_state(step)["params"], base, cfg)
        if template is not None:
            def place(t, x):
                x = jax.numpy.asarray(x, dtype=t.dtype)
                sh = getattr(t, "sharding", None)
                return jax.device_put(x, sh) if sh is not None else x
            params = jax.tree.map(place, template, params)
        return params

    def iterate(self, template: Any = None) -> Iterator[tuple[int, Any]]:
        """Yields ``(step, model params)`` for every checkpoint, ascending."""
        for s in self.steps():
            yield s, self.load(s, template)

    # ------------------------------------------------------------------ step log
    def append_step(self, info: Mapping) -> None:
        """Appends one line to ``steps.jsonl`` (single write + fsync; process 0 only)."""
        if self.read_only:
            raise RecordError(f"{self.directory}: record opened read-only")
        if jax.process_index() != 0:
            return
        line = (json.dumps(_to_jsonable(dict(info)), sort_keys=True) + "\n").encode()
        fd = os.open(self.directory / STEPS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._steps_cache = None

    def truncate_steps(self, upto: int) -> None:
        """Keeps only step-log lines with ``step < upto`` (atomic rewrite; on resume)."""
        if self.read_only:
            raise RecordError(f"{self.directory}: record opened read-only")
        if jax.process_index() != 0:
            return
        kept = [r for r in _read_steps_file(self.directory / STEPS) if r["step"] < upto]
        if [r["step"] for r in kept] != list(range(len(kept))):
            raise RecordError(f"{self.directory / STEPS}: step log is not contiguous from 0")
        _atomic_write_text(self.directory / STEPS,
                           "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        self._steps_cache = None

    def logged_steps(self) -> list[int]:
        """Steps that have a (complete) line in ``steps.jsonl``."""
        return sorted(self._step_log())

    def _step_log(self) -> dict[int, dict]:
        if self._steps_cache is None:
            self._steps_cache = {r["step"]: r for r in _read_steps_file(self.directory / STEPS)}
        return self._steps_cache

    def step_info(self, step: int) -> dict:
        """What update ``step`` saw: ``indices`` (int64 [B]), ``key`` (uint32 [2]), ``lr``
        (float, the learning rate applied), plus task fields (e.g. ``timesteps`` int [B])."""
        log = self._step_log()
        if step not in log:
            self._steps_cache = None
            log = self._step_log()
        if step not in log:
            raise RecordError(f"{self.directory / STEPS}: no entry for step {step}")
        r = dict(log[step])
        r["indices"] = np.asarray(r["indices"], np.int64)
        r["key"] = np.asarray(r["key"], np.uint32)
        for k, v in list(r.items()):
            if k not in ("step", "lr", "indices", "key") and isinstance(v, list):
                r[k] = np.asarray(v)
        return r

    def replay_batch(self, step: int,
                     dataset: Callable[[np.ndarray], Mapping] | Mapping) -> tuple[dict, jax.Array]:
        """``(batch, key)`` exactly as update ``step`` saw them.

        ``dataset`` is the ``get_batch(indices) -> dict`` used for training or a mapping of
        arrays indexed along their first axis. The key is the step key passed to ``loss_fn``.
        """
        info = self.step_info(step)
        idx = info["indices"]
        if callable(dataset):
            batch = dict(dataset(idx))
        else:
            batch = {k: np.asarray(v)[idx] for k, v in dataset.items()}
        return batch, jax.numpy.asarray(info["key"], dtype=jax.numpy.uint32)
