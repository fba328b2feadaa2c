"""Scoring layer: metrics, score normalisation, calibration, plots. numpy only.

Nothing here imports torch; matplotlib is imported only inside the plot functions, so
``speaker-sim eval`` starts fast.
"""

from speaker_sim_cli.scoring.calibration import Calibration, cllr, fit_calibration, min_cllr
from speaker_sim_cli.scoring.metrics import (
    DEFINITION,
    Metrics,
    compute_eer,
    compute_min_dcf,
    det_curve,
    error_rates_at,
    evaluate,
)
from speaker_sim_cli.scoring.norm import (
    asnorm,
    cohort_stats,
    snorm,
    speaker_mean_cohort,
    subtract_mean,
)
from speaker_sim_cli.scoring.plots import plot_det, plot_histograms

__all__ = [
    "DEFINITION",
    "Calibration",
    "Metrics",
    "asnorm",
    "cllr",
    "cohort_stats",
    "compute_eer",
    "compute_min_dcf",
    "det_curve",
    "error_rates_at",
    "evaluate",
    "fit_calibration",
    "min_cllr",
    "plot_det",
    "plot_histograms",
    "snorm",
    "speaker_mean_cohort",
    "subtract_mean",
]
