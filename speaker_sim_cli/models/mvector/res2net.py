"""mvector's ``Res2Net``: a 2-D Res2Net over (frequency, time), padding-aware.

Input (B, T, F) becomes (B, 1, F, T). Stem: 7x7 conv with stride 3 and padding 1, batch norm,
ReLU, 3x3 max-pool with stride 2. Then four stages of Res2Net bottlenecks (expansion 4, width
``planes * base_width / 64`` per split, ``scale`` splits); the first block of every stage is a
"stage" block: each split is convolved on its own (strided in stages 2-4) and the last split
is average-pooled instead of passed through; later blocks chain ``y_i = conv(x_i + y_{i-1})``.
Then a reshape to (B, C * F', T'), a pooling and ``bn2 -> linear -> bn3``.

Padding: lengths follow each stride (stem ``(n - 5) // 3 + 1``, max-pool and stride-2 stages
``ceil(n / 2)``). Every 3x3 convolution and average pool reads an input re-zeroed past the
row's length (what zero padding, counted in the average, gives on the unpadded row); the
max-pool reads ``-inf`` there (its own padding); 1x1 convolutions read valid frames only for
valid outputs; the pooling counts valid frames only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..masking import apply_mask, time_mask
from .common import check_inputs, min_input_frames, strided_lengths
from .pooling import make_pooling

__all__ = ["Res2Net"]


def _stem_len(n: int) -> int:
    return (n + 2 - 7) // 3 + 1


def _half(n: int) -> int:
    return (n - 1) // 2 + 1


class _Bottle2neck(nn.Module):
    """Res2Net bottleneck; keys ``conv1, bn1, convs.i, bns.i, conv3, bn3, downsample.{0,1}``."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        base_width: int = 26,
        scale: int = 4,
        stage: bool = False,
    ) -> None:
        super().__init__()
        width = planes * base_width // 64  # = floor(planes * base_width / 64)
        self.width = width
        self.scale = scale
        self.stride = stride
        self.stage = stage
        self.nums = 1 if scale == 1 else scale - 1
        self.conv1 = nn.Conv2d(inplanes, width * scale, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width * scale)
        self.convs = nn.ModuleList(
            nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, bias=False)
            for _ in range(self.nums)
        )
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(self.nums))
        self.conv3 = nn.Conv2d(width * scale, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = downsample

    def forward(
        self, x: torch.Tensor, lengths: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, C, F, T) with row lengths -> output and its row lengths."""
        out = apply_mask(F.relu(self.bn1(self.conv1(x))), lengths)
        bands = torch.split(out, self.width, dim=1)
        outs: list[torch.Tensor] = []
        sp = bands[0]
        for i in range(self.nums):
            if i > 0:
                sp = bands[i] if self.stage else apply_mask(sp + bands[i], lengths)
            sp = F.relu(self.bns[i](self.convs[i](sp)))
            outs.append(sp)
        if self.scale != 1:
            last = bands[self.nums]
            if self.stage:
                last = F.avg_pool2d(last, kernel_size=3, stride=self.stride, padding=1)
            outs.append(last)
        out = self.bn3(self.conv3(torch.cat(outs, dim=1)))
        residual = x if self.downsample is None else self.downsample(x)
        if lengths is not None and self.stride != 1:
            lengths = (lengths - 1) // self.stride + 1
        return F.relu(out + residual), lengths


class Res2Net(nn.Module):
    """(B, T, input_size) -> (B, embd_dim); arguments and defaults as mvector's ``Res2Net``.

    >>> m = Res2Net(40, m_channels=4, layers=[1, 1, 1, 1], embd_dim=16).eval()
    >>> m(torch.randn(2, 90, 40), torch.tensor([90, 61])).shape
    torch.Size([2, 16])
    """

    def __init__(
        self,
        input_size: int,
        m_channels: int = 32,
        layers: Sequence[int] = (3, 4, 6, 3),
        base_width: int = 32,
        scale: int = 2,
        embd_dim: int = 192,
        pooling_type: str = "ASP",
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.embd_dim = embd_dim
        self.pooling_type = pooling_type
        self.base_width = base_width
        self.scale = scale
        self._inplanes = m_channels
        self.conv1 = nn.Conv2d(1, m_channels, kernel_size=7, stride=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(m_channels)
        self.layer1 = self._make_layer(m_channels, layers[0], 1)
        self.layer2 = self._make_layer(m_channels * 2, layers[1], 2)
        self.layer3 = self._make_layer(m_channels * 4, layers[2], 2)
        self.layer4 = self._make_layer(m_channels * 8, layers[3], 2)
        out_channels = m_channels * 8 * _Bottle2neck.expansion
        if input_size < 96:
            bands = input_size // base_width
        else:
            bands = input_size // base_width - int(math.sqrt(input_size / 64))
        real = _half(_half(_half(_half(_stem_len(input_size)))))
        if bands != real:
            raise ValueError(
                f"Res2Net cannot run on input_size {input_size} with base_width {base_width}: "
                f"mvector sizes its pooling for {bands} frequency bands, the network gives {real}"
            )
        self.pooling, pooled = make_pooling(
            pooling_type, out_channels * bands, attention_channels=128
        )
        self.bn2 = nn.BatchNorm1d(pooled)
        self.linear = nn.Linear(pooled, embd_dim)
        self.bn3 = nn.BatchNorm1d(embd_dim)
        need = 2 if pooling_type == "TSP" else 1
        self.min_frames = min_input_frames(
            lambda n: _half(_half(_half(_half(_stem_len(n))))) if n >= 5 else 0, need
        )

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        out_planes = planes * _Bottle2neck.expansion
        downsample = None
        if stride != 1 or self._inplanes != out_planes:
            downsample = nn.Sequential(
                nn.Conv2d(self._inplanes, out_planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )
        bw, sc = self.base_width, self.scale
        layers = [_Bottle2neck(self._inplanes, planes, stride, downsample, bw, sc, stage=True)]
        self._inplanes = out_planes
        layers += [_Bottle2neck(out_planes, planes, 1, None, bw, sc) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, feats: torch.Tensor, n_frames: torch.Tensor | None = None) -> torch.Tensor:
        """feats (B, T, input_size) zero-padded, n_frames (B,) int64 or None -> (B, embd_dim)."""
        feats, lengths = check_inputs(feats, n_frames, self.input_size, self.min_frames)
        x = feats.transpose(1, 2).unsqueeze(1)  # (B, 1, F, T), zero past each row
        x = F.relu(self.bn1(self.conv1(x)))
        if lengths is not None:
            lengths = strided_lengths(lengths, kernel=7, stride=3, padding=1)
            valid = time_mask(lengths, x.shape[-1])[:, None, None, :]
            x = x.masked_fill(~valid, float("-inf"))
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        if lengths is not None:
            lengths = strided_lengths(lengths, kernel=3, stride=2, padding=1)
            valid = time_mask(lengths, x.shape[-1])[:, None, None, :]
            x = x.masked_fill(~valid, 0.0)  # windows wholly in the padding hold -inf
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x, lengths = block(x, lengths)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        return self.bn3(self.linear(self.bn2(self.pooling(x, lengths))))
