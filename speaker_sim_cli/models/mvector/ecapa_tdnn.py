"""mvector's ``EcapaTdnn`` (the 1.1 SpeechBrain-style rewrite), padding-aware.

A TDNN stem, SE-Res2Net blocks, multi-layer feature aggregation over blocks 1..3, a pooling, a
batch norm and a 1x1 output conv (the embedding; no batch norm after it). Every conv uses
"same" *reflect* padding, done at each row's own last valid frame
(:class:`~speaker_sim_cli.models.ecapa_blocks.SameConv1d`, the SpeechBrain layers it shares
with 3D-Speaker's ECAPA), and the squeeze-excitation means
and the pooling count valid frames only, so a zero-padded row gets its single-utterance
embedding. Stride is 1 throughout: lengths never change. With ASP the batch norm is the wrapped
``asp_bn.norm``; with SAP / TAP / TSP it is a plain ``asp_bn`` ``BatchNorm1d`` (mvector's keys).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..ecapa_blocks import SameConv1d, SERes2NetBlock, TDNNBlock, WrappedBatchNorm1d
from .common import check_inputs
from .pooling import make_pooling

__all__ = ["EcapaTdnn"]


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
