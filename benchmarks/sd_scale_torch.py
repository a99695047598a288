"""The PyTorch rows of ``sd_scale.py``: a diffusers + peft LoRA fine-tuning step and MadryLab
trak's featurization, on the same weights folder as the JAX rows (see ``sd_scale.py``).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from featurize import torch_dsm_output
from sd_scale_common import (PEFT_TARGETS, RANK, PROJ_SEED, unet_config, prediction_type,
                             make_inputs, fixed_timesteps, _reset_peak)


# ------------------------------------------------------------------------------------ torch rows


def _torch_env(args: dict):
    import torch
    torch.set_num_threads(os.cpu_count())
    dev = args["torch_device"]
    cuda = dev.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()
    return torch, dev, cuda, sync


def _torch_ft(row: str, root: Path, args: dict) -> dict:
    """diffusers + peft LoRA step (see the module docstring)."""
    torch, dev, cuda, sync = _torch_env(args)
    import warnings

    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.utils import logging as dlogging
    from peft import LoraConfig

    dlogging.set_verbosity_error()
    bf16 = "bf16" in row
    unet = UNet2DConditionModel.from_pretrained(root / "unet")
    unet.requires_grad_(False)
    if bf16:  # diffusers' LoRA scripts: frozen weights in the mixed-precision dtype
        with warnings.catch_warnings():  # "modules that should be kept in float32: []"
            warnings.simplefilter("ignore")
            unet.to(dtype=torch.bfloat16)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                target_modules=PEFT_TARGETS))
    for p in unet.parameters():  # LoRA weights stay float32 (cast_training_params)
        if p.requires_grad:
            p.data = p.data.float()
    unet.to(dev).train()
    args["_load_peak"] = _reset_peak()
    lora = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(lora, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                          beta_start=0.00085, beta_end=0.012,
                          prediction_type=prediction_type(args))
    cfg = unet_config(args)
    b = args["ft_batch"]
    d = make_inputs(cfg, args, b)
    x0 = torch.from_numpy(d["x0"]).permute(0, 3, 1, 2).contiguous().to(dev)
    ctx = torch.from_numpy(d["ctx"]).to(dev)
    gen = torch.Generator(device=dev).manual_seed(0)

    def step():
        noise = torch.randn(x0.shape, generator=gen, device=dev)
        t = torch.randint(0, 1000, (b,), generator=gen, device=dev)
        x_t = sched.add_noise(x0, noise, t)
        target = noise if sched.config.prediction_type == "epsilon" else \
            sched.get_velocity(x0, noise, t)
        with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16,
                            enabled=bf16):
            pred = unet(x_t, t, ctx).sample
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return float(loss.detach())

    t0 = time.perf_counter()
    first = step()
    warm = time.perf_counter() - t0
    times = []
    for _ in range(args["iters"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"warm": warm, "times": times, "flops": None, "finite": bool(np.isfinite(first)),
            "examples": b, "projector": "-",
            "gpu_peak": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "n_trained": sum(p.numel() for p in lora),
            "note": f"{sum(p.numel() for p in lora):,} LoRA params"}


def _torch_feat(row: str, root: Path, args: dict) -> dict:
    """traker featurizing the attn2 parameters (see the module docstring)."""
    torch, dev, cuda, sync = _torch_env(args)
    import warnings

    from diffusers import UNet2DConditionModel
    from trak import TRAKer
    warnings.filterwarnings("ignore", message=".*batching rule.*")
    from jaxattrib.diffusion.schedule import make_schedule
    cfg = unet_config(args)
    b = args["feat_batch"]
    d = make_inputs(cfg, args, b * (args["iters"] + 1))
    ts_np, noise_np = fixed_timesteps(args, d["x0"].shape[1:])
    abar_np = np.asarray(make_schedule().alphas_cumprod)[ts_np]
    ts = torch.from_numpy(ts_np).long().to(dev)
    noise = torch.from_numpy(noise_np).permute(0, 3, 1, 2).contiguous().to(dev)
    abar = torch.from_numpy(abar_np).float().to(dev).view(-1, 1, 1, 1)
    model = UNet2DConditionModel.from_pretrained(root / "unet").eval().to(dev)
    args["_load_peak"] = _reset_peak()
    names = [n for n, _ in model.named_parameters() if ".attn2." in n]
    x0 = torch.from_numpy(d["x0"]).permute(0, 3, 1, 2).contiguous().to(dev)
    ctx = torch.from_numpy(d["ctx"]).to(dev)
    n = x0.shape[0]
    with tempfile.TemporaryDirectory() as tmp:
        traker = TRAKer(model=model, task=torch_dsm_output(ts, noise, abar), train_set_size=n,
                        save_dir=tmp, device=dev, use_half_precision=False, proj_dim=args["k"],
                        projector_seed=PROJ_SEED, logging_level=40, grad_wrt=names)
        traker.load_checkpoint(model.state_dict(), model_id=0)
        times, warm = [], None
        for i in range(args["iters"] + 1):
            idx = np.arange(i * b, (i + 1) * b)
            t0 = time.perf_counter()
            traker.featurize(batch=(x0[idx], ctx[idx]), inds=idx)
            sync()
            dt = time.perf_counter() - t0
            if i == 0:
                warm = dt
            else:
                times.append(dt)
        feats = np.asarray(traker.saver.current_store["grads"][:b])
        proj = type(traker.projector).__name__
    return {"warm": warm, "times": times, "flops": None, "finite": bool(np.isfinite(feats).all()),
            "examples": b, "projector": proj,
            "gpu_peak": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "n_trained": int(traker.num_params_for_grad),
            "note": f"grad_wrt {len(names)} tensors"}
