"""mvector's ``TDNN`` (x-vector style), padding-aware.

Five *valid* (unpadded) 1-D convolutions: kernel 5 dilation 1, kernel 3 dilation 2, kernel 3
dilation 3, then two 1x1, so T frames become T - 14. Layers 1-4 are ``relu(conv)`` then batch
norm; layer 5 is ``relu(conv)`` only. Then a pooling, ``bn5``, ``linear`` and ``bn6``.

Padding: an output frame of a valid convolution reads its own frame and the next ``reach``
frames, so a row's first ``n - 14`` outputs read only its valid input frames; nothing needs
zeroing, the row's length just shrinks by 14 and the pooling counts the shrunk length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import check_inputs
from .pooling import make_pooling

__all__ = ["TDNN"]

_SHRINK = 4 + 4 + 6  # (k-1)*d of the three wide layers


class TDNN(nn.Module):
    """(B, T, input_size) -> (B, embd_dim); arguments and defaults as mvector's ``TDNN``.

    >>> m = TDNN(40, channels=32, embd_dim=16).eval()
    >>> m(torch.randn(2, 50, 40), torch.tensor([50, 20])).shape
    torch.Size([2, 16])
    """

    def __init__(
        self,
        input_size: int,
        channels: int = 512,
        embd_dim: int = 192,
        pooling_type: str = "ASP",
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.embd_dim = embd_dim
        self.pooling_type = pooling_type
        self.min_frames = _SHRINK + (2 if pooling_type == "TSP" else 1)
        self.td_layer1 = nn.Conv1d(input_size, channels, kernel_size=5, dilation=1)
        self.bn1 = nn.BatchNorm1d(channels)
        self.td_layer2 = nn.Conv1d(channels, channels, kernel_size=3, dilation=2)
        self.bn2 = nn.BatchNorm1d(channels)
        self.td_layer3 = nn.Conv1d(channels, channels, kernel_size=3, dilation=3)
        self.bn3 = nn.BatchNorm1d(channels)
        self.td_layer4 = nn.Conv1d(channels, channels, kernel_size=1)
        self.bn4 = nn.BatchNorm1d(channels)
        self.td_layer5 = nn.Conv1d(channels, channels, kernel_size=1)
        self.pooling, pooled = make_pooling(pooling_type, channels, attention_channels=128)
        self.bn5 = nn.BatchNorm1d(pooled)
        self.linear = nn.Linear(pooled, embd_dim)
        self.bn6 = nn.BatchNorm1d(embd_dim)

    def forward(self, feats: torch.Tensor, n_frames: torch.Tensor | None = None) -> torch.Tensor:
        """feats (B, T, input_size) zero-padded, n_frames (B,) int64 or None -> (B, embd_dim)."""
        feats, lengths = check_inputs(feats, n_frames, self.input_size, self.min_frames)
        x = feats.transpose(1, 2)
        x = self.bn1(F.relu(self.td_layer1(x)))
        x = self.bn2(F.relu(self.td_layer2(x)))
        x = self.bn3(F.relu(self.td_layer3(x)))
        x = self.bn4(F.relu(self.td_layer4(x)))
        x = F.relu(self.td_layer5(x))
        if lengths is not None:
            lengths = lengths - _SHRINK
        return self.bn6(self.linear(self.bn5(self.pooling(x, lengths))))
