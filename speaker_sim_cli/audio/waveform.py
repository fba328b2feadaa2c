"""Raw-waveform front end for self-supervised models (WavLM), and torchaudio's resampler.

:func:`waveform_features` is :class:`~speaker_sim_cli.audio.frontend.WaveformConfig`'s compute:
each row is normalised as s3prl does it before WavLM (``F.layer_norm(wav, wav.shape)``: zero
mean, unit biased variance, eps 1e-5, no affine), over the row's own valid samples only, so a
padded row gets exactly what it would get alone. Padded samples stay 0.

:func:`sinc_resample` reproduces ``torchaudio.transforms.Resample(orig, new)`` with its defaults
(``sinc_interp_hann``, ``lowpass_filter_width=6``, ``rolloff=0.99``), the resampler seed-tts-eval
runs before the SIM model. It is written from the published algorithm (a windowed-sinc
polyphase filter bank on the gcd-reduced rates), not copied, and it is tested against the
reference's output pairs in ``fixtures/wavlm_sim``.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .frontend import WaveformConfig

__all__ = ["normalize_waveform", "sinc_resample", "waveform_features"]


def normalize_waveform(
    waves: torch.Tensor, lengths: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """Per-row layer norm over the valid samples: (B, N) -> (B, N), padded samples 0.

    Equals ``F.layer_norm(w[:n], (n,), eps=eps)`` on each row alone (biased variance).
    """
    if waves.dim() != 2:
        raise ValueError(f"waves must be (B, N), got shape {tuple(waves.shape)}")
    n = waves.shape[1]
    if lengths is None:
        return F.layer_norm(waves, (n,), eps=eps)
    lengths = lengths.to(device=waves.device, dtype=torch.long)
    valid = (torch.arange(n, device=waves.device)[None, :] < lengths[:, None]).to(waves.dtype)
    count = lengths.clamp_min(1).to(waves.dtype)[:, None]
    mean = (waves * valid).sum(dim=1, keepdim=True) / count
    centred = (waves - mean) * valid
    var = centred.square().sum(dim=1, keepdim=True) / count
    return centred * torch.rsqrt(var + eps)


def waveform_features(
    waves: torch.Tensor, lengths: torch.Tensor | None, cfg: WaveformConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The front end's compute: (B, N) waves -> ((B, N) normalised waves, (B,) int64 samples)."""
    if lengths is None:
        lengths = torch.full((waves.shape[0],), waves.shape[1], dtype=torch.long)
    lengths = lengths.to(device=waves.device, dtype=torch.long)
    out = normalize_waveform(waves, lengths, cfg.eps) if cfg.normalize else waves
    return out, lengths


@lru_cache(maxsize=16)
def _sinc_kernel(orig: int, new: int, width: int, rolloff: float) -> tuple[torch.Tensor, int]:
    """(new, 1, K) float64 Hann-windowed sinc filters, one per output phase; and the pad."""
    base = min(orig, new) * rolloff
    half = math.ceil(width * orig / base)
    idx = torch.arange(-half, half + orig, dtype=torch.float64)[None, :] / orig
    # torchaudio divides the phase offsets in float32 (default dtype) before adding idx.
    t = (torch.arange(0, -new, -1) / new).to(torch.float64)[:, None] + idx
    t = (t * base).clamp(-width, width)
    window = torch.cos(t * math.pi / width / 2) ** 2
    t = t * math.pi
    scale = base / orig
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / torch.where(t == 0, 1.0, t))
    return (sinc * window * scale)[:, None, :], half


def sinc_resample(
    wave: torch.Tensor, orig: int, new: int, width: int = 6, rolloff: float = 0.99
) -> torch.Tensor:
    """Resample (..., N) from ``orig`` Hz to ``new`` Hz as torchaudio's ``Resample`` does.

    Output length ``ceil(new * N / orig)``; computed in the input's dtype (float32 as
    torchaudio's module defaults to).
    """
    if orig == new:
        return wave
    g = math.gcd(orig, new)
    o, n = orig // g, new // g
    kernel, half = _sinc_kernel(o, n, width, rolloff)
    shape = wave.shape
    x = wave.reshape(-1, shape[-1])
    length = x.shape[-1]
    x = F.pad(x[:, None, :], (half, half + o))
    y = F.conv1d(x, kernel.to(dtype=wave.dtype, device=wave.device), stride=o)
    y = y.transpose(1, 2).reshape(x.shape[0], -1)
    target = math.ceil(n * length / o)
    return y[:, :target].reshape(*shape[:-1], target)
