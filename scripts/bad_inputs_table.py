"""Writes docs/bad_inputs.md from the tests that back each row (tests/bad_inputs.py).

    python scripts/bad_inputs_table.py          # rewrite the page
    python scripts/bad_inputs_table.py --check  # exit 1 if the page is stale

tests/test_bad_inputs.py::test_bad_inputs_doc_is_current runs the same check in the fast suite.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from bad_inputs import DOC, collect, render  # noqa: E402


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render(collect())
    if "--check" in argv:
        if not DOC.is_file() or DOC.read_text() != text:
            print(f"{DOC} is stale: run python scripts/bad_inputs_table.py", file=sys.stderr)
            return 1
        print(f"{DOC}: current")
        return 0
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
    print(f"wrote {DOC} ({text.count(chr(10) + '| ') - 1} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
