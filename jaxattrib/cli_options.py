"""Choice types and shared options of the ``jaxattrib`` command line (:mod:`jaxattrib.cli`).

The allowed values of the choice options are spelled out here, so ``--help`` lists them (and a
wrong value gets click's error) without importing JAX; ``tests/test_cli_conventions.py`` checks
each Enum against the library's own tuple.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import typer


class Method(str, Enum):
    """``--method`` (jaxattrib.attribution.diffusion_trak.METHODS)."""
    trak = "trak"
    dtrak = "dtrak"
    journey_trak = "journey-trak"
    tracin = "tracin"


class Projection(str, Enum):
    """``--projection`` (the first three of jaxattrib.attribution.projection.KINDS; 'factored'
    is for the benchmarks' featurizer only)."""
    gaussian = "gaussian"
    rademacher = "rademacher"
    sjlt = "sjlt"


class Precision(str, Enum):
    """``--precision`` (jaxattrib.precision.PRECISIONS)."""
    float32 = "float32"
    bfloat16 = "bfloat16"


class Remat(str, Enum):
    """``--remat`` (jaxattrib.precision.REMAT_POLICIES)."""
    none = "none"
    full = "full"
    dots_saveable = "dots_saveable"
    nothing_saveable = "nothing_saveable"
    dots_with_no_batch_dims_saveable = "dots_with_no_batch_dims_saveable"
    everything_saveable = "everything_saveable"


class MatmulPrecision(str, Enum):
    """``--matmul-precision`` (jaxattrib.precision.MATMUL_PRECISIONS)."""
    default = "default"
    tensorfloat32 = "tensorfloat32"
    highest = "highest"


class Noise(str, Enum):
    """``--noise`` (jaxattrib.diffusion.losses.NOISE_MODES)."""
    per_position = "per_position"
    per_example = "per_example"
    shared = "shared"


def progress_option(what: str = "progress bars") -> Any:
    """``--progress/--no-progress`` (default on): one flag pair for every command."""
    return typer.Option(True, "--progress/--no-progress", help=f"Show {what}.")
