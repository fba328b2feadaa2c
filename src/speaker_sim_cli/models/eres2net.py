"""ERes2Net speaker encoders (3D-Speaker's ERes2Net and ERes2Net-huge), padding-aware.

ERes2Net is a 2-D Res2Net over the (frequency, time) plane of an fbank: a 3x3 stem, four
stages of bottleneck blocks whose middle is split into ``scale`` groups of 3x3 convolutions
chained hierarchically (a plain add in stages 1-2, an attentional fusion "AFF" in stages 3-4:
local feature fusion), and a bottom-up path that downsamples each stage's output with a 3x3
stride-2 convolution and fuses it into the next stage's output (global feature fusion). The
last fused map is pooled over time (mean and unbiased standard deviation) and projected to the
embedding.

Parameter names follow 3D-Speaker's state dicts, so its checkpoints load with ``strict=True``.

Padding: ``lengths`` (B,) counts each row's valid frames. Stages 2-4 and the downsampling
convolutions halve time (``ceil(L / 2)``, the floor formula of a stride-2 convolution). Every
tensor handed from one module to the next is zero past its row's valid length, so each 3x3
convolution sees the zeros its own padding would give on the unpadded row, and the pooling
counts valid frames only. A zero-padded row thus gets the embedding it gets alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from speaker_sim_cli.models.masking import apply_mask, conv_out_lengths

__all__ = ["ERes2Net", "ERes2NetHuge"]


def _hardtanh20(x: torch.Tensor) -> torch.Tensor:
    """ReLU clipped at 20, the activation 3D-Speaker uses inside the residual blocks."""
    return F.hardtanh(x, 0.0, 20.0)


def _halve(lengths: torch.Tensor | None) -> torch.Tensor | None:
    """Time lengths after a stride-2 convolution (1x1 without padding or 3x3 with padding 1)."""
    if lengths is None:
        return None
    return conv_out_lengths(lengths, kernel=1, stride=2)


class _AFF(nn.Module):
    """Attentional feature fusion of two maps of ``channels`` channels.

    A pointwise bottleneck over the concatenated pair gives a gate ``g`` in (0, 2); the output is
    ``x * g + y * (2 - g)``. Everything is pointwise in time, so two inputs that are zero past
    the valid length give an output that is zero there too.
    """

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        inner = channels // reduction
        self.local_att = nn.Sequential(
            nn.Conv2d(2 * channels, inner, kernel_size=1),
            nn.BatchNorm2d(inner),
            nn.SiLU(),
            nn.Conv2d(inner, channels, kernel_size=1),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        gate = 1.0 + torch.tanh(self.local_att(torch.cat((x, y), dim=1)))
        return x * gate + y * (2.0 - gate)


class _ERes2NetBlock(nn.Module):
    """Res2Net bottleneck: 1x1 (strided) -> ``scale`` chained 3x3 groups -> 1x1, plus shortcut.

    Groups are chained by addition, or by AFF when ``fuse`` is set. Input (B, C_in, F, T) must be
    zero past ``lengths``; the output (B, planes * expansion, F', T') is zero past the returned
    lengths.
    """

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int,
        *,
        expansion: int,
        base_width: int,
        scale: int,
        fuse: bool,
    ) -> None:
        super().__init__()
        width = planes * base_width // 64
        out_planes = planes * expansion
        self.width = width
        self.scale = scale
        self.stride = stride
        self.conv1 = nn.Conv2d(in_planes, width * scale, kernel_size=1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(width * scale)
        self.convs = nn.ModuleList(
            nn.Conv2d(width, width, kernel_size=3, padding=1, bias=False) for _ in range(scale)
        )
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(scale))
        self.fuse_models = nn.ModuleList(_AFF(width) for _ in range(scale - 1)) if fuse else None
        self.conv3 = nn.Conv2d(width * scale, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def forward(
        self, x: torch.Tensor, lengths: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.stride != 1 and lengths is not None:
            lengths = conv_out_lengths(lengths, kernel=1, stride=self.stride)
        out = apply_mask(_hardtanh20(self.bn1(self.conv1(x))), lengths)
        splits = torch.split(out, self.width, dim=1)
        parts: list[torch.Tensor] = []
        sp = splits[0]
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns, strict=True)):
            if i > 0:
                # Both operands are zero past the valid length, so is their sum / fusion.
                if self.fuse_models is None:
                    sp = sp + splits[i]
                else:
                    sp = self.fuse_models[i - 1](sp, splits[i])
            sp = apply_mask(_hardtanh20(bn(conv(sp))), lengths)
            parts.append(sp)
        out = self.bn3(self.conv3(torch.cat(parts, dim=1)))
        out = _hardtanh20(out + self.shortcut(x))
        return apply_mask(out, lengths), lengths


def _masked_stats(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Temporal statistics pooling of (B, C, F, T) to (B, 2 * C * F).

    Mean and ``sqrt(unbiased variance + 1e-8)`` over valid frames, each flattened channel-major.
    """
    if lengths is None:
        mean = x.mean(dim=-1)
        var = x.var(dim=-1)
    else:
        n = lengths.to(x.dtype).view(-1, 1, 1)
        mean = apply_mask(x, lengths).sum(dim=-1) / n
        var = apply_mask((x - mean.unsqueeze(-1)) ** 2, lengths).sum(dim=-1) / (n - 1)
    std = torch.sqrt(var + 1e-8)
    return torch.cat((mean.flatten(1), std.flatten(1)), dim=1)


class _ERes2NetBase(nn.Module):
    """Shared ERes2Net trunk; the public subclasses fix the block shape."""

    expansion: int = 2
    base_width: int = 32
    scale: int = 2

    def __init__(
        self,
        feat_dim: int,
        embedding_size: int,
        m_channels: int,
        num_blocks: tuple[int, int, int, int],
    ) -> None:
        super().__init__()
        self.feat_dim = feat_dim
        self.embedding_size = embedding_size
        exp = self.expansion
        self.conv1 = nn.Conv2d(1, m_channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(m_channels)
        self._in_planes = m_channels
        self.layer1 = self._make_layer(m_channels, num_blocks[0], stride=1, fuse=False)
        self.layer2 = self._make_layer(m_channels * 2, num_blocks[1], stride=2, fuse=False)
        self.layer3 = self._make_layer(m_channels * 4, num_blocks[2], stride=2, fuse=True)
        self.layer4 = self._make_layer(m_channels * 8, num_blocks[3], stride=2, fuse=True)
        # Bottom-up path: stage k output (m * exp * 2^(k-1) channels) -> stage k+1 size.
        c1, c2, c3, c4 = (m_channels * exp * 2**k for k in range(4))
        self.layer1_downsample = nn.Conv2d(c1, c2, kernel_size=3, stride=2, padding=1, bias=False)
        self.layer2_downsample = nn.Conv2d(c2, c3, kernel_size=3, stride=2, padding=1, bias=False)
        self.layer3_downsample = nn.Conv2d(c3, c4, kernel_size=3, stride=2, padding=1, bias=False)
        self.fuse_mode12 = _AFF(c2)
        self.fuse_mode123 = _AFF(c3)
        self.fuse_mode1234 = _AFF(c4)
        stats_dim = (feat_dim // 8) * c4
        self.seg_1 = nn.Linear(2 * stats_dim, embedding_size)

    def _make_layer(self, planes: int, n: int, stride: int, fuse: bool) -> nn.ModuleList:
        blocks = []
        for s in [stride] + [1] * (n - 1):
            blocks.append(
                _ERes2NetBlock(
                    self._in_planes,
                    planes,
                    s,
                    expansion=self.expansion,
                    base_width=self.base_width,
                    scale=self.scale,
                    fuse=fuse,
                )
            )
            self._in_planes = planes * self.expansion
        return nn.ModuleList(blocks)

    @staticmethod
    def _run_layer(
        layer: nn.ModuleList, x: torch.Tensor, lengths: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        for block in layer:
            x, lengths = block(x, lengths)
        return x, lengths

    @staticmethod
    def _down(conv: nn.Conv2d, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        return apply_mask(conv(x), _halve(lengths))

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Embed mean-normalised fbank ``feats`` (B, T, feat_dim) -> (B, embedding_size).

        ``lengths`` (B,) int64 holds the valid frames of each zero-padded row (None: all T).
        """
        if lengths is not None:
            lengths = lengths.to(device=feats.device, dtype=torch.long)
        x = apply_mask(feats.transpose(1, 2), lengths).unsqueeze(1)  # (B, 1, F, T)
        x = apply_mask(F.relu(self.bn1(self.conv1(x))), lengths)
        out1, len1 = self._run_layer(self.layer1, x, lengths)
        out2, len2 = self._run_layer(self.layer2, out1, len1)
        fuse12 = self.fuse_mode12(out2, self._down(self.layer1_downsample, out1, len1))
        out3, len3 = self._run_layer(self.layer3, out2, len2)
        fuse123 = self.fuse_mode123(out3, self._down(self.layer2_downsample, fuse12, len2))
        out4, len4 = self._run_layer(self.layer4, out3, len3)
        fuse1234 = self.fuse_mode1234(out4, self._down(self.layer3_downsample, fuse123, len3))
        return self.seg_1(_masked_stats(fuse1234, len4))


class ERes2Net(_ERes2NetBase):
    """3D-Speaker's ERes2Net (blocks: expansion 2, base width 32, scale 2).

    ``m_channels`` 32 with ``embedding_size`` 192 is the VoxCeleb model, 192 -> 512 the "base"
    models; ``m_channels`` 64 with 512 the "large" one.

    >>> m = ERes2Net(embedding_size=192).eval()
    >>> m(torch.zeros(2, 100, 80), torch.tensor([100, 60])).shape
    torch.Size([2, 192])
    """

    expansion = 2
    base_width = 32
    scale = 2

    def __init__(
        self,
        feat_dim: int = 80,
        embedding_size: int = 192,
        m_channels: int = 32,
        num_blocks: tuple[int, int, int, int] = (3, 4, 6, 3),
    ) -> None:
        super().__init__(feat_dim, embedding_size, m_channels, num_blocks)


class ERes2NetHuge(_ERes2NetBase):
    """3D-Speaker's ERes2Net-huge (blocks: expansion 4, base width 24, scale 3; 64 channels).

    Used by ``iic/speech_eres2net_sv_zh-cn_16k-common``.
    """

    expansion = 4
    base_width = 24
    scale = 3

    def __init__(
        self,
        feat_dim: int = 80,
        embedding_size: int = 192,
        m_channels: int = 64,
        num_blocks: tuple[int, int, int, int] = (3, 4, 6, 3),
    ) -> None:
        super().__init__(feat_dim, embedding_size, m_channels, num_blocks)
