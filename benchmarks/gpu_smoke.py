"""Seconds-long check that this environment runs jaxattrib's core on its default JAX backend:
versions, a tiny UNet's per-example projected gradients under ``jit(vmap(grad))`` compared with
the same computation on the CPU backend (at the default matmul precision — TF32 on recent GPUs —
and at ``'highest'``), and an orbax trajectory-record save / restore round trip. Exit status 0 = usable. Used by ``benchmarks/gpu_suite.sh`` to choose between the
installed flax / optax / orbax and pinned ones.

    python benchmarks/gpu_smoke.py
"""

from __future__ import annotations

import sys
import tempfile


def main() -> int:
    import flax
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import orbax.checkpoint as ocp

    print(f"jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}, "
          f"orbax-checkpoint {getattr(ocp, '__version__', '?')}; backend "
          f"{jax.default_backend()}: {jax.devices()}")
    from jaxattrib.attribution import grads as grads_lib
    from jaxattrib.attribution.projection import make_projector
    from jaxattrib.models import unet
    from jaxattrib.train.record import TrajectoryRecord

    cfg = unet.tiny_config(block_out_channels=(8, 16), cross_attention_dim=8, sample_size=8)
    params = unet.init_params(cfg, jax.random.PRNGKey(0))
    model = unet.UNet2DConditionModel(cfg)

    def out_fn(p, ex, key):
        t = jnp.array([500])
        noise = jax.random.normal(key, ex["x0"].shape)
        out = model.apply({"params": p}, (ex["x0"] + noise)[None], t, ex["ctx"][None])
        return jnp.mean((noise[None] - out) ** 2)

    rng = np.random.default_rng(0)
    ex = {"x0": rng.standard_normal((8, 8, 8, 4)).astype(np.float32),
          "ctx": rng.standard_normal((8, 4, 8)).astype(np.float32)}
    shapes = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    proj = make_projector("rademacher", 64, 0, shapes)
    fn = grads_lib.make_feature_fn(out_fn, params, proj)
    key = jax.random.PRNGKey(1)
    feats = grads_lib.projected_grads(fn, ex, key, start=0, microbatch=8)
    with jax.default_device(jax.devices("cpu")[0]):
        params_cpu = jax.device_put(params, jax.devices("cpu")[0])
        fn_cpu = grads_lib.make_feature_fn(out_fn, params_cpu, proj)
        ref = grads_lib.projected_grads(fn_cpu, ex, key, start=0, microbatch=8)
    rel = float(np.max(np.abs(feats - ref)) / np.max(np.abs(ref)))
    print(f"projected per-example gradients [8, 64]: max |default − cpu| / max |cpu| = {rel:.1e}")
    with jax.default_matmul_precision("highest"):  # float32 products (no TF32 / bf16 passes)
        fn_hi = grads_lib.make_feature_fn(out_fn, params, proj)
        hi = grads_lib.projected_grads(fn_hi, ex, key, start=0, microbatch=8)
    rel_hi = float(np.max(np.abs(hi - ref)) / np.max(np.abs(ref)))
    print(f"  with jax.default_matmul_precision('highest'): {rel_hi:.1e}")
    with tempfile.TemporaryDirectory() as tmp:
        rec = TrajectoryRecord.create(tmp + "/rec", {"smoke": 1})
        rec.save(0, {"step": 0, "params": {}}, base=params)
        rec.wait()
        back = rec.load_base()
        rec.close()
    same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
               zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back)))
    print(f"orbax record round trip bit-identical: {same}")
    ok = same and rel < 1e-2 and np.isfinite(feats).all()
    print("SMOKE OK" if ok else "SMOKE FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
