"""Padding masks shared by the architectures.

Every architecture takes ``feats`` of shape (B, T, F) and optional ``lengths`` (B,) holding the
number of valid frames of each row. Rows are zero-padded to T. To give exactly the embedding a
row would get alone, each layer's output is re-zeroed past the row's valid length (so that the
next convolution sees the same zeros its own padding would give) and every pooling over time
only counts valid frames.

Frame counts never take the activations' dtype: bf16 holds integers exactly only up to 256
(1499 frames would count as 1496), so the divisions by a count run in float32 and only the
result is cast back (:func:`count_divide`).
"""

from __future__ import annotations

import torch


def conv_out_lengths(
    lengths: torch.Tensor, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1
) -> torch.Tensor:
    """Output lengths of a convolution along time, as torch computes them (floor mode)."""
    return (
        torch.div(
            lengths + 2 * padding - dilation * (kernel - 1) - 1, stride, rounding_mode="floor"
        )
        + 1
    )


def time_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """Boolean mask (B, size): True on valid frames."""
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


def apply_mask(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Zero ``x`` past each row's valid length along its last dimension (time)."""
    if lengths is None:
        return x
    mask = time_mask(lengths, x.shape[-1]).to(x.dtype)
    shape = [x.shape[0]] + [1] * (x.dim() - 2) + [x.shape[-1]]
    return x * mask.view(shape)


def count_divide(total: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``total / counts`` in float32 (counts (B,) of frames, broadcast over ``total``'s trailing
    dimensions), returned in ``total``'s dtype. Exact counts whatever the activations' dtype."""
    acc = _acc_dtype(total.dtype)
    n = counts.to(acc).view([total.shape[0]] + [1] * (total.dim() - 1))
    return (total.to(acc) / n).to(total.dtype)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for the low-precision floats (and float32), float64 kept as it is."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def masked_mean(
    x: torch.Tensor, lengths: torch.Tensor | None, keepdim: bool = False
) -> torch.Tensor:
    """Mean over the last dimension counting valid frames only."""
    if lengths is None:
        return x.mean(dim=-1, keepdim=keepdim)
    xm = apply_mask(x, lengths)
    total = xm.sum(dim=-1, keepdim=True, dtype=_acc_dtype(x.dtype))  # accumulated in >= fp32
    out = count_divide(total, lengths).to(x.dtype)
    return out if keepdim else out.squeeze(-1)


def masked_std(
    x: torch.Tensor, lengths: torch.Tensor | None, unbiased: bool = True, keepdim: bool = False
) -> torch.Tensor:
    """Standard deviation over the last dimension counting valid frames only."""
    if lengths is None:
        return x.std(dim=-1, unbiased=unbiased, keepdim=keepdim)
    mean = masked_mean(x, lengths, keepdim=True)
    sq = apply_mask((x - mean) ** 2, lengths).sum(dim=-1, keepdim=True, dtype=_acc_dtype(x.dtype))
    var = count_divide(sq, (lengths - 1 if unbiased else lengths).clamp_min(1)).to(x.dtype)
    out = var.sqrt()
    return out if keepdim else out.squeeze(-1)
