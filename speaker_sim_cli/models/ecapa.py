"""ECAPA-TDNN (3D-Speaker's SpeechBrain-derived variant) with padding-aware batched inference.

A 1-D TDNN stem, SE-Res2Net blocks with dilated sub-band convolutions, multi-layer feature
aggregation (MFA), attentive statistics pooling with global context, and a 1x1 output layer.
Every TDNN is conv -> ReLU -> BatchNorm. State-dict keys follow 3D-Speaker's ``ECAPA_TDNN``
(``blocks.*``, ``mfa``, ``asp``, ``asp_bn``, ``fc``) so its checkpoints load with ``strict=True``.

Padding: the convolutions use "same" *reflect* padding. For a zero-padded row the reflection
must happen at the row's own last valid frame, so wide convolutions gather their input through
per-row reflected indices; a valid output then reads valid frames only, and what lands on
padded frames is never read again except by the poolings, which count valid frames only (the
squeeze-excitation means, the global mean/std of the attention context, and the attention
softmax, which gives padded frames zero weight). Stride is 1 everywhere, so lengths do not
change through the network.

Example::

    >>> import torch
    >>> model = ECAPATDNN(channels=[32, 32, 32, 32, 96], lin_neurons=16).eval()
    >>> model(torch.randn(2, 50, 80), torch.tensor([50, 31])).shape
    torch.Size([2, 16])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from speaker_sim_cli.models.masking import masked_mean, time_mask

__all__ = ["ECAPATDNN"]

_ASP_EPS = 1e-12  # 3D-Speaker clamps the attentive variance at 1e-12 before the sqrt


def _reflect_index(lengths: torch.Tensor, size: int, pad: int) -> torch.Tensor:
    """(B, size + 2*pad) source frames of a reflect pad done at each row's own end.

    Output position j stands for time t = j - pad; it reads t for 0 <= t < n, -t left of 0 and
    2(n-1) - t right of n-1 (as ``F.pad(mode="reflect")`` does on the row alone). Positions past
    n + pad only feed outputs on padded frames; they are clamped into range.
    """
    t = torch.arange(-pad, size + pad, device=lengths.device)[None, :]
    last = (lengths - 1)[:, None]
    idx = last - (last - t.abs()).abs()
    return idx.clamp(0, size - 1)


class _Conv1d(nn.Module):
    """1-D conv with "same" reflect padding (stride 1); keys ``conv.weight``, ``conv.bias``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        dilation: int = 1,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.pad = dilation * (kernel_size - 1) // 2
        self.conv = nn.Conv1d(
            in_channels, out_channels, kernel_size, dilation=dilation, groups=groups
        )

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if self.pad > 0:
            if lengths is None:
                x = F.pad(x, (self.pad, self.pad), mode="reflect")
            else:
                idx = _reflect_index(lengths, x.shape[-1], self.pad)
                x = x.gather(-1, idx[:, None, :].expand(x.shape[0], x.shape[1], -1))
        return self.conv(x)


class _BatchNorm1d(nn.Module):
    """BatchNorm1d under ``.norm`` (3D-Speaker's wrapper layout)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class _TDNN(nn.Module):
    """conv -> ReLU -> BatchNorm."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, dilation: int, groups: int = 1
    ) -> None:
        super().__init__()
        self.conv = _Conv1d(in_channels, out_channels, kernel_size, dilation, groups)
        self.norm = _BatchNorm1d(out_channels)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return self.norm(F.relu(self.conv(x, lengths)))


class _Res2Net(nn.Module):
    """Split channels into ``scale`` groups; group 0 passes, group i>0 is TDNN(x_i + y_{i-1})."""

    def __init__(self, channels: int, scale: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        if channels % scale:
            raise ValueError(f"channels ({channels}) must be divisible by scale ({scale})")
        self.scale = scale
        width = channels // scale
        self.blocks = nn.ModuleList(
            _TDNN(width, width, kernel_size, dilation) for _ in range(scale - 1)
        )

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        chunks = torch.chunk(x, self.scale, dim=1)
        ys = [chunks[0]]
        y = chunks[1]
        for i, block in enumerate(self.blocks):
            y = block(chunks[i + 1] if i == 0 else chunks[i + 1] + y, lengths)
            ys.append(y)
        return torch.cat(ys, dim=1)


class _SqueezeExcite(nn.Module):
    """Channel gates from the mean over valid frames."""

    def __init__(self, channels: int, se_channels: int) -> None:
        super().__init__()
        self.conv1 = _Conv1d(channels, se_channels, 1)
        self.conv2 = _Conv1d(se_channels, channels, 1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        s = masked_mean(x, lengths, keepdim=True)
        s = torch.sigmoid(self.conv2(F.relu(self.conv1(s))))
        return s * x


class _SERes2NetBlock(nn.Module):
    """TDNN(1x1) -> Res2Net -> TDNN(1x1) -> SE, plus the (projected) residual."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        res2net_scale: int,
        se_channels: int,
        kernel_size: int,
        dilation: int,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.tdnn1 = _TDNN(in_channels, out_channels, 1, 1, groups)
        self.res2net_block = _Res2Net(out_channels, res2net_scale, kernel_size, dilation)
        self.tdnn2 = _TDNN(out_channels, out_channels, 1, 1, groups)
        self.se_block = _SqueezeExcite(out_channels, se_channels)
        self.shortcut: _Conv1d | None = None
        if in_channels != out_channels:
            self.shortcut = _Conv1d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        residual = x if self.shortcut is None else self.shortcut(x)
        y = self.res2net_block(self.tdnn1(x), lengths)
        return self.se_block(self.tdnn2(y), lengths) + residual


def _weighted_stats(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std over time of x (B, C, T) under weights w (B, 1|C, T) that sum to 1."""
    mean = (w * x).sum(dim=-1)
    var = (w * (x - mean.unsqueeze(-1)).pow(2)).sum(dim=-1)
    return mean, var.clamp(min=_ASP_EPS).sqrt()


class _AttentiveStatsPool(nn.Module):
    """Attentive statistics pooling with global context; returns (B, 2C, 1) = [mean; std]."""

    def __init__(self, channels: int, attention_channels: int = 128, global_context: bool = True):
        super().__init__()
        self.global_context = global_context
        in_att = channels * 3 if global_context else channels
        self.tdnn = _TDNN(in_att, attention_channels, 1, 1)
        self.conv = _Conv1d(attention_channels, channels, 1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        b, _, t = x.shape
        if lengths is None:
            valid = torch.ones(b, 1, t, dtype=torch.bool, device=x.device)
            n = torch.full((b, 1, 1), float(t), dtype=x.dtype, device=x.device)
        else:
            valid = time_mask(lengths, t)[:, None, :]
            n = lengths.to(x.dtype)[:, None, None]
        x = torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))
        if self.global_context:
            mean, std = _weighted_stats(x, valid.to(x.dtype) / n)
            context = torch.cat(
                [x, mean.unsqueeze(-1).expand(-1, -1, t), std.unsqueeze(-1).expand(-1, -1, t)],
                dim=1,
            )
        else:
            context = x
        logits = self.conv(torch.tanh(self.tdnn(context)))
        logits = logits.masked_fill(~valid, float("-inf"))
        mean, std = _weighted_stats(x, torch.softmax(logits, dim=-1))
        return torch.cat((mean, std), dim=1).unsqueeze(-1)


class ECAPATDNN(nn.Module):
    """ECAPA-TDNN speaker embedder (3D-Speaker layout and defaults).

    ``forward(feats, lengths)``: feats (B, T, input_size) mean-normalised fbank, zero-padded;
    lengths (B,) int64 valid frames per row (None: all T; each must exceed the widest reflect
    pad, 4 frames by default). Returns (B, lin_neurons). Fixture arch ``ecapa1024`` is
    ``channels=[1024, 1024, 1024, 1024, 3072]``.
    """

    def __init__(
        self,
        input_size: int = 80,
        lin_neurons: int = 192,
        channels: Sequence[int] = (512, 512, 512, 512, 1536),
        kernel_sizes: Sequence[int] = (5, 3, 3, 3, 1),
        dilations: Sequence[int] = (1, 2, 3, 4, 1),
        attention_channels: int = 128,
        res2net_scale: int = 8,
        se_channels: int = 128,
        global_context: bool = True,
        groups: Sequence[int] = (1, 1, 1, 1, 1),
    ) -> None:
        super().__init__()
        if not len(channels) == len(kernel_sizes) == len(dilations) == len(groups):
            raise ValueError("channels, kernel_sizes, dilations and groups must have equal length")
        self.input_size = input_size
        self.embedding_size = lin_neurons
        self.max_pad = max(d * (k - 1) // 2 for k, d in zip(kernel_sizes, dilations, strict=True))
        self.blocks = nn.ModuleList(
            [_TDNN(input_size, channels[0], kernel_sizes[0], dilations[0], groups[0])]
        )
        for i in range(1, len(channels) - 1):
            self.blocks.append(
                _SERes2NetBlock(
                    channels[i - 1],
                    channels[i],
                    res2net_scale=res2net_scale,
                    se_channels=se_channels,
                    kernel_size=kernel_sizes[i],
                    dilation=dilations[i],
                    groups=groups[i],
                )
            )
        self.mfa = _TDNN(channels[-1], channels[-1], kernel_sizes[-1], dilations[-1], groups[-1])
        self.asp = _AttentiveStatsPool(channels[-1], attention_channels, global_context)
        self.asp_bn = _BatchNorm1d(channels[-1] * 2)
        self.fc = _Conv1d(channels[-1] * 2, lin_neurons, 1)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if lengths is not None:
            lengths = lengths.to(device=feats.device, dtype=torch.long)
            if self.max_pad and int(lengths.min()) <= self.max_pad:
                raise ValueError(f"every row needs more than {self.max_pad} valid frames")
        x = feats.transpose(1, 2)  # (B, C, T)
        outs = []
        for block in self.blocks:
            x = block(x, lengths)
            outs.append(x)
        x = self.mfa(torch.cat(outs[1:], dim=1), lengths)
        x = self.asp_bn(self.asp(x, lengths))
        return self.fc(x).squeeze(-1)
