"""Featurization throughput: jaxattrib vs MadryLab's ``trak`` (``traker`` on PyPI), CPU or GPU.

One tiny text-conditioned UNet (``tiny_config``, random weights) is written once in diffusers
format and loaded by both sides (torch: ``UNet2DConditionModel.from_pretrained``; JAX: ours).
Both differentiate the same output function per example — the DSM loss ``(1/K) Σ_t mean((ε_t −
ε_θ(x_t, t, c))²)`` at the same fixed timesteps and noise (``losses.fixed_noise``, handed to
torch) — w.r.t. all parameters, projected to the same ``k``, same microbatch.

Rows (each a fresh spawned process, so its peak RSS is its own):

* ``trak`` / ``trak-rademacher``: ``TRAKer(device='cpu', use_half_precision=False,
  proj_dim=k)`` with traker's ``BasicProjector`` (CPU: Gaussian, regenerated in blocks of 100
  columns per batch; or its Rademacher family); ``@B``: ``B = --proj-batch`` examples per
  ``featurize`` call (P generated once per call: traker's amortized setting).
* ``jax-<kind>``: ``grads.make_feature_fn`` + ``grads.projected_grads`` (the engine of
  ``trak.featurize`` without the store) with a ``gaussian``, ``rademacher``, ``sjlt`` or
  ``factored`` (LoGra, Dense kernels only) projector; ``@B``: ``trak.featurize(...,
  proj_batch=B)``, ``B`` examples per pass over P.
* ``jax-grad``: plain ``jit(vmap(grad))`` with no projection: the floor.

Timing: the first batch (compile / first-call setup) is reported separately as ``warm-up``,
then ``--batches`` batches are timed; ratio columns ``× trak`` (Gaussian trak at ``--batch``)
and ``× same`` (trak of the same family and examples per P generation). Memory: ``peak RSS`` =
``ru_maxrss``; ``Δ RSS`` = it minus the RSS after imports and loading. Both use every core. On a
GPU (``--torch-device cuda``; ``XLA_PYTHON_CLIENT_PREALLOCATE=false``) traker picks its own
projector (``projector`` column), peak GPU memory per row, every timed batch ends in a device
sync. A sanity row compares output value and per-example gradient norm, torch vs JAX. All
details and the results: docs/benchmarks/featurize.md.

    python benchmarks/featurize.py --quick          # seconds-long smoke run
    python benchmarks/featurize.py                  # the run of docs/benchmarks/featurize.md
    python benchmarks/featurize.py --k 4096 --kinds factored,gaussian --no-trak
    XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/featurize.py --torch-device cuda

Requires the ``bench`` extra (``pip install -e .[test,bench]``: ``traker``, torch, diffusers).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

PROJ_SEED = 0
NOISE_SEED = 0


# ------------------------------------------------------------------------------------ set-up


def _unet_config(args):
    from jaxattrib.models.unet import tiny_config
    chans = tuple(int(c) for c in args["channels"].split(","))
    return tiny_config(block_out_channels=chans, cross_attention_dim=args["ctx_dim"],
                       sample_size=args["size"])


def prepare(root: Path, args: dict) -> dict:
    """Writes the shared inputs into ``root``: ``unet/`` (diffusers layout) and ``data.npz``
    (``x0 [n, H, W, C]`` NHWC, ``ctx [n, L, D]``, ``ts [K]``, ``noise [K, H, W, C]``,
    ``alphas_cumprod [T]``). Returns a description (parameter counts)."""
    import jax
    from jaxattrib.attribution.diffusion_trak import AttributionConfig, timesteps_for
    from jaxattrib.attribution.projection import dense_kernel_shapes
    from jaxattrib.diffusion import losses
    from jaxattrib.diffusion.schedule import make_schedule
    from jaxattrib.models import unet

    cfg = _unet_config(args)
    params = unet.init_params(cfg, jax.random.PRNGKey(0))
    unet.save_pretrained(root / "unet", cfg, params)
    rng = np.random.default_rng(0)
    n, s = args["n"], args["size"]
    x0 = rng.uniform(-1, 1, (n, s, s, cfg.in_channels)).astype(np.float32)
    ctx = rng.standard_normal((n, args["ctx_len"], args["ctx_dim"])).astype(np.float32)
    ts = timesteps_for(AttributionConfig(method="trak", num_timesteps=args["K"]), 1000)
    noise = np.stack([np.asarray(losses.fixed_noise(NOISE_SEED, int(t), x0.shape[1:]))
                      for t in ts])
    sched = make_schedule()
    np.savez(root / "data.npz", x0=x0, ctx=ctx, ts=ts, noise=noise,
             alphas_cumprod=np.asarray(sched.alphas_cumprod))
    p = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(params))
    dense = dense_kernel_shapes(params)
    p_dense = sum(a * b for a, b in dense.values())
    dev = jax.devices()[0]
    return {"p": p, "n_dense_layers": len(dense), "p_dense_kernels": p_dense,
            "jax": f"jax {jax.__version__}, backend {jax.default_backend()} ({dev.device_kind})"}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _batches(n: int, b: int):
    return [np.arange(lo, lo + b) for lo in range(0, n - b + 1, b)]


# ------------------------------------------------------------------------------------ torch side


def torch_dsm_output(ts, noise, abar):
    """trak ``AbstractModelOutput`` of the DSM loss ``(1/K) Σ_t mean((ε_t − ε_θ(x_t, t, c))²)``
    of one example, one UNet call with batch ``K`` (the same function as :func:`jax_dsm_out_fn`).
    ``ts [K]`` long, ``noise [K, C, H, W]``, ``abar [K, 1, 1, 1]`` (ᾱ_t), all on the model's
    device. Also used by ``benchmarks/sd_scale.py``."""
    import torch
    from trak.modelout_functions import AbstractModelOutput

    class DSMOutput(AbstractModelOutput):
        def __init__(self):
            super().__init__()

        def get_output(self, model, weights, buffers, x0, ctx):
            K = ts.shape[0]
            x_t = abar.sqrt() * x0.unsqueeze(0) + (1 - abar).sqrt() * noise
            c = ctx.unsqueeze(0).expand(K, *ctx.shape)
            out = torch.func.functional_call(model, (weights, buffers), (x_t, ts, c)).sample
            return ((noise - out) ** 2).mean(dim=(1, 2, 3)).sum() / K

        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            return torch.ones(batch[0].shape[0], 1, device=batch[0].device)

    return DSMOutput()


def _torch_stage(root: Path, args: dict, family: str = "normal") -> dict:
    import torch
    from diffusers import UNet2DConditionModel
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    import warnings
    warnings.filterwarnings("ignore", message=".*batching rule.*")  # vmap loops over SDPA on CPU
    torch.set_num_threads(os.cpu_count())
    dev = args.get("torch_device", "cpu")
    cuda = dev.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()
    d = np.load(root / "data.npz")
    ts = torch.from_numpy(d["ts"]).long().to(dev)
    noise = torch.from_numpy(d["noise"]).permute(0, 3, 1, 2).contiguous().to(dev)  # [K,C,H,W]
    abar = torch.from_numpy(d["alphas_cumprod"]).to(dev)[ts].float().view(-1, 1, 1, 1)
    model = UNet2DConditionModel.from_pretrained(root / "unet").eval().to(dev)

    DSMOutput = lambda: torch_dsm_output(ts, noise, abar)  # noqa: E731

    x0 = torch.from_numpy(d["x0"]).permute(0, 3, 1, 2).contiguous().to(dev)
    ctx = torch.from_numpy(d["ctx"]).to(dev)
    n, b = x0.shape[0], args["batch"]
    base = _rss_mib()
    projector = None
    if family == "rademacher":  # traker's own default on CPU is the normal family
        projector = BasicProjector(grad_dim=sum(p.numel() for p in model.parameters()),
                                   proj_dim=args["k"], seed=PROJ_SEED,
                                   proj_type=ProjectionType.rademacher, device=dev,
                                   dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        traker = TRAKer(model=model, task=DSMOutput(), train_set_size=n, save_dir=tmp,
                        device=dev, use_half_precision=False, proj_dim=args["k"],
                        projector_seed=PROJ_SEED, logging_level=40, projector=projector)
        traker.load_checkpoint(model.state_dict(), model_id=0)
        batches = _batches(n, b)
        t0 = time.perf_counter()
        traker.featurize(batch=(x0[batches[0]], ctx[batches[0]]), inds=batches[0])
        sync()
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        for idx in batches[1:1 + args["batches"]]:
            traker.featurize(batch=(x0[idx], ctx[idx]), inds=idx)
        sync()
        wall = time.perf_counter() - t0
        feats = np.asarray(traker.saver.current_store["grads"][: b])
        proj_name = type(traker.projector).__name__
    out = {"warm": warm, "wall": wall, "examples": b * len(batches[1:1 + args["batches"]]),
           "peak": _peak_mib(), "delta": _peak_mib() - base, "finite": bool(np.isfinite(feats).all()),
           "projector": proj_name,
           "gpu_peak": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}
    # sanity: output values and per-example gradient norms² of the first examples
    m = min(4, n)
    fn = DSMOutput()
    weights = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        vals = [float(fn.get_output(model, weights, buffers, x0[i], ctx[i])) for i in range(m)]
    norms = []
    for i in range(m):
        g = torch.func.grad(fn.get_output, argnums=1)(model, weights, buffers, x0[i], ctx[i])
        norms.append(float(sum((v.detach().double() ** 2).sum().cpu() for v in g.values())))
    out.update(values=vals, grad_sq_norms=norms)
    return out


# ------------------------------------------------------------------------------------ JAX side


def jax_dsm_out_fn(model, sched, ts, noise):
    """``out_fn(params, {'x0' [H,W,C], 'ctx' [L,D]}, key) -> scalar``: the DSM loss of the module
    docstring with fixed ``ts [K]`` and ``noise [K, H, W, C]``, one ``model.apply`` with batch K.
    Also used by ``benchmarks/sd_scale.py``."""
    import jax.numpy as jnp
    from jaxattrib.diffusion.schedule import add_noise

    K = ts.shape[0]

    def out_fn(params, ex, key):
        del key  # fixed timesteps and noise, shared by all examples
        x_t = add_noise(sched, jnp.broadcast_to(ex["x0"], noise.shape), noise, ts)
        ctx = jnp.broadcast_to(ex["ctx"], (K,) + ex["ctx"].shape)
        out = model.apply({"params": params}, x_t, ts, ctx)
        return jnp.sum(jnp.mean((noise - out.astype(noise.dtype)) ** 2, axis=(1, 2, 3))) / K
    return out_fn


def _jax_setup(root: Path, args: dict):
    """``out_fn(params, {'x0','ctx'}, key)``: the DSM loss of the module docstring, one UNet call
    with batch K (as on the torch side). Same function as ``diffusion_trak.make_train_out_fn``
    for ``method='trak'``, which evaluates the K timesteps under an inner ``jax.vmap`` — that
    inner transform makes the factored (interception-based) capture leak tracers, so the
    benchmark writes the K-batch form out for every JAX row."""
    import jax
    import jax.numpy as jnp
    from jaxattrib.diffusion.schedule import make_schedule
    from jaxattrib.models import unet

    cfg, params = unet.from_pretrained(root / "unet")
    model = unet.UNet2DConditionModel(cfg)
    sched = make_schedule()
    d = np.load(root / "data.npz")
    ts, noise = jnp.asarray(d["ts"]), jnp.asarray(d["noise"])
    out_fn = jax_dsm_out_fn(model, sched, ts, noise)
    examples = {"x0": d["x0"], "ctx": d["ctx"]}
    return jax, params, out_fn, examples


def factored_k_in(k: int, k_in: int = 0) -> int:
    """``k_in`` of the factored projector: given, else ``√k`` for a square ``k``, else the power
    of two ``2^⌊log2(k)/2⌋`` (``k = 2048 → 32 × 64``)."""
    if k_in:
        return k_in
    r = math.isqrt(k)
    return r if r * r == k else 2 ** (int(math.log2(k)) // 2)


def _jax_device_peak_mib(jax) -> float | None:
    """Peak bytes in use on JAX's first device (MiB), or None where the backend keeps no such
    statistic (the CPU backend)."""
    dev = jax.local_devices()[0]
    if dev.platform == "cpu":
        return None
    stats = dev.memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None


def _jax_stage(kind: str, root: Path, args: dict) -> dict:
    import jax
    if args.get("prng_impl"):
        jax.config.update("jax_default_prng_impl", args["prng_impl"])
    jax, params, out_fn, examples = _jax_setup(root, args)
    from jaxattrib.attribution import grads as grads_lib
    from jaxattrib.attribution.projection import make_projector

    kind, _, amort = kind.partition("@")
    n, b = examples["x0"].shape[0], args["batch"]
    call = int(amort) if amort else b  # examples per call (= per pass over P)
    key = jax.random.PRNGKey(0)
    batches = _batches(n, call)
    if kind == "grad":
        split = grads_lib.select_params(params, "all")
        pe = jax.jit(grads_lib.per_example_grad_fn(out_fn))

        def run(idx):
            ex = {k: v[idx] for k, v in examples.items()}
            keys = grads_lib.example_keys(key, int(idx[0]), int(idx[0]) + b)
            g = pe(split.trainable, split.frozen, ex, keys)
            jax.block_until_ready(g)
            return g
    else:
        shapes = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
        extra = {"k_in": factored_k_in(args["k"], args["k_in"])} if kind == "factored" else {}
        projector = make_projector(kind, args["k"], PROJ_SEED, shapes, **extra)
        fn = grads_lib.make_feature_fn(out_fn, params, projector,
                                       grad_batch=b if call > b else None)

        def run(idx):
            ex = {k: v[idx] for k, v in examples.items()}
            return grads_lib.projected_grads(fn, ex, key, start=int(idx[0]), microbatch=call)

    base = _rss_mib()
    t0 = time.perf_counter()
    first = run(batches[0])
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for idx in batches[1:1 + args["batches"]]:
        run(idx)
    wall = time.perf_counter() - t0
    out = {"warm": warm, "wall": wall, "examples": call * len(batches[1:1 + args["batches"]]),
           "peak": _peak_mib(), "delta": _peak_mib() - base,
           "finite": bool(all(np.isfinite(np.asarray(a)).all()
                              for a in jax.tree_util.tree_leaves(first))),
           "projector": kind, "gpu_peak": _jax_device_peak_mib(jax)}
    if kind == "grad" and args.get("sanity"):
        m = min(4, n)
        ex = {k: v[:m] for k, v in examples.items()}
        split = grads_lib.select_params(params, "all")
        vals = jax.vmap(out_fn, in_axes=(None, 0, 0))(params, ex, grads_lib.example_keys(key, 0, m))
        g = grads_lib.per_example_grad_fn(out_fn)(split.trainable, split.frozen, ex,
                                                 grads_lib.example_keys(key, 0, m))
        sq = sum(np.sum(np.asarray(a, np.float64).reshape(m, -1) ** 2, 1)
                 for a in jax.tree_util.tree_leaves(g))
        out.update(values=[float(v) for v in vals], grad_sq_norms=[float(v) for v in sq])
    return out


# ------------------------------------------------------------------------------------ driver


def _stage(name: str, root: str, args: dict, queue) -> None:
    try:
        if name.startswith("trak"):
            fam, _, amort = name.removeprefix("trak").removeprefix("-").partition("@")
            targs = dict(args, batch=int(amort)) if amort else args
            res = _torch_stage(Path(root), targs, fam or "normal")
        else:
            res = _jax_stage(name.removeprefix("jax-"), Path(root), args)
        queue.put((name, res, None))
    except Exception:  # noqa: BLE001 — reported in the table, the other rows still run
        queue.put((name, None, traceback.format_exc()))


def run_stage(name: str, root: Path, args: dict):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_stage, args=(name, str(root), args, q))
    p.start()
    res = q.get()
    p.join()
    return res


def same_trak_row(name: str) -> str | None:
    """The trak row of the same projection family and examples per P generation."""
    kind, _, amort = name.removeprefix("jax-").partition("@")
    fam = {"gaussian": "trak", "rademacher": "trak-rademacher"}.get(kind)
    return None if fam is None else fam + (f"@{amort}" if amort else "")


def _fmt_table(rows: list, ref: str | None, same: bool = False) -> list[str]:
    """Markdown table of ``(name, result | None)`` rows; a ``GPU peak MiB`` and a ``projector``
    column appear when any row ran on a GPU."""
    gpu = any(r and r.get("gpu_peak") is not None for _, r in rows)
    head = ["row", "examples/s", "warm-up s", "timed s", "peak RSS MiB", "Δ RSS MiB",
            "× " + (ref or "-")] + (["× same"] if same else []) + (
            ["GPU peak MiB", "projector"] if gpu else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    eps = {n: r["eps"] for n, r in rows if r}
    ref_tp = eps.get(ref)
    for name, r in rows:
        if r is None:
            lines.append(f"| {name} | failed |" + " |" * (len(head) - 2))
            continue
        cells = [name, f"{r['eps']:.2f}", f"{r['warm']:.1f}", f"{r['wall']:.1f}",
                 f"{r['peak']:.0f}", f"{r['delta']:.0f}",
                 f"{r['eps'] / ref_tp:.2f}" if ref_tp else "-"]
        if same:
            other = eps.get(same_trak_row(name))
            cells.append(f"{r['eps'] / other:.2f}" if other else "-")
        if gpu:
            cells += [f"{r['gpu_peak']:.0f}" if r.get("gpu_peak") is not None else "-",
                      r.get("projector", "-")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    ap.add_argument("--k", type=int, default=2048, help="projection dimension (trak vs jax)")
    ap.add_argument("--k-factored", type=int, default=4096,
                    help="k of the factored-vs-plain-backward comparison")
    ap.add_argument("--k-in", type=int, default=0, help="factored k_in (default isqrt(k))")
    ap.add_argument("--batch", type=int, default=16, help="examples per batch (both sides)")
    ap.add_argument("--batches", type=int, default=3, help="timed batches after warm-up")
    ap.add_argument("--K", type=int, default=2, help="timesteps of the DSM output function")
    ap.add_argument("--channels", default="32,64", help="UNet block_out_channels")
    ap.add_argument("--size", type=int, default=8, help="latent side")
    ap.add_argument("--ctx-len", type=int, default=4)
    ap.add_argument("--ctx-dim", type=int, default=32)
    ap.add_argument("--kinds", default="gaussian,rademacher,sjlt,factored",
                    help="jaxattrib projections compared at --k")
    ap.add_argument("--proj-batch", type=int, default=64,
                    help="examples per pass over P of the amortized rows (0: no such rows)")
    ap.add_argument("--amortized-kinds", default="gaussian,rademacher",
                    help="jaxattrib projections also run amortized (rows jax-<kind>@B)")
    ap.add_argument("--trak-rademacher", action=argparse.BooleanOptionalAction, default=True,
                    help="also run traker with its Rademacher BasicProjector")
    ap.add_argument("--no-trak", action="store_true", help="skip the traker rows")
    ap.add_argument("--prng-impl", default="",
                    help="JAX PRNG for the projections, e.g. 'rbg' (default: JAX's threefry)")
    ap.add_argument("--skip-factored-table", action="store_true",
                    help="skip table 2 (factored vs plain backward at --k-factored)")
    ap.add_argument("--torch-device", default="cpu",
                    help="device of the traker rows: cpu or cuda (JAX uses its default backend)")
    ap.add_argument("--dir", help="work folder (default: a temp folder)")
    a = ap.parse_args(argv)
    if a.quick:
        a.batch, a.batches, a.K, a.k, a.k_factored = 4, 1, 1, 256, 256
        a.channels, a.kinds, a.proj_batch = "8,16", "gaussian,factored", 8
        a.amortized_kinds, a.trak_rademacher = "rademacher", False
    if a.proj_batch and a.proj_batch % a.batch:
        raise SystemExit(f"--proj-batch={a.proj_batch} must be a multiple of --batch={a.batch}")
    args = dict(k=a.k, k_in=a.k_in, batch=a.batch, batches=a.batches, K=a.K,
                channels=a.channels, size=a.size, ctx_len=a.ctx_len, ctx_dim=a.ctx_dim,
                n=max(a.batch, a.proj_batch) * (a.batches + 1), prng_impl=a.prng_impl,
                torch_device=a.torch_device)
    if a.channels and min(int(c) for c in a.channels.split(",")) < 8:
        raise SystemExit("--channels: each entry must be >= 8 (GroupNorm groups)")

    sys.stdout.reconfigure(line_buffering=True)
    tmp = tempfile.TemporaryDirectory(prefix="bench_featurize_") if not a.dir else None
    root = Path(a.dir or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    desc = run_stage_prepare(root, args)
    print(f"# UNet block_out_channels=({a.channels}) latent {a.size}x{a.size}x4, context "
          f"{a.ctx_len}x{a.ctx_dim}; p = {desc['p']:,} parameters "
          f"({desc['n_dense_layers']} Dense kernels, {desc['p_dense_kernels']:,} params)")
    print(f"# DSM loss, K={a.K} fixed timesteps and noise; batch={a.batch} (@B rows: B "
          f"examples per pass over P, gradients {a.batch} at a time); timed "
          f"{a.batches} batches after 1 warm-up batch; cpu_count={os.cpu_count()}; "
          f"loadavg={os.getloadavg()[0]:.1f}; JAX PRNG: {a.prng_impl or 'default (threefry)'}")
    print(f"# {desc['jax']}; traker rows on {a.torch_device}")
    failures = []

    def collect(names, k, **over):
        rows = []
        for name in names:
            sargs = dict(args, k=k, **over)
            nm, res, err = run_stage(name, root, sargs)
            if err:
                failures.append((nm, err))
                print(f"## {nm} failed:\n{err}", file=sys.stderr)
            else:
                res["eps"] = res["examples"] / res["wall"]
                gpu = (f", GPU peak {res['gpu_peak']:.0f} MiB"
                       if res.get("gpu_peak") is not None else "")
                print(f"# {nm}: {res['eps']:.2f} examples/s, warm-up {res['warm']:.1f} s{gpu}")
            rows.append((nm, res))
        return rows

    kinds = [k for k in a.kinds.split(",") if k]
    amortized = [k for k in a.amortized_kinds.split(",") if k] if a.proj_batch else []
    traks = []
    if not a.no_trak:
        fams = ["trak"] + (["trak-rademacher"] if a.trak_rademacher else [])
        fam_of = {"trak": "gaussian", "trak-rademacher": "rademacher"}
        traks = fams + [f"{f}@{a.proj_batch}" for f in fams if fam_of[f] in amortized]
    t1 = collect(traks + ["jax-grad"] + [f"jax-{k}" for k in kinds]
                 + [f"jax-{k}@{a.proj_batch}" for k in amortized], a.k, sanity=not a.no_trak)
    # the plain backward does not depend on k: its row is reused in table 2
    print(f"\n## 1. Featurization at k = {a.k} (all {desc['p']:,} parameters; factored: "
          f"Dense kernels only)\n")
    print("\n".join(_fmt_table(t1, "trak" if not a.no_trak else "jax-grad",
                               same=not a.no_trak)))
    res = dict(t1)
    if res.get("trak") and res.get("jax-grad"):
        tv, jv = np.array(res["trak"]["values"]), np.array(res["jax-grad"]["values"])
        tg, jg = np.array(res["trak"]["grad_sq_norms"]), np.array(res["jax-grad"]["grad_sq_norms"])
        print(f"\nsanity (first {len(tv)} examples, torch vs JAX): output rel. diff "
              f"{np.max(np.abs(tv - jv) / np.abs(jv)):.1e}, ‖∇θ f‖² rel. diff "
              f"{np.max(np.abs(tg - jg) / np.abs(jg)):.1e}")
    if not a.skip_factored_table:
        t2 = [("jax-grad", dict(t1).get("jax-grad"))] + collect(["jax-factored"], a.k_factored)
        print(f"\n## 2. Factored projection vs plain per-example backward at k = "
              f"{a.k_factored}\n")
        print("\n".join(_fmt_table(t2, "jax-grad")))
        r2 = dict(t2)
        if r2.get("jax-grad") and r2.get("jax-factored"):
            print(f"\nfactored time / plain backward time = "
                  f"{r2['jax-grad']['eps'] / r2['jax-factored']['eps']:.2f} (target <= 1.5)")
    print(f"\n# loadavg after: {os.getloadavg()[0]:.1f}")
    if tmp is not None:
        tmp.cleanup()
    return 1 if failures else 0


def _prepare_stage(root: str, args: dict, queue) -> None:
    try:
        queue.put((prepare(Path(root), args), None))
    except Exception:  # noqa: BLE001
        queue.put((None, traceback.format_exc()))


def run_stage_prepare(root: Path, args: dict) -> dict:
    """``prepare`` in its own process, so the driver imports neither JAX nor torch."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_prepare_stage, args=(str(root), args, q))
    p.start()
    desc, err = q.get()
    p.join()
    if err:
        raise RuntimeError(f"prepare failed:\n{err}")
    return desc


if __name__ == "__main__":
    sys.exit(main())
