"""WavLM (Large by default) as s3prl runs it, with exact padded batching.

Written from the WavLM paper and ``specs/wavlm_ecapa_sim.md``; parameter names follow the
UniSpeech/fairseq checkpoint (``feature_extractor.conv_layers.i.0`` / ``.i.2.1``,
``post_extract_proj``, ``encoder.pos_conv.0.weight_g|weight_v``, ``self_attn.grep_linear``,
...), so ``wavlm_large_finetune.pth`` loads strictly.

Pipeline on a (B, N) normalised waveform with valid lengths (B,):

- conv feature extractor (layer-norm mode): 7 bias-free Conv1d, each followed by LayerNorm
  over channels and exact GELU; ``T' = floor((n - 400) / 320) + 1`` per row. These convolutions
  have no padding and a per-frame norm, so a row's valid frames read its valid samples only;
- LayerNorm(C) -> Linear(C -> D); padded frames zeroed;
- positional conv: weight-normed grouped Conv1d (kernel K, pad K/2, last frame dropped), GELU,
  added. Padded frames are zero on its input, as they would be past the end of a lone row;
- pre-LN transformer layers with the gated relative position bias of layer 0 and a key
  padding mask; final LayerNorm on the last layer's output.

:meth:`WavLM.hidden_states` yields the ``layers + 1`` hidden states s3prl returns: the input of
layer 0, the raw outputs of layers 0..L-2, and the final-LayerNormed output of layer L-1.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .masking import conv_out_lengths, time_mask

__all__ = ["WavLM", "relative_position_buckets"]

LARGE_CONV_LAYERS: tuple[tuple[int, int, int], ...] = (
    ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2
)


def relative_position_buckets(
    size: int, num_buckets: int = 320, max_distance: int = 800, device: torch.device | None = None
) -> torch.Tensor:
    """(size, size) int64 bucket of ``key - query`` (bidirectional), WavLM's layout.

    Half the buckets per direction (positive offsets shifted by ``num_buckets // 2``); offsets
    below a quarter of the buckets map to themselves, larger ones logarithmically up to
    ``max_distance``, capped at the last bucket. The log is taken in float32, as the reference.
    """
    pos = torch.arange(size, device=device)
    rel = pos[None, :] - pos[:, None]
    half = num_buckets // 2
    exact = half // 2
    out = (rel > 0).to(torch.long) * half
    rel = rel.abs()
    # float32 throughout, in the reference's operation order: the truncation to int depends
    # on it at a few offsets.
    large = exact + (
        torch.log(rel.float() / exact) / math.log(max_distance / exact) * (half - exact)
    ).to(torch.long)
    large = large.clamp_max(half - 1)
    return out + torch.where(rel < exact, rel, large)


class _ConvLayer(nn.Sequential):
    """Conv1d (no bias) -> LayerNorm over channels -> GELU.

    Children follow the checkpoint's layout ``(conv, dropout, (transpose, LayerNorm,
    transpose), GELU)``, so the keys are ``0.weight`` and ``2.1.weight|bias``.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int) -> None:
        super().__init__(
            nn.Conv1d(c_in, c_out, kernel, stride=stride, bias=False),
            nn.Identity(),
            nn.Sequential(nn.Identity(), nn.LayerNorm(c_out, eps=1e-5)),
            nn.GELU(),
        )
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self[0](x)
        norm = cast(nn.Sequential, self[2])[1]
        x = norm(x.transpose(1, 2)).transpose(1, 2)
        return F.gelu(x)


class _PosConv(nn.Module):
    """Weight-normed grouped Conv1d (norm over the kernel axis, ``weight_g`` 1 x 1 x K)."""

    def __init__(self, dim: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.kernel, self.groups = kernel, groups
        self.weight_g = nn.Parameter(torch.ones(1, 1, kernel))
        self.weight_v = nn.Parameter(torch.zeros(dim, dim // groups, kernel))
        self.bias = nn.Parameter(torch.zeros(dim))

    def weight(self) -> torch.Tensor:
        """``w[:, :, k] = g[k] * v[:, :, k] / ||v[:, :, k]||``."""
        v = self.weight_v
        return v * (self.weight_g / v.norm(dim=(0, 1), keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, T) -> (B, D, T): conv with pad K/2, the extra last frame of an even K dropped."""
        pad = self.kernel // 2
        y = F.conv1d(x, self.weight(), self.bias, padding=pad, groups=self.groups)
        if self.kernel % 2 == 0:
            y = y[..., :-1]
        return y


class _SelfAttention(nn.Module):
    """Multi-head self-attention with WavLM's gated relative position bias."""

    def __init__(self, dim: int, heads: int, num_buckets: int, max_distance: int, bias: bool):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.grep_linear = nn.Linear(self.head_dim, 8)
        self.grep_a = nn.Parameter(torch.ones(1, heads, 1, 1))
        if bias:
            self.relative_attention_bias = nn.Embedding(num_buckets, heads)

    def position_bias(self, size: int, device: torch.device) -> torch.Tensor:
        """(H, T, T) bias from layer 0's bucket embedding."""
        buckets = relative_position_buckets(size, self.num_buckets, self.max_distance, device)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)

    def forward(
        self, x: torch.Tensor, pos_bias: torch.Tensor, key_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """x (B, T, D) layer-normed; pos_bias (H, T, T); key_mask (B, T) True on valid keys."""
        b, t, d = x.shape
        h, hd = self.heads, self.head_dim

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, h, hd).transpose(1, 2)  # (B, H, T, hd)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        # Gate per query from the layer's own input split into heads.
        g = torch.sigmoid(self.grep_linear(split(x)).view(b, h, t, 2, 4).sum(-1))
        gate_a, gate_b = g[..., 0:1], g[..., 1:2]  # (B, H, T, 1)
        gate = gate_a * (gate_b * self.grep_a - 1.0) + 2.0
        mask = gate * pos_bias[None]  # (B, H, T, T)
        if key_mask is not None:
            neg = torch.finfo(mask.dtype).min
            mask = mask.masked_fill(~key_mask[:, None, None, :], neg)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class _Layer(nn.Module):
    """Pre-LN transformer layer: x += Attn(LN(x)); x += fc2(GELU(fc1(LN(x))))."""

    def __init__(
        self, dim: int, ffn: int, heads: int, num_buckets: int, max_distance: int, bias: bool
    ) -> None:
        super().__init__()
        self.self_attn = _SelfAttention(dim, heads, num_buckets, max_distance, bias)
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=1e-5)
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)
        self.final_layer_norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(
        self, x: torch.Tensor, pos_bias: torch.Tensor, key_mask: torch.Tensor | None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), pos_bias, key_mask)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class _FeatureExtractor(nn.Module):
    def __init__(self, conv_layers: Sequence[tuple[int, int, int]]) -> None:
        super().__init__()
        layers, c_in = [], 1
        for c_out, k, s in conv_layers:
            layers.append(_ConvLayer(c_in, c_out, k, s))
            c_in = c_out
        self.conv_layers = nn.ModuleList(layers)

    def out_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        for layer in self.conv_layers:
            assert isinstance(layer, _ConvLayer)
            lengths = conv_out_lengths(lengths, layer.kernel, layer.stride)
        return lengths

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """(B, N) -> (B, C, T')."""
        x = wave[:, None, :]
        for layer in self.conv_layers:
            x = layer(x)
        return x


class _Encoder(nn.Module):
    def __init__(
        self,
        dim: int,
        ffn: int,
        heads: int,
        layers: int,
        conv_pos: int,
        conv_pos_groups: int,
        num_buckets: int,
        max_distance: int,
    ) -> None:
        super().__init__()
        self.pos_conv = nn.ModuleList([_PosConv(dim, conv_pos, conv_pos_groups)])
        self.layers = nn.ModuleList(
            [_Layer(dim, ffn, heads, num_buckets, max_distance, i == 0) for i in range(layers)]
        )
        self.layer_norm = nn.LayerNorm(dim, eps=1e-5)


class WavLM(nn.Module):
    """The WavLM backbone. Defaults are WavLM-Large (315.5 M parameters).

    ``hidden_states(wave, lengths)`` on a (B, N) normalised waveform (zero-padded rows, valid
    lengths (B,) int64 samples) yields ``layers + 1`` tensors (B, T', D); frames past a row's
    valid count hold values no valid frame depends on. :meth:`frame_lengths` gives T' per row.
    """

    def __init__(
        self,
        conv_layers: Sequence[tuple[int, int, int]] = LARGE_CONV_LAYERS,
        dim: int = 1024,
        ffn: int = 4096,
        heads: int = 16,
        layers: int = 24,
        conv_pos: int = 128,
        conv_pos_groups: int = 16,
        num_buckets: int = 320,
        max_distance: int = 800,
    ) -> None:
        super().__init__()
        c = conv_layers[-1][0]
        self.num_layers = layers
        self.mask_emb = nn.Parameter(torch.zeros(dim))  # pre-training only; kept for the keys
        self.feature_extractor = _FeatureExtractor(conv_layers)
        self.layer_norm = nn.LayerNorm(c, eps=1e-5)
        self.post_extract_proj = nn.Linear(c, dim)
        self.encoder = _Encoder(
            dim, ffn, heads, layers, conv_pos, conv_pos_groups, num_buckets, max_distance
        )

    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Valid frames per row for ``lengths`` valid samples (0 when shorter than 400)."""
        return self.feature_extractor.out_lengths(lengths).clamp_min(0)

    def cnn_features(self, wave: torch.Tensor) -> torch.Tensor:
        """(B, N) -> (B, C, T') output of the conv feature extractor."""
        return self.feature_extractor(wave)

    def hidden_states(
        self, wave: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> Iterator[torch.Tensor]:
        """Yield the ``layers + 1`` hidden states (B, T', D), one at a time (memory: one)."""
        x = self.cnn_features(wave).transpose(1, 2)  # (B, T', C)
        t = x.shape[1]
        if t < 1:
            raise ValueError("every row needs at least 400 samples (25 ms at 16 kHz)")
        frames = None if lengths is None else self.frame_lengths(lengths.to(x.device))
        key_mask = None if frames is None else time_mask(frames, t)
        x = self.post_extract_proj(self.layer_norm(x))
        if key_mask is not None:
            x = x * key_mask[..., None].to(x.dtype)
        pos_conv = self.encoder.pos_conv[0]
        x = x + F.gelu(pos_conv(x.transpose(1, 2))).transpose(1, 2)
        yield x
        layers = self.encoder.layers
        first = layers[0].self_attn
        assert isinstance(first, _SelfAttention)
        pos_bias = first.position_bias(t, x.device)
        for i, layer in enumerate(layers):
            x = layer(x, pos_bias, key_mask)
            yield self.encoder.layer_norm(x) if i == len(layers) - 1 else x
