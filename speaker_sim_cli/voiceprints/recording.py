"""Record from the default input device (``--record SECONDS``): sounddevice (the ``server``
extra, PortAudio underneath), imported only when recording; no device is a UsageError."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import UsageError


def record(
    seconds: float, sample_rate: int = 16000, announce: Callable[[str], None] | None = None
) -> np.ndarray:
    """``seconds`` of mono float32 audio at ``sample_rate`` from the default input device;
    ``announce`` is told when recording starts (after the device was found)."""
    if not 0.5 <= seconds <= 60:
        raise UsageError(f"--record {seconds:g}: record 0.5 to 60 seconds")
    try:
        import sounddevice as sd
    except ImportError:
        raise UsageError(
            "cannot record: sounddevice is not installed (pip install 'speaker-sim[server]')"
        ) from None
    except OSError:
        raise UsageError(
            "cannot record: the PortAudio library is not installed (e.g. apt-get install "
            "libportaudio2); pass recordings as files instead"
        ) from None
    try:
        dev = sd.query_devices(kind="input")
        rate = int(dev["default_samplerate"]) or sample_rate
        if announce is not None:
            announce(f"recording {seconds:g} s from {dev['name']}: speak now")
        data = sd.rec(int(seconds * rate), samplerate=rate, channels=1, dtype="float32")
        sd.wait()
    except (sd.PortAudioError, ValueError) as exc:
        raise UsageError(f"cannot record: no usable audio input device ({exc})") from None
    wav = np.ascontiguousarray(np.asarray(data)[:, 0], dtype=np.float32)
    if rate != sample_rate:
        from ..audio.decode import resample

        wav = resample(wav, rate, sample_rate)
    return wav


def record_to_file(
    seconds: float,
    folder: Path,
    sample_rate: int = 16000,
    announce: Callable[[str], None] | None = None,
) -> tuple[Path, float]:
    """Record, write a 16-bit WAV in ``folder``; returns (path, net speech seconds)."""
    import soundfile as sf

    from .service.uploads import speech_seconds

    wav = record(seconds, sample_rate, announce)
    fd, name = tempfile.mkstemp(prefix="recording-", suffix=".wav", dir=folder)
    with open(fd, "wb") as f:
        sf.write(f, wav, sample_rate, subtype="PCM_16", format="WAV")
    return Path(name), speech_seconds(wav, sample_rate)
