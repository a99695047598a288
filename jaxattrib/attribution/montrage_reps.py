"""MONTRAGE's representations: pooled UNet-tap features of images at one checkpoint.

:class:`RepresentationSpec` names the taps (sown ``'intermediates'`` of the UNet, e.g.
``mid``, ``up_0``), the timestep and the pooling; :func:`extract_representations` returns
L2-normalised ``[N, D]`` features (the concatenated pooled taps) of ``images [N, H, W, C]``
(model inputs: pixels, or VAE latents for a latent model). See
:mod:`jaxattrib.attribution.montrage` (which re-exports every public name here) for the
method and its [paper] / [design] notes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxattrib import parallel
from jaxattrib.authentication.similarity import pool_taps
from jaxattrib.diffusion.losses import fixed_noise
from jaxattrib.diffusion.schedule import Schedule, add_noise, make_schedule
from jaxattrib.models.latent_io import ModelInputError, check_model_inputs


DEFAULT_TAPS = ("mid", "up_0")


class MontrageError(ValueError):
    """Bad input to a MONTRAGE function (the message names the argument and expectation)."""


class MontrageInputError(MontrageError, ModelInputError):
    """Images that are not the UNet's model inputs (e.g. pixels given to a latent model); also a
    :class:`~jaxattrib.config.ConfigError`, so the CLI exits 2 with its one-line message."""


class MontrageCacheError(MontrageError):
    """A representation cache directory belongs to a different configuration or is corrupt."""


# ============================================================================ representations
@dataclasses.dataclass(frozen=True)
class RepresentationSpec:
    """How representations are taken (everything that changes them, except the parameters).

    taps: sown UNet intermediates (``down_i`` / ``mid`` / ``up_i``). t: integer timestep.
    noise_seed: seed of the fixed noise. per_example_noise: one ε per example index instead
    of one shared ε (see module docstring). batch_size: global batch (rounded up to a multiple
    of the data axis size).
    """

    taps: tuple[str, ...] = DEFAULT_TAPS
    t: int = 200
    noise_seed: int = 0
    per_example_noise: bool = False
    batch_size: int = 64

    def __post_init__(self):
        object.__setattr__(self, "taps", tuple(self.taps))
        if not self.taps:
            raise MontrageError("RepresentationSpec.taps: need at least one tap name")
        if self.batch_size <= 0:
            raise MontrageError(f"RepresentationSpec.batch_size must be > 0, got "
                                f"{self.batch_size}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"taps": list(self.taps)}


def _cross_dim(unet_config) -> int:
    d = unet_config.cross_attention_dim
    return int(d[0] if isinstance(d, (tuple, list)) else d)


def _check_images(images, ctx, unet_config, name: str, vae_config=None):
    """Model inputs ``[N, h, w, c]`` (the UNet's sample size and channels: VAE latents for a
    latent model, never its pixels) and ``ctx``; :class:`MontrageInputError` otherwise."""
    images = np.asarray(images, np.float32)
    try:
        check_model_inputs(images, unet_config, f"{name} images", vae_config)
    except ModelInputError as e:
        raise MontrageInputError(str(e)) from None
    if ctx is None:
        ctx = np.zeros((images.shape[0], 1, _cross_dim(unet_config)), np.float32)
    ctx = np.asarray(ctx, np.float32)
    if ctx.ndim != 3 or ctx.shape[0] != images.shape[0] \
            or ctx.shape[-1] != _cross_dim(unet_config):
        raise MontrageError(f"{name}: expected ctx [N={images.shape[0]}, L, "
                            f"{_cross_dim(unet_config)}] or None, got shape {ctx.shape}")
    return images, ctx


def _pool_fn(unet_config, taps: tuple[str, ...]) -> Callable:
    """``fn(params, sched, x[B,H,W,C], ctx[B,L,D], index[B], t, seed, per_example)`` -> list of
    pooled taps ``[B, C_tap]``; ``t``, ``seed``, ``per_example`` are traced (no recompiles)."""
    from jaxattrib.models.unet import UNet2DConditionModel
    unet = UNet2DConditionModel(unet_config)

    def fn(params, sched, x, ctx, index, t, seed, per_example):
        b = x.shape[0]
        tt = jnp.full((b,), t, jnp.int32)
        shared = jnp.broadcast_to(fixed_noise(seed, t, x.shape[1:], x.dtype), x.shape)
        own = jax.vmap(lambda i: jax.random.normal(
            jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), t), i),
            x.shape[1:], x.dtype))(index)
        eps = jnp.where(per_example, own, shared)
        x_t = add_noise(sched, x, eps, tt)
        _, state = unet.apply({"params": params}, x_t, tt, ctx, mutable=["intermediates"])
        inter = state["intermediates"]
        return [pool_taps(inter, (name,)) for name in taps]

    return fn


@functools.lru_cache(maxsize=16)
def _compiled_pool_fn(unet_config, taps: tuple[str, ...], mesh) -> Callable:
    # [design] a memo of jitted programs (like jax's own compilation cache), so that every
    # extractor with the same model config, taps and mesh reuses one compiled program.
    rep = parallel.replicated_sharding(mesh)
    data = parallel.data_sharding(mesh)
    return jax.jit(_pool_fn(unet_config, taps),
                   in_shardings=(rep, rep, data, data, data, rep, rep, rep),
                   out_shardings=data)


@functools.lru_cache(maxsize=16)
def _tap_dims(unet_config, taps: tuple[str, ...], image_shape: tuple[int, ...]) -> tuple[int, ...]:
    from jaxattrib.models.unet import param_shapes
    s = jax.ShapeDtypeStruct
    out = jax.eval_shape(
        _pool_fn(unet_config, taps), param_shapes(unet_config), make_schedule(),
        s((1,) + image_shape, jnp.float32), s((1, 1, _cross_dim(unet_config)), jnp.float32),
        s((1,), jnp.int32), 0, 0, False)
    return tuple(int(o.shape[-1]) for o in out)


class RepresentationExtractor:
    """Mesh-sharded ``(unet params, images, ctx) -> pooled taps [N, D_raw]``.

    Build it once and call it for every checkpoint: batches are padded to
    ``spec.batch_size`` so one compiled program (shared by extractors with the same config,
    taps and mesh; ``t`` and the noise settings are runtime values) serves every checkpoint.
    :meth:`tap_dims_for` gives the channel count of each tap in the concatenation.
    """

    def __init__(self, unet_config, spec: RepresentationSpec = RepresentationSpec(),
                 schedule: Schedule | None = None, mesh=None):
        self.unet_config = unet_config
        self.spec = spec
        self.schedule = make_schedule() if schedule is None else schedule
        self.mesh = parallel.make_mesh() if mesh is None else mesh
        n_dev = self.mesh.shape[parallel.DATA_AXIS]
        self.batch_size = -(-spec.batch_size // n_dev) * n_dev
        self._jitted = _compiled_pool_fn(unet_config, spec.taps, self.mesh)
        self._sched = None
        self._tap_dims: tuple[int, ...] | None = None

    def tap_dims_for(self, image_shape: Sequence[int]) -> tuple[int, ...]:
        """Channels of each tap for images ``[H, W, C]`` (shape evaluation, no compute)."""
        if self._tap_dims is None:
            self._tap_dims = _tap_dims(self.unet_config, self.spec.taps,
                                       tuple(int(d) for d in image_shape))
        return self._tap_dims

    def replicate_params(self, params: Any) -> Any:
        return parallel.replicate(params, self.mesh)

    def __call__(self, params: Any, images, ctx=None) -> np.ndarray:
        """Pooled (not normalised) taps ``float32 [N, sum(tap_dims)]`` of ``images [N,H,W,C]``
        with ``ctx [N, L, D]`` (None: one zero token). ``params``: UNet params (ideally
        already replicated with :meth:`replicate_params`)."""
        images, ctx = _check_images(images, ctx, self.unet_config, "RepresentationExtractor")
        n, b = images.shape[0], self.batch_size
        if self._sched is None:
            self._sched = parallel.replicate(self.schedule, self.mesh)
        scalars = parallel.replicate((np.int32(self.spec.t), np.int32(self.spec.noise_seed),
                                      np.bool_(self.spec.per_example_noise)), self.mesh)
        outs = []
        for start in range(0, n, b):
            x, c = images[start:start + b], ctx[start:start + b]
            m = x.shape[0]
            idx = np.arange(start, start + b, dtype=np.int32)
            if m < b:  # pad with copies of the last row (results dropped)
                x = np.concatenate([x, np.repeat(x[-1:], b - m, 0)])
                c = np.concatenate([c, np.repeat(c[-1:], b - m, 0)])
            xs, cs, ids = parallel.shard_batch((x, c, idx), self.mesh)
            feats = self._jitted(params, self._sched, xs, cs, ids, *scalars)
            outs.append([np.asarray(f)[:m] for f in feats])
        if not outs:
            return np.zeros((0, sum(self.tap_dims_for(images.shape[1:]))), np.float32)
        self._tap_dims = tuple(int(f.shape[-1]) for f in outs[0])
        return np.concatenate([np.concatenate(o, axis=-1) for o in outs]).astype(np.float32)


def pooled_representations(unet_config, unet_params, images, ctx=None, *,
                           taps: Sequence[str] = DEFAULT_TAPS, t: int = 200,
                           noise_seed: int = 0, per_example_noise: bool = False,
                           batch_size: int = 64, schedule: Schedule | None = None,
                           mesh=None) -> np.ndarray:
    """Global-average-pooled, concatenated taps ``float32 [N, sum C_tap]`` (not normalised).

    See :func:`extract_representations` for the arguments.
    """
    spec = RepresentationSpec(taps=tuple(taps), t=t, noise_seed=noise_seed,
                              per_example_noise=per_example_noise, batch_size=batch_size)
    ext = RepresentationExtractor(unet_config, spec, schedule, mesh)
    return ext(ext.replicate_params(unet_params), images, ctx)


def l2_normalize(x, axis: int = -1, eps: float = 1e-12):
    """``x`` scaled to unit L2 norm along ``axis`` (numpy or jax arrays; zero rows stay 0)."""
    xp = jnp if isinstance(x, jax.Array) else np
    return x / xp.maximum(xp.linalg.norm(x, axis=axis, keepdims=True), eps)


def extract_representations(unet_config, unet_params, images, ctx=None, *,
                            taps: Sequence[str] = DEFAULT_TAPS, t: int = 200,
                            noise_seed: int = 0, per_example_noise: bool = False,
                            batch_size: int = 64, schedule: Schedule | None = None,
                            mesh=None) -> np.ndarray:
    """MONTRAGE representations ``float32 [N, D_rep]`` of ``images`` under ``unet_params``.

    ``x_t = add_noise(schedule, images, ε, t)`` with the fixed ε of the module docstring, one
    UNet call, global average pool of each tap, concatenation, L2 normalisation [design].

    Args:
      unet_config: ``jaxattrib.models.unet.UNetConfig``.
      unet_params: the UNet's parameters.
      images: ``[N, H, W, C]`` model inputs (pixels in [-1, 1], or VAE latents for a latent
        model), NHWC.
      ctx: ``encoder_hidden_states [N, L, D]`` or None (one zero token per image).
      taps: sown intermediates to use (``down_i``, ``mid``, ``up_i``).
      t: integer timestep (0 .. T-1). noise_seed: seed of the fixed ε.
      per_example_noise: one ε per example index instead of one shared by all.
      batch_size: images per UNet call (rounded up to a multiple of the devices).
      schedule: forward-noising schedule (default: ``make_schedule()``, DDPM linear).
      mesh: device mesh with a ``'data'`` axis (default: all devices).
    """
    return l2_normalize(pooled_representations(
        unet_config, unet_params, images, ctx, taps=taps, t=t, noise_seed=noise_seed,
        per_example_noise=per_example_noise, batch_size=batch_size, schedule=schedule,
        mesh=mesh))


__all__ = ["DEFAULT_TAPS", "MontrageCacheError", "MontrageError", "MontrageInputError",
           "RepresentationExtractor", "RepresentationSpec", "extract_representations",
           "l2_normalize", "pooled_representations"]
