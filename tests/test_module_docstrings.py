"""Module docstrings stay short (issue 20 item 5): at most ~40 lines; measured history lives in
docs/benchmarks/<name>.md, the method notes in docs/methods.md."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 42      # "about 40": a few lines of slack for a closing example


def test_module_docstrings_are_at_most_about_40_lines():
    long = []
    for folder in ("jaxattrib", "benchmarks", "scripts"):
        for path in sorted((REPO / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            if ast.get_docstring(tree) is None:
                continue
            node = tree.body[0]
            n = node.end_lineno - node.lineno + 1
            if n > MAX_LINES:
                long.append(f"{path.relative_to(REPO)}: {n} lines")
    assert long == []
