"""ERes2NetV2 (3D-Speaker) with padding-aware batched inference.

The network treats the fbank as a one-channel image (B, 1, F, T): a 3x3 stem, four stages of
bottleneck Res2Net blocks (stages 3 and 4 fuse their sub-bands with attentional feature fusion,
AFF), a bottom-up fusion of stage 3 (down-sampled) into stage 4, temporal statistics pooling and
a linear embedding layer. State-dict keys follow 3D-Speaker's ``ERes2NetV2`` so its checkpoints
load with ``strict=True``.

Padding: time is the last axis throughout. Every tensor that a 3x3 convolution reads is
re-zeroed past its row's valid length (the time lengths halve, floor mode, at each stride-2
stage) and the statistics pooling counts valid frames only, so a zero-padded row gets the
embedding it would get alone. Tensors that feed 1x1 convolutions only are left alone: a valid
output frame of a 1x1 conv never reads a padded frame.

Example::

    >>> import torch
    >>> model = ERes2NetV2(m_channels=8, embedding_size=16).eval()
    >>> model(torch.randn(2, 50, 80), torch.tensor([50, 31])).shape
    torch.Size([2, 16])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from speaker_sim_cli.models.eres2net import AttentionalFusion, Res2Bottleneck
from speaker_sim_cli.models.masking import conv_out_lengths, masked_mean, time_mask

__all__ = ["ERes2NetV2", "Res2Bottleneck"]  # the block is ERes2Net's (shared)

_STD_EPS = 1e-8  # 3D-Speaker's statistics pooling: sqrt(var + 1e-8), var unbiased


def _masked_var(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Unbiased variance over the last axis (valid frames only), like ``torch.var``."""
    if lengths is None:
        return x.var(dim=-1)
    mean = masked_mean(x, lengths, keepdim=True)
    mask = time_mask(lengths, x.shape[-1]).to(x.dtype)
    mask = mask.view([x.shape[0]] + [1] * (x.dim() - 2) + [x.shape[-1]])
    sq = ((x - mean) * mask).pow(2).sum(dim=-1)
    n = lengths.to(x.dtype).view([x.shape[0]] + [1] * (x.dim() - 2))
    return sq / (n - 1)


class ERes2NetV2(nn.Module):
    """ERes2NetV2 speaker embedder (3D-Speaker layout and defaults).

    ``forward(feats, lengths)``: feats (B, T, feat_dim) mean-normalised fbank, zero-padded;
    lengths (B,) int64 valid frames per row (None: all T). Returns (B, embedding_size).
    Fixture archs: ``eres2netv2_192`` is the default; ``eres2netv2_w24s4ep4`` is
    ``baseWidth=24, scale=4, expansion=4``.
    """

    def __init__(
        self,
        feat_dim: int = 80,
        embedding_size: int = 192,
        m_channels: int = 64,
        num_blocks: Sequence[int] = (3, 4, 6, 3),
        baseWidth: int = 26,
        scale: int = 2,
        expansion: int = 2,
        pooling_func: str = "TSTP",
        two_emb_layer: bool = False,
    ) -> None:
        super().__init__()
        if pooling_func not in ("TAP", "TSDP", "TSTP"):
            raise ValueError(f"pooling_func must be TAP, TSDP or TSTP, got {pooling_func!r}")
        self.feat_dim = feat_dim
        self.embedding_size = embedding_size
        self.pooling_func = pooling_func
        self.two_emb_layer = two_emb_layer
        self._in_planes = m_channels
        stage_kw = {"base_width": baseWidth, "scale": scale, "expansion": expansion}

        self.conv1 = nn.Conv2d(1, m_channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(m_channels)
        self.layer1 = self._stage(m_channels, num_blocks[0], 1, False, stage_kw)
        self.layer2 = self._stage(m_channels * 2, num_blocks[1], 2, False, stage_kw)
        self.layer3 = self._stage(m_channels * 4, num_blocks[2], 2, True, stage_kw)
        self.layer4 = self._stage(m_channels * 8, num_blocks[3], 2, True, stage_kw)
        self.layer3_ds = nn.Conv2d(
            m_channels * 4 * expansion,
            m_channels * 8 * expansion,
            kernel_size=3,
            stride=2,
            padding=1,
            bias=False,
        )
        self.fuse34 = AttentionalFusion(m_channels * 8 * expansion)

        stats_dim = int(feat_dim / 8) * m_channels * 8 * expansion
        n_stats = 2 if pooling_func == "TSTP" else 1
        self.seg_1 = nn.Linear(stats_dim * n_stats, embedding_size)
        self.seg_bn_1: nn.Module = nn.Identity()
        self.seg_2: nn.Module = nn.Identity()
        if two_emb_layer:
            self.seg_bn_1 = nn.BatchNorm1d(embedding_size, affine=False)
            self.seg_2 = nn.Linear(embedding_size, embedding_size)

    def _stage(
        self, planes: int, n: int, stride: int, fuse: bool, kw: dict[str, int]
    ) -> nn.ModuleList:
        blocks = nn.ModuleList()
        for s in [stride] + [1] * (n - 1):
            blocks.append(Res2Bottleneck(self._in_planes, planes, s, fuse=fuse, **kw))
            self._in_planes = planes * kw["expansion"]
        return blocks

    @staticmethod
    def _run_stage(
        stage: nn.ModuleList, x: torch.Tensor, lengths: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        stride = int(getattr(stage[0], "stride", 1))
        if lengths is not None:
            lengths = conv_out_lengths(lengths, kernel=1, stride=stride)
        t_out = (x.shape[-1] - 1) // stride + 1
        mask = None if lengths is None else time_mask(lengths, t_out).to(x.dtype)[:, None, None]
        for block in stage:
            x = block(x, mask)
        return x, lengths

    def _pool(self, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        stats: list[torch.Tensor] = []
        if self.pooling_func in ("TAP", "TSTP"):
            stats.append(masked_mean(x, lengths).flatten(start_dim=1))
        if self.pooling_func in ("TSDP", "TSTP"):
            stats.append(torch.sqrt(_masked_var(x, lengths) + _STD_EPS).flatten(start_dim=1))
        return torch.cat(stats, dim=1)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        x = feats.transpose(1, 2).unsqueeze(1)  # (B, 1, F, T)
        mask = None
        if lengths is not None:
            lengths = lengths.to(device=feats.device, dtype=torch.long)
            mask = time_mask(lengths, x.shape[-1]).to(x.dtype)[:, None, None]
        if mask is not None:
            x = x * mask  # the stem's 3x3 conv must see zeros, whatever the caller padded with
        # The stem output feeds 1x1 convs only: no re-zeroing needed.
        x = F.relu(self.bn1(self.conv1(x)))
        out1, len1 = self._run_stage(self.layer1, x, lengths)
        out2, len2 = self._run_stage(self.layer2, out1, len1)
        out3, len3 = self._run_stage(self.layer3, out2, len2)
        out4, len4 = self._run_stage(self.layer4, out3, len3)
        # layer3_ds (3x3, stride 2, pad 1) reads out3's padded frames: zero them first. It gives
        # the same time lengths as the 1x1 stride-2 path, so fusion lines up with len4.
        if len3 is not None:
            out3 = out3 * time_mask(len3, out3.shape[-1]).to(out3.dtype)[:, None, None]
        fused = self.fuse34(out4, self.layer3_ds(out3))
        emb = self.seg_1(self._pool(fused, len4))
        if self.two_emb_layer:
            emb = self.seg_2(self.seg_bn_1(F.relu(emb)))
        return emb
