"""Paired comparison of two customization-benchmark runs on the same queries (issue 19: noise
modes, checkpoint ensembles): per method and variant, mAP under each run and the mean per-query
AP difference B − A with a 95 % bootstrap CI over the test queries, the pairs resampled
together (:func:`jaxattrib.eval.benchmarks.paired_ap_difference`).

Both runs must hold the same fine-tuning set and queries (``data/train.npz`` and
``generations/queries.npz`` are compared; a run directory copied from another with only
``attribution`` fields changed in its ``config.json`` qualifies); the test / validation split,
the within-concept candidates and the classifier check are the benchmark's own
(:func:`jaxattrib.eval.benchmarks.run_customization`). Reads only finished score files.

    python benchmarks/customization_paired.py --run-a runs/customization \\
        --run-b runs/customization_noise_shared --methods dtrak,trak
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def _load(run: Path, name: str) -> dict:
    path = run / name
    if not path.is_file():
        sys.exit(f"error: {path}: missing; run benchmarks/customization.py --run-dir {run} first")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def compare(run_a: Path, run_b: Path, methods: list[str], n_bootstrap: int = 1000) -> list[dict]:
    """Rows ``{method, variant, n, A mAP, B mAP, B − A}`` (strings with CIs)."""
    from jaxattrib.eval import benchmarks as B
    from jaxattrib.train.base_model import base_model_info, spec_from_info
    data = {}
    for run in (run_a, run_b):
        data[run] = (_load(run, "data/train.npz"), _load(run, "generations/queries.npz"))
    (ta, qa), (tb, qb) = data[run_a], data[run_b]
    for key, x, y in (("data/train.npz images", ta["images"], tb["images"]),
                      ("generations/queries.npz images", qa["images"], qb["images"]),
                      ("generations/queries.npz prompts", qa["prompts"], qb["prompts"])):
        if x.shape != y.shape or not np.array_equal(x, y):
            sys.exit(f"error: {run_a / key.split()[0]} and {run_b / key.split()[0]} differ "
                     f"({key.split()[1]}): the runs are not paired")
    cfg = json.loads((run_a / "config.json").read_text())
    info = base_model_info(cfg.get("base_model") or None)
    gt, ok, val = B.customization_truth(ta, qa, spec_from_info(info),
                                        cfg.get("variation", "background"))
    test = ~val
    rows = []
    for method in methods:
        for variant in ("between", "within"):
            paths = [run / "scores" / variant / f"{method}.npy" for run in (run_a, run_b)]
            for p in paths:
                if not p.is_file():
                    sys.exit(f"error: {p}: missing (method {method!r} not scored in that run)")
            kw = ({"candidates": gt["candidates"]} if variant == "within" else {})
            sel = test & ok if variant == "within" else test
            d = B.paired_ap_difference(np.load(paths[0]), np.load(paths[1]), gt[variant], sel,
                                       n_bootstrap=n_bootstrap, **kw)
            fmt = lambda c: f"{c.estimate:.3f} [{c.low:.2f}, {c.high:.2f}]"  # noqa: E731
            rows.append({"method": B.METHOD_NAMES.get(method, method),
                         "variant": variant + (" (among the concept)" if kw else ""),
                         "n": d["n"], "A mAP": fmt(d["a"]), "B mAP": fmt(d["b"]),
                         "B − A": f"{d['diff'].estimate:+.3f} [{d['diff'].low:+.3f}, "
                                  f"{d['diff'].high:+.3f}]"})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-a", required=True, type=Path, help="reference run directory")
    ap.add_argument("--run-b", required=True, type=Path, help="compared run directory")
    ap.add_argument("--methods", default="dtrak,trak", help="comma-separated method names")
    ap.add_argument("--n-bootstrap", type=int, default=1000)
    args = ap.parse_args(argv)
    from jaxattrib.eval.benchmarks import markdown_table
    rows = compare(args.run_a, args.run_b, args.methods.split(","), args.n_bootstrap)
    print(f"A = {args.run_a}, B = {args.run_b}; test queries; mean [95% bootstrap CI], the "
          f"difference paired per query\n")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
