"""Stable Diffusion at its real size: LoRA fine-tuning, D-TRAK featurization and their limits,
jaxattrib vs diffusers + PyTorch (+ peft) and MadryLab's trak, on the CPU or a GPU.

The UNet has the exact SD-1.5 configuration (``--model sd15``: ``UNetConfig()``, 64×64×4
latents = 512 px, 768-d context) or SD-2.1 768 px (``--model sd21``: v-prediction, 1024-d
context, 96×96×4 latents), with random weights (throughput depends on shapes, not knowledge:
nothing is downloaded). ``prepare`` builds them once with ``diffusers.UNet2DConditionModel``
(``torch.manual_seed(0)``) as a diffusers folder that every row loads, so both frameworks run
the same network and weights; text context ``77 × D``, latents random normal.

Rows (each a fresh spawned process; ``--rows`` picks them):

(a) one LoRA AdamW update of ``--ft-batch`` examples, rank 4 on ``attn1/attn2 to_q/to_k/to_v/
    to_out.0``: ``ft-jax-{fp32,bf16}[-remat]`` (the trainer's ``make_diffusion_loss``,
    ``precision`` / ``remat`` of docs/precision.md) vs ``ft-torch-bf16`` (peft ``add_adapter``,
    diffusers' ``train_text_to_image_lora.py`` recipe; ``ft-torch-fp32`` optional);
(b) D-TRAK featurization of the ``attn2`` parameters, DSM output at ``--K`` fixed timesteps,
    projected to ``--k``: ``feat-jax-{rademacher,sjlt,factored}`` (``grads.params_feature_fn``,
    the engine of ``jaxattrib attribute``) vs ``feat-trak`` (``trak.TRAKer``, same parameters
    and output function; the ``projector`` column says what ran);
(c) its limits: ``limit-jax-grad`` (plain ``jit(vmap(grad))``, no projection) and
    ``limit-jax-fwd`` (one forward); featurization rows are reported as multiples (``÷grad``,
    ``÷fwd``).

Timing: compile time is EXCLUDED from examples/s (= batch / median call time; the ``warm-up
s`` column holds lower + compile, or torch's first call); ``--repeats R`` interleaves R rounds
of fresh processes, median per row. Peak memory: the process' VmHWM from after the weights are
loaded (GPU: the device peak); ``--max-rss-gib`` stops a row past it. FLOPs: XLA's
``cost_analysis()`` → TFLOP/s and, on a GPU, MFU (bf16 dense peak, H100/H200 SXM 989 TFLOP/s).
Every detail of rows and columns, and the results: docs/benchmarks/sd_scale.md.

    python benchmarks/sd_scale.py --smoke                     # tiny shape, < 2 min on a CPU
    python benchmarks/sd_scale.py --rows ft-jax-fp32 --iters 2   # one row at SD-1.5 shape
    XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/sd_scale.py --torch-device cuda
    python benchmarks/sd_scale.py --model sd21 --rows ft-jax-bf16,ft-torch-bf16

The ``bench`` extra holds the peers (``pip install -e .[test,bench]``: torch, diffusers, peft,
traker); a row whose package is missing is reported as skipped, the JAX rows still run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from featurize import _jax_device_peak_mib, factored_k_in, jax_dsm_out_fn  # noqa: E402
from sd_scale_common import (ALL_ROWS, ATTENTION_TARGET, FEAT_PARAMS,  # noqa: E402,F401
                             OPTIONAL_ROWS, PEAKS, PROJ_SEED, RANK, TORCH_PKGS, _hwm_mib,
                             _reset_peak, _time_jax, fixed_timesteps, make_inputs, prepare,
                             prediction_type, unet_config)
from sd_scale_torch import _torch_feat, _torch_ft  # noqa: E402


# ------------------------------------------------------------------------------------ JAX rows


def _jax_load(root: Path, args: dict):
    import jax
    from jaxattrib.models import unet
    cfg, params = unet.from_pretrained(root / "unet")
    args["_load_peak"] = _reset_peak()
    return jax, cfg, params


def _jax_ft(row: str, root: Path, args: dict) -> dict:
    """One LoRA AdamW update of ``ft_batch`` examples (see the module docstring)."""
    jax, cfg, params = _jax_load(root, args)
    import jax.numpy as jnp
    import optax
    from jaxattrib.diffusion.schedule import make_schedule
    from jaxattrib.models import lora as lora_lib
    from jaxattrib.train.diffusion_task import make_diffusion_loss
    from jaxattrib.train.finetune import TrainConfig, make_optimizer

    precision = "bfloat16" if "bf16" in row else "float32"
    remat = "full" if row.endswith("remat") else "none"
    sched = make_schedule(prediction_type=prediction_type(args))
    # the trainer's latent-space loss (no VAE / text encoder: the batch holds latents + context)
    loss_fn = make_diffusion_loss(cfg, None, sched, None, precision=precision, remat=remat)
    tc = TrainConfig(mode="lora", lora_rank=RANK, lora_alpha=float(RANK), batch_size=args["ft_batch"],
                     lora_target=ATTENTION_TARGET, precision=precision, remat=remat)
    lora = lora_lib.lora_init(params, jax.random.PRNGKey(1), RANK, target=ATTENTION_TARGET)
    opt = make_optimizer(tc)
    b = args["ft_batch"]
    d = make_inputs(cfg, args, b)
    data = {"images": jnp.asarray(d["x0"]), "encoder_hidden_states": jnp.asarray(d["ctx"])}

    def loss(lora, base, batch, key):
        unet = lora_lib.lora_merge(base, lora, tc.lora_alpha)
        return jnp.mean(loss_fn({"unet": unet}, batch, key))

    def step(state, base, batch, key):
        lora, opt_state = state
        val, g = jax.value_and_grad(loss)(lora, base, batch, key)
        upd, opt_state = opt.update(g, opt_state, lora)
        return (optax.apply_updates(lora, upd), opt_state), val

    jitted = jax.jit(step, donate_argnums=(0,))
    state = (lora, opt.init(lora))
    key = jax.random.PRNGKey(2)
    res = _time_jax(jitted, lambda: (state, params, data, key), args["iters"], donate_state=True)
    n = lora_lib.lora_param_count(lora)
    res.update(examples=b, gpu_peak=_jax_device_peak_mib(jax), projector="-", n_trained=n,
               note=f"{n:,} LoRA params")
    return res


def _jax_feat(row: str, root: Path, args: dict) -> dict:
    """Featurization (b) and its limits (c) on the attn2 parameters."""
    jax, cfg, params = _jax_load(root, args)
    import jax.numpy as jnp
    from jaxattrib.attribution import grads as grads_lib
    from jaxattrib.attribution.projection import make_projector
    from jaxattrib.diffusion.schedule import make_schedule
    from jaxattrib.models.unet import UNet2DConditionModel

    model = UNet2DConditionModel(cfg, remat=args.get("feat_remat", False))
    b = args["feat_batch"]
    data = {k: jnp.asarray(v) for k, v in make_inputs(cfg, args, b).items()}
    ts, noise = fixed_timesteps(args, data["x0"].shape[1:])
    out_fn = jax_dsm_out_fn(model, make_schedule(), jnp.asarray(ts), jnp.asarray(noise))
    keys = grads_lib.example_keys(jax.random.PRNGKey(0), 0, b)
    split = grads_lib.select_params(params, FEAT_PARAMS)
    kind = row.rsplit("-", 1)[1]
    proj = kind
    if kind == "fwd":
        jitted = jax.jit(jax.vmap(out_fn, in_axes=(None, 0, 0)))
        args_fn = lambda: (params, data, keys)  # noqa: E731
    elif kind == "grad":
        jitted = jax.jit(grads_lib.per_example_grad_fn(out_fn))
        args_fn = lambda: (split.trainable, split.frozen, data, keys)  # noqa: E731
    elif kind == "factored":
        shapes = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
        projector = make_projector("factored", args["k"], PROJ_SEED, shapes,
                                   k_in=factored_k_in(args["k"]), layer_filter=FEAT_PARAMS)
        jitted = grads_lib.params_feature_fn(out_fn, projector).jitted
        args_fn = lambda: (params, data, keys)  # noqa: E731
        proj = f"factored {projector.k_in}×{projector.k_out}, {len(projector.layers)} layers"
    else:
        shapes = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                        split.trainable)
        projector = make_projector(kind, args["k"], PROJ_SEED, shapes)
        jitted = grads_lib.params_feature_fn(out_fn, projector, spec=FEAT_PARAMS).jitted
        args_fn = lambda: (split.trainable, split.frozen, data, keys)  # noqa: E731
    res = _time_jax(jitted, args_fn, args["iters"])
    res.update(examples=b, gpu_peak=_jax_device_peak_mib(jax), projector=proj,
               n_trained=sum(int(np.prod(a.shape))
                             for a in jax.tree_util.tree_leaves(split.trainable)))
    return res


def run_row(row: str, root: Path, args: dict) -> dict:
    if row.startswith("ft-jax"):
        return _jax_ft(row, root, args)
    if row.startswith("ft-torch"):
        return _torch_ft(row, root, args)
    if row == "feat-trak":
        return _torch_feat(row, root, args)
    if row.startswith(("feat-jax", "limit-jax")):
        return _jax_feat(row, root, args)
    raise ValueError(f"unknown row {row!r}; rows: {ALL_ROWS + OPTIONAL_ROWS}")


# ------------------------------------------------------------------------------------ driver


def _child(row: str, root: str, args: dict, queue) -> None:
    try:
        res = run_row(row, Path(root), args)
        res["peak"], res["load_peak"] = _hwm_mib(), args.get("_load_peak")
        queue.put((res, None))
    except Exception:  # noqa: BLE001 — reported in the table, the other rows still run
        queue.put((None, traceback.format_exc()))


def _rss_gib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:
        return 0.0


def run_stage(row: str, root: Path, args: dict, timeout_s: float, max_rss_gib: float):
    """``row`` in a fresh spawned process; ``(result, None)`` or ``(None, reason)``. The
    process is killed past ``timeout_s`` seconds or ``max_rss_gib`` GiB of RSS."""
    import queue as queue_mod
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(row, str(root), args, q))
    p.start()
    t0, peak = time.monotonic(), 0.0
    while True:
        try:
            res, err = q.get(timeout=0.5)
            p.join()
            return res, (err.strip().splitlines()[-1] if err else None), err
        except queue_mod.Empty:
            pass
        peak = max(peak, _rss_gib(p.pid))
        why = None
        if not p.is_alive():
            why = f"process died (exit {p.exitcode}; RSS seen {peak:.1f} GiB)"
        elif peak > max_rss_gib:
            why = f"killed: RSS {peak:.1f} GiB > --max-rss-gib {max_rss_gib:g}"
        elif time.monotonic() - t0 > timeout_s:
            why = f"killed: over --row-timeout {timeout_s:g} s"
        if why:
            if p.is_alive():
                p.kill()
            p.join()
            return None, why, None


def run_inline(row: str, root: Path, args: dict):
    """``row`` in this process (``--in-process``): same return as :func:`run_stage`."""
    try:
        res = run_row(row, root, dict(args))
        res["peak"], res["load_peak"] = _hwm_mib(), None  # includes what earlier rows still hold
        return res, None, None
    except Exception:  # noqa: BLE001
        err = traceback.format_exc()
        return None, err.strip().splitlines()[-1], err


def missing_packages(row: str) -> list[str]:
    import importlib.util
    return [m for m in TORCH_PKGS.get(row, ()) if importlib.util.find_spec(m) is None]


def peer_of(row: str) -> str | None:
    if row.startswith("ft-jax"):
        return "ft-torch-bf16"
    if row.startswith("feat-jax"):
        return "feat-trak"
    return None


def summarize(results: dict) -> dict:
    """Per row: median examples/s over repeats (each repeat's median call), largest peak."""
    out = {}
    for row, reps in results.items():
        ok = [r for r in reps if r.get("times")]
        if not ok:
            out[row] = {"error": next((r.get("error") for r in reps if r.get("error")),
                                      "no result")}
            continue
        eps = [r["examples"] / statistics.median(r["times"]) for r in ok]
        s = dict(ok[0])
        peaks = [r.get("gpu_peak") if r.get("gpu_peak") is not None else r["peak"] for r in ok]
        s.update(eps=statistics.median(eps), eps_all=eps, peak_mem=max(peaks),
                 mem_kind="GPU" if ok[0].get("gpu_peak") is not None else "RSS",
                 warm=statistics.median(r["warm"] for r in ok),
                 finite=all(r["finite"] for r in ok), loads=[r.get("load") for r in ok])
        out[row] = s
    return out


def peak_tflops(device_kind: str) -> float | None:
    for name, tf in PEAKS:
        if name.lower() in device_kind.lower():
            return tf
    return None


def format_table(summary: dict, device_kind: str, gpu: bool) -> list[str]:
    peak = peak_tflops(device_kind) if gpu else None
    head = ["row", "examples/s", "s/example", "peak mem MiB", "× peer", "÷grad", "÷fwd",
            "TFLOP/s", "MFU", "warm-up s", "load", "projector / note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    eps = {r: s["eps"] for r, s in summary.items() if "eps" in s}
    for row, s in summary.items():
        if "eps" not in s:
            lines.append(f"| {row} | not measured: {s['error']} |" + " |" * (len(head) - 2))
            continue
        peer = peer_of(row)
        ratio = f"{s['eps'] / eps[peer]:.2f} ({peer})" if peer in eps else "-"
        lim = []
        for ref in ("limit-jax-grad", "limit-jax-fwd"):
            lim.append(f"{eps[ref] / s['eps']:.2f}" if row.startswith("feat") and ref in eps
                       else "-")
        tf = s["flops"] / s["examples"] * s["eps"] / 1e12 if s.get("flops") else None
        mfu = f"{100 * tf / peak:.1f} %" if tf and peak else "-"
        note = s.get("projector", "-")
        if s.get("note"):
            note = s["note"] if note == "-" else f"{note}; {s['note']}"
        if not s["finite"]:
            note += "; NON-FINITE OUTPUT"
        load = "/".join(f"{x:.1f}" for x in s["loads"] if x is not None) or "-"
        lines.append("| " + " | ".join([
            row, f"{s['eps']:.4g}", f"{1 / s['eps']:.3g}", f"{s['peak_mem']:.0f} {s['mem_kind']}",
            ratio, *lim, f"{tf:.3g}" if tf else "-", mfu, f"{s['warm']:.1f}", load, note]) + " |")
    return lines


def _versions(torch_device: str) -> str:
    parts = []
    try:
        import jax
        parts.append(f"jax {jax.__version__} ({jax.default_backend()}: "
                     f"{jax.devices()[0].device_kind})")
    except Exception as e:  # noqa: BLE001
        parts.append(f"jax: {e}")
    for m in ("torch", "diffusers", "peft", "trak"):
        try:
            mod = __import__(m)
            parts.append(f"{m} {getattr(mod, '__version__', '?')}")
        except ImportError:
            parts.append(f"{m} missing")
    return ", ".join(parts)


def _device_kind() -> tuple[str, bool]:
    """Asked in a child process so the driver holds no device memory."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_probe)


def _probe():
    import jax
    dev = jax.devices()[0]
    return f"{dev.device_kind}", dev.platform != "cpu"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true",
                    help="the same code at a tiny shape (model tiny, K 2, k 64, 1 iteration)")
    ap.add_argument("--model", default="sd15", choices=["sd15", "sd21", "tiny"])
    ap.add_argument("--rows", default=",".join(ALL_ROWS),
                    help=f"comma list; also {','.join(OPTIONAL_ROWS)}")
    ap.add_argument("--ft-batch", type=int, default=1, help="fine-tune global batch")
    ap.add_argument("--feat-batch", type=int, default=1, help="examples per featurize call")
    ap.add_argument("--K", type=int, default=10, help="timesteps of the output function")
    ap.add_argument("--k", type=int, default=4096, help="projection dimension")
    ap.add_argument("--ctx-len", type=int, default=77)
    ap.add_argument("--iters", type=int, default=3, help="timed calls per row process (>= 1)")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved rounds over the rows")
    ap.add_argument("--feat-remat", action="store_true",
                    help="remat per UNet block in the featurization / limit rows")
    ap.add_argument("--torch-device", default="cpu", help="cpu or cuda (the peers' device)")
    ap.add_argument("--row-timeout", type=float, default=3600, help="seconds per row process")
    ap.add_argument("--max-rss-gib", type=float, default=1e9, help="kill a row past this RSS")
    ap.add_argument("--in-process", action="store_true",
                    help="run the rows in this process (no spawn per row; the memory column is "
                         "then the running peak of the one process) — what --smoke does")
    ap.add_argument("--dir", help="work folder holding unet/ (default: a temp folder)")
    ap.add_argument("--out", help="also write the table and raw results (.md and .json)")
    a = ap.parse_args(argv)
    # [measured] on the shared 2-core CPU (load ~17, 2026-12-07) a tiny diffusers UNet's
    # forward + backward took 6-27 s with torch's 2 OpenMP threads spin-waiting (libgomp's
    # default) and 0.03-0.8 s with OMP_WAIT_POLICY=passive or 1 thread: set before torch loads
    # (children inherit it), so the torch peers are not measured in that pathology.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if a.smoke:
        a.model, a.K, a.k, a.ctx_len, a.in_process = "tiny", 2, 64, 8, True
        a.iters = min(a.iters, 2)
        # XLA:CPU's LLVM optimisation is most of a tiny program's compile time; the smoke run
        # checks the code, not its speed (set before JAX is imported: rows run in-process)
        if "jax" not in sys.modules and "xla_backend_optimization_level" not in os.environ.get(
                "XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                       " --xla_backend_optimization_level=0").strip()
    if a.iters < 1:
        raise SystemExit("--iters must be >= 1")
    rows = [r for r in a.rows.split(",") if r]
    bad = [r for r in rows if r not in ALL_ROWS + OPTIONAL_ROWS]
    if bad:
        raise SystemExit(f"--rows: unknown {bad}; expected some of {ALL_ROWS + OPTIONAL_ROWS}")
    args = dict(model=a.model, ft_batch=a.ft_batch, feat_batch=a.feat_batch, K=a.K, k=a.k,
                ctx_len=a.ctx_len, iters=a.iters, feat_remat=a.feat_remat,
                torch_device=a.torch_device)
    sys.stdout.reconfigure(line_buffering=True)
    tmp = tempfile.TemporaryDirectory(prefix="sd_scale_") if not a.dir else None
    root = Path(a.dir or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if a.in_process:
        desc, (kind, gpu) = prepare(root, args), _probe()
    else:
        with mp.get_context("spawn").Pool(1) as pool:  # torch / JAX memory stays out of the driver
            desc = pool.apply(prepare, (root, args))
        kind, gpu = _device_kind()
    print(f"# sd_scale {a.model}: p = {desc['p']:,} UNet parameters, attn2 = "
          f"{desc['p_attn2']:,}, LoRA on {desc['lora_layers']} kernels (rank {RANK}); latents "
          f"{unet_config(args).sample_size}²×4, context {a.ctx_len}×"
          f"{unet_config(args).cross_attention_dim}; ft batch {a.ft_batch}, featurize batch "
          f"{a.feat_batch}, K = {a.K}, k = {a.k}; {a.iters} timed calls per process, "
          f"{a.repeats} interleaved round(s); compile time excluded (warm-up column); "
          f"set-up (weights, shapes) {time.perf_counter() - t0:.0f} s")
    print(f"# {_versions(a.torch_device)}; device {kind}; peers on {a.torch_device}; "
          f"cpu_count {os.cpu_count()}")
    results: dict[str, list] = {r: [] for r in rows}
    failures = 0
    for rep in range(a.repeats):
        for row in rows:
            miss = missing_packages(row)
            if miss:
                results[row].append({"error": f"skipped: {', '.join(miss)} not installed"})
                print(f"# {row}: skipped ({', '.join(miss)} not installed)")
                continue
            load = os.getloadavg()[0]
            t1 = time.perf_counter()
            if a.in_process:
                res, why, tb = run_inline(row, root, args)
            else:
                res, why, tb = run_stage(row, root, args, a.row_timeout, a.max_rss_gib)
            if res is None:
                failures += 1
                results[row].append({"error": why})
                print(f"# {row} (round {rep + 1}): not measured: {why}")
                if tb:
                    print(tb, file=sys.stderr)
                continue
            res["load"] = max(load, os.getloadavg()[0])
            results[row].append(res)
            med = statistics.median(res["times"])
            print(f"# {row} (round {rep + 1}): {res['examples'] / med:.4g} examples/s "
                  f"(median of {len(res['times'])} calls: "
                  f"{', '.join(f'{t:.2f}' for t in res['times'])} s), warm-up {res['warm']:.1f} s, "
                  f"peak RSS {res['peak']:.0f} MiB, load {res['load']:.1f}, "
                  f"{time.perf_counter() - t1:.0f} s in all")
    summary = summarize(results)
    table = format_table(summary, kind, gpu)
    print("\n" + "\n".join(table))
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text("\n".join(table) + "\n")
        out.with_suffix(".json").write_text(json.dumps(
            {"args": args, "desc": desc, "device": kind, "results": results}, indent=1,
            default=str))
    if tmp is not None:
        tmp.cleanup()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
