"""Every relative link in the README, BENCHMARKS.md and docs/ resolves to a file or folder.

Markdown links ``[text](target)`` outside fenced code blocks; web links (``scheme:``) and pure
anchors (``#...``) are skipped; ``target#anchor`` is checked for the file part only.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _doc_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").rglob("*.md"))]


def relative_links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of each relative Markdown link outside ``` fences."""
    out, fenced = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        for target in LINK.findall(line):
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
                continue
            out.append((n, target.split("#", 1)[0]))
    return out


def test_link_finder_sees_relative_links_only():
    text = ("[a](docs/x.md) [b](https://e.org) [c](#top) [d](y.md#sec)\n"
            "```\n[e](not/a/link.md)\n```\n")
    assert relative_links(text) == [(1, "docs/x.md"), (1, "y.md")]


@pytest.mark.parametrize("doc", _doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    broken = [f"{doc.relative_to(ROOT)}:{n}: {target}"
              for n, target in relative_links(doc.read_text(encoding="utf-8"))
              if not (doc.parent / target).exists()]
    assert not broken, "broken relative links:\n" + "\n".join(broken)
