"""The customization benchmark: between- and within-concept attribution on the embedded base
model, ground truth by construction (:mod:`jaxattrib.eval.benchmarks`; config
``jaxattrib/configs/customization.py``).

Fine-tunes the shipped base model on exemplars of its four withheld concepts (each concept's
exemplars cycling through the base model's backgrounds: 6 on the embedded latent model) +
distractors, generates queries per
(concept, background), attributes them with TRAK, D-TRAK, TracIn, Concept-TRAK, MONTRAGE
(trajectory and final-checkpoint-only), pixel similarity and random, and prints Recall@10 / mAP
(95% bootstrap CIs over test queries) for both variants. Resumable: rerunning with the same
run directory reuses every finished stage. Tables: ``RUN_DIR/tables/customization.{md,json}``;
``jaxattrib report RUN_DIR`` renders them with the generated queries.

    python benchmarks/customization.py --smoke --run-dir runs/customization_smoke
    python benchmarks/customization.py --run-dir runs/customization

(~11 / ~60 min on the loaded 2-core CPU with the former 16-px pixel default, BENCHMARKS.md.
On the 32-px latent default, ``--smoke`` took 680 s wall, both tables with all 8 methods:
2026-12-07, 2-core shared CPU, load 4.6-7 (``uptime``), ``nice -n 19 python
benchmarks/customization.py --smoke --run-dir /tmp/cs --no-progress``, compilation included.)
"""

from __future__ import annotations

import time

from jaxattrib.eval.runner import benchmark_parser, exit_on_bad_input, prepare_run_dir


def main(argv=None):
    ap = benchmark_parser(__doc__, "runs/customization",
                          "reduced setting (minutes; numbers meaningless)")
    args = ap.parse_args(argv)
    from jaxattrib.config import load_config
    from jaxattrib.eval.benchmarks import run_customization
    cfg = load_config("customization" + (":smoke" if args.smoke else ""), args.set)
    run_dir = prepare_run_dir(args, "runs/customization")
    t0 = time.time()
    with exit_on_bad_input():
        run_customization(cfg, run_dir, progress=not args.no_progress)
    print((run_dir / "tables" / "customization.md").read_text())
    print(f"wall time {time.time() - t0:.0f} s; report: jaxattrib report {run_dir}")


if __name__ == "__main__":
    main()
