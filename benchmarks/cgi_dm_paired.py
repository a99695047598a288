"""Paired comparison of two CGI-DM variants of one CGI-DM benchmark run on its validation half
(issue 19 item 6: the authors' PGD budget, ``authors_1000x2``, against the default
``authors_50x4``): each variant's validation AUC of a pixel similarity between the original and
the recovered image, and the AUC difference B − A with a 95 % bootstrap CI that resamples
members and hold-outs separately (stratified) and the same images for both variants (paired).
Also each variant's mean similarity on members / hold-outs and how far PGD moved the image (RMS
of recovered − masked, pixels in [-1, 1]).

Reads the cached recoveries ``RUN_DIR/cgi/<variant>/{member,holdout}_val_*.npz`` that
``benchmarks/cgi_dm.py`` wrote (``--paper-budget`` for ``authors_1000x2``; a batch failing its
checksum is dropped, as the benchmark does, and must be recomputed by it); the similarity is
the benchmark's (SSIM with an 11-px window, or PSNR; data range 2).

    python benchmarks/cgi_dm_paired.py --run-dir runs/cgi_bench_paper_budget \\
        --a authors_50x4 --b authors_1000x2
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np


def load_split(run_dir: Path, variant: str, split: str) -> dict:
    """The recoveries of ``split`` for ``variant``, batches concatenated in order."""
    from jaxattrib import integrity
    folder = run_dir / "cgi" / variant
    paths = sorted(folder.glob(f"{split}_*.npz"))
    if not paths:
        raise FileNotFoundError(f"{folder}: no {split} recoveries; run benchmarks/cgi_dm.py "
                                f"with this variant on {run_dir} first")
    parts = []
    for p in paths:
        blob = integrity.read_checked(p, what="CGI-DM batch")
        if blob is None:
            raise FileNotFoundError(f"{p}: unreadable or failed its checksum; rerun the benchmark")
        parts.append(dict(np.load(io.BytesIO(blob))))
    return {k: np.concatenate([q[k] for q in parts]) for k in ("original", "masked", "recovered")}


def similarity(name: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    from jaxattrib.authentication import similarity as simlib
    if name == "ssim":
        win = min(11, x.shape[1])
        win -= 1 - win % 2
        return np.asarray(simlib.ssim(x, y, data_range=2.0, win_size=win), np.float64)
    if name == "psnr":
        return np.asarray(simlib.psnr(x, y, data_range=2.0), np.float64)
    raise ValueError(f"--similarity {name!r}: expected 'ssim' or 'psnr'")


def paired_auc(a: np.ndarray, b: np.ndarray, labels: np.ndarray, n_bootstrap: int = 2000,
               seed: int = 0) -> dict:
    """AUCs of scores ``a`` and ``b`` of the same images and ``B − A`` with a stratified, paired
    percentile bootstrap (members and non-members resampled separately, the same draw for both)."""
    from jaxattrib.metrics import roc_auc
    labels = np.asarray(labels, bool)
    pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_bootstrap):
        idx = np.r_[rng.choice(pos, pos.size), rng.choice(neg, neg.size)]
        diffs.append(roc_auc(b[idx], labels[idx]) - roc_auc(a[idx], labels[idx]))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    auc_a, auc_b = roc_auc(a, labels), roc_auc(b, labels)
    return {"auc_a": float(auc_a), "auc_b": float(auc_b), "diff": float(auc_b - auc_a),
            "ci_low": float(lo), "ci_high": float(hi)}


def compare(run_dir: Path, a: str, b: str, sim: str = "ssim", n_bootstrap: int = 2000) -> dict:
    scores, moved = {}, {}
    n = None
    for v in (a, b):
        m, h = load_split(run_dir, v, "member_val"), load_split(run_dir, v, "holdout_val")
        if n is not None and (len(m["original"]), len(h["original"])) != n:
            raise ValueError(f"{run_dir}/cgi: {a} and {b} hold different validation images")
        n = (len(m["original"]), len(h["original"]))
        scores[v] = np.r_[similarity(sim, m["original"], m["recovered"]),
                          similarity(sim, h["original"], h["recovered"])]
        moved[v] = float(np.mean([np.sqrt(np.mean((r["recovered"] - r["masked"]) ** 2))
                                  for r in (m, h)]))
    labels = np.r_[np.ones(n[0], bool), np.zeros(n[1], bool)]
    out = paired_auc(scores[a], scores[b], labels, n_bootstrap)
    out.update({"n_members": n[0], "n_holdouts": n[1], "similarity": sim,
                "mean_members": {v: float(s[labels].mean()) for v, s in scores.items()},
                "mean_holdouts": {v: float(s[~labels].mean()) for v, s in scores.items()},
                "rms_recovered_minus_masked": moved})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--run-dir", required=True, type=Path)
    ap.add_argument("--a", default="authors_50x4", help="baseline variant")
    ap.add_argument("--b", default="authors_1000x2", help="compared variant")
    ap.add_argument("--similarity", default="ssim", choices=("ssim", "psnr"))
    ap.add_argument("--n-bootstrap", type=int, default=2000)
    args = ap.parse_args(argv)
    try:
        r = compare(args.run_dir, args.a, args.b, args.similarity, args.n_bootstrap)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
