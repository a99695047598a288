"""Overhead of MONTRAGE monitoring during fine-tuning (tiny pixel-space UNet, CPU or GPU).

Prints the wall time of

* ``train``: a fine-tuning loop (the jitted data-parallel ``finetune.make_train_step`` over the
  ``finetune.batch_plan`` batches, no record writing), compiled before timing;
* ``train+monitor``: the same loop calling ``MontrageMonitor.on_checkpoint`` at every
  checkpoint (representations of all training images and queries, no reloading);
* ``finetune``: ``finetune.finetune`` writing a trajectory record (orbax checkpoints); this
  includes compiling its own train step, so it is shown for reference only;
* ``post-hoc``: ``representation_trajectory`` over that record afterwards (reloads every
  checkpoint; the representation pass is already compiled);

and the ratios ``train+monitor / train`` (live overhead) and ``(train + post-hoc) / train``
(reload-based overhead against the same compiled training loop). Compilation is excluded from
the loop timings (warm-up first).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/montrage_overhead.py \
        --steps 20 --checkpoint-every 5 --train 64 --queries 16
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
    ap.add_argument("--size", type=int, default=16, help="image side (pixels)")
    ap.add_argument("--channels", type=str, default="16,32", help="block_out_channels")
    ap.add_argument("--rep-batch", type=int, default=64, help="batch of the representation pass")
    args = ap.parse_args()

    from jaxattrib import parallel
    from jaxattrib.attribution import montrage as M
    from jaxattrib.diffusion.schedule import make_schedule
    from jaxattrib.models import unet
    from jaxattrib.train import finetune as ft
    from jaxattrib.train.diffusion_task import make_diffusion_loss

    chans = tuple(int(c) for c in args.channels.split(","))
    cfg = unet.tiny_config(sample_size=args.size, in_channels=3, out_channels=3,
                           block_out_channels=chans, norm_num_groups=8, cross_attention_dim=16)
    params = {"unet": unet.init_params(cfg, jax.random.PRNGKey(0))}
    rng = np.random.default_rng(0)
    imgs = rng.uniform(-1, 1, (args.train, args.size, args.size, 3)).astype(np.float32)
    ctx = rng.normal(size=(args.train, 4, 16)).astype(np.float32)
    queries = rng.uniform(-1, 1, (args.queries, args.size, args.size, 3)).astype(np.float32)
    qctx = rng.normal(size=(args.queries, 4, 16)).astype(np.float32)
    mesh = parallel.make_mesh()
    sched = make_schedule()
    loss = make_diffusion_loss(cfg, None, sched)
    tcfg = ft.TrainConfig(steps=args.steps, batch_size=args.batch, learning_rate=1e-4,
                          checkpoint_every=args.checkpoint_every, seed=0)

    def get_batch(idx):
        return {"images": imgs[idx], "encoder_hidden_states": ctx[idx]}

    spec = M.RepresentationSpec(batch_size=args.rep_batch)
    opt = ft.make_optimizer(tcfg)
    step_fn = ft.make_train_step(loss, opt, tcfg, mesh)

    def loop(monitor):
        trainable, frozen = ft.init_trainable(params, tcfg)
        trainable = jax.tree.map(lambda x: jax.numpy.array(x, copy=True), trainable)
        trainable, frozen = parallel.replicate((trainable, frozen), mesh)
        state = ft.TrainState(step=parallel.replicate(jax.numpy.zeros((), jax.numpy.int32), mesh),
                              params=trainable, opt_state=parallel.replicate(
                                  opt.init(trainable), mesh), frozen=frozen)
        if monitor is not None:
            monitor.on_checkpoint(0, ft.compose_params(state.params, state.frozen, tcfg))
        for s in range(tcfg.steps):
            idx, key = ft.batch_plan(tcfg.seed, s, args.train, tcfg.batch_size)
            batch = parallel.shard_batch(get_batch(idx), mesh)
            state, metrics = step_fn(state, batch, parallel.replicate(key, mesh))
            if ft._should_save(s + 1, tcfg) and monitor is not None:
                monitor.on_checkpoint(s + 1, ft.compose_params(state.params, state.frozen, tcfg))
        jax.block_until_ready(state.params)
        return state

    def new_monitor():
        return M.MontrageMonitor(cfg, imgs, ctx, queries, qctx, spec=spec, mesh=mesh)

    loop(new_monitor())  # warm-up: compiles the train step and the representation pass
    t0 = time.perf_counter()
    loop(None)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    mon = new_monitor()
    loop(mon)
    t_mon = time.perf_counter() - t0
    n_ckpt = len(mon.trajectory().steps)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        _, rec = ft.finetune(loss, params, args.train, get_batch, tcfg, Path(tmp) / "rec",
                             mesh=mesh, progress=False)
        t_ft = time.perf_counter() - t0
        t0 = time.perf_counter()
        traj = M.representation_trajectory(rec, cfg, imgs, ctx, queries, qctx, spec=spec,
                                           mesh=mesh, progress=False)
        t_post = time.perf_counter() - t0
        np.testing.assert_allclose(traj.train, mon.trajectory().train, atol=1e-5)

    dev = jax.devices()[0]
    print(f"device: {dev.platform} x{len(jax.devices())} ({dev.device_kind}); UNet "
          f"{chans} at {args.size}px; N={args.train} train, Q={args.queries} queries; "
          f"{tcfg.steps} steps, batch {tcfg.batch_size}, {n_ckpt} checkpoints")
    print(f"{'run':<16}{'seconds':>10}")
    for name, t in [("train", t_train), ("train+monitor", t_mon), ("finetune", t_ft),
                    ("post-hoc", t_post)]:
        print(f"{name:<16}{t:>10.2f}")
    print(f"live monitor overhead ratio  (train+monitor)/train     = {t_mon / t_train:.2f}")
    print(f"post-hoc overhead ratio      (train+post-hoc)/train    = "
          f"{(t_train + t_post) / t_train:.2f}")
    print("(finetune includes compiling its train step and writing the record)")


if __name__ == "__main__":
    main()
