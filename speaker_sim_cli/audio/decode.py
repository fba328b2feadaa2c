"""Decode, pick a channel, resample: the same audio 3D-Speaker's infer_sv.py feeds its model.

soundfile decodes (wav, flac, ogg, mp3; any PCM or float subtype) to float32, channel 0 is kept,
and soxr resamples at its default (HQ) quality, which reproduces sox's ``rate`` to cosine 1.00000.
A recording may be a URL (``s3://``, ``gs://``, ``http(s)://``: :mod:`..io.storage`): its bytes
are fetched (retried on transient errors) and decoded from memory.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AudioError
from ..io import storage


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


def is_command(path: str | Path) -> bool:
    """A Kaldi wav.scp entry that is a shell command writing audio to stdout (``... |``)."""
    return str(path).rstrip().endswith("|")


def probe(path: str | Path) -> AudioInfo:
    """Read only the header. Raises AudioError naming the file when it cannot be read."""
    import soundfile as sf

    if is_command(path):
        return AudioInfo(0, 0, 1, "pipe", "")
    if storage.is_url(path):
        url = storage.as_url(path)
        try:
            info = sf.info(io.BytesIO(_fetch(url, keep=True)))
        except AudioError:
            raise
        except Exception as exc:
            raise AudioError(url, f"cannot decode audio ({_sf_reason(exc)})") from None
        if info.frames == 0:
            raise AudioError(url, "no samples (the header says 0 frames)")
        return AudioInfo(info.samplerate, info.frames, info.channels, info.format, info.subtype)
    p = Path(path)
    _check_file(p)
    try:
        info = sf.info(str(p))
    except Exception as exc:  # soundfile raises several types for unreadable files
        raise AudioError(str(p), _decode_reason(p, exc)) from None
    if info.frames == 0:
        raise AudioError(str(p), "no samples (the header says 0 frames)")
    return AudioInfo(info.samplerate, info.frames, info.channels, info.format, info.subtype)


# Multichannel files above this many samples are read in blocks, keeping only one channel.
_BLOCK_READ_SAMPLES = 50_000_000
_BLOCK = 1 << 20


def load(
    path: str | Path,
    sample_rate: int,
    channel: int | str = 0,
    command_timeout: float = 600,
    resampler: str = "soxr",
    data: bytes | OSError | None = None,
) -> np.ndarray:
    """Decode ``path`` to a float32 mono waveform at ``sample_rate``.

    ``channel``: an index, ``"first"`` (0) or ``"mean"`` (the average of all channels, as
    mvector reads audio).

    ``resampler``: ``"soxr"`` (HQ), ``"kaiser_best"`` (resampy's filter, as mvector) or
    ``"sinc_hann"`` (torchaudio's default, as seed-tts-eval before the SIM model).

    ``data``: for a URL, its bytes (or the error fetching them) when they were fetched already
    (:func:`..io.storage.read_many`), so the object is not asked for again.

    ``path`` may be a wav.scp command (``sox a.sph -t wav - |``), run through the shell. Returns a
    1-D float32 array (samples,). Raises AudioError for a missing, empty, undecodable,
    empty-of-samples or non-finite recording, naming the file and the problem.
    """
    import soundfile as sf

    if is_command(path):
        return _load_command(str(path), sample_rate, channel, command_timeout, resampler)
    url = storage.as_url(path) if storage.is_url(path) else None
    p = Path(path)
    if url is None:
        _check_file(p)
    try:
        with sf.SoundFile(io.BytesIO(_fetch(url, data=data)) if url else str(p)) as f:
            rate, channels, frames = f.samplerate, f.channels, f.frames
            pick = _channel_picker(str(p), channel, channels)
            if channels > 1 and frames * channels > _BLOCK_READ_SAMPLES:
                parts = [
                    pick(b) for b in f.blocks(blocksize=_BLOCK, dtype="float32", always_2d=True)
                ]
                wav = np.concatenate(parts) if parts else np.zeros(0, np.float32)
            else:
                wav = pick(f.read(dtype="float32", always_2d=True))
    except AudioError:
        raise
    except MemoryError:
        raise AudioError(url or str(p), "too long to decode in memory") from None
    except Exception as exc:
        if url:
            raise AudioError(url, f"cannot decode audio ({_sf_reason(exc)})") from None
        raise AudioError(str(p), _decode_reason(p, exc)) from None
    return _finish(url or str(p), wav, rate, sample_rate, resampler)


def _fetch(url: str, keep: bool = False, data: bytes | OSError | None = None) -> bytes:
    """The object's bytes (AudioError naming the URL when it cannot be had). ``keep``: leave
    them for the next read (the decode after a probe); ``data``: what a batch fetch got."""
    try:
        if isinstance(data, OSError):
            raise data
        if data is None:
            data = storage.read_bytes(url, keep=keep)
    except FileNotFoundError:
        raise AudioError(url, "object not found") from None
    except IsADirectoryError:
        raise AudioError(url, "is a folder, not an audio object") from None
    except OSError as exc:
        raise AudioError(url, f"cannot read ({exc.strerror or exc})") from None
    if not data:
        raise AudioError(url, "empty object (0 bytes)")
    return data


def _finish(
    name: str, wav: np.ndarray, rate: int, sample_rate: int, resampler: str = "soxr"
) -> np.ndarray:
    if wav.shape[0] == 0:
        raise AudioError(name, "no samples")
    if not np.isfinite(wav).all():
        raise AudioError(name, "contains NaN or Inf samples")
    try:
        return resample(wav, rate, sample_rate, resampler)
    except ValueError as exc:  # e.g. too few samples to resample
        raise AudioError(name, str(exc)) from None


def _load_command(
    cmd: str, sample_rate: int, channel: int | str, timeout: float, resampler: str = "soxr"
) -> np.ndarray:
    import subprocess

    import soundfile as sf

    shell = cmd.rstrip()[:-1].strip()
    try:
        proc = subprocess.run(shell, shell=True, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise AudioError(cmd, f"command timed out after {timeout:g} s") from None
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        raise AudioError(cmd, f"command failed with exit code {proc.returncode}: {tail[0][:200]}")
    if not proc.stdout:
        raise AudioError(cmd, "command wrote no audio")
    try:
        data, rate = sf.read(io.BytesIO(proc.stdout), dtype="float32", always_2d=True)
    except Exception as exc:
        raise AudioError(cmd, f"cannot decode the command's output ({_sf_reason(exc)})") from None
    wav = _channel_picker(cmd, channel, data.shape[1])(data)
    return _finish(cmd, wav, rate, sample_rate, resampler)


def _channel_picker(name: str, channel: int | str, channels: int) -> Any:
    """A function (frames, channels) -> (frames,) float32 contiguous for ``channel``."""
    if channel == "mean":
        if channels == 1:
            return lambda d: np.ascontiguousarray(d[:, 0], dtype=np.float32)
        return lambda d: np.ascontiguousarray(d.mean(axis=1, dtype=np.float32))
    idx = 0 if channel == "first" else channel
    if not isinstance(idx, int) or idx < 0:
        raise ValueError(f"channel must be an index, 'first' or 'mean', got {channel!r}")
    if idx >= channels:
        raise AudioError(name, f"has {channels} channel(s), channel {idx} requested")
    return lambda d: np.ascontiguousarray(d[:, idx], dtype=np.float32)


def _decode_reason(p: Path, exc: Exception) -> str:
    reason = _sf_reason(exc)
    head = b""
    try:
        with open(p, "rb") as f:
            head = f.read(512)
    except OSError:
        pass
    if head and _looks_like_text(head):
        return f"not audio: a text file ({reason})"
    if head[4:8] == b"ftyp" or p.suffix.lower() in {".m4a", ".mp4", ".aac", ".wma", ".amr"}:
        return f"unsupported container {p.suffix or '?'} (convert to wav/flac/ogg/mp3; {reason})"
    return f"cannot decode audio ({reason})"


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\r\n\t" for c in text)


def resample(wav: np.ndarray, rate: int, target: int, method: str = "soxr") -> np.ndarray:
    """Resample a 1-D float32 waveform with soxr (HQ), resampy's ``kaiser_best`` or
    torchaudio's default ``sinc_hann`` (``method``); a no-op at the same rate."""
    if rate == target:
        return wav.astype(np.float32, copy=False)
    if method == "kaiser_best":
        from .kaiser import kaiser_best_resample

        return kaiser_best_resample(wav, rate, target)
    if method == "sinc_hann":
        from .sinc import sinc_hann_resample

        return sinc_hann_resample(wav, rate, target)
    if method != "soxr":
        raise ValueError(f"unknown resampler {method!r} (soxr, kaiser_best or sinc_hann)")
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
