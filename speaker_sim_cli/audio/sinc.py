"""torchaudio's default resampler (Hann-windowed sinc) in numpy, as seed-tts-eval runs it.

seed-tts-eval's speaker-similarity script resamples every non-16 kHz clip with
``torchaudio.transforms.Resample(sr, 16000)`` at its defaults: ``sinc_interp_hann``,
``lowpass_filter_width=6``, ``rolloff=0.99``. The WavLM + ECAPA family reads audio through
this module (front-end ``resampler="sinc_hann"``), as the mvector family reads it through
resampy's ``kaiser_best`` (audio/kaiser.py).

The filter, written from its published definition: with the rates reduced by their gcd to
``o -> n`` and the cutoff ``base = min(o, n) * rolloff``, the output sample ``m`` is
``sum_i x[i] * h(base * (i / o - m / n))`` where ``h(t) = (base / o) * sinc(t) * cos(pi t / 2W)**2``
for ``|t| <= W`` (``W = lowpass_filter_width``) and 0 beyond; the input is taken as zero
outside ``[0, N)`` and ``ceil(N * n / o)`` samples come out. The ``n`` phases' taps are
tabulated once (rounded to float32 as torchaudio's module keeps them; its phase offsets are
divided in float32 too) and the output is a float64 matrix product over blocks of input
frames, so the result does not depend on the CPU's float32 summation order. Measured against
torchaudio 2.9.1 on ``dev_hard`` (docs/portability.md): within 2 float32 ulp.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from .kaiser import resampler_input

__all__ = ["sinc_hann_kernel", "sinc_hann_resample"]

WIDTH = 6
ROLLOFF = 0.99
# Input frames per block of the matrix product: bounds memory whatever the length.
_BLOCK_FRAMES = 1 << 12


@lru_cache(maxsize=16)
def sinc_hann_kernel(
    orig: int, new: int, width: int = WIDTH, rolloff: float = ROLLOFF
) -> tuple[np.ndarray, int]:
    """``(taps, pad)`` for gcd-reduced rates ``orig -> new``: ``taps`` (new, 2*pad + orig),
    float32 values (stored float64), row ``p`` the weights of output phase ``p`` on inputs
    ``k*orig - pad .. k*orig + pad + orig - 1``; ``pad = ceil(width * orig / base)``."""
    base = min(orig, new) * rolloff
    pad = math.ceil(width * orig / base)
    idx = np.arange(-pad, pad + orig, dtype=np.float64)[None, :] / orig
    # torchaudio computes the phase offsets -p/new in float32 (its default dtype).
    phase = (np.arange(0, -new, -1, dtype=np.float32) / np.float32(new)).astype(np.float64)
    t = np.clip((phase[:, None] + idx) * base, -width, width)
    window = np.cos(t * math.pi / width / 2) ** 2
    taps = np.sinc(t) * window * (base / orig)
    taps = taps.astype(np.float32).astype(np.float64)
    taps.setflags(write=False)
    return taps, pad


def sinc_hann_resample(
    x: np.ndarray, sr_orig: int, sr_new: int, width: int = WIDTH, rolloff: float = ROLLOFF
) -> np.ndarray:
    """Resample a 1-D float32 signal from ``sr_orig`` to ``sr_new`` Hz as
    ``torchaudio.transforms.Resample(sr_orig, sr_new)`` does (``ceil(N * sr_new / sr_orig)``
    samples out; the input itself, copied, at equal rates).

    >>> t = np.arange(24000) / 24000
    >>> y = sinc_hann_resample(np.sin(2 * np.pi * 440 * t).astype(np.float32), 24000, 16000)
    >>> y.shape, y.dtype
    ((16000,), dtype('float32'))
    >>> ref = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    >>> float(np.abs(y[100:-100] - ref[100:-100]).max()) < 1e-3
    True
    """
    x = resampler_input(x, sr_orig, sr_new)
    if sr_orig == sr_new:
        return x.copy()
    g = math.gcd(int(sr_orig), int(sr_new))
    o, n = int(sr_orig) // g, int(sr_new) // g
    taps, pad = sinc_hann_kernel(o, n, width, rolloff)
    length = x.shape[0]
    target = -(-n * length // o)
    if target < 1:
        raise ValueError(f"{length} samples are too few to resample {sr_orig} -> {sr_new} Hz")
    span = taps.shape[1]
    frames_needed = -(-target // n)  # input frames (stride o) that make the kept outputs
    xpad = np.zeros((frames_needed - 1) * o + span)
    keep = min(length, xpad.shape[0] - pad)
    xpad[pad : pad + keep] = x[:keep]
    frames = np.lib.stride_tricks.sliding_window_view(xpad, span)[::o][:frames_needed]
    y = np.empty(frames_needed * n)
    for k in range(0, frames_needed, _BLOCK_FRAMES):
        y[k * n : (k + _BLOCK_FRAMES) * n] = (frames[k : k + _BLOCK_FRAMES] @ taps.T).reshape(-1)
    return y[:target].astype(np.float32)
