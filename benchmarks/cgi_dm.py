"""The CGI-DM benchmark: fine-tuning members vs equal-size hold-outs of the same concepts
(:mod:`jaxattrib.eval.cgi_benchmark`; config ``jaxattrib/configs/cgi_dm_benchmark.py``).

The embedded base model (a latent model: PGD on its VAE posterior-mean latents, the masked /
recovered images VAE-decoded; ``--set base_model=DIR`` for another base model folder) is
fine-tuned DreamBooth-style (short full-UNet run with prior preservation)
on member images of its withheld concepts (or of DreamBooth subjects, ``--set source=folder
--set data.path=/work/shared/data/dreambooth``); CGI-DM, the loss gap without inversion and the
masked-input similarity score every image; all choices are made on a validation half, AUC and
TPR@1%/10%FPR are reported on the test half with thresholds calibrated on separate non-members.
Resumable: rerunning with the same run directory reuses every finished stage. Tables:
``RUN_DIR/tables/cgi_dm.{md,json}``; report: ``RUN_DIR/report.html``.

    python benchmarks/cgi_dm.py --smoke --run-dir runs/cgi_bench_smoke
    python benchmarks/cgi_dm.py --run-dir runs/cgi_bench
    python benchmarks/cgi_dm.py --paper-budget --run-dir runs/cgi_bench_paper_budget   # ~1-2 h
"""

from __future__ import annotations

import time

from jaxattrib.eval.runner import benchmark_parser, exit_on_bad_input, prepare_run_dir


def main(argv=None):
    ap = benchmark_parser(__doc__, "runs/cgi_bench", "tiny setting (exercises every stage)")
    ap.add_argument("--paper-budget", action="store_true",
                    help="also try the variant authors_1000x2: the authors' PGD budget, 1000 "
                         "steps of size 2 (~20x a default variant's PGD time)")
    args = ap.parse_args(argv)
    if args.smoke and args.paper_budget:
        ap.error("--smoke and --paper-budget are exclusive")
    from jaxattrib.config import load_config
    from jaxattrib.eval.cgi_benchmark import run_cgi_benchmark
    arg = ":smoke" if args.smoke else ":paper_budget" if args.paper_budget else ""
    cfg = load_config("cgi_dm_benchmark" + arg, args.set)
    run_dir = prepare_run_dir(args, "runs/cgi_bench")
    t0 = time.time()
    with exit_on_bad_input():
        run_cgi_benchmark(cfg, run_dir, progress=not args.no_progress)
    print((run_dir / "tables" / "cgi_dm.md").read_text())
    print(f"wall time {time.time() - t0:.0f} s; report: {run_dir / 'report.html'}")


if __name__ == "__main__":
    main()
