"""Source-model attribution: was a suspicious model trained on images my model generated?

Zhang et al., "Training Data Attribution: Was Your Model Secretly Trained On Data Created By
Mine?" (arXiv 2409.15781; methods.md §7). From the paper [paper]: memorization transfers (a
model fine-tuned on a source's generations inherits its near-exact reproductions on the same
prompts). Instance level: N = 30 *key samples* on which the source memorizes idiosyncratically
(Strategy 1, detection; Strategy 2, generation), the suspect queried with their prompts, a hit
when ``d_i < δ0`` (δ0 = 0.15), ``conf`` = hit rate. Statistical level: shadow models fine-tuned
with generated fraction ``ρ ∈ {0.3, 0.5, 0.7, 1.0}`` (infringing) or 0 (innocent) train a
discriminator evaluated on held-out suspects. Baselines: random keys; a 32-bit watermark
(:mod:`.watermark`).

Our design [design] (the exact strategies, distance and conf formula were not published in reach):
* **Distance** (:func:`reconstruction_distance`): ``'rmse'`` (default) = RMS pixel difference in
  **[0, 1] units** (images in [-1, 1]: ``sqrt(mean(((a-b)/2)²))``), 0 iff identical; ``δ0 =
  0.15`` is PSNR > 16.5 dB. ``'ssim'``: ``1 − SSIM`` (data range 2). What δ0 = 0.15 accepts in
  each unit (measured): docs/benchmarks/calibrations.md.
* **Strategy 1 (detection)**: Wen et al.'s (ICLR 2024) ``‖ε(x_t, c) − ε(x_t, ∅)‖`` (per-element
  RMS, ``x_t ~ N(0, I)``, high-noise timesteps, mean over seeds and timesteps, common noises),
  or consistency across seeds (lower mean pairwise distance = more memorized).
* **Strategy 2 (generation)**: S seeds per candidate prompt from the source and an independent
  reference model; ``score = cross − within`` (mean pairwise distance among the source's S
  generations; mean source-vs-reference distance over seed pairs): "the source always draws the
  same thing, and the reference does not draw it".
* **Seeds**: ``generate_fn(prompts, key) -> images [P, H, W, C]`` in [-1, 1], image ``i`` a
  function of ``(prompt i, key, i)`` (:func:`jaxattrib.generate.generate`, ``fold_in(key, i)``);
  seed ``s`` = ``PRNGKey(s)``. Key images and the suspect's answers both come from :func:`query`
  on the same ordered key-prompt list and seeds, so image ``i`` starts from the same noise.
  Instance conf = mean of ``d < δ0`` over keys (and seeds); :func:`calibrate_on_innocent`: the
  threshold from innocent models at an FPR budget.
* **Statistical features** (:func:`probe_features`): per probe prompt the same-seed distance
  (mean over seeds); quantiles, mean, hit rates. :class:`Discriminator`: standardized logistic
  regression (or 1-hidden-layer MLP), L2, full-batch Adam, explicit key, class-balanced loss.
* **Model zoo** (:func:`build_model_zoo`, :func:`build_source_model`): fine-tuned from the base
  on ``n_train`` examples, ``round(ρ·n_train)`` of them the source's generations (per-member
  seed, without replacement); cached as ``members/<name>/params.msgpack`` + ``zoo.json``,
  resumable, another configuration refused. ``finetune_fn(init_params, dataset, seed, workdir)
  -> params``; :func:`diffusion_finetune_fn` wraps :func:`jaxattrib.train.finetune.finetune`.
Flow: ``build_source_model`` → :func:`pipeline_generate_fn` → ``build_model_zoo`` → keys →
:func:`query` → :func:`instance_confidence`; :func:`probe_features` → :class:`Discriminator`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, NamedTuple, Sequence

import flax.serialization
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxattrib.authentication import similarity as simlib


EpsFn = Callable[[jnp.ndarray, jnp.ndarray, Any], jnp.ndarray]


GenerateFn = Callable[[Sequence[str], jax.Array], Any]


Metric = Literal["rmse", "ssim"]


METRICS = ("rmse", "ssim")


STRATEGIES = ("detection", "generation", "random")


DEFAULT_N = 30


DEFAULT_DELTA0 = 0.15


class SourceModelError(ValueError):
    """Bad input to a source-model attribution function."""


def reconstruction_distance(a, b, metric: Metric = "rmse") -> jnp.ndarray:
    """Distance between images ``a`` and ``b`` of shape ``[..., H, W, C]`` in [-1, 1] -> ``[...]``.

    ``'rmse'``: ``sqrt(mean(((a - b) / 2)²))`` over H, W, C — RMS difference in [0, 1] pixel
    units, in [0, 1]. ``'ssim'``: ``1 − SSIM`` (Gaussian 11-tap window, or the largest odd window
    that fits smaller images; data range 2), in [0, 2]. See the module docstring for δ0.
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.shape != b.shape or a.ndim < 3:
        raise SourceModelError(f"reconstruction_distance: expected two [..., H, W, C] arrays of "
                               f"equal shape; got {a.shape} and {b.shape}")
    if metric == "rmse":
        dt = jnp.promote_types(a.dtype, jnp.float32)
        d = (a.astype(dt) - b.astype(dt)) / 2.0
        return jnp.sqrt(jnp.mean(d * d, axis=(-3, -2, -1)))
    if metric == "ssim":
        lead = a.shape[:-3]
        h, w, c = a.shape[-3:]
        win = min(11, h, w)
        win -= 1 - win % 2
        s = simlib.ssim(a.reshape(-1, h, w, c), b.reshape(-1, h, w, c), win_size=win)
        return (1.0 - s).reshape(lead)
    raise SourceModelError(f"metric={metric!r}; expected one of {METRICS}")


def _check_stack(images, name: str, ndim: int = 5) -> jnp.ndarray:
    images = jnp.asarray(images)
    if images.ndim != ndim:
        raise SourceModelError(f"{name}: expected [S, P, H, W, C] (seeds, prompts, image); got "
                               f"shape {images.shape}")
    return images


def within_distance(images, metric: Metric = "rmse") -> jnp.ndarray:
    """Mean pairwise distance over seeds, per prompt: ``images [S, P, H, W, C]`` -> ``[P]``.

    ``mean_{s < s'} d(images[s, p], images[s', p])``; needs S >= 2. Lower = more consistent.
    """
    images = _check_stack(images, "within_distance")
    S = images.shape[0]
    if S < 2:
        raise SourceModelError(f"within_distance: need at least 2 seeds, got {S}")
    i, j = np.triu_indices(S, k=1)
    return reconstruction_distance(images[i], images[j], metric).mean(axis=0)


def cross_distance(images_a, images_b, metric: Metric = "rmse") -> jnp.ndarray:
    """Mean distance over all seed pairs per prompt: ``[S, P, ...]``, ``[S', P, ...]`` -> ``[P]``.

    ``mean_{s, s'} d(images_a[s, p], images_b[s', p])`` (Strategy 2's idiosyncrasy when ``b`` is
    an independent reference model).
    """
    a = _check_stack(images_a, "cross_distance")
    b = _check_stack(images_b, "cross_distance")
    if a.shape[1:] != b.shape[1:]:
        raise SourceModelError(f"cross_distance: prompts/image shapes differ: {a.shape[1:]} vs "
                               f"{b.shape[1:]}")
    i, j = np.meshgrid(np.arange(a.shape[0]), np.arange(b.shape[0]), indexing="ij")
    return reconstruction_distance(a[i.ravel()], b[j.ravel()], metric).mean(axis=0)


def query(generate_fn: GenerateFn, prompts: Sequence[str], seeds: Sequence[int]) -> jnp.ndarray:
    """Generations of every prompt for every seed: ``[S, P, H, W, C]``.

    ``generate_fn(prompts, jax.random.PRNGKey(seed))`` is called once per seed with the whole
    ordered prompt list (see the module docstring for the seed contract).
    """
    prompts = list(prompts)
    if not prompts:
        raise SourceModelError("query: no prompts given")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise SourceModelError("query: no seeds given")
    out = []
    for s in seeds:
        imgs = jnp.asarray(generate_fn(prompts, jax.random.PRNGKey(s)))
        if imgs.ndim != 4 or imgs.shape[0] != len(prompts):
            raise SourceModelError(f"query: generate_fn returned shape {imgs.shape} for "
                                   f"{len(prompts)} prompts; expected [P, H, W, C]")
        out.append(imgs)
    return jnp.stack(out)


def pipeline_generate_fn(pipe, unet_params=None, **generate_kwargs) -> GenerateFn:
    """``generate_fn(prompts, key) -> images [P, H, W, 3]`` of a loaded pipeline.

    Wraps :func:`jaxattrib.generate.generate` (``unet_params`` overrides the pipeline's UNet,
    e.g. a zoo member's ``params['unet']``; other keyword arguments such as
    ``num_inference_steps`` and ``guidance_scale`` are passed through).
    """
    from jaxattrib.generate import generate

    def generate_fn(prompts, key):
        return generate(pipe, list(prompts), key, unet_params=unet_params,
                        **generate_kwargs).images
    return generate_fn


def generation_consistency(generate_fn: GenerateFn, prompts: Sequence[str],
                           seeds: Sequence[int], metric: Metric = "rmse") -> jnp.ndarray:
    """Mean pairwise distance between a model's generations of each prompt over ``seeds``: ``[P]``.

    Lower = more consistent (a memorization signal: Strategy 1's alternative and Strategy 2's
    ``within`` term).
    """
    return within_distance(query(generate_fn, prompts, seeds), metric)


def memorization_signal(eps_fn: EpsFn, sched, prompts_ctx, uncond_ctx, key: jax.Array, *,
                        sample_shape: Sequence[int], n_seeds: int = 4,
                        timesteps: Sequence[int] | None = None,
                        batch_size: int = 16) -> jnp.ndarray:
    """Wen et al.'s text-conditional noise magnitude per prompt (Strategy 1): ``[P]``.

    ``signal_p = mean_{s, t} RMS(ε(x_s, t, c_p) − ε(x_s, t, ∅))`` with ``x_s = normal(fold_in(key,
    s), sample_shape)`` (shared by all prompts) and RMS over the sample's elements.

    Args:
      eps_fn: denoiser ``(x_t [B, h, w, c], t [B] int32, ctx [B, L, D]) -> [B, h, w, c]``.
      sched: the model's :class:`~jaxattrib.diffusion.schedule.Schedule` (for the default
        timesteps).
      prompts_ctx: text conditioning ``[P, L, D]`` (e.g. ``pipe.encode_prompts(prompts)``).
      uncond_ctx: the empty prompt's conditioning ``[L, D]`` or ``[1, L, D]``.
      key: PRNG key of the noises.
      sample_shape: ``(h, w, c)`` of one UNet sample (latent).
      n_seeds: number of noises ``x_s``.
      timesteps: default ``T−1, ⌊0.9T⌋, ⌊0.8T⌋`` (high noise, where ``x_t`` is about N(0, I)).
      batch_size: prompts per denoiser call (each call evaluates ``2·batch_size`` samples).
    Returns:
      ``[P]`` float32, larger = stronger memorization.
    """
    ctx = jnp.asarray(prompts_ctx)
    unc = jnp.asarray(uncond_ctx)
    if unc.ndim == ctx.ndim:
        unc = unc[0]
    if ctx.ndim != 3 or unc.shape != ctx.shape[1:]:
        raise SourceModelError(f"memorization_signal: prompts_ctx must be [P, L, D] and "
                               f"uncond_ctx [L, D]; got {ctx.shape} and {jnp.shape(uncond_ctx)}")
    T = sched.num_train_timesteps
    ts = (T - 1, int(0.9 * T), int(0.8 * T)) if timesteps is None else tuple(timesteps)
    if not ts or n_seeds < 1:
        raise SourceModelError("memorization_signal: need at least one timestep and one seed")
    shape = tuple(int(s) for s in sample_shape)
    noises = jnp.stack([jax.random.normal(jax.random.fold_in(key, s), shape)
                        for s in range(n_seeds)])                   # [S, h, w, c]
    grid = [(s, t) for s in range(n_seeds) for t in ts]
    xs = noises[np.array([g[0] for g in grid])]                     # [G, h, w, c]
    tg = jnp.asarray([g[1] for g in grid], jnp.int32)               # [G]

    @jax.jit
    def chunk_signal(c):                                            # c [b, L, D] -> [b]
        b, G = c.shape[0], xs.shape[0]
        x = jnp.broadcast_to(xs[None], (b, *xs.shape)).reshape(b * G, *shape)
        t = jnp.broadcast_to(tg[None], (b, G)).reshape(b * G)
        cc = jnp.repeat(c, G, axis=0)
        uu = jnp.broadcast_to(unc[None], cc.shape)
        out = eps_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                     jnp.concatenate([cc, uu]))
        diff = (out[:b * G] - out[b * G:]).astype(jnp.float32)
        rms = jnp.sqrt(jnp.mean(diff * diff, axis=tuple(range(1, diff.ndim))))
        return rms.reshape(b, G).mean(axis=1)

    out = [chunk_signal(ctx[i:i + batch_size]) for i in range(0, ctx.shape[0], batch_size)]
    return jnp.concatenate(out)


class KeySamples(NamedTuple):
    """Selected key samples: ``indices [N]`` into the candidates, their ``prompts`` and
    ``scores [N]`` (descending; NaN for random selection), and the ``strategy``."""

    indices: np.ndarray
    prompts: tuple[str, ...]
    scores: np.ndarray
    strategy: str


def generation_scores(source_images, reference_images, metric: Metric = "rmse") -> jnp.ndarray:
    """Strategy 2 score per prompt: ``cross(source, reference) − within(source)``; ``[P]``.

    ``source_images [S, P, ...]`` (S >= 2), ``reference_images [S', P, ...]``.
    """
    return (cross_distance(source_images, reference_images, metric)
            - within_distance(source_images, metric))


def select_key_samples(prompts: Sequence[str], strategy: str = "detection",
                       n: int = DEFAULT_N, *, memorization=None, consistency=None,
                       idiosyncrasy=None, key: jax.Array | None = None) -> KeySamples:
    """Chooses ``n`` key prompts among the candidates.

    Args:
      prompts: the P candidate prompts.
      strategy: ``'detection'`` (Strategy 1): the ``n`` largest ``memorization`` scores
        (:func:`memorization_signal`), or when it is not given the ``n`` smallest
        ``consistency`` distances (:func:`generation_consistency`). ``'generation'``
        (Strategy 2): the ``n`` largest ``idiosyncrasy − consistency`` (:func:`cross_distance`
        to a reference model minus :func:`within_distance`; see :func:`generation_scores`).
        ``'random'`` (baseline): ``n`` prompts uniformly without replacement from ``key``.
      memorization, consistency, idiosyncrasy: ``[P]`` scores.
    Ties are broken by candidate index (stable sort).
    """
    prompts = tuple(str(p) for p in prompts)
    P = len(prompts)
    if not 1 <= n <= P:
        raise SourceModelError(f"select_key_samples: n={n} must be in [1, {P}] (candidates)")

    def vec(x, name):
        x = np.asarray(x, np.float64).reshape(-1)
        if x.shape != (P,):
            raise SourceModelError(f"select_key_samples: {name} has {x.size} entries for {P} "
                                   f"prompts")
        if not np.all(np.isfinite(x)):
            raise SourceModelError(f"select_key_samples: {name} is not finite")
        return x

    if strategy == "detection":
        if memorization is not None:
            score = vec(memorization, "memorization")
        elif consistency is not None:
            score = -vec(consistency, "consistency")
        else:
            raise SourceModelError("strategy 'detection' needs memorization or consistency")
    elif strategy == "generation":
        if consistency is None or idiosyncrasy is None:
            raise SourceModelError("strategy 'generation' needs consistency and idiosyncrasy")
        score = vec(idiosyncrasy, "idiosyncrasy") - vec(consistency, "consistency")
    elif strategy == "random":
        if key is None:
            raise SourceModelError("strategy 'random' needs an explicit PRNG key")
        idx = np.asarray(jax.random.choice(key, P, (n,), replace=False), np.int64)
        return KeySamples(idx, tuple(prompts[i] for i in idx), np.full(n, np.nan), strategy)
    else:
        raise SourceModelError(f"strategy={strategy!r}; expected one of {STRATEGIES}")
    idx = np.argsort(-score, kind="stable")[:n].astype(np.int64)
    return KeySamples(idx, tuple(prompts[i] for i in idx), score[idx], strategy)


def instance_distances(source_key_images, suspicious_images,
                       metric: Metric = "rmse") -> jnp.ndarray:
    """Same-position distances ``d_i``: two ``[N, H, W, C]`` (or ``[S, N, H, W, C]``) -> ``[N]``
    (or ``[S, N]``)."""
    return reconstruction_distance(source_key_images, suspicious_images, metric)


def instance_confidence(source_key_images, suspicious_images, delta0: float = DEFAULT_DELTA0,
                        metric: Metric = "rmse") -> float:
    """``conf`` = hit rate ``mean(d_i < δ0)`` over key samples (and seeds), in [0, 1]."""
    d = instance_distances(source_key_images, suspicious_images, metric)
    return float(jnp.mean(d < delta0))


def calibrate_delta0(innocent_distances, innocent_hit_rate: float = 0.05) -> float:
    """Hit threshold δ0 chosen on models known to be innocent (``decision.delta0='calibrated'``).

    ``innocent_distances``: any array of same-seed distances ``d`` between the source's and
    innocent models' generations (e.g. ``[M, S, P]``: M innocent models, S seeds, P prompts;
    pooled). Returns the order statistic ``sort(d)[floor(innocent_hit_rate * n)]``, so that at
    most that fraction of the pooled innocent distances is a hit (``d < δ0``, ties excluded):
    an innocent model's expected ``conf`` is ``innocent_hit_rate`` whatever the unit, the
    metric or how close the models are to each other [design: the paper's δ0 = 0.15 is a
    fixed RMS that, where innocent models share the source's base and noise, already hits
    half of the key samples]. Choose the prompts and models independently of the models
    being evaluated (a calibration split); with fewer than ``1 / innocent_hit_rate``
    distances the result is their minimum (no innocent hit at all).
    """
    d = np.sort(np.asarray(innocent_distances, np.float64).reshape(-1))
    if d.size == 0 or not np.all(np.isfinite(d)):
        raise SourceModelError("calibrate_delta0: need finite distances of >= 1 innocent model")
    if not 0.0 < innocent_hit_rate < 1.0:
        raise SourceModelError(f"calibrate_delta0: innocent_hit_rate must be in (0, 1); got "
                               f"{innocent_hit_rate}")
    return float(d[int(np.floor(innocent_hit_rate * d.size + 1e-9))])


def calibrate_on_innocent(confs_innocent, fpr: float = 0.05) -> float:
    """Threshold τ on ``conf`` (rule ``conf >= τ`` ⇒ infringing) from innocent models only.

    The smallest candidate whose FPR on the innocent confs is ``<= fpr``. Candidates are the
    midpoints between consecutive distinct innocent confs and ``nextafter(max, +inf)`` (just
    above every innocent model), so a suspicious model is flagged only when it beats that many
    innocents [design].
    """
    c = np.asarray(confs_innocent, np.float64).reshape(-1)
    if c.size == 0 or not np.all(np.isfinite(c)):
        raise SourceModelError("calibrate_on_innocent: need finite confs of >= 1 innocent model")
    if not 0.0 <= fpr <= 1.0:
        raise SourceModelError(f"calibrate_on_innocent: fpr must be in [0, 1]; got {fpr}")
    u = np.unique(c)
    cands = np.r_[u[0], (u[:-1] + u[1:]) / 2.0, np.nextafter(u[-1], np.inf)]
    fp = np.array([(c >= t).mean() for t in cands])
    return float(cands[np.flatnonzero(fp <= fpr + 1e-12)[0]])


DEFAULT_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


DEFAULT_DELTAS = (0.05, 0.1, 0.15, 0.2)


def probe_feature_names(quantiles: Sequence[float] = DEFAULT_QUANTILES,
                        deltas: Sequence[float] = DEFAULT_DELTAS) -> tuple[str, ...]:
    """Names of the entries of :func:`probe_features`, in order."""
    return (tuple(f"q{q:g}" for q in quantiles) + ("mean",)
            + tuple(f"hit@{d:g}" for d in deltas))


def probe_features(source_images, suspicious_images, metric: Metric = "rmse", *,
                   quantiles: Sequence[float] = DEFAULT_QUANTILES,
                   deltas: Sequence[float] = DEFAULT_DELTAS) -> np.ndarray:
    """Features of one suspicious model's behaviour on the probe prompts: ``[F]`` float64.

    Per probe prompt p, ``d_p = mean_s d(source[s, p], suspicious[s, p])`` (same seeds); the
    features are the ``quantiles`` of ``{d_p}``, their mean, and the hit rates
    ``mean_p(d_p < δ)`` for each δ in ``deltas`` (names: :func:`probe_feature_names`).
    Inputs: ``[S, P, H, W, C]`` (or ``[P, H, W, C]`` for one seed).
    """
    a, b = jnp.asarray(source_images), jnp.asarray(suspicious_images)
    if a.ndim == 4:
        a, b = a[None], b[None]
    if a.shape != b.shape or a.ndim != 5:
        raise SourceModelError(f"probe_features: expected two [S, P, H, W, C] arrays of equal "
                               f"shape; got {jnp.shape(source_images)} and "
                               f"{jnp.shape(suspicious_images)}")
    d = np.asarray(reconstruction_distance(a, b, metric), np.float64).mean(axis=0)
    return np.r_[np.quantile(d, np.asarray(quantiles)), d.mean(),
                 [(d < t).mean() for t in deltas]]


@flax.struct.dataclass
class DiscriminatorState:
    """A fitted discriminator: feature ``mean [F]`` and ``std [F]`` of the training set and the
    network ``params``."""

    mean: jnp.ndarray
    std: jnp.ndarray
    params: Any


@dataclasses.dataclass(frozen=True)
class Discriminator:
    """Binary discriminator (infringing vs innocent) on standardized features.

    ``hidden = 0``: logistic regression ``σ(w·z + b)``; ``hidden > 0``: one tanh hidden layer.
    ``z = (x − mean) / std`` with the training set's statistics (``std`` floored at 1e-8, so a
    constant feature becomes 0). Loss: class-balanced (if ``balance``) mean logistic loss +
    ``l2/2 · Σ‖W‖²`` over weight matrices (not biases); ``steps`` full-batch Adam updates at
    ``learning_rate``; weights initialised ``N(0, init_scale²)`` from the key given to
    :meth:`fit`. Deterministic given the key.
    """

    hidden: int = 0
    l2: float = 1e-3
    learning_rate: float = 0.05
    steps: int = 500
    init_scale: float = 0.01
    balance: bool = True

    def _init(self, key, f):
        k1, k2 = jax.random.split(key)
        if self.hidden <= 0:
            return {"w": self.init_scale * jax.random.normal(k1, (f,)), "b": jnp.zeros(())}
        return {"w1": self.init_scale * jax.random.normal(k1, (f, self.hidden)),
                "b1": jnp.zeros((self.hidden,)),
                "w": self.init_scale * jax.random.normal(k2, (self.hidden,)),
                "b": jnp.zeros(())}

    @staticmethod
    def _logits(params, z):
        if "w1" in params:
            z = jnp.tanh(z @ params["w1"] + params["b1"])
        return z @ params["w"] + params["b"]

    def fit(self, features, labels, key: jax.Array) -> DiscriminatorState:
        """Trains on ``features [M, F]`` and ``labels [M]`` (1 = infringing)."""
        x = jnp.asarray(features, jnp.float32)
        y = np.asarray(labels).reshape(-1)
        if x.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise SourceModelError(f"Discriminator.fit: features [M, F] and labels [M] expected; "
                                   f"got {x.shape} and {y.shape}")
        if not np.isin(y, (0, 1)).all() or y.min() == y.max():
            raise SourceModelError("Discriminator.fit: labels must be 0/1 with both classes")
        y = jnp.asarray(y, jnp.float32)
        mean, std = x.mean(axis=0), jnp.maximum(x.std(axis=0), 1e-8)
        z = (x - mean) / std
        if self.balance:
            pos = y.sum()
            wts = jnp.where(y > 0, 0.5 / pos, 0.5 / (y.size - pos))
        else:
            wts = jnp.full(y.shape, 1.0 / y.size)
        opt = optax.adam(self.learning_rate)

        def loss(p):
            data = jnp.sum(wts * optax.sigmoid_binary_cross_entropy(self._logits(p, z), y))
            reg = sum(jnp.sum(v * v) for k, v in p.items() if k.startswith("w"))
            return data + 0.5 * self.l2 * reg

        @jax.jit
        def train(p0):
            def body(carry, _):
                p, s = carry
                g = jax.grad(loss)(p)
                u, s = opt.update(g, s, p)
                return (optax.apply_updates(p, u), s), None
            (p, _), _ = jax.lax.scan(body, (p0, opt.init(p0)), None, length=self.steps)
            return p

        params = train(self._init(key, x.shape[1]))
        return DiscriminatorState(mean=mean, std=std, params=params)

    def decision_function(self, state: DiscriminatorState, features) -> jnp.ndarray:
        """Logits ``[M]`` (larger = more likely infringing)."""
        z = (jnp.asarray(features, jnp.float32) - state.mean) / state.std
        return self._logits(state.params, z)

    def predict_proba(self, state: DiscriminatorState, features) -> jnp.ndarray:
        """P(infringing) ``[M]``."""
        return jax.nn.sigmoid(self.decision_function(state, features))

    def predict(self, state: DiscriminatorState, features, threshold: float = 0.5) -> np.ndarray:
        """Boolean decisions ``[M]``: ``predict_proba >= threshold``."""
        return np.asarray(self.predict_proba(state, features) >= threshold)


__all__ = ["DEFAULT_DELTA0", "DEFAULT_DELTAS", "DEFAULT_N", "DEFAULT_QUANTILES", "Discriminator",
           "DiscriminatorState", "EpsFn", "GenerateFn", "KeySamples", "METRICS", "Metric",
           "STRATEGIES", "SourceModelError", "calibrate_delta0", "calibrate_on_innocent",
           "cross_distance", "generation_consistency", "generation_scores", "instance_confidence",
           "instance_distances", "memorization_signal", "pipeline_generate_fn",
           "probe_feature_names", "probe_features", "query", "reconstruction_distance",
           "select_key_samples", "within_distance"]
