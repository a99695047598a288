"""Shapes, inputs and measuring helpers shared by ``sd_scale.py`` and ``sd_scale_torch.py``.

SD-1.5 / SD-2.1-shaped UNet configs and inputs (random, fixed seeds), the row names, and the
timers / peak-memory readers (see ``sd_scale.py`` for what each row measures).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from featurize import _peak_mib


ATTENTION_TARGET = r"(^|/)attn[12]/(to_q|to_k|to_v|to_out(_0|/0)?)/kernel$"  # lora's UNet target
PEFT_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the same layers in diffusers' names
FEAT_PARAMS = "attn2"
RANK = 4
NOISE_SEED = 0
PROJ_SEED = 0
ALL_ROWS = ("ft-jax-fp32", "ft-jax-fp32-remat", "ft-jax-bf16", "ft-jax-bf16-remat",
            "ft-torch-bf16", "feat-jax-rademacher", "feat-jax-sjlt", "feat-jax-factored",
            "feat-trak", "limit-jax-grad", "limit-jax-fwd")
OPTIONAL_ROWS = ("ft-torch-fp32",)
# bf16 dense peak (TFLOP/s) by device kind substring; PCIe H100 first (its name contains H100)
PEAKS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0))
TORCH_PKGS = {"ft-torch-bf16": ("torch", "diffusers", "peft"),
              "ft-torch-fp32": ("torch", "diffusers", "peft"),
              "feat-trak": ("torch", "diffusers", "trak")}


# ------------------------------------------------------------------------------------ shapes


def unet_config(args: dict):
    """The ``UNetConfig`` of ``args['model']``: 'sd15', 'sd21' or 'tiny' (the smoke shape)."""
    from jaxattrib.models.unet import UNetConfig, tiny_config
    if args["model"] == "sd15":
        return UNetConfig()  # the defaults are SD-1.5's config.json
    if args["model"] == "sd21":
        return UNetConfig(sample_size=96, attention_head_dim=(5, 10, 20, 20),
                          cross_attention_dim=1024, use_linear_projection=True,
                          upcast_attention=True)
    if args["model"] == "tiny":
        # one cross-attention block: the same code paths, a few seconds of XLA compilation each
        return tiny_config(block_out_channels=(16,), cross_attention_dim=16, sample_size=8)
    raise ValueError(f"--model {args['model']!r}: expected sd15, sd21 or tiny")


def prediction_type(args: dict) -> str:
    return "v_prediction" if args["model"] == "sd21" else "epsilon"


def make_inputs(cfg, args: dict, n: int) -> dict:
    """``x0 [n, S, S, 4]`` latents and ``ctx [n, L, D]`` text states (NHWC; numpy float32)."""
    rng = np.random.default_rng(0)
    s = cfg.sample_size
    d = cfg.cross_attention_dim
    return {"x0": rng.standard_normal((n, s, s, cfg.in_channels)).astype(np.float32),
            "ctx": rng.standard_normal((n, args["ctx_len"], d)).astype(np.float32)}


def fixed_timesteps(args: dict, x_shape) -> tuple[np.ndarray, np.ndarray]:
    """D-TRAK's ``K`` uniform timesteps and their fixed noise ``[K, H, W, C]`` (numpy)."""
    from jaxattrib.attribution.diffusion_trak import AttributionConfig, timesteps_for
    from jaxattrib.diffusion import losses
    ts = timesteps_for(AttributionConfig(method="trak", num_timesteps=args["K"]), 1000)
    noise = np.stack([np.asarray(losses.fixed_noise(NOISE_SEED, int(t), x_shape)) for t in ts])
    return ts, noise


def prepare(root: Path, args: dict) -> dict:
    """Writes ``root/unet`` (diffusers layout, random weights) once; returns parameter counts."""
    cfg = unet_config(args)
    folder = root / "unet"
    if not (folder / "config.json").exists():
        try:
            import torch
            from diffusers import UNet2DConditionModel
            torch.manual_seed(0)
            model = UNet2DConditionModel.from_config(cfg.to_diffusers())
            model.save_pretrained(folder)
            del model
        except ImportError:  # no torch here: the JAX rows still run on JAX-initialised weights
            import jax
            from jaxattrib.models import unet
            unet.save_pretrained(folder, cfg, unet.init_params(cfg, jax.random.PRNGKey(0)))
    from jaxattrib.models import unet
    shapes = unet.param_shapes(cfg)
    import jax
    from jaxattrib.attribution.grads import select_params
    from jaxattrib.models.lora import lora_targets
    leaves = jax.tree_util.tree_leaves(shapes)
    attn2 = jax.tree_util.tree_leaves(select_params(shapes, FEAT_PARAMS).trainable)
    lora_layers = lora_targets(shapes, ATTENTION_TARGET)
    return {"p": sum(int(np.prod(a.shape)) for a in leaves),
            "p_attn2": sum(int(np.prod(a.shape)) for a in attn2),
            "lora_layers": len(lora_layers)}


# ------------------------------------------------------------------------------------ measuring


def _hwm_mib() -> float:
    """The process' peak RSS since the last :func:`_reset_peak` (``VmHWM``), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return _peak_mib()


def _reset_peak() -> float:
    """Frees garbage and restarts the peak-RSS count (``/proc/self/clear_refs`` 5), so that a
    row's peak is that of its computation with the weights resident, not of the file loader's
    transient copies. Returns the peak so far (the loading peak), MiB."""
    import gc
    gc.collect()
    before = _hwm_mib()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return before


def _block(x):
    import jax
    return jax.block_until_ready(x)


def _flops(compiled) -> float | None:
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 — some backends keep no cost model
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    f = (ca or {}).get("flops")
    return float(f) if f and f > 0 else None


def _time_jax(jitted, args_fn, iters: int, donate_state: bool = False) -> dict:
    """Compiles ``jitted`` for ``args_fn()`` (timed: ``warm``) and times ``iters`` calls of the
    compiled executable (no call is left out: compilation is already done)."""
    t0 = time.perf_counter()
    args = args_fn()
    compiled = jitted.lower(*args).compile()
    warm = time.perf_counter() - t0
    times, out = [], None
    for _ in range(iters):
        if donate_state and out is not None:  # the step donates its state: feed it back
            args = (out[0],) + tuple(args[1:])
        t0 = time.perf_counter()
        out = compiled(*args)
        _block(out)
        times.append(time.perf_counter() - t0)
    import jax
    finite = all(bool(np.isfinite(np.asarray(a, np.float32)).all())
                 for a in jax.tree_util.tree_leaves(out[1] if donate_state else out))
    return {"warm": warm, "times": times, "flops": _flops(compiled), "finite": finite}
