"""resampy's ``kaiser_best`` resampler in numpy (the resampler mvector reads audio with).

mvector resamples non-16 kHz input with ``resampy.resample(x, sr, 16000, filter='kaiser_best')``.
soxr differs from it most near Nyquist, where the log features of near-empty bands are large
and noisy: with soxr, mvector's embeddings of resampled input drift to cosine 0.69-0.98
(measured on ``fixtures/mvector``), so this family resamples as resampy does.

The algorithm (Smith's bandlimited interpolation, as resampy implements it): a windowed-sinc
half-filter tabulated at 2**13 points per zero crossing, 50 zero crossings, a Kaiser window
(beta 12.984585) and roll-off 0.9173474; each output sample at input time ``t`` sums the input
samples to its left and right weighted by the table, linearly interpolated between entries;
when downsampling, the filter is stretched by the rate ratio (and scaled by it).

For rates with a small period (``sr_new / gcd`` output phases: 160 for 44.1 kHz, 320 for
22.05 kHz, 1 to 3 for 8/24/32/48 kHz) the weights of every phase are computed once and the
output is a float64 matrix product over blocks of input (a polyphase filter); otherwise the
taps are summed one by one. Either way the output is resampy 0.4.3's to within 1 float32 ulp
(its sums round to float32 after every tap). Written from the published algorithm; the
filter table is computed here, not copied.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

__all__ = ["kaiser_best_resample"]

ZERO_CROSSINGS = 50
TABLE_BITS = 13
BETA = 12.984585153568672
ROLLOFF = 0.9173473712608761
# Outputs per block: bounds memory to a few arrays of this size whatever the length.
_BLOCK = 1 << 16
# Largest polyphase table (entries, float64) before falling back to the direct form.
_MAX_TABLE = 1 << 22


@lru_cache(maxsize=1)
def _half_filter() -> tuple[np.ndarray, np.ndarray]:
    """The right wing of the windowed sinc (float64, 50 * 2**13 + 1 taps) and its differences."""
    n = (1 << TABLE_BITS) * ZERO_CROSSINGS
    sinc = ROLLOFF * np.sinc(ROLLOFF * np.linspace(0, ZERO_CROSSINGS, num=n + 1, endpoint=True))
    win = np.kaiser(2 * n + 1, BETA)[n:] * sinc
    win.setflags(write=False)
    return win, np.diff(win, append=win[-1])


def _wing_taps(
    t: np.ndarray, scale: float, step: int, nwin: int, win: np.ndarray, delta: np.ndarray
) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]], list[tuple[np.ndarray, np.ndarray]]]:
    """For output times ``t``: the input index ``n`` left of each, and per tap the weight and
    tap count limit of the left wing (x[n - i]) and the right wing (x[n + 1 + i])."""
    num_table = 1 << TABLE_BITS
    n = t.astype(np.int64)
    frac = scale * (t - n)
    wings = []
    for f in (frac, scale - frac):
        index_frac = f * num_table
        offset = index_frac.astype(np.int64)
        eta = index_frac - offset
        taps = (nwin - offset) // step
        weights = []
        for i in range(int(taps.max(initial=0))):
            live = i < taps
            idx = np.where(live, offset + i * step, 0)
            weights.append((np.where(live, win[idx] + eta * delta[idx], 0.0), live))
        wings.append(weights)
    return n, wings[0], wings[1]


def _filter(ratio: float) -> tuple[np.ndarray, np.ndarray, float, int]:
    win, delta = _half_filter()
    if ratio < 1:
        win = ratio * win
        delta = np.diff(win, append=win[-1])
    scale = min(1.0, ratio)
    return win, delta, scale, int(scale * (1 << TABLE_BITS))


@lru_cache(maxsize=8)
def _polyphase(sr_orig: int, sr_new: int) -> tuple[int, int, int, np.ndarray] | None:
    """``(L, M, lead, W)``: every ``L`` outputs advance ``M`` inputs; output ``p + q*L`` is
    ``W[p] . xpad[q*M : q*M + W.shape[1]]`` with ``lead`` zeros before the input. None when
    the table would be too large (rates without a small common period)."""
    g = math.gcd(sr_orig, sr_new)
    period, advance = sr_new // g, sr_orig // g
    ratio = float(sr_new) / sr_orig
    win, delta, scale, step = _filter(ratio)
    nwin = win.shape[0]
    taps = nwin // step + 1
    if period * (advance + 2 * taps) > _MAX_TABLE:
        return None
    t = np.arange(period) * (1.0 / ratio)
    n, left, right = _wing_taps(t, scale, step, nwin, win, delta)
    lead = len(left)
    table = np.zeros((period, advance + lead + len(right) + 1))
    rows = np.arange(period)
    for i, (w, _) in enumerate(left):
        table[rows, n - i + lead] += w
    for k, (w, _) in enumerate(right):
        table[rows, n + 1 + k + lead] += w
    table.setflags(write=False)
    return period, advance, lead, table


def _resample_taps(x: np.ndarray, ratio: float, n_out: int) -> np.ndarray:
    """The direct form: every output's taps summed one by one (any pair of rates)."""
    win, delta, scale, step = _filter(ratio)
    y = np.zeros(n_out, dtype=np.float32)
    t_all = np.arange(n_out) * (1.0 / ratio)
    n_in = x.shape[0]
    for start in range(0, n_out, _BLOCK):
        t = t_all[start : start + _BLOCK]
        n, left, right = _wing_taps(t, scale, step, win.shape[0], win, delta)
        acc = np.zeros(t.shape[0])
        for i, (w, live) in enumerate(left):
            ok = live & (n - i >= 0)
            acc += np.where(ok, w * x[np.where(ok, n - i, 0)], 0.0)
        for k, (w, live) in enumerate(right):
            ok = live & (n + 1 + k < n_in)
            acc += np.where(ok, w * x[np.where(ok, n + 1 + k, 0)], 0.0)
        y[start : start + t.shape[0]] = acc
    return y


def resampler_input(x: np.ndarray, sr_orig: int, sr_new: int) -> np.ndarray:
    """``x`` as a 1-D float32 array, after checking it and the two rates (both resamplers)."""
    if sr_orig <= 0 or sr_new <= 0:
        raise ValueError(f"sample rates must be positive, got {sr_orig} -> {sr_new}")
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"expected a 1-D signal, got shape {x.shape}")
    return x


def kaiser_best_resample(x: np.ndarray, sr_orig: int, sr_new: int) -> np.ndarray:
    """Resample a 1-D float32 signal from ``sr_orig`` to ``sr_new`` Hz (``int(N * sr_new /
    sr_orig)`` samples out), as ``resampy.resample(x, sr_orig, sr_new, filter='kaiser_best')``.

    >>> t = np.arange(22050) / 22050
    >>> y = kaiser_best_resample(np.sin(2 * np.pi * 440 * t).astype(np.float32), 22050, 16000)
    >>> y.shape, y.dtype
    ((16000,), dtype('float32'))
    >>> ref = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    >>> float(np.abs(y[100:-100] - ref[100:-100]).max()) < 1e-3
    True
    """
    x = resampler_input(x, sr_orig, sr_new)
    if sr_orig == sr_new:
        return x.copy()
    ratio = float(sr_new) / sr_orig
    n_out = int(x.shape[0] * float(sr_new) / float(sr_orig))
    if n_out < 1:
        raise ValueError(f"{x.shape[0]} samples are too few to resample {sr_orig} -> {sr_new} Hz")
    poly = _polyphase(int(sr_orig), int(sr_new))
    if poly is None:
        return _resample_taps(x, ratio, n_out)
    period, advance, lead, table = poly
    blocks = -(-n_out // period)
    span = table.shape[1]
    xpad = np.zeros(lead + (blocks - 1) * advance + span)
    xpad[lead : lead + x.shape[0]] = x[: xpad.shape[0] - lead]
    frames = np.lib.stride_tricks.sliding_window_view(xpad, span)[::advance][:blocks]
    y = np.empty(blocks * period)
    rows = max(1, _BLOCK // period)
    for q in range(0, blocks, rows):
        y[q * period : (q + rows) * period] = (frames[q : q + rows] @ table.T).reshape(-1)
    return y[:n_out].astype(np.float32)
