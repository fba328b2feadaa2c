"""ECAPA-TDNN (3D-Speaker's SpeechBrain-derived variant) with padding-aware batched inference.

A 1-D TDNN stem, SE-Res2Net blocks with dilated sub-band convolutions, multi-layer feature
aggregation (MFA), attentive statistics pooling with global context, and a 1x1 output layer.
Every TDNN is conv -> ReLU -> BatchNorm. State-dict keys follow 3D-Speaker's ``ECAPA_TDNN``
(``blocks.*``, ``mfa``, ``asp``, ``asp_bn``, ``fc``) so its checkpoints load with ``strict=True``;
the blocks are SpeechBrain's layout, shared with mvector's EcapaTdnn (:mod:`.ecapa_blocks`).

Padding: the convolutions use "same" *reflect* padding. For a zero-padded row the reflection
must happen at the row's own last valid frame, so wide convolutions gather their input through
per-row reflected indices; a valid output then reads valid frames only, and what lands on
padded frames is never read again except by the poolings, which count valid frames only (the
squeeze-excitation means, the global mean/std of the attention context, and the attention
softmax, which gives padded frames zero weight). Stride is 1 everywhere, so lengths do not
change through the network.

Example::

    >>> import torch
    >>> model = ECAPATDNN(channels=[32, 32, 32, 32, 96], lin_neurons=16).eval()
    >>> model(torch.randn(2, 50, 80), torch.tensor([50, 31])).shape
    torch.Size([2, 16])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .ecapa_blocks import SameConv1d, SERes2NetBlock, TDNNBlock, WrappedBatchNorm1d
from .masking import time_mask

__all__ = ["ECAPATDNN"]

_ASP_EPS = 1e-12  # 3D-Speaker clamps the attentive variance at 1e-12 before the sqrt


def _weighted_stats(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std over time of x (B, C, T) under weights w (B, 1|C, T) that sum to 1."""
    mean = (w * x).sum(dim=-1)
    var = (w * (x - mean.unsqueeze(-1)).pow(2)).sum(dim=-1)
    return mean, var.clamp(min=_ASP_EPS).sqrt()


class _AttentiveStatsPool(nn.Module):
    """Attentive statistics pooling with global context; returns (B, 2C, 1) = [mean; std]."""

    def __init__(self, channels: int, attention_channels: int = 128, global_context: bool = True):
        super().__init__()
        self.global_context = global_context
        in_att = channels * 3 if global_context else channels
        self.tdnn = TDNNBlock(in_att, attention_channels, 1, 1)
        self.conv = SameConv1d(attention_channels, channels, 1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        b, _, t = x.shape
        if lengths is None:
            valid = torch.ones(b, 1, t, dtype=torch.bool, device=x.device)
            n = torch.full((b, 1, 1), float(t), dtype=x.dtype, device=x.device)
        else:
            valid = time_mask(lengths, t)[:, None, :]
            n = lengths.to(x.dtype)[:, None, None]
        x = torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))
        if self.global_context:
            mean, std = _weighted_stats(x, valid.to(x.dtype) / n)
            context = torch.cat(
                [x, mean.unsqueeze(-1).expand(-1, -1, t), std.unsqueeze(-1).expand(-1, -1, t)],
                dim=1,
            )
        else:
            context = x
        logits = self.conv(torch.tanh(self.tdnn(context)))
        logits = logits.masked_fill(~valid, float("-inf"))
        mean, std = _weighted_stats(x, torch.softmax(logits, dim=-1))
        return torch.cat((mean, std), dim=1).unsqueeze(-1)


class ECAPATDNN(nn.Module):
    """ECAPA-TDNN speaker embedder (3D-Speaker layout and defaults).

    ``forward(feats, lengths)``: feats (B, T, input_size) mean-normalised fbank, zero-padded;
    lengths (B,) int64 valid frames per row (None: all T; each must exceed the widest reflect
    pad, 4 frames by default: :attr:`min_frames`, which the engine checks on the host before a
    batch, so the network itself never reads a value back). Returns (B, lin_neurons). Fixture
    arch ``ecapa1024`` is ``channels=[1024, 1024, 1024, 1024, 3072]``.
    """

    def __init__(
        self,
        input_size: int = 80,
        lin_neurons: int = 192,
        channels: Sequence[int] = (512, 512, 512, 512, 1536),
        kernel_sizes: Sequence[int] = (5, 3, 3, 3, 1),
        dilations: Sequence[int] = (1, 2, 3, 4, 1),
        attention_channels: int = 128,
        res2net_scale: int = 8,
        se_channels: int = 128,
        global_context: bool = True,
        groups: Sequence[int] = (1, 1, 1, 1, 1),
    ) -> None:
        super().__init__()
        if not len(channels) == len(kernel_sizes) == len(dilations) == len(groups):
            raise ValueError("channels, kernel_sizes, dilations and groups must have equal length")
        self.input_size = input_size
        self.embedding_size = lin_neurons
        self.max_pad = max(d * (k - 1) // 2 for k, d in zip(kernel_sizes, dilations, strict=True))
        #: Shortest row the reflect pads allow; the engine fails shorter rows one by one.
        self.min_frames = self.max_pad + 1
        self.blocks = nn.ModuleList(
            [TDNNBlock(input_size, channels[0], kernel_sizes[0], dilations[0], groups[0])]
        )
        for i in range(1, len(channels) - 1):
            self.blocks.append(
                SERes2NetBlock(
                    channels[i - 1],
                    channels[i],
                    res2net_scale=res2net_scale,
                    se_channels=se_channels,
                    kernel_size=kernel_sizes[i],
                    dilation=dilations[i],
                    groups=groups[i],
                )
            )
        self.mfa = TDNNBlock(
            channels[-1], channels[-1], kernel_sizes[-1], dilations[-1], groups[-1]
        )
        self.asp = _AttentiveStatsPool(channels[-1], attention_channels, global_context)
        self.asp_bn = WrappedBatchNorm1d(channels[-1] * 2)
        self.fc = SameConv1d(channels[-1] * 2, lin_neurons, 1)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if lengths is not None:
            lengths = lengths.to(device=feats.device, dtype=torch.long)
        x = feats.transpose(1, 2)  # (B, C, T)
        outs = []
        for block in self.blocks:
            x = block(x, lengths)
            outs.append(x)
        x = self.mfa(torch.cat(outs[1:], dim=1), lengths)
        x = self.asp_bn(self.asp(x, lengths))
        return self.fc(x).squeeze(-1)
