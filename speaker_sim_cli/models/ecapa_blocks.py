"""SpeechBrain-layout ECAPA layers, padding-aware, shared by the two ECAPA-TDNNs we serve.

3D-Speaker's ``ECAPA_TDNN`` (:mod:`.ecapa`) and mvector's ``EcapaTdnn``
(:mod:`.mvector.ecapa_tdnn`) both descend from SpeechBrain's ECAPA and keep its module layout,
so their checkpoints share these blocks' state-dict keys:

* :class:`SameConv1d`: ``Conv1d`` with "same" *reflect* padding, ``d*(k-1)//2`` frames each
  side, stride 1 (keys ``conv.weight``, ``conv.bias``). With row lengths the reflection happens
  at each row's own last valid frame, as ``F.pad(mode="reflect")`` does on the row alone, so a
  valid output frame reads valid input frames only.
* :class:`WrappedBatchNorm1d`: ``BatchNorm1d`` under ``.norm``.
* :class:`TDNNBlock`: conv -> ReLU -> batch norm (keys ``conv.conv.*``, ``norm.norm.*``).
* :class:`SERes2NetBlock`: TDNN(1x1) -> Res2Net (dilated sub-band TDNNs) -> TDNN(1x1) ->
  squeeze-excitation, plus the (1x1-projected) input; the excitation's mean counts valid
  frames only.

Every ``forward`` takes ``x`` (B, C, T) and ``lengths`` (B,) valid frames (None: all T); stride
is 1 throughout, so lengths never change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .masking import masked_mean

__all__ = [
    "Res2NetBlock",
    "SEBlock",
    "SERes2NetBlock",
    "SameConv1d",
    "TDNNBlock",
    "WrappedBatchNorm1d",
    "reflect_gather",
    "reflect_index",
]


def reflect_index(lengths: torch.Tensor, size: int, pad: int) -> torch.Tensor:
    """(B, size + 2*pad) source frames of a reflect pad done at each row's own end.

    Output position j stands for time t = j - pad; it reads t for 0 <= t < n, -t left of 0 and
    2(n-1) - t right of n-1 (as ``F.pad(mode="reflect")`` does on the row alone). Positions past
    n + pad only feed outputs on padded frames; they are clamped into range.
    """
    t = torch.arange(-pad, size + pad, device=lengths.device)[None, :]
    last = (lengths - 1)[:, None]
    idx = last - (last - t.abs()).abs()
    return idx.clamp(0, size - 1)


def reflect_gather(x: torch.Tensor, lengths: torch.Tensor, pad: int) -> torch.Tensor:
    """``x`` (B, C, T) reflect-padded by ``pad`` frames at both ends of each row's valid part:
    (B, C, T + 2*pad)."""
    idx = reflect_index(lengths, x.shape[-1], pad)
    return x.gather(-1, idx[:, None, :].expand(x.shape[0], x.shape[1], -1))


class SameConv1d(nn.Module):
    """1-D conv, stride 1, with "same" reflect padding done per row."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.pad = dilation * (kernel_size - 1) // 2
        self.conv = nn.Conv1d(
            in_channels, out_channels, kernel_size, dilation=dilation, groups=groups, bias=bias
        )

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if self.pad:
            if lengths is None:
                x = F.pad(x, (self.pad, self.pad), mode="reflect")
            else:
                x = reflect_gather(x, lengths, self.pad)
        return self.conv(x)


class WrappedBatchNorm1d(nn.Module):
    """``BatchNorm1d`` under the attribute ``norm`` (SpeechBrain's wrapper layout)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class TDNNBlock(nn.Module):
    """conv ("same" reflect) -> ReLU -> batch norm."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        dilation: int = 1,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.conv = SameConv1d(in_channels, out_channels, kernel_size, dilation, groups)
        self.norm = WrappedBatchNorm1d(out_channels)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return self.norm(F.relu(self.conv(x, lengths)))


class Res2NetBlock(nn.Module):
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

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        groups = torch.chunk(x, self.scale, dim=1)
        out = [groups[0]]
        for i, block in enumerate(self.blocks, start=1):
            out.append(block(groups[i] if i == 1 else groups[i] + out[-1], lengths))
        return torch.cat(out, dim=1)


class SEBlock(nn.Module):
    """Channel gates from the mean over valid frames: conv -> ReLU -> conv -> sigmoid."""

    def __init__(self, channels: int, se_channels: int) -> None:
        super().__init__()
        self.conv1 = SameConv1d(channels, se_channels, 1)
        self.conv2 = SameConv1d(se_channels, channels, 1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        s = masked_mean(x, lengths, keepdim=True)
        return x * torch.sigmoid(self.conv2(F.relu(self.conv1(s))))


class SERes2NetBlock(nn.Module):
    """TDNN(1x1) -> Res2Net -> TDNN(1x1) -> SE, plus the (1x1-projected) input."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        res2net_scale: int,
        se_channels: int,
        kernel_size: int,
        dilation: int,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.tdnn1 = TDNNBlock(in_channels, out_channels, 1, 1, groups)
        self.res2net_block = Res2NetBlock(out_channels, res2net_scale, kernel_size, dilation)
        self.tdnn2 = TDNNBlock(out_channels, out_channels, 1, 1, groups)
        self.se_block = SEBlock(out_channels, se_channels)
        self.shortcut: SameConv1d | None = None
        if in_channels != out_channels:
            self.shortcut = SameConv1d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        residual = x if self.shortcut is None else self.shortcut(x)
        y = self.tdnn2(self.res2net_block(self.tdnn1(x), lengths))
        return self.se_block(y, lengths) + residual
