"""mvector's ``ERes2Net`` and ``ERes2NetV2``, padding-aware.

Both are 3D-Speaker's networks with mvector's constructor arguments; the maths and the
state-dict keys are the same, so the blocks (and ERes2NetV2 whole) come from
:mod:`speaker_sim_cli.models.eres2net` / :mod:`~speaker_sim_cli.models.eres2netv2`, which
re-zero every 3x3 convolution's input past the row's length and pool valid frames only.

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

from ..eres2net import AttentionalFusion, Res2Bottleneck
from ..eres2netv2 import ERes2NetV2 as _ERes2NetV2
from ..masking import apply_mask, time_mask
from .common import check_inputs
from .pooling import tstp

__all__ = ["ERes2Net", "ERes2NetV2"]

_MIN_FRAMES = 5  # three halvings leave 2 frames: the unbiased variance needs two


def _check_bands(name: str, input_size: int) -> None:
    if input_size % 8:
        raise ValueError(
            f"{name} needs input_size divisible by 8, got {input_size} (mvector sizes seg_1 "
            f"for {input_size // 8} bands where the network gives {-(-input_size // 8)})"
        )


class ERes2Net(nn.Module):
    """(B, T, input_size) -> (B, embd_dim); arguments and defaults as mvector's ``ERes2Net``.

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
        super().__init__()
        _check_bands("ERes2Net", input_size)
        if expansion != 2 * mul_channel:
            raise ValueError(
                f"ERes2Net needs expansion == 2 * mul_channel (got {expansion} and "
                f"{mul_channel}): mvector's fusion convs do not fit the stages otherwise"
            )
        self.input_size = input_size
        self.embd_dim = embd_dim
        self.two_emb_layer = two_emb_layer
        self.min_frames = _MIN_FRAMES
        self._kw = {"expansion": expansion, "base_width": base_width, "scale": scale}
        self._in_planes = m_channels
        self.conv1 = nn.Conv2d(1, m_channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(m_channels)
        self.layer1 = self._make_layer(m_channels, num_blocks[0], 1, fuse=False)
        self.layer2 = self._make_layer(m_channels * 2, num_blocks[1], 2, fuse=False)
        self.layer3 = self._make_layer(m_channels * 4, num_blocks[2], 2, fuse=True)
        self.layer4 = self._make_layer(m_channels * 8, num_blocks[3], 2, fuse=True)
        c1, c2, c3, c4 = (m_channels * 2 * mul_channel * 2**k for k in range(4))
        self.layer1_downsample = nn.Conv2d(c1, c2, kernel_size=3, padding=1, stride=2, bias=False)
        self.layer2_downsample = nn.Conv2d(c2, c3, kernel_size=3, padding=1, stride=2, bias=False)
        self.layer3_downsample = nn.Conv2d(c3, c4, kernel_size=3, padding=1, stride=2, bias=False)
        self.fuse_mode12 = AttentionalFusion(c2)
        self.fuse_mode123 = AttentionalFusion(c3)
        self.fuse_mode1234 = AttentionalFusion(c4)
        stats_dim = int(input_size / 8) * m_channels * 8
        self.seg_1 = nn.Linear(stats_dim * expansion * 2, embd_dim)
        self.seg_bn_1: nn.Module = nn.Identity()
        self.seg_2: nn.Module = nn.Identity()
        if two_emb_layer:
            self.seg_bn_1 = nn.BatchNorm1d(embd_dim, affine=False)
            self.seg_2 = nn.Linear(embd_dim, embd_dim)

    def _make_layer(self, planes: int, n: int, stride: int, fuse: bool) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (n - 1):
            blocks.append(Res2Bottleneck(self._in_planes, planes, s, fuse=fuse, **self._kw))
            self._in_planes = planes * self._kw["expansion"]
        return nn.Sequential(*blocks)

    def forward(self, feats: torch.Tensor, n_frames: torch.Tensor | None = None) -> torch.Tensor:
        """feats (B, T, input_size) zero-padded, n_frames (B,) int64 or None -> (B, embd_dim)."""
        lengths = check_inputs(feats, n_frames, self.input_size, self.min_frames)
        x = apply_mask(feats.transpose(1, 2), lengths).unsqueeze(1)  # (B, 1, F, T)
        # Row lengths and float frame masks (B, 1, 1, T_k) at the four time resolutions.
        lens: list[torch.Tensor | None] = [lengths]
        masks: list[torch.Tensor | None] = []
        size = x.shape[-1]
        for k in range(4):
            if k > 0:
                size = (size - 1) // 2 + 1
                prev = lens[-1]
                lens.append(None if prev is None else (prev - 1) // 2 + 1)
            cur = lens[k]
            masks.append(
                None if cur is None else time_mask(cur, size).to(x.dtype)[:, None, None, :]
            )
        out = F.relu(self.bn1(self.conv1(x)))
        out1 = self._run(self.layer1, out, masks[0])
        out2 = self._run(self.layer2, out1, masks[1])
        fuse12 = self.fuse_mode12(out2, self.layer1_downsample(_mul(out1, masks[0])))
        out3 = self._run(self.layer3, out2, masks[2])
        fuse123 = self.fuse_mode123(out3, self.layer2_downsample(_mul(fuse12, masks[1])))
        out4 = self._run(self.layer4, out3, masks[3])
        fuse1234 = self.fuse_mode1234(out4, self.layer3_downsample(_mul(fuse123, masks[2])))
        emb = self.seg_1(tstp(fuse1234, lens[3]))
        if self.two_emb_layer:
            emb = self.seg_2(self.seg_bn_1(F.relu(emb)))
        return emb

    @staticmethod
    def _run(layer: nn.Sequential, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for block in layer:
            x = block(x, mask)
        return x


def _mul(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else x * mask


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
        lengths = check_inputs(feats, n_frames, self.input_size, self.min_frames)
        return super().forward(feats, lengths)
