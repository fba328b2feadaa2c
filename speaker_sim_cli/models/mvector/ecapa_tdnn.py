"""mvector's ``EcapaTdnn`` (the 1.1 SpeechBrain-style rewrite), padding-aware.

A TDNN stem, SE-Res2Net blocks, multi-layer feature aggregation over blocks 1..3, a pooling, a
batch norm and a 1x1 output conv (the embedding; no batch norm after it). Every conv uses
"same" *reflect* padding, done at each row's own last valid frame
(:class:`~speaker_sim_cli.models.mvector.layers.SameConv1d`), and the squeeze-excitation means
and the pooling count valid frames only, so a zero-padded row gets its single-utterance
embedding. Stride is 1 throughout: lengths never change. With ASP the batch norm is the wrapped
``asp_bn.norm``; with SAP / TAP / TSP it is a plain ``asp_bn`` ``BatchNorm1d`` (mvector's keys).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..masking import masked_mean
from .common import check_inputs
from .layers import SameConv1d, TDNNBlock, WrappedBatchNorm1d
from .pooling import make_pooling

__all__ = ["EcapaTdnn"]


class _Res2NetBlock(nn.Module):
    """``scale`` channel groups: group 0 passes, group i is ``tdnn(x_i + y_{i-1})`` (i > 1)."""

    def __init__(self, channels: int, scale: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        if channels % scale:
            raise ValueError(f"channels ({channels}) must be divisible by res2net_scale ({scale})")
        width = channels // scale
        self.scale = scale
        self.blocks = nn.ModuleList(
            TDNNBlock(width, width, kernel_size, dilation) for _ in range(scale - 1)
        )

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        groups = torch.chunk(x, self.scale, dim=1)
        out = [groups[0]]
        for i, block in enumerate(self.blocks, start=1):
            out.append(block(groups[i] if i == 1 else groups[i] + out[-1], lengths))
        return torch.cat(out, dim=1)


class _SEBlock(nn.Module):
    """Gates from the mean over valid frames: conv -> ReLU -> conv -> sigmoid."""

    def __init__(self, channels: int, se_channels: int) -> None:
        super().__init__()
        self.conv1 = SameConv1d(channels, se_channels, 1)
        self.conv2 = SameConv1d(se_channels, channels, 1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        s = masked_mean(x, lengths, keepdim=True)
        return x * torch.sigmoid(self.conv2(F.relu(self.conv1(s))))


class _SERes2NetBlock(nn.Module):
    """TDNN(1x1) -> Res2Net -> TDNN(1x1) -> SE, plus the (1x1-projected) input."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        res2net_scale: int,
        se_channels: int,
        kernel_size: int,
        dilation: int,
        groups: int,
    ) -> None:
        super().__init__()
        self.tdnn1 = TDNNBlock(in_channels, out_channels, 1, 1, groups)
        self.res2net_block = _Res2NetBlock(out_channels, res2net_scale, kernel_size, dilation)
        self.tdnn2 = TDNNBlock(out_channels, out_channels, 1, 1, groups)
        self.se_block = _SEBlock(out_channels, se_channels)
        self.shortcut: SameConv1d | None = None
        if in_channels != out_channels:
            self.shortcut = SameConv1d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        residual = x if self.shortcut is None else self.shortcut(x)
        y = self.tdnn2(self.res2net_block(self.tdnn1(x), lengths))
        return self.se_block(y, lengths) + residual


class EcapaTdnn(nn.Module):
    """(B, T, input_size) -> (B, embd_dim); constructor arguments and defaults as mvector's.

    >>> m = EcapaTdnn(40, embd_dim=16, channels=[32, 32, 32, 32, 96], se_channels=8).eval()
    >>> m(torch.randn(2, 60, 40), torch.tensor([60, 41])).shape
    torch.Size([2, 16])
    """

    def __init__(
        self,
        input_size: int,
        embd_dim: int = 192,
        pooling_type: str = "ASP",
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
        channels, kernel_sizes, dilations = list(channels), list(kernel_sizes), list(dilations)
        groups = list(groups)
        if not len(channels) == len(kernel_sizes) == len(dilations):
            raise ValueError("channels, kernel_sizes and dilations must have the same length")
        if len(groups) < len(channels):
            raise ValueError("groups needs one entry per layer of channels")
        reach = [d * (k - 1) for k, d in zip(kernel_sizes, dilations)]
        if any(r % 2 for r in reach):
            raise ValueError(
                "every dilation * (kernel_size - 1) must be even (mvector's 'same' padding "
                f"shortens the sequence otherwise): kernel_sizes {kernel_sizes}, "
                f"dilations {dilations}"
            )
        self.input_size = input_size
        self.embd_dim = embd_dim
        self.pooling_type = pooling_type
        self.max_pad = max(r // 2 for r in reach)
        self.min_frames = max(self.max_pad + 1, 2 if pooling_type == "TSP" else 1)

        self.blocks = nn.ModuleList(
            [TDNNBlock(input_size, channels[0], kernel_sizes[0], dilations[0], groups[0])]
        )
        for i in range(1, len(channels) - 1):
            self.blocks.append(
                _SERes2NetBlock(
                    channels[i - 1],
                    channels[i],
                    res2net_scale=res2net_scale,
                    se_channels=se_channels,
                    kernel_size=kernel_sizes[i],
                    dilation=dilations[i],
                    groups=groups[i],
                )
            )
        last = channels[-1]
        self.mfa = TDNNBlock(last, last, kernel_sizes[-1], dilations[-1], groups[-1])
        self.asp, pooled = make_pooling(pooling_type, last, attention_channels, global_context)
        self.asp_bn: nn.Module = (
            WrappedBatchNorm1d(pooled) if pooling_type == "ASP" else nn.BatchNorm1d(pooled)
        )
        self.fc = SameConv1d(pooled, embd_dim, 1)

    def forward(self, feats: torch.Tensor, n_frames: torch.Tensor | None = None) -> torch.Tensor:
        """feats (B, T, input_size) zero-padded, n_frames (B,) int64 or None -> (B, embd_dim)."""
        feats, lengths = check_inputs(feats, n_frames, self.input_size, self.min_frames)
        x = feats.transpose(1, 2)  # (B, F, T)
        outs = []
        for block in self.blocks:
            x = block(x, lengths)
            outs.append(x)
        x = self.mfa(torch.cat(outs[1:], dim=1), lengths)
        x = self.asp_bn(self.asp(x, lengths))
        return self.fc(x.unsqueeze(-1)).squeeze(-1)
