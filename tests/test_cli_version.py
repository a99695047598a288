"""``jaxattrib --version`` and the package metadata it reports."""

from importlib import metadata
from pathlib import Path

from typer.testing import CliRunner

import jaxattrib
from jaxattrib.cli import app


def test_version_prints_the_installed_version_and_exits_0():
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == f"jaxattrib {jaxattrib.__version__}"
    assert jaxattrib.__version__ == metadata.version("jaxattrib")


def test_package_is_typed_and_licensed():
    root = Path(jaxattrib.__file__).parent
    assert (root / "py.typed").is_file()
    assert metadata.metadata("jaxattrib")["License-Expression"] == "Apache-2.0"
