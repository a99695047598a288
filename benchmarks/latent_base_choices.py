"""The measurements behind the latent base model's resolution and sizes (docs/latent_base.md).

    PYTHONPATH=$PWD JAX_PLATFORMS=cpu nice -n 19 python benchmarks/latent_base_choices.py \
        classifier|vae|unet

* ``classifier``: accuracy of the package's pixel classifier
  (:func:`jaxattrib.data.synthetic.classify_concepts`) on real renders at 16/24/32/64 px, for
  the pixel base model's spec and a grown one (6 shapes, 8 colors, 11 backgrounds, 3 textures);
  2 renders per combination (at most 600 classified).
* ``vae``: one Adam training step (value_and_grad + update, batch 32) of candidate
  KL autoencoders (L1 + KL on a posterior sample); compile time and the mean of 6 steps after it.
* ``unet``: the same for candidate UNets over the latents with the 2-layer CLIP text encoder.

Step times exclude compilation (reported separately). [design] ours.
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

B = 32


def timeit(name, loss, params, batch, n=6):
    opt = optax.adam(1e-3)
    st = opt.init(params)

    @jax.jit
    def step(p, s, b, k):
        v, g = jax.value_and_grad(loss)(p, b, k)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, v

    k = jax.random.PRNGKey(0)
    t = time.time()
    p, st, v = step(params, st, batch, k)
    v.block_until_ready()
    c = time.time() - t
    t = time.time()
    for i in range(n):
        p, st, v = step(p, st, batch, jax.random.fold_in(k, i))
    v.block_until_ready()
    dt = (time.time() - t) / n
    npar = sum(x.size for x in jax.tree.leaves(params))
    print(f"{name}: params {npar / 1e6:.2f}M compile {c:.1f}s step {dt * 1000:.0f} ms "
          f"(load {np.round(__import__('os').getloadavg(), 2).tolist()})", flush=True)


def classifier():
    from jaxattrib.data.synthetic import SyntheticConceptSpec, classify_concepts, make_synthetic
    grown = dict(shapes=("circle", "square", "triangle", "star", "cross", "diamond"),
                 colors=("red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink"),
                 backgrounds=("black", "white", "gray", "red", "green", "blue", "yellow",
                              "purple", "orange", "cyan", "pink"),
                 textures=("solid", "stripes", "dots"), scale_range=(0.45, 0.8),
                 position_jitter=0.15)
    for size in (16, 24, 32, 64):
        for name, kw in (("pixel-base spec", {}), ("grown spec", grown)):
            spec = SyntheticConceptSpec(size=size, per_combination=2, **kw)
            ds = make_synthetic(spec, seed=5)
            sub = np.random.default_rng(0).permutation(len(ds))[:600]
            p = classify_concepts(ds.images[sub], spec)
            acc = {k: round(float(np.mean(p[k] == ds.labels[k][sub])), 3)
                   for k in ("shape", "color", "background", "texture")}
            per = {sh: round(float(np.mean(p["shape"][ds.labels["shape"][sub] == i] == i)), 2)
                   for i, sh in enumerate(spec.shapes)}
            print(size, name, acc, "per shape", per, flush=True)


def vae():
    from jaxattrib.models import vae as V
    for size, boc in ((32, (32, 64, 64)), (32, (64, 128, 128)), (64, (32, 64, 64, 64)),
                      (32, (32, 64))):
        cfg = V.tiny_config(block_out_channels=boc, norm_num_groups=8, sample_size=size)
        p = V.init_params(cfg, jax.random.PRNGKey(0))
        x = jnp.asarray(np.random.rand(B, size, size, 3).astype(np.float32) * 2 - 1)

        def loss(p, x, k, cfg=cfg):
            m, lv = V.AutoencoderKL(cfg).apply({"params": p}, x, method=V.AutoencoderKL.encode)
            z = m + jnp.exp(0.5 * lv) * jax.random.normal(k, m.shape)
            r = V.AutoencoderKL(cfg).apply({"params": p}, z, method=V.AutoencoderKL.decode)
            return jnp.mean(jnp.abs(r - x)) + 1e-6 * jnp.mean(m ** 2 + jnp.exp(lv) - lv)
        timeit(f"vae {size}px block_out_channels={boc} f={2 ** (len(boc) - 1)}", loss, p, x)


def unet():
    from jaxattrib.models import clip_text as C
    from jaxattrib.models import unet as U
    tc = C.CLIPTextConfig(vocab_size=60, hidden_size=64, intermediate_size=256,
                          num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=16, hidden_act="quick_gelu",
                          projection_dim=64, pad_token_id=None, bos_token_id=58,
                          eos_token_id=59)
    tp = C.init_params(tc, jax.random.PRNGKey(1))
    ids = jnp.asarray(np.random.randint(0, 58, (B, 16)).astype(np.int32))
    kinds = {"c": ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D"),
             "d": ("DownBlock2D", "UpBlock2D")}
    for hw, boc, types in ((8, (64, 128, 128), "ccd"), (8, (64, 128, 256), "ccd"),
                           (8, (96, 192, 192), "ccd"), (16, (64, 128, 128), "dcc"),
                           (16, (32, 64, 64), "dcc")):
        uc = U.tiny_config(block_out_channels=boc, cross_attention_dim=64, norm_num_groups=8,
                           layers_per_block=1, sample_size=hw, in_channels=4, out_channels=4,
                           attention_head_dim=8,
                           down_block_types=tuple(kinds[t][0] for t in types),
                           up_block_types=tuple(kinds[t][1] for t in reversed(types)))
        up_ = U.init_params(uc, jax.random.PRNGKey(0))
        x = jnp.asarray(np.random.randn(B, hw, hw, 4).astype(np.float32))

        def loss(p, b, k, uc=uc):
            ctx = C.encode_text(p["t"], tc, b[1])
            t = jax.random.randint(k, (B,), 0, 1000)
            out = U.UNet2DConditionModel(uc).apply({"params": p["u"]}, b[0], t, ctx)
            return jnp.mean((out - b[0]) ** 2)
        timeit(f"unet {hw}x{hw}x4 block_out_channels={boc} {types} (+text encoder)", loss,
               {"u": up_, "t": tp}, (x, ids))


if __name__ == "__main__":
    {"classifier": classifier, "vae": vae, "unet": unet}[sys.argv[1]]()
