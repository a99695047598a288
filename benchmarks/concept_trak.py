"""The Concept-TRAK benchmark (issue #6): concept-level attribution with in-distribution (ID) and
out-of-distribution (OOD: combinations withheld from training) concept queries on the embedded
base model; Precision@10 and mAP of Concept-TRAK, D-TRAK and TRAK side by side, and the
ablation TRAK → +concept loss → +training loss → +DDIM inversion → +normalization on the same
queries (:mod:`jaxattrib.eval.concept_benchmark`; config ``jaxattrib/configs/concept_trak.py``).

Resumable: rerunning with the same run directory reuses every finished stage (data, fine-tuning
record, generations, feature stores, scores). Tables: ``RUN_DIR/tables/concept_trak.md``,
``RUN_DIR/tables/ablation.md`` (+ ``concept_trak.json`` with every number and CI).

    python benchmarks/concept_trak.py --smoke --run-dir runs/concept_trak_smoke
    python benchmarks/concept_trak.py --run-dir runs/concept_trak             # both tables
    python benchmarks/concept_trak.py --ablation --run-dir runs/concept_trak  # ablation only
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", default=None,
                    help="run directory (default runs/concept_trak[_smoke]); reused")
    ap.add_argument("--smoke", action="store_true",
                    help="reduced setting (minutes; the numbers mean nothing)")
    ap.add_argument("--ablation", action="store_true",
                    help="only the ablation table (skips the D-TRAK / TRAK baselines)")
    ap.add_argument("--set", action="append", default=[], help="config override key=value")
    ap.add_argument("--fresh", action="store_true", help="delete the run directory first")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    from jaxattrib.config import load_config
    from jaxattrib.eval.concept_benchmark import run_concept_benchmark
    overrides = list(args.set) + (["attribution.ablation=True"] if args.ablation else [])
    cfg = load_config("concept_trak" + (":smoke" if args.smoke else ""), overrides)
    run_dir = Path(args.run_dir or ("runs/concept_trak_smoke" if args.smoke
                                    else "runs/concept_trak"))
    if args.fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    t0 = time.time()
    run_concept_benchmark(cfg, run_dir, progress=not args.no_progress,
                          ablation_only=args.ablation)
    names = ["ablation.md"] if args.ablation else ["concept_trak.md", "ablation.md"]
    for name in names:
        path = run_dir / "tables" / name
        if path.exists():
            print(path.read_text())
    print(f"wall time {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
