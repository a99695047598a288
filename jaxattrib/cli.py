"""The ``jaxattrib`` command: demo, train, generate, attribute, concept-query, cgi-dm,
source-model, report, info.

Every command is a thin edge over the library: it loads a config / model / run directory,
calls pure functions, and writes files. ``jaxattrib COMMAND --help`` documents each one.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from jaxattrib.cli_options import (MatmulPrecision, Method, Noise, Precision, Projection, Remat,
                                   checkpoints_default as _checkpoints_default,
                                   progress_option as _progress_option,
                                   run_option as _run_option)

# rich_markup_mode=None: help text is plain text, so "[dtrak]"-style brackets and "[paper]"
# markers are shown as written instead of being parsed (and eaten) as rich markup.
# Options show their defaults (typer's default); those whose default is "the run config's"
# say so in their help.
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Data attribution and copyright authentication for diffusion models "
                       "(JAX).")

logger = logging.getLogger(__name__)   # diagnostics on stderr (-v/-q); results go to stdout

COMPILE_CACHE_ENV = "JAXATTRIB_COMPILE_CACHE"
_OFF = ("off", "0", "false", "no", "none")


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


# ----------------------------------------------------------------------------- safety net

def expected_errors() -> tuple:
    """The error classes a user's input causes: the CLI prints their message and exits 2."""
    from jaxattrib.authentication.cgi_dm import CGIDMError
    from jaxattrib.attribution.montrage import MontrageError
    from jaxattrib.authentication.source_model import SourceModelError
    from jaxattrib.attribution.store import StoreMismatchError
    from jaxattrib.config import ConfigError
    from jaxattrib.data.dataset import DataError
    from jaxattrib.models.convert import CheckpointError
    from jaxattrib.report.html import ReportError
    from jaxattrib.runlock import RunLockError
    from jaxattrib.train.finetune import NonFiniteLossError
    from jaxattrib.train.record import RecordError
    return (ConfigError, CheckpointError, DataError, RecordError, StoreMismatchError,
            CGIDMError, SourceModelError, MontrageError, ReportError, RunLockError,
            NonFiniteLossError)


#: OS errors a user's environment causes (full disk, permissions, a file where a folder is
#: expected, a missing path): one line naming the file, exit 2
_USER_ERRNOS = {"ENOSPC": "no space left on the device: free some space and rerun (finished "
                          "stages are kept; the run resumes)",
                "EDQUOT": "disk quota exceeded: free some space and rerun (finished stages are "
                          "kept; the run resumes)",
                "EROFS": "read-only file system: give a writable --run-dir / output folder",
                "EACCES": "permission denied: give a writable --run-dir / output folder, or fix "
                          "the permissions",
                "EPERM": "operation not permitted: check the folder's permissions",
                "ENOTDIR": "a path component is a file, not a folder",
                "EISDIR": "a folder where a file was expected",
                "EEXIST": "a file is in the way of a folder that must be created",
                "ENOENT": "no such file or folder"}


def _os_error_message(e: OSError) -> str | None:
    import errno
    name = errno.errorcode.get(e.errno or 0)
    if name not in _USER_ERRNOS:
        return None
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    return f"{where + ': ' if where else ''}{_USER_ERRNOS[name]} ({e.strerror or e})"


def save_traceback(run_dir: Optional[Path]) -> Path:
    """Writes the current exception's traceback to ``RUN_DIR/errors/traceback-TIME-PID.txt``
    (a new temp folder when there is no usable run directory); returns the file."""
    import os
    import tempfile
    import time
    import traceback
    when = time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())
    text = f"jaxattrib {' '.join(sys.argv[1:])}\n{when}\n\n{traceback.format_exc()}"
    name = f"traceback-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}.txt"
    if run_dir is not None and Path(run_dir).is_dir():
        try:
            from jaxattrib.fileio import atomic_write_text
            return atomic_write_text(Path(run_dir) / "errors" / name, text)
        except OSError:
            pass
    path = Path(tempfile.mkdtemp(prefix="jaxattrib-error-")) / name
    path.write_text(text)
    return path


def guarded(name: str, *, run_dir: Optional[str] = None,
            lock: bool = False) -> Callable[[Callable], Callable]:
    """Decorates a command: the top-level safety net, and the run directory's writer lock.

    ``run_dir``: the name of the command's parameter holding its run directory / output folder
    (where an unexpected error's traceback is saved); ``lock``: take that folder's writer lock
    (:mod:`jaxattrib.runlock`) before the command does anything, released when it ends.
    Expected errors (:func:`expected_errors`, and user-caused OS errors: full disk, read-only,
    permissions, a file in the way) print one line and exit 2; any other exception prints one
    line plus the path of its saved traceback and exits 1."""
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            import click
            folder = kwargs.get(run_dir) if run_dir else None
            held = None
            made = folder is not None and not Path(folder).exists()
            try:
                if lock and folder is not None:
                    from jaxattrib.runlock import acquire
                    held = acquire(folder, _command_line(name))
                return fn(*args, **kwargs)
            except (typer.Exit, typer.Abort, click.exceptions.ClickException):
                raise
            except Exception as e:  # noqa: BLE001 — the safety net
                from jaxattrib.config import ConfigError
                from jaxattrib.runlock import RunLockError
                if isinstance(e, (ConfigError, RunLockError)):   # without importing JAX
                    _fail(str(e))
                if isinstance(e, expected_errors()):
                    _fail(str(e))
                if isinstance(e, OSError) and _os_error_message(e) is not None:
                    _fail(_os_error_message(e))
                path = save_traceback(folder)
                typer.secho(f"error: unexpected {type(e).__name__}: {_one_line(e)} (a bug? the "
                            f"traceback is saved in {path})", fg=typer.colors.RED, err=True)
                raise typer.Exit(1)
            finally:
                if held is not None:
                    held.release()
                if made and held is not None:   # a folder this command made and left empty
                    try:
                        Path(folder).rmdir()
                    except OSError:
                        pass
        return wrapper
    return deco


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def _command_line(name: str) -> str:
    argv = sys.argv
    if argv and Path(argv[0]).name in ("jaxattrib", "cli.py", "__main__.py"):
        return " ".join(["jaxattrib", *argv[1:]])
    return f"jaxattrib {name}"


def _fresh(run_dir: Path) -> None:
    """``--fresh``: empties the run directory, keeping the writer lock this command holds."""
    from jaxattrib.runlock import clear_run_dir
    clear_run_dir(run_dir)


def default_compile_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/jaxattrib/xla``, else ``~/.cache/jaxattrib/xla``."""
    import os
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "jaxattrib" / "xla"


def resolve_compile_cache(option: Optional[str]) -> Optional[Path]:
    """The persistent compilation cache directory a command uses, or None (off).

    ``option`` (``--compile-cache``) wins over the environment variable
    ``JAXATTRIB_COMPILE_CACHE``; either may be a directory or ``off`` (also ``0``, ``false``,
    ``no``, ``none``); neither set (or the variable empty) gives
    :func:`default_compile_cache_dir`. Reads no JAX state."""
    import os
    value = option if option is not None else os.environ.get(COMPILE_CACHE_ENV) or None
    if value is None:
        return default_compile_cache_dir()
    if value.strip().lower() in _OFF:
        return None
    return Path(value).expanduser()


def _use_compile_cache(ctx: typer.Context) -> None:
    """Points JAX's persistent compilation cache at the directory the top-level options chose
    (``ctx.obj['compile_cache']``) before the command's first compilation, and says where on
    stderr. Off leaves it at JAX's own setting (``JAX_COMPILATION_CACHE_DIR``, else none).

    Every program is cached (JAX's default keeps only those that took >= 1 s to compile; the
    many shorter compilations of a short command add up);
    ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` in the environment overrides that. Entries are keyed by the program, the jax/jaxlib
    version, backend, devices and XLA flags, so a stale entry is never used; the directory is
    not size-bounded (delete it to reclaim space). Says where at INFO (hidden by ``-q``)."""
    import os
    cache = (ctx.find_root().obj or {}).get("compile_cache")
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc
    if cache is None:
        path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or None
    else:
        path = str(cache.resolve())
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            _fail(f"--compile-cache / {COMPILE_CACHE_ENV}: cannot create {path} ({e}); give a "
                  f"writable directory or 'off'")
        if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        if "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES" not in os.environ:
            jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
        logger.info("XLA compilation cache: %s (--compile-cache off to disable)", path)
    if (jax.config.values["jax_compilation_cache_dir"] or None) != path:
        jax.config.update("jax_compilation_cache_dir", path)
        cc.reset_cache()  # a process that already compiled reopens the cache at the new path


def _print_version(value: bool) -> None:
    """``--version``: ``jaxattrib X.Y.Z`` (the installed distribution's version)."""
    if value:
        from jaxattrib import __version__
        typer.echo(f"jaxattrib {__version__}")
        raise typer.Exit()


@app.callback()
def _main(ctx: typer.Context,
          compile_cache: Optional[str] = typer.Option(
              None, "--compile-cache", metavar="DIR|off",
              help=f"Persistent XLA compilation cache: a later command reloads compiled "
                   f"programs instead of recompiling them (about half of a short command's time). "
                   f"Default: ${COMPILE_CACHE_ENV}, else $XDG_CACHE_HOME/jaxattrib/xla "
                   f"(~/.cache/jaxattrib/xla). 'off' disables it. Goes before the command: "
                   f"jaxattrib --compile-cache DIR demo."),
          no_compile_cache: bool = typer.Option(False, "--no-compile-cache",
                                                help="Same as --compile-cache off."),
          verbose: int = typer.Option(0, "--verbose", "-v", count=True, show_default=False,
                                      help="More messages on stderr: -v adds debug messages, "
                                           "-vv also third-party messages that are hidden by "
                                           "default (orbax's 'Given directory is read only', "
                                           "XLA's 'Very slow compile?' block). Goes before "
                                           "the command: jaxattrib -v demo."),
          quiet: int = typer.Option(0, "--quiet", "-q", count=True, show_default=False,
                                    help="Fewer messages on stderr: -q keeps notices and "
                                         "errors, -qq errors only. Results still go to "
                                         "stdout."),
          version: bool = typer.Option(False, "--version", is_eager=True,
                                       callback=_print_version, show_default=False,
                                       help="Print the jaxattrib version and exit.")) -> None:
    """Data attribution and copyright authentication for diffusion models (JAX)."""
    from jaxattrib.logs import configure, filter_native_stderr, unconfigure
    configure(verbose - quiet)
    ctx.call_on_close(unconfigure)
    if verbose < 2:
        filter_native_stderr()     # XLA's "Very slow compile? ... file a bug" block
    ctx.obj = {"compile_cache": None if no_compile_cache
               else resolve_compile_cache(compile_cache),
               "verbosity": verbose - quiet}


@app.command()
@guarded("demo", run_dir="run_dir", lock=True)
def demo(ctx: typer.Context,
         run_dir: Path = typer.Option(Path("runs/demo"), help="Run directory (reused)."),
         config: str = typer.Option("demo", help="Config file or packaged config name."),
         set_: List[str] = typer.Option([], "--set", metavar="KEY=VALUE",
                                        help="Override: key=value (repeatable)."),
         fresh: bool = typer.Option(False, help="Empty the run directory first."),
         progress: bool = _progress_option()) -> None:
    """The embedded default demo: fine-tune the shipped base model on new concepts, generate,
    attribute (D-TRAK, TRAK, baselines) and write RUN_DIR/report.html. Reuses finished stages."""
    _use_compile_cache(ctx)
    from jaxattrib.attribution.store import StoreMismatchError
    from jaxattrib.config import ConfigError, load_config
    from jaxattrib.runs.demo import run_demo
    from jaxattrib.models.convert import CheckpointError
    try:
        cfg = load_config(config, set_)
        if fresh:
            from jaxattrib.runs.demo import check_demo_config
            check_demo_config(cfg)           # a bad config deletes nothing
            _fresh(run_dir)
        summary = run_demo(cfg, run_dir, progress=progress)
        for row in summary.values():
            typer.echo("  " + "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in row.items()))
    except (ConfigError, CheckpointError) as e:
        _fail(str(e))
    except StoreMismatchError as e:
        _fail(f"{e}\n(or rerun with --fresh to recompute the whole run directory)")


@app.command()
@guarded("train", run_dir="run_dir", lock=True)
def train(ctx: typer.Context,
          config: str = typer.Argument(..., help="Config file or packaged name "
                                                 "(e.g. finetune_folder)."),
          run_dir: Path = typer.Option(Path("runs/train"), help="Run directory (resumable)."),
          set_: List[str] = typer.Option([], "--set", metavar="KEY=VALUE",
                                         help="Override: key=value (repeatable)."),
          progress: bool = _progress_option("the progress bar")) -> None:
    """Fine-tune a pipeline (full or LoRA) on a data set, writing a trajectory record.

    A config with a `dreambooth` section (e.g. `dreambooth`) runs DreamBooth: instance prompt
    with a rare identifier, class images from the base model, loss = instance +
    prior_loss_weight * class; on a synthetic held-out concept it also classifies generations
    of the fine-tuned and the base model (RUN_DIR/results/dreambooth.json).
    Rerunning the same command resumes from the record's last checkpoint. Writes
    RUN_DIR/results/train.json (loss at each checkpoint, training images) for `jaxattrib
    report RUN_DIR`."""
    _use_compile_cache(ctx)
    from jaxattrib.config import ConfigError, load_config
    from jaxattrib.data.dataset import DataError
    from jaxattrib.models.convert import CheckpointError
    from jaxattrib.train.record import RecordError
    from jaxattrib.runs.train import train_run
    try:
        cfg = load_config(config, set_)
        if "dreambooth" in cfg:
            from jaxattrib.runs.dreambooth import dreambooth_run
            metrics = dreambooth_run(cfg, run_dir, progress=progress)
            typer.echo(f"record: {run_dir / 'record'}")
            if metrics:
                typer.echo("  ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
            return
        _, record = train_run(cfg, run_dir, progress=progress)
        typer.echo(f"record: {run_dir / 'record'} (checkpoints {record.steps()})")
        record.close()
        from jaxattrib.train.report_section import write_training_section
        write_training_section(run_dir)
        typer.echo(f"`jaxattrib report {run_dir}` renders its loss and training images")
    except (ConfigError, DataError, CheckpointError, RecordError) as e:
        _fail(str(e))


@app.command()
@guarded("attribute", run_dir="run_dir", lock=True)
def attribute(ctx: typer.Context,
              run_dir: Path = typer.Argument(..., help="Run directory from `jaxattrib train`."),
              queries: Path = typer.Option(..., help="Folder of query PNGs + prompts.txt "
                                                     "(from `jaxattrib generate`)."),
              method: Optional[Method] = _run_option("method", "Attribution method."),
              k: Optional[int] = _run_option("k", "Projection dimension."),
              params: Optional[str] = _run_option("params",
                                                  "Regex over UNet parameter paths.", quoted=True),
              timesteps: Optional[int] = _run_option("num_timesteps",
                                                     "Timesteps K of the output function."),
              lam_ratio: Optional[float] = _run_option("lam_ratio", "λ = ratio · mean(diag ΦᵀΦ)."),
              topk: Optional[int] = _run_option("topk", "Training images listed per query."),
              projection: Optional[Projection] = _run_option("projection",
                  "Random projection of the gradients."),
              microbatch: Optional[int] = _run_option("microbatch", "Examples per gradient call."),
              journey_step: Optional[int] = typer.Option(None, show_default=False,
                                                         help="Journey-TRAK: sampling step to "
                                                              "attribute (required for "
                                                              "journey-trak)."),
              precision: Optional[Precision] = _run_option("precision", "UNet compute dtype."),
              remat: Optional[Remat] = _run_option("remat", "Rematerialize each UNet block."),
              matmul_precision: Optional[MatmulPrecision] = _run_option("matmul_precision",
                  "float32 matmuls (default = TF32 on GPU)."),
              chunk_size: Optional[int] = _run_option("chunk_size",
                  "Rows per feature-store chunk (unit of resumption)."),
              noise: Optional[Noise] = _run_option("noise",
                                                   "Noise of TRAK / D-TRAK / TracIn features: "
                                    "shared (default: every example the same noise per "
                                    "timestep; measured best, docs/faithful.md) | "
                                    "per_position (D-TRAK's code: each batch position its own, "
                                    "period 52) | per_example."),
              checkpoints: Optional[str] = typer.Option(
                  None, show_default=False,
                  help="TRAK / D-TRAK / Journey-TRAK checkpoint ensemble: M (the last M "
                       "checkpoints, scores averaged) or steps '100,200,300'. Default: the "
                       f"run config's, else {_checkpoints_default()}."),
              progress: bool = _progress_option()) -> None:
    """Attribute query images to a run's training data (resumable feature stores).

    Options left out take the run config's `attribution` section (e.g. sd15_lora: D-TRAK on
    attn2, k=4096), else the defaults each option names. Latent pipelines: the training images
    are VAE-encoded once (posterior mean) into RUN_DIR/latents/train, the queries with the same
    rule; Journey-TRAK reads the latent trajectory of `generate --trajectory`. Progress (per
    microbatch, rate, ETA) is also logged to RUN_DIR/logs/attribute.log. On several hosts:
    `python -m jaxattrib.launch attribute CONFIG` (docs/scaling.md)."""
    _use_compile_cache(ctx)
    from jaxattrib.attribution.store import StoreMismatchError
    from jaxattrib.config import ConfigError
    from jaxattrib.runs.attribute import attribute_run, attribution_defaults
    given = {"method": _value(method), "k": k, "params": params, "num_timesteps": timesteps,
             "lam_ratio": lam_ratio, "topk": topk, "projection": _value(projection),
             "microbatch": microbatch, "precision": _value(precision), "remat": _value(remat),
             "matmul_precision": _value(matmul_precision), "chunk_size": chunk_size,
             "noise": _value(noise),
             "checkpoints": None if checkpoints is None else _parse_checkpoints(checkpoints)}
    opts = attribution_defaults(run_dir)
    opts.update({name: v for name, v in given.items() if v is not None})
    try:
        s = attribute_run(run_dir, queries, opts.pop("method"), journey_step=journey_step,
                          progress=progress, **opts)
    except (ConfigError, StoreMismatchError, ValueError) as e:
        _fail(str(e))
    typer.echo(f"scores [{s.shape[0]} queries x {s.shape[1]} training images] written to "
               f"{run_dir / 'scores'}; `jaxattrib report {run_dir}` renders them")


def _value(choice: Optional[Enum]) -> Optional[str]:
    """An Enum option's string value (None stays None: the run config decides)."""
    return None if choice is None else choice.value


def _parse_checkpoints(text: str) -> int | list[int]:
    """``--checkpoints``: ``'3'`` -> 3 (the last 3), ``'100,200'`` / ``'300,'`` -> a list of
    steps; anything else exits 2 naming the option."""
    parts = [p.strip() for p in text.split(",")]
    try:
        if len(parts) == 1:
            return int(parts[0])
        return [int(p) for p in parts if p]
    except ValueError:
        _fail(f"--checkpoints={text!r}: expected M (the last M checkpoints) or a comma-separated "
              f"list of steps, e.g. 3 or 100,200,300")


def _run_config_command(run, config: str, set_: List[str], run_dir: Path, fresh: bool,
                        progress: bool, check=None):
    """Loads CONFIG with overrides and calls ``run(config, run_dir, progress)``; user errors
    (config, data, checkpoints, incompatible models) exit 2 with the message. ``check``:
    the command's config check, run before ``--fresh`` deletes anything."""
    from jaxattrib.authentication.cgi_dm import CGIDMError
    from jaxattrib.authentication.source_model import SourceModelError
    from jaxattrib.config import ConfigError, load_config
    from jaxattrib.data.dataset import DataError
    from jaxattrib.models.convert import CheckpointError
    from jaxattrib.train.record import RecordError
    try:
        cfg = load_config(config, set_)
        if fresh:
            if check is not None:
                check(cfg)                   # a bad config deletes nothing
            _fresh(run_dir)
        return run(cfg, run_dir, progress=progress)
    except (ConfigError, DataError, CheckpointError, RecordError, CGIDMError,
            SourceModelError) as e:
        _fail(str(e))


@app.command("cgi-dm")
@guarded("cgi-dm", run_dir="run_dir", lock=True)
def cgi_dm(ctx: typer.Context,
           config: str = typer.Argument("cgi_dm", help="Config file or packaged name "
                                                       "(see jaxattrib/configs/cgi_dm.py)."),
           run_dir: Path = typer.Option(Path("runs/cgi_dm"), help="Run directory (resumable)."),
           set_: List[str] = typer.Option([], "--set", metavar="KEY=VALUE",
                                          help="Override: key=value (repeatable)."),
           fresh: bool = typer.Option(False, help="Empty the run directory first."),
           progress: bool = _progress_option()) -> None:
    """CGI-DM: was each candidate image used to fine-tune model.finetuned from
    model.pretrained? Threshold calibrated on data.reference (known non-members); writes
    RUN_DIR/report.html (original/masked/recovered grid, scores, decisions, ROC if labelled).
    Recoveries are cached per batch: rerunning resumes."""
    _use_compile_cache(ctx)
    from jaxattrib.runs.cgi_dm import check_config, run_cgi_dm
    s = _run_config_command(run_cgi_dm, config, set_, run_dir, fresh, progress,
                            check_config)
    typer.echo("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in s.items()))
    typer.echo(f"report: {run_dir / 'report.html'}")


@app.command("source-model")
@guarded("source-model", run_dir="run_dir", lock=True)
def source_model(ctx: typer.Context,
                 config: str = typer.Argument("source_model", help="Config file or packaged "
                                                                   "name (source_model)."),
                 run_dir: Path = typer.Option(Path("runs/source_model"),
                                              help="Run directory (resumable)."),
                 set_: List[str] = typer.Option([], "--set", metavar="KEY=VALUE",
                                                help="Override: key=value (repeatable)."),
                 fresh: bool = typer.Option(False, help="Empty the run directory first."),
                 progress: bool = _progress_option()) -> None:
    """Source-model attribution: were model.suspects trained on model.source's generations?
    Key samples on the source, same-seed queries, conf = hit rate below delta0, threshold from
    model.innocent; writes RUN_DIR/report.html. Generations are cached: rerunning resumes."""
    _use_compile_cache(ctx)
    from jaxattrib.runs.source_model import check_config, run_source_model
    res = _run_config_command(run_source_model, config, set_, run_dir, fresh, progress,
                              check_config)
    for r in res["models"]:
        typer.echo(f"{r['role']} {r['model']}: conf={r['conf']:.3f} -> "
                   f"{'TRAINED ON SOURCE OUTPUTS' if r['flagged'] else 'not flagged'}")
    typer.echo(f"threshold={res['threshold']:.3f} ({res['threshold_from']}); "
               f"report: {run_dir / 'report.html'}")


@app.command()
@guarded("generate", run_dir="out", lock=True)
def generate(ctx: typer.Context,
             prompt: List[str] = typer.Option(..., "--prompt", "-p", metavar="TEXT",
                                              help="Prompt (repeatable)."),
             out: Path = typer.Option(Path("runs/generate"), help="Output folder for PNGs."),
             model: str = typer.Option("embedded", help="'embedded' or a diffusers pipeline "
                                                        "folder (safetensors)."),
             record: Optional[Path] = typer.Option(None, help="Use UNet (and text encoder) "
                                                              "params from this trajectory "
                                                              "record."),
             step: Optional[int] = typer.Option(None, help="Record step (default: latest)."),
             num: int = typer.Option(1, help="Images per prompt."),
             seed: int = typer.Option(0, help="PRNG seed of the initial noise."),
             steps: int = typer.Option(25, help="DDIM steps."),
             guidance: float = typer.Option(3.0, help="Classifier-free guidance scale."),
             trajectory: bool = typer.Option(False, help="Also save the sampling trajectory "
                                                         "(x_t and x̂0 per step) as .npz."),
             allow_pickle: bool = typer.Option(False, help="Allow pickle weights (unsafe).")
             ) -> None:
    """Generate images with a pipeline (the embedded base model by default)."""
    _use_compile_cache(ctx)
    import jax
    import numpy as np
    from jaxattrib.generate import generate as gen, save_images
    from jaxattrib.models.convert import CheckpointError
    try:
        pipe = _load_model(model, allow_pickle)
        unet_params = None
        if record is not None:
            from jaxattrib.train.record import TrajectoryRecord
            rec = TrajectoryRecord.open(record.resolve())
            s = rec.latest_step() if step is None else step
            loaded = rec.load(s)
            unet_params = loaded["unet"]
            from jaxattrib.authentication.cgi_dm import IncompatibleModelsError, check_compatible
            try:
                check_compatible(pipe.unet_params, unet_params)
            except IncompatibleModelsError as e:
                _fail(f"--record {record} (step {s}) is from another model: its UNet does not "
                      f"fit --model {model}'s ({str(e).split(': ', 1)[-1]}); give the model "
                      f"the record was trained from")
            if "text_encoder" in loaded:  # trained when finetune.train_text_encoder (DreamBooth)
                import dataclasses
                pipe = dataclasses.replace(pipe, text_params=loaded["text_encoder"])
        for i, p in enumerate(prompt):
            if not p.strip():
                logger.warning("--prompt #%d is empty: its images are generated "
                               "unconditionally (no text guidance)", i + 1)
        prompts = [p for p in prompt for _ in range(num)]
        g = gen(pipe, prompts, jax.random.PRNGKey(seed), unet_params=unet_params,
                num_inference_steps=steps, guidance_scale=guidance, return_trajectory=trajectory)
        paths = save_images(out, np.clip(np.asarray(g.images), -1, 1), prompts)
        if trajectory:
            import io
            from jaxattrib.fileio import atomic_write_bytes
            buf = io.BytesIO()
            np.savez(buf, timesteps=np.asarray(g.trajectory.timesteps),
                     xs=np.asarray(g.trajectory.xs), x0_preds=np.asarray(g.trajectory.x0_preds))
            atomic_write_bytes(out / "trajectory.npz", buf.getvalue())
        typer.echo(f"wrote {len(paths)} images to {out}")
    except CheckpointError as e:
        _fail(str(e))


@app.command("concept-query")
@guarded("concept-query", run_dir="run_dir", lock=True)
def concept_query(ctx: typer.Context,
                  run_dir: Path = typer.Argument(..., help="A finished Concept-TRAK benchmark "
                                                           "run (benchmarks/concept_trak.py)."),
                  prompt: str = typer.Option(..., "--prompt", "-p", metavar="TEXT",
                                             help="The query's prompt."),
                  concept: List[str] = typer.Option(..., "--concept", "-c", metavar="PHRASE",
                                                    help="Concept phrase in the prompt "
                                                         "(repeatable: each one is attributed "
                                                         "separately)."),
                  seed: Optional[int] = typer.Option(None, help="Generate the query from this "
                                                                "seed with the run's model."),
                  image: Optional[Path] = typer.Option(None, help="Or: the query image (PNG)."),
                  topk: int = typer.Option(10, help="Training images to list per concept.")
                  ) -> None:
    """Concept-TRAK for a free-text concept query: which training images gave the query its
    CONCEPT? c⁻ = the prompt without the concept phrase; a concept the prompt does not contain
    is an error. Uses the run's fine-tuned model, cached training features and chosen λ.
    Adds a section to RUN_DIR/report.html: the query image and, per concept, its top training
    images with their scores. On a latent pipeline the query image is VAE-encoded once (the posterior mean) and
    inverted in latent space; it must be the model's pixel size."""
    _use_compile_cache(ctx)
    import numpy as np
    from jaxattrib.config import ConfigError
    from jaxattrib.runs.concept_query import concept_query as run_query
    img = None
    if image is not None:
        from PIL import Image
        img = np.asarray(Image.open(image).convert("RGB"), np.float32) / 127.5 - 1.0
    if (img is None) == (seed is None):
        _fail("give exactly one of --seed and --image")
    try:
        res = run_query(run_dir, prompt, concept, seed=seed, image=img, topk=topk)
    except (ConfigError, ValueError) as e:
        _fail(str(e))
    typer.echo(f"query image as model input: {res['encoding']}")
    for q in res["queries"]:
        typer.echo(f"concept {q['concept']!r} (c⁻ = {q['negative']!r}):")
        for t in q["top"]:
            typer.echo(f"  {t['rank']:3d}. {t['score']:+.4g}  {t['id']}  ({t['caption']})")
    from jaxattrib.report.html import ReportError, render_run_report
    from jaxattrib.runs.concept_query import write_query_section
    try:   # the ranking above is already printed: a report that cannot be written loses nothing
        write_query_section(run_dir, prompt, res)
        typer.echo(f"report: {render_run_report(run_dir)}")
    except (ReportError, OSError) as e:
        typer.echo(f"report not written: {e}", err=True)


def _load_model(model: str, allow_pickle: bool = False) -> Any:
    from jaxattrib.train.base_model import load_base_model
    from jaxattrib.models.pipeline import load_pipeline
    if model == "embedded":
        return load_base_model()
    return load_pipeline(model, allow_pickle=allow_pickle)


@app.command()
@guarded("report", run_dir="run_dir")
def report(run_dir: Path = typer.Argument(..., help="A run directory with results/*.json."),
           screenshot: Optional[Path] = typer.Option(None, show_default=False,
                                                     help="Also render a PNG screenshot of "
                                                          "the report with headless Chromium "
                                                          "(apt-get install -y chromium).")
           ) -> None:
    """Render RUN_DIR/report.html (self-contained: opens with no server and no network)."""
    from jaxattrib.report.html import ReportError, render_run_report
    from jaxattrib.train.report_section import write_training_section
    try:
        write_training_section(run_dir)    # a `jaxattrib train` run: its loss and images
        path = render_run_report(run_dir)
        typer.echo(f"wrote {path}")
        if screenshot is not None:
            from jaxattrib.report.screenshot import screenshot as take_screenshot
            typer.echo(f"wrote {take_screenshot(path, screenshot)}")
    except (ReportError, FileNotFoundError) as e:
        _fail(str(e))


@app.command()
@guarded("info")
def info(ctx: typer.Context,
         model: str = typer.Argument("embedded", help="'embedded' or a pipeline folder.")) -> None:
    """Load a model (checks every tensor) and print its components and sizes."""
    _use_compile_cache(ctx)
    import jax
    from jaxattrib.models.convert import CheckpointError
    try:
        pipe = _load_model(model)
    except CheckpointError as e:
        _fail(str(e))
    count = lambda t: sum(x.size for x in jax.tree_util.tree_leaves(t))  # noqa: E731
    typer.echo(f"pipeline: {pipe.folder}")
    typer.echo(f"  unet: {count(pipe.unet_params):,} params, sample "
               f"{pipe.unet_config.sample_size}x{pipe.unet_config.sample_size}x"
               f"{pipe.unet_config.in_channels}")
    typer.echo(f"  text_encoder: {count(pipe.text_params):,} params")
    typer.echo(f"  vae: {'none (pixel space)' if pipe.vae_params is None else f'{count(pipe.vae_params):,} params'}")
    typer.echo(f"  scheduler: {json.dumps(pipe.scheduler_config)}")


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    main()
