"""Test setup: 8 emulated CPU devices so multi-device code is exercised on every run."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CLI's persistent compilation cache is on by default under the user's cache directory;
# tests (which run the CLI in-process) never write there. test_cli_compile_cache.py
# turns it on explicitly in tmp directories.
os.environ["JAXATTRIB_COMPILE_CACHE"] = "off"
# One XLA compilation cache for the whole test run (the pytest process, its xdist workers,
# which inherit this variable, and the CLI subprocesses some tests start): many tests compile
# the same programs of the same tiny models. A fresh directory per run, so nothing outlives
# it; JAX only caches programs that took >= 1 s to compile. Set JAX_COMPILATION_CACHE_DIR
# yourself to keep one between runs, or to '' to compile everything afresh.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxattrib-test-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` from the repository root; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_latent_pipeline(tmp_path_factory) -> Path:
    """A tiny latent SD pipeline (VAE + UNet + CLIP + tokenizer) written by diffusers/
    transformers, 16-px images, 8x8x4 latents (``tests/tiny.py``). Shared: copy before
    modifying."""
    pytest.importorskip("diffusers")
    from tiny import make_latent_pipeline
    return make_latent_pipeline(tmp_path_factory.mktemp("tiny_latent"))


@pytest.fixture(scope="session")
def tiny_pixel_pipeline(tmp_path_factory) -> Path:
    """A tiny pixel-space pipeline (no VAE), 8-px images (``tests/tiny.py``). Shared: copy
    before modifying."""
    from tiny import make_pixel_pipeline
    return make_pixel_pipeline(tmp_path_factory.mktemp("tiny_pixel"))


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    """A tiny pixel-space pipeline (no VAE), 8-px images, with a 5-word vocabulary ('a', 'red',
    'blue', 'circle', 'square'; ``tests/tiny.py``), written by our own writer. Shared: copy
    before modifying."""
    from tiny import make_pixel_pipeline
    return make_pixel_pipeline(tmp_path_factory.mktemp("pipe"), name="pipe",
                               words=["a", "red", "blue", "circle", "square"])


@pytest.fixture(scope="session")
def tiny_base_model(tmp_path_factory) -> Path:
    """A tiny 16-px pixel pipeline with the base model's vocabulary and metadata (2 images per
    combination; ``tests/tiny.py::make_small_base_model``). Shared: copy before modifying."""
    from tiny import make_small_base_model
    return make_small_base_model(tmp_path_factory.mktemp("tinybase"))
