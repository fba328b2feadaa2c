"""Decode, pick a channel, resample: the same audio 3D-Speaker's infer_sv.py feeds its model.

soundfile decodes (wav, flac, ogg, mp3; any PCM or float subtype) to float32, channel 0 is kept,
and soxr resamples at its default (HQ) quality, which reproduces sox's ``rate`` to cosine 1.00000.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import AudioError


@dataclass(frozen=True)
class AudioInfo:
    """What the header says: native rate, frames, channels, container format and subtype."""

    sample_rate: int
    frames: int
    channels: int
    format: str
    subtype: str

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def probe(path: str | Path) -> AudioInfo:
    """Read only the header. Raises AudioError naming the file when it cannot be read."""
    import soundfile as sf

    p = Path(path)
    _check_file(p)
    try:
        info = sf.info(str(p))
    except Exception as exc:  # soundfile raises several types for unreadable files
        raise AudioError(str(p), f"cannot decode audio ({_sf_reason(exc)})") from None
    return AudioInfo(info.samplerate, info.frames, info.channels, info.format, info.subtype)


def load(path: str | Path, sample_rate: int, channel: int = 0) -> np.ndarray:
    """Decode ``path`` to a float32 mono waveform at ``sample_rate``.

    Returns a 1-D float32 array (samples,). Raises AudioError for a missing, empty, undecodable,
    empty-of-samples or non-finite recording, naming the file and the problem.
    """
    import soundfile as sf

    p = Path(path)
    _check_file(p)
    try:
        data, rate = sf.read(str(p), dtype="float32", always_2d=True)
    except Exception as exc:
        raise AudioError(str(p), f"cannot decode audio ({_sf_reason(exc)})") from None
    if data.shape[0] == 0:
        raise AudioError(str(p), "no samples")
    if channel >= data.shape[1]:
        raise AudioError(str(p), f"has {data.shape[1]} channel(s), channel {channel} requested")
    wav = np.ascontiguousarray(data[:, channel])
    if not np.isfinite(wav).all():
        raise AudioError(str(p), "contains NaN or Inf samples")
    return resample(wav, rate, sample_rate)


def resample(wav: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Resample a 1-D float32 waveform with soxr (HQ); a no-op at the same rate."""
    if rate == target:
        return wav.astype(np.float32, copy=False)
    import soxr

    out = soxr.resample(wav, rate, target)
    return np.asarray(out, dtype=np.float32)


def _check_file(p: Path) -> None:
    if not p.exists():
        raise AudioError(str(p), "file not found")
    if p.is_dir():
        raise AudioError(str(p), "is a directory, not an audio file")
    if p.stat().st_size == 0:
        raise AudioError(str(p), "empty file (0 bytes)")


def _sf_reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    # soundfile prefixes messages with the path; keep only the library's reason.
    if ": " in text and "Error opening" in text:
        text = text.split(": ", 1)[-1]
    return text
