#!/usr/bin/env python3
"""Check that jaxattrib's imports run downward only (CONTRIBUTING.md, "Layers").

Reads every ``.py`` file of the package and of ``benchmarks/`` with :mod:`ast` (no import is
executed), collects every import of a ``jaxattrib`` module -- at module level *and* inside
functions, ``if TYPE_CHECKING`` blocks included -- and reports

* each **upward import**: a module importing a module of a higher layer;
* each **forbidden import**: the CLI/launcher importing benchmark harnesses (``jaxattrib.eval``,
  ``benchmarks``), which sit on the same layer but are not part of a user-facing command;
* each **import cycle** between modules (a strongly connected component of the import graph,
  function-level imports included);
* each module not assigned to a layer (add it to ``LAYERS`` below).

Exits 1 if any is found, 0 otherwise. Usage: ``python scripts/check_layers.py [repo_root]``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

# Lowest first. A module's layer is that of the longest prefix listed here. Imports may go to
# the same or a lower layer; same-layer imports must not form a cycle.
LAYERS: list[tuple[str, list[str]]] = [
    ("foundation", [
        "jaxattrib", "jaxattrib.config", "jaxattrib.configs", "jaxattrib.fileio",
        "jaxattrib.parallel", "jaxattrib.progress", "jaxattrib.runlock", "jaxattrib.integrity",
        "jaxattrib.precision", "jaxattrib.metrics", "jaxattrib.fingerprint", "jaxattrib.data",
        "jaxattrib.logs", "jaxattrib.lazy_exports",
    ]),
    ("models", ["jaxattrib.models", "jaxattrib.report"]),
    ("diffusion", ["jaxattrib.diffusion"]),
    ("generate", ["jaxattrib.generate"]),
    ("train", ["jaxattrib.train"]),
    ("methods", ["jaxattrib.attribution", "jaxattrib.authentication"]),
    ("runs", ["jaxattrib.runs"]),
    ("entry points", ["jaxattrib.cli", "jaxattrib.cli_options", "jaxattrib.launch",
                      "jaxattrib.eval"]),
    ("benchmark scripts", ["benchmarks"]),
]

# (importer prefix, imported prefix): imports that are not upward but still not allowed.
FORBIDDEN: list[tuple[str, str, str]] = [
    ("jaxattrib.cli", "jaxattrib.eval", "the CLI must not depend on benchmark harnesses"),
    ("jaxattrib.cli", "benchmarks", "the CLI must not depend on benchmark scripts"),
    ("jaxattrib.launch", "jaxattrib.eval", "the launcher must not depend on benchmark harnesses"),
    ("jaxattrib.launch", "benchmarks", "the launcher must not depend on benchmark scripts"),
]

TOP = ("jaxattrib", "benchmarks")


def layer_of(module: str) -> int | None:
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            # The root package itself is foundation; its other top-level modules are not.
            inside = module.startswith(p + ".") and p != "jaxattrib"
            if (module == p or inside) and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def collect(root: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for top in TOP:
        base = root / top
        if base.is_dir():
            for p in sorted(base.rglob("*.py")):
                if "__pycache__" not in p.parts:
                    files[module_name(root, p)] = p
    return files


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` (a dotted import target) lives in."""
    while name:
        if name in modules:
            return name
        if "." not in name:
            return None
        name = name.rsplit(".", 1)[0]
    return None


def imports_of(mod: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every import of a package module in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: list[tuple[str, int]] = []
    seen: set[tuple[str, int]] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub when it exists.
            targets = [f"{stem}.{a.name}" for a in node.names] or [stem]
        for t in targets:
            if not t.split(".")[0] in TOP:
                continue
            r = resolve(t, modules)
            if r is not None and r != mod and (r, node.lineno) not in seen:
                seen.add((r, node.lineno))
                out.append((r, node.lineno))
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in graph:
                    continue
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def check(root: Path) -> list[str]:
    modules = collect(root)
    problems: list[str] = []
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        lm = layer_of(mod)
        rel = path.relative_to(root)
        if lm is None:
            problems.append(f"{rel}: module {mod} is not assigned to a layer "
                            "(add it to LAYERS in scripts/check_layers.py)")
            continue
        for dep, line in imports_of(mod, path, modules):
            # Importing a package's submodule runs the package __init__ too; the edge that
            # matters for layering is the submodule.
            graph[mod].add(dep)
            ld = layer_of(dep)
            if ld is not None and ld > lm:
                problems.append(f"{rel}:{line}: upward import {mod} ({LAYERS[lm][0]}) -> "
                                f"{dep} ({LAYERS[ld][0]})")
            for src, dst, why in FORBIDDEN:
                if (mod == src or mod.startswith(src + ".")) and \
                        (dep == dst or dep.startswith(dst + ".")):
                    problems.append(f"{rel}:{line}: forbidden import {mod} -> {dep}: {why}")
    for comp in cycles(graph):
        problems.append("import cycle: " + " -> ".join(comp + [comp[0]]))
    return problems


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[1]
    problems = check(root)
    n = len(collect(root))
    for p in problems:
        print(p)
    if problems:
        print(f"check_layers: {len(problems)} problem(s) in {n} modules", file=sys.stderr)
        return 1
    print(f"check_layers: {n} modules, imports run downward only, no cycles")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
