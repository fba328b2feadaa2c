"""An uploaded recording -> the model's waveform, or a ServiceError saying why not.

The header is parsed first: a recording over ``max_seconds`` is refused before its samples are
decoded. Decoding is soundfile's (every format the CLI reads), channel 0, resampled with soxr to
the model's rate, as the CLI does. Net speech is measured by an energy detector: 25 ms frames
(10 ms hop) count as speech when their level is 12 dB over the recording's quiet floor (its
10th percentile), within 40 dB of its loudest frame and above -55 dBFS. It tells a recording of
silence, hum or steady noise from one with a voice in it; it does not tell a voice from music.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np

from .errors import ServiceError


@dataclass
class Clip:
    """A decoded upload at the model's rate."""

    wave: np.ndarray  # float32 (N,)
    sample_rate: int
    seconds: float  # duration
    speech_seconds: float  # net speech (the energy detector)
    sha256: str  # of the uploaded bytes


def speech_seconds(wave: np.ndarray, rate: int) -> float:
    """Net speech in ``wave`` (float mono at ``rate``): 10 ms per frame the detector keeps.

    >>> t = np.arange(16000 * 3) / 16000
    >>> voice = (np.sin(2 * np.pi * 200 * t) * (t % 1 < 0.5)).astype(np.float32)
    >>> round(speech_seconds(voice, 16000), 1)   # half of each second sounds
    1.5
    >>> speech_seconds(np.zeros(16000, np.float32), 16000)
    0.0
    """
    win, hop = int(0.025 * rate), int(0.010 * rate)
    if len(wave) < win:
        return 0.0
    n = 1 + (len(wave) - win) // hop
    # Frame energies from a running sum of squares: no (frames, win) copy (~10x faster).
    power = np.concatenate([[0.0], np.cumsum(np.square(wave, dtype=np.float64))])
    starts = hop * np.arange(n)
    energy = np.maximum(power[starts + win] - power[starts], 0.0) / win
    db = 10 * np.log10(energy + 1e-12)
    floor, peak = np.percentile(db, 10), db.max()
    thr = max(floor + 12.0, peak - 40.0, -55.0)
    return float(np.count_nonzero(db > thr)) * hop / rate


def _wav_truncated(data: bytes) -> bool:
    """A RIFF/WAVE file whose data chunk declares more bytes than follow (a cut-off upload;
    libsndfile would read the part that is there). Streaming sizes (0, 0xFFFFFFFF) pass."""
    import struct

    at = 12
    while at + 8 <= len(data):
        cid, size = data[at : at + 4], struct.unpack("<I", data[at + 4 : at + 8])[0]
        if cid == b"data":
            return size not in (0, 0xFFFFFFFF) and at + 8 + size > len(data)
        at += 8 + size + (size & 1)
    return False


def decode_upload(
    data: bytes,
    sample_rate: int,
    *,
    min_seconds: float,
    max_seconds: float,
    resampler: str = "soxr",
    loudness_db: float | None = None,
) -> Clip:
    """Decode and check one upload (see the module docstring); raises ServiceError with code
    ``unreadable``, ``too_long``, ``too_short`` or ``no_voice``."""
    import soundfile as sf

    from ...audio.decode import resample
    from ...errors import AudioError

    if not data:
        raise ServiceError("unreadable", "the upload is empty (0 bytes)")
    try:
        info = sf.info(io.BytesIO(data))
    except Exception:
        raise ServiceError(
            "unreadable", "not a recording soundfile can read (wav, flac, ogg, mp3)"
        ) from None
    if info.format == "WAV" and _wav_truncated(data):
        raise ServiceError("unreadable", "truncated: the WAV header promises more data than sent")
    if info.frames <= 0 or info.samplerate <= 0:
        raise ServiceError("too_short", "the recording has no samples")
    duration = info.frames / info.samplerate
    if duration > max_seconds:
        raise ServiceError(
            "too_long", f"{duration:.1f} s of audio; at most {max_seconds:g} s per request"
        )
    if duration < min_seconds:
        raise ServiceError(
            "too_short", f"{duration:.2f} s of audio; at least {min_seconds:g} s of speech needed"
        )
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            raw = f.read(dtype="float32", always_2d=True)
    except Exception:
        raise ServiceError("unreadable", "the recording is damaged (decoding failed)") from None
    wav = np.ascontiguousarray(raw[:, 0]) if raw.size else np.zeros(0, np.float32)
    if len(wav) < 0.9 * info.frames:
        raise ServiceError(
            "unreadable",
            f"truncated: the header promises {info.frames} samples, {len(wav)} are there",
        )
    if not np.isfinite(wav).all():
        raise ServiceError("unreadable", "the recording contains NaN or Inf samples")
    try:
        wav = resample(wav, info.samplerate, sample_rate, resampler)
    except ValueError as exc:
        raise ServiceError("unreadable", f"cannot resample: {exc}") from None
    speech = speech_seconds(wav, sample_rate)
    if speech == 0.0:
        raise ServiceError("no_voice", "no voice found (silence or steady noise)")
    if speech < min_seconds:
        raise ServiceError(
            "too_short", f"{speech:.2f} s of speech found; at least {min_seconds:g} s needed"
        )
    if loudness_db is not None:
        from ...audio.loudness import normalize_recording

        try:
            wav = normalize_recording(wav, loudness_db)
        except AudioError as exc:
            raise ServiceError("no_voice", exc.reason) from None
    return Clip(wav, sample_rate, len(wav) / sample_rate, speech, hashlib.sha256(data).hexdigest())
