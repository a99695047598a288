"""Peak memory of featurizing a training set that is streamed, not held: N = 2k vs 20k images.

Each row is a fresh spawned process that builds a :class:`~jaxattrib.data.source.SyntheticSource`
of N 64-px images (the synthetic concept set, rendered per example when read; ``per_combination``
raised until N is reached, ``supersample=1`` to keep rendering cheap), loads the tests' tiny random pixel-space pipeline (``tests/tiny.py``
``make_pixel_pipeline``, a 1-layer CLIP; written once to a temp folder) with a 4-level UNet
(8/8/16/16 channels, cross-attention only at the 16×16 level: :data:`UNET`; with attention at
64×64, 4096-token attention maps made a microbatch of 16 need 16 GB and the first attempt was
OOM-killed), and featurizes every training
example with ``diffusion_trak.featurize_examples`` on ``runs.attribute.source_examples`` (the inputs
``jaxattrib attribute`` uses: lazy image rows and lazy prompt states), D-TRAK output, 1 timestep,
``k`` = 64, microbatch 16, store chunks of 64 rows. Progress (chunks) goes to stderr.

Columns: ``peak RSS`` = the process' ``ru_maxrss``; ``setup RSS`` = RSS after imports, model
load and opening the source (before featurization); ``features`` = the ``[N, k]`` float32 result
that ``featurize_examples`` returns (it reads the whole store back, which is O(N·k) by design
and small); ``time`` = wall time of featurization, compilation included; ``ex/s`` = N / time.
With ``--in-memory`` a second row per N first materialises the pixels (``source.to_dataset()``,
what the old ``data/train.npz`` path held) and featurizes those, for contrast.

    nice -n 19 python benchmarks/stream_memory.py                 # N = 2000, 20000
    nice -n 19 python benchmarks/stream_memory.py --sizes 200,2000 --in-memory
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


UNET = dict(block_out_channels=(8, 8, 16, 16),
            down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D",
                              "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"))


def make_pipeline(root: Path, size: int) -> Path:
    """The tests' tiny random pixel-space pipeline (``tests/tiny.py``) at ``size`` px, UNet
    :data:`UNET`."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import make_pixel_pipeline
    return make_pixel_pipeline(root, image_size=size, unet_overrides=UNET)


def _stage(n: int, size: int, pipe_dir: str, in_memory: bool, k: int, microbatch: int,
           queue) -> None:
    import dataclasses

    import jax

    from jaxattrib.attribution import diffusion_trak as dt
    from jaxattrib.train.base_model import data_spec
    from jaxattrib.data.source import MemorySource, SyntheticSource
    from jaxattrib.diffusion.schedule import schedule_from_diffusers_config
    from jaxattrib.models.pipeline import load_pipeline
    from jaxattrib.runs.attribute import source_examples
    spec = data_spec()
    per = -(-n // len(spec.combinations()))
    src = SyntheticSource(dataclasses.replace(spec, size=size, per_combination=per,
                                              supersample=1), seed=0)
    src = src.subset(range(n))
    if in_memory:
        src = MemorySource(src.to_dataset())
    pipe = load_pipeline(pipe_dir)
    sched = schedule_from_diffusers_config(pipe.scheduler_config)
    ac = dt.AttributionConfig(method="dtrak", k=k, params="all", num_timesteps=1,
                              microbatch=microbatch)
    out_fn = dt.make_train_out_fn(pipe.unet_config, sched, ac)
    jax.block_until_ready(pipe.unet_params)
    setup = _rss_mib()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as store:   # tqdm progress (chunks) on stderr
        feats = dt.featurize_examples(out_fn, pipe.unet_params, source_examples(pipe, src),
                                      ac, Path(store) / "f", fingerprint=src.fingerprint(),
                                      step=0, progress=True, chunk_size=64)
    dt_s = time.perf_counter() - t0
    queue.put({"n": n, "mode": "in-memory" if in_memory else "streamed",
               "setup": setup, "peak": _peak_mib(), "features_mib": feats.nbytes / 2**20,
               "time": dt_s, "rate": n / dt_s})


def _result(p, q) -> dict:
    """The row the child puts on ``q``; a child that dies first (e.g. OOM-killed) is an error
    naming its exit code, not a hang."""
    import queue
    while True:
        try:
            return q.get(timeout=5)
        except queue.Empty:
            if not p.is_alive():
                raise SystemExit(f"stream_memory: the N-row process died (exit code "
                                 f"{p.exitcode}; -9 = killed, e.g. out of memory)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="2000,20000", help="comma-separated N")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--microbatch", type=int, default=16)
    ap.add_argument("--in-memory", action="store_true", help="also the materialised rows")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    ctx = mp.get_context("spawn")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pipe_dir = make_pipeline(Path(tmp), args.size)
        for n in sizes:
            for in_memory in ((False, True) if args.in_memory else (False,)):
                q = ctx.Queue()
                p = ctx.Process(target=_stage, args=(n, args.size, str(pipe_dir), in_memory,
                                                     args.k, args.microbatch, q))
                p.start()
                row = _result(p, q)
                p.join()
                rows.append(row)
                print(f"  done: {row}", flush=True)
    print(f"\n| N | {args.size}-px rows | setup RSS MiB | peak RSS MiB | features MiB | "
          f"time s | ex/s |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['n']} | {r['mode']} | {r['setup']:.0f} | {r['peak']:.0f} | "
              f"{r['features_mib']:.1f} | {r['time']:.1f} | {r['rate']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
