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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as activation_checkpoint
from torch import nn

from .masking import apply_mask, conv_out_lengths, masked_mean, masked_std

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


def _segment_means(x: torch.Tensor, lengths: torch.Tensor | None, seg_len: int) -> torch.Tensor:
    """Average of ``x`` (B, C, T) over consecutive segments of ``seg_len`` frames -> (B, C, S).

    S = ceil(T / seg_len). Each segment is divided by the number of valid frames it holds, as
    ``avg_pool1d(kernel=stride=seg_len, ceil_mode=True)`` does for the last partial segment of an
    unpadded row. ``x`` must already be zero past each row's length. Segments that hold no valid
    frame come out as 0.
    """
    batch, channels, frames = x.shape
    n_seg = -(-frames // seg_len)
    if n_seg * seg_len != frames:
        x = F.pad(x, (0, n_seg * seg_len - frames))
    sums = x.reshape(batch, channels, n_seg, seg_len).sum(dim=-1)
    starts = torch.arange(n_seg, device=x.device) * seg_len
    valid = frames if lengths is None else lengths[:, None]
    counts = (torch.as_tensor(valid, device=x.device) - starts).clamp(0, seg_len)
    counts = counts.expand(batch, n_seg).clamp_min(1).to(x.dtype)
    return sums / counts[:, None, :]


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

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        """(B, C, F, T) zero past ``lengths`` -> (B, C', F', T), zero past ``lengths``."""
        h = apply_mask(F.relu(self.bn1(self.conv1(x))), lengths)
        h = self.bn2(self.conv2(h)) + self.shortcut(x)
        return apply_mask(F.relu(h), lengths)


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

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        """(B, F, T) zero past ``lengths`` -> (B, C, T); padded frames are NOT re-zeroed."""
        h = apply_mask(F.relu(self.bn1(self.conv1(x.unsqueeze(1)))), lengths)
        for block in (*self.layer1, *self.layer2):
            h = block(h, lengths)
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

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        """(B, C, T) -> (B, C', T'); input frames past ``lengths`` are zeroed first."""
        return self.nonlinear(self.linear(apply_mask(x, lengths)))


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

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        """(B, C, T) zero past ``lengths`` -> (B, C_out, T)."""
        frames = x.shape[-1]
        local = self.linear_local(x)
        seg = _segment_means(x, lengths, self.seg_len)  # (B, C, S)
        # The gate is constant within a segment, so it is computed once per segment (the
        # reference computes it per frame from the expanded context: same values, more work).
        if lengths is None:
            utt = x.mean(dim=-1, keepdim=True)
        else:
            utt = masked_mean(x, lengths, keepdim=True)
        gate = torch.sigmoid(self.linear2(F.relu(self.linear1(utt + seg))))
        gate = gate.repeat_interleave(self.seg_len, dim=-1)[..., :frames]
        return local * gate


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

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        if self.training and self.memory_efficient and x.requires_grad:
            h = activation_checkpoint.checkpoint(self._bottleneck, x, use_reentrant=False)
        else:
            h = self._bottleneck(x)
        return self.cam_layer(apply_mask(self.nonlinear2(h), lengths), lengths)


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

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        for layer in self.children():
            x = torch.cat([x, layer(x, lengths)], dim=1)
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

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        """(B, C, T) from the head -> (B, E)."""
        h = self.tdnn(x, lengths)
        if lengths is not None:
            lengths = self.tdnn.out_lengths(lengths)
        for i in range(1, self.n_stages + 1):
            h = self.get_submodule(f"transit{i}")(self.get_submodule(f"block{i}")(h, lengths))
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
        if lengths is not None:
            if lengths.shape != feats.shape[:1]:
                raise ValueError(
                    f"lengths must have shape ({feats.shape[0]},), got {tuple(lengths.shape)}"
                )
            lengths = lengths.to(device=feats.device, dtype=torch.long)
        x = apply_mask(feats.transpose(1, 2), lengths)  # (B, F, T)
        return self.xvector(self.head(x, lengths), lengths)
