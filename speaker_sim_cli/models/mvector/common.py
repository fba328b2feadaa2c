"""Helpers shared by the mvector backbones: input checks and length arithmetic."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["check_inputs", "min_input_frames", "strided_lengths"]


def check_inputs(
    feats: torch.Tensor, n_frames: torch.Tensor | None, input_size: int, min_frames: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate (B, T, F) ``feats`` and (B,) ``n_frames``.

    Returns ``feats`` with every frame past a row's length set to 0 (whatever the caller padded
    with, NaN included) and the lengths as int64 on feats' device (None when ``n_frames`` is).
    Raises ValueError for a wrong shape, a length past T, or a row shorter than ``min_frames``.
    """
    if feats.dim() != 3 or feats.shape[-1] != input_size:
        raise ValueError(f"expected feats (B, T, {input_size}), got {tuple(feats.shape)}")
    if n_frames is None:
        if feats.shape[1] < min_frames:
            raise ValueError(f"{feats.shape[1]} frames; this model needs at least {min_frames}")
        return feats, None
    if n_frames.shape != feats.shape[:1]:
        raise ValueError(
            f"n_frames must have shape ({feats.shape[0]},), got {tuple(n_frames.shape)}"
        )
    lengths = n_frames.to(device=feats.device, dtype=torch.long)
    lo, hi = int(lengths.min()), int(lengths.max())
    if lo < min_frames:
        raise ValueError(f"a row has {lo} frames; this model needs at least {min_frames}")
    if hi > feats.shape[1]:
        raise ValueError(f"n_frames ({hi}) exceeds the padded length {feats.shape[1]}")
    valid = torch.arange(feats.shape[1], device=feats.device)[None, :] < lengths[:, None]
    feats = torch.where(valid[..., None], feats, torch.zeros((), dtype=feats.dtype))
    return feats, lengths


def strided_lengths(lengths: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """Output lengths of a conv / pool along time (floor mode), per row."""
    return torch.div(lengths + 2 * padding - kernel, stride, rounding_mode="floor") + 1


def min_input_frames(out_frames: Callable[[int], int], need: int, limit: int = 4096) -> int:
    """Fewest input frames ``n`` with ``out_frames(n) >= need`` (``out_frames`` is monotone)."""
    for n in range(1, limit + 1):
        if out_frames(n) >= need:
            return n
    raise ValueError(f"no input length up to {limit} frames gives {need} output frames")
