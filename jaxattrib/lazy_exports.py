"""Lazy package exports: a package's public names, imported from their modules on first use.

``__getattr__, __dir__ = lazy_exports(__name__, globals(), {"Name": "pkg.module", ...})`` in a
package ``__init__`` keeps ``import pkg.light_module`` free of the heavy modules (JAX) behind
the public names [design]. Used by ``jaxattrib.attribution`` and ``jaxattrib.authentication``.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(module_name: str, namespace: dict,
                 exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list]]:
    """The module-level ``__getattr__`` and ``__dir__`` of package ``module_name`` (its
    ``globals()`` = ``namespace``) for ``exports`` = ``{name: module that defines it}``; a
    resolved name is cached in ``namespace``."""

    def __getattr__(name: str):
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__


__all__ = ["lazy_exports"]
