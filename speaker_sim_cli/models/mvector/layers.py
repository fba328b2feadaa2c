"""1-D layers of mvector's SpeechBrain-style networks (``mvector/models/utils.py`` layout).

* :class:`SameConv1d`: ``Conv1d`` with "same" *reflect* padding, ``d*(k-1)//2`` frames on each
  side (keys ``conv.weight``, ``conv.bias``). With row lengths, the reflection happens at each
  row's own last valid frame, as ``F.pad(mode="reflect")`` does on the row alone, so a valid
  output frame reads valid input frames only.
* :class:`WrappedBatchNorm1d`: ``BatchNorm1d`` under ``.norm``.
* :class:`TDNNBlock`: conv -> ReLU -> batch norm (keys ``conv.conv.*``, ``norm.norm.*``).

Every ``forward`` takes ``x`` (B, C, T) and ``lengths`` (B,) valid frames (None: all T).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SameConv1d", "TDNNBlock", "WrappedBatchNorm1d", "reflect_gather"]


def reflect_gather(x: torch.Tensor, lengths: torch.Tensor, pad: int) -> torch.Tensor:
    """``x`` (B, C, T) reflect-padded by ``pad`` frames at both ends of each row's valid part.

    Returns (B, C, T + 2*pad): position ``j`` holds frame ``r(j - pad)`` of its row, where
    ``r(t) = |t|`` left of the row and ``2(n-1) - t`` right of its last valid frame ``n-1``.
    Positions that only feed outputs on padded frames are clamped into range.
    """
    n = lengths[:, None]
    t = torch.arange(-pad, x.shape[-1] + pad, device=x.device)[None, :]
    src = torch.where(t < 0, -t, t)
    src = torch.where(src > n - 1, 2 * (n - 1) - src, src)
    src = src.clamp(0, x.shape[-1] - 1)
    return torch.gather(x, 2, src[:, None, :].expand(-1, x.shape[1], -1))


class SameConv1d(nn.Module):
    """1-D conv, stride 1, with mvector's "same" reflect padding done per row."""

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
    """``BatchNorm1d`` under the attribute ``norm`` (mvector's ``BatchNorm1d`` wrapper)."""

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
