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
    python benchmarks/concept_trak.py --reference-inversion --run-dir runs/concept_trak_ref
"""

from __future__ import annotations

import time

from jaxattrib.eval.runner import benchmark_parser, exit_on_bad_input, prepare_run_dir


def main(argv=None):
    ap = benchmark_parser(__doc__, "runs/concept_trak",
                          "reduced setting (minutes; the numbers mean nothing)")
    ap.add_argument("--ablation", action="store_true",
                    help="only the ablation table (skips the D-TRAK / TRAK baselines)")
    ap.add_argument("--reference-inversion", action="store_true",
                    help="the reference's (x_t, t) pairs: training images inverted with CFG 7.5 "
                         "against the empty prompt, queries' pairs from their regenerated "
                         "trajectories (eta 0.1); --set fields still apply on top")
    args = ap.parse_args(argv)
    from jaxattrib.config import apply_overrides, load_config
    from jaxattrib.configs.concept_trak import reference_inversion
    from jaxattrib.eval.concept_benchmark import run_concept_benchmark
    overrides = list(args.set) + (["attribution.ablation=True"] if args.ablation else [])
    cfg = load_config("concept_trak" + (":smoke" if args.smoke else ""))
    if args.reference_inversion:
        reference_inversion(cfg)
    cfg = apply_overrides(cfg, overrides)
    run_dir = prepare_run_dir(args, "runs/concept_trak")
    t0 = time.time()
    with exit_on_bad_input():
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
