"""The run-directory layout, and the save/load helpers the commands share.

A *run directory* is what a command writes (``jaxattrib train/attribute/demo/cgi-dm/
source-model``, the benchmarks); :class:`RunDir` is the one place that knows where things are
in it, so the path literals are not spread over the commands::

    RUN/config.json              the run's config (checked on every resume: check_run_config)
    RUN/data/source.json         reference to the training data (data.run_data.SOURCE_FILE)
    RUN/data/train.npz           older runs / the demo: a copy of the training data
    RUN/record/                  trajectory record (orbax checkpoints + manifest)
    RUN/latents/train/           cached VAE latents of the training set (latent pipelines)
    RUN/features/<method>/...    feature stores (resumable by chunk)
    RUN/scores/<method>.npy      scores [Q, N], larger = more attributed
    RUN/generations/             generated images (demo, dreambooth)
    RUN/cgi_dm/, RUN/source_model/, RUN/montrage/    per-method caches
    RUN/results/<section>.json   report sections (jaxattrib.report.html)
    RUN/report.html              the rendered report
    RUN/logs/<stage>.log         stage logs (jaxattrib.progress.StageLog)

[design] Existing run directories keep their layout: these are exactly the names the commands
always used, so every run made before this module existed resumes unchanged.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import numpy as np

from jaxattrib.config import ConfigError
from jaxattrib.data import run_data
from jaxattrib.fileio import atomic_write_bytes, atomic_write_text
from jaxattrib.runs.config_check import read_run_config

logger = logging.getLogger(__name__)


class RunDir:
    """Paths inside a run directory ``root`` (nothing is created or read on construction)."""

    CONFIG = "config.json"
    DATA = "data"
    RECORD = "record"
    LATENTS = "latents"
    FEATURES = "features"
    SCORES = "scores"
    GENERATIONS = "generations"
    RESULTS = "results"
    REPORT = "report.html"
    LOGS = "logs"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __fspath__(self) -> str:
        return os.fspath(self.root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # ------------------------------------------------------------------ fixed files/folders
    @property
    def config(self) -> Path:
        return self.root / self.CONFIG

    @property
    def data(self) -> Path:
        return self.root / self.DATA

    @property
    def data_source(self) -> Path:
        """``data/source.json``: the reference to the training data
        (:mod:`~jaxattrib.data.run_data`)."""
        return self.root / run_data.SOURCE_FILE

    @property
    def legacy_data(self) -> Path:
        """``data/train.npz``: the copy of the training data of older runs and of the demo."""
        return self.root / run_data.LEGACY_FILE

    @property
    def record(self) -> Path:
        return self.root / self.RECORD

    @property
    def latents(self) -> Path:
        return self.root / self.LATENTS

    @property
    def features(self) -> Path:
        return self.root / self.FEATURES

    @property
    def scores(self) -> Path:
        return self.root / self.SCORES

    @property
    def generations(self) -> Path:
        return self.root / self.GENERATIONS

    @property
    def results(self) -> Path:
        return self.root / self.RESULTS

    @property
    def report(self) -> Path:
        return self.root / self.REPORT

    @property
    def logs(self) -> Path:
        return self.root / self.LOGS

    # ------------------------------------------------------------------ per-method names
    def data_file(self, name: str) -> Path:
        """``data/<name>.npz`` (the demo's ``train``, ``holdout``, ``queries``...)."""
        return self.data / f"{name}.npz"

    def feature_dir(self, method: str, step: int) -> Path:
        """``features/<method>/step_<step>``: the feature stores of ``method`` at checkpoint
        ``step`` (``train`` and ``queries_<name>`` inside)."""
        return self.features / method / f"step_{int(step)}"

    def scores_file(self, name: str, suffix: str = ".npy") -> Path:
        """``scores/<name><suffix>``."""
        return self.scores / f"{name}{suffix}"

    def result_file(self, section: str) -> Path:
        """``results/<section>.json`` (written by :func:`jaxattrib.report.html.write_result`)."""
        return self.results / f"{section}.json"

    def cache(self, method: str) -> Path:
        """A method's own cache folder: ``cgi_dm/``, ``source_model/``, ``montrage/``..."""
        return self.root / method


# ---------------------------------------------------------------------- save / load
def save_npz(path: str | os.PathLike, **arrays) -> None:
    """Writes ``arrays`` as an uncompressed ``.npz`` at ``path`` atomically (temp + replace)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(Path(path), buf.getvalue())


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` at ``path``, read into memory (the file is closed)."""
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _has_field(config: dict, sections: list[str], name: str) -> bool:
    """Whether the JSON ``config`` has ``sections...name``."""
    for sec in sections:
        config = config.get(sec) if isinstance(config, dict) else None
    return isinstance(config, dict) and name in config


def check_run_config(run_dir: Path, config, added: dict | None = None,
                     adopt: dict | None = None) -> None:
    """Refuses a run directory whose ``config.json`` differs from ``config``; writes it if new.

    ``added``: ``{'section.field': value}`` for fields added to the config after run
    directories were made; a stored config without one is read with ``value`` (what such runs
    did), so they still resume. ``adopt``: the same for fields whose new default differs from
    what such runs did (e.g. :data:`jaxattrib.config.ATTRIBUTION_LEGACY`): ``config`` itself
    (changed in place) takes the stored run's value, with a notice when that changes it.
    """
    from jaxattrib.runlock import has_results
    run_dir = Path(run_dir)
    path = RunDir(run_dir).config
    if path.exists() and adopt and has_results(run_dir):
        from jaxattrib.config import adopt_legacy
        try:
            changed = adopt_legacy(read_run_config(path), config, adopt)
        except ConfigError:
            changed = []   # unreadable: refused below
        if changed:
            logger.warning("%s was made before these fields existed; the run keeps what it "
                           "did: %s (use a new --run-dir for the new defaults)", path,
                           ", ".join(changed))
    current = json.loads(config.to_json())
    if path.exists() and not has_results(run_dir):
        # a run that failed before computing anything does not block a corrected retry
        try:
            same = read_run_config(path) == current
        except ConfigError:
            same = False
        if not same:
            logger.warning("%s: nothing was computed in this run directory yet; its config "
                           "is replaced by the new one", path)
        path.unlink()
    if path.exists():
        stored = read_run_config(path)
        for dotted, value in {**(added or {}), **(adopt or {})}.items():
            *sections, name = dotted.split(".")
            if not _has_field(current, sections, name):
                continue    # a config without the field (e.g. the CGI-DM benchmark's data)
            node = stored
            for sec in sections:
                node = node.get(sec) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node.setdefault(name, value)
        if stored != current:
            diff = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
            leaves = _leaf_diffs(stored, current)
            shown = "; ".join(f"{k}: stored {a!r}, given {b!r}" for k, a, b in leaves[:4])
            more = f" (+{len(leaves) - 4} more)" if len(leaves) > 4 else ""
            raise ConfigError(f"{path}: this run directory was made with another config (fields "
                              f"{diff} differ: {shown}{more}); use a new --run-dir or pass "
                              f"--fresh, or resume it with --set for the stored values")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(current, indent=2, sort_keys=True))


_MISSING = "<absent>"


def _leaf_diffs(stored, current, prefix: str = "") -> list[tuple[str, object, object]]:
    """``[(dotted field, stored value, given value)]`` where two config dicts differ, sorted."""
    if isinstance(stored, dict) and isinstance(current, dict):
        out = []
        for k in sorted(set(stored) | set(current)):
            out += _leaf_diffs(stored.get(k, _MISSING), current.get(k, _MISSING),
                               f"{prefix}{k}.")
        return out
    return [] if stored == current else [(prefix[:-1], stored, current)]


__all__ = ["RunDir", "check_run_config", "load_npz", "save_npz"]
