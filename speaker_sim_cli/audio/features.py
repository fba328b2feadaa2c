"""Kaldi-compatible log mel filterbank in torch: batched, on any device.

The computation follows Kaldi's ``compute-fbank-feats`` (and so
``torchaudio.compliance.kaldi.fbank``) for the settings the 3D-Speaker models use: frames of
25 ms every 10 ms with snip edges, DC removal, pre-emphasis 0.97, a povey window, a 512-point
power spectrum, triangular mel filters between 20 Hz and Nyquist, natural log floored at float32
epsilon, no dither. Per-utterance mean subtraction is a separate step (:func:`mean_normalize`).
"""

from __future__ import annotations

import importlib
import math
from functools import lru_cache
from typing import Any

import torch

from .frontend import FbankConfig, Frontend

__all__ = [
    "FbankConfig",
    "Frontend",
    "compute_features",
    "fbank",
    "fbank_features",
    "mean_normalize",
    "num_frames",
    "prepare_waves",
]


def num_frames(num_samples: int | torch.Tensor, cfg: Frontend) -> torch.Tensor | int:
    """Frames the front end produces from ``num_samples`` (Kaldi fbank: snip edges, 0 if short)."""
    if not isinstance(num_samples, torch.Tensor):
        num_samples = int(num_samples)
    return cfg.num_frames(num_samples)


def _mel(freq: torch.Tensor | float) -> torch.Tensor:
    return 1127.0 * torch.log1p(torch.as_tensor(freq, dtype=torch.float64) / 700.0)


@lru_cache(maxsize=16)
def _mel_banks(cfg: FbankConfig) -> torch.Tensor:
    """Triangular filters (num_mel_bins, n_fft // 2 + 1) in float64, Kaldi's layout."""
    nyquist = 0.5 * cfg.sample_rate
    high = cfg.high_freq if cfg.high_freq > 0 else nyquist + cfg.high_freq
    if not 0 <= cfg.low_freq < high <= nyquist:
        raise ValueError(f"bad mel range low={cfg.low_freq} high={high} for rate {cfg.sample_rate}")
    n_bins = cfg.n_fft // 2
    mel_low, mel_high = _mel(cfg.low_freq), _mel(high)
    delta = (mel_high - mel_low) / (cfg.num_mel_bins + 1)
    idx = torch.arange(cfg.num_mel_bins, dtype=torch.float64)[:, None]
    left = mel_low + idx * delta
    center = left + delta
    right = center + delta
    mel = _mel(torch.arange(n_bins, dtype=torch.float64) * (cfg.sample_rate / cfg.n_fft))[None, :]
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)
    # Kaldi has no filter weight on the Nyquist bin.
    return torch.nn.functional.pad(banks, (0, 1))


@lru_cache(maxsize=16)
def _window(cfg: FbankConfig) -> torch.Tensor:
    n = cfg.window_size
    if cfg.window == "povey":
        return torch.hann_window(n, periodic=False, dtype=torch.float64).pow(0.85)
    if cfg.window == "hamming":
        return torch.hamming_window(n, periodic=False, alpha=0.54, beta=0.46, dtype=torch.float64)
    if cfg.window == "hanning":
        return torch.hann_window(n, periodic=False, dtype=torch.float64)
    raise ValueError(f"unknown window {cfg.window!r}")


def _constant(make: Any, cfg: FbankConfig, device: torch.device, dtype: torch.dtype) -> Any:
    """``make(cfg)`` (window, filterbank) on ``device`` in ``dtype``, uploaded once per device and
    dtype instead of every batch (each upload from pageable memory is a host/device sync). Under
    a dispatch mode (fake tensors, tracing) nothing is cached: its tensors are not real ones."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    if _get_current_dispatch_mode() is not None:
        return make(cfg).to(device=device, dtype=dtype)
    return _placed(make, cfg, device, dtype)


@lru_cache(maxsize=64)
def _placed(make: Any, cfg: FbankConfig, device: torch.device, dtype: torch.dtype) -> Any:
    return make(cfg).to(device=device, dtype=dtype)


def fbank(
    waves: torch.Tensor,
    lengths: torch.Tensor | None = None,
    cfg: FbankConfig = FbankConfig(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log mel filterbank of a batch of waveforms.

    Args:
        waves: (B, N) or (N,) float waveform at ``cfg.sample_rate``, amplitude as decoded
            (floats in [-1, 1]); rows zero-padded to N.
        lengths: (B,) valid samples per row; None means every row is N samples long.

    Returns:
        feats (B, T, num_mel_bins) in the input's dtype and on its device, frames past a row's
        valid count set to 0; and frame counts (B,) int64.

    >>> feats, n = fbank(torch.zeros(2, 16000).uniform_(-0.1, 0.1))
    >>> tuple(feats.shape), n.tolist()
    ((2, 98, 80), [98, 98])
    """
    if waves.dim() == 1:
        waves = waves[None]
    if waves.dim() != 2:
        raise ValueError(f"waves must be (B, N), got shape {tuple(waves.shape)}")
    batch, n_samples = waves.shape
    device, dtype = waves.device, waves.dtype
    if lengths is None:
        lengths = torch.full((batch,), n_samples, dtype=torch.long, device=device)
    if lengths.device != device or lengths.dtype != torch.long:
        lengths = lengths.to(device=device, dtype=torch.long)
    frames_per_row = num_frames(lengths, cfg)
    assert isinstance(frames_per_row, torch.Tensor)
    t_max = int(num_frames(n_samples, cfg))
    n_mel = cfg.num_mel_bins
    if t_max == 0:
        return waves.new_zeros(batch, 0, n_mel), frames_per_row

    frames = waves.unfold(1, cfg.window_size, cfg.window_shift)  # (B, T, W)
    frames = frames - frames.mean(dim=-1, keepdim=True)
    if cfg.preemphasis:
        prev = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
        frames = frames - cfg.preemphasis * prev
    frames = frames * _constant(_window, cfg, device, dtype)
    spec = torch.fft.rfft(frames, n=cfg.n_fft, dim=-1)
    power = spec.real.square() + spec.imag.square()
    mel = torch.matmul(power, _constant(_mel_banks, cfg, device, dtype).T)
    eps = torch.finfo(torch.float32).eps
    feats = torch.log(torch.clamp(mel, min=eps))
    valid = torch.arange(t_max, device=device)[None, :] < frames_per_row[:, None]
    feats = feats * valid[..., None].to(dtype)
    return feats, frames_per_row


def mean_normalize(feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Subtract each row's mean over its valid frames; padded frames stay 0. feats: (B, T, F)."""
    t_max = feats.shape[1]
    valid = (torch.arange(t_max, device=feats.device)[None, :] < lengths[:, None]).to(feats.dtype)
    denom = lengths.clamp_min(1).to(feats.dtype)[:, None]
    mean = (feats * valid[..., None]).sum(dim=1) / denom
    return (feats - mean[:, None, :]) * valid[..., None]


def fbank_features(
    waves: torch.Tensor, lengths: torch.Tensor | None, cfg: FbankConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kaldi fbank at ``cfg.input_scale``, then mean normalisation when the config asks for it."""
    if cfg.input_scale != 1.0:
        waves = waves * cfg.input_scale
    feats, n = fbank(waves, lengths, cfg)
    if cfg.mean_norm:
        feats = mean_normalize(feats, n)
    return feats, n


def prepare_waves(waves: torch.Tensor, lengths: torch.Tensor | None, cfg: Frontend) -> torch.Tensor:
    """Batch-level waveform steps before features: none. The per-recording steps (channel,
    resampling, ``cfg.loudness_db``) happen at decode (engine/data.py, api.py): a recording
    gets one loudness gain over all its samples, as mvector computes it, before it is cut into
    windows, and one that cannot be normalised fails alone (see audio/loudness.py)."""
    return waves


@lru_cache(maxsize=32)
def _compute_fn(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def compute_features(
    waves: torch.Tensor, lengths: torch.Tensor | None, cfg: Frontend
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's front end on a padded batch: (B, N) waves, (B,) lengths -> features
    (B, T, ...) with padded frames zeroed, and valid frame counts (B,) int64."""
    waves = prepare_waves(waves, lengths, cfg)
    fn = _compute_fn(type(cfg).compute)
    return fn(waves, lengths, cfg)


def seconds_to_frames(seconds: float, cfg: FbankConfig) -> int:
    return max(0, math.floor((seconds * 1000.0 - cfg.frame_length_ms) / cfg.frame_shift_ms) + 1)
