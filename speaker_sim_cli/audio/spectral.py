"""mvector's front ends in torch: Kaldi fbank, Spectrogram, MelSpectrogram and MFCC, batched.

mvector (VoiceprintRecognition-Pytorch 1.1) computes its features with
``torchaudio.compliance.kaldi.fbank`` or ``torchaudio.transforms.{Spectrogram, MelSpectrogram,
MFCC}`` on one recording at a time, then subtracts the mean over time. The functions here give
the same numbers bit for bit (checked against ``fixtures/mvector/frontend_*.npz``) on a padded
batch, without importing torchaudio:

* the operations and their float32 precision follow torchaudio's (windows and filter banks
  built in float32, ``|X|`` then ``** power``, a matrix product with the filters);
* every row is padded (``center``'s reflection, ``pad``) from its own samples, so a short row in
  a batch sees exactly what it would see alone;
* the time mean is taken per row over its valid frames, on a tensor with the memory layout
  mvector's own reduction runs on (time-contiguous for fbank, feature-contiguous for the
  torchaudio transforms), so even the float32 summation order matches;
* MFCC's 80 dB floor (``AmplitudeToDB(top_db=80)``) is per recording, as mvector's one-file
  ``predict`` gets it (its ``predict_batch`` takes it over the whole batch).

Every ``*_features`` function takes ``(waves (B, N), lengths (B,) | None, cfg)`` and returns
``(feats (B, T, F), n_frames (B,) int64)`` with padded frames set to 0.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .frontend import (
        MelSpectrogramConfig,
        MFCCConfig,
        MvectorFbankConfig,
        SpectrogramConfig,
    )

__all__ = [
    "create_dct",
    "kaldi_fbank",
    "melscale_fbanks",
    "melspectrogram_features",
    "mfcc_features",
    "mvector_fbank_features",
    "power_spectrogram",
    "spectrogram_features",
    "subtract_time_mean",
]

_F32_EPS = torch.finfo(torch.float32).eps


def _lengths(waves: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    if waves.dim() != 2:
        raise ValueError(f"waves must be (B, N), got shape {tuple(waves.shape)}")
    if lengths is None:
        return torch.full((waves.shape[0],), waves.shape[1], dtype=torch.long)
    return lengths.to(device="cpu", dtype=torch.long)


# -- Kaldi fbank (torchaudio.compliance.kaldi.fbank's arithmetic) -----------------------------
def _kaldi_mel(freq: torch.Tensor) -> torch.Tensor:
    return 1127.0 * (1.0 + freq / 700.0).log()


@lru_cache(maxsize=16)
def _kaldi_banks(
    num_bins: int, n_fft: int, sample_rate: float, low: float, high: float
) -> torch.Tensor:
    """Kaldi's triangular mel filters (num_bins, n_fft // 2 + 1), float32, no Nyquist weight."""
    nyquist = 0.5 * sample_rate
    if high <= 0.0:
        high += nyquist
    if not 0.0 <= low < high <= nyquist:
        raise ValueError(f"bad mel range low={low} high={high} for rate {sample_rate}")
    mel_low = 1127.0 * math.log(1.0 + low / 700.0)
    mel_high = 1127.0 * math.log(1.0 + high / 700.0)
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = torch.arange(num_bins).unsqueeze(1)
    left = mel_low + b * delta
    center = mel_low + (b + 1.0) * delta
    right = mel_low + (b + 2.0) * delta
    mel = _kaldi_mel((sample_rate / n_fft) * torch.arange(n_fft // 2)).unsqueeze(0)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.max(torch.zeros(1), torch.min(up, down))
    return F.pad(banks, (0, 1))


@lru_cache(maxsize=16)
def _kaldi_window(kind: str, size: int) -> torch.Tensor:
    if kind == "povey":
        return torch.hann_window(size, periodic=False).pow(0.85)
    if kind == "hamming":
        return torch.hamming_window(size, periodic=False, alpha=0.54, beta=0.46)
    if kind == "hanning":
        return torch.hann_window(size, periodic=False)
    if kind == "rectangular":
        return torch.ones(size)
    raise ValueError(f"unknown window {kind!r}")


def kaldi_fbank(
    waves: torch.Tensor, lengths: torch.Tensor | None, cfg: MvectorFbankConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log mel filterbank as torchaudio's Kaldi ``fbank`` computes it (snip edges, DC removal,
    pre-emphasis, window, zero-padded power-of-two FFT, ``|X|**2``, log floored at float32
    epsilon; dither 0). (B, N) float waves -> ((B, T, num_mel_bins), (B,) frames)."""
    n = _lengths(waves, lengths)
    frames_per_row = cfg.num_frames(n)
    size, shift, n_fft = cfg.window_size, cfg.window_shift, cfg.n_fft
    batch = waves.shape[0]
    t_max = int(cfg.num_frames(waves.shape[1]))
    if t_max == 0:
        return waves.new_zeros(batch, 0, cfg.num_mel_bins), frames_per_row
    dev, dtype = waves.device, waves.dtype
    frames = waves.unfold(1, size, shift)  # (B, T, W)
    frames = frames - frames.mean(dim=-1, keepdim=True)
    if cfg.preemphasis:
        frames = frames - cfg.preemphasis * torch.cat([frames[..., :1], frames[..., :-1]], -1)
    frames = frames * _kaldi_window(cfg.window, size).to(dev, dtype)
    if n_fft != size:
        frames = F.pad(frames, (0, n_fft - size))
    power = torch.fft.rfft(frames).abs().pow(2.0)
    banks = _kaldi_banks(cfg.num_mel_bins, n_fft, float(cfg.sample_rate), cfg.low_freq,
                         cfg.high_freq).to(dev, dtype)  # fmt: skip
    mel = torch.mm(power.reshape(-1, power.shape[-1]), banks.T).reshape(batch, t_max, -1)
    feats = torch.max(mel, torch.tensor(_F32_EPS, device=dev, dtype=dtype)).log()
    return _zero_tail(feats, frames_per_row), frames_per_row


# -- torchaudio.transforms.Spectrogram / MelSpectrogram / MFCC --------------------------------
@lru_cache(maxsize=16)
def _hann(win_length: int) -> torch.Tensor:
    return torch.hann_window(win_length)


def power_spectrogram(
    waves: torch.Tensor, lengths: torch.Tensor | None, cfg: SpectrogramConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torchaudio.transforms.Spectrogram`` on each row: (B, n_fft // 2 + 1, T) with the
    memory layout torch.stft returns, and valid frames per row (B,)."""
    n = _lengths(waves, lengths)
    frames_per_row = cfg.num_frames(n)
    half = cfg.n_fft // 2
    rows: list[torch.Tensor] = []
    for b, length in enumerate(n.tolist()):
        x = waves[b, :length]
        if cfg.pad:
            x = F.pad(x, (cfg.pad, cfg.pad))
        if cfg.center:
            if cfg.pad_mode in ("reflect", "replicate", "circular") and x.shape[0] <= half:
                raise ValueError(
                    f"a row of {length} samples is too short for n_fft={cfg.n_fft} with "
                    f"{cfg.pad_mode} padding"
                )
            x = F.pad(x[None], (half, half), mode=cfg.pad_mode)[0]
        rows.append(x)
    width = max(int(r.shape[0]) for r in rows)
    if width < cfg.n_fft:
        raise ValueError(f"rows shorter than n_fft={cfg.n_fft}")
    padded = waves.new_zeros(len(rows), width)
    for b, r in enumerate(rows):
        padded[b, : r.shape[0]] = r
    window = _hann(cfg.win).to(waves.device, waves.dtype)
    spec = torch.stft(padded, cfg.n_fft, cfg.hop, cfg.win, window, center=False,
                      normalized=False, onesided=True, return_complex=True)  # fmt: skip
    if cfg.normalized:
        spec = spec / window.pow(2.0).sum().sqrt()
    if cfg.power is None:
        raise ValueError("power=None (a complex spectrogram) is not a feature")
    out = spec.abs() if cfg.power == 1.0 else spec.abs().pow(cfg.power)
    return out, frames_per_row


def _hz_to_mel(freq: float, scale: str) -> float:
    if scale == "htk":
        return 2595.0 * math.log10(1.0 + freq / 700.0)
    f_sp = 200.0 / 3
    if freq >= 1000.0:
        return 1000.0 / f_sp + math.log(freq / 1000.0) / (math.log(6.4) / 27.0)
    return freq / f_sp


def _mel_to_hz(mels: torch.Tensor, scale: str) -> torch.Tensor:
    if scale == "htk":
        return 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    f_sp = 200.0 / 3
    freqs = f_sp * mels
    min_log_mel = 1000.0 / f_sp
    log_t = mels >= min_log_mel
    freqs[log_t] = 1000.0 * torch.exp(math.log(6.4) / 27.0 * (mels[log_t] - min_log_mel))
    return freqs


@lru_cache(maxsize=16)
def melscale_fbanks(
    n_freqs: int, f_min: float, f_max: float, n_mels: int, sample_rate: int, norm: str | None,
    mel_scale: str,
) -> torch.Tensor:  # fmt: skip
    """Triangular mel filters (n_freqs, n_mels) in float32, as torchaudio builds them."""
    all_freqs = torch.linspace(0, sample_rate // 2, n_freqs)
    m_pts = torch.linspace(_hz_to_mel(f_min, mel_scale), _hz_to_mel(f_max, mel_scale), n_mels + 2)
    f_pts = _mel_to_hz(m_pts, mel_scale)
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts.unsqueeze(0) - all_freqs.unsqueeze(1)
    down = (-1.0 * slopes[:, :-2]) / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    fb = torch.max(torch.zeros(1), torch.min(down, up))
    if norm == "slaney":
        fb *= (2.0 / (f_pts[2 : n_mels + 2] - f_pts[:n_mels])).unsqueeze(0)
    elif norm is not None:
        raise ValueError(f"mel norm must be None or 'slaney', got {norm!r}")
    return fb


def _mel_power(
    waves: torch.Tensor, lengths: torch.Tensor | None, cfg: MelSpectrogramConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    spec, n = power_spectrogram(waves, lengths, cfg)
    fb = melscale_fbanks(cfg.n_fft // 2 + 1, float(cfg.f_min), float(cfg.mel_f_max), cfg.n_mels,
                         cfg.sample_rate, cfg.norm, cfg.mel_scale)  # fmt: skip
    mel = torch.matmul(spec.transpose(-1, -2), fb.to(spec.device, spec.dtype)).transpose(-1, -2)
    return mel, n


@lru_cache(maxsize=16)
def create_dct(n_mfcc: int, n_mels: int, norm: str | None) -> torch.Tensor:
    """DCT-II matrix (n_mels, n_mfcc) in float32, as ``torchaudio.functional.create_dct``."""
    n = torch.arange(float(n_mels))
    k = torch.arange(float(n_mfcc)).unsqueeze(1)
    dct = torch.cos(math.pi / float(n_mels) * (n + 0.5) * k)
    if norm is None:
        dct *= 2.0
    elif norm == "ortho":
        dct[0] *= 1.0 / math.sqrt(2.0)
        dct *= math.sqrt(2.0 / float(n_mels))
    else:
        raise ValueError(f"dct norm must be None or 'ortho', got {norm!r}")
    return dct.t()


def _mfcc(
    waves: torch.Tensor, lengths: torch.Tensor | None, cfg: MFCCConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    mel, n = _mel_power(waves, lengths, cfg)  # (B, n_mels, T)
    if cfg.log_mels:
        mel = torch.log(mel + 1e-6)
    else:
        mel = 10.0 * torch.log10(torch.clamp(mel, min=1e-10))
        if cfg.top_db is not None:
            # The floor of one recording (AmplitudeToDB over mvector's one-file batch).
            floor = torch.stack([mel[b, :, : int(t)].amax() for b, t in enumerate(n.tolist())])
            mel = torch.max(mel, (floor - cfg.top_db).view(-1, 1, 1))
    dct = create_dct(cfg.n_mfcc, cfg.n_mels, cfg.dct_norm).to(mel.device, mel.dtype)
    return torch.matmul(mel.transpose(-1, -2), dct).transpose(-1, -2), n


# -- mvector's common step: (B, F, T) -> (B, T, F) minus the mean over time ----------------
def subtract_time_mean(feat_bft: torch.Tensor, n_frames: torch.Tensor) -> torch.Tensor:
    """mvector's ``feat.transpose(2, 1); feat - feat.mean(1, keepdim=True)`` per row, over the
    row's valid frames, on ``feat_bft``'s own memory layout. (B, F, T) -> (B, T, F), padded
    frames 0."""
    feat = feat_bft.transpose(2, 1)
    out = torch.zeros_like(feat)
    for b, t in enumerate(n_frames.tolist()):
        if t > 0:
            row = feat[b : b + 1, :t]
            out[b : b + 1, :t] = row - row.mean(1, keepdim=True)
    return out


def _zero_tail(feats: torch.Tensor, n_frames: torch.Tensor) -> torch.Tensor:
    t_max = feats.shape[1]
    valid = torch.arange(t_max, device=feats.device)[None, :] < n_frames.to(feats.device)[:, None]
    return feats * valid[..., None].to(feats.dtype)


def _finish(feat_bft: torch.Tensor, n: torch.Tensor, mean_norm: bool, device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    if mean_norm:
        feats = subtract_time_mean(feat_bft, n)
    else:
        feats = _zero_tail(feat_bft.transpose(2, 1), n)
    return feats, n.to(device)


def mvector_fbank_features(
    waves: torch.Tensor, lengths: torch.Tensor | None, cfg: MvectorFbankConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """mvector's ``Fbank``: Kaldi fbank per recording, stacked as (B, F, T) time-contiguous
    (``log_fbank.transpose(0, 1)`` then ``torch.stack``), then the time mean subtracted."""
    if cfg.input_scale != 1.0:
        waves = waves * cfg.input_scale
    feats, n = kaldi_fbank(waves, lengths, cfg)
    return _finish(feats.transpose(1, 2).contiguous(), n.cpu(), cfg.mean_norm, waves.device)


def spectrogram_features(
    waves: torch.Tensor, lengths: torch.Tensor | None, cfg: SpectrogramConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """mvector's ``Spectrogram``: linear power (no log), time mean subtracted."""
    spec, n = power_spectrogram(waves, lengths, cfg)
    return _finish(spec, n, cfg.mean_norm, waves.device)


def melspectrogram_features(
    waves: torch.Tensor, lengths: torch.Tensor | None, cfg: MelSpectrogramConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """mvector's ``MelSpectrogram``: linear mel power (no log), time mean subtracted."""
    mel, n = _mel_power(waves, lengths, cfg)
    return _finish(mel, n, cfg.mean_norm, waves.device)


def mfcc_features(
    waves: torch.Tensor, lengths: torch.Tensor | None, cfg: MFCCConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """mvector's ``MFCC``: dB mel power floored 80 dB below the recording's peak, DCT-II,
    time mean subtracted."""
    mfcc, n = _mfcc(waves, lengths, cfg)
    return _finish(mfcc, n, cfg.mean_norm, waves.device)
