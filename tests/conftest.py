"""Test setup: 8 emulated CPU devices so multi-device code is exercised on every run."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CLI's persistent compilation cache is on by default under the user's cache directory;
# tests (which run the CLI in-process) never write there. test_app.py's compile-cache test
# turns it on explicitly in tmp directories.
os.environ["JAXATTRIB_COMPILE_CACHE"] = "off"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` from the repository root; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} not present")
    return SHARED_DATA
