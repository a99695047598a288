"""How much the models of an LDS run fit their training data, and what that does to the TRAK and
D-TRAK features (the mechanism behind "D-TRAK > TRAK" in a fitting regime).

Reads a finished (or features-complete) run directory of ``benchmarks/lds.py`` (its
``config.json``, models and ``features/{trak,dtrak}_final_train.npy``) and measures:

* **fit**: the DSM loss (the measured output: ``lds.eval_timesteps`` uniform timesteps x
  ``lds.eval_noise_draws`` fixed draws, noise seed ``seed + 1``) of the attributed (full) model on
  its training images vs on held-out ``val`` images, and of ``--models`` subset models (seed of
  the first ``lds.seeds``) on their own members vs the training images they did not see
  (``gap = non-member / member − 1``; 0 = no fit beyond the population);
* **residual vs output** on the training images under the full model at the attribution
  timesteps (``attribution.num_timesteps`` uniform, the features' shared noise, seed ``seed``):
  mean over pixels and examples of ``(ε_θ − ε)²`` (the factor of TRAK's DSM-loss gradient
  ``2(ε_θ − ε)ᵀJ``) and of ``ε_θ²`` (D-TRAK's ``square``: ``2ε_θᵀJ``), per timestep and averaged;
* **feature spectra**: participation ratio ``(Σλ)² / Σλ²`` of the eigenvalues of ``ΦᵀΦ``
  (raw) and of the centred features' Gram, and the mean cosine of each feature with the mean
  feature, for TRAK and D-TRAK train features.

* **paired comparison** (with ``--compare A B``, when ``results/lds.json`` exists): the per-target
  difference LDS(B) − LDS(A) on ``val`` and ``gen`` with each method's λ and sign *as the
  benchmark chose them on the tune split*, mean and 95 % bootstrap CI over targets (the two
  methods' CIs in the table overlap even when one is better on almost every target).

Writes ``regime.json`` into the run directory and prints a table.

    python benchmarks/lds_regime.py --run-dir runs/lds_finetune --run-dir runs/lds_finetune_fit
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lds as bench  # noqa: E402  (benchmarks/lds.py: data, model and schedule of a run)

from jaxattrib.diffusion.losses import fixed_noise, timesteps_uniform  # noqa: E402
from jaxattrib.diffusion.schedule import add_noise, make_schedule  # noqa: E402
from jaxattrib.eval import lds as lds_lib  # noqa: E402


def participation_ratio(phi: np.ndarray, centre: bool = False) -> float:
    """``(Σλ)² / Σλ²`` of the eigenvalues of ``ΦᵀΦ`` (``Φ [n, k]``; centred over rows if asked):
    1 when one direction holds all the energy, ``min(n, k)`` when it is spread evenly."""
    phi = np.asarray(phi, np.float64)
    if centre:
        phi = phi - phi.mean(0)
    lam = np.linalg.eigvalsh(phi @ phi.T if phi.shape[0] <= phi.shape[1] else phi.T @ phi)
    lam = np.clip(lam, 0, None)
    return float(lam.sum() ** 2 / (lam ** 2).sum())


def mean_cosine_to_mean(phi: np.ndarray) -> float:
    """Mean over rows of the cosine between each feature and the mean feature."""
    phi = np.asarray(phi, np.float64)
    m = phi.mean(0)
    return float(np.mean(phi @ m / (np.linalg.norm(phi, axis=1) * np.linalg.norm(m))))


@functools.partial(jax.jit, static_argnames=("eps_apply",))
def _residual_and_output(params, sched, x0, ctx, t, noise, *, eps_apply):
    """Per-example ``mean((ε_θ − ε)²)`` and ``mean(ε_θ²)`` at timestep ``t`` with the shared
    ``noise [h, w, c]``: two ``[B]`` arrays."""
    B = x0.shape[0]
    tb = jnp.full((B,), t, jnp.int32)
    n = jnp.broadcast_to(noise[None], x0.shape)
    out = eps_apply(params, add_noise(sched, x0, n, tb), tb, ctx)
    ax = tuple(range(1, x0.ndim))
    return jnp.mean((out - n) ** 2, axis=ax), jnp.mean(out ** 2, axis=ax)


def measure(run_dir: Path, n_models: int = 4, log=print) -> dict:
    cfg = ml_collections.ConfigDict(json.loads((run_dir / "config.json").read_text()))
    ucfg = bench.unet_config(cfg)
    sched = make_schedule(1000)
    data = bench.load_data(cfg)
    train = data["train"]
    eps_apply = functools.partial(bench.unet_apply, ucfg)
    from flax import serialization
    full = serialization.msgpack_restore((run_dir / "full" / "final.msgpack").read_bytes())
    ts_eval = timesteps_uniform(cfg.lds.eval_timesteps, sched.num_train_timesteps)
    loss = functools.partial(lds_lib.target_losses, eps_apply, sched=sched, timesteps=ts_eval,
                             noise_seed=cfg.seed + 1, n_noise=cfg.lds.eval_noise_draws,
                             batch_size=256)
    ex = lambda d, idx=slice(None): {"x0": d["x0"][idx], "ctx": d["ctx"][idx]}  # noqa: E731
    out = {"run_dir": str(run_dir), "n_train": int(cfg.data.n_train),
           "train_steps": int(cfg.train.steps),
           "epochs_subset": cfg.train.steps * cfg.train.batch_size
           / round(cfg.lds.alpha * cfg.data.n_train),
           "epochs_full": cfg.train.steps * cfg.train.batch_size / cfg.data.n_train}

    # fit of the full model: its training images vs held-out ones
    l_tr, l_val = loss(full, targets=ex(train)), loss(full, targets=ex(data["val"]))
    out["full_loss_train"], out["full_loss_val"] = float(l_tr.mean()), float(l_val.mean())
    out["full_gap"] = out["full_loss_val"] / out["full_loss_train"] - 1
    log(f"{run_dir}: full model loss train {l_tr.mean():.4f} val {l_val.mean():.4f}")

    # fit of subset models: members vs the training images they did not see
    masks = np.load(run_dir / "subsets" / "masks.npy")
    gaps, mem, non = [], [], []
    seed = int(cfg.lds.seeds[0])
    for j in range(min(n_models, masks.shape[0])):
        params = lds_lib.load_model(run_dir / "subsets", j, seed)
        l_all = loss(params, targets=ex(train))
        m, nm = l_all[masks[j]].mean(), l_all[~masks[j]].mean()
        mem.append(m)
        non.append(nm)
        gaps.append(nm / m - 1)
    out.update(subset_loss_member=float(np.mean(mem)), subset_loss_nonmember=float(np.mean(non)),
               subset_gap=float(np.mean(gaps)), subset_gap_models=len(gaps))
    log(f"subset models ({len(gaps)}): member {np.mean(mem):.4f} non-member {np.mean(non):.4f}")

    # residual vs output at the attribution timesteps (the features' shared noise)
    ts_attr = timesteps_uniform(cfg.attribution.num_timesteps, sched.num_train_timesteps)
    res_t, sq_t, res_val_t = [], [], []
    for t in ts_attr:
        noise = fixed_noise(cfg.seed, int(t), train["x0"].shape[1:])
        r, q = _residual_and_output(full, sched, train["x0"], train["ctx"], int(t), noise,
                                    eps_apply=eps_apply)
        rv, _ = _residual_and_output(full, sched, data["val"]["x0"], data["val"]["ctx"], int(t),
                                     noise, eps_apply=eps_apply)
        res_t.append(float(r.mean()))
        sq_t.append(float(q.mean()))
        res_val_t.append(float(rv.mean()))
    out.update(timesteps=[int(t) for t in ts_attr], residual_sq_train=res_t,
               residual_sq_val=res_val_t, output_sq_train=sq_t,
               residual_sq_train_mean=float(np.mean(res_t)),
               residual_sq_val_mean=float(np.mean(res_val_t)),
               output_sq_train_mean=float(np.mean(sq_t)))

    # spectra of the train features
    for method in ("trak", "dtrak"):
        path = run_dir / "features" / f"{method}_final_train.npy"
        if not path.is_file():
            continue
        phi = np.load(path)
        out[f"{method}_pr_raw"] = participation_ratio(phi)
        out[f"{method}_pr_centred"] = participation_ratio(phi, centre=True)
        out[f"{method}_cos_to_mean"] = mean_cosine_to_mean(phi)
    (run_dir / "regime.json").write_text(json.dumps(out, indent=2))
    return out


def paired_difference(run_dir: Path, a: str = "trak", b: str = "dtrak") -> dict:
    """``{split: {'mean', 'ci_low', 'ci_high', 'frac_b_better'}}`` of the per-target
    LDS(b) − LDS(a) for ``val`` and ``gen``, each method at the λ ratio and sign that
    ``benchmarks/lds.py`` chose on the tune split: its ``results/lds_per_target.npz`` where
    written (any noise mode or ensemble), else scores recomputed from the cached 'shared'-noise
    features ``{method}_final_*.npy`` with the choice read from ``results/lds.json``."""
    from jaxattrib.attribution import diffusion_trak as dt
    from jaxattrib.metrics import bootstrap_ci, lds
    cfg = ml_collections.ConfigDict(json.loads((run_dir / "config.json").read_text()))
    chosen = {r["method"]: r for r in
              json.loads((run_dir / "results" / "lds.json").read_text())["tables"][0]["rows"]}
    masks = np.load(run_dir / "subsets" / "masks.npy")

    def unmeasured(_):
        raise FileNotFoundError(f"{run_dir}: measured outputs missing (run benchmarks/lds.py)")

    stored = {}
    if (run_dir / bench.PER_TARGET).is_file():  # written by benchmarks/lds.py: any noise mode / M
        with np.load(run_dir / bench.PER_TARGET) as z:
            stored = {k: z[k] for k in z.files}
    out = {}
    for split in ("val", "gen"):
        actual = lds_lib.actual_outputs(run_dir / "subsets", unmeasured, name=f"loss_{split}")
        per = {}
        for m in (a, b):
            if f"{m}/{split}" in stored:
                per[m] = stored[f"{m}/{split}"]
                continue
            ratio = float(chosen[m]["choice"].split("=")[1])
            Phi = np.load(run_dir / "features" / f"{m}_final_train.npy")
            lam = dt.relative_lambdas(Phi, [ratio])[0]
            sc = dt.scores_from_features(np.load(run_dir / "features" / f"{m}_final_{split}.npy"),
                                         Phi, lam)
            per[m] = lds(sc, masks, actual, sign=chosen[m]["sign"], n_bootstrap=10).per_target
        d = per[b] - per[a]
        d = d[np.isfinite(d)]
        ci = bootstrap_ci(d, np.mean, n=int(cfg.lds.n_bootstrap), seed=int(cfg.seed))
        out[split] = {"mean": ci.estimate, "ci_low": ci.low, "ci_high": ci.high,
                      "frac_b_better": float(np.mean(d > 0)), "n": int(d.size)}
    return out


ROWS = [("epochs of a subset model / of the full model",
         lambda r: f"{r['epochs_subset']:.0f} / {r['epochs_full']:.0f}"),
        ("full model DSM loss, train / val (gap)",
         lambda r: f"{r['full_loss_train']:.4f} / {r['full_loss_val']:.4f} "
                   f"({100 * r['full_gap']:+.1f} %)"),
        ("subset models, members / non-members (gap)",
         lambda r: f"{r['subset_loss_member']:.4f} / {r['subset_loss_nonmember']:.4f} "
                   f"({100 * r['subset_gap']:+.1f} %, {r['subset_gap_models']} models)"),
        ("mean (ε_θ−ε)² train / val, attribution timesteps",
         lambda r: f"{r['residual_sq_train_mean']:.4f} / {r['residual_sq_val_mean']:.4f}"),
        ("mean ε_θ² train", lambda r: f"{r['output_sq_train_mean']:.4f}"),
        ("TRAK features: PR raw / centred, cos to mean",
         lambda r: f"{r.get('trak_pr_raw', float('nan')):.2f} / "
                   f"{r.get('trak_pr_centred', float('nan')):.1f}, "
                   f"{r.get('trak_cos_to_mean', float('nan')):.3f}"),
        ("D-TRAK features: PR raw / centred, cos to mean",
         lambda r: f"{r.get('dtrak_pr_raw', float('nan')):.2f} / "
                   f"{r.get('dtrak_pr_centred', float('nan')):.1f}, "
                   f"{r.get('dtrak_cos_to_mean', float('nan')):.3f}")]


def format_table(results: list[dict]) -> str:
    lines = ["| quantity | " + " | ".join(r["run_dir"] for r in results) + " |",
             "|---" * (len(results) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(fn(r) for r in results) + " |" for name, fn in ROWS]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", action="append", required=True,
                    help="a run directory of benchmarks/lds.py (repeat to compare)")
    ap.add_argument("--models", type=int, default=4,
                    help="subset models whose member / non-member losses are measured")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), default=None,
                    help="also the paired per-target LDS(B) - LDS(A), e.g. --compare trak dtrak")
    ap.add_argument("--only-compare", action="store_true",
                    help="skip the fit / residual / spectrum measurements")
    args = ap.parse_args(argv)
    if not args.only_compare:
        results = [measure(Path(d), args.models, log=lambda m: print(m, flush=True))
                   for d in args.run_dir]
        print(format_table(results))
    if args.compare:
        a, b = args.compare
        for d in args.run_dir:
            diff = paired_difference(Path(d), a, b)
            (Path(d) / f"paired_{b}_minus_{a}.json").write_text(json.dumps(diff, indent=2))
            print(f"{d}: LDS({b}) - LDS({a}) per target: " + "; ".join(
                f"{sp} {v['mean']:+.3f} [{v['ci_low']:+.3f}, {v['ci_high']:+.3f}] "
                f"({100 * v['frac_b_better']:.0f} % of {v['n']} targets {b} higher)"
                for sp, v in diff.items()), flush=True)


if __name__ == "__main__":
    main()
