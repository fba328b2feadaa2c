"""Decoding every container and subtype, channel 0, resampling with soxr."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from speaker_sim_cli.audio.decode import load, probe
from speaker_sim_cli.errors import AudioError


def tone(sr: int, seconds: float = 1.0, f: float = 220.0) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (0.3 * np.sin(2 * np.pi * f * t)).astype(np.float32)


@pytest.mark.parametrize(
    ("ext", "fmt", "subtype"),
    [
        ("wav", "WAV", "PCM_16"),
        ("wav", "WAV", "PCM_24"),
        ("wav", "WAV", "PCM_32"),
        ("wav", "WAV", "FLOAT"),
        ("wav", "WAV", "DOUBLE"),
        ("flac", "FLAC", "PCM_16"),
        ("ogg", "OGG", "VORBIS"),
        ("mp3", "MP3", "MPEG_LAYER_III"),
    ],
)
def test_decodes_formats(tmp_path, ext, fmt, subtype):
    x = tone(16000)
    p = tmp_path / f"a.{ext}"
    sf.write(p, x, 16000, format=fmt, subtype=subtype)
    y = load(p, 16000)
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(len(y) - len(x)) <= 2000  # mp3 / vorbis add encoder delay
    assert probe(p).sample_rate == 16000


def test_takes_channel_zero(tmp_path):
    x = tone(16000)
    stereo = np.stack([x, np.zeros_like(x)], axis=1)
    p = tmp_path / "stereo.wav"
    sf.write(p, stereo, 16000, subtype="FLOAT")
    np.testing.assert_array_equal(load(p, 16000), x)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resamples_to_model_rate(tmp_path, rate):
    p = tmp_path / f"r{rate}.wav"
    sf.write(p, tone(rate, 2.0), rate, subtype="FLOAT")
    y = load(p, 16000)
    assert abs(len(y) - 32000) <= 1
    # The tone survives resampling: its spectrum peaks at 220 Hz.
    spec = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spec) * 16000 / len(y) - 220) < 2


def test_unreadable_files_name_the_problem(tmp_path):
    with pytest.raises(AudioError, match="file not found"):
        load(tmp_path / "nope.wav", 16000)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioError, match="empty file"):
        load(empty, 16000)
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n" * 20)
    with pytest.raises(AudioError, match="not audio: a text file"):
        load(text, 16000)


def test_non_finite_samples_are_refused(tmp_path):
    x = tone(16000)
    x[100] = np.nan
    p = tmp_path / "nan.wav"
    sf.write(p, x, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN or Inf"):
        load(p, 16000)
