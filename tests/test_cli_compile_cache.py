"""The CLI's persistent XLA compilation cache: where it lives (option, environment, XDG, home)
and that a compiling command writes entries there, and none when off."""

import jax
import pytest


def test_compile_cache_directory_resolution(tmp_path, monkeypatch):
    from jaxattrib.cli import resolve_compile_cache
    monkeypatch.delenv("JAXATTRIB_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_compile_cache(None) == tmp_path / "xdg" / "jaxattrib" / "xla"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_compile_cache(None) == tmp_path / "home" / ".cache" / "jaxattrib" / "xla"
    monkeypatch.setenv("JAXATTRIB_COMPILE_CACHE", str(tmp_path / "env"))
    assert resolve_compile_cache(None) == tmp_path / "env"
    assert resolve_compile_cache(str(tmp_path / "opt")) == tmp_path / "opt"  # option wins
    assert resolve_compile_cache("off") is None and resolve_compile_cache("OFF") is None
    monkeypatch.setenv("JAXATTRIB_COMPILE_CACHE", "off")
    assert resolve_compile_cache(None) is None
    assert resolve_compile_cache(str(tmp_path / "opt")) == tmp_path / "opt"


@pytest.fixture
def restore_compile_cache():
    """Puts JAX's persistent-cache settings back after a test that let the CLI change them, so
    later tests in the process neither write to nor read from its tmp cache."""
    from jax.experimental.compilation_cache import compilation_cache as cc
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {n: jax.config.values[n] for n in names}
    yield
    for n, v in saved.items():
        jax.config.update(n, v)
    cc.reset_cache()


def test_cli_compile_cache_on_and_off(tiny_pipeline_dir, tmp_path, monkeypatch,
                                      restore_compile_cache):
    """A command that compiles (`info` checks every tensor) writes XLA cache entries to the
    directory --compile-cache / $JAXATTRIB_COMPILE_CACHE names, and none anywhere when off."""
    from typer.testing import CliRunner
    from jaxattrib.cli import app
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)

    def info(*top):
        jax.clear_caches()  # in-memory executables from earlier tests would skip compilation
        r = CliRunner().invoke(app, [*top, "info", str(tiny_pipeline_dir)])
        assert r.exit_code == 0, r.output
        return r.output

    def entries(d):
        return sorted(p.name for p in d.glob("*-cache")) if d.is_dir() else []

    monkeypatch.setenv("JAXATTRIB_COMPILE_CACHE", str(tmp_path / "env"))
    out = info()
    written = entries(tmp_path / "env")
    assert written and any(n.startswith("jit_") for n in written)
    assert str((tmp_path / "env").resolve()) in out and not (tmp_path / "xdg").exists()
    out = info("--no-compile-cache")     # off after on (same process): back to no cache
    assert "compilation cache" not in out
    assert jax.config.values["jax_compilation_cache_dir"] in (None, "")
    assert entries(tmp_path / "env") == written
    monkeypatch.setenv("JAXATTRIB_COMPILE_CACHE", "off")
    (tmp_path / "env2").mkdir()
    monkeypatch.chdir(tmp_path / "env2")
    info()
    assert not any((tmp_path / "env2").iterdir()) and not (tmp_path / "xdg").exists()
    info("--compile-cache", "rel")       # the option wins over the environment; relative path
    assert entries(tmp_path / "env2" / "rel")
