"""Concept-TRAK's features: config, model glue, the two losses, (x_t, t) pairs and projected
per-timestep gradients.

Training side: gradients of the reconstruction-guided training loss; query side: gradients
of the concept loss (c vs c⁻) at DDIM-inverted ``(x_t, t)`` pairs [paper]; both normalised
per timestep and projected to ``proj_dim`` (``[N, k]`` float32). See
:mod:`jaxattrib.attribution.concept_trak` (which re-exports every public name here) for the
method, its [paper] / [design] notes and the scoring.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxattrib.attribution.grads import merge_params, projected_grads, select_params
from jaxattrib.attribution.projection import make_projector
from jaxattrib.diffusion.inversion import ddim_invert
from jaxattrib.diffusion.losses import fixed_noise
from jaxattrib.diffusion.schedule import Schedule, add_noise, predict_x0, training_target


ModelFn = Callable[[Any, jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]


EncodeFn = Callable[[Sequence[str]], Any]


_AXES = (-3, -2, -1)


DEFAULT_RATIOS = tuple(10.0 ** e for e in range(-4, 5))


@dataclasses.dataclass(frozen=True)
class ConceptTRAKConfig:
    """Every switch of the ablation TRAK → +concept → +training loss → +inversion → +norm.

    concept_loss: query side uses L_concept (else the plain DSM loss of the query image).
    training_loss: training side uses the reconstruction-reward loss (else plain DSM).
    ddim_inversion: (x_t, t) pairs from DDIM inversion (else fixed noises at fixed t).
    normalize: per-timestep unit-L2 normalization before summing.
    concept_scale: λ_c. guidance_scale: multiplies g (1 = the code).
    num_timesteps: K of the fixed-noise path, ``t = arange(T//K, T, T//K)``. noise_seed: its
      noises are ``fixed_noise(noise_seed, t, shape)``.
    inversion_steps, keep_every, inversion_spacing: DDIM inversion grid; states
      ``xs[keep_every-1::keep_every]`` are kept.
    inversion_guidance: CFG scale of the inversion against the empty prompt's context
      (``uncond_context``): 1 = no CFG, conditioned on the image's prompt [design]; the
      reference's training side uses 7.5 [code: ``run_train_grad.sh``].
    query_pairs: 'invert' (the query's pairs from DDIM inversion, as the training side) or
      'trajectory': from the query's own regenerated sampling trajectory (its recorded seed,
      ``query_eta``), given by the caller as ``pairs`` (:func:`trajectory_pairs`) [code: the
      AbC ``test_grad.py``].
    query_eta: η of that regeneration (the reference's 0.1).
    param_spec: parameter subset (regex on the '/'-joined path, see ``select_params``).
    proj_kind, proj_dim, proj_seed: the random projection (paper: k = 32768).
    lam_ratio: r in λ = r · 0.1 · mean(diag(ΦᵀΦ)).
    microbatch: examples per jitted feature call.
    """

    concept_loss: bool = True
    training_loss: bool = True
    ddim_inversion: bool = True
    normalize: bool = True
    concept_scale: float = 3.0
    guidance_scale: float = 1.0
    num_timesteps: int = 10
    noise_seed: int = 0
    inversion_steps: int = 50
    keep_every: int = 5
    inversion_spacing: str = "trailing"
    inversion_guidance: float = 1.0
    query_pairs: str = "invert"
    query_eta: float = 0.1
    param_spec: Any = "attn2"
    proj_kind: str = "gaussian"
    proj_dim: int = 2048
    proj_seed: int = 0
    lam_ratio: float = 1.0
    microbatch: int = 8

    def __post_init__(self):
        if self.query_pairs not in QUERY_PAIRS:
            raise ValueError(f"attribution.concept_query_pairs={self.query_pairs!r}: expected "
                             f"one of {QUERY_PAIRS}")
        if not self.inversion_guidance >= 1.0:
            raise ValueError(f"attribution.concept_inversion_guidance="
                             f"{self.inversion_guidance}: expected >= 1 (1 = no CFG)")

    @property
    def needs_uncond(self) -> bool:
        """Whether the inversion needs the empty prompt's context (CFG inversion)."""
        return self.ddim_inversion and self.inversion_guidance != 1.0

    @property
    def query_from_trajectory(self) -> bool:
        """Whether the query side's pairs come from a regenerated trajectory."""
        return self.ddim_inversion and self.query_pairs == "trajectory"

    @classmethod
    def from_section(cls, section, *, strict: bool = False,
                     **overrides) -> "ConceptTRAKConfig":
        """From an ``attribution`` config section, whose keys it shares with D-TRAK / TRAK:
        :data:`SECTION_KEYS` says which key feeds which field (``k`` -> ``proj_dim``,
        ``concept_num_timesteps`` -> ``num_timesteps``, ...; the section's own
        ``num_timesteps`` is D-TRAK's and is not read), then ``overrides``; the rest keep the
        defaults above (:func:`jaxattrib.config.fields_from_section`)."""
        from jaxattrib.config import fields_from_section
        return cls(**fields_from_section(cls, section, strict=strict, keys=SECTION_KEYS,
                                         **overrides))


#: where the query side's (x_t, t) pairs come from (:class:`ConceptTRAKConfig` ``query_pairs``)
QUERY_PAIRS = ("invert", "trajectory")

# ``attribution`` section key of each field that the section sets (the rest: the defaults)
SECTION_KEYS = {"proj_dim": "k", "param_spec": "concept_params", "proj_kind": "projection",
                "inversion_steps": "concept_inversion_steps", "concept_scale": "concept_scale",
                "num_timesteps": "concept_num_timesteps", "microbatch": "microbatch",
                "inversion_guidance": "concept_inversion_guidance",
                "query_pairs": "concept_query_pairs", "query_eta": "concept_query_eta"}


ABLATION = (
    ("TRAK", dict(concept_loss=False, training_loss=False, ddim_inversion=False,
                  normalize=False)),
    ("+concept loss", dict(concept_loss=True, training_loss=False, ddim_inversion=False,
                           normalize=False)),
    ("+training loss", dict(concept_loss=True, training_loss=True, ddim_inversion=False,
                            normalize=False)),
    ("+DDIM inversion", dict(concept_loss=True, training_loss=True, ddim_inversion=True,
                             normalize=False)),
    ("+normalization", dict(concept_loss=True, training_loss=True, ddim_inversion=True,
                            normalize=True)),
)


def unet_model_fn(unet_config, dtype: Any = jnp.float32) -> ModelFn:
    """``model_fn(params, x_t, t, ctx)`` for :class:`jaxattrib.models.unet.UNet2DConditionModel`
    computing in ``dtype``."""
    from jaxattrib.models.unet import UNet2DConditionModel

    model = UNet2DConditionModel(unet_config, dtype=dtype)

    def fn(params, x_t, t, ctx):
        return model.apply({"params": params}, x_t, t, ctx)

    return fn


def clip_encoder(text_config, text_params, tokenizer, *, max_length: int | None = None,
                 layer: str = "last") -> EncodeFn:
    """``encode(prompts) -> [B, L, D]`` with the CLIP text port and a ``CLIPTokenizer``."""
    from jaxattrib.models.clip_text import encode_text

    fn = jax.jit(lambda p, ids: encode_text(p, text_config, ids, layer=layer))

    def encode(prompts):
        return fn(text_params, jnp.asarray(tokenizer(list(prompts), max_length=max_length)))

    return encode


def _mean(x):
    return jnp.mean(x, axis=_AXES)


def reconstruction_guidance(model_fn: ModelFn, params, sched: Schedule, x_t, t, x0, ctx, *,
                            scale: float = 1.0) -> jnp.ndarray:
    """``g = −scale · ∇_{x_t} mean_{HWC}((x̂_0(x_t) − x_0)²)`` per example, ``[B, H, W, C]``.

    Parameters are frozen (``stop_gradient``): no gradient w.r.t. θ flows through ``g``.
    Shapes: ``x_t, x0 [B,H,W,C]``, ``t [B]``, ``ctx [B,L,D]``.
    """
    params = jax.lax.stop_gradient(params)

    def err(x):
        x0_hat = predict_x0(sched, x, model_fn(params, x, t, ctx), t)
        return jnp.sum(_mean((x0_hat - x0) ** 2))  # examples are independent: sum = per-example

    return jax.lax.stop_gradient(-scale * jax.grad(err)(x_t))


def training_loss(model_fn: ModelFn, params, sched: Schedule, x_t, t, x0, noise, ctx, *,
                  reconstruction: bool = True, guidance_scale: float = 1.0,
                  guidance: jnp.ndarray | None = None) -> jnp.ndarray:
    """Per-example training-side loss ``[B]``.

    ``reconstruction=True``: ``mean((sg[ε − g] − ε)²)`` with ``g`` from
    :func:`reconstruction_guidance` (or the given ``guidance``, treated as a constant).
    ``reconstruction=False``: the plain DSM loss ``mean((target(x0, noise) − ε)²)``.
    """
    out = model_fn(params, x_t, t, ctx)
    if not reconstruction:
        return _mean((training_target(sched, x0, noise, t) - out) ** 2)
    if guidance is None:
        guidance = reconstruction_guidance(model_fn, params, sched, x_t, t, x0, ctx,
                                           scale=guidance_scale)
    target = jax.lax.stop_gradient(out - jax.lax.stop_gradient(guidance))
    return _mean((target - out) ** 2)


def concept_loss(model_fn: ModelFn, params, sched: Schedule, x_t, t, ctx, ctx_neg, *,
                 concept: bool = True, scale: float = 3.0, x0=None, noise=None) -> jnp.ndarray:
    """Per-example query-side loss ``[B]``.

    ``concept=True``: ``mean((sg[ε_c + λ_c(ε_c − sg ε_c⁻)] − ε_c)²)`` (λ_c = ``scale``).
    ``concept=False``: the plain DSM loss of ``(x0, noise)`` under ``ctx`` (TRAK; ``ctx_neg``
    unused, ``x0`` and ``noise`` required).
    """
    out = model_fn(params, x_t, t, ctx)
    if not concept:
        if x0 is None or noise is None:
            raise ValueError("concept=False (plain DSM) needs x0 and noise")
        return _mean((training_target(sched, x0, noise, t) - out) ** 2)
    out_neg = jax.lax.stop_gradient(model_fn(params, x_t, t, ctx_neg))
    target = jax.lax.stop_gradient(out + scale * (out - out_neg))
    return _mean((target - out) ** 2)


def fixed_timesteps(K: int, T: int = 1000) -> np.ndarray:
    """``arange(T//K, T, T//K)`` int32 (K = 10 → 100, …, 900) [code]."""
    if not 1 <= K <= T:
        raise ValueError(f"num_timesteps={K}: expected 1..{T}")
    return np.arange(T // K, T, T // K, dtype=np.int32)


def implied_noise(sched: Schedule, x_t, x0, t) -> jnp.ndarray:
    """``(x_t − √ᾱ_t x0)/√(1−ᾱ_t)``: the noise that maps ``x0`` to ``x_t`` at ``t``."""
    a = sched.alphas_cumprod[t].reshape(t.shape + (1,) * (x_t.ndim - t.ndim)).astype(x_t.dtype)
    return (x_t - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)


def timestep_pairs(model_fn: ModelFn, params, sched: Schedule, x0, ctx,
                   config: ConceptTRAKConfig, uncond=None):
    """(x_t, t) pairs for a batch: ``(xts [B,K,H,W,C], ts [B,K] int32, noise [B,K,H,W,C])``.

    Inversion: DDIM inversion of ``x0`` conditioned on ``ctx`` (``config.inversion_steps``,
    ``trailing`` spacing; with ``inversion_guidance`` ≠ 1, CFG against ``uncond [B, L, D]``, the
    empty prompt's context), states ``[keep_every-1::keep_every]``, noise implied by each state.
    Otherwise ``add_noise(x0, fixed_noise(noise_seed, t), t)`` for :func:`fixed_timesteps`.
    """
    B = x0.shape[0]
    if config.ddim_inversion:
        if config.needs_uncond and uncond is None:
            raise ValueError(f"inversion_guidance={config.inversion_guidance}: CFG inversion "
                             f"needs the empty prompt's context (uncond)")
        eps_fn = lambda x, t, c: model_fn(params, x, t, c)  # noqa: E731
        g = config.inversion_guidance
        _, traj = ddim_invert(eps_fn, sched, x0, ctx, config.inversion_steps,
                              return_trajectory=True, timestep_spacing=config.inversion_spacing,
                              steps_offset=0, uncond=uncond if g != 1.0 else None,
                              guidance_scale=g)
        sel = slice(config.keep_every - 1, None, config.keep_every)
        xts = jnp.swapaxes(traj.xs[sel], 0, 1)  # [B, K, ...]
        ts = jnp.broadcast_to(traj.timesteps[sel][None], (B, xts.shape[1])).astype(jnp.int32)
        noise = implied_noise(sched, xts, x0[:, None], ts)
        return xts, ts, noise
    ts1 = jnp.asarray(fixed_timesteps(config.num_timesteps, sched.num_train_timesteps))
    shape = x0.shape[1:]
    n1 = jax.vmap(lambda t: fixed_noise(config.noise_seed, t, shape, x0.dtype))(ts1)  # [K,...]
    noise = jnp.broadcast_to(n1[None], (B,) + n1.shape)
    ts = jnp.broadcast_to(ts1[None], (B, ts1.shape[0]))
    xts = jax.vmap(jax.vmap(lambda x, n, t: add_noise(sched, x, n, t), in_axes=(None, 0, 0)))(
        x0, noise, ts)
    return xts, ts, noise


def trajectory_pairs(sched: Schedule, xs, timesteps, x0, keep_every: int = 5):
    """(x_t, t) pairs of recorded sampling trajectories, as :func:`timestep_pairs` returns them.

    ``xs [Q, N, H, W, C]``: the state at ``timesteps [N]`` (or ``[Q, N]``, equal rows;
    descending, as sampled: ``xs[:, i]`` is the input of step i); ``x0 [Q, H, W, C]``: the
    trajectories' end. Keeps the states after every ``keep_every``-th step, ``xs[:, keep_every::keep_every]`` (50 steps, 5 → 9 states at
    t ≈ 899 … 99: the reference's ``tgt_t ∈ {5, …, 45}`` [code: AbC ``test_grad.py``], which
    draws one at random per epoch; all of them here [design]), with the noise each implies.
    Returns ``(xts [Q,K,...], ts [Q,K] int32, noise [Q,K,...])`` (numpy).
    """
    xs = np.asarray(xs)
    ts1 = np.asarray(timesteps).astype(np.int32)
    if ts1.ndim == 2 and ts1.shape[0] == xs.shape[0] and (ts1 == ts1[:1]).all():
        ts1 = ts1[0]                          # one grid per image (a vmapped sampler's output)
    if xs.ndim != 5 or ts1.shape != (xs.shape[1],):
        raise ValueError(f"trajectory_pairs: need xs [Q, N, H, W, C] and timesteps [N]; got "
                         f"{xs.shape} and {ts1.shape}")
    sel = slice(keep_every, None, keep_every)
    xts, ts1 = xs[:, sel], ts1[sel]
    if xts.shape[1] == 0:
        raise ValueError(f"trajectory_pairs: {xs.shape[1]} steps keep no state every "
                         f"{keep_every}")
    ts = np.broadcast_to(ts1[None], xts.shape[:2]).copy()
    noise = np.asarray(implied_noise(sched, jnp.asarray(xts), jnp.asarray(x0)[:, None],
                                     jnp.asarray(ts)))
    return xts, ts, noise


def per_timestep_norms(grads) -> jnp.ndarray:
    """``[K]``: the global L2 norm of each ``[K, ...]`` slice of the tree."""
    leaves = jax.tree_util.tree_leaves(grads)
    return jnp.sqrt(sum(jnp.sum(jnp.reshape(l, (l.shape[0], -1)) ** 2, axis=1) for l in leaves))


def normalize_per_timestep(grads):
    """Each ``[K, ...]`` slice of the tree scaled to unit global L2 norm (zero slices kept)."""
    norm = per_timestep_norms(grads)
    inv = jnp.where(norm > 0, 1.0 / jnp.where(norm > 0, norm, 1.0), 1.0)
    return jax.tree_util.tree_map(
        lambda l: l * inv.reshape((-1,) + (1,) * (l.ndim - 1)).astype(l.dtype), grads)


def _side_loss(side: str, model_fn, sched, config):
    """Scalar loss of one (x_t, t) of one example: ``(params, ex, x_t, t, noise) -> []``."""

    def loss(params, ex, x_t, t, noise):
        b = lambda a: a[None]  # noqa: E731
        if side == "train":
            g = None if ex.get("guidance") is None else b(ex["guidance"])
            return training_loss(model_fn, params, sched, b(x_t), b(t), b(ex["x0"]), b(noise),
                                 b(ex["ctx"]), reconstruction=config.training_loss,
                                 guidance_scale=config.guidance_scale, guidance=g)[0]
        return concept_loss(model_fn, params, sched, b(x_t), b(t), b(ex["ctx"]),
                            b(ex["ctx_neg"]), concept=config.concept_loss,
                            scale=config.concept_scale, x0=b(ex["x0"]), noise=b(noise))[0]

    return loss


def per_timestep_grads(side: str, model_fn: ModelFn, sched: Schedule,
                       config: ConceptTRAKConfig, trainable, frozen, ex):
    """One example's ∇_θ loss_t at each of its ``K`` (x_t, t) pairs, unnormalized: the
    trainable tree with a leading ``[K]`` axis (the summands of :func:`summed_grads`).

    ``ex``: dict with ``x0 [H,W,C]``, ``ctx [L,D]``, (query) ``ctx_neg [L,D]``, ``xts [K,H,W,C]``,
    ``ts [K]``, ``noise [K,H,W,C]``. ``side``: ``'train'`` or ``'query'``.
    """
    loss = _side_loss(side, model_fn, sched, config)
    full = merge_params(trainable, frozen)
    ex = dict(ex)
    if side == "train" and config.training_loss:
        # guidance with θ frozen, computed once per (x_t, t) outside the θ-gradient
        ex["guidance"] = None
        gs = reconstruction_guidance(
            model_fn, full, sched, ex["xts"], ex["ts"],
            jnp.broadcast_to(ex["x0"][None], ex["xts"].shape),
            jnp.broadcast_to(ex["ctx"][None], (ex["ts"].shape[0],) + ex["ctx"].shape),
            scale=config.guidance_scale)
    else:
        gs = None

    def one_t(tr, x_t, t, noise, g):
        e = dict(ex, guidance=g) if gs is not None else dict(ex, guidance=None)
        return loss(merge_params(tr, frozen), e, x_t, t, noise)

    if gs is None:
        grads = jax.vmap(lambda x, t, n: jax.grad(one_t)(trainable, x, t, n, None))(
            ex["xts"], ex["ts"], ex["noise"])
    else:
        grads = jax.vmap(lambda x, t, n, g: jax.grad(one_t)(trainable, x, t, n, g))(
            ex["xts"], ex["ts"], ex["noise"], gs)
    return grads


def summed_grads(side: str, model_fn: ModelFn, sched: Schedule, config: ConceptTRAKConfig,
                 trainable, frozen, ex):
    """One example's feature before projection: Σ_t (normalized) ∇_θ loss_t (trainable tree).

    ``ex`` and ``side``: as :func:`per_timestep_grads`.
    """
    grads = per_timestep_grads(side, model_fn, sched, config, trainable, frozen, ex)
    if config.normalize:
        grads = normalize_per_timestep(grads)
    return jax.tree_util.tree_map(lambda g: jnp.sum(g, axis=0), grads)


def make_side_feature_fn(side: str, model_fn: ModelFn, sched: Schedule, params, projector,
                         config: ConceptTRAKConfig):
    """A jitted ``(examples[B], keys[B]) -> [B, k]`` (keys unused) for ``projected_grads``."""
    split = select_params(params, config.param_spec)

    @jax.jit
    def feats(trainable, frozen, examples):
        g = jax.vmap(lambda e: summed_grads(side, model_fn, sched, config, trainable, frozen,
                                            e))(examples)
        return projector.project(g)

    return lambda ex, keys: feats(split.trainable, split.frozen, ex)


def build_examples(model_fn: ModelFn, params, sched: Schedule, images, contexts,
                   config: ConceptTRAKConfig, neg_contexts=None, *, batch: int = 8,
                   cache: dict | None = None, uncond_context=None, pairs=None) -> dict:
    """Per-example inputs (numpy, leading axis n) incl. the (x_t, t) pairs, in batches.
    ``uncond_context [L, D]``: the empty prompt's context (CFG inversion); ``pairs``: given
    ``(xts, ts, noise)`` (e.g. :func:`trajectory_pairs`) instead of computing them."""
    cache = {} if cache is None else cache
    images, contexts = np.asarray(images), np.asarray(contexts)
    if pairs is not None:
        xts, ts, noise = (np.asarray(a) for a in pairs)
        if xts.shape[0] != images.shape[0] or xts.shape[2:] != images.shape[1:]:
            raise ValueError(f"pairs: xts {xts.shape} does not match the images "
                             f"{images.shape} (need [n, K, H, W, C])")
        ex = {"x0": images, "ctx": contexts, "xts": xts, "ts": ts.astype(np.int32),
              "noise": noise}
        if neg_contexts is not None:
            ex["ctx_neg"] = np.asarray(neg_contexts)
        return ex
    if config.needs_uncond and uncond_context is None:
        raise ValueError(f"attribution.concept_inversion_guidance="
                         f"{config.inversion_guidance}: CFG inversion needs the empty prompt's "
                         f"context (uncond_context [L, D])")
    pkey = ("pairs", config.ddim_inversion, config.inversion_steps, config.keep_every,
            config.inversion_spacing, config.num_timesteps, config.noise_seed,
            config.inversion_guidance)
    if pkey not in cache:
        cache[pkey] = jax.jit(lambda p, x, c, u: timestep_pairs(model_fn, p, sched, x, c, config,
                                                                 uncond=u))
    pair_fn = cache[pkey]
    parts = []
    for lo in range(0, images.shape[0], batch):
        x, c = jnp.asarray(images[lo:lo + batch]), jnp.asarray(contexts[lo:lo + batch])
        u = (None if not config.needs_uncond else
             jnp.broadcast_to(jnp.asarray(uncond_context)[None], c.shape))
        xts, ts, noise = pair_fn(params, x, c, u)
        parts.append((np.asarray(xts), np.asarray(ts), np.asarray(noise)))
    ex = {"x0": images, "ctx": contexts, "xts": np.concatenate([p[0] for p in parts]),
          "ts": np.concatenate([p[1] for p in parts]),
          "noise": np.concatenate([p[2] for p in parts])}
    if neg_contexts is not None:
        ex["ctx_neg"] = np.asarray(neg_contexts)
    return ex


def make_concept_projector(params, config: ConceptTRAKConfig):
    """The projector over ``select_params(params, config.param_spec).trainable``."""
    shapes = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.float32),
                                    select_params(params, config.param_spec).trainable)
    return make_projector(config.proj_kind, config.proj_dim, config.proj_seed, shapes)


def _features(side, model_fn, params, sched, images, contexts, neg_contexts, config, projector,
              cache, uncond_context=None, pairs=None):
    cache = {} if cache is None else cache
    qpairs = pairs if side == "query" and config.query_from_trajectory else None
    if side == "query" and config.query_from_trajectory and pairs is None:
        raise ValueError("attribution.concept_query_pairs='trajectory': the query side's pairs "
                         "come from each query's regenerated sampling trajectory "
                         "(trajectory_pairs), which this caller does not have; use 'invert'")
    if side == "query" and not config.concept_loss:
        # plain DSM of the query under its prompt = the training side's DSM loss: share the
        # compiled function (and drop c⁻, unused)
        side, neg_contexts = "train", None
        config = dataclasses.replace(config, training_loss=False)
    kind = (side, config.training_loss if side == "train" else config.concept_loss)
    fkey = ("features", kind, config.normalize, config.concept_scale, config.guidance_scale,
            str(config.param_spec), id(projector))
    if fkey not in cache:
        cache[fkey] = make_side_feature_fn(side, model_fn, sched, params, projector, config)
    ex = build_examples(model_fn, params, sched, images, contexts, config, neg_contexts,
                        batch=config.microbatch, cache=cache, uncond_context=uncond_context,
                        pairs=qpairs)
    return projected_grads(cache[fkey], ex, jax.random.PRNGKey(0), microbatch=config.microbatch)


def train_features(model_fn: ModelFn, params, sched: Schedule, images, contexts,
                   config: ConceptTRAKConfig, projector=None, *,
                   cache: dict | None = None, uncond_context=None) -> np.ndarray:
    """Φ ``[N, k]``: projected (normalized, summed) training-loss gradients.

    ``cache``: a dict shared between calls with the same ``model_fn, params, sched`` to reuse
    compiled functions. ``uncond_context [L, D]``: the empty prompt's context, needed with
    ``config.inversion_guidance`` ≠ 1.
    """
    projector = projector or make_concept_projector(params, config)
    return _features("train", model_fn, params, sched, images, contexts, None, config,
                     projector, cache, uncond_context)


def query_features(model_fn: ModelFn, params, sched: Schedule, images, contexts,
                   neg_contexts, config: ConceptTRAKConfig, projector=None, *,
                   cache: dict | None = None, uncond_context=None, pairs=None) -> np.ndarray:
    """φ ``[Q, k]``: projected (normalized, summed) concept-loss (or, with the switch off,
    DSM-loss) gradients of the queries. ``uncond_context``: as :func:`train_features`;
    ``pairs``: the queries' ``(xts, ts, noise)`` from :func:`trajectory_pairs`, required with
    ``config.query_pairs = 'trajectory'`` (and inversion on), else unused."""
    projector = projector or make_concept_projector(params, config)
    return _features("query", model_fn, params, sched, images, contexts, neg_contexts, config,
                     projector, cache, uncond_context, pairs)


def per_timestep_query_features(model_fn: ModelFn, params, sched: Schedule, images, contexts,
                                neg_contexts, config: ConceptTRAKConfig, projector=None, *,
                                cache: dict | None = None, uncond_context=None,
                                pairs=None) -> dict:
    """The query side one (x_t, t) pair at a time: what :func:`query_features` normalizes and
    sums (a diagnostic; ``config.normalize`` is ignored).

    Returns numpy arrays for ``Q`` queries and ``K`` pairs each:

    * ``grads [Q, K, k]``: the projected, *unnormalized* ∇_θ loss_t (concept loss, or DSM with
      ``config.concept_loss`` off). By linearity of the projection, ``query_features`` is
      ``Σ_t grads[:, t] / grad_norm[:, t]`` with normalization and ``Σ_t grads[:, t]`` without.
    * ``grad_norm [Q, K]``: ``‖∇_θ loss_t‖₂`` over the selected parameters (before projection;
      what the per-timestep normalization divides by).
    * ``concept_norm [Q, K]``: ``‖ε_θ(x_t; c) − ε_θ(x_t; c⁻)‖₂`` over ``H·W·C`` (the concept
      direction; the concept loss' gradient is ``−(2 λ_c / D) Σ (ε_c − ε_c⁻) · ∂ε_c/∂θ``);
      NaN with the concept loss off.
    * ``ts [Q, K]`` int32: the timesteps.

    ``neg_contexts`` (c⁻) is required with the concept loss on and unused otherwise;
    ``uncond_context`` and ``pairs``: as :func:`query_features`.
    """
    if neg_contexts is None:
        if config.concept_loss:
            raise ValueError("per_timestep_query_features: the concept loss needs neg_contexts "
                             "(the c⁻ contexts)")
        neg_contexts = contexts  # unused by the DSM loss
    projector = projector or make_concept_projector(params, config)
    cache = {} if cache is None else cache
    split = select_params(params, config.param_spec)
    fkey = ("per-timestep", config.concept_loss, config.concept_scale, str(config.param_spec),
            id(projector))
    if fkey not in cache:
        @jax.jit
        def feats(trainable, frozen, examples):
            def one(ex):
                g = per_timestep_grads("query", model_fn, sched, config, trainable, frozen, ex)
                gn = per_timestep_norms(g)
                if config.concept_loss:
                    full = merge_params(trainable, frozen)
                    K = ex["ts"].shape[0]
                    eps = lambda c: model_fn(  # noqa: E731
                        full, ex["xts"], ex["ts"], jnp.broadcast_to(c[None], (K,) + c.shape))
                    cn = jnp.sqrt(jnp.sum((eps(ex["ctx"]) - eps(ex["ctx_neg"])) ** 2,
                                          axis=_AXES))
                else:
                    cn = jnp.full_like(gn, jnp.nan)
                return g, gn, cn

            g, gn, cn = jax.vmap(one)(examples)
            p = projector.project(g, batch_dims=2).astype(jnp.float32)  # [B, K, k]
            # packed as [B, K, k + 2] so that projected_grads batches it like any feature
            return jnp.concatenate([p, gn[..., None].astype(jnp.float32),
                                    cn[..., None].astype(jnp.float32)], axis=-1)

        cache[fkey] = lambda ex, keys: feats(split.trainable, split.frozen, ex)
    if config.query_from_trajectory and pairs is None:
        raise ValueError("per_timestep_query_features: concept_query_pairs='trajectory' needs "
                         "the queries' pairs (trajectory_pairs)")
    ex = build_examples(model_fn, params, sched, images, contexts, config, neg_contexts,
                        batch=config.microbatch, cache=cache, uncond_context=uncond_context,
                        pairs=pairs if config.query_from_trajectory else None)
    packed = projected_grads(cache[fkey], ex, jax.random.PRNGKey(0), microbatch=config.microbatch)
    return {"grads": packed[..., :-2], "grad_norm": packed[..., -2],
            "concept_norm": packed[..., -1], "ts": np.asarray(ex["ts"])}


__all__ = ["ABLATION", "ConceptTRAKConfig", "DEFAULT_RATIOS", "EncodeFn", "ModelFn", "SECTION_KEYS",
           "build_examples", "clip_encoder", "concept_loss", "fixed_timesteps", "implied_noise",
           "make_concept_projector", "make_side_feature_fn", "normalize_per_timestep",
           "per_timestep_grads", "per_timestep_norms", "per_timestep_query_features",
           "QUERY_PAIRS", "query_features", "reconstruction_guidance", "summed_grads",
           "timestep_pairs", "train_features", "training_loss", "trajectory_pairs",
           "unet_model_fn"]
