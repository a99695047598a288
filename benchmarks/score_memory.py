"""Peak memory of blocked TRAK scoring (not a test).

Default size: 200k training × 20k query examples, k = 2048 (the dense float32 score matrix
would be 16 GB; the train features 1.6 GB, kept in a chunked store on disk). ``--small`` runs
20k × 2k, k = 512 in well under a minute and adds a dense-product row for comparison.

Each stage runs in a fresh (spawned) process; the table reports its wall time, its peak RSS
above the process' RSS after imports (``resource.getrusage``) and the peak of Python/numpy
allocations (``tracemalloc``).

    python benchmarks/score_memory.py --small
    python benchmarks/score_memory.py --with-store   # also writes the n×m score store to disk
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _stage(name: str, root: str, args: dict, queue) -> None:
    from jaxattrib.attribution import trak
    from jaxattrib.attribution.store import ChunkedArray

    root = Path(root)
    n, m, k = args["n"], args["m"], args["k"]
    train = ChunkedArray.open(root / "train", n_rows=n, n_cols=k, chunk_size=args["chunk"])
    queries = ChunkedArray.open(root / "queries", n_rows=m, n_cols=k, chunk_size=args["chunk"])
    base = _rss_mib()
    tracemalloc.start()
    t0 = time.perf_counter()
    if name == "kernel_inverse":
        kinv = trak.trak_kernel_inverse(train, args["lam"])
        np.save(root / "kinv.npy", kinv)
    else:
        kinv = np.load(root / "kinv.npy")
        phi_q = queries.read_all()
        if name == "topk":
            vals, idx = trak.topk_scores(phi_q, train, kinv, args["topk"],
                                         block_train=args["block_train"],
                                         block_query=args["block_query"])
            assert idx.shape == (m, args["topk"])
        elif name == "score_to_store":
            out = ChunkedArray.open(root / "scores", n_rows=n, n_cols=m,
                                    chunk_size=args["block_train"])
            trak.score_to_store(phi_q, train, kinv, out, block_query=args["block_query"])
        elif name == "dense_reference":
            s = train.read_all() @ (phi_q.astype(np.float64) @ kinv).astype(np.float32).T
            assert s.shape == (n, m)
        else:
            raise ValueError(name)
    wall = time.perf_counter() - t0
    _, traced_peak = tracemalloc.get_traced_memory()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB → MiB on Linux
    queue.put((name, wall, peak - base, traced_peak / 2**20))


def _write_random(store, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for i in store.missing_chunks():
        a, b = store.chunk_range(i)
        store.write_chunk(i, rng.standard_normal((b - a, store.n_cols), np.float32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="20k × 2k, k = 512, plus dense row")
    ap.add_argument("--with-store", action="store_true", help="also write the score store")
    ap.add_argument("--n", type=int)
    ap.add_argument("--m", type=int)
    ap.add_argument("--k", type=int)
    ap.add_argument("--block-train", type=int, default=2048)
    ap.add_argument("--block-query", type=int, default=1024)
    ap.add_argument("--dir", help="work folder (default: a temp folder, removed afterwards)")
    a = ap.parse_args()
    n, m, k = (20_000, 2_000, 512) if a.small else (200_000, 20_000, 2048)
    args = dict(n=a.n or n, m=a.m or m, k=a.k or k, chunk=8192, lam=1e-2, topk=10,
                block_train=a.block_train, block_query=a.block_query)

    from jaxattrib.attribution.store import ChunkedArray

    root = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="score_memory_"))
    try:
        _write_random(ChunkedArray.open(root / "train", n_rows=args["n"], n_cols=args["k"],
                                        chunk_size=args["chunk"]), 0)
        _write_random(ChunkedArray.open(root / "queries", n_rows=args["m"], n_cols=args["k"],
                                        chunk_size=args["chunk"]), 1)
        stages = ["kernel_inverse", "topk"]
        if a.with_store or a.small:
            stages.append("score_to_store")
        if args["n"] * args["m"] * 4 <= 2**31:
            stages.append("dense_reference")
        ctx = mp.get_context("spawn")
        rows = []
        for name in stages:
            q = ctx.Queue()
            p = ctx.Process(target=_stage, args=(name, str(root), args, q))
            p.start()
            rows.append(q.get())
            p.join()
        dense_mib = args["n"] * args["m"] * 4 / 2**20
        feat_mib = args["n"] * args["k"] * 4 / 2**20
        print(f"n_train={args['n']}  n_query={args['m']}  k={args['k']}  "
              f"block_train={args['block_train']}  block_query={args['block_query']}  "
              f"(dense scores {dense_mib:,.0f} MiB, train features {feat_mib:,.0f} MiB)")
        print(f"{'stage':<18}{'wall s':>10}{'peak RSS MiB':>16}{'tracemalloc MiB':>18}")
        for name, wall, rss, traced in rows:
            print(f"{name:<18}{wall:>10.1f}{rss:>16.0f}{traced:>18.0f}")
    finally:
        if not a.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
