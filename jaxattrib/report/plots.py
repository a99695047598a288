"""PNG plots for reports: ROC curves, line plots, histograms (matplotlib, Agg, no display).

Our design: each function builds a fresh ``matplotlib.figure.Figure`` rendered by the Agg canvas
and returns PNG bytes. ``pyplot`` is never imported, so there is no global figure state, no GUI
backend and nothing to close; fonts are matplotlib's bundled DejaVu (no downloads). The bytes go
straight into :class:`jaxattrib.report.html.Report` (``.image(png_bytes)``) or to
:func:`jaxattrib.report.images.save_png`.
"""

from __future__ import annotations

import io
from typing import Mapping, Sequence

import numpy as np

__all__ = ["roc_curve_png", "line_plot_png", "histogram_png"]


def _figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    # No metadata: keeps the PNG byte-stable across matplotlib versions and free of URLs.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


#: line styles of the 2nd, 3rd, ... ROC curve (the baselines): the first curve is solid
_BASELINE_STYLES = ("--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)))


def roc_curve_png(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str = "ROC",
                  *, log_x: bool = False, size: tuple[float, float] = (5.0, 4.5)) -> bytes:
    """ROC curves, one per method, with the chance diagonal.

    Args:
      curves: ``name -> (fpr [D], tpr [D])`` (e.g. from :func:`jaxattrib.metrics.roc_curve`);
        the name is used as is in the legend (put the AUC in it if wanted). The first curve is
        the method (solid); the others are baselines, drawn dashed / dash-dotted / dotted
        *above* it, so that a baseline lying on the plot's border (e.g. TPR = 1 from
        FPR = 0, a perfect separator) stays visible [design].
      title: figure title.
      log_x: logarithmic FPR axis (for low-FPR regimes, TPR@1%FPR); zero FPRs are clipped to
        1e-4 there.
      size: inches at 100 dpi.

    The axes keep a small margin around [0, 1] (no curve coincides with the frame) and the
    legend sits below the axes, outside the plotting area (it never covers a curve).

    Returns:
      PNG bytes.
    """
    fig = _figure(size)
    fig.set_layout_engine("constrained")
    ax = fig.add_subplot(1, 1, 1)
    for i, (name, (fpr, tpr)) in enumerate(curves.items()):
        fpr, tpr = np.asarray(fpr, float), np.asarray(tpr, float)
        if fpr.shape != tpr.shape:
            raise ValueError(f"roc_curve_png: curve {name!r} has fpr {fpr.shape} vs tpr {tpr.shape}")
        if log_x:
            fpr = np.maximum(fpr, 1e-4)
        style = "-" if i == 0 else _BASELINE_STYLES[(i - 1) % len(_BASELINE_STYLES)]
        ax.plot(fpr, tpr, lw=2.2 if i == 0 else 1.8, ls=style, label=str(name),
                zorder=3 + i, clip_on=False)
    lo = 1e-4 if log_x else 0.0
    ax.plot([lo, 1], [lo, 1], ls=(0, (1, 2)), lw=1, color="0.55", label="chance", zorder=2)
    m = 0.025
    if log_x:
        ax.set_xscale("log")
        ax.set_xlim(1e-4 / 1.4, 1.4)
    else:
        ax.set_xlim(-m, 1 + m)
    ax.set_ylim(-m, 1 + m)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=8, frameon=False,
              ncol=2 if len(curves) + 1 > 2 else 1)
    return _png(fig)


def line_plot_png(x: Sequence[float] | np.ndarray, ys: Mapping[str, Sequence[float]],
                  xlabel: str = "", ylabel: str = "", title: str = "", *,
                  log_x: bool = False, markers: bool = True,
                  size: tuple[float, float] = (6.0, 4.0)) -> bytes:
    """Line plot of several series over a shared x axis (e.g. LDS vs checkpoint, Recall@K vs K).

    Args:
      x: ``[D]`` x values.
      ys: ``name -> [D]`` series (NaN leaves a gap).
      xlabel, ylabel, title: text.
      log_x: logarithmic x axis.
      markers: draw a dot at each point.

    Returns:
      PNG bytes.
    """
    x = np.asarray(x, float)
    fig = _figure(size)
    ax = fig.add_subplot(1, 1, 1)
    for name, y in ys.items():
        y = np.asarray(y, float)
        if y.shape != x.shape:
            raise ValueError(f"line_plot_png: series {name!r} has shape {y.shape}, x has {x.shape}")
        ax.plot(x, y, lw=1.8, marker="o" if markers else None, ms=3.5, label=str(name))
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ys:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def histogram_png(values: Mapping[str, Sequence[float]] | np.ndarray, bins: int = 40,
                  xlabel: str = "score", title: str = "", *, density: bool = True,
                  threshold: float | None = None,
                  size: tuple[float, float] = (6.0, 4.0)) -> bytes:
    """Overlaid histograms of score distributions (e.g. member vs hold-out similarities).

    Args:
      values: ``name -> [N_name]`` samples, or one array (shown unnamed). Non-finite values are
        dropped. All groups share the same bin edges (``bins`` equal-width bins over their union).
      bins: number of bins.
      xlabel, title: text.
      density: normalise each histogram to unit area (groups of different sizes stay comparable).
      threshold: optional decision threshold drawn as a vertical line.

    Returns:
      PNG bytes.
    """
    groups = {"": values} if not isinstance(values, Mapping) else dict(values)
    arrays = {k: np.asarray(v, float).reshape(-1) for k, v in groups.items()}
    arrays = {k: v[np.isfinite(v)] for k, v in arrays.items()}
    allv = np.concatenate([v for v in arrays.values()]) if arrays else np.zeros(0)
    if allv.size == 0:
        raise ValueError("histogram_png: no finite values")
    lo, hi = float(allv.min()), float(allv.max())
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    fig = _figure(size)
    ax = fig.add_subplot(1, 1, 1)
    for name, v in arrays.items():
        ax.hist(v, bins=edges, density=density, alpha=0.5, label=name or None,
                histtype="stepfilled", edgecolor="black", linewidth=0.5)
    if threshold is not None:
        ax.axvline(threshold, color="black", ls="--", lw=1.2, label=f"threshold {threshold:.4g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density" if density else "count")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if any(arrays) or threshold is not None:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)
