"""mvector's loudness normalisation: scale a recording to a target RMS level in dB.

mvector (through yeaudio's ``AudioSegment.normalize``) computes, in float32:
``ms = mean(x**2)`` (1 when 0), ``rms_db = 10*log10(ms)``, ``gain = target_db - rms_db``;
a gain above 300 dB is an error, else ``x *= 10**(gain/20)``.

The engine applies it per recording, right after decoding, with :func:`normalize_recording`
(numpy, bit-identical to mvector): a recording gets one gain over all its samples before it
is cut into windows, and one that cannot be normalised fails alone with its reason
(an :class:`~speaker_sim_cli.errors.AudioError`), never its batch.
:func:`normalize_loudness` is the same step on a padded torch batch, for callers holding one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import AudioError

if TYPE_CHECKING:
    import torch

__all__ = ["MAX_GAIN_DB", "LoudnessError", "normalize_loudness", "normalize_recording"]

#: mvector's cap: a recording needing more gain than this is refused.
MAX_GAIN_DB = 300.0


class LoudnessError(ValueError):
    """Rows of a batch too quiet to reach the target (gain above :data:`MAX_GAIN_DB`)."""

    def __init__(self, rows: list[int], gains: list[float], target_db: float) -> None:
        self.rows = rows
        self.gains = gains
        detail = ", ".join(f"row {r}: {g:.0f} dB" for r, g in zip(rows, gains))
        super().__init__(
            f"cannot normalise to {target_db:g} dB: the gain would exceed {MAX_GAIN_DB:g} dB "
            f"({detail})"
        )


def _too_quiet(gain: float, target_db: float) -> str:
    return (
        f"too quiet to normalise to {target_db:g} dB: it needs {gain:.0f} dB of gain, above "
        f"mvector's {MAX_GAIN_DB:g} dB limit"
    )


def normalize_recording(wav: np.ndarray, target_db: float) -> np.ndarray:
    """One recording (N,) float32 scaled to ``target_db`` RMS, with mvector's float32
    arithmetic. Raises AudioError (no path; the caller adds it) above the 300 dB cap.

    >>> x = np.full(4, 0.5, dtype=np.float32)
    >>> float(np.sqrt(np.mean(normalize_recording(x, -20) ** 2)))  # 10**(-20/20)
    0.1
    """
    x = np.asarray(wav, dtype=np.float32)
    ms = np.mean(x**2)
    if ms == 0:
        ms = np.float32(1.0)
    gain = target_db - 10 * np.log10(ms)
    if gain > MAX_GAIN_DB:
        raise AudioError("", _too_quiet(float(gain), target_db))
    return x * 10.0 ** (min(MAX_GAIN_DB, gain) / 20.0)


def normalize_loudness(
    waves: torch.Tensor, lengths: torch.Tensor | None, target_db: float
) -> torch.Tensor:
    """Each row of a padded batch (B, N) scaled to ``target_db`` over its valid samples
    (``lengths`` (B,), None: all N); padding stays 0. Equal to :func:`normalize_recording` per
    row to float32 rounding (the mean square is summed in another order). Raises
    :class:`LoudnessError` naming the rows above the 300 dB cap."""
    import torch

    if waves.dim() != 2:
        raise ValueError(f"waves must be (B, N), got shape {tuple(waves.shape)}")
    batch, n = waves.shape
    if lengths is None:
        lengths = torch.full((batch,), n, dtype=torch.long, device=waves.device)
    lengths = lengths.to(waves.device)
    valid = torch.arange(n, device=waves.device)[None, :] < lengths[:, None]
    x = waves.float() * valid
    ms = x.square().sum(dim=1) / lengths.clamp_min(1).float()
    ms = torch.where(ms == 0, torch.ones_like(ms), ms)
    gain = target_db - 10.0 * torch.log10(ms)
    bad = torch.nonzero(gain > MAX_GAIN_DB).flatten().tolist()
    if bad:
        raise LoudnessError(bad, [float(gain[i]) for i in bad], target_db)
    scale = torch.pow(10.0, gain.clamp(max=MAX_GAIN_DB) / 20.0)
    return (x * scale[:, None]).to(waves.dtype)
