"""scripts/check_layers.py: the package's imports run downward only (CONTRIBUTING.md, Layers);
and the checker itself catches an upward import, a function-level one, a forbidden one and a
cycle in a synthetic package."""

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_layers.py"


def _checker():
    spec = importlib.util.spec_from_file_location("check_layers", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_repository_imports_run_downward_only():
    r = subprocess.run([sys.executable, str(SCRIPT), str(ROOT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "imports run downward only" in r.stdout


def _write(root: Path, rel: str, text: str = "") -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def test_checker_reports_upward_function_level_forbidden_and_cycles(tmp_path):
    for pkg in ("jaxattrib", "jaxattrib/models", "jaxattrib/train", "jaxattrib/eval",
                "jaxattrib/runs"):
        _write(tmp_path, f"{pkg}/__init__.py")
    _write(tmp_path, "jaxattrib/config.py")
    # foundation -> train, inside a function: upward
    _write(tmp_path, "jaxattrib/fileio.py",
           "def f():\n    from jaxattrib.train import finetune\n    return finetune\n")
    _write(tmp_path, "jaxattrib/train/finetune.py", "from jaxattrib.train.record import R\n")
    _write(tmp_path, "jaxattrib/train/record.py", "import jaxattrib.train.finetune\nR = 1\n")
    _write(tmp_path, "jaxattrib/models/unet.py", "from jaxattrib import config\n")   # fine
    _write(tmp_path, "jaxattrib/eval/bench.py", "")
    _write(tmp_path, "jaxattrib/cli.py", "from jaxattrib.eval import bench\n")
    _write(tmp_path, "jaxattrib/runs/new.py", "")
    _write(tmp_path, "jaxattrib/stray.py", "")
    problems = _checker().check(tmp_path)
    text = "\n".join(problems)
    assert "jaxattrib/fileio.py:2: upward import jaxattrib.fileio (foundation) -> " \
           "jaxattrib.train.finetune (train)" in text
    assert "forbidden import jaxattrib.cli -> jaxattrib.eval.bench" in text
    assert "import cycle: jaxattrib.train.finetune -> jaxattrib.train.record" in text
    assert "module jaxattrib.stray is not assigned to a layer" in text
    assert not any("models.unet" in p or "runs.new" in p for p in problems)
    assert len(problems) == 4, text
