"""The report section of a ``jaxattrib train`` run: ``RUN/results/train.json``.

Before it, ``jaxattrib report RUN`` on a fresh training run had no ``results/`` to render. The
section shows what the run holds: its numbers (steps, checkpoints, examples, the training loss
at each saved checkpoint) as metrics, a table and a loss plot, and a grid of its training
images with their ids and captions. Sources, all written by the training itself:

* ``RUN/logs/train.log`` (:class:`jaxattrib.progress.StageLog`): one line per saved checkpoint,
  ``checkpoint S saved (loss L, lr R)`` (the loss of the batch of step ``S - 1``, the mean over
  its examples); reruns append, the last line of a step wins;
* ``RUN/record/steps.jsonl``: one line per step taken (steps done = its line count);
* the run's training data (:func:`jaxattrib.data.run_data.open_run_data`), of which the first
  :data:`MAX_IMAGES` images are shown (pixels in [-1, 1]).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import numpy as np

MAX_IMAGES = 16
_SAVED = re.compile(r"\[train\] checkpoint (\d+) saved \(loss ([^,]+), lr ([^)]+)\)")


def checkpoint_losses(log_file: Path) -> dict[int, tuple[float, float]]:
    """``step -> (loss, lr)`` of every ``checkpoint S saved (loss L, lr R)`` line of a
    ``train.log`` (the last line of a step wins); ``{}`` without the file."""
    out: dict[int, tuple[float, float]] = {}
    if not log_file.is_file():
        return out
    for line in log_file.read_text(encoding="utf-8", errors="replace").splitlines():
        m = _SAVED.search(line)
        if m:
            try:
                out[int(m.group(1))] = (float(m.group(2)), float(m.group(3)))
            except ValueError:
                continue
    return dict(sorted(out.items()))


def _steps_done(run_dir: Path) -> int:
    path = run_dir / "record" / "steps.jsonl"
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def _config(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def write_training_section(run_dir: str | Path) -> Optional[Path]:
    """Writes ``RUN/results/train.json`` (+ ``results/train_loss.png``,
    ``results/train_images.png``) for a ``jaxattrib train`` run directory (one with
    ``logs/train.log``); returns its path, or None for another kind of run directory. Reading
    the training images may fail (data moved or changed): the section then says why in its
    text instead of showing them, and everything else is still written."""
    from jaxattrib.report.html import write_result
    from jaxattrib.report.images import image_grid, save_png
    from jaxattrib.report.plots import line_plot_png

    run_dir = Path(run_dir)
    log_file = run_dir / "logs" / "train.log"
    if not log_file.is_file():
        return None
    cfg = _config(run_dir)
    ft = cfg.get("finetune", {}) if isinstance(cfg.get("finetune"), dict) else {}
    losses = checkpoint_losses(log_file)
    metrics: dict = {"steps done": _steps_done(run_dir)}
    if "steps" in ft:
        metrics["steps configured"] = ft["steps"]
    for key in ("mode", "batch_size", "learning_rate"):
        if key in ft:
            metrics[key] = ft[key]
    images, tables, notes = [], [], []
    if losses:
        steps = list(losses)
        metrics["checkpoints with a logged loss"] = len(steps)
        metrics[f"loss at checkpoint {steps[-1]}"] = losses[steps[-1]][0]
        tables.append({"caption": "training loss at each saved checkpoint (the batch of the "
                                  "step before it; from logs/train.log)",
                       "rows": [{"checkpoint": s, "loss": l, "lr": r}
                                for s, (l, r) in losses.items()]})
        if len(steps) > 1:
            rel = Path("results") / "train_loss.png"
            (run_dir / "results").mkdir(parents=True, exist_ok=True)
            save_png(run_dir / rel, line_plot_png(steps, {"loss": [losses[s][0] for s in steps]},
                                                  xlabel="checkpoint (step)", ylabel="loss",
                                                  title="training loss"))
            images.append({"path": rel.as_posix(), "caption": "training loss per checkpoint"})
    else:
        notes.append("No checkpoint losses in logs/train.log yet.")
    try:
        from jaxattrib.data.run_data import open_run_data
        source = open_run_data(run_dir)
        n = len(source)
        metrics["training examples"] = n
        k = min(n, MAX_IMAGES)
        if k:
            pix = np.clip(np.asarray(source.read(np.arange(k))), -1, 1)
            ids = [str(i) for i in list(source.ids)[:k]]
            caps = [str(c) for c in list(source.captions)[:k]]
            rel = Path("results") / "train_images.png"
            save_png(run_dir / rel, image_grid(pix, nrow=8, labels=ids))
            images.append({"path": rel.as_posix(),
                           "caption": f"the first {k} of {n} training images (ids; captions "
                                      f"in the table)"})
            tables.append({"caption": f"the first {k} training examples",
                           "rows": [{"id": i, "caption": c} for i, c in zip(ids, caps)]})
    except Exception as e:  # noqa: BLE001 — a report shows what it can, and says why not
        notes.append(f"Training images not shown: {type(e).__name__}: {e}")
    text = ("What this training run holds: its steps and checkpoints, the training loss at "
            "each saved checkpoint, and its training images. `jaxattrib attribute` adds a "
            "section per query set.")
    if notes:
        text += "\n\n" + " ".join(notes)
    return write_result(run_dir, "train", "Training run", metrics=metrics, tables=tables,
                        images=images, text=text, order=-10)
