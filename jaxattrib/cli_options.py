"""Choice types and shared options of the ``jaxattrib`` command line (:mod:`jaxattrib.cli`).

The allowed values of the choice options are spelled out here, so ``--help`` lists them (and a
wrong value gets click's error) without importing JAX; ``tests/test_cli_conventions.py`` checks
each Enum against the library's own tuple. ``--method``'s choices and the ``attribute``
defaults its help names come from :mod:`jaxattrib.attribution.method_names` (JAX-free).
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import typer

from jaxattrib.attribution.method_names import (ATTRIBUTE_DEFAULTS, DEFAULT_CHECKPOINTS,
                                              GRADIENT_METHODS)


#: ``--method``: the gradient methods of the registry (jaxattrib.attribution.methods.METHODS,
#: whose names live in the JAX-free method_names), e.g. ``Method.journey_trak.value``
Method = Enum("Method", [(n.replace("-", "_"), n) for n in GRADIENT_METHODS], type=str)


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


def run_default(name: str, text: str, *, quoted: bool = False) -> str:
    """An ``attribute`` option's help: ``text`` then "Default: the run config's, else X." with
    X = :data:`~jaxattrib.attribution.method_names.ATTRIBUTE_DEFAULTS` ``[name]`` (``repr``
    when ``quoted``), so the help cannot drift from the defaults the command applies."""
    value = ATTRIBUTE_DEFAULTS[name]
    shown = repr(value) if quoted else value
    return f"{text} Default: the run config's, else {shown}."


def run_option(name: str, text: str, *, quoted: bool = False):
    """An ``attribute`` option whose value defaults to the run's (``None`` here), its help from
    :func:`run_default`."""
    return typer.Option(None, show_default=False, help=run_default(name, text, quoted=quoted))


def checkpoints_default() -> str:
    """``'1 for dtrak, 3 for trak / journey-trak'``: the ensemble sizes of
    :data:`~jaxattrib.attribution.method_names.DEFAULT_CHECKPOINTS`, grouped by size."""
    by_size: dict[int, list[str]] = {}
    for method, m in DEFAULT_CHECKPOINTS.items():
        by_size.setdefault(m, []).append(method)
    return ", ".join(f"{m} for {' / '.join(names)}" for m, names in by_size.items())
