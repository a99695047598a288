"""CLI conventions (issue 20 item 4): choices as Enums listed in ``--help`` and refused with
click's error, ``--progress/--no-progress``, defaults shown, brackets not eaten by rich markup,
``-v``/``-q`` logging levels, third-party noise filtered at the edge only, and the screenshot
helper shipped in the package."""

import inspect
import logging
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from jaxattrib import cli
from jaxattrib import logs

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ["demo", "train", "attribute", "cgi-dm", "source-model", "generate", "concept-query",
            "report", "info"]


def _help(*args: str) -> str:
    r = CliRunner().invoke(cli.app, [*args, "--help"], env={"COLUMNS": "100"})
    assert r.exit_code == 0, r.output
    return " ".join(r.output.split())      # wrapping-independent


def _choices(enum) -> list[str]:
    return [m.value for m in enum]


def test_enum_choices_are_the_librarys_own():
    from jaxattrib import precision
    from jaxattrib.attribution.diffusion_trak import METHODS
    from jaxattrib.attribution.projection import KINDS
    from jaxattrib.diffusion.losses import NOISE_MODES
    assert _choices(cli.Method) == list(METHODS)
    from jaxattrib.attribution import methods
    assert _choices(cli.Method) == list(methods.gradient_methods()) == [
        n for n, spec in methods.METHODS.items() if spec.family in ("trak", "tracin")]
    assert _choices(cli.Projection) == list(KINDS[:3])     # what check_attribution_fields takes
    assert _choices(cli.Precision) == list(precision.PRECISIONS)
    assert _choices(cli.Remat) == list(precision.REMAT_POLICIES)
    assert _choices(cli.MatmulPrecision) == list(precision.MATMUL_PRECISIONS)
    assert set(_choices(cli.Noise)) == set(NOISE_MODES)


def test_attribute_help_lists_every_choice_and_default(tmp_path):
    text = _help("attribute")
    for opt, enum in [("--method", cli.Method), ("--projection", cli.Projection),
                      ("--precision", cli.Precision), ("--remat", cli.Remat),
                      ("--matmul-precision", cli.MatmulPrecision), ("--noise", cli.Noise)]:
        assert f"{opt} <{'|'.join(_choices(enum))}>" in text, opt
    for default in ["else dtrak", "else 'attn'", "else 1 for dtrak, 3 for trak / journey-trak"]:
        assert default in text, default
    # the help names the defaults the command applies (one JAX-free home, method_names)
    from jaxattrib.attribution import method_names
    from jaxattrib.runs.attribute import ATTRIBUTE_DEFAULTS, attribution_defaults
    assert ATTRIBUTE_DEFAULTS is method_names.ATTRIBUTE_DEFAULTS
    for name, value in ATTRIBUTE_DEFAULTS.items():
        if value is not None:
            assert f"else {repr(value) if name == 'params' else value}." in text, name
    assert attribution_defaults(tmp_path) == ATTRIBUTE_DEFAULTS      # a run without a config


def test_a_wrong_choice_is_clicks_clear_error(tmp_path):
    r = CliRunner().invoke(cli.app, ["attribute", str(tmp_path), "--queries", str(tmp_path),
                                     "--method", "dtrack"])
    assert r.exit_code == 2
    out = " ".join(r.output.split())
    assert "Invalid value for '--method'" in out and "'dtrack' is not one of" in out
    assert "'dtrak'" in out and "'journey-trak'" in out
    assert not (tmp_path / "scores").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_has_progress_flags_and_defaults(command):
    text = _help(command)
    assert "--no-no-" not in text
    sig = inspect.signature(getattr(cli, command.replace("-", "_")).__wrapped__)
    if "progress" in sig.parameters:
        assert "--progress / --no-progress" in text and "[default: progress]" in text
    for name, p in sig.parameters.items():
        default = getattr(p.default, "default", None)
        shown = getattr(p.default, "show_default", True)
        if isinstance(default, (int, float, str, Path)) and not isinstance(default, bool) \
                and shown and default is not ...:
            assert f"[default: {default}]" in text, (command, name)


def test_progress_flag_reaches_the_command(tmp_path, monkeypatch):
    seen = {}

    def fake_train_run(cfg, run_dir, progress):
        seen["progress"] = progress
        raise typer.Exit(0)
    import jaxattrib.runs.train as wf
    monkeypatch.setattr(wf, "train_run", fake_train_run)
    monkeypatch.setattr(cli, "_use_compile_cache", lambda ctx: None)
    for flag, want in [("--no-progress", False), ("--progress", True), (None, True)]:
        args = ["train", "finetune_folder", "--run-dir", str(tmp_path / "r")]
        r = CliRunner().invoke(cli.app, args + ([flag] if flag else []))
        assert r.exit_code == 0, r.output
        assert seen.pop("progress") is want, flag


def test_brackets_in_help_are_shown_verbatim():
    """rich markup would eat ``[dtrak]``-style text: help is plain text (rich_markup_mode None)
    and every bracketed phrase of any command's help appears in its rendered --help."""
    assert cli.app.rich_markup_mode is None
    found = 0
    for command in COMMANDS:
        fn = getattr(cli, command.replace("-", "_")).__wrapped__
        texts = [fn.__doc__ or ""] + [getattr(p.default, "help", None) or ""
                                      for p in inspect.signature(fn).parameters.values()]
        rendered = _help(command)
        for t in texts:
            for b in re.findall(r"\[[^\]\s][^\]]*\]", " ".join(t.split())):
                found += 1
                assert b in rendered, (command, b)
    # and a bracketed phrase in a typer app configured like ours survives rendering
    app = typer.Typer(rich_markup_mode=cli.app.rich_markup_mode)

    @app.command()
    def f(x: str = typer.Option("a", help="choice [dtrak] or [rademacher]")):
        pass
    r = CliRunner().invoke(app, ["--help"])
    assert "[dtrak] or [rademacher]" in " ".join(r.output.split())


# ----------------------------------------------------------------------------- logging

@pytest.fixture
def clean_logging():
    yield
    logs.unconfigure()


@pytest.mark.parametrize("verbosity,level", [(-2, logging.ERROR), (-1, logging.WARNING),
                                             (0, logging.INFO), (1, logging.DEBUG),
                                             (2, logging.DEBUG)])
def test_configure_sets_the_level_and_formats_notices(verbosity, level, capsys, clean_logging):
    logs.configure(verbosity)
    log = logging.getLogger("jaxattrib.runlock")
    assert log.getEffectiveLevel() == level
    log.warning("a %s", "notice")
    log.info("progress")
    log.debug("detail")
    err = capsys.readouterr().err
    assert ("notice: a notice" in err) == (level <= logging.WARNING)
    assert ("progress" in err) == (level <= logging.INFO)
    assert ("debug [jaxattrib.runlock]: detail" in err) == (level <= logging.DEBUG)
    logs.configure(verbosity)                # idempotent: one handler, one line per record
    log.error("once")
    assert capsys.readouterr().err.count("error: once") == 1


def test_cli_v_and_q_set_the_level_and_leave_the_loggers_as_found(monkeypatch):
    seen = []
    from jaxattrib.report import html

    def fake_render(run_dir):
        seen.append(logging.getLogger("jaxattrib").level)
        logging.getLogger("jaxattrib.report").warning("from the library")
        logging.getLogger("jaxattrib.report").info("progress line")
        return Path(run_dir) / "report.html"
    monkeypatch.setattr(html, "render_run_report", fake_render)
    runner = CliRunner()
    r = runner.invoke(cli.app, ["-q", "report", "x"])
    assert r.exit_code == 0 and "notice: from the library" in r.output
    assert "progress line" not in r.output
    r = runner.invoke(cli.app, ["report", "x"])
    assert "progress line" in r.output
    runner.invoke(cli.app, ["-v", "report", "x"])
    runner.invoke(cli.app, ["-qq", "report", "x"])
    assert seen == [logging.WARNING, logging.INFO, logging.DEBUG, logging.ERROR]
    assert logging.getLogger("jaxattrib").level == logging.NOTSET
    assert not [h for h in logging.getLogger("jaxattrib").handlers
                if getattr(h, logs._HANDLER_TAG, False)]


@pytest.fixture
def absl_messages():
    """The messages that reach the handlers of the ``absl`` logger (orbax logs through it)."""
    logs._import_absl()                  # absl's own logger class, before the logger is made
    absl = logging.getLogger("absl")
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())
    h = Keep()
    absl.addHandler(h)
    yield absl, seen
    absl.removeHandler(h)


def test_orbax_read_only_noise_is_filtered_only_at_the_edge(absl_messages, clean_logging):
    """Opening a record read-only makes orbax log 'Given directory is read only' (absl logger):
    the entry points drop it (shown again with -vv); the library alone filters nothing."""
    absl, records = absl_messages
    absl.warning("Given directory is read only=%s", "/x")
    absl.warning("something that matters")
    assert records == ["Given directory is read only=/x", "something that matters"]
    records.clear()
    logs.configure(0)
    absl.warning("Given directory is read only=%s", "/x")
    absl.warning("something that matters")
    assert records == ["something that matters"]
    records.clear()
    logs.configure(2)
    absl.warning("Given directory is read only=%s", "/x")
    assert records == ["Given directory is read only=/x"]


def test_reading_a_record_prints_no_orbax_noise_under_the_cli(tmp_path, absl_messages,
                                                              clean_logging):
    """The real thing: opening a trajectory record read-only (every `attribute`, `generate
    --record`, ...) logs orbax's read-only messages; filtered at verbosity 0, shown at -vv."""
    import jax.numpy as jnp
    import optax
    from jaxattrib.train.record import TrajectoryRecord
    unet = {"w": jnp.ones((2, 3))}
    rec = TrajectoryRecord.create(tmp_path / "rec", {
        "config": {"mode": "full", "lr": 1e-3, "steps": 1}, "seed": 0, "model": {"name": "toy"},
        "dataset": {"size": 1, "fingerprint": "abc"}})
    rec.save(0, {"step": jnp.int32(0), "params": unet,
                 "opt_state": optax.adam(1e-3).init(unet)}, base={"unet": unet})
    rec.close()
    _, seen = absl_messages
    for verbosity, shown in [(0, False), (2, True)]:
        logs.configure(verbosity)
        seen.clear()
        assert TrajectoryRecord.open(tmp_path / "rec").steps() == [0]
        assert any("is read only" in m for m in seen) == shown, seen


_NATIVE = r"""
import os, sys
from jaxattrib.logs import filter_native_stderr
print("installed", filter_native_stderr(), file=sys.stderr)
os.write(2, b"E1207 10:00:00.000000   123 slow_operation_alarm.cc:73] \n" + b"*" * 32 +
         b"\n[Compiling module jit_f] Very slow compile? If you want to file a bug, run with "
         b"envvar XLA_FLAGS=--xla_dump_to=/tmp/foo and attach the results.\n" + b"*" * 32 + b"\n")
os.write(2, b"E1207 10:00:01.000000   123 other.cc:1] a real native error\n")
print("a python line", file=sys.stderr)
os.write(2, b"last words without a newline")
if sys.argv[1:] == ["abort"]:
    os.abort()
"""


@pytest.mark.parametrize("how", ["exit", "abort", "raw"])
def test_native_stderr_filter_drops_only_xlas_slow_compile_block(how):
    """XLA's C++ "Very slow compile? ... file a bug" block (written to fd 2) is replaced by one
    calm line; every other native byte passes, also when the process dies by abort();
    $JAXATTRIB_RAW_STDERR=1 turns the filter off."""
    import os
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if how == "raw":
        env[logs.RAW_STDERR_ENV] = "1"
    p = subprocess.run([sys.executable, "-c", _NATIVE, *(["abort"] if how == "abort" else [])],
                       env=env, capture_output=True, timeout=60)
    err = p.stderr.decode()
    assert (p.returncode != 0) == (how == "abort")
    assert "a real native error" in err and "a python line" in err
    assert "last words without a newline" in err
    if how == "raw":
        assert "installed False" in err and "file a bug" in err
    else:
        assert "installed True" in err and "file a bug" not in err and "****" not in err
        assert logs.SLOW_COMPILE_HINT.decode().strip() in err


def test_library_modules_configure_no_handlers():
    """The library never adds handlers or sets levels: only jaxattrib/logs.py's configure()
    (called by the entry points) does."""
    offenders = []
    for path in (REPO / "jaxattrib").rglob("*.py"):
        if path.name == "logs.py":
            continue
        text = path.read_text()
        for pat in ["logging.basicConfig", ".addHandler(", ".setLevel(", "absl.logging.set"]:
            if pat in text:
                offenders.append(f"{path.relative_to(REPO)}: {pat}")
    assert offenders == []


def test_the_library_logs_and_only_entry_points_print():
    """No ``print`` in the library: only the entry points echo (the CLI through typer.echo,
    ``python -m jaxattrib.launch`` and the screenshot helper's own command line)."""
    allowed = {"cli.py", "launch.py", "report/screenshot.py"}
    offenders = []
    for path in (REPO / "jaxattrib").rglob("*.py"):
        rel = path.relative_to(REPO / "jaxattrib").as_posix()
        if rel not in allowed and re.search(r"(?<![\w.])print\(", path.read_text()):
            offenders.append(rel)
    assert offenders == []


# ----------------------------------------------------------------------------- packaging

@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    import shutil
    out = tmp_path_factory.mktemp("wheel")
    src = out / "src"       # a copy: no build/ left in (or stale files taken from) the checkout
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "-w", str(out), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (whl,) = out.glob("jaxattrib-*.whl")
    return whl, proc.stdout + proc.stderr


def test_wheel_ships_the_screenshot_helper_py_typed_and_spdx_license(wheel):
    """`report --screenshot` from an installed wheel: its helper is a module of the package."""
    whl, log = wheel
    with zipfile.ZipFile(whl) as z:
        names = set(z.namelist())
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = z.read(meta).decode()
    assert "jaxattrib/report/screenshot.py" in names
    assert "jaxattrib/py.typed" in names
    assert "jaxattrib/logs.py" in names
    assert "License-Expression: Apache-2.0" in metadata
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "SetuptoolsDeprecationWarning" not in log and "License classifiers" not in log


def test_report_screenshot_uses_the_packaged_helper(tmp_path, monkeypatch):
    """The CLI calls jaxattrib.report.screenshot (no script outside the package); without
    Chromium it is one clear error, exit 2."""
    from importlib import resources
    assert resources.files("jaxattrib.report").joinpath("screenshot.py").is_file()
    from jaxattrib.report import html
    monkeypatch.setattr(html, "render_run_report",
                        lambda d: (Path(d) / "report.html").write_text("<p>x</p>") and
                        Path(d) / "report.html")
    monkeypatch.setenv("CHROMIUM", "")
    monkeypatch.setenv("PATH", str(tmp_path))          # no chromium on PATH
    r = CliRunner().invoke(cli.app, ["report", str(tmp_path), "--screenshot",
                                     str(tmp_path / "s.png")])
    assert r.exit_code == 2, r.output
    assert "--screenshot needs Chromium" in r.output and "Traceback" not in r.output


# ----------------------------------------------------------------------------- warnings

def test_deprecation_warnings_from_our_code_fail_the_tests(tmp_path):
    """pyproject's filterwarnings: a DeprecationWarning attributed to a jaxattrib module fails
    a test; one from a third-party module does not (it is listed in the summary)."""
    (tmp_path / "test_w.py").write_text(
        "import warnings\n"
        "def _warn(module):\n"
        "    exec('import warnings\\nwarnings.warn(\"old\", DeprecationWarning)',\n"
        "         {'__name__': module})\n"
        "def test_ours():\n    _warn('jaxattrib.some_module')\n"
        "def test_theirs():\n    _warn('some_library.module')\n")
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p",
                        "no:cacheprovider", "-c", str(REPO / "pyproject.toml"), "--rootdir",
                        str(tmp_path), str(tmp_path / "test_w.py")],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    out = p.stdout + p.stderr
    assert "FAILED" in out and "test_w.py::test_ours" in out, out
    assert "test_w.py::test_theirs" not in out.split("short test summary")[-1], out
    assert "1 failed, 1 passed" in out, out


def test_records_print_once_when_a_root_handler_exists(capsys):
    """absl (imported by orbax) calls ``logging.basicConfig()`` and gives the root logger a
    stream handler; a configured entry point must still print each record exactly once."""
    import logging
    import sys as _sys

    from jaxattrib import logs
    root = logging.getLogger()
    extra = logging.StreamHandler(_sys.stderr)
    root.addHandler(extra)
    try:
        logs.configure(0)
        logging.getLogger("jaxattrib.runs.demo").info("printed-once")
    finally:
        logs.unconfigure()
        root.removeHandler(extra)
    assert capsys.readouterr().err.count("printed-once") == 1
    assert logging.getLogger("jaxattrib").propagate     # unconfigure restores it


def test_help_imports_no_jax():
    """``jaxattrib attribute --help`` builds its choices and defaults without JAX or NumPy
    (jaxattrib.attribution.method_names is plain constants)."""
    code = ("import sys; from typer.testing import CliRunner; from jaxattrib import cli; "
            "r = CliRunner().invoke(cli.app, ['attribute', '--help']); assert r.exit_code == 0; "
            "print(sorted(m for m in ('jax', 'numpy') if m in sys.modules))")
    import os
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"
