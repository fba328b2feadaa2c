"""DET curves and score histograms (matplotlib, Agg; imported only inside the functions).

The figures are built with matplotlib's object API on an Agg canvas, so no GUI backend and
no global pyplot state is involved, and ``import speaker_sim_cli.scoring`` stays cheap.
Files are written atomically (temp file + rename); the format follows the suffix (.png,
.pdf, .svg).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from speaker_sim_cli.scoring.metrics import (
    _check_dcf_params,
    _check_inputs,
    _counts,
    _eer_index,
    _min_dcf_index,
    _rates,
    _thresholds_at,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["DET_TICKS", "det_figure", "plot_det", "plot_histograms", "probit"]

#: DET axis ticks, as fractions (labelled in %)
DET_TICKS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4)
_HIGH_TICKS = (0.6, 0.8, 0.9, 0.95, 0.98, 0.99)

# rational approximation of the inverse normal CDF (P. J. Acklam; relative error < 1.2e-9)
_A = (-39.69683028665376, 220.9460984245205, -275.9285104469687, 138.3577518672690,
      -30.66479806614716, 2.506628277459239)  # fmt: skip
_B = (-54.47609879822406, 161.5858368580409, -155.6989798598866, 66.80131188771972,
      -13.28068155288572)  # fmt: skip
_C = (-0.007784894002430293, -0.3223964580411365, -2.400758277161838, -2.549732539343734,
      4.374664141464968, 2.938163982698783)  # fmt: skip
_D = (0.007784695709041462, 0.3224671290700398, 2.445134137142996, 3.754408661907416)
_P_LOW = 0.02425


def _poly(coef: Sequence[float], x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    out = np.full_like(x, coef[0])
    for c in coef[1:]:
        out = out * x + c
    return out


def probit(p: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Standard normal deviate (inverse CDF) of probabilities p, any shape; 0 -> -inf, 1 -> inf.

    Example:
        >>> probit([0.5, 0.975]).round(6).tolist()
        [0.0, 1.959964]
    """
    p = np.asarray(p, dtype=np.float64)
    out = np.empty_like(p)
    with np.errstate(divide="ignore", invalid="ignore"):
        lo = p < _P_LOW
        hi = p > 1.0 - _P_LOW
        mid = ~(lo | hi)
        q = p[mid] - 0.5
        r = q * q
        out[mid] = q * _poly(_A, r) / (_poly(_B, r) * r + 1.0)
        t = np.sqrt(-2.0 * np.log(p[lo]))
        out[lo] = _poly(_C, t) / (_poly(_D, t) * t + 1.0)
        t = np.sqrt(-2.0 * np.log1p(-p[hi]))
        out[hi] = -_poly(_C, t) / (_poly(_D, t) * t + 1.0)
    out[p == 0.0] = -np.inf
    out[p == 1.0] = np.inf
    out[~((p >= 0.0) & (p <= 1.0))] = np.nan
    return out


def _save(fig: Figure, path: str | os.PathLike[str], **kw: Any) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fmt = dest.suffix.lstrip(".").lower() or "png"
    # a unique temp name opened normally (so the file gets the usual umask permissions)
    tmp = dest.parent / f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "xb") as f:
            fig.savefig(f, format=fmt, **kw)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def _thin(x: npt.NDArray[np.float64], y: npt.NDArray[np.float64], step: float = 2e-3) -> Any:
    """Drop points that fall in the same (step x step) cell as their predecessor."""
    if x.shape[0] <= 2000:
        return x, y
    cx = np.floor(x / step)
    cy = np.floor(y / step)
    keep = np.ones(x.shape[0], dtype=bool)
    keep[1:] = (cx[1:] != cx[:-1]) | (cy[1:] != cy[:-1])
    keep[-1] = True
    return x[keep], y[keep]


def plot_det(
    curves: Sequence[tuple[str, npt.ArrayLike, npt.ArrayLike]],
    path: str | os.PathLike[str],
    p_target: float = 0.01,
    title: str | None = None,
) -> Path:
    """Overlay DET curves on normal-deviate axes and write the figure to ``path``.

    Args:
        curves: ``(label, scores (n,), labels (n,))`` per system; one line each, with its EER
            point (circle) and minDCF operating point at ``p_target`` (square) marked.
        path: output file (.png, .pdf, .svg); parent folders are created.
        p_target: prior for the minDCF point (c_miss = c_fa = 1).
        title: optional figure title.

    Returns:
        ``path`` as a Path. See :func:`det_figure` for the axes.
    """
    return _save(det_figure(curves, p_target, title), path)


# Lower axis limits on offer (fractions): the largest one at or below the finest error rate
# the trials can show (1 / trials of the larger class), so big lists keep their low-FAR end.
_LOW_LIMITS = (5e-4, 2e-4, 1e-4, 5e-5, 2e-5, 1e-5)
_LOW_TICKS = (1e-5, 1e-4)


def det_figure(
    curves: Sequence[tuple[str, npt.ArrayLike, npt.ArrayLike]],
    p_target: float = 0.01,
    title: str | None = None,
) -> Figure:
    """The DET figure of :func:`plot_det`, not yet written.

    Axes are labelled in %, from 0.05 % (lower when a curve has the trials to resolve lower
    rates, down to 0.001 %) to 40 % (extended when a marked point lies beyond). Rates below
    the lower limit, 0 included, are drawn on the lower and left edges, so a perfectly separated
    system shows as a line along those edges with its markers in the corner, not as nothing.
    """
    if not curves:
        raise ValueError("plot_det needs at least one (label, scores, labels) curve")
    _check_dcf_params(p_target, 1.0, 1.0)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 6.0), dpi=120)
    ax = fig.add_subplot()
    rows = []
    finest = 1.0
    for label, scores, labels in curves:
        s, y = _check_inputs(scores, labels)
        c = _counts(s, y)
        finest = min(finest, 1.0 / max(c.n_targets, c.n_nontargets))
        rows.append((label, c))
    lo = next((t for t in _LOW_LIMITS if t <= finest), _LOW_LIMITS[-1])
    hi = 0.5
    drawn = []
    for label, c in rows:
        fnr, fpr = _rates(c)
        eer, _ = _eer_index(fnr, fpr)
        dcf, k = _min_dcf_index(fnr, fpr, p_target, 1.0, 1.0)
        drawn.append((label, fnr, fpr, eer, dcf, k))
        hi = max(hi, float(eer), float(fpr[k]), float(fnr[k]))
    if hi > 0.45:
        hi = next((t for t in (0.8, 0.95, 0.99) if hi < t * 0.97), 0.995)
        ticks = DET_TICKS + tuple(t for t in _HIGH_TICKS if t <= hi)
    else:
        ticks = DET_TICKS
    ticks = tuple(t for t in _LOW_TICKS if t >= lo and t < DET_TICKS[0]) + ticks

    def edge(v: npt.ArrayLike, top: float = 1 - 1e-9) -> npt.NDArray[np.float64]:
        return probit(np.clip(np.asarray(v, dtype=np.float64), lo, top))

    color_cycle = [f"C{i}" for i in range(10)]
    for i, (label, fnr, fpr, eer, dcf, k) in enumerate(drawn):
        color = color_cycle[i % len(color_cycle)]
        # Low rates (0 included) sit on the lower/left edge; high ones leave the axes, clipped.
        px, py = _thin(edge(fpr), edge(fnr))
        ax.plot(px, py, color=color, lw=1.6,
                label=f"{label}: EER {eer * 100:.2f}%, minDCF({p_target:g}) {dcf:.3f}")  # fmt: skip
        pe = edge([eer], hi)[0]
        marker: dict[str, Any] = {
            "color": color,
            "ms": 7,
            "mec": "black",
            "mew": 0.8,
            "zorder": 5,
            "clip_on": False,
        }
        ax.plot([pe], [pe], "o", **marker)
        ax.plot(edge([fpr[k]], hi), edge([fnr[k]], hi), "s", **marker)
    tick_pos = probit(np.array(ticks))
    tick_lab = [f"{t * 100:g}" for t in ticks]
    lim = (float(probit([lo])[0]), float(probit([hi])[0]))
    ax.plot(lim, lim, ls=":", color="0.6", lw=0.8, zorder=0)  # fnr = fpr
    # legend-only markers explaining the symbols
    ax.plot([], [], "o", color="white", mec="black", label="EER point")
    ax.plot([], [], "s", color="white", mec="black", label=f"minDCF point (p={p_target:g})")
    ax.set_xticks(tick_pos, tick_lab)
    ax.set_yticks(tick_pos, tick_lab)
    ax.set_xlim(*lim)
    ax.set_ylim(*lim)
    ax.set_aspect("equal")
    ax.grid(True, color="0.85", lw=0.6)
    ax.set_xlabel("False acceptance rate, FAR (%)")
    ax.set_ylabel("False rejection rate, FRR (%)")
    ax.set_title(title or "DET curve")
    ax.legend(loc="upper right", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    return fig


def plot_histograms(
    scores: npt.ArrayLike,
    labels: npt.ArrayLike,
    path: str | os.PathLike[str],
    title: str | None = None,
    bins: int = 80,
) -> Path:
    """Target vs non-target score histograms (densities on shared bins), EER threshold marked.

    Args:
        scores: (n,) finite scores; labels: (n,) 1 = target, 0 = non-target.
        path: output file (.png, .pdf, .svg).

    Returns:
        ``path`` as a Path.
    """
    s, y = _check_inputs(scores, labels)
    if not np.all(np.isfinite(s)):
        raise ValueError("histograms need finite scores")
    from matplotlib.figure import Figure

    c = _counts(s, y)
    fnr, fpr = _rates(c)
    eer, k = _eer_index(fnr, fpr)
    thr = _thresholds_at(c, k)
    edges = np.histogram_bin_edges(s, bins=bins)
    fig = Figure(figsize=(7.0, 4.2), dpi=120)
    ax = fig.add_subplot()
    ax.hist(s[~y], bins=edges.tolist(), density=True, alpha=0.55, color="C3",
            label=f"non-target (n={c.n_nontargets})")  # fmt: skip
    ax.hist(s[y], bins=edges.tolist(), density=True, alpha=0.55, color="C2",
            label=f"target (n={c.n_targets})")  # fmt: skip
    ax.axvline(thr, color="black", ls="--", lw=1.0,
               label=f"EER threshold {thr:.4f} (EER {eer * 100:.2f}%)")  # fmt: skip
    ax.set_xlabel("score")
    ax.set_ylabel("density")
    ax.set_title(title or "Score distributions")
    ax.legend(fontsize=8)
    ax.grid(True, color="0.9", lw=0.6)
    fig.tight_layout()
    return _save(fig, path)
