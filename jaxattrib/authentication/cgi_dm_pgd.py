"""CGI-DM's inversion: config, input checks, masks, the contrastive objective and PGD.

The algorithm behind :mod:`jaxattrib.authentication.cgi_dm` (which re-exports every public
name here; read its module docstring for what follows the paper / the authors' code
[code: Nicholas0228/Revelio] and what is ours [design]). Pure functions of parameters and
arrays: a latent ``z0 [B, h, w, c]``, a mask of the same shape, text conditions, and two
denoisers ``eps(z_t, t, cond) -> eps``; nothing here reads files.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from jaxattrib.authentication import similarity as simlib
from jaxattrib.diffusion.schedule import Schedule, add_noise, predict_x0, training_target


EpsFn = Callable[[jnp.ndarray, jnp.ndarray, Any], jnp.ndarray]


SD_LATENT_NUMEL = 4 * 64 * 64


MASK_KINDS = ("checkerboard", "blur", "random_block")


PROJECT_MODELS = ("finetuned", "pretrained")


class CGIDMError(ValueError):
    """Base class of CGI-DM input errors."""


class IncompatibleModelsError(CGIDMError):
    """Pretrained and fine-tuned models differ in structure, shapes or configuration."""


class ImageSizeError(CGIDMError):
    """Images do not have the size the model expects."""


class NonFiniteObjectiveError(CGIDMError):
    """The contrastive objective became NaN/inf for some images."""


@dataclasses.dataclass(frozen=True)
class CGIDMConfig:
    """CGI-DM hyper-parameters. Defaults are the authors' (for SD's 4×64×64 latent).

    Attributes:
      mask_kind: 'checkerboard' | 'blur' | 'random_block'.
      block: block side in latent pixels (4: a 16 × 16 grid on a 64 × 64 latent); cells are
        ``block // 2`` wide.
      keep_cells: which of the 2 × 2 cells of each block are kept, as (row, col); default top-left
        and bottom-right (50 %).
      keep_rate: probability of keeping a cell for 'random_block'.
      blur_sigma: Gaussian σ (latent pixels) for 'blur'.
      eps_radius: L2 radius of the PGD ball around ``z_init`` (latent units, before scaling).
      step_size: PGD step length (L2, before scaling).
      num_steps: PGD iterations.
      clamp: iterates are clamped to [−clamp, clamp].
      t_min, t_max: timesteps drawn uniformly from {t_min, ..., t_max} (inclusive).
      n_noise: (t, ε) draws averaged per PGD step.
      scale: 'sqrt_numel' (radius and step × sqrt(numel / 16384)) or 'none'.
      project_t: manifold projection timestep [design]; 0 = off (the paper). See the module doc.
      project_model: 'finetuned' | 'pretrained': the denoiser of the projection.
      project_every: project after every ``project_every``-th PGD step (the last one included
        when ``num_steps`` is a multiple).
    """

    mask_kind: str = "checkerboard"
    block: int = 4
    keep_cells: tuple = ((0, 0), (1, 1))
    keep_rate: float = 0.5
    blur_sigma: float = 2.0
    eps_radius: float = 70.0
    step_size: float = 2.0
    num_steps: int = 1000
    clamp: float = 100.0
    t_min: int = 1
    t_max: int = 999
    n_noise: int = 1
    scale: str = "sqrt_numel"
    project_t: int = 0
    project_model: str = "finetuned"
    project_every: int = 1

    @classmethod
    def from_section(cls, section, *, strict: bool = False, **overrides) -> "CGIDMConfig":
        """From a ``cgi`` / ``cgi_dm`` config section: the fields it holds (other keys, e.g.
        the demo's ``enabled``, are ignored), then ``overrides``; the rest keep the defaults
        above (:func:`jaxattrib.config.fields_from_section`)."""
        from jaxattrib.config import fields_from_section
        return cls(**fields_from_section(cls, section, strict=strict, **overrides))

    def __post_init__(self):
        if self.mask_kind not in MASK_KINDS:
            raise ValueError(f"CGIDMConfig.mask_kind={self.mask_kind!r}; expected one of "
                             f"{MASK_KINDS}")
        if self.block < 2 or self.block % 2:
            raise ValueError(f"CGIDMConfig.block={self.block}; expected an even integer >= 2")
        if not all(tuple(c) in ((0, 0), (0, 1), (1, 0), (1, 1)) for c in self.keep_cells):
            raise ValueError(f"CGIDMConfig.keep_cells={self.keep_cells}; cells are (row, col) "
                             f"with row, col in {{0, 1}}")
        if not 0.0 <= self.keep_rate <= 1.0:
            raise ValueError(f"CGIDMConfig.keep_rate={self.keep_rate}; expected in [0, 1]")
        if self.scale not in ("sqrt_numel", "none"):
            raise ValueError(f"CGIDMConfig.scale={self.scale!r}; expected 'sqrt_numel' or 'none'")
        if self.num_steps < 0 or self.n_noise < 1:
            raise ValueError("CGIDMConfig: num_steps must be >= 0 and n_noise >= 1")
        if self.project_model not in PROJECT_MODELS:
            raise ValueError(f"CGIDMConfig.project_model={self.project_model!r}; expected one "
                             f"of {PROJECT_MODELS}")
        if not isinstance(self.project_t, (int, np.integer)) or self.project_t < 0:
            raise ValueError(f"CGIDMConfig.project_t={self.project_t!r}; expected an integer "
                             f">= 0 (0 = no manifold projection)")
        if not isinstance(self.project_every, (int, np.integer)) or self.project_every < 1:
            raise ValueError(f"CGIDMConfig.project_every={self.project_every!r}; expected an "
                             f"integer >= 1 (project after every project_every-th PGD step)")
        if not 0 <= self.t_min <= self.t_max:
            raise ValueError(f"CGIDMConfig: need 0 <= t_min <= t_max; got {self.t_min}, "
                             f"{self.t_max}")

    def scaled(self, latent_shape: Sequence[int]) -> tuple[float, float]:
        """``(radius, step)`` for one latent of shape ``[H, W, C]`` under the scale rule."""
        if self.scale == "none":
            return float(self.eps_radius), float(self.step_size)
        f = math.sqrt(float(np.prod(latent_shape)) / SD_LATENT_NUMEL)
        return float(self.eps_radius) * f, float(self.step_size) * f


def _first_diffs(a: Any, b: Any, limit: int = 5) -> list[str]:
    fa = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(a)}
    fb = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(b)}
    out = []
    for k in sorted(set(fa) | set(fb)):
        if k not in fb:
            out.append(f"{k}: only in the first (pretrained)")
        elif k not in fa:
            out.append(f"{k}: only in the second (fine-tuned)")
        else:
            sa, sb = np.shape(fa[k]), np.shape(fb[k])
            da, db = getattr(fa[k], "dtype", type(fa[k])), getattr(fb[k], "dtype", type(fb[k]))
            if sa != sb:
                out.append(f"{k}: shape {sa} vs {sb}")
            elif da != db:
                out.append(f"{k}: dtype {da} vs {db}")
        if len(out) >= limit:
            break
    return out


def check_compatible(params_a: Any, params_b: Any) -> None:
    """Raises :class:`IncompatibleModelsError` unless the two parameter trees have the same paths,
    shapes and dtypes; the message names the first (up to 5) differing paths."""
    diffs = _first_diffs(params_a, params_b)
    if diffs:
        raise IncompatibleModelsError("pretrained and fine-tuned parameters differ: "
                                      + "; ".join(diffs))


def check_same_config(config_a: Any, config_b: Any) -> None:
    """Raises :class:`IncompatibleModelsError` naming the fields where two model configs (frozen
    dataclasses or dicts) differ."""
    da = dataclasses.asdict(config_a) if dataclasses.is_dataclass(config_a) else dict(config_a)
    db = dataclasses.asdict(config_b) if dataclasses.is_dataclass(config_b) else dict(config_b)
    diffs = [f"{k}: {da.get(k, '<missing>')!r} vs {db.get(k, '<missing>')!r}"
             for k in sorted(set(da) | set(db)) if da.get(k, "<missing>") != db.get(k, "<missing>")]
    if diffs:
        raise IncompatibleModelsError("pretrained and fine-tuned model configs differ: "
                                      + "; ".join(diffs))


def check_image_size(images: Any, image_size: int | Sequence[int] | None,
                     channels: int | None = None) -> None:
    """Raises :class:`ImageSizeError` unless ``images`` is ``[N, H, W, C]`` with the expected
    ``(H, W)`` (an int means square) and, if given, ``C == channels``."""
    shape = np.shape(images)
    if len(shape) != 4:
        raise ImageSizeError(f"images must be NHWC [N, H, W, C]; got shape {shape}")
    if image_size is not None:
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if tuple(shape[1:3]) != hw:
            raise ImageSizeError(f"images are {shape[1]}x{shape[2]} but the model expects "
                                 f"{hw[0]}x{hw[1]} (resize/crop them first)")
    if channels is not None and shape[3] != channels:
        raise ImageSizeError(f"images have {shape[3]} channels; the model expects {channels}")


def checkerboard_mask(shape: Sequence[int], block: int = 4,
                      keep_cells: Sequence[Sequence[int]] = ((0, 0), (1, 1))) -> np.ndarray:
    """The block-checkerboard mask, float32 of ``shape`` ``[..., H, W, C]`` (1 = kept).

    Pixel (i, j) lies in cell ``((i % block) // (block/2), (j % block) // (block/2))`` of its
    block; it is kept iff that cell is in ``keep_cells``. Same for every channel and batch row.
    """
    shape = tuple(int(s) for s in shape)
    h, w = shape[-3], shape[-2]
    half = block // 2
    ci = (np.arange(h) % block) // half
    cj = (np.arange(w) % block) // half
    keep = np.zeros((h, w), bool)
    for r, c in keep_cells:
        keep |= (ci[:, None] == r) & (cj[None, :] == c)
    return np.broadcast_to(keep[:, :, None], shape).astype(np.float32)


def make_mask(kind: str, shape: Sequence[int], config: CGIDMConfig,
              key: jax.Array | None = None) -> jnp.ndarray:
    """A latent mask of ``shape`` (``[H, W, C]`` or ``[B, H, W, C]``), float32, 1 = known.

    kind: 'checkerboard' (deterministic, see :func:`checkerboard_mask`), 'random_block' (each
    ``block/2`` cell kept with probability ``config.keep_rate``, independently per batch row;
    needs ``key``), 'blur' (all zeros: nothing is re-imposed; see :func:`initial_latent`).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (3, 4):
        raise ValueError(f"make_mask: shape must be [H, W, C] or [B, H, W, C]; got {shape}")
    if kind == "checkerboard":
        return jnp.asarray(checkerboard_mask(shape, config.block, config.keep_cells))
    if kind == "blur":
        return jnp.zeros(shape, jnp.float32)
    if kind == "random_block":
        if key is None:
            raise ValueError("make_mask('random_block', ...) needs a PRNG key")
        half = config.block // 2
        h, w = shape[-3], shape[-2]
        gh, gw = -(-h // half), -(-w // half)
        cells = jax.random.bernoulli(key, config.keep_rate, shape[:-3] + (gh, gw))
        m = jnp.repeat(jnp.repeat(cells, half, axis=-2), half, axis=-1)[..., :h, :w]
        return jnp.broadcast_to(m[..., None], shape).astype(jnp.float32)
    raise ValueError(f"make_mask: kind={kind!r}; expected one of {MASK_KINDS}")


def batch_masks(config: CGIDMConfig, shape: Sequence[int], key: jax.Array,
                index_offset: int = 0) -> jnp.ndarray:
    """Masks ``[B, H, W, C]`` for a batch; image ``i`` uses ``fold_in(key, index_offset + i)``,
    so a random mask does not depend on the batch an image is in."""
    b = int(shape[0])
    if config.mask_kind != "random_block":
        return make_mask(config.mask_kind, shape, config)
    idx = jnp.arange(index_offset, index_offset + b)
    return jax.vmap(lambda i: make_mask("random_block", tuple(shape[1:]), config,
                                        jax.random.fold_in(key, i)))(idx)


def gaussian_blur(z: jnp.ndarray, sigma: float) -> jnp.ndarray:
    """Per-channel Gaussian blur of ``z[B, H, W, C]`` (reflect padding, radius ceil(3σ))."""
    r = max(1, int(math.ceil(3 * sigma)))
    x = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    w = jnp.asarray(w / w.sum(), z.dtype)
    zp = jnp.pad(z, ((0, 0), (r, r), (r, r), (0, 0)), mode="reflect")
    return simlib._filter_valid(zp, w)


def initial_latent(z0: jnp.ndarray, mask: jnp.ndarray, config: CGIDMConfig,
                   encode: Callable | None = None, decode: Callable | None = None) -> jnp.ndarray:
    """``z_init``: ``encode(decode(M ⊙ z0))`` (identity maps when not given) or, for
    ``mask_kind='blur'``, ``encode(decode(blur(z0)))``. ``z0[B,H,W,C]`` -> ``[B,H,W,C]``."""
    z = gaussian_blur(z0, config.blur_sigma) if config.mask_kind == "blur" else mask * z0
    if decode is not None and encode is not None:
        z = encode(decode(z))
    return z


def contrastive_objective(eps_pre: EpsFn, eps_ft: EpsFn, sched: Schedule, z: jnp.ndarray,
                          t: jnp.ndarray, noise: jnp.ndarray, cond: Any = None) -> jnp.ndarray:
    """Per-image ``L_pre − L_ft`` at given (t, ε), averaged over draws.

    Args:
      eps_pre, eps_ft: denoisers ``(z_t[B,H,W,C], t[B], cond) -> [B,H,W,C]`` (outputs of the
        schedule's ``prediction_type``).
      z: clean latents ``[B, H, W, C]``.
      t: integer timesteps ``[B]`` or ``[K, B]`` (K draws).
      noise: ``[B, H, W, C]`` or ``[K, B, H, W, C]``; the same for both models [design].
      cond: passed unchanged to both denoisers.

    Returns:
      ``[B]``: mean over draws of (per-element mean squared error of the pretrained model minus
      that of the fine-tuned model).
    """
    t = jnp.asarray(t)
    if t.ndim == 1:
        t, noise = t[None], noise[None]
    total = jnp.zeros(z.shape[:1], jnp.promote_types(z.dtype, jnp.float32))
    for k in range(t.shape[0]):
        z_t = add_noise(sched, z, noise[k], t[k])
        target = training_target(sched, z, noise[k], t[k])
        l_pre = jnp.mean((eps_pre(z_t, t[k], cond) - target) ** 2, axis=(1, 2, 3))
        l_ft = jnp.mean((eps_ft(z_t, t[k], cond) - target) ** 2, axis=(1, 2, 3))
        total = total + (l_pre - l_ft)
    return total / t.shape[0]


def _draws(keys: jnp.ndarray, step, shape, config, dtype):
    """(t[K,B], noise[K,B,H,W,C]) for PGD step ``step`` from per-image keys ``[B, 2]``."""
    def one(k):
        k = jax.random.fold_in(k, step)
        kt, kn = jax.random.split(k)
        t = jax.random.randint(kt, (config.n_noise,), config.t_min, config.t_max + 1)
        n = jax.random.normal(kn, (config.n_noise,) + tuple(shape), dtype)
        return t, n
    t, n = jax.vmap(one)(keys)
    return jnp.swapaxes(t, 0, 1), jnp.swapaxes(n, 0, 1)


def manifold_project(eps_fn: EpsFn, sched: Schedule, z: jnp.ndarray, t: int,
                     noise: jnp.ndarray, cond: Any = None) -> jnp.ndarray:
    """One-step denoiser projection [design]: ``x̂0(add_noise(z, noise, t))`` of ``eps_fn``.

    ``z``, ``noise``: ``[B, H, W, C]``; ``t``: an integer timestep (the same for all images).
    Returns ``[B, H, W, C]`` — the model's estimate of the clean latent after noising ``z`` to
    ``t`` (SDEdit with a single step): off-manifold detail below the noise level at ``t`` is
    replaced by what the model expects there.
    """
    tt = jnp.full(z.shape[:1], t, jnp.int32)
    z_t = add_noise(sched, z, noise, tt)
    return predict_x0(sched, z_t, eps_fn(z_t, tt, cond), tt)


def _proj_noise(keys: jnp.ndarray, step, shape, dtype):
    """Projection noise ``[B, H, W, C]`` of PGD step ``step`` (independent of the (t, ε) draws)."""
    return jax.vmap(lambda k: jax.random.normal(
        jax.random.fold_in(jax.random.fold_in(k, step), _PROJ_STREAM), tuple(shape), dtype))(keys)


_PROJ_STREAM = 0x70726F6A   # 'proj': a separate random stream per (image, step)


def _per_image_norm(x):
    return jnp.sqrt(jnp.sum(x * x, axis=tuple(range(1, x.ndim)), keepdims=True))


def _pgd(eps_pre, eps_ft, sched, z0, mask, z_init, keys, cond, config,
         radius: float, step: float, clamp: float):
    """The jit-able PGD loop. Returns (z_recovered, trace[num_steps, B], nonfinite[B])."""
    known = mask * z0

    def compose(z_var):
        return known + (1.0 - mask) * z_var

    def total_obj(z_var, i):
        t, n = _draws(keys, i, z0.shape[1:], config, z0.dtype)
        j = contrastive_objective(eps_pre, eps_ft, sched, compose(z_var), t, n, cond)
        return jnp.sum(j), j

    grad_fn = jax.grad(total_obj, has_aux=True)

    proj_fn = eps_ft if config.project_model == "finetuned" else eps_pre

    def project(z_var, i):
        n = _proj_noise(keys, i, z0.shape[1:], z0.dtype)
        return manifold_project(proj_fn, sched, compose(z_var), config.project_t, n, cond)

    def body(i, carry):
        z_var, trace, bad = carry
        g, j = grad_fn(z_var, i)
        gn = _per_image_norm(g)
        z_var = z_var + step * g / jnp.maximum(gn, 1e-12)
        if config.project_t > 0:
            z_var = jax.lax.cond((i + 1) % config.project_every == 0, project,
                                 lambda z, _: z, z_var, i)
        d = z_var - z_init
        dn = _per_image_norm(d)
        z_var = z_init + d * jnp.minimum(1.0, radius / jnp.maximum(dn, 1e-12))
        z_var = jnp.clip(z_var, -clamp, clamp)
        bad = bad | ~jnp.isfinite(j) | ~jnp.isfinite(gn.reshape(-1))
        return z_var, trace.at[i].set(j), bad

    b = z0.shape[0]
    trace0 = jnp.zeros((config.num_steps, b), jnp.promote_types(z0.dtype, jnp.float32))
    z_var, trace, bad = jax.lax.fori_loop(0, config.num_steps, body,
                                          (z_init, trace0, jnp.zeros((b,), bool)))
    return compose(z_var), trace, bad


class _Loop(NamedTuple):
    """Static settings of the compiled PGD loop (changing them recompiles)."""
    num_steps: int
    t_min: int
    t_max: int
    n_noise: int
    project_t: int = 0
    project_model: str = "finetuned"
    project_every: int = 1


def as_denoiser(fn: EpsFn) -> Partial:
    """``fn`` as a ``jax.tree_util.Partial`` (returned unchanged if it already is one).

    The PGD loop and the baselines take the denoisers as jit *arguments*: arrays bound in a
    ``Partial`` (e.g. ``Partial(lambda p, z, t, c: unet.apply({'params': p}, z, t, c), params)``)
    are traced inputs, replicated over the mesh, whereas arrays captured by a plain closure are
    embedded in the compiled program as constants — fine for small toys, wasteful for a real UNet.
    Keep the same function object across calls so compiled loops are reused.
    """
    return fn if isinstance(fn, Partial) else Partial(fn)


@functools.partial(jax.jit, static_argnames=("loop",))
def _pgd_jit(fns, sched, z0, mask, z_init, keys, cond, radius, step, clamp, *, loop: _Loop):
    return _pgd(fns[0], fns[1], sched, z0, mask, z_init, keys, cond, loop, radius, step, clamp)


@jax.jit
def _objective_jit(fns, sched, z, t, noise, cond):
    return contrastive_objective(fns[0], fns[1], sched, z, t, noise, cond)


def image_keys(key: jax.Array, n: int, offset: int = 0) -> jnp.ndarray:
    """Per-image keys ``fold_in(key, offset + i)`` for i < n -> ``[n, ...]``."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(offset, offset + n))


def _slice_cond(cond, lo, hi, n):
    return jax.tree_util.tree_map(
        lambda c: c[lo:hi] if (np.ndim(c) > 0 and np.shape(c)[0] == n) else c, cond)


def pgd_invert(eps_pre: EpsFn, eps_ft: EpsFn, sched: Schedule, z0: jnp.ndarray,
               mask: jnp.ndarray, cond: Any, config: CGIDMConfig, key: jax.Array, *,
               z_init: jnp.ndarray | None = None, index_offset: int = 0, mesh: Any = None,
               return_trace: bool = False):
    """Contrastive gradient inversion by L2-PGD.

    Args:
      eps_pre, eps_ft: pretrained and fine-tuned denoisers ``(z_t, t[B], cond) -> [B,H,W,C]``;
        plain closures or ``jax.tree_util.Partial`` with the params bound (see
        :func:`as_denoiser`; use the latter for real models).
      sched: the diffusion schedule (shared by both models).
      z0: clean latents ``[B, H, W, C]`` (VAE latent × scaling factor, or pixels).
      mask: ``[H, W, C]`` or ``[B, H, W, C]``, 1 = known (re-imposed from ``z0`` at every
        evaluation), 0 = optimised.
      cond: conditioning passed to the denoisers (leaves with leading dim B are per image).
      config: :class:`CGIDMConfig` (radius/step scaled by its rule for the latent size).
      key: PRNG key; image ``i`` uses ``fold_in(key, index_offset + i)`` [design].
      z_init: start and centre of the L2 ball (default ``M ⊙ z0``; see :func:`initial_latent`).
      mesh: optional ``jax.sharding.Mesh`` with a ``'data'`` axis: the batch is padded to a
        multiple of its size and sharded over it.
      return_trace: also return the objective at each step, ``[num_steps, B]``.

    Returns:
      ``z_rec[B,H,W,C] = M ⊙ z0 + (1 − M) ⊙ z_var`` (and the trace). Raises
      :class:`NonFiniteObjectiveError` naming the images whose objective or gradient was not
      finite at some step.
    """
    z0 = jnp.asarray(z0)
    if z0.ndim != 4:
        raise ImageSizeError(f"pgd_invert: z0 must be [B, H, W, C]; got shape {z0.shape}")
    mask = jnp.broadcast_to(jnp.asarray(mask, z0.dtype), z0.shape) if jnp.ndim(mask) in (3, 4) \
        else None
    if mask is None:
        raise ImageSizeError("pgd_invert: mask must be [H, W, C] or [B, H, W, C]")
    z_init = mask * z0 if z_init is None else jnp.asarray(z_init, z0.dtype)
    if z_init.shape != z0.shape:
        raise ImageSizeError(f"pgd_invert: z_init shape {z_init.shape} != z0 shape {z0.shape}")
    b = z0.shape[0]
    bad_in = np.flatnonzero(~np.isfinite(np.asarray(z0)).reshape(b, -1).all(axis=1))
    if bad_in.size:
        raise NonFiniteObjectiveError(f"pgd_invert: input latents of images "
                                      f"{(bad_in + index_offset).tolist()} contain NaN/inf")
    n_t = int(sched.num_train_timesteps)
    for name in ("t_max", "project_t"):     # out-of-range timesteps would index silently
        if int(getattr(config, name)) >= n_t:
            raise CGIDMError(f"CGIDMConfig.{name}={getattr(config, name)}: the schedule has "
                             f"timesteps 0..{n_t - 1}")
    radius, step = config.scaled(z0.shape[1:])
    keys = image_keys(key, b, index_offset)

    arrays = (z0, mask, z_init, keys)
    pad = 0
    if mesh is not None:
        from jaxattrib.parallel import data_sharding, replicated_sharding
        n_dev = mesh.shape["data"]
        pad = (-b) % n_dev
        if pad:
            arrays = tuple(jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)]) for a in arrays)
            cond = jax.tree_util.tree_map(
                lambda c: jnp.concatenate([c, jnp.repeat(c[-1:], pad, axis=0)])
                if (np.ndim(c) > 0 and np.shape(c)[0] == b) else c, cond)
        shard, rep = data_sharding(mesh), replicated_sharding(mesh)
        arrays = tuple(jax.device_put(a, shard) for a in arrays)
        cond = jax.tree_util.tree_map(
            lambda c: jax.device_put(c, shard if (np.ndim(c) > 0 and np.shape(c)[0] == b + pad)
                                     else rep), cond)

    fns = (as_denoiser(eps_pre), as_denoiser(eps_ft))
    if mesh is not None:
        fns = jax.device_put(fns, rep)
    loop = _Loop(int(config.num_steps), int(config.t_min), int(config.t_max), int(config.n_noise),
                 int(config.project_t), str(config.project_model), int(config.project_every))
    z_rec, trace, bad = _pgd_jit(fns, sched, *arrays, cond, radius, step, float(config.clamp),
                                 loop=loop)
    if pad:
        z_rec, trace, bad = z_rec[:b], trace[:, :b], bad[:b]
    bad = np.flatnonzero(np.asarray(bad))
    if bad.size:
        raise NonFiniteObjectiveError(
            f"CGI-DM objective/gradient became NaN or inf for images "
            f"{(bad + index_offset).tolist()} (check the models' outputs, the input range and the "
            f"step size)")
    return (z_rec, trace) if return_trace else z_rec


__all__ = ["CGIDMConfig", "CGIDMError", "EpsFn", "ImageSizeError", "IncompatibleModelsError",
           "MASK_KINDS", "NonFiniteObjectiveError", "PROJECT_MODELS", "SD_LATENT_NUMEL",
           "as_denoiser", "batch_masks", "check_compatible", "check_image_size",
           "check_same_config", "checkerboard_mask", "contrastive_objective", "gaussian_blur",
           "image_keys", "initial_latent", "make_mask", "manifold_project", "pgd_invert"]
