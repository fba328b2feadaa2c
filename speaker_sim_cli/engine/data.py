"""Dataset, length-bucketing batch planner and collation for the DataLoader.

Worker processes decode and resample; the main process computes fbank on the device. Batches
are planned up front from header lengths: recordings sorted by length and packed greedily so
that ``rows x longest <= batch_frames`` and ``rows <= batch_size``, which keeps padding small.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..audio.decode import load
from ..audio.loudness import normalize_recording
from ..errors import AudioError


@dataclass(frozen=True)
class Loaded:
    """What a worker hands back for one recording: the waveform or the reason it failed."""

    index: int
    wave: torch.Tensor | None
    error: str | None


class AudioDataset(torch.utils.data.Dataset[Loaded]):
    """Decodes ``paths[i]`` to a float32 mono tensor at ``sample_rate``; never raises."""

    def __init__(
        self,
        paths: Sequence[str],
        sample_rate: int,
        min_samples: int = 0,
        max_samples: int = 0,
        channel: int | str = 0,
        loudness_db: float | None = None,
        resampler: str = "soxr",
    ) -> None:
        self.paths = list(paths)
        self.channel = channel
        self.loudness_db = loudness_db  # normalise each recording to this RMS level (mvector)
        self.resampler = resampler
        self.sample_rate = sample_rate
        self.min_samples = min_samples
        self.max_samples = max_samples

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Loaded:
        try:
            wav = load(self.paths[i], self.sample_rate, self.channel, resampler=self.resampler)
            check_wave(wav, self.sample_rate, self.min_samples, self.max_samples)
            if self.loudness_db is not None:
                wav = normalize_recording(wav, self.loudness_db)
        except AudioError as exc:
            return Loaded(i, None, exc.reason)
        except MemoryError:
            return Loaded(i, None, "too long to decode in memory")
        except Exception as exc:  # a decoder bug must cost only this recording
            return Loaded(i, None, f"unexpected {type(exc).__name__}: {exc}")
        return Loaded(i, torch.from_numpy(wav), None)


def check_wave(wav: np.ndarray, sample_rate: int, min_samples: int, max_samples: int) -> None:
    """Reject audio no model can use; raises AudioError with the reason."""
    n = wav.shape[0]
    if min_samples and n < min_samples:
        limit = min_samples / sample_rate
        raise AudioError("", f"too short: {n / sample_rate:.3f} s < --min-duration {limit:g} s")
    if max_samples and n > max_samples:
        limit = max_samples / sample_rate
        raise AudioError("", f"too long: {n / sample_rate:.0f} s > --max-duration {limit:g} s")
    if not np.any(wav):
        raise AudioError("", "digitally silent (every sample is 0)")


def collate(batch: list[Loaded]) -> list[Loaded]:
    """Keep the list: rows are padded later, after long recordings are cut into windows."""
    return batch


def plan_batches(lengths: Sequence[int], batch_frames: int, batch_size: int) -> list[list[int]]:
    """Group indices into batches by length (longest first) under a padded-size budget.

    Every index appears in exactly one batch. A recording longer than the budget gets a batch
    of its own.

    >>> plan_batches([5, 1, 4, 2], batch_frames=8, batch_size=8)
    [[0], [2, 3], [1]]
    """
    if batch_size < 1 or batch_frames < 1:
        raise ValueError("batch_size and batch_frames must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        n = max(int(lengths[i]), 1)
        full = len(current) + 1 > batch_size or max(longest, n) * (len(current) + 1) > batch_frames
        if current and full:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        batches.append(current)
    return batches


def pad_rows(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad 1-D tensors to (B, N_max); returns the batch and the lengths (B,)."""
    lengths = torch.tensor([r.shape[0] for r in rows], dtype=torch.long)
    out = torch.zeros(len(rows), int(lengths.max()), dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out, lengths
