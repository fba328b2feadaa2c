"""Dataset, length-bucketing batch planner and collation for the DataLoader.

Worker processes decode, resample, cut long recordings into windows and pad the rows into
model-sized batches (:class:`Collator`); the DataLoader pins them (its pin thread, off the
feeding thread) and the main process only uploads them and computes fbank on the device.
Batches are planned up front from header lengths: recordings sorted by length and packed
greedily so that ``rows x longest <= batch_frames`` and ``rows <= batch_size``, which keeps
padding small.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

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
        return self.load(i)

    def load(self, i: int, data: bytes | OSError | None = None) -> Loaded:
        """Item ``i``; ``data``: the bytes of its URL when they were fetched already."""
        try:
            wav = load(self.paths[i], self.sample_rate, self.channel, resampler=self.resampler,
                       data=data)  # fmt: skip
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


# -- requests, windows and padded batches (the DataLoader's unit of work) ------------------------
class FileDataset(torch.utils.data.Dataset[Loaded]):
    """Like :class:`AudioDataset`, but indexed by ``(index, path)`` requests, so that one set of
    persistent worker processes serves every ``embed_files`` call whatever its paths."""

    def __init__(
        self, sample_rate: int, min_samples: int = 0, max_samples: int = 0, channel: int | str = 0,
        loudness_db: float | None = None, resampler: str = "soxr",
    ) -> None:  # fmt: skip
        self.sample_rate, self.channel = sample_rate, channel
        self.min_samples, self.max_samples = min_samples, max_samples
        self.loudness_db, self.resampler = loudness_db, resampler

    def __len__(self) -> int:  # requests come from the sampler; the length is not used
        return 0

    def __getitem__(self, request: tuple[int, str] | tuple[int, str, Any]) -> Loaded:
        index, path = request[0], request[1]
        data = request[2] if len(request) > 2 else None
        one = AudioDataset([path], self.sample_rate, self.min_samples, self.max_samples,
                           self.channel, self.loudness_db, self.resampler)  # fmt: skip
        got = one.load(0, data)
        return Loaded(index, got.wave, got.error)


class PlanSampler(torch.utils.data.Sampler[list[Any]]):
    """The batch sampler of a persistent DataLoader: each ``iter(loader)`` walks the plan set
    last (lists of ``(index, path)`` requests). A URL's request carries its bytes,
    ``(index, url, bytes-or-OSError)``: they are fetched here, in the main process, many at once
    (:func:`with_bytes`), so worker processes never fetch one object at a time."""

    def __init__(self) -> None:
        self.plan: list[list[tuple[int, str]]] = []

    def __iter__(self) -> Iterator[list[Any]]:
        return with_bytes(list(self.plan))

    def __len__(self) -> int:
        return len(self.plan)


#: URL recordings fetched together ahead of the batches that need them.
FETCH_WINDOW = 256


def with_bytes(
    plan: Sequence[Sequence[tuple[int, str]]], window: int = FETCH_WINDOW
) -> Iterator[list[Any]]:
    """The batches of ``plan`` with the bytes of each URL recording attached. Batches are taken
    in groups holding about ``window`` URLs; a group's objects are fetched at once
    (:func:`storage.read_many`: bytes kept by the hashing are taken, not fetched again) while
    the previous group is being decoded. Batches without URLs pass unchanged."""
    from concurrent.futures import ThreadPoolExecutor

    from ..io import storage

    groups: list[tuple[int, int, list[str]]] = []
    i = 0
    while i < len(plan):
        j, urls = i, list[str]()
        while j < len(plan) and (j == i or len(urls) < window):
            urls += [p for _, p in plan[j] if storage.is_url(p)]
            j += 1
        groups.append((i, j, list(dict.fromkeys(urls))))
        i = j
    if not any(urls for _, _, urls in groups):
        yield from (list(b) for b in plan)
        return

    def fetch(urls: list[str]) -> dict[str, bytes | OSError]:
        return dict(zip(urls, storage.read_many(urls))) if urls else {}

    with ThreadPoolExecutor(1, thread_name_prefix="speaker-sim-fetch") as pool:
        ahead = pool.submit(fetch, groups[0][2])
        for g, (a, b, _) in enumerate(groups):
            got = ahead.result()
            if g + 1 < len(groups):
                ahead = pool.submit(fetch, groups[g + 1][2])
            for batch in plan[a:b]:
                yield [(i, p, got[p]) if p in got else (i, p) for i, p in batch]


def windows(
    wave: torch.Tensor, sample_rate: int, chunk_seconds: float | None, max_full_seconds: float,
    default_chunk: float = 10.0,
) -> list[torch.Tensor]:  # fmt: skip
    """``wave`` whole when it is at most ``max_full_seconds`` long and no ``chunk_seconds`` is
    set, else cut into windows of ``chunk_seconds`` (a tail shorter than half a window is merged
    into the previous one)."""
    seconds = wave.shape[0] / sample_rate
    if chunk_seconds is None and seconds <= max_full_seconds:
        return [wave]
    step = int((chunk_seconds or default_chunk) * sample_rate)
    wins = [wave[s : s + step] for s in range(0, wave.shape[0], step)]
    if len(wins) > 1 and wins[-1].shape[0] < step // 2:
        tail = wins.pop()
        wins[-1] = torch.cat([wins[-1], tail])
    return wins


@dataclass
class Rows:
    """One model batch on the host: ``waves`` (B, N) float32 zero-padded, ``lengths`` (B,)
    int64 samples, ``frames`` (B,) int64 valid frames (counted on the host, so the device is
    never asked), ``owner`` (B,) position in :attr:`HostBatch.items` of each row's recording."""

    waves: torch.Tensor
    lengths: torch.Tensor
    frames: torch.Tensor
    owner: list[int]
    padded_frames: int
    valid_frames: int = 0  # frames.sum(), as a Python int

    def split(self) -> tuple[Rows, Rows]:
        """Two halves (rows are sorted longest first, so each half is trimmed to its longest)."""
        h = max(1, len(self.owner) // 2)
        return self._part(0, h), self._part(h, len(self.owner))

    def split_at(self, k: int) -> tuple[Rows | None, Rows | None]:
        """Rows ``[:k]`` and ``[k:]`` (None for an empty side)."""
        n = len(self.owner)
        return (self._part(0, k) if k > 0 else None), (self._part(k, n) if k < n else None)

    def _part(self, a: int, b: int) -> Rows:
        n = int(self.lengths[a:b].max())
        t = int(self.frames[a:b].max()) if b > a else 0
        frames = self.frames[a:b]
        return Rows(self.waves[a:b, :n], self.lengths[a:b], frames, self.owner[a:b],
                    t * (b - a), int(frames.sum()))  # fmt: skip

    def pin_memory(self) -> Rows:
        self.waves, self.lengths = self.waves.pin_memory(), self.lengths.pin_memory()
        return self


@dataclass
class Item:
    """A recording of a :class:`HostBatch`: its request index, the failure reason (None when
    decoded), its duration in seconds and its number of windows."""

    index: int
    error: str | None
    seconds: float = 0.0
    windows: int = 0


@dataclass
class HostBatch:
    """A DataLoader batch, ready for the device: the recordings and their padded model batches."""

    items: list[Item]
    rows: list[Rows] = field(default_factory=list)

    def pin_memory(self) -> HostBatch:  # called by the DataLoader's pin-memory thread
        for r in self.rows:
            r.pin_memory()
        return self


@dataclass(frozen=True)
class Collator:
    """Collate function (runs in the workers): windows, model-batch plan and padding.

    ``num_frames`` is the front end's ``num_frames(samples)``; rows within each model batch are
    sorted longest first.
    """

    sample_rate: int
    num_frames: Any
    chunk_seconds: float | None
    max_full_seconds: float
    batch_frames: int
    batch_size: int
    default_chunk: float = 10.0

    def __call__(self, batch: Sequence[Loaded]) -> HostBatch:
        items: list[Item] = []
        rows: list[torch.Tensor] = []
        owner: list[int] = []
        for b in batch:
            if b.wave is None:
                items.append(Item(b.index, b.error))
                continue
            wins = windows(b.wave, self.sample_rate, self.chunk_seconds, self.max_full_seconds,
                           self.default_chunk)  # fmt: skip
            owner.extend([len(items)] * len(wins))
            items.append(Item(b.index, None, b.wave.shape[0] / self.sample_rate, len(wins)))
            rows.extend(wins)
        out = HostBatch(items)
        frames = [max(int(self.num_frames(r.shape[0])), 1) for r in rows]
        for part in plan_batches(frames, self.batch_frames, self.batch_size):
            waves, lengths = pad_rows([rows[j] for j in part])
            n = torch.tensor([int(self.num_frames(rows[j].shape[0])) for j in part])
            t_max = max(int(self.num_frames(waves.shape[1])), 0)
            own = [owner[j] for j in part]
            out.rows.append(Rows(waves, lengths, n, own, t_max * len(part), int(n.sum())))
        return out
