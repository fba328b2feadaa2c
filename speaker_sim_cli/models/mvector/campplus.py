"""mvector's ``CAMPPlus``, padding-aware.

mvector's CAM++ is 3D-Speaker's network under the same class and attribute names (keys match
after the ``0.`` prefix is stripped), so this is :class:`speaker_sim_cli.models.campplus.CAMPPlus`
(masked per row: stride-2 TDNN lengths, segment means over 100 frames with a partial last
segment, mean + unbiased std over valid frames) with mvector's constructor. The one difference
is the width after the 2-D front end: mvector sizes it ``32 * ceil(input_size / 8)`` (what the
three stride-2 frequency convs really give), so any ``input_size`` runs, where 3D-Speaker's
class wants a multiple of 8: the network is built for the next multiple of 8 (the front end's
weights do not depend on the number of bins) and then told its real input size.
"""

from __future__ import annotations

import math

import torch

from ..campplus import CAMPPlus as _CAMPPlus
from .common import check_inputs

__all__ = ["CAMPPlus"]


class CAMPPlus(_CAMPPlus):
    """(B, T, input_size) -> (B, embd_dim); arguments and defaults as mvector's ``CAMPPlus``.

    ``memory_efficient`` only matters for training (activation checkpointing).

    >>> m = CAMPPlus(41, embd_dim=16, growth_rate=8, bn_size=2, init_channels=16).eval()
    >>> m(torch.randn(2, 50, 41), torch.tensor([50, 23])).shape
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
        super().__init__(
            feat_dim=8 * math.ceil(input_size / 8),
            embedding_size=embd_dim,
            growth_rate=growth_rate,
            bn_size=bn_size,
            init_channels=init_channels,
            config_str=config_str,
            memory_efficient=memory_efficient,
        )
        self.feat_dim = input_size  # the input check of the parent reads it
        self.input_size = input_size
        self.embd_dim = embd_dim
        self.min_frames = 3  # the stride-2 TDNN leaves 2 frames: the unbiased std needs two

    def forward(self, feats: torch.Tensor, n_frames: torch.Tensor | None = None) -> torch.Tensor:
        """feats (B, T, input_size) zero-padded, n_frames (B,) int64 or None -> (B, embd_dim)."""
        feats, lengths = check_inputs(feats, n_frames, self.input_size, self.min_frames)
        return super().forward(feats, lengths)
