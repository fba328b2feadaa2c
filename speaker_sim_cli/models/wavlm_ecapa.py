"""WavLM + ECAPA-TDNN (UniSpeech's ``ECAPA_TDNN_SMALL``): the "SIM" model of TTS evaluation.

seed-tts-eval, UltraEval-Audio's ``Simo``, F5-TTS and CosyVoice score speaker similarity with
``ECAPA_TDNN_SMALL(feat_dim=1024, feat_type='wavlm_large')`` and ``wavlm_large_finetune.pth``.
Written from ``specs/wavlm_ecapa_sim.md``; keys follow the checkpoint (``feature_weight``,
``feature_extract.model.*``, ``layer1..4``, ``conv``, ``pooling``, ``bn``, ``linear``).

Head: softmax-weighted sum of WavLM's hidden states, + 1e-6, instance norm over time; every
block Conv -> ReLU -> BatchNorm; three SE-Res2Blocks (dilation 2/3/4, scale 8) chained with
identity residuals; 1x1 conv over their concatenation; attentive statistics pooling; BN;
Linear -> 256-d embedding (not normalised).

Padding: the reference runs one utterance at a time. Here a zero-padded row gives its lone
embedding: WavLM masks keys and the positional conv's input (:mod:`.wavlm`); the instance norm,
the SE means and the attentive pooling count valid frames only; every convolution wider than
1 reads a row whose padded frames were re-zeroed, as its own zero padding would be.

Example::

    >>> import torch
    >>> m = WavLMECAPA(**TINY).eval()
    >>> m(torch.randn(2, 8000), torch.tensor([8000, 5000])).shape
    torch.Size([2, 256])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .masking import apply_mask, masked_mean, time_mask
from .wavlm import LARGE_CONV_LAYERS, WavLM

__all__ = ["MIN_SAMPLES", "TINY", "WavLMECAPA"]

#: The shortest input WavLM's conv feature extractor makes a frame of (25 ms at 16 kHz).
MIN_SAMPLES = 400

#: The fixtures' tiny geometry (fixtures/wavlm_sim/sim_tiny.npz): same code paths, 6 M params.
TINY: dict[str, Any] = {
    "conv_layers": ((32, 10, 5),) + ((32, 3, 2),) * 4 + ((32, 2, 2),) * 2,
    "dim": 64,
    "ffn": 128,
    "heads": 4,
    "layers": 2,
    "conv_pos": 16,
    "conv_pos_groups": 4,
}


class _ConvReluBn(nn.Module):
    """Conv1d -> ReLU -> BatchNorm1d; the input is re-zeroed on padded frames when k > 1."""

    def __init__(
        self, c_in: int, c_out: int, kernel: int = 1, padding: int = 0, dilation: int = 1
    ) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, padding=padding, dilation=dilation)
        self.bn = nn.BatchNorm1d(c_out)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        if self.conv.kernel_size[0] > 1:
            x = apply_mask(x, lengths)
        return self.bn(F.relu(self.conv(x)))


class _Res2ConvReluBn(nn.Module):
    """Res2Net: ``scale`` chunks; chunk i (plus the previous output) -> conv -> ReLU -> BN."""

    def __init__(self, channels: int, kernel: int, dilation: int, scale: int) -> None:
        super().__init__()
        self.width = channels // scale
        self.nums = scale - 1 if scale > 1 else 1
        pad = dilation * (kernel - 1) // 2
        self.convs = nn.ModuleList(
            nn.Conv1d(self.width, self.width, kernel, padding=pad, dilation=dilation)
            for _ in range(self.nums)
        )
        self.bns = nn.ModuleList(nn.BatchNorm1d(self.width) for _ in range(self.nums))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        chunks = torch.split(x, self.width, dim=1)
        outs: list[torch.Tensor] = []
        sp = chunks[0]
        for i in range(self.nums):
            if i > 0:
                sp = sp + chunks[i]
            sp = self.bns[i](F.relu(self.convs[i](apply_mask(sp, lengths))))
            outs.append(sp)
        if self.nums < len(chunks):
            outs.append(chunks[self.nums])
        return torch.cat(outs, dim=1)


class _SEConnect(nn.Module):
    def __init__(self, channels: int, bottleneck: int = 128) -> None:
        super().__init__()
        self.linear1 = nn.Linear(channels, bottleneck)
        self.linear2 = nn.Linear(bottleneck, channels)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        s = torch.sigmoid(self.linear2(F.relu(self.linear1(masked_mean(x, lengths)))))
        return x * s[..., None]


class _SERes2Block(nn.Module):
    def __init__(self, channels: int, kernel: int, dilation: int, scale: int) -> None:
        super().__init__()
        self.Conv1dReluBn1 = _ConvReluBn(channels, channels)
        self.Res2Conv1dReluBn = _Res2ConvReluBn(channels, kernel, dilation, scale)
        self.Conv1dReluBn2 = _ConvReluBn(channels, channels)
        self.SE_Connect = _SEConnect(channels)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        y = self.Conv1dReluBn1(x, lengths)
        y = self.Res2Conv1dReluBn(y, lengths)
        y = self.Conv1dReluBn2(y, lengths)
        return self.SE_Connect(y, lengths) + x


class _AttentiveStatsPool(nn.Module):
    """alpha = softmax_t(W2 tanh(W1 x)); mean and sqrt(clamp(E[x^2] - mean^2, 1e-9))."""

    def __init__(self, dim: int, attention: int = 128) -> None:
        super().__init__()
        self.linear1 = nn.Conv1d(dim, attention, 1)
        self.linear2 = nn.Conv1d(attention, dim, 1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        logits = self.linear2(torch.tanh(self.linear1(x)))
        if lengths is not None:
            x = apply_mask(x, lengths)
            valid = time_mask(lengths, x.shape[-1])[:, None, :]
            logits = logits.masked_fill(~valid, float("-inf"))
        alpha = torch.softmax(logits, dim=-1)
        mean = (alpha * x).sum(dim=-1)
        var = (alpha * x.square()).sum(dim=-1) - mean.square()
        return torch.cat([mean, var.clamp(min=1e-9).sqrt()], dim=1)


def _instance_norm(x: torch.Tensor, lengths: torch.Tensor | None, eps: float = 1e-5):
    """InstanceNorm1d without affine: per channel over each row's valid frames (biased var)."""
    if lengths is None:
        return F.instance_norm(x, eps=eps)
    mean = masked_mean(x, lengths, keepdim=True)
    var = masked_mean((x - mean).square(), lengths, keepdim=True)
    return apply_mask((x - mean) * torch.rsqrt(var + eps), lengths)


class _Upstream(nn.Module):
    """Holds the backbone under ``feature_extract.model`` as the checkpoint names it."""

    def __init__(self, model: WavLM) -> None:
        super().__init__()
        self.model = model


class WavLMECAPA(nn.Module):
    """WavLM backbone + ECAPA_TDNN_SMALL head. Defaults: WavLM-Large, 256-d embeddings.

    ``forward(wave, lengths)``: wave (B, N) normalised 16 kHz waveform (the ``waveform`` front
    end's output; (B, N, 1) also accepted), zero-padded; lengths (B,) int64 valid samples
    (None: all N). Returns (B, emb_dim); a row shorter than 400 samples (25 ms) is NaN.
    """

    #: In ``wavlm_large_finetune.pth`` beside the model: the training classifier (AAM-softmax
    #: projection), unused for embeddings; the only key a strict load lets through.
    ignored_checkpoint_keys: ClassVar[tuple[str, ...]] = ("loss_calculator.projection.weight",)

    def __init__(
        self,
        conv_layers: Sequence[tuple[int, int, int]] = LARGE_CONV_LAYERS,
        dim: int = 1024,
        ffn: int = 4096,
        heads: int = 16,
        layers: int = 24,
        conv_pos: int = 128,
        conv_pos_groups: int = 16,
        emb_dim: int = 256,
        channels: int = 512,
    ) -> None:
        super().__init__()
        self.embedding_size = emb_dim
        #: Shortest row (samples: the waveform front end's frames) WavLM makes a frame of.
        self.min_frames = MIN_SAMPLES
        wavlm = WavLM(conv_layers, dim, ffn, heads, layers, conv_pos, conv_pos_groups)
        self.feature_extract = _Upstream(wavlm)
        self.feature_weight = nn.Parameter(torch.zeros(layers + 1))
        self.layer1 = _ConvReluBn(dim, channels, kernel=5, padding=2)
        self.layer2 = _SERes2Block(channels, 3, 2, 8)
        self.layer3 = _SERes2Block(channels, 3, 3, 8)
        self.layer4 = _SERes2Block(channels, 3, 4, 8)
        self.conv = nn.Conv1d(channels * 3, 1536, 1)
        self.pooling = _AttentiveStatsPool(1536, 128)
        self.bn = nn.BatchNorm1d(1536 * 2)
        self.linear = nn.Linear(1536 * 2, emb_dim)

    @property
    def wavlm(self) -> WavLM:
        return self.feature_extract.model

    def features(
        self, wave: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Instance-normed weighted sum of the hidden states (B, D, T') and frames (B,)."""
        if wave.dim() == 3:
            wave = wave.squeeze(-1)
        frames = None
        if lengths is not None:
            lengths = lengths.to(device=wave.device, dtype=torch.long)
            frames = self.wavlm.frame_lengths(lengths)  # 0 for a row under 400 samples
        weights = torch.softmax(self.feature_weight, dim=-1)
        acc: torch.Tensor | None = None
        for w, h in zip(weights, self.wavlm.hidden_states(wave, lengths), strict=True):
            acc = w * h if acc is None else acc + w * h
        assert acc is not None
        x = acc.transpose(1, 2) + 1e-6
        return _instance_norm(x, frames), frames

    def pooled(self, x: torch.Tensor, frames: torch.Tensor | None) -> torch.Tensor:
        """Head up to the pooling's BatchNorm: (B, D, T') -> (B, 3072)."""
        out1 = self.layer1(x, frames)
        out2 = self.layer2(out1, frames)
        out3 = self.layer3(out2, frames)
        out4 = self.layer4(out3, frames)
        out = F.relu(self.conv(torch.cat([out2, out3, out4], dim=1)))
        return self.bn(self.pooling(out, frames))

    def forward(self, wave: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if wave.dim() == 3:
            wave = wave.squeeze(-1)
        short = None
        if lengths is not None:
            # WavLM has no frame for a row under 400 samples: that row comes out NaN (which the
            # engine reports as failed; it also fails such rows itself, by min_frames, before
            # the batch) while the other rows are embedded as usual. Decided with tensor ops,
            # no value read back from the device.
            lengths = lengths.to(device=wave.device, dtype=torch.long)
            short = lengths < MIN_SAMPLES
            if wave.shape[-1] < MIN_SAMPLES:  # a shape, not a value: room for one frame
                wave = F.pad(wave, (0, MIN_SAMPLES - wave.shape[-1]))
        x, frames = self.features(wave, lengths)
        emb = self.linear(self.pooled(x, frames))
        if short is None:
            return emb
        return emb.masked_fill(short[:, None], float("nan"))
