"""mvector's ``ResNetSE``: a 2-D SE-ResNet over (frequency, time), padding-aware.

Input (B, T, F) becomes a one-channel image (B, 1, F, T). A 3x3 stem, four stages of
squeeze-excitation bottlenecks (expansion 2; stages 2-4 stride 2 in both axes, so F and T are
divided by 8), a reshape to (B, 2 * num_filters[3] * F/8, T'), a pooling, then
``bn2 -> linear -> bn3``.

Padding: lengths follow every stride-2 stage (``ceil(n / 2)``). The only layers that mix frames
are the 3x3 convolutions (their input is re-zeroed past the row's length: the zeros their own
padding gives on the unpadded row), the squeeze-excitation average (over all frequencies and
the valid frames) and the final pooling (valid frames only). 1x1 convolutions, strided or not,
read valid frames only for valid outputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..masking import apply_mask, time_mask
from .common import check_inputs, min_input_frames
from .pooling import make_pooling

__all__ = ["ResNetSE"]


def _half(n: int) -> int:
    return (n - 1) // 2 + 1


class _SELayer(nn.Module):
    """Channel gates from the mean over frequency and valid frames (keys ``fc.0``, ``fc.2``)."""

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction),
            nn.ReLU(),
            nn.Linear(channels // reduction, channels),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        if lengths is None:
            s = x.mean(dim=(2, 3))
        else:
            valid = time_mask(lengths, x.shape[-1])[:, None, None, :]
            total = x.masked_fill(~valid, 0.0).sum(dim=(2, 3))
            s = total / (lengths.to(x.dtype)[:, None] * x.shape[2])
        return x * self.fc(s)[:, :, None, None]


class _SEBottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 (x2 channels) -> SE, plus the (projected) shortcut."""

    expansion = 2

    def __init__(self, inplanes: int, planes: int, stride: int = 1, reduction: int = 8) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.stride = stride
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.se = _SELayer(out_planes, reduction)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or inplanes != out_planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, out_planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def forward(
        self, x: torch.Tensor, lengths: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, C, F, T) with row lengths -> output and its row lengths."""
        out = apply_mask(F.relu(self.bn1(self.conv1(x))), lengths)
        out = F.relu(self.bn2(self.conv2(out)))
        if lengths is not None and self.stride != 1:
            lengths = (lengths - 1) // self.stride + 1
        out = self.se(self.bn3(self.conv3(out)), lengths)
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual), lengths


class ResNetSE(nn.Module):
    """(B, T, input_size) -> (B, embd_dim); arguments and defaults as mvector's ``ResNetSE``.

    ``input_size`` must be a multiple of 8 (mvector sizes its pooling with ``input_size // 8``
    while the network yields ``ceil(input_size / 8)`` bands).

    >>> m = ResNetSE(40, layers=[1, 1, 1, 1], num_filters=[4, 8, 8, 8], embd_dim=16).eval()
    >>> m(torch.randn(2, 50, 40), torch.tensor([50, 21])).shape
    torch.Size([2, 16])
    """

    def __init__(
        self,
        input_size: int,
        layers: Sequence[int] = (3, 4, 6, 3),
        num_filters: Sequence[int] = (32, 64, 128, 256),
        embd_dim: int = 192,
        pooling_type: str = "ASP",
    ) -> None:
        super().__init__()
        if input_size % 8:
            raise ValueError(
                f"ResNetSE needs input_size divisible by 8, got {input_size} (mvector's pooling "
                f"expects {input_size // 8} bands where the network gives {-(-input_size // 8)})"
            )
        self.input_size = input_size
        self.embd_dim = embd_dim
        self.pooling_type = pooling_type
        self._inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(1, num_filters[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.layer1 = self._make_layer(num_filters[0], layers[0], 1)
        self.layer2 = self._make_layer(num_filters[1], layers[1], 2)
        self.layer3 = self._make_layer(num_filters[2], layers[2], 2)
        self.layer4 = self._make_layer(num_filters[3], layers[3], 2)
        cat_channels = num_filters[3] * _SEBottleneck.expansion * (input_size // 8)
        self.pooling, pooled = make_pooling(pooling_type, cat_channels, attention_channels=128)
        self.bn2 = nn.BatchNorm1d(pooled)
        self.linear = nn.Linear(pooled, embd_dim)
        self.bn3 = nn.BatchNorm1d(embd_dim)
        need = 2 if pooling_type == "TSP" else 1
        self.min_frames = min_input_frames(lambda n: _half(_half(_half(n))), need)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [_SEBottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * _SEBottleneck.expansion
        layers += [_SEBottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, feats: torch.Tensor, n_frames: torch.Tensor | None = None) -> torch.Tensor:
        """feats (B, T, input_size) zero-padded, n_frames (B,) int64 or None -> (B, embd_dim)."""
        feats, lengths = check_inputs(feats, n_frames, self.input_size, self.min_frames)
        x = feats.transpose(1, 2).unsqueeze(1)  # (B, 1, F, T), zero past each row
        x = F.relu(self.bn1(self.conv1(x)))
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x, lengths = block(x, lengths)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        return self.bn3(self.linear(self.bn2(self.pooling(x, lengths))))
