"""Smoke test of ``benchmarks/featurize.py --quick`` (slow: several minutes on a loaded CPU).

No timing assertions. Checks that every row ran and that the torch (traker) and JAX sides
differentiate the same function: output values and per-example gradient norms agree.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_featurize_benchmark_quick_runs():
    pytest.importorskip("trak")
    pytest.importorskip("diffusers")
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one host device, as when the benchmark is run by hand
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "featurize.py"), "--quick"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "failed" not in out, out
    for row in ("trak", "jax-grad", "jax-gaussian", "jax-factored"):
        assert re.search(rf"\| {row}\s+\|\s+[0-9.]+ \|", out), (row, out)
    m = re.search(r"output rel\. diff ([0-9.e+-]+), ‖∇θ f‖² rel\. diff ([0-9.e+-]+)", out)
    assert m, out
    assert float(m.group(1)) < 1e-4 and float(m.group(2)) < 1e-3, m.group(0)
    assert re.search(r"factored time / plain backward time = [0-9.]+", out), out
