"""MONTRAGE: representation extraction (direct recomputation, 1 vs 8 devices), shifted cosine,
trajectory over a record (cache + resume, live monitor), aggregation and learned weights on
constructed ground truth, paper-style evaluation helpers, and a small end-to-end fine-tune."""

import json
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from scipy import stats

from jaxattrib import parallel
from jaxattrib.attribution import montrage as M
from jaxattrib.diffusion.losses import fixed_noise
from jaxattrib.diffusion.schedule import add_noise, make_schedule
from jaxattrib.metrics import recall_at_k
from jaxattrib.models import unet
from jaxattrib.train.record import TrajectoryRecord

CFG = unet.tiny_config(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                       norm_num_groups=4, cross_attention_dim=8)
TAPS = ("mid", "up_0")


@pytest.fixture(scope="module")
def params():
    # Flax-like random init from the parameter shapes (shape evaluation only: no compile)
    shapes = unet.param_shapes(CFG)
    paths, tree = jax.tree_util.tree_flatten_with_path(shapes)
    rng = np.random.default_rng(0)
    leaves = []
    for path, s in paths:
        name = str(path[-1].key)
        if name == "scale":
            leaves.append(np.ones(s.shape, np.float32))
        elif name == "bias":
            leaves.append(rng.normal(scale=0.02, size=s.shape).astype(np.float32))
        else:
            fan_in = int(np.prod(s.shape[:-1])) or 1
            leaves.append((rng.normal(size=s.shape) / np.sqrt(fan_in)).astype(np.float32))
    return jax.tree.unflatten(tree, [jnp.asarray(v) for v in leaves])


def _images(n, seed):
    return np.random.default_rng(seed).uniform(-1, 1, (n, 8, 8, 3)).astype(np.float32)


def _ctx(n, seed):
    return np.random.default_rng(seed).normal(size=(n, 2, 8)).astype(np.float32)


# ----------------------------------------------------------------------------- extraction
def test_representations_match_direct_computation_and_devices(params):
    x, c = _images(13, 0), _ctx(13, 1)
    kw = dict(taps=TAPS, t=300, noise_seed=5)
    r8 = M.extract_representations(CFG, params, x, c, batch_size=8, mesh=parallel.make_mesh(8),
                                   **kw)
    assert r8.shape == (13, 32) and r8.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(r8, axis=1), 1.0, rtol=1e-6)
    # deterministic
    np.testing.assert_array_equal(
        r8, M.extract_representations(CFG, params, x, c, batch_size=8,
                                      mesh=parallel.make_mesh(8), **kw))
    # one device with the same per-device batch (1): bit-identical
    r1 = M.extract_representations(CFG, params, x, c, batch_size=1, mesh=parallel.make_mesh(1),
                                   **kw)
    np.testing.assert_array_equal(r1, r8)
    # direct recomputation: fixed (t, eps) shared by all images, mean-pool, concat, normalise
    sched = make_schedule()
    eps = fixed_noise(5, 300, (8, 8, 3))
    tt = jnp.full((13,), 300, jnp.int32)
    xt = add_noise(sched, jnp.asarray(x), jnp.broadcast_to(eps, x.shape), tt)
    _, st = unet.UNet2DConditionModel(CFG).apply({"params": params}, xt, tt, jnp.asarray(c),
                                                 mutable=["intermediates"])
    raw = np.concatenate([np.asarray(st["intermediates"][k][0]).mean((1, 2)) for k in TAPS], 1)
    np.testing.assert_allclose(r8, raw / np.linalg.norm(raw, axis=1, keepdims=True),
                               atol=2e-6)
    # a different timestep or noise seed gives different representations
    r_t = M.extract_representations(CFG, params, x, c, batch_size=8, taps=TAPS, t=600,
                                    noise_seed=5, mesh=parallel.make_mesh(8))
    assert np.abs(r_t - r8).max() > 1e-3
    # per-example noise: depends on the index, not on the batch size / devices
    pe = dict(kw, per_example_noise=True)
    p8 = M.extract_representations(CFG, params, x, c, batch_size=8, mesh=parallel.make_mesh(8),
                                   **pe)
    p1 = M.extract_representations(CFG, params, x, c, batch_size=1,
                                   mesh=parallel.make_mesh(1), **pe)
    np.testing.assert_array_equal(p1, p8)
    assert np.abs(p8 - r8).max() > 1e-4
    with pytest.raises(M.MontrageError, match="ctx"):
        M.extract_representations(CFG, params, x, c[:3], batch_size=8)
    with pytest.raises(M.MontrageError, match="images"):
        M.extract_representations(CFG, params, x[..., :2], None, batch_size=8)


def test_shifted_cosine_matches_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 7)), rng.normal(size=(9, 7)) * 3.0
    b[0] = -a[0] * 2.0  # antiparallel -> 0
    b[1] = a[1] * 0.5  # parallel -> 1
    s = M.shifted_cosine(a, b)
    direct = np.array([[(1 + u @ v / np.linalg.norm(u) / np.linalg.norm(v)) / 2 for v in b]
                       for u in a])
    np.testing.assert_allclose(s, direct, atol=1e-12)
    assert s.min() >= 0.0 and s.max() <= 1.0
    np.testing.assert_allclose([s[0, 0], s[1, 1]], [0.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(M.shifted_cosine(jnp.asarray(a, jnp.float32),
                                                jnp.asarray(b, jnp.float32)), direct, atol=1e-6)


# ----------------------------------------------------------------------------- record + cache
def _perturbed(params, k):
    rng = np.random.default_rng(100 + k)
    return jax.tree.map(lambda p: p + np.float32(0.05 * k) * rng.normal(
        size=p.shape).astype(np.float32), params)


def _make_record(path, params, n_train, steps=(0, 2, 4), batch=3):
    rec = TrajectoryRecord.create(path, {"config": {"mode": "full"},
                                         "dataset": {"size": n_train}})
    opt = {"count": jnp.zeros((), jnp.int32)}
    rng = np.random.default_rng(7)
    for k in steps:
        if k > 0:
            rec.save(k, {"step": jnp.asarray(k), "params": {"unet": _perturbed(params, k)},
                         "opt_state": opt})
        else:
            rec.save(0, {"step": jnp.asarray(0), "params": {"unet": params}, "opt_state": opt},
                     base={"unet": params})
    logged = []
    for s in range(max(steps)):
        idx = rng.integers(0, n_train, batch)
        logged.append(idx)
        rec.append_step({"step": s, "lr": 1e-3, "indices": idx, "key": np.zeros(2, np.uint32)})
    rec.wait()
    return TrajectoryRecord.open(path), logged


class _CountingRecord:
    """The record, counting ``load`` calls (served from params loaded once, to save time)."""

    def __init__(self, rec, loaded):
        self.rec, self.loaded, self.loads = rec, loaded, []
        self.directory, self.manifest = rec.directory, rec.manifest

    def steps(self):
        return self.rec.steps()

    def load(self, s):
        self.loads.append(s)
        return self.loaded[s]

    def step_info(self, s):
        return self.rec.step_info(s)


def test_trajectory_cache_survives_moving_the_run_directory(tmp_path, params):
    """The cache names its record relative to itself, so moving a run directory (record and
    cache together) keeps the cache valid; a cache in the older absolute-path form still
    serves the record at that path; another record is refused."""
    import shutil
    xtr, ctr, xq, cq = _images(4, 2), _ctx(4, 3), _images(2, 4), _ctx(2, 5)
    rec, _ = _make_record(tmp_path / "run" / "rec", params, 4, steps=(0, 2))
    spec = M.RepresentationSpec(taps=TAPS, t=250, noise_seed=1, batch_size=8)
    first = M.representation_trajectory(rec, CFG, xtr, ctr, xq, cq, spec=spec,
                                        cache_dir=tmp_path / "run" / "cache", progress=False)
    rec.close()
    shutil.move(tmp_path / "run", tmp_path / "moved")
    moved = TrajectoryRecord.open(tmp_path / "moved" / "rec")
    counted = _CountingRecord(moved, {})
    again = M.representation_trajectory(counted, CFG, xtr, ctr, xq, cq, spec=spec,
                                        cache_dir=tmp_path / "moved" / "cache", progress=False)
    assert counted.loads == []
    np.testing.assert_array_equal(again.train, first.train)
    # older caches recorded the absolute path; still accepted for that same record
    meta_path = tmp_path / "moved" / "cache" / M.META
    meta = json.loads(meta_path.read_text())
    meta["source"] = str((tmp_path / "moved" / "rec").resolve())
    meta_path.write_text(json.dumps(meta))
    M.representation_trajectory(counted, CFG, xtr, ctr, xq, cq, spec=spec,
                                cache_dir=tmp_path / "moved" / "cache", progress=False)
    assert counted.loads == []
    other, _ = _make_record(tmp_path / "other", params, 4, steps=(0, 2))
    with pytest.raises(M.MontrageCacheError, match="source"):
        M.representation_trajectory(other, CFG, xtr, ctr, xq, cq, spec=spec,
                                    cache_dir=tmp_path / "moved" / "cache", progress=False)


def test_trajectory_cache_resume_monitor_and_seen_counts(tmp_path, params):
    xtr, ctr, xq, cq = _images(6, 2), _ctx(6, 3), _images(3, 4), _ctx(3, 5)
    rec, logged = _make_record(tmp_path / "rec", params, 6)
    spec = M.RepresentationSpec(taps=TAPS, t=250, noise_seed=1, batch_size=8)
    loaded = {s: rec.load(s) for s in rec.steps()}
    counted = _CountingRecord(rec, loaded)
    cache = tmp_path / "cache"
    traj = M.representation_trajectory(counted, CFG, xtr, ctr, xq, cq, spec=spec,
                                       cache_dir=cache, progress=False)
    assert counted.loads == [0, 2, 4] and list(traj.steps) == [0, 2, 4]
    sims = traj.similarities()
    assert sims.shape == (3, 3, 6) and sims.min() >= 0 and sims.max() <= 1
    # equals a direct per-checkpoint computation
    for j, s in enumerate([0, 2, 4]):
        r = M.extract_representations(CFG, loaded[s]["unet"], np.concatenate([xtr, xq]),
                                      np.concatenate([ctr, cq]), taps=TAPS, t=250, noise_seed=1,
                                      batch_size=8)
        np.testing.assert_allclose(sims[j], (1 + r[6:] @ r[:6].T) / 2, atol=1e-6)
    # checkpoints differ, so the trajectory is not constant
    assert np.abs(sims[2] - sims[0]).max() > 1e-4
    # resume: full cache -> nothing recomputed; one step missing -> only that one
    counted.loads.clear()
    again = M.similarity_trajectory(counted, CFG, xtr, ctr, xq, cq, spec=spec,
                                    cache_dir=cache, progress=False)
    assert counted.loads == []
    np.testing.assert_array_equal(again, sims)
    (cache / "step_0000000002.npz").unlink()
    (cache / ".step_0000000004.npz.junk.tmp").write_bytes(b"torn")  # a killed write's leftover
    again = M.similarity_trajectory(counted, CFG, xtr, ctr, xq, cq, spec=spec,
                                    cache_dir=cache, progress=False)
    assert counted.loads == [2]
    np.testing.assert_array_equal(again, sims)
    # subset of steps
    sub = M.similarity_trajectory(rec, CFG, xtr, ctr, xq, cq, steps=[4, 0], spec=spec,
                                  cache_dir=cache, progress=False)
    np.testing.assert_array_equal(sub, sims[[0, 2]])
    # a cache made with another configuration is refused
    with pytest.raises(M.MontrageCacheError, match="spec"):
        M.similarity_trajectory(rec, CFG, xtr, ctr, xq, cq, spec=M.RepresentationSpec(
            taps=TAPS, t=251, noise_seed=1, batch_size=8), cache_dir=cache, progress=False)
    with pytest.raises(M.MontrageCacheError, match="train"):
        M.similarity_trajectory(rec, CFG, xtr + 0.1, ctr, xq, cq, spec=spec,
                                cache_dir=cache, progress=False)
    with pytest.raises(M.MontrageError, match="not checkpoints"):
        M.similarity_trajectory(rec, CFG, xtr, ctr, xq, cq, steps=[3], spec=spec,
                                progress=False)
    # the live monitor gives the same trajectory without reloading checkpoints
    mon = M.MontrageMonitor(CFG, xtr, ctr, xq, cq, spec=spec)
    for s in [0, 2, 4]:
        mon.on_checkpoint(s, loaded[s])
    live = mon.trajectory()
    np.testing.assert_array_equal(live.train, traj.train)
    np.testing.assert_array_equal(live.query, traj.query)
    with pytest.raises(M.MontrageError, match="increase"):
        mon.on_checkpoint(4, loaded[4])
    # seen counts per interval (0], (0, 2], (2, 4]
    counts = M.seen_counts(rec, [0, 2, 4])
    expect = np.zeros((3, 6), np.int64)
    for s, idx in enumerate(logged):
        np.add.at(expect[1 + s // 2], idx, 1)
    np.testing.assert_array_equal(counts, expect)
    # trajectory_scores wiring: movement with the record's counts equals the explicit formula
    mv = traj.movement()
    assert mv.shape == (3, 6) and (mv[0] == 0).all() and (mv[1:] > 0).all()
    w = mv * counts
    manual = np.einsum("sqn,sn->qn", sims, np.where(w.sum(0) > 0, w / np.maximum(
        w.sum(0), 1e-300), 1 / 3))
    np.testing.assert_allclose(M.trajectory_scores(traj, "movement", record=rec, seen="count"),
                               manual, atol=1e-12)


def test_monitor_as_finetune_callback_matches_post_hoc(tmp_path, params):
    """MontrageMonitor.on_checkpoint as ``finetune``'s checkpoint hook gives the trajectory that
    ``representation_trajectory`` recomputes from the record afterwards; its cache is reused.

    The loss pulls the (LoRA-merged) UNet weights towards per-example targets (no UNet
    backward, so the test stays fast); the monitor runs the UNet forward at every checkpoint."""
    from jaxattrib.train.finetune import TrainConfig, finetune
    n, mesh = 8, parallel.make_mesh(1)  # orbax saves of a UNet on 8 CPU devices are slow
    xtr, ctr, xq, cq = _images(n, 20), _ctx(n, 21), _images(4, 22), _ctx(4, 23)
    target = _perturbed(params, 3)

    def loss(p, batch, key):
        del key
        per = [jnp.mean((a[None] - batch["c"].reshape((-1,) + (1,) * a.ndim) * b[None]) ** 2,
                        axis=tuple(range(1, a.ndim + 1)))
               for a, b in zip(jax.tree.leaves(p["unet"]), jax.tree.leaves(target))]
        return sum(per)

    coef = np.linspace(0.5, 1.5, n).astype(np.float32)
    # LoRA: few trained leaves keep the checkpoints small; the hook sees the merged params
    cfg = TrainConfig(steps=4, batch_size=8, learning_rate=5e-2, checkpoint_every=2, seed=0,
                      mode="lora", lora_rank=2)
    spec = M.RepresentationSpec(taps=TAPS, t=250, noise_seed=1, batch_size=8)
    rec_dir, cache = tmp_path / "rec", tmp_path / "cache"
    mon = M.MontrageMonitor(CFG, xtr, ctr, xq, cq, spec=spec, mesh=mesh, cache_dir=cache,
                            source=rec_dir)
    _, rec = finetune(loss, {"unet": params}, n, lambda idx: {"c": coef[idx]}, cfg, rec_dir,
                      mesh=mesh, progress=False, on_checkpoint=mon.on_checkpoint)
    live = mon.trajectory()
    assert list(live.steps) == rec.steps() == [0, 2, 4]
    post = M.representation_trajectory(rec, CFG, xtr, ctr, xq, cq, spec=spec, mesh=mesh,
                                       progress=False)  # no cache: recomputed from the record
    # tolerance: float32 rounding only (same compiled program, restored params bit-identical)
    np.testing.assert_allclose(live.similarities(), post.similarities(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(live.train, post.train, rtol=1e-6, atol=1e-6)
    assert np.abs(live.similarities()[-1] - live.similarities()[0]).max() > 1e-3  # it moved
    # the live cache serves the post-hoc call (no checkpoint is reloaded)
    counted = _CountingRecord(rec, {})
    cached = M.representation_trajectory(counted, CFG, xtr, ctr, xq, cq, spec=spec, mesh=mesh,
                                         cache_dir=cache, progress=False)
    assert counted.loads == []
    np.testing.assert_array_equal(cached.query, live.query)


# ----------------------------------------------------------------------------- aggregation
def _unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_movement_aggregation_by_construction():
    """Each relevant training image is trained (and moves to its query) in exactly one
    interval, sitting in random directions at every other checkpoint; distractors stay at a
    constant moderate similarity to the query. Only the movement weighting restricted to the
    trained intervals recovers the relevant image for every query."""
    rng = np.random.default_rng(0)
    S, Q, D = 6, 8, 64
    N = 2 * Q
    q = _unit(rng.normal(size=(Q, D)))
    train = np.empty((S, N, D))
    counts = np.zeros((S, N), np.int64)
    relevant = np.zeros((Q, N), bool)
    for j in range(Q):
        i = j  # relevant image of query j
        relevant[j, i] = True
        s_i = 1 + j % (S - 1)
        train[:, i] = _unit(rng.normal(size=(S, D)))
        train[s_i, i] = q[j]
        counts[s_i, i] = 2
        # distractor: cos 0.8 with its query, never moves, never trained
        ortho = _unit(rng.normal(size=D) - (rng.normal(size=D) @ q[j]) * q[j])
        ortho = _unit(ortho - (ortho @ q[j]) * q[j])
        train[:, Q + j] = 0.8 * q[j] + 0.6 * ortho
    traj = M.RepTrajectory(np.arange(S) * 10, train.astype(np.float32),
                           np.broadcast_to(q, (S, Q, D)).astype(np.float32), ("a",), (D,))
    sims = traj.similarities().astype(np.float64)
    mv = traj.movement()
    np.testing.assert_allclose(mv[1:, Q:], 0.0, atol=1e-6)
    masked = M.aggregate(sims, "movement", movement=mv, counts=counts, seen="mask")
    np.testing.assert_allclose(masked[np.arange(Q), np.arange(Q)], 1.0, atol=1e-6)
    assert recall_at_k(masked, relevant, 1).mean() == 1.0
    for method in ("final", "mean"):
        assert recall_at_k(M.aggregate(sims, method), relevant, 1).mean() < 0.5
    np.testing.assert_allclose(M.aggregate(sims, "final"), sims[-1])
    np.testing.assert_allclose(M.aggregate(sims, "mean"), sims.mean(0), rtol=1e-6)
    # weighted_scores equals its definition; zero-weight images fall back to the mean
    w = rng.uniform(size=(S, N))
    w[:, 3] = 0.0
    got = M.weighted_scores(sims, w)
    for qq in range(Q):
        for i in range(N):
            exp = (sims[:, qq, i].mean() if i == 3
                   else (w[:, i] * sims[:, qq, i]).sum() / w[:, i].sum())
            assert abs(got[qq, i] - exp) < 1e-12
    with pytest.raises(M.MontrageError, match="counts"):
        M.aggregate(sims, "movement", movement=mv, seen="mask")
    with pytest.raises(M.MontrageError, match="method"):
        M.aggregate(sims, "median")


def test_learned_weights_improve_validation_loss_and_are_deterministic():
    """Only checkpoint 2 of tap 1 carries the ground truth; the rest is noise."""
    rng = np.random.default_rng(1)
    S, T, Q, N = 4, 2, 40, 30
    rel = np.zeros((Q, N), bool)
    rel[np.arange(Q), rng.integers(0, N, Q)] = True
    tap_sims = rng.uniform(0.3, 0.7, size=(S, T, Q, N))
    tap_sims[2, 1] = np.where(rel, 0.9, 0.5) + rng.normal(scale=0.05, size=(Q, N))
    val, test = slice(0, 20), slice(20, 40)
    key = jax.random.PRNGKey(3)
    w, losses = M.fit_learned_weights(tap_sims[:, :, val], rel[val], key, num_iters=100,
                                      learning_rate=0.1)
    assert losses.shape == (101,) and losses[-1] < 0.5 * losses[0]
    a, b = jax.nn.softmax(w["step_logits"]), jax.nn.softmax(w["tap_logits"])
    assert int(np.argmax(a)) == 2 and int(np.argmax(b)) == 1 and a[2] * b[1] > 0.5
    learned = np.asarray(M.learned_scores(w, tap_sims[:, :, test]))
    uniform = tap_sims[:, :, test].mean((0, 1))
    r_learned = recall_at_k(learned, rel[test], 1).mean()
    assert r_learned > recall_at_k(uniform, rel[test], 1).mean() and r_learned >= 0.9
    # zero logits = the mean aggregation
    np.testing.assert_allclose(M.learned_scores(M.init_learned_weights(S, T), tap_sims),
                               tap_sims.mean((0, 1)), atol=1e-6)
    # same key -> identical weights; mini-batches too
    w2, losses2 = M.fit_learned_weights(tap_sims[:, :, val], rel[val], key, num_iters=100,
                                        learning_rate=0.1)
    np.testing.assert_array_equal(w2["step_logits"], w["step_logits"])
    np.testing.assert_array_equal(losses2, losses)
    wb, lb = M.fit_learned_weights(tap_sims[:, :, val], rel[val], key, num_iters=40,
                                   query_batch=8)  # mini-batches of queries
    assert lb[-1] < lb[0]
    with pytest.raises(M.MontrageError, match="relevant"):
        M.fit_learned_weights(tap_sims[:, :, val], np.zeros((20, N), bool), key)


def test_concept_evaluation_helpers():
    rng = np.random.default_rng(2)
    tc = np.array([0, 0, 0, 1, 1, 1, 1, 2])
    qc = np.array([0, 1, 2, 1])
    scores = rng.uniform(size=(4, 8))
    scores[0, 1] = scores[1, 5] = scores[2, 7] = 2.0  # own concept on top
    scores[3, 0] = 3.0  # query 3 wrongly prefers concept 0
    cs = M.concept_scores(scores, tc)
    np.testing.assert_allclose(cs[:, 1], scores[:, 3:7].max(1))
    np.testing.assert_allclose(M.concept_scores(scores, tc, reduce="mean")[:, 0],
                               scores[:, :3].mean(1))
    assert M.between_concept_accuracy(scores, tc, qc) == 0.75
    soft = rng.uniform(size=(4, 8))
    rho = M.within_concept_spearman(scores, soft, tc, qc)
    m = tc == 1
    assert abs(rho[1] - stats.spearmanr(scores[1, m], soft[1, m]).statistic) < 1e-12
    assert np.isnan(rho[2])  # one image in concept 2


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow  # ~80 s on 2 busy cores (the fine-tune compiles a UNet gradient)
def test_finetuned_trajectory_ranks_own_group(tmp_path, params):
    """Fine-tune the tiny UNet on two groups of distinct images; queries are noisy copies of
    group images; every aggregation ranks the query's own group far above chance."""
    from jaxattrib.train.diffusion_task import make_diffusion_loss
    from jaxattrib.train.finetune import TrainConfig, finetune
    rng = np.random.default_rng(0)
    n = 16
    yy, xx = np.mgrid[0:8, 0:8] / 7.0
    group = np.arange(n) % 2
    imgs = np.empty((n, 8, 8, 3), np.float32)
    for i in range(n):
        phase = rng.uniform(0, 2 * np.pi)
        if group[i] == 0:  # horizontal stripes, red
            base = np.stack([np.sin(8 * yy + phase), -0.5 + 0 * yy, -0.5 + 0 * yy], -1)
        else:  # smooth blue ramp
            base = np.stack([-0.5 + 0 * xx, 0.3 * np.cos(2 * xx + phase), xx * 2 - 1], -1)
        imgs[i] = np.clip(base + rng.normal(scale=0.05, size=base.shape), -1, 1)
    ctx = np.zeros((n, 1, 8), np.float32)
    sched = make_schedule()
    loss = make_diffusion_loss(CFG, None, sched)
    cfg = TrainConfig(steps=4, batch_size=8, learning_rate=1e-3, checkpoint_every=2, seed=0)
    qsrc = np.arange(8)
    queries = np.clip(imgs[qsrc] + rng.normal(scale=0.2, size=imgs[qsrc].shape), -1, 1)
    relevant = group[None, :] == group[qsrc][:, None]
    relevant[np.arange(8), qsrc] = True
    spec = M.RepresentationSpec(taps=TAPS, t=100, noise_seed=0, batch_size=16)
    mesh = parallel.make_mesh(8)
    mon = M.MontrageMonitor(CFG, imgs, ctx, queries, ctx[:8], spec=spec, mesh=mesh)
    _, rec = finetune(loss, {"unet": params}, n,
                      lambda idx: {"images": imgs[idx], "encoder_hidden_states": ctx[idx]},
                      cfg, tmp_path / "rec", mesh=mesh, progress=False,
                      on_checkpoint=mon.on_checkpoint)
    traj = M.representation_trajectory(rec, CFG, imgs, ctx, queries, ctx[:8], spec=spec,
                                       mesh=mesh, progress=False)
    assert list(traj.steps) == [0, 2, 4]
    # monitored live during the real fine-tune (8 devices) = recomputed from the record
    np.testing.assert_allclose(mon.trajectory().similarities(), traj.similarities(), rtol=0,
                               atol=1e-6)
    for method, seen in [("final", "ignore"), ("mean", "ignore"), ("movement", "ignore"),
                         ("movement", "mask")]:
        scores = M.trajectory_scores(traj, method, record=rec, seen=seen)
        r = recall_at_k(scores, relevant, 8).mean()
        assert r > 0.9, (method, seen, r)  # chance: 0.5
        # the query's own source image is the top match
        assert (np.argmax(scores, 1) == qsrc).mean() >= 0.75, (method, seen)
