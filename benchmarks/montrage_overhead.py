"""Overhead of MONTRAGE monitoring on fine-tuning time (CPU or GPU).

Times ``finetune.finetune`` (data-parallel fine-tuning writing a trajectory record) on the same
model, data and config

* ``finetune``: without a hook;
* ``finetune+hook``: with ``on_checkpoint=MontrageMonitor.on_checkpoint`` (representations of
  all training images and queries at every saved checkpoint, taken live, no reloading); the
  time spent inside the hook is also measured directly (``hook``);
* ``post-hoc``: ``representation_trajectory`` over the record afterwards (reloads every
  checkpoint), the alternative to the hook;

interleaved ``--repeats`` times (medians reported), after one untimed warm-up run with the hook
that compiles the train step and the representation pass. JAX's persistent compilation cache
(in a temporary directory) is switched on so that every timed ``finetune`` call, which builds a
new jitted train step, reloads the warm-up's executable instead of recompiling. The live and
post-hoc trajectories are checked to agree.

Model: ``--base-model`` uses the embedded base model's UNet (the demo's fine-tuning; since
issue 21 the latent model's: 64-128-128 channels over 16×16×4 VAE latents, cross-attention 64)
with random inputs in its input shape (uniform [-1, 1] standing in for the VAE-encoded images,
which the timing does not depend on) and random text states instead of the frozen text
encoder; otherwise a random tiny pixel-space UNet (``--channels``, ``--size``).

    python benchmarks/montrage_overhead.py --base-model --steps 400 --checkpoint-every 100 \
        --batch 16 --train 60 --queries 24          # the demo's fine-tuning setting
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import jax
import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--checkpoint-every", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--train", type=int, default=64, help="training images")
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--base-model", action="store_true",
                    help="the embedded base model's UNet instead of a random tiny one")
    ap.add_argument("--size", type=int, default=16, help="image side (pixels), tiny UNet")
    ap.add_argument("--channels", type=str, default="16,32", help="tiny UNet block channels")
    ap.add_argument("--rep-batch", type=int, default=64, help="batch of the representation pass")
    ap.add_argument("--repeats", type=int, default=1, help="timed (finetune, +hook) pairs")
    args = ap.parse_args()

    cache_dir = tempfile.mkdtemp(prefix="jax_cc_")
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

    from jaxattrib import parallel
    from jaxattrib.attribution import montrage as M
    from jaxattrib.attribution import montrage_reps
    from jaxattrib.diffusion.schedule import make_schedule
    from jaxattrib.models import unet
    from jaxattrib.train import finetune as ft
    from jaxattrib.train.diffusion_task import make_diffusion_loss

    if args.base_model:
        from jaxattrib.train.base_model import load_base_model
        pipe = load_base_model()
        cfg, params = pipe.unet_config, {"unet": pipe.unet_params}
        model = f"embedded base model UNet {tuple(cfg.block_out_channels)}"
    else:
        chans = tuple(int(c) for c in args.channels.split(","))
        cfg = unet.tiny_config(sample_size=args.size, in_channels=3, out_channels=3,
                               block_out_channels=chans, norm_num_groups=8,
                               cross_attention_dim=16)
        params = {"unet": unet.init_params(cfg, jax.random.PRNGKey(0))}
        model = f"random tiny UNet {chans}"
    size, ch = int(cfg.sample_size), int(cfg.in_channels)
    d = montrage_reps._cross_dim(cfg)
    rng = np.random.default_rng(0)
    imgs = rng.uniform(-1, 1, (args.train, size, size, ch)).astype(np.float32)
    ctx = rng.normal(size=(args.train, 4, d)).astype(np.float32)
    queries = rng.uniform(-1, 1, (args.queries, size, size, ch)).astype(np.float32)
    qctx = rng.normal(size=(args.queries, 4, d)).astype(np.float32)
    mesh = parallel.make_mesh()
    loss = make_diffusion_loss(cfg, None, make_schedule())
    tcfg = ft.TrainConfig(steps=args.steps, batch_size=args.batch, learning_rate=1e-4,
                          checkpoint_every=args.checkpoint_every, seed=0)
    spec = M.RepresentationSpec(batch_size=args.rep_batch)

    def get_batch(idx):
        return {"images": imgs[idx], "encoder_hidden_states": ctx[idx]}

    def run(record_dir, hook: bool):
        """-> (wall seconds of finetune, seconds inside the hook, monitor or None)."""
        mon = M.MontrageMonitor(cfg, imgs, ctx, queries, qctx, spec=spec, mesh=mesh) \
            if hook else None
        spent = [0.0]

        def on_checkpoint(step, p):
            t = time.perf_counter()
            mon.on_checkpoint(step, p)
            spent[0] += time.perf_counter() - t

        t0 = time.perf_counter()
        _, rec = ft.finetune(loss, params, args.train, get_batch, tcfg, record_dir, mesh=mesh,
                             progress=False, on_checkpoint=on_checkpoint if hook else None)
        return time.perf_counter() - t0, spent[0], mon, rec

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t_warm, _, _, _ = run(tmp / "warm", True)  # compiles (and fills the compile cache)
        plain, hooked, in_hook = [], [], []
        for r in range(args.repeats):
            plain.append(run(tmp / f"plain{r}", False)[0])
            t, h, mon, rec = run(tmp / f"hook{r}", True)
            hooked.append(t)
            in_hook.append(h)
        t0 = time.perf_counter()
        traj = M.representation_trajectory(rec, cfg, imgs, ctx, queries, qctx, spec=spec,
                                           mesh=mesh, progress=False)
        t_post = time.perf_counter() - t0
        live = mon.trajectory()
        np.testing.assert_allclose(traj.similarities(), live.similarities(), atol=1e-6)
        n_ckpt = len(live.steps)

    t_plain, t_hook, t_in = (float(np.median(x)) for x in (plain, hooked, in_hook))
    dev = jax.devices()[0]
    print(f"device: {dev.platform} x{len(jax.devices())} ({dev.device_kind}); {model} at "
          f"{size}x{size}x{ch} inputs; N={args.train} train, Q={args.queries} queries; "
          f"{tcfg.steps} steps, "
          f"batch {tcfg.batch_size}, {n_ckpt} checkpoints; taps {spec.taps}; "
          f"{args.repeats} timed pair(s), medians; warm-up run {t_warm:.1f} s")
    print(f"{'run':<28}{'seconds':>10}")
    for name, t in [("finetune (no hook)", t_plain), ("finetune + monitor hook", t_hook),
                    ("  of which inside the hook", t_in),
                    ("post-hoc over the record", t_post)]:
        print(f"{name:<28}{t:>10.2f}")
    print(f"all timings (s): finetune {np.round(plain, 2).tolist()}, +hook "
          f"{np.round(hooked, 2).tolist()}, in hook {np.round(in_hook, 2).tolist()}")
    print(f"hook overhead, measured inside the hook   hook / finetune          = "
          f"{t_in / t_plain:.3f}  ({t_in / n_ckpt:.2f} s per checkpoint)")
    print(f"hook overhead, wall                       (finetune+hook)/finetune = "
          f"{t_hook / t_plain:.3f}")
    print(f"post-hoc instead                          (finetune+post-hoc)/finetune = "
          f"{(t_plain + t_post) / t_plain:.3f}")
    print("live and post-hoc similarity trajectories agree (atol 1e-6)")


if __name__ == "__main__":
    main()
