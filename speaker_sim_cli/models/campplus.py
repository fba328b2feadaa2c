"""CAM++ speaker embedding network (3D-Speaker ``CAMPPlus``), batch-invariant under padding.

Written from the CAM++ paper (Wang et al., Interspeech 2023) and the layout of 3D-Speaker's
checkpoints: the state-dict keys match ``speakerlab.models.campplus.DTDNN.CAMPPlus`` exactly,
so official weights load with ``strict=True``.

Structure, for (B, T, 80) mean-normalised fbank:

* ``head``: a small 2-D ResNet front end (frequency stride 8 in total, time stride 1) whose
  (channels x frequency) map is flattened to 32 * 10 = 320 channels.
* ``xvector.tdnn``: a kernel-5 TDNN with time stride 2.
* three densely connected blocks of context-aware-masking TDNN layers (12, 24, 16 layers,
  growth 32, dilations 1, 2, 2), each followed by a halving 1x1 transition.
* mean + unbiased std statistics pooling and a 1x1 projection with a non-affine batch norm.

Padding: every row is zero-padded to the batch length T and ``lengths`` holds its valid frames.
Pointwise layers (1x1 convs, batch norm in eval mode, ReLU) never mix frames, so what they leave
in padded frames cannot reach valid ones. Before every operation that mixes time (convolutions
with a kernel longer than 1, segment/global pooling) the padded frames are zeroed again, which is
exactly what the convolution's own zero padding gives on the unpadded row, and poolings only
count valid frames. A row's embedding is then the same whatever batch it sits in.

The frame masks and the segment bookkeeping are built once per batch (:class:`_Frames`, one
at the input resolution and one after the stride-2 TDNN) and shared by every layer; frame counts
stay int64 / float32 whatever the activations' dtype. Shapes are derived with tensor ops only
(no Python branch on a size, no host read), so ``torch.export`` / ``torch.jit.trace`` keep the
batch and time axes dynamic and the graph exports to ONNX.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as activation_checkpoint
from torch import nn

from .masking import conv_out_lengths, masked_mean, masked_std

__all__ = ["CAMPPlus"]

SEGMENT_FRAMES = 100
"""Segment length (frames, after the stride-2 TDNN) of the context-aware masking pooling."""


def _nonlinear(config_str: str, channels: int) -> nn.Sequential:
    """Pointwise stack named as 3D-Speaker names it, e.g. ``"batchnorm-relu"``.

    Parts: ``batchnorm`` (affine), ``batchnorm_`` (no affine), ``relu``, ``prelu``.
    """
    stack = nn.Sequential()
    for part in config_str.split("-"):
        if part == "batchnorm":
            stack.add_module("batchnorm", nn.BatchNorm1d(channels))
        elif part == "batchnorm_":
            stack.add_module("batchnorm", nn.BatchNorm1d(channels, affine=False))
        elif part == "relu":
            stack.add_module("relu", nn.ReLU())
        elif part == "prelu":
            stack.add_module("prelu", nn.PReLU(channels))
        else:
            raise ValueError(f"unknown nonlinearity {part!r} in config_str {config_str!r}")
    return stack


class _Frames(NamedTuple):
    """Per-batch time bookkeeping at one resolution, built once and shared by every layer.

    ``lengths``: (B,) int64 valid frames, None when every row fills the T frames.
    ``pad``: (B, 1, T) bool, True on padded frames (None without lengths).
    ``counts``: (B, 1, 1) float32 valid frames (the utterance-mean divisor).
    ``seg_counts``: (B, 1, S) float32 valid frames per segment of ``seg_len``, at least 1.
    ``seg_index``: (T,) int64 segment of each frame (expands per-segment values to frames).
    """

    lengths: torch.Tensor | None
    pad: torch.Tensor | None
    counts: torch.Tensor
    seg_counts: torch.Tensor
    seg_index: torch.Tensor


def _frames(x: torch.Tensor, lengths: torch.Tensor | None, seg_len: int) -> _Frames:
    """:class:`_Frames` for ``x`` (B, ..., T) whose rows hold ``lengths`` valid frames."""
    t = torch.arange(x.shape[-1], device=x.device)
    seg_index = torch.div(t, seg_len, rounding_mode="floor")
    starts = torch.arange(0, x.shape[-1], seg_len, device=x.device)  # (S,) first frame
    if lengths is None:
        valid = torch.full(x.shape[:1], x.shape[-1], dtype=torch.long, device=x.device)
        pad = None
    else:
        valid = lengths
        pad = (t[None, :] >= lengths[:, None])[:, None, :]
    seg_counts = (valid[:, None] - starts[None, :]).clamp(1, seg_len)
    counts = valid.to(torch.float32)[:, None, None]
    return _Frames(lengths, pad, counts, seg_counts.to(torch.float32)[:, None, :], seg_index)


def _zero_pad(x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
    """``x`` (B, ..., T) with the frames where ``pad`` (B, 1, T) is True set to 0."""
    if pad is None:
        return x
    if x.dim() == 4:
        pad = pad[:, :, None, :]
    return x.masked_fill(pad, 0.0)


def _segment_sums(x: torch.Tensor, seg_len: int) -> torch.Tensor:
    """Sums of ``x`` (B, C, T) over consecutive segments of ``seg_len`` frames -> (B, C, S),
    S = ceil(T / seg_len) (the last segment zero-filled)."""
    frames = x.shape[-1]
    x = F.pad(x, (0, (seg_len - frames % seg_len) % seg_len))
    return x.reshape(x.shape[0], x.shape[1], -1, seg_len).sum(dim=-1)


def _segment_means(x: torch.Tensor, lengths: torch.Tensor | None, seg_len: int) -> torch.Tensor:
    """Average of ``x`` (B, C, T) over consecutive segments of ``seg_len`` frames -> (B, C, S).

    S = ceil(T / seg_len). Each segment is divided by the number of valid frames it holds, as
    ``avg_pool1d(kernel=stride=seg_len, ceil_mode=True)`` does for the last partial segment of an
    unpadded row. ``x`` must already be zero past each row's length. Segments that hold no valid
    frame come out as 0. Counts divide in float32 (exact), the result takes ``x``'s dtype.
    """
    seg_counts = _frames(x, lengths, seg_len).seg_counts
    return (_segment_sums(x, seg_len) / seg_counts).to(x.dtype)


class _ResBlock2d(nn.Module):
    """Basic residual block of the 2-D head; ``stride`` strides frequency only."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            in_planes, planes, kernel_size=3, stride=(stride, 1), padding=1, bias=False
        )
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=(stride, 1), bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        """(B, C, F, T) zero where ``pad`` (B, 1, T) -> (B, C', F', T), zero there too."""
        h = _zero_pad(F.relu(self.bn1(self.conv1(x))), pad)
        h = self.bn2(self.conv2(h)) + self.shortcut(x)
        return _zero_pad(F.relu(h), pad)


class _FrontEnd2d(nn.Module):
    """2-D convolutional front end (3D-Speaker's FCM): (B, F, T) -> (B, m * F/8, T)."""

    def __init__(self, feat_dim: int = 80, m_channels: int = 32, num_blocks: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, m_channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(m_channels)
        self.layer1 = nn.ModuleList(
            _ResBlock2d(m_channels, m_channels, 2 if i == 0 else 1) for i in range(num_blocks)
        )
        self.layer2 = nn.ModuleList(
            _ResBlock2d(m_channels, m_channels, 2 if i == 0 else 1) for i in range(num_blocks)
        )
        self.conv2 = nn.Conv2d(
            m_channels, m_channels, kernel_size=3, stride=(2, 1), padding=1, bias=False
        )
        self.bn2 = nn.BatchNorm2d(m_channels)
        self.out_channels = m_channels * (feat_dim // 8)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        """(B, F, T) zero where ``pad`` (B, 1, T) -> (B, C, T); padded frames NOT re-zeroed."""
        h = _zero_pad(F.relu(self.bn1(self.conv1(x.unsqueeze(1)))), pad)
        for block in (*self.layer1, *self.layer2):
            h = block(h, pad)
        h = F.relu(self.bn2(self.conv2(h)))
        return h.flatten(1, 2)


class _TDNN(nn.Module):
    """Conv1d (same padding for odd kernels) followed by a pointwise nonlinearity stack."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        config_str: str = "batchnorm-relu",
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.kernel_size = kernel_size
        self.stride = stride
        self.dilation = dilation
        self.padding = (kernel_size - 1) // 2 * dilation
        self.linear = nn.Conv1d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=self.padding,
            dilation=dilation,
            bias=False,
        )
        self.nonlinear = _nonlinear(config_str, out_channels)

    def out_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return conv_out_lengths(lengths, self.kernel_size, self.stride, self.padding, self.dilation)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        """(B, C, T) -> (B, C', T'); input frames where ``pad`` (B, 1, T) are zeroed first."""
        return self.nonlinear(self.linear(_zero_pad(x, pad)))


class _ContextMask(nn.Module):
    """Context-aware masking: a local conv gated by utterance- and segment-level context."""

    def __init__(
        self,
        bn_channels: int,
        out_channels: int,
        kernel_size: int,
        dilation: int,
        reduction: int = 2,
        seg_len: int = SEGMENT_FRAMES,
    ) -> None:
        super().__init__()
        self.seg_len = seg_len
        self.linear_local = nn.Conv1d(
            bn_channels,
            out_channels,
            kernel_size,
            padding=(kernel_size - 1) // 2 * dilation,
            dilation=dilation,
            bias=False,
        )
        self.linear1 = nn.Conv1d(bn_channels, bn_channels // reduction, 1)
        self.linear2 = nn.Conv1d(bn_channels // reduction, out_channels, 1)

    def forward(self, x: torch.Tensor, frames: _Frames) -> torch.Tensor:
        """(B, C, T) zero on padded frames -> (B, C_out, T); ``frames`` built for seg_len."""
        local = self.linear_local(x)
        # Sums and counts meet in float32: counts are exact whatever the activations' dtype.
        seg = (_segment_sums(x, self.seg_len) / frames.seg_counts).to(x.dtype)  # (B, C, S)
        utt = (x.sum(dim=-1, keepdim=True, dtype=torch.float32) / frames.counts).to(x.dtype)
        # The gate is constant within a segment, so it is computed once per segment (the
        # reference computes it per frame from the expanded context: same values, more work).
        gate = torch.sigmoid(self.linear2(F.relu(self.linear1(utt + seg))))
        return local * gate.index_select(-1, frames.seg_index)


class _DenseTDNNLayer(nn.Module):
    """Bottleneck (BN-ReLU-1x1-BN-ReLU) followed by a context-aware-masking TDNN."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        bn_channels: int,
        kernel_size: int,
        dilation: int = 1,
        config_str: str = "batchnorm-relu",
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.memory_efficient = memory_efficient
        self.nonlinear1 = _nonlinear(config_str, in_channels)
        self.linear1 = nn.Conv1d(in_channels, bn_channels, 1, bias=False)
        self.nonlinear2 = _nonlinear(config_str, bn_channels)
        self.cam_layer = _ContextMask(bn_channels, out_channels, kernel_size, dilation)

    def _bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear1(self.nonlinear1(x))

    def forward(self, x: torch.Tensor, frames: _Frames) -> torch.Tensor:
        if self.training and self.memory_efficient and x.requires_grad:
            h = activation_checkpoint.checkpoint(self._bottleneck, x, use_reentrant=False)
        else:
            h = self._bottleneck(x)
        return self.cam_layer(_zero_pad(self.nonlinear2(h), frames.pad), frames)


class _DenseBlock(nn.Module):
    """Densely connected stack: each layer's output is concatenated to its input."""

    def __init__(
        self,
        num_layers: int,
        in_channels: int,
        growth_rate: int,
        bn_channels: int,
        kernel_size: int,
        dilation: int,
        config_str: str,
        memory_efficient: bool,
    ) -> None:
        super().__init__()
        for i in range(num_layers):
            self.add_module(
                f"tdnnd{i + 1}",
                _DenseTDNNLayer(
                    in_channels + i * growth_rate,
                    growth_rate,
                    bn_channels,
                    kernel_size,
                    dilation=dilation,
                    config_str=config_str,
                    memory_efficient=memory_efficient,
                ),
            )

    def forward(self, x: torch.Tensor, frames: _Frames) -> torch.Tensor:
        for layer in self.children():
            x = torch.cat([x, layer(x, frames)], dim=1)
        return x


class _Transit(nn.Module):
    """Pointwise nonlinearity then a 1x1 conv (channel reduction between dense blocks)."""

    def __init__(self, in_channels: int, out_channels: int, config_str: str) -> None:
        super().__init__()
        self.nonlinear = _nonlinear(config_str, in_channels)
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.nonlinear(x))


class _Projection(nn.Module):
    """Pooled statistics (B, C) -> embedding (B, E): 1x1 conv then a pointwise stack."""

    def __init__(self, in_channels: int, out_channels: int, config_str: str) -> None:
        super().__init__()
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)
        self.nonlinear = _nonlinear(config_str, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(self.linear(x.unsqueeze(-1)).squeeze(-1))


class _XVector(nn.Module):
    """TDNN trunk after the 2-D head; submodules registered in 3D-Speaker's order and names."""

    def __init__(
        self,
        in_channels: int,
        embedding_size: int,
        growth_rate: int,
        bn_size: int,
        init_channels: int,
        config_str: str,
        memory_efficient: bool,
        block_layers: tuple[int, ...] = (12, 24, 16),
        block_kernels: tuple[int, ...] = (3, 3, 3),
        block_dilations: tuple[int, ...] = (1, 2, 2),
    ) -> None:
        super().__init__()
        self.tdnn = _TDNN(in_channels, init_channels, 5, stride=2, config_str=config_str)
        channels = init_channels
        self.n_stages = len(block_layers)
        for i, (n_layers, kernel, dilation) in enumerate(
            zip(block_layers, block_kernels, block_dilations, strict=True)
        ):
            block = _DenseBlock(
                n_layers,
                channels,
                growth_rate,
                bn_size * growth_rate,
                kernel,
                dilation,
                config_str,
                memory_efficient,
            )
            channels += n_layers * growth_rate
            transit = _Transit(channels, channels // 2, config_str)
            channels //= 2
            self.add_module(f"block{i + 1}", block)
            self.add_module(f"transit{i + 1}", transit)
        self.out_nonlinear = _nonlinear(config_str, channels)
        self.dense = _Projection(channels * 2, embedding_size, "batchnorm_")

    def forward(
        self, x: torch.Tensor, lengths: torch.Tensor | None, pad: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, C, T) from the head -> (B, E); ``pad`` (B, 1, T): True on the head's padded
        frames (built from ``lengths`` when None)."""
        if pad is None and lengths is not None:
            pad = (torch.arange(x.shape[-1], device=x.device) >= lengths[:, None])[:, None, :]
        h = self.tdnn(x, pad)
        if lengths is not None:
            lengths = self.tdnn.out_lengths(lengths)
        # One set of masks and segment counts for every layer after the stride-2 TDNN.
        frames = _frames(h, lengths, SEGMENT_FRAMES)
        for i in range(1, self.n_stages + 1):
            h = self.get_submodule(f"transit{i}")(self.get_submodule(f"block{i}")(h, frames))
        h = self.out_nonlinear(h)
        stats = torch.cat([masked_mean(h, lengths), masked_std(h, lengths, unbiased=True)], dim=-1)
        return self.dense(stats)


class CAMPPlus(nn.Module):
    """CAM++ speaker embedding extractor.

    Args:
        feat_dim: fbank bins (80 for every official checkpoint; must be a multiple of 8).
        embedding_size: output dimension (192 for the zh/en checkpoints, 512 for VoxCeleb).
        growth_rate, bn_size, init_channels, config_str, memory_efficient: as in 3D-Speaker
            (defaults match it). ``memory_efficient`` only affects training (activation
            checkpointing of the dense-layer bottlenecks).

    ``forward(feats, lengths)``: feats (B, T, feat_dim) mean-normalised fbank, zero-padded past
    each row's ``lengths`` (B,) int64 valid frames (None: every row is T frames long). Returns
    (B, embedding_size) unnormalised embeddings; each row equals the row's embedding alone.

    Example:
        >>> model = CAMPPlus().eval()
        >>> feats = torch.zeros(2, 120, 80)
        >>> model(feats, torch.tensor([120, 90])).shape
        torch.Size([2, 192])
    """

    def __init__(
        self,
        feat_dim: int = 80,
        embedding_size: int = 192,
        growth_rate: int = 32,
        bn_size: int = 4,
        init_channels: int = 128,
        config_str: str = "batchnorm-relu",
        memory_efficient: bool = True,
    ) -> None:
        super().__init__()
        if feat_dim % 8 != 0:
            raise ValueError(f"feat_dim must be a multiple of 8, got {feat_dim}")
        self.feat_dim = feat_dim
        self.embedding_size = embedding_size
        self.head = _FrontEnd2d(feat_dim=feat_dim)
        self.xvector = _XVector(
            self.head.out_channels,
            embedding_size,
            growth_rate,
            bn_size,
            init_channels,
            config_str,
            memory_efficient,
        )

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, feat_dim) fbank [+ (B,) valid frames] -> (B, embedding_size)."""
        if feats.dim() != 3 or feats.shape[-1] != self.feat_dim:
            raise ValueError(f"expected feats (B, T, {self.feat_dim}), got {tuple(feats.shape)}")
        pad = None
        if lengths is not None:
            if lengths.shape != feats.shape[:1]:
                raise ValueError(
                    f"lengths must have shape ({feats.shape[0]},), got {tuple(lengths.shape)}"
                )
            lengths = lengths.to(device=feats.device, dtype=torch.long)
            pad = (torch.arange(feats.shape[1], device=feats.device) >= lengths[:, None])[:, None]
        x = _zero_pad(feats.transpose(1, 2), pad)  # (B, F, T)
        return self.xvector(self.head(x, pad), lengths, pad)
