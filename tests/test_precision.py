"""Mixed precision (bfloat16 compute), per-block remat and matmul precision (docs/precision.md).

Tolerances below are measured on the tiny UNet (see docs/precision.md for the numbers) and
leave a margin; a flag that were ignored (bf16 computing in float32) fails
``test_bf16_really_computes_in_bf16``, and one that were broken fails the tolerance tests.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattrib import precision
from jaxattrib.attribution import diffusion_trak as dt
from jaxattrib.config import ConfigError
from jaxattrib.diffusion.schedule import make_schedule
from jaxattrib.models import unet

# measured 2026-12-07 (docs/precision.md): D-TRAK features, per-example cosine >= 0.99941,
# relative error <= 0.035; asserted with margin
BF16_MIN_COSINE = 0.995
BF16_MAX_REL_ERR = 0.1
# measured: over 8 AdamW updates (lr 1e-3) the bf16 loss is within 0.0012 (relative) of the
# fp32 one at every step; asserted < 0.02
FT_STEPS = 8
FT_MAX_REL_DIFF = 0.02

# one CrossAttn down block, the mid block, one CrossAttn up block; 8x8x4 latents (a small graph:
# the featurization compiles dominate these tests' time)
U = unet.tiny_config(block_out_channels=(8,), cross_attention_dim=32, norm_num_groups=4)


@pytest.fixture(scope="module")
def unet_params():
    return unet.init_params(U, jax.random.PRNGKey(0))


def _examples(n, seed=0):
    r = np.random.RandomState(seed)
    return {"x0": r.randn(n, 8, 8, 4).astype(np.float32),
            "ctx": r.randn(n, 4, 32).astype(np.float32)}


def _cosine(a, b):
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# ------------------------------------------------------------------------------- jaxpr probes
def _eqns(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs nested in it (pjit, remat, custom_vjp)."""
    for e in jaxpr.eqns:
        yield e
        for v in e.params.values():
            for sub in (v if isinstance(v, (list, tuple)) else [v]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


def _compute_dtypes(fn, *args):
    """``{dtype name: count}`` of the operands of every conv / dot_general ``fn`` traces."""
    out: dict = {}
    for e in _eqns(jax.make_jaxpr(fn)(*args).jaxpr):
        if e.primitive.name in ("conv_general_dilated", "dot_general"):
            for v in e.invars:
                name = str(v.aval.dtype)
                out[name] = out.get(name, 0) + 1
    return out


def test_bf16_really_computes_in_bf16(unet_params):
    """The UNet forward, the featurization gradient and the fine-tuning loss gradient with
    precision='bfloat16' run their convolutions / matmuls on bfloat16 operands (the gradients
    come back float32); with 'float32' none does. Fails if the flag were ignored."""
    from jaxattrib.train.diffusion_task import make_diffusion_loss
    ex = _examples(2)
    x, ctx, t = jnp.asarray(ex["x0"]), jnp.asarray(ex["ctx"]), jnp.array([3, 700])
    sched = make_schedule()
    batch = {"images": ex["x0"], "encoder_hidden_states": ex["ctx"]}
    key = jax.random.PRNGKey(1)
    for prec in ("float32", "bfloat16"):
        m = unet.UNet2DConditionModel(U, **precision.unet_kwargs(prec, "full"))
        fwd = _compute_dtypes(lambda p: m.apply({"params": p}, x, t, ctx), unet_params)
        out_fn = dt.make_train_out_fn(U, sched, dt.AttributionConfig(
            method="dtrak", num_timesteps=2, precision=prec, remat="dots_saveable"))
        one = jax.tree.map(lambda a: jnp.asarray(a[0]), dt.with_index(ex))  # row index: noise
        feat_grad = jax.grad(lambda p: out_fn(p, one, key))
        featurize = _compute_dtypes(feat_grad, unet_params)
        loss_fn = make_diffusion_loss(U, None, sched, precision=prec)
        train_grad = jax.grad(lambda p: jnp.mean(loss_fn({"unet": p}, batch, key)))
        train = _compute_dtypes(train_grad, unet_params)
        print(prec, "forward", fwd, "featurize", featurize, "train", train)
        for name, counts in (("forward", fwd), ("featurize", featurize), ("train", train)):
            if prec == "bfloat16":
                # every conv/matmul of the UNet on bf16 operands; float32 ones are only the
                # time-embedding's sinusoid and attention's float32 softmax-side products
                assert counts.get("bfloat16", 0) > 3 * counts.get("float32", 0), (name, counts)
            else:
                assert "bfloat16" not in counts, (name, counts)
        for grad in (feat_grad, train_grad):   # gradients w.r.t. float32 params: float32
            g = jax.eval_shape(grad, unet_params)
            assert {a.dtype for a in jax.tree.leaves(g)} == {jnp.dtype(jnp.float32)}
    y = jax.eval_shape(lambda p: unet.UNet2DConditionModel(U, dtype=jnp.bfloat16).apply(
        {"params": p}, x, t, ctx), unet_params)
    assert y.dtype == jnp.bfloat16


def _features(unet_params, tmp_path, method, n=8, **kw):
    ac = dt.AttributionConfig(method=method, k=256, num_timesteps=2, microbatch=4, **kw)
    out_fn = dt.make_train_out_fn(U, make_schedule(), ac)
    name = "_".join(f"{k}={v}" for k, v in sorted(kw.items())) or "default"
    return dt.featurize_examples(out_fn, unet_params, _examples(n), ac,
                                 tmp_path / method / name, fingerprint="tiny", progress=False)


@pytest.mark.parametrize("method", ["dtrak"])
def test_bf16_features_match_fp32(unet_params, tmp_path, method):
    """bf16 forward/backward gives float32 features within a measured tolerance of the float32
    ones, per example (cosine printed); a bf16 store is not reopened as a float32 one."""
    from jaxattrib.attribution.store import StoreMismatchError
    ref = _features(unet_params, tmp_path, method)
    bf = _features(unet_params, tmp_path, method, precision="bfloat16")
    assert bf.dtype == np.float32 and bf.shape == ref.shape
    cos = _cosine(ref, bf)
    rel = np.linalg.norm(bf - ref, axis=1) / np.linalg.norm(ref, axis=1)
    print(f"{method}: bf16 vs fp32 per-example cosine {np.round(cos, 5).tolist()}, "
          f"relative error {np.round(rel, 4).tolist()}")
    assert cos.min() > BF16_MIN_COSINE, cos
    assert rel.max() < BF16_MAX_REL_ERR, rel
    assert not np.array_equal(bf, ref)              # bf16 did change the computation
    ac = dt.AttributionConfig(method=method, k=256, num_timesteps=2, microbatch=4)
    with pytest.raises(StoreMismatchError, match="precision"):
        dt.featurize_examples(dt.make_train_out_fn(U, make_schedule(), ac), unet_params,
                              _examples(8), ac, tmp_path / method / "precision=bfloat16",
                              fingerprint="tiny", progress=False)


@pytest.mark.parametrize("remat", ["full", pytest.param("dots_saveable", marks=pytest.mark.slow)])
def test_remat_features_equal_no_remat_fp32(unet_params, tmp_path, remat):
    """Rematerializing each UNet block changes memory, not features: float32 features agree
    with the no-remat ones to <= 1e-6 (relative to the largest entry), for the default policy
    ('full'; fast) and one that saves matmul outputs ('dots_saveable'; slow, another compile of
    the same check)."""
    ref = _features(unet_params, tmp_path, "dtrak")
    got = _features(unet_params, tmp_path, "dtrak", remat=remat)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    print(f"remat={remat}: max |Δ| / max |φ| = {err:.2e}")
    assert err <= 1e-6, (remat, err)


def _train_curve(unet_params, prec, steps, remat="none"):
    """Losses of ``steps`` AdamW updates of the tiny UNet (batch 4 of 16 examples) and the
    final state."""
    from jaxattrib import parallel
    from jaxattrib.train import finetune as ft
    from jaxattrib.train.diffusion_task import make_diffusion_loss
    r = np.random.RandomState(0)
    data = {"images": np.tanh(r.randn(16, 8, 8, 4)).astype(np.float32),
            "encoder_hidden_states": r.randn(16, 4, 32).astype(np.float32)}
    tc = ft.TrainConfig(steps=steps, batch_size=4, learning_rate=1e-3, precision=prec,
                        remat=remat)
    loss_fn = make_diffusion_loss(U, None, make_schedule(), precision=prec, remat=remat)
    opt = ft.make_optimizer(tc)
    step = ft.make_train_step(loss_fn, opt, tc, parallel.make_mesh(1))
    trainable, frozen = ft.init_trainable({"unet": unet_params}, tc)
    trainable = jax.tree.map(lambda a: jnp.array(a, copy=True), trainable)  # donated
    state = ft.TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                          opt_state=opt.init(trainable), frozen=frozen)
    losses = []
    for s in range(steps):
        idx, key = ft.batch_plan(0, s, 16, 4)
        state, metrics = step(state, {k: v[idx] for k, v in data.items()}, key)
        losses.append(float(metrics["loss"]))
    return np.array(losses), state


def test_bf16_finetune_loss_curve_tracks_fp32(unet_params):
    """N updates with precision='bfloat16' follow the float32 loss curve within a stated
    tolerance, the master weights and the AdamW state stay float32, and the weights do
    differ (bf16 was used)."""
    n = FT_STEPS
    ref, ref_state = _train_curve(unet_params, "float32", n)
    bf, bf_state = _train_curve(unet_params, "bfloat16", n)
    rel = np.abs(bf - ref) / ref
    print(f"fp32 losses {np.round(ref, 4).tolist()}\nbf16 losses {np.round(bf, 4).tolist()}\n"
          f"relative difference per step: max {rel.max():.4f}, mean {rel.mean():.4f}")
    assert rel.max() < FT_MAX_REL_DIFF, rel
    moved = max(float(jnp.abs(a - b).max()) for a, b in
                zip(jax.tree.leaves(ref_state.params), jax.tree.leaves(unet_params)))
    assert moved > 1e-4                               # it trained
    for tree in (bf_state.params, bf_state.opt_state):
        floats = {a.dtype for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.floating)}
        assert floats == {jnp.dtype(jnp.float32)}, floats
    diff = max(float(jnp.abs(a - b).max()) for a, b in
               zip(jax.tree.leaves(bf_state.params), jax.tree.leaves(ref_state.params)))
    assert diff > 0


def test_finetune_refuses_a_loss_built_with_other_precision(tmp_path):
    from jaxattrib.train.diffusion_task import make_diffusion_loss
    from jaxattrib.train.finetune import TrainConfig, finetune
    loss_fn = make_diffusion_loss(U, None, make_schedule(), precision="bfloat16")
    with pytest.raises(ValueError, match="precision='float32'.*precision='bfloat16'"):
        finetune(loss_fn, {"unet": {}}, 4, lambda i: {}, TrainConfig(batch_size=8),
                 tmp_path / "rec", progress=False)


def test_precision_fields_stay_out_of_old_manifests_and_configs():
    """Defaults are not written into manifests / store metadata (records and stores made
    before the fields existed keep matching); other values are. A run directory's stored
    config.json without the fields reads as the defaults."""
    from jaxattrib.train.finetune import TrainConfig
    d = TrainConfig().to_dict()
    assert not set(precision.DEFAULTS) & set(d)
    d = TrainConfig(precision="bfloat16", remat=True).to_dict()
    assert d["precision"] == "bfloat16" and d["remat"] == "full" and "matmul_precision" not in d
    assert TrainConfig.from_dict(d) == TrainConfig(precision="bfloat16", remat="full")
    stored = {"finetune": {"steps": 3}, "data": {"size": 16}}
    precision.fill_added(stored, precision.added_defaults("finetune", "attribution"))
    assert stored == {"finetune": {"steps": 3, "precision": "float32", "remat": "none",
                                   "matmul_precision": "default"}, "data": {"size": 16}}
    with pytest.raises(ConfigError, match="tune.precision='fp8'"):
        precision.check_fields({"precision": "fp8"}, "finetune")


def test_matmul_precision_reaches_the_traced_computation():
    """matmul_precision='highest' is what jitted matmuls are traced with (default: unset)."""
    f = lambda a: a @ a  # noqa: E731
    a = jnp.ones((4, 4))
    with precision.matmul_precision("highest"):
        eq = [e for e in _eqns(jax.make_jaxpr(f)(a).jaxpr) if e.primitive.name == "dot_general"]
    assert "HIGHEST" in str(eq[0].params["precision"])
    eq = [e for e in _eqns(jax.make_jaxpr(f)(a).jaxpr) if e.primitive.name == "dot_general"]
    assert "HIGHEST" not in str(eq[0].params["precision"])


def test_cli_refuses_bad_precision_fields_before_loading(tmp_path):
    """`--set` reaches the fields; a bad value exits 2 naming the field, before any model or
    data is loaded (the model folders below do not exist)."""
    from typer.testing import CliRunner

    from jaxattrib.cli import app
    missing = str(tmp_path / "no_model")
    for args, field in (
            (["train", "finetune_folder", "--set", f"model={missing}",
              "--set", "finetune.precision=float16"], "finetune.precision='float16'"),
            (["train", "sd15_lora", "--set", f"model={missing}", "--set", "data.source=synthetic",
              "--set", "attribution.remat=blocks"], "attribution.remat='blocks'"),
            (["train", "dreambooth", "--set", f"model={missing}",
              "--set", "finetune.matmul_precision=tf32"], "finetune.matmul_precision='tf32'"),
            (["attribute", str(tmp_path / "no_run"), "--queries", str(tmp_path),
              "--precision", "fp16"], "Invalid value for '--precision'")):   # a CLI choice
        r = CliRunner().invoke(app, args + (["--run-dir", str(tmp_path / "run")]
                                            if args[0] == "train" else []))
        assert r.exit_code == 2, (args, r.output)
        assert field in r.output and "Traceback" not in r.output, r.output


def test_train_run_bf16_remat_and_old_run_dirs_resume(tiny_pixel_pipeline, tmp_path):
    """`train` with finetune.precision=bfloat16 / remat=full records them in the manifest (not
    the defaults); a run directory whose config.json predates the fields still resumes, and
    one made with bf16 refuses a float32 config."""
    import json

    from jaxattrib.config import load_config
    from jaxattrib.runs.train import train_run
    base = [f"model={tiny_pixel_pipeline}", "data.source=digits", "data.size=8",
            "data.max_examples=4", "finetune.steps=1", "finetune.batch_size=2",
            "finetune.checkpoint_every=1"]
    old = tmp_path / "old"
    _, rec = train_run(load_config("finetune_folder", base), old, progress=False)
    assert not set(precision.DEFAULTS) & set(rec.manifest["config"])
    rec.close()
    stored = json.loads((old / "config.json").read_text())
    for k in precision.DEFAULTS:          # as written before the fields existed
        del stored["finetune"][k]
    (old / "config.json").write_text(json.dumps(stored))
    log = (old / "record" / "steps.jsonl").read_text()
    _, rec = train_run(load_config("finetune_folder", base), old, progress=False)  # resumes
    rec.close()
    assert (old / "record" / "steps.jsonl").read_text() == log
    run = tmp_path / "bf16"
    _, rec = train_run(load_config("finetune_folder", base + [
        "finetune.precision=bfloat16", "finetune.remat=full"]), run, progress=False)
    cfg = rec.manifest["config"]
    rec.close()
    assert cfg["precision"] == "bfloat16" and cfg["remat"] == "full"
    assert "matmul_precision" not in cfg               # the default is not written
    with pytest.raises(ConfigError, match="another config"):
        train_run(load_config("finetune_folder", base), run, progress=False)
