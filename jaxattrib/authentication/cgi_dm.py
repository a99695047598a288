"""CGI-DM: copyright authentication by contrasting gradient inversion (methods.md §6).

Question: was image x among the images used to fine-tune θ' from the pretrained θ?

What follows the paper / the authors' code (Nicholas0228/Revelio):

* Latent mask M: a grid of ``block × block`` blocks (4 × 4 on SD's 64 × 64 latent: a 16 × 16
  grid); in each block the top-left and bottom-right ``block/2 × block/2`` cells are kept (a
  checkerboard keeping 50 %), identical for all channels [code].
* ``z_init = encode(decode(M ⊙ z0))``; every evaluation uses ``z = M ⊙ z0 + (1 − M) ⊙ z_var``.
* Where PGD runs: on the **VAE latent**, not on pixels through the encoder [code]. In the
  authors' ``Extractor.py`` the attack's input is ``latents = vae.encode(lowpass image)
  .latent_dist.sample() * scaling_factor`` and ``L2PGDAttack`` perturbs it directly; the VAE
  decoder is used only to make the masked start image and to decode the recovered latent. Both
  encodings (``z0`` and the re-encoding of ``z_init``) are posterior *samples* [code]; with
  ``recover(..., encode_key=...)`` we draw them from recorded per-image keys.
* Maximise ``J(z) = E_{t,ε}[ ||ε_θ(z_t, t, c) − ε||² − ||ε_θ'(z_t, t, c) − ε||² ]`` by L2-PGD:
  ball of radius 70 around ``z_init``, step 2.0, 1000 steps, gradient normalised by its L2 norm,
  values clamped to [−100, 100], one ``t ~ U{1..999}`` per step [code].
* Decode the recovered latent; high similarity(original, recovered) ⇒ used in fine-tuning [paper].

Our design [design]:

* The two models see the **same** (t, ε) at each step (the code draws independent noise per
  model); this is the common-random-numbers estimator of the same objective, with lower variance.
* Batched over images; each image's randomness comes from ``fold_in(key, global index)``, so an
  image's recovery does not depend on the batch it is in nor on the device mesh; batches can be
  sharded over a mesh's ``'data'`` axis. Per-image gradients are taken as the gradient of the sum
  of per-image objectives (valid because the denoisers treat batch rows independently).
* The loss is the per-element mean (as diffusers' training MSE) against the schedule's training
  target (ε, v or x0 by ``prediction_type``); PGD normalises the gradient, so the scale is moot.
* Scale rule for small latents (``scale='sqrt_numel'``): the published radius and step were set
  for SD's 4 × 64 × 64 latent; they are multiplied by ``sqrt(numel / 16384)`` so the per-element
  RMS perturbation is unchanged. ``scale='none'`` uses them as given.
* Manifold projection (``project_t > 0``, off by default): our pixel-space models have no VAE
  decoder to map an iterate back to a natural image, so after each PGD step the unknown half can
  be projected through a denoiser — noised to ``project_t`` with fresh ε and replaced by that
  model's one-step estimate x̂0 (``project_model``: the fine-tuned or the pretrained model),
  every ``project_every`` steps, before the ball projection and the clamp. This plays the role of
  the paper's decoder and keeps iterates near the model's data manifold.
* (t, ε) are drawn afresh at every PGD step (``n_noise`` draws averaged per step), as the
  authors' code does: PGD is stochastic ascent on the expectation, not on a few fixed draws.
* Mask ablations: ``'random_block'`` keeps each ``block/2`` cell independently with probability
  ``keep_rate``; ``'blur'`` keeps nothing exactly (M = 0) and starts from a Gaussian-blurred
  latent (σ = ``blur_sigma`` latent pixels), i.e. the information is removed by a low-pass.
* Each image is paired with its own recovery (the code matches each source to the best of all
  recovered images) and the threshold is calibrated on held-out images, not on the test data;
  p-values are empirical against the hold-out (non-member) scores: ``(1 + #{h ≥ s}) / (1 + n)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Literal, NamedTuple, Sequence

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


# ----------------------------------------------------------------------------- checks


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


# ----------------------------------------------------------------------------- masks


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


# ----------------------------------------------------------------------------- objective


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


# ----------------------------------------------------------------------------- calibration


def empirical_p_values(scores: Any, null_scores: Any) -> np.ndarray:
    """``p_i = (1 + #{h ∈ null : h ≥ s_i}) / (1 + n)`` — small p ⇒ more member-like. ``[N]``."""
    s = np.asarray(scores, np.float64).reshape(-1)
    h = np.sort(np.asarray(null_scores, np.float64).reshape(-1))
    if h.size == 0:
        raise ValueError("empirical_p_values: need at least one hold-out (null) score")
    ge = h.size - np.searchsorted(h, s, side="left")
    return (1.0 + ge) / (1.0 + h.size)


def fpr_threshold(null_scores: Any, fpr: float = 0.05) -> float:
    """The smallest threshold τ (midpoints between distinct null scores, or the next float above
    the largest one) with ``#{h ≥ τ} / n <= fpr`` on the hold-out (non-member) scores. Rule:
    ``score ≥ τ`` ⇒ member. A budget below ``1 / n`` gives the value just above the largest
    null score (no hold-out flagged), not +inf, so scores above every hold-out are still
    flagged."""
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr_threshold: fpr must be in [0, 1]; got {fpr}")
    h = np.sort(np.asarray(null_scores, np.float64).reshape(-1))
    if h.size == 0:
        raise ValueError("fpr_threshold: need at least one hold-out score")
    u = np.unique(h)
    cands = np.r_[u[0] - 1.0, (u[:-1] + u[1:]) / 2.0, np.nextafter(u[-1], np.inf)]
    fp = h.size - np.searchsorted(h, cands, side="left")
    ok = np.flatnonzero(fp / h.size <= fpr + 1e-12)
    return float(cands[ok[0]])


def calibrate(null_scores: Any, member_scores: Any = None, *,
              target: Literal["accuracy", "fpr"] = "fpr", fpr: float = 0.05) -> float:
    """Decision threshold from known non-members (and optionally known members).

    ``target='fpr'``: :func:`fpr_threshold` on the hold-out scores (members unused).
    ``target='accuracy'``: ``jaxattrib.metrics.calibrate_threshold`` on members (positive)
    and hold-outs (negative); needs ``member_scores``.
    """
    if target == "fpr":
        return fpr_threshold(null_scores, fpr)
    if target == "accuracy":
        if member_scores is None or np.size(member_scores) == 0:
            raise ValueError("calibrate(target='accuracy') needs known member scores")
        from jaxattrib.metrics import calibrate_threshold
        s = np.r_[np.asarray(member_scores, np.float64).reshape(-1),
                  np.asarray(null_scores, np.float64).reshape(-1)]
        y = np.r_[np.ones(np.size(member_scores), bool), np.zeros(np.size(null_scores), bool)]
        return calibrate_threshold(s, y, target="accuracy")
    raise ValueError(f"calibrate: target must be 'fpr' or 'accuracy'; got {target!r}")


# ----------------------------------------------------------------------------- end to end


def _identity(x):
    return x


def recover(images: Any, eps_pre: EpsFn, eps_ft: EpsFn, sched: Schedule, config: CGIDMConfig,
            key: jax.Array, *, cond: Any = None, encode: Callable | None = None,
            decode: Callable | None = None, batch_size: int = 8, mesh: Any = None,
            index_offset: int = 0, encode_key: jax.Array | None = None) -> dict:
    """Masks, inverts and decodes a set of images in batches.

    Args:
      images: ``[N, H, W, C]`` pixels in [-1, 1].
      encode / decode: pixel ↔ model-space maps (VAE × scaling factor); identity if None.
        PGD runs on the model-space latents (as the authors' code: the L2 attack perturbs the
        SD latent, the VAE is only used to encode and decode) [code].
      encode_key: if given, ``encode`` is called as ``encode(x[B], keys[B, 2])`` and draws a
        VAE posterior sample per image, as the authors' code (``latent_dist.sample()``) and
        fine-tuning do: ``z0`` from ``fold_in(encode_key, i)`` and the re-encoding of
        ``z_init`` from ``fold_in(fold_in(encode_key, i), 1)``, ``i`` the global image index
        (so batching does not change them). None: ``encode(x)`` (e.g. the posterior mean).
      batch_size: images per PGD batch (a multiple of the mesh size when sharding); every batch,
        the last one included, is padded to this size so the PGD loop compiles once.
      index_offset: global index of ``images[0]`` (for the per-image keys).

    Returns:
      dict of NumPy arrays: ``original``, ``masked`` (= decode(z_init), the PGD start),
      ``recovered`` (= decode(z_rec)), each ``[N, H, W, C]``; ``mask`` ``[N, h, w, c]`` (latent);
      ``trace`` ``[num_steps, N]``.
    """
    images = jnp.asarray(images)
    enc = encode or _identity
    dec = decode or _identity
    n = images.shape[0]
    k_mask, k_pgd = jax.random.split(key)
    bs = batch_size
    out = {"original": [], "masked": [], "recovered": [], "mask": [], "trace": []}
    for lo in range(0, n, bs):
        hi = min(n, lo + bs)
        # the last batch is padded to the batch size (one compiled shape); padding rows dropped
        x = _pad_rows(images[lo:hi], bs)
        c = jax.tree_util.tree_map(lambda a: _pad_rows(a, bs) if np.shape(a)[:1] == (hi - lo,)
                                   else a, _slice_cond(cond, lo, hi, n))
        enc_re = encode
        if encode_key is not None:
            ik = image_keys(encode_key, bs, index_offset + lo)
            ik_re = jax.vmap(lambda k: jax.random.fold_in(k, 1))(ik)
            z0 = encode(x, ik)
            enc_re = functools.partial(_with_keys, encode, ik_re)
        else:
            z0 = enc(x)
        mask = batch_masks(config, z0.shape, k_mask, index_offset + lo)
        z_init = initial_latent(z0, mask, config, enc_re, decode)
        z_rec, trace = pgd_invert(eps_pre, eps_ft, sched, z0, mask, c, config, k_pgd,
                                  z_init=z_init, index_offset=index_offset + lo, mesh=mesh,
                                  return_trace=True)
        m = hi - lo
        out["original"].append(np.asarray(x[:m]))
        out["masked"].append(np.asarray(dec(z_init))[:m])
        out["recovered"].append(np.asarray(dec(z_rec))[:m])
        out["mask"].append(np.asarray(mask)[:m])
        out["trace"].append(np.asarray(trace)[:, :m])
    cat = {k: np.concatenate(v, axis=0) for k, v in out.items() if k != "trace"}
    cat["trace"] = np.concatenate(out["trace"], axis=1)
    return cat


def _with_keys(encode, keys, x):
    return encode(x, keys)


def _pad_rows(a, n):
    """Pads ``a`` along axis 0 to ``n`` rows by repeating its last row."""
    a = jnp.asarray(a)
    if a.shape[0] >= n:
        return a
    return jnp.concatenate([a, jnp.repeat(a[-1:], n - a.shape[0], axis=0)])


def _sim_batched(sim, a, b, batch_size):
    return np.concatenate([np.asarray(sim(jnp.asarray(a[i:i + batch_size]),
                                          jnp.asarray(b[i:i + batch_size])))
                           for i in range(0, a.shape[0], batch_size)])


def authenticate(images: Any, eps_pre: EpsFn, eps_ft: EpsFn, sched: Schedule,
                 config: CGIDMConfig, key: jax.Array, *, holdout_images: Any = None,
                 holdout_scores: Any = None, member_images: Any = None, cond: Any = None,
                 holdout_cond: Any = None, member_cond: Any = None,
                 encode: Callable | None = None, decode: Callable | None = None,
                 similarity: str | Callable = "ssim", embed: simlib.EmbedFn | None = None,
                 data_range: float = 2.0, image_size: int | Sequence[int] | None = None,
                 target: Literal["accuracy", "fpr"] = "fpr", fpr: float = 0.05,
                 batch_size: int = 8, mesh: Any = None,
                 check_params: tuple[Any, Any] | None = None) -> dict:
    """Decides, per image, whether it was used to fine-tune ``eps_ft`` from ``eps_pre``.

    Each image (and each calibration image) is recovered by :func:`recover`; its score is
    ``similarity(original, recovered)`` (larger ⇒ more member-like). The threshold and p-values
    come from known non-members: ``holdout_images`` (recovered the same way) or precomputed
    ``holdout_scores`` (a user-supplied reference set); with ``target='accuracy'`` known members
    (``member_images``) are also needed.

    Args:
      images: query images ``[N, H, W, C]`` in [-1, 1].
      similarity: 'ssim' | 'psnr' | 'embedding' | callable ``(x, y) -> [B]``; when ``embed`` is
        given and ``similarity='embedding'`` the cosine of embeddings is used (for a UNet-tap
        embedding pass :func:`similarity.tap_embedding_fn`).
      image_size: expected ``(H, W)`` (or int) of the model; checked for every image set.
      target, fpr: calibration rule (see :func:`calibrate`).
      check_params: optional ``(params_pre, params_ft)`` checked by :func:`check_compatible`
        before any work.

    Returns:
      dict: ``scores`` ``[N]``, ``p_values`` ``[N]``, ``decisions`` ``[N]`` bool (``score ≥
      threshold``), ``threshold``, ``calibration`` (``split``, ``target``, ``fpr``,
      ``holdout_scores``, ``member_scores``), and ``original``/``masked``/``recovered`` ``[N, H, W,
      C]`` NumPy images for the report.
    """
    if check_params is not None:
        check_compatible(*check_params)
    check_image_size(images, image_size)
    for extra, name in ((holdout_images, "holdout_images"), (member_images, "member_images")):
        if extra is not None:
            try:
                check_image_size(extra, image_size, channels=np.shape(images)[-1])
            except ImageSizeError as e:
                raise ImageSizeError(f"{name}: {e}") from e
    if holdout_images is None and holdout_scores is None:
        raise ValueError("authenticate: pass holdout_images (known non-members) or "
                         "holdout_scores (a reference set) to calibrate the decision")
    sim = simlib.get_similarity("embedding" if (embed is not None and similarity == "embedding")
                                else similarity, data_range=data_range, embed=embed)
    k_q, k_h, k_m = jax.random.split(key, 3)
    common = dict(encode=encode, decode=decode, batch_size=batch_size, mesh=mesh)

    def scored(x, k, c):
        r = recover(x, eps_pre, eps_ft, sched, config, k, cond=c, **common)
        return _sim_batched(sim, r["original"], r["recovered"], batch_size), r

    scores, rec = scored(images, k_q, cond)
    split = []
    if holdout_images is not None:
        null, _ = scored(holdout_images, k_h, holdout_cond)
        split.append("holdout_images")
    else:
        null = np.asarray(holdout_scores, np.float64).reshape(-1)
        split.append("holdout_scores")
    members = None
    if member_images is not None:
        members, _ = scored(member_images, k_m, member_cond)
        split.append("member_images")
    for name, arr in (("query", scores), ("hold-out", null)) + (
            (("member", members),) if members is not None else ()):
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            raise NonFiniteObjectiveError(f"authenticate: {name} similarity scores are not finite "
                                          f"for images {bad.tolist()}")
    thr = calibrate(null, members, target=target, fpr=fpr)
    return {
        "scores": scores,
        "p_values": empirical_p_values(scores, null),
        "decisions": scores >= thr,
        "threshold": thr,
        "calibration": {"split": "+".join(split), "target": target, "fpr": fpr,
                        "holdout_scores": np.asarray(null),
                        "member_scores": None if members is None else np.asarray(members)},
        "original": rec["original"], "masked": rec["masked"], "recovered": rec["recovered"],
        "trace": rec["trace"],
    }


# ----------------------------------------------------------------------------- baselines


def loss_gap_scores(images: Any, eps_pre: EpsFn, eps_ft: EpsFn, sched: Schedule,
                    key: jax.Array, *, cond: Any = None, encode: Callable | None = None,
                    n_draws: int = 8, t_min: int = 1, t_max: int = 999,
                    batch_size: int = 8) -> np.ndarray:
    """Baseline: ``L_pre − L_ft`` on the unmasked latent, no inversion. ``[N]``, larger ⇒ member.

    The same ``n_draws`` (t, ε) pairs, drawn once from ``key``, are used for every image and both
    models (fixed (t, ε)). Raises :class:`NonFiniteObjectiveError` naming the images whose gap
    is NaN/inf.
    """
    images = jnp.asarray(images)
    enc = encode or _identity
    n = images.shape[0]
    kt, kn = jax.random.split(key)
    out = []
    t_all = noise_one = None
    fns = (as_denoiser(eps_pre), as_denoiser(eps_ft))
    for lo in range(0, n, batch_size):
        hi = min(n, lo + batch_size)
        z = enc(images[lo:hi])
        if t_all is None:
            t_all = jax.random.randint(kt, (n_draws,), t_min, t_max + 1)
            noise_one = jax.random.normal(kn, (n_draws,) + z.shape[1:], z.dtype)
        b = hi - lo
        # one compiled draw, called n_draws times (jit over all draws unrolls n_draws UNet
        # pairs: minutes of compilation); the last batch is padded to the batch size
        z = _pad_rows(z, batch_size)
        c = jax.tree_util.tree_map(lambda a: _pad_rows(a, batch_size)
                                   if np.shape(a)[:1] == (b,) else a,
                                   _slice_cond(cond, lo, hi, n))
        total = np.zeros(batch_size, np.float64)
        for k in range(n_draws):
            t = jnp.broadcast_to(t_all[k], (1, batch_size))
            noise = jnp.broadcast_to(noise_one[k], (1, batch_size) + z.shape[1:])
            total += np.asarray(_objective_jit(fns, sched, z, t, noise, c), np.float64)
        out.append(total[:b] / n_draws)
    out = np.concatenate(out)
    bad = np.flatnonzero(~np.isfinite(out))
    if bad.size:
        raise NonFiniteObjectiveError(
            f"loss_gap_scores: the loss gap is NaN or inf for images {bad.tolist()} (check the "
            f"models' outputs and the input range)")
    return out


def masked_similarity_scores(images: Any, config: CGIDMConfig, key: jax.Array, *,
                             encode: Callable | None = None, decode: Callable | None = None,
                             similarity: str | Callable = "ssim",
                             embed: simlib.EmbedFn | None = None, data_range: float = 2.0,
                             batch_size: int = 8) -> np.ndarray:
    """Baseline: similarity of the masked start ``decode(z_init)`` to the original, no models.
    ``[N]``. (Uses the same masks as :func:`recover` with the same ``key``.)"""
    images = jnp.asarray(images)
    enc, dec = encode or _identity, decode or _identity
    sim = simlib.get_similarity(similarity, data_range=data_range, embed=embed)
    k_mask, _ = jax.random.split(key)
    out = []
    for lo in range(0, images.shape[0], batch_size):
        x = images[lo:lo + batch_size]
        z0 = enc(x)
        mask = batch_masks(config, z0.shape, k_mask, lo)
        out.append(np.asarray(sim(x, dec(initial_latent(z0, mask, config, encode, decode)))))
    return np.concatenate(out)
