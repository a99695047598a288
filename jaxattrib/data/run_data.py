"""The training data of a run directory: a reference, not a copy (see ``docs/data.md``).

``run_dir/data/source.json`` holds the :meth:`~jaxattrib.data.source.DataSource.describe` dict
of the training set (kind, arguments, ``n``, ``fingerprint``). Run directories written before
this existed hold ``data/train.npz`` (the float32 pixels, captions and ids) instead; they are
read as they are, so they keep resuming and scoring unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxattrib.data.dataset import DataError
from jaxattrib.data.source import DataSource, NpzSource, open_source

SOURCE_FILE = Path("data") / "source.json"
LEGACY_FILE = Path("data") / "train.npz"


class DataChangedError(DataError):
    """The data a run directory references is no longer the data it was made with."""


def has_run_data(run_dir) -> bool:
    run_dir = Path(run_dir)
    return (run_dir / SOURCE_FILE).is_file() or (run_dir / LEGACY_FILE).is_file()


def write_run_data(run_dir, source: DataSource) -> dict:
    """Writes ``run_dir/data/source.json`` (atomically) for ``source``; returns the dict."""
    from jaxattrib.fileio import atomic_write_text
    desc = source.describe()
    if desc["kind"] == "memory":
        raise DataError("an in-memory data set cannot be referenced by a run directory; "
                        "use a folder, tfds, synthetic or digits source")
    path = Path(run_dir) / SOURCE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(desc, indent=1, sort_keys=True))
    return desc


def read_run_data_ref(run_dir) -> dict:
    path = Path(run_dir) / SOURCE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable data reference ({e})") from e


def check_same_data(ref: dict, source: DataSource, where) -> None:
    """Raises :class:`DataChangedError` naming ``where`` and the data's location when
    ``source``'s fingerprint is not the one ``ref`` recorded."""
    got = source.fingerprint()
    if got != ref.get("fingerprint"):
        loc = ref.get("root") or ref.get("data_dir") or ref.get("path") or \
            (ref.get("parent") or {}).get("root") or (ref.get("parent") or {}).get("data_dir") \
            or ref.get("kind")
        raise DataChangedError(
            f"{where}: the training data at {loc} changed since this run was made "
            f"(fingerprint {ref.get('fingerprint', '?')[:16]}… recorded, {got[:16]}… now, "
            f"{ref.get('n')} -> {len(source)} examples); restore the data or use a new "
            f"run directory")


def open_run_data(run_dir) -> DataSource:
    """The training set of a run directory: ``data/train.npz`` if present (legacy runs), else
    the source ``data/source.json`` references, after checking its fingerprint
    (:class:`DataChangedError` naming the path when it changed)."""
    run_dir = Path(run_dir)
    if (run_dir / LEGACY_FILE).is_file():
        return NpzSource(run_dir / LEGACY_FILE)
    path = run_dir / SOURCE_FILE
    if not path.is_file():
        raise DataError(f"{run_dir}: no training data reference ({SOURCE_FILE} or "
                        f"{LEGACY_FILE}); not a `jaxattrib train` run directory")
    ref = read_run_data_ref(run_dir)
    try:
        source = open_source(ref)
    except DataError as e:
        raise DataChangedError(f"{path}: the referenced training data cannot be opened: {e}") \
            from e
    check_same_data(ref, source, path)
    return source
