"""Paired comparison of two LDS run directories of ``benchmarks/lds.py`` that share their models
and measured outputs (issue 19: noise modes, checkpoint ensembles): per method and split, each
run's LDS and the mean per-target difference LDS(B) − LDS(A) with a 95 % bootstrap CI over the
targets, the pairs resampled together.

A run directory copied from another, then rerun with only ``attribution`` fields changed (``--set
attribution.noise=...``, ``attribution.checkpoints=3``), qualifies: both must hold the same
subsets (``subsets/masks.npy``), the same generated targets (``generated.npz``) and the same
measured outputs of every split; anything else is refused with the file that differs. Each method
enters at the λ ratio and sign its own run chose on the tune split. Reads only finished results
(``results/lds_per_target.npz``, written by ``benchmarks/lds.py``; rerun it on an older run
directory to write the file: its cached features and outputs are reused).

    python benchmarks/lds_paired.py --run-a runs/lds_fit --run-b runs/lds_fit_shared \\
        --methods trak,dtrak
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

SPLITS = ("val", "gen")


def _unmeasured(run: Path):
    def f(_):
        raise FileNotFoundError(f"{run}: measured outputs missing (run benchmarks/lds.py)")
    return f


def check_paired(run_a: Path, run_b: Path) -> None:
    """Raises ``ValueError`` naming the first file in which the two runs differ."""
    from jaxattrib.eval import lds as lds_lib
    for name in ("subsets/masks.npy", "generated.npz"):
        a, b = run_a / name, run_b / name
        for p in (a, b):
            if not p.is_file():
                raise ValueError(f"{p}: missing; run benchmarks/lds.py --run-dir {p.parent} first"
                                 if name == "generated.npz" else
                                 f"{p}: missing; not a finished LDS run directory")
        if a.read_bytes() != b.read_bytes():
            raise ValueError(f"{a} and {b} differ: the runs are not paired (copy one run "
                             f"directory and change only attribution fields)")
    for split in ("tune",) + SPLITS:
        ya = lds_lib.actual_outputs(run_a / "subsets", _unmeasured(run_a), name=f"loss_{split}")
        yb = lds_lib.actual_outputs(run_b / "subsets", _unmeasured(run_b), name=f"loss_{split}")
        if ya.shape != yb.shape or not np.array_equal(ya, yb):
            raise ValueError(f"{run_a}/subsets and {run_b}/subsets: the measured outputs of split "
                             f"{split!r} differ: the runs are not paired")


def load_per_target(run: Path) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import lds as bench  # noqa: E402  (benchmarks/lds.py)
    path = run / bench.PER_TARGET
    if not path.is_file():
        raise ValueError(f"{path}: missing; run benchmarks/lds.py --run-dir {run} (with its "
                         f"--config / --set flags) to write it; cached work is reused")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def compare(run_a: Path, run_b: Path, methods: list[str], n_bootstrap: int = 1000,
            seed: int = 0) -> list[dict]:
    """Rows ``{method, split, n, lds_a, lds_b, diff, ci_low, ci_high, frac_b_better}``."""
    from jaxattrib.metrics import bootstrap_ci
    check_paired(run_a, run_b)
    pa, pb = load_per_target(run_a), load_per_target(run_b)
    rows = []
    for method in methods:
        for split in SPLITS:
            key = f"{method}/{split}"
            for run, p in ((run_a, pa), (run_b, pb)):
                if key not in p:
                    has = sorted({k.split("/")[0] for k in p if "/" in k})
                    raise ValueError(f"{run / 'results/lds_per_target.npz'}: no method "
                                     f"{method!r} (has {has})")
            a, b = pa[key], pb[key]
            ok = np.isfinite(a) & np.isfinite(b)
            d = b[ok] - a[ok]
            ci = bootstrap_ci(d, np.mean, n=n_bootstrap, seed=seed)
            rows.append({"method": method, "split": split, "n": int(ok.sum()),
                         "lds_a": float(a[ok].mean()), "lds_b": float(b[ok].mean()),
                         "diff": ci.estimate, "ci_low": ci.low, "ci_high": ci.high,
                         "frac_b_better": float(np.mean(d > 0))})
    return rows


def variant(p: dict) -> str:
    return f"noise {p['noise']}, M {p['checkpoints']}"


def format_table(rows: list[dict], label_a: str, label_b: str) -> str:
    lines = [f"| method | split | n | A: {label_a} | B: {label_b} | B − A [95% CI] | B higher |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['split']} | {r['n']} | {r['lds_a']:.3f} | {r['lds_b']:.3f} | "
              f"{r['diff']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] | "
              f"{100 * r['frac_b_better']:.0f} % |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--run-a", required=True, type=Path, help="baseline LDS run directory")
    ap.add_argument("--run-b", required=True, type=Path, help="variant LDS run directory")
    ap.add_argument("--methods", default="trak,dtrak", help="comma-separated (default trak,dtrak)")
    ap.add_argument("--n-bootstrap", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    try:
        rows = compare(args.run_a, args.run_b, [m for m in args.methods.split(",") if m],
                       args.n_bootstrap)
        la, lb = (variant(load_per_target(r)) for r in (args.run_a, args.run_b))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(format_table(rows, la, lb), end="")
    if args.out:
        args.out.write_text(json.dumps({"run_a": str(args.run_a), "run_b": str(args.run_b),
                                        "a": la, "b": lb, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
