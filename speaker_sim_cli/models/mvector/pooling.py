"""mvector's temporal poolings, counting valid frames only.

Every pooling takes ``x`` (B, C, T) and ``lengths`` (B,) valid frames per row (None: all T) and
returns (B, D). Frames past a row's length may hold anything finite; they never reach the
output. mvector calls these without lengths (full-length single utterances), so with
``lengths=None`` each reduces exactly as mvector's does.

* ASP: attentive mean and std (variance clamped at 1e-12), the attention fed with the
  utterance's mean and std (population statistics) when ``global_context``.
* SAP: self-attentive weighted mean, ``Conv1d(C->128) -> tanh -> Conv1d(128->C) -> softmax``.
* TAP: mean.
* TSP: mean and *unbiased variance* (not std).

CAM++'s fixed pooling (mean + unbiased std) and ERes2Net's TSTP (mean + ``sqrt(unbiased var +
1e-8)`` of the 4-D map, flattened channel-major) are the 3D-Speaker classes' own, masked there.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ecapa_blocks import SameConv1d, TDNNBlock
from ..masking import masked_mean, time_mask

__all__ = [
    "POOLING_TYPES",
    "AttentiveStatisticsPooling",
    "SelfAttentivePooling",
    "TemporalAveragePooling",
    "TemporalStatisticsPooling",
    "make_pooling",
    "masked_var",
]

POOLING_TYPES = ("ASP", "SAP", "TAP", "TSP")
_ASP_EPS = 1e-12


def masked_var(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Unbiased variance over the last axis counting valid frames only (as ``torch.var``)."""
    if lengths is None:
        return x.var(dim=-1)
    mean = masked_mean(x, lengths, keepdim=True)
    mask = time_mask(lengths, x.shape[-1]).view([x.shape[0]] + [1] * (x.dim() - 2) + [-1])
    dev = torch.where(mask, x - mean, torch.zeros((), dtype=x.dtype, device=x.device))
    n = lengths.to(x.dtype).view([x.shape[0]] + [1] * (x.dim() - 2))
    return dev.pow(2).sum(dim=-1) / (n - 1)


def _zero_padding(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """``x`` (B, ..., T) with frames past ``lengths`` set to 0 (also clears inf / NaN junk)."""
    if lengths is None:
        return x
    mask = time_mask(lengths, x.shape[-1]).view([x.shape[0]] + [1] * (x.dim() - 2) + [-1])
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _weighted_stats(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std over time of ``x`` (B, C, T) under weights ``w`` (B, 1|C, T) summing to 1."""
    mean = (w * x).sum(dim=2)
    var = (w * (x - mean.unsqueeze(2)).pow(2)).sum(dim=2)
    return mean, var.clamp(min=_ASP_EPS).sqrt()


class AttentiveStatisticsPooling(nn.Module):
    """ASP: (B, C, T) -> (B, 2C) = [attentive mean, attentive std].

    Keys ``tdnn.conv.conv.*``, ``tdnn.norm.norm.*``, ``conv.conv.*`` (mvector's layout).
    """

    def __init__(
        self, channels: int, attention_channels: int = 128, global_context: bool = True
    ) -> None:
        super().__init__()
        self.global_context = global_context
        self.tdnn = TDNNBlock(channels * 3 if global_context else channels, attention_channels, 1)
        self.conv = SameConv1d(attention_channels, channels, 1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        frames = x.shape[-1]
        if lengths is None:
            valid = torch.ones(x.shape[0], 1, frames, dtype=torch.bool, device=x.device)
            n = torch.full((x.shape[0], 1, 1), float(frames), dtype=x.dtype, device=x.device)
        else:
            valid = time_mask(lengths, frames)[:, None, :]
            n = lengths.to(x.dtype)[:, None, None]
        x = torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))
        context = x
        if self.global_context:
            mean, std = _weighted_stats(x, valid.to(x.dtype) / n)
            context = torch.cat(
                (x, mean[..., None].expand(-1, -1, frames), std[..., None].expand(-1, -1, frames)),
                dim=1,
            )
        logits = self.conv(torch.tanh(self.tdnn(context)))  # 1x1 convs: no padding
        logits = logits.masked_fill(~valid, float("-inf"))
        mean, std = _weighted_stats(x, torch.softmax(logits, dim=2))
        return torch.cat((mean, std), dim=1)


class SelfAttentivePooling(nn.Module):
    """SAP: (B, C, T) -> (B, C), attention weights softmaxed over valid frames."""

    def __init__(self, in_dim: int, bottleneck_dim: int = 128) -> None:
        super().__init__()
        self.linear1 = nn.Conv1d(in_dim, bottleneck_dim, kernel_size=1)
        self.linear2 = nn.Conv1d(bottleneck_dim, in_dim, kernel_size=1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        x = _zero_padding(x, lengths)
        logits = self.linear2(torch.tanh(self.linear1(x)))
        if lengths is not None:
            valid = time_mask(lengths, x.shape[-1])[:, None, :]
            logits = logits.masked_fill(~valid, float("-inf"))
        return (torch.softmax(logits, dim=2) * x).sum(dim=2)


class TemporalAveragePooling(nn.Module):
    """TAP: (B, C, T) -> (B, C), the mean over valid frames."""

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return masked_mean(x, lengths).flatten(start_dim=1)


class TemporalStatisticsPooling(nn.Module):
    """TSP: (B, C, T) -> (B, 2C) = [mean, unbiased variance] over valid frames."""

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return torch.cat((masked_mean(x, lengths), masked_var(x, lengths)), dim=1)


def make_pooling(
    pooling_type: str,
    channels: int,
    attention_channels: int = 128,
    global_context: bool = True,
) -> tuple[nn.Module, int]:
    """The pooling mvector builds for ``pooling_type`` over ``channels``, and its output size.

    ``attention_channels`` and ``global_context`` only apply to ASP (SAP's bottleneck is always
    128 in mvector).
    """
    if pooling_type == "ASP":
        return AttentiveStatisticsPooling(
            channels, attention_channels, global_context
        ), 2 * channels
    if pooling_type == "SAP":
        return SelfAttentivePooling(channels, 128), channels
    if pooling_type == "TAP":
        return TemporalAveragePooling(), channels
    if pooling_type == "TSP":
        return TemporalStatisticsPooling(), 2 * channels
    raise ValueError(f"pooling_type must be one of {', '.join(POOLING_TYPES)}: {pooling_type!r}")
