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
convolutions halve time (``ceil(L / 2)``, the floor formula of a stride-2 convolution), so the
model tracks four time resolutions and builds one frame mask for each. Only the 3x3
convolutions mix neighbouring frames; every other layer (1x1 convolutions, strided 1x1
convolutions that merely pick frame ``2t``, BatchNorm, activations, residual adds, AFF) acts
frame by frame, so values past a row's length never reach its valid frames through them. The
input of every 3x3 convolution is therefore re-zeroed past the valid length (the zeros that
convolution's own padding gives on the unpadded row), and the pooling counts valid frames only.
A zero-padded row thus gets the embedding it gets alone, at the cost of one multiply per 3x3
convolution. Padded frames of intermediate maps hold finite junk (activations are clipped).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from speaker_sim_cli.models.masking import conv_out_lengths, time_mask

__all__ = ["AttentionalFusion", "ERes2Net", "ERes2NetHuge", "Res2Bottleneck"]


def _hardtanh20(x: torch.Tensor) -> torch.Tensor:
    """ReLU clipped at 20, the activation 3D-Speaker uses inside the residual blocks."""
    return F.hardtanh(x, 0.0, 20.0)


def _mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero ``x`` (B, C, F, T) past each row's length; ``mask`` is (B, 1, 1, T) or None."""
    return x if mask is None else x * mask


def _zero_pad_(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero ``x`` in place past each row's length via a (B, 1, 1, T) float mask (None: no-op).

    Only used on fresh activation outputs that autograd does not save (hardtanh saves its
    input), so the in-place product is safe under autograd too.
    """
    return x if mask is None else x.mul_(mask)


def _frame_masks(
    lengths: torch.Tensor | None, size: int, dtype: torch.dtype, levels: int = 4
) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """(lengths, float mask (B, 1, 1, T_k)) at the input resolution and after each halving.

    A stride-2 convolution (1x1 without padding, or 3x3 with padding 1) maps T frames to
    ``floor((T - 1) / 2) + 1``; the padded size follows the same rule.
    """
    out: list[tuple[torch.Tensor | None, torch.Tensor | None]] = []
    for k in range(levels):
        if k > 0:
            size = (size - 1) // 2 + 1
            lengths = None if lengths is None else conv_out_lengths(lengths, kernel=1, stride=2)
        if lengths is None:
            out.append((None, None))
        else:
            out.append((lengths, time_mask(lengths, size).to(dtype)[:, None, None, :]))
    return out


class AttentionalFusion(nn.Module):
    """Attentional feature fusion (AFF) of two maps of ``channels`` channels.

    A pointwise bottleneck over the concatenated pair gives a gate ``g`` in (0, 2); the output is
    ``x * g + y * (2 - g)``. Everything is pointwise in time, so two inputs that are zero past
    the valid length give an output that is zero there too. ERes2Net and ERes2NetV2 share it.
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


class Res2Bottleneck(nn.Module):
    """Res2Net bottleneck: 1x1 (strided) -> ``scale`` chained 3x3 groups -> 1x1, plus shortcut.

    Groups are chained by addition, or by AFF when ``fuse`` is set. (B, C_in, F, T) ->
    (B, planes * expansion, F', T'). ``mask`` (B, 1, 1, T') is the frame mask at the *output*
    resolution: the input of each 3x3 group convolution is zeroed with it; frames past the
    length of the input and output hold junk that never reaches valid frames.
    """

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        *,
        expansion: int = 2,
        base_width: int = 32,
        scale: int = 2,
        fuse: bool = False,
    ) -> None:
        super().__init__()
        width = planes * base_width // 64
        out_planes = planes * expansion
        self.width = width
        self.scale = scale
        self.stride = stride
        self.fuse = fuse
        self.conv1 = nn.Conv2d(in_planes, width * scale, kernel_size=1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(width * scale)
        self.convs = nn.ModuleList(
            nn.Conv2d(width, width, kernel_size=3, padding=1, bias=False) for _ in range(scale)
        )
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(scale))
        self.fuse_models = nn.ModuleList(
            AttentionalFusion(width) for _ in range(scale - 1 if fuse else 0)
        )
        self.conv3 = nn.Conv2d(width * scale, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # A valid output frame of a 1x1 conv (strided or not) reads only valid input frames, so
        # padded frames need zeros only where a 3x3 conv reads them: the sub-band inputs. Sums
        # and AFF of zeroed inputs stay zero. The last band and the block output feed 1x1 convs
        # only and keep whatever lands on padded frames (the caller zeroes what a 3x3 reads).
        out = _zero_pad_(_hardtanh20(self.bn1(self.conv1(x))), mask)
        bands = torch.split(out, self.width, dim=1)
        outs: list[torch.Tensor] = []
        sp = bands[0]
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns, strict=True)):
            if i > 0:
                sp = self.fuse_models[i - 1](sp, bands[i]) if self.fuse else sp + bands[i]
            sp = _hardtanh20(bn(conv(sp)))
            if i < self.scale - 1:
                sp = _zero_pad_(sp, mask)
            outs.append(sp)
        out = self.bn3(self.conv3(torch.cat(outs, dim=1)))
        return _hardtanh20(out + self.shortcut(x))


def _masked_stats(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Temporal statistics pooling of (B, C, F, T) to (B, 2 * C * F).

    Mean and ``sqrt(unbiased variance + 1e-8)`` over valid frames, each flattened channel-major.
    """
    if lengths is None:
        mean = x.mean(dim=-1)
        var = x.var(dim=-1)
    else:
        mask = time_mask(lengths, x.shape[-1])[:, None, None, :]
        n = lengths.to(x.dtype).view(-1, 1, 1)
        mean = x.masked_fill(~mask, 0.0).sum(dim=-1) / n
        dev = (x - mean.unsqueeze(-1)).masked_fill(~mask, 0.0)
        var = (dev * dev).sum(dim=-1) / (n - 1)
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
        self.fuse_mode12 = AttentionalFusion(c2)
        self.fuse_mode123 = AttentionalFusion(c3)
        self.fuse_mode1234 = AttentionalFusion(c4)
        stats_dim = (feat_dim // 8) * c4
        self.seg_1 = nn.Linear(2 * stats_dim, embedding_size)

    def _make_layer(self, planes: int, n: int, stride: int, fuse: bool) -> nn.ModuleList:
        blocks = []
        for s in [stride] + [1] * (n - 1):
            blocks.append(
                Res2Bottleneck(
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
        layer: nn.ModuleList, x: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        for block in layer:
            x = block(x, mask)
        return x

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Embed mean-normalised fbank ``feats`` (B, T, feat_dim) -> (B, embedding_size).

        ``lengths`` (B,) int64 holds the valid frames of each zero-padded row (None: all T).
        """
        x = feats.transpose(1, 2).unsqueeze(1)  # (B, 1, F, T)
        if lengths is not None:
            lengths = lengths.to(device=feats.device, dtype=torch.long)
            valid = time_mask(lengths, x.shape[-1])[:, None, None, :]
            x = x.masked_fill(~valid, 0.0)  # also clears NaN / inf padding
        (_, m1), (_, m2), (_, m3), (len4, m4) = _frame_masks(lengths, x.shape[-1], x.dtype)
        out = F.relu(self.bn1(self.conv1(x)))
        out1 = self._run_layer(self.layer1, out, m1)
        out2 = self._run_layer(self.layer2, out1, m2)
        fuse12 = self.fuse_mode12(out2, self.layer1_downsample(_mask(out1, m1)))
        out3 = self._run_layer(self.layer3, out2, m3)
        fuse123 = self.fuse_mode123(out3, self.layer2_downsample(_mask(fuse12, m2)))
        out4 = self._run_layer(self.layer4, out3, m4)
        fuse1234 = self.fuse_mode1234(out4, self.layer3_downsample(_mask(fuse123, m3)))
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
