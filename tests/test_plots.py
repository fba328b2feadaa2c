"""DET / histogram plots write valid images; probit accuracy; import hygiene of scoring/."""

from __future__ import annotations

import doctest
import struct
import subprocess
import sys
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest

from speaker_sim_cli.scoring import plots
from speaker_sim_cli.scoring.plots import det_figure, plot_det, plot_histograms, probit

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SCORING = Path(plots.__file__).parent


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, "not a PNG file"
    assert data[12:16] == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    assert data.endswith(b"IEND\xaeB`\x82"), "PNG is truncated"
    return w, h


def synthetic(seed: int, n: int = 3000, sep: float = 2.0):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.2
    s = rng.normal(y * sep, 1.0)
    return s, y


def test_doctests() -> None:
    assert doctest.testmod(plots).failed == 0


def test_probit_matches_statistics_normaldist() -> None:
    p = np.concatenate(
        [np.logspace(-12, -1, 60), np.linspace(0.01, 0.99, 99), 1 - np.logspace(-12, -1, 60)]
    )
    ref = np.array([NormalDist().inv_cdf(float(x)) for x in p])
    np.testing.assert_allclose(probit(p), ref, rtol=2e-9, atol=1e-12)
    np.testing.assert_array_equal(probit([0.0, 1.0]), [-np.inf, np.inf])
    assert np.isnan(probit([-0.1, 1.1, np.nan])).all()


def test_plot_det_single_and_overlaid(tmp_path: Path) -> None:
    one = plot_det([("sys", *synthetic(0))], tmp_path / "det.png")
    assert one == tmp_path / "det.png"
    w, h = png_size(one)
    assert w > 300 and h > 300
    many = plot_det(
        [("a", *synthetic(1, sep=1.0)), ("b", *synthetic(2, sep=2.5)), ("c", *synthetic(3))],
        tmp_path / "sub" / "det3.png",
        title="three systems",
    )
    png_size(many)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["det.png", "det3.png", "sub"]


def test_plot_det_handles_perfect_and_poor_systems(tmp_path: Path) -> None:
    perfect = ([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1])
    poor = synthetic(4, sep=0.1)  # minDCF point far above 40 % -> the axis is extended
    png_size(plot_det([("perfect", *perfect), ("poor", *poor)], tmp_path / "det.png"))


def _drawn(fig) -> tuple[list, tuple[float, float]]:
    ax = fig.axes[0]
    lines = [ln for ln in ax.lines if len(ln.get_xdata()) and ln.get_linestyle() != ":"]
    return lines, ax.get_xlim()


def test_det_draws_everything_inside_the_axes_even_at_zero_rates() -> None:
    """Rates of 0 (probit -inf) are drawn on the edge: a perfect system is visible, and no
    point of any curve or marker lies below the axes, no marker above."""
    perfect = ([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1])
    fig = det_figure([("perfect", *perfect), ("sys", *synthetic(7))])
    lines, (lo, hi) = _drawn(fig)
    assert len(lines) == 6  # a curve, an EER circle and a minDCF square per system
    for n, ln in enumerate(lines):
        x, y = np.asarray(ln.get_xdata(), float), np.asarray(ln.get_ydata(), float)
        assert np.isfinite(x).all() and np.isfinite(y).all()
        assert x.min() >= lo - 1e-9 and y.min() >= lo - 1e-9
        if n % 3:  # the markers: inside; a curve's high end may leave the axes (clipped)
            assert x.max() <= hi + 1e-9 and y.max() <= hi + 1e-9
    curve, eer_pt, dcf_pt = lines[:3]
    # The perfect system runs along the left and lower edges and its markers sit in the corner.
    assert np.isclose(np.asarray(curve.get_xdata(), float).min(), lo)
    assert np.isclose(np.asarray(curve.get_ydata(), float).min(), lo)
    for pt in (eer_pt, dcf_pt):
        assert np.allclose([pt.get_xdata()[0], pt.get_ydata()[0]], [lo, lo])


def test_det_lower_limit_follows_the_trial_count() -> None:
    """A few hundred trials: axes from 0.05 %; 300k: down to 0.001 %, with ticks there."""
    _, (lo_small, _) = _drawn(det_figure([("s", *synthetic(8, n=400))]))
    assert np.isclose(lo_small, probit([5e-4])[0])
    big = det_figure([("b", *synthetic(9, n=300_000))])
    _, (lo_big, _) = _drawn(big)
    assert np.isclose(lo_big, probit([1e-5])[0])
    labels = [t.get_text() for t in big.axes[0].get_xticklabels()]
    assert "0.001" in labels and "0.01" in labels


def test_plot_det_large_curve_is_thinned(tmp_path: Path) -> None:
    s, y = synthetic(5, n=300_000)
    png_size(plot_det([("big", s, y)], tmp_path / "det.png"))


def test_plot_det_other_formats(tmp_path: Path) -> None:
    pdf = plot_det([("sys", *synthetic(6))], tmp_path / "det.pdf")
    assert pdf.read_bytes()[:5] == b"%PDF-"
    svg = plot_det([("sys", *synthetic(6))], tmp_path / "det.svg")
    assert b"<svg" in svg.read_bytes()[:2000]


def test_plot_histograms(tmp_path: Path) -> None:
    s, y = synthetic(7)
    out = plot_histograms(s, y, tmp_path / "hist.png", title="dev")
    w, h = png_size(out)
    assert w > 300 and h > 200


def test_plot_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one"):
        plot_det([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="no target"):
        plot_det([("x", [0.1, 0.2], [0, 0])], tmp_path / "x.png")
    with pytest.raises(ValueError, match="p_target"):
        plot_det([("x", [0.1, 0.2], [0, 1])], tmp_path / "x.png", p_target=1.5)
    with pytest.raises(ValueError, match="finite"):
        plot_histograms([0.1, np.inf], [0, 1], tmp_path / "x.png")
    assert not list(tmp_path.iterdir())  # nothing half-written


@pytest.mark.shared
def test_plot_reference_scores(shared: Path, tmp_path: Path) -> None:
    import csv

    path = shared / "fixtures" / "reference" / "dev_hard_campplus_zh_en_advanced.scores.csv"
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    s = np.array([float(r["score"]) for r in rows])
    y = np.array([int(r["label"]) for r in rows])
    png_size(plot_det([("dev_hard", s, y)], tmp_path / "det.png"))
    png_size(plot_histograms(s, y, tmp_path / "hist.png", "dev_hard"))


def test_scoring_never_imports_torch_or_matplotlib_at_import() -> None:
    code = (
        "import sys, speaker_sim_cli; before = set(sys.modules);"
        "import speaker_sim_cli.scoring, speaker_sim_cli.scoring.plots;"
        "new = set(sys.modules) - before;"
        "bad = sorted(m for m in new if m.split('.')[0] in ('torch', 'matplotlib', 'scipy'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_no_torch_in_scoring_sources() -> None:
    for py in SCORING.glob("*.py"):
        text = py.read_text()
        assert "import torch" not in text, py
        assert "from torch" not in text, py
