"""Raw-waveform front end for self-supervised models (WavLM).

:func:`waveform_features` is :class:`~speaker_sim_cli.audio.frontend.WaveformConfig`'s compute:
each row is normalised as s3prl does it before WavLM (``F.layer_norm(wav, wav.shape)``: zero
mean, unit biased variance, eps 1e-5, no affine), over the row's own valid samples only, so a
padded row gets exactly what it would get alone. Padded samples stay 0.
Non-16 kHz input is resampled at decode, as seed-tts-eval does (audio/sinc.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .frontend import WaveformConfig

__all__ = ["normalize_waveform", "waveform_features"]


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
