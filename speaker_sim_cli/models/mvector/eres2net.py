"""mvector's ``ERes2Net`` and ``ERes2NetV2``, padding-aware.

Both are 3D-Speaker's networks with mvector's constructor arguments; the maths and the
state-dict keys are the same, so these subclass :class:`speaker_sim_cli.models.eres2net.ERes2Net`
and :class:`speaker_sim_cli.models.eres2netv2.ERes2NetV2` (their public constructor and
``forward(feats, lengths)``), which re-zero every 3x3 convolution's input past the row's
length and pool valid frames only.

* ERes2Net: stem conv -> BN -> ReLU, four stages (``Hardtanh(0, 20)`` blocks, AFF-fused splits
  in stages 3-4), bottom-up fusion ``fuse_mode12 -> fuse_mode123 -> fuse_mode1234`` through
  3x3 stride-2 ``layer{1,2,3}_downsample`` convs, TSTP, ``seg_1`` (and with ``two_emb_layer``
  ReLU -> ``seg_bn_1`` -> ``seg_2``). It runs in mvector only when ``expansion == 2 *
  mul_channel`` and ``input_size % 8 == 0``.
* ERes2NetV2: one fusion, ``fuse34(out4, layer3_ds(out3))``; base width 26; mvector's
  ``layer3_ds`` is sized for ``expansion == 2``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..eres2net import ERes2Net as _ERes2Net
from ..eres2netv2 import ERes2NetV2 as _ERes2NetV2
from .common import check_inputs

__all__ = ["ERes2Net", "ERes2NetV2"]

_MIN_FRAMES = 9  # three halvings (ceil) leave 2 frames: the unbiased variance needs two


def _check_bands(name: str, input_size: int) -> None:
    if input_size % 8:
        raise ValueError(
            f"{name} needs input_size divisible by 8, got {input_size} (mvector sizes seg_1 "
            f"for {input_size // 8} bands where the network gives {-(-input_size // 8)})"
        )


class ERes2Net(_ERes2Net):
    """(B, T, input_size) -> (B, embd_dim); arguments and defaults as mvector's ``ERes2Net``.

    3D-Speaker's ERes2Net with mvector's block shape (``expansion``, ``base_width``, ``scale``);
    with ``expansion == 2 * mul_channel`` mvector's fusion convs have exactly its sizes.
    ``two_emb_layer`` adds ReLU -> ``seg_bn_1`` (non-affine) -> ``seg_2`` after ``seg_1``.

    >>> m = ERes2Net(40, m_channels=4, num_blocks=[1, 1, 1, 1], embd_dim=16).eval()
    >>> m(torch.randn(2, 50, 40), torch.tensor([50, 23])).shape
    torch.Size([2, 16])
    """

    def __init__(
        self,
        input_size: int,
        num_blocks: Sequence[int] = (3, 4, 6, 3),
        m_channels: int = 32,
        mul_channel: int = 1,
        expansion: int = 2,
        base_width: int = 32,
        scale: int = 2,
        embd_dim: int = 192,
        two_emb_layer: bool = False,
    ) -> None:
        _check_bands("ERes2Net", input_size)
        if expansion != 2 * mul_channel:
            raise ValueError(
                f"ERes2Net needs expansion == 2 * mul_channel (got {expansion} and "
                f"{mul_channel}): mvector's fusion convs do not fit the stages otherwise"
            )
        # The parent reads the block shape from these attributes while it builds the stages
        # (plain ints: nn.Module accepts them before its own __init__).
        self.expansion, self.base_width, self.scale = expansion, base_width, scale
        nums = (num_blocks[0], num_blocks[1], num_blocks[2], num_blocks[3])
        super().__init__(input_size, embd_dim, m_channels, nums)
        self.input_size = input_size
        self.embd_dim = embd_dim
        self.two_emb_layer = two_emb_layer
        self.min_frames = _MIN_FRAMES
        self.seg_bn_1: nn.Module = nn.Identity()
        self.seg_2: nn.Module = nn.Identity()
        if two_emb_layer:
            self.seg_bn_1 = nn.BatchNorm1d(embd_dim, affine=False)
            self.seg_2 = nn.Linear(embd_dim, embd_dim)

    def forward(self, feats: torch.Tensor, n_frames: torch.Tensor | None = None) -> torch.Tensor:
        """feats (B, T, input_size) zero-padded, n_frames (B,) int64 or None -> (B, embd_dim)."""
        feats, lengths = check_inputs(feats, n_frames, self.input_size, self.min_frames)
        emb = super().forward(feats, lengths)
        if self.two_emb_layer:
            emb = self.seg_2(self.seg_bn_1(F.relu(emb)))
        return emb


class ERes2NetV2(_ERes2NetV2):
    """(B, T, input_size) -> (B, embd_dim); arguments and defaults as mvector's ``ERes2NetV2``.

    >>> m = ERes2NetV2(40, m_channels=4, num_blocks=[1, 1, 1, 1], embd_dim=16).eval()
    >>> m(torch.randn(2, 50, 40), torch.tensor([50, 23])).shape
    torch.Size([2, 16])
    """

    def __init__(
        self,
        input_size: int,
        num_blocks: Sequence[int] = (3, 4, 6, 3),
        m_channels: int = 32,
        expansion: int = 2,
        base_width: int = 26,
        scale: int = 2,
        embd_dim: int = 192,
        two_emb_layer: bool = False,
    ) -> None:
        _check_bands("ERes2NetV2", input_size)
        if expansion != 2:
            raise ValueError(
                f"ERes2NetV2 needs expansion 2 (got {expansion}): mvector's layer3_ds is "
                "sized m_channels*8 -> m_channels*16"
            )
        super().__init__(
            feat_dim=input_size,
            embedding_size=embd_dim,
            m_channels=m_channels,
            num_blocks=tuple(num_blocks),
            baseWidth=base_width,
            scale=scale,
            expansion=expansion,
            pooling_func="TSTP",
            two_emb_layer=two_emb_layer,
        )
        self.input_size = input_size
        self.embd_dim = embd_dim
        self.min_frames = _MIN_FRAMES

    def forward(self, feats: torch.Tensor, n_frames: torch.Tensor | None = None) -> torch.Tensor:
        """feats (B, T, input_size) zero-padded, n_frames (B,) int64 or None -> (B, embd_dim)."""
        feats, lengths = check_inputs(feats, n_frames, self.input_size, self.min_frames)
        return super().forward(feats, lengths)
