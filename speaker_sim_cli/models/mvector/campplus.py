"""mvector's ``CAMPPlus``, padding-aware.

mvector's CAM++ is 3D-Speaker's network under the same class and attribute names (keys match
after the ``0.`` prefix is stripped), so the blocks come from
:mod:`speaker_sim_cli.models.campplus`: a 2-D front end (frequency stride 8), a stride-2 TDNN,
three dense blocks of context-aware-masking layers (segment means over 100 frames with a
partial last segment, valid frames only), mean + unbiased std pooling, a dense layer with a
non-affine batch norm. The one difference is the width after the front end: mvector uses
``32 * ceil(input_size / 8)``, so any ``input_size`` runs (3D-Speaker's class wants a multiple
of 8).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..campplus import _FrontEnd2d, _XVector
from ..masking import apply_mask
from .common import check_inputs

__all__ = ["CAMPPlus"]

_HEAD_CHANNELS = 32  # mvector's FCM is always built with m_channels 32


class CAMPPlus(nn.Module):
    """(B, T, input_size) -> (B, embd_dim); arguments and defaults as mvector's ``CAMPPlus``.

    ``memory_efficient`` only matters for training (activation checkpointing).

    >>> m = CAMPPlus(40, embd_dim=16, growth_rate=8, bn_size=2, init_channels=16).eval()
    >>> m(torch.randn(2, 50, 40), torch.tensor([50, 23])).shape
    torch.Size([2, 16])
    """

    def __init__(
        self,
        input_size: int,
        embd_dim: int = 512,
        growth_rate: int = 32,
        bn_size: int = 4,
        init_channels: int = 128,
        config_str: str = "batchnorm-relu",
        memory_efficient: bool = True,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.embd_dim = embd_dim
        self.min_frames = 3  # the stride-2 TDNN leaves 2 frames: the unbiased std needs two
        self.head = _FrontEnd2d(feat_dim=input_size, m_channels=_HEAD_CHANNELS)
        self.head.out_channels = _HEAD_CHANNELS * math.ceil(input_size / 8)
        self.xvector = _XVector(
            self.head.out_channels,
            embd_dim,
            growth_rate,
            bn_size,
            init_channels,
            config_str,
            memory_efficient,
        )

    def forward(self, feats: torch.Tensor, n_frames: torch.Tensor | None = None) -> torch.Tensor:
        """feats (B, T, input_size) zero-padded, n_frames (B,) int64 or None -> (B, embd_dim)."""
        lengths = check_inputs(feats, n_frames, self.input_size, self.min_frames)
        x = apply_mask(feats.transpose(1, 2), lengths)  # (B, F, T)
        return self.xvector(self.head(x, lengths), lengths)
