"""TRAK featurization and scoring: exactness on linear regression, resumption after SIGKILL,
1 vs 8 devices, blocked vs dense scoring, top-k, ensembles, TracIn, λ sweep."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from jaxattrib.attribution import projection as pj
from jaxattrib.attribution import trak
from jaxattrib.attribution.store import (ChunkedArray, StoreMismatchError, dataset_fingerprint,
                                         feature_meta)

REPO = Path(__file__).resolve().parents[1]


def _linear_out(params, x, key):
    """Linear regression output f(x; w) = xᵀw (its gradient is x)."""
    return jnp.dot(x, params["w"])


def _features(tmp, name, x, params, proj, **kw):
    store = ChunkedArray.open(tmp / name, n_rows=x.shape[0], n_cols=proj.k, chunk_size=64,
                              dtype=np.dtype(proj.dtype).name, meta=proj.meta())
    return trak.featurize(_linear_out, params, x, proj, store, microbatch=64, progress=False,
                          **kw).read_all()


def test_trak_converges_to_exact_influence_on_linear_regression(tmp_path):
    """For f(x; w) = xᵀw, TRAK with λ = 0 approximates xᵀ(XᵀX)⁻¹x_i; with a full-rank P
    (k ≥ p) it is exact, and the error decreases as k grows towards p."""
    p, n, n_q = 24, 150, 10
    rng = np.random.RandomState(0)
    with jax.enable_x64(True):
        X = rng.randn(n, p) * np.linspace(0.2, 2.0, p)  # anisotropic design
        Xq = rng.randn(n_q, p)
        exact = Xq @ np.linalg.solve(X.T @ X, X.T)  # [n_q, n]: scores are [Q, N]
        params = {"w": jnp.asarray(rng.randn(p))}
        errs = {}
        for k in (4, 12, 20, 24, 48):
            e = []
            for seed in range(3):
                proj = pj.make_projector("gaussian", k, seed, params, dtype=jnp.float64)
                if k == 24 and seed == 0:  # end to end through featurize (jit(vmap(grad)))
                    feats = _features(tmp_path, "all", np.concatenate([X, Xq]), params, proj)
                    np.testing.assert_allclose(feats[:n], X @ np.asarray(proj.materialize()),
                                               rtol=1e-10)
                else:  # the per-example gradient of xᵀw is x: project it directly
                    feats = np.asarray(proj.project({"w": jnp.asarray(np.concatenate([X, Xq]))}))
                Phi, phi_q = feats[:n], feats[n:]
                s = trak.score(phi_q, Phi, trak.trak_kernel_inverse(Phi, 0.0), dtype=np.float64)
                e.append(np.linalg.norm(s - exact) / np.linalg.norm(exact))
            errs[k] = float(np.mean(e))
    assert errs[4] > errs[12] > errs[20] > 1e-3, errs
    assert errs[24] < 1e-8 and errs[48] < 1e-8, errs


def test_ridge_kernel_inverse_and_float32():
    rng = np.random.RandomState(1)
    Phi = rng.randn(40, 6)
    inv = trak.trak_kernel_inverse(Phi, 0.5)
    np.testing.assert_allclose(inv, np.linalg.inv(Phi.T @ Phi + 0.5 * np.eye(6)), rtol=1e-12)
    assert trak.trak_kernel_inverse(Phi.astype(np.float32), 0.5, np.float32).dtype == np.float32
    np.testing.assert_allclose(trak.gram(Phi, block=7), Phi.T @ Phi, rtol=1e-13)
    with pytest.raises(ValueError, match="λ"):
        trak.trak_kernel_inverse(Phi, -1.0)


_SCRIPT = textwrap.dedent("""
    import sys, time
    import jax, jax.numpy as jnp, numpy as np
    from jaxattrib.attribution import projection as pj, trak
    from jaxattrib.attribution.store import ChunkedArray

    def make():
        rng = np.random.RandomState(0)
        x = rng.randn(48, 5).astype(np.float32)
        params = {"w1": jnp.asarray(rng.randn(5, 8), jnp.float32),
                  "w2": jnp.asarray(rng.randn(8), jnp.float32)}
        def out_fn(p, ex, key):
            noise = 0.1 * jax.random.normal(key, (8,))
            return jnp.dot(jnp.tanh(ex @ p["w1"] + noise), p["w2"])
        proj = pj.make_projector("rademacher", 32, 9, params)
        return x, params, out_fn, proj

    def run(folder, sleep):
        x, params, out_fn, proj = make()
        store = ChunkedArray.open(folder, n_rows=48, n_cols=32, chunk_size=4, meta=proj.meta())
        def on_chunk(i):
            print("chunk", i, flush=True)
            time.sleep(sleep)
        trak.featurize(out_fn, params, x, proj, store, microbatch=4, progress=False,
                       key=3, on_chunk=on_chunk)
        return store

    if __name__ == "__main__":
        run(sys.argv[1], float(sys.argv[2]))
""")


def test_featurize_resumes_after_sigkill(tmp_path):
    script = tmp_path / "feat.py"
    script.write_text(_SCRIPT)
    folder = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(script), str(folder), "0.5"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while (time.time() < deadline and proc.poll() is None
           and len(list(folder.glob("*.done"))) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done_before = {int(p.stem.split("_")[1]) for p in folder.glob("*.done")}
    assert 3 <= len(done_before) < 12, done_before
    mtimes = {i: (folder / f"chunk_{i:05d}.npy").stat().st_mtime_ns for i in done_before}

    rerun = subprocess.run([sys.executable, str(script), str(folder), "0"], env=env,
                           capture_output=True, text=True, check=True)
    redone = {int(line.split()[1]) for line in rerun.stdout.splitlines() if line.startswith("chunk")}
    assert redone == set(range(12)) - done_before
    assert all((folder / f"chunk_{i:05d}.npy").stat().st_mtime_ns == m for i, m in mtimes.items())

    # an uninterrupted run (in this process) gives identical features
    sys.path.insert(0, str(tmp_path))
    try:
        import feat  # noqa: PLC0415
        clean = feat.run(tmp_path / "clean", 0.0).read_all()
    finally:
        sys.path.remove(str(tmp_path))
    resumed = ChunkedArray.open(folder, n_rows=48, n_cols=32, chunk_size=4,
                                meta=feat.make()[3].meta()).read_all()
    np.testing.assert_array_equal(resumed, clean)


def test_featurize_same_features_on_1_and_8_devices(tmp_path):
    rng = np.random.RandomState(3)
    x = rng.randn(20, 6).astype(np.float32)
    params = {"w": jnp.asarray(rng.randn(6, 5), jnp.float32), "b": jnp.zeros(5, jnp.float32)}

    def out_fn(p, ex, key):
        y = jnp.tanh(ex @ p["w"] + p["b"])
        return jnp.sum((y - jax.random.normal(key, (5,))) ** 2)

    for kind in ("sjlt", "gaussian"):
        proj = pj.make_projector(kind, 64, 1, params, c=4)
        outs = []
        for name, mesh in (("one", None), ("eight", Mesh(np.array(jax.devices()[:8]), ("data",)))):
            store = ChunkedArray.open(tmp_path / kind / name, n_rows=20, n_cols=64,
                                      chunk_size=8, meta=proj.meta())
            outs.append(trak.featurize(out_fn, params, x, proj, store, microbatch=8, mesh=mesh,
                                       progress=False, key=0).read_all())
        # equal up to float32 rounding (XLA may order the reductions differently per layout)
        scale = np.abs(outs[0]).max()
        assert scale > 0.1
        np.testing.assert_allclose(outs[0], outs[1], rtol=0, atol=1e-5 * scale)


def test_featurize_refuses_mismatched_store_or_projector(tmp_path):
    params = {"w": jnp.ones(3), "v": jnp.ones(2)}
    x = np.ones((4, 3), np.float32)
    proj = pj.make_projector("gaussian", 8, 0, {"w": params["w"]})
    bad = ChunkedArray.open(tmp_path / "a", n_rows=5, n_cols=8, chunk_size=2)
    with pytest.raises(ValueError, match="store shape"):
        trak.featurize(_linear_out, params, x, proj, bad, progress=False)
    ok = ChunkedArray.open(tmp_path / "b", n_rows=4, n_cols=8, chunk_size=2)
    with pytest.raises(ValueError, match="projector"):
        trak.featurize(_linear_out, params, x, proj, ok, progress=False, spec="all")
    trak.featurize(_linear_out, params, x, proj, ok, progress=False, spec="^w$")
    np.testing.assert_allclose(ok.read_all(), x @ np.asarray(proj.materialize()), rtol=1e-6)
    # a store written for another projector (here: another seed) is refused
    meta = feature_meta(projector_meta=proj.meta(), seed=0, output_fn="linear",
                        dataset_fingerprint=dataset_fingerprint(x))
    st = ChunkedArray.open(tmp_path / "c", n_rows=4, n_cols=8, chunk_size=2, meta=meta)
    other = pj.make_projector("gaussian", 8, 1, {"w": params["w"]})
    with pytest.raises(StoreMismatchError, match="projector"):
        trak.featurize(_linear_out, params, x, other, st, progress=False, spec="^w$")


def _random_problem(m=1, n=53, n_q=17, k=6, seed=0):
    rng = np.random.RandomState(seed)
    Phis = [rng.randn(n, k).astype(np.float32) for _ in range(m)]
    qs = [rng.randn(n_q, k).astype(np.float32) for _ in range(m)]
    kinvs = [trak.trak_kernel_inverse(P, 0.1) for P in Phis]
    dense = np.mean([q.astype(np.float64) @ K @ P.T.astype(np.float64)
                     for P, K, q in zip(Phis, kinvs, qs)], 0)  # [n_q, n]
    return Phis, qs, kinvs, dense


def test_blocked_scores_equal_dense_product(tmp_path):
    Phis, qs, kinvs, dense = _random_problem()
    s = trak.score(qs[0], Phis[0], kinvs[0], block_train=7, block_query=5)
    assert s.shape == (17, 53)  # [Q, N]
    np.testing.assert_allclose(s, dense, rtol=1e-5, atol=1e-5)
    # from stores, written to a score store, resumable
    tr = ChunkedArray.open(tmp_path / "train", n_rows=53, n_cols=6, chunk_size=10)
    for i in range(tr.n_chunks):
        a, b = tr.chunk_range(i)
        tr.write_chunk(i, Phis[0][a:b])
    out = ChunkedArray.open(tmp_path / "scores", n_rows=53, n_cols=17, chunk_size=8)
    out.write_chunk(2, np.full((8, 17), 7.0))  # pretend chunk 2 was done earlier: kept
    trak.score_to_store(qs[0], tr, trak.trak_kernel_inverse(tr, 0.1), out, block_query=4)
    got = out.read_all()  # train-major [N, Q]
    np.testing.assert_array_equal(got[16:24], 7.0)
    mask = np.ones(53, bool)
    mask[16:24] = False
    np.testing.assert_allclose(got[mask], dense.T[mask], rtol=1e-5, atol=1e-5)


def test_ensemble_scores_average_models():
    Phis, qs, kinvs, dense = _random_problem(m=3)
    s = trak.score(qs, Phis, kinvs, block_train=11, block_query=6)
    np.testing.assert_allclose(s, dense, rtol=1e-5, atol=1e-5)
    single = [trak.score(q, P, K) for q, P, K in zip(qs, Phis, kinvs)]
    np.testing.assert_allclose(s, np.mean(single, 0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(trak.trak_scores(qs, Phis, 0.1), dense, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="ensemble"):
        trak.score(qs, Phis[:2], kinvs)


@pytest.mark.parametrize("largest", [True, False])
def test_topk_equals_argsort_of_dense(largest):
    Phis, qs, kinvs, _ = _random_problem(m=2, n=101, n_q=9)
    dense = trak.score(qs, Phis, kinvs)
    vals, idx = trak.topk_scores(qs, Phis, kinvs, 10, block_train=13, block_query=4,
                                 largest=largest)
    order = np.argsort(-dense if largest else dense, axis=1)[:, :10]  # [n_q, 10]
    np.testing.assert_array_equal(idx, order)
    np.testing.assert_allclose(vals, np.take_along_axis(dense, order, 1), rtol=1e-6)


def test_tracin_scores():
    rng = np.random.RandomState(4)
    tr = [rng.randn(30, 5), rng.randn(30, 7)]
    q = [rng.randn(4, 5), rng.randn(4, 7)]
    lrs = [0.1, 0.02]
    expected = 0.1 * q[0] @ tr[0].T + 0.02 * q[1] @ tr[1].T  # [Q, N]
    got = trak.tracin_scores(q, tr, lrs, block_train=8, block_query=3, dtype=np.float64)
    assert got.shape == (4, 30)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    with pytest.raises(ValueError, match="learning rate"):
        trak.tracin_scores(q, tr, [0.1])


def test_tracin_on_projected_features_approximates_gradient_inner_products(tmp_path):
    """Σ_t η_t <Pᵀg_t(z), Pᵀg_t(z_i)> vs the same with raw gradients (JL, k = 2048)."""
    rng = np.random.RandomState(5)
    p = 40
    X, Xq = rng.randn(12, p).astype(np.float32), rng.randn(3, p).astype(np.float32)
    params = {"w": jnp.zeros(p)}
    feats_tr, feats_q = [], []
    for t in range(2):  # two "checkpoints" with their own projections
        proj = pj.make_projector("gaussian", 2048, 100 + t, params)
        feats_tr.append(_features(tmp_path, f"tr{t}", X, params, proj))
        feats_q.append(_features(tmp_path, f"q{t}", Xq, params, proj))
    got = trak.tracin_scores(feats_q, feats_tr, [0.5, 0.25], dtype=np.float64)
    exact = 0.75 * Xq.astype(np.float64) @ X.T  # [Q, N]
    scale = 0.75 * np.outer(np.linalg.norm(Xq, axis=1), np.linalg.norm(X, axis=1))
    assert (np.abs(got - exact) <= 6 * scale / np.sqrt(2048)).all()


def test_choose_lambda_picks_the_validation_optimum():
    """Ground truth by construction: the metric is closeness to the λ = 0.5 scores."""
    Phis, qs, _, _ = _random_problem(n=40, n_q=5)
    target = trak.trak_scores(qs[0], Phis[0], 0.5)

    def metric(s):
        return -float(np.abs(s - target).max())

    best, table = trak.choose_lambda(Phis[0], qs[0], [0.01, 0.5, 5.0], metric)
    assert best == 0.5 and [r["lambda"] for r in table] == [0.01, 0.5, 5.0]
    assert table[1]["metric"] == 0.0 and table[0]["metric"] < 0 and table[2]["metric"] < 0
    best_min, _ = trak.choose_lambda(Phis[0], qs[0], [0.01, 0.5, 5.0],
                                     lambda s: -metric(s), higher_is_better=False)
    assert best_min == 0.5


def test_featurize_proj_batch_same_features_and_old_generator_refused(tmp_path):
    """``proj_batch`` (several microbatches per pass over P) gives the per-microbatch features;
    a store written without a generator version (older P generator) is refused on reopen."""
    rng = np.random.RandomState(4)
    x = rng.randn(21, 6).astype(np.float32)
    params = {"w": jnp.asarray(rng.randn(6, 5), jnp.float32), "b": jnp.zeros(5, jnp.float32)}

    def out_fn(p, ex, key):
        return jnp.sum((jnp.tanh(ex @ p["w"] + p["b"]) - jax.random.normal(key, (5,))) ** 2)

    proj = pj.make_projector("rademacher", 64, 1, params)
    assert trak.batch_sizes(4, 12, 8) == (4, 8) and trak.batch_sizes(3, 7, 64) == (3, 9)
    outs = []
    for name, pb in (("plain", None), ("amortized", 12)):
        meta = feature_meta(projector_meta=proj.meta(), seed=1, output_fn="f",
                            dataset_fingerprint=dataset_fingerprint(x))
        store = ChunkedArray.open(tmp_path / name, n_rows=21, n_cols=64, chunk_size=8, meta=meta)
        outs.append(trak.featurize(out_fn, params, x, proj, store, microbatch=4, proj_batch=pb,
                                   progress=False).read_all())
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-6, atol=1e-6 * np.abs(outs[0]).max())
    old = dict(proj.meta())
    del old["generator"]
    ChunkedArray.open(tmp_path / "old", n_rows=21, n_cols=64, chunk_size=8,
                      meta=feature_meta(projector_meta=old, seed=1, output_fn="f",
                                        dataset_fingerprint="x"))
    with pytest.raises(StoreMismatchError, match="generator") as err:
        ChunkedArray.open(tmp_path / "old", n_rows=21, n_cols=64, chunk_size=8,
                          meta=feature_meta(projector_meta=proj.meta(), seed=1, output_fn="f",
                                            dataset_fingerprint="x"))
    assert "another version of the projection generator" in str(err.value)
