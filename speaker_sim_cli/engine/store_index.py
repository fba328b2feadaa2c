"""The embedding store's key index: sorted 16-byte key prefixes -> (shard, row), in numpy.

No Python object per entry: four flat arrays (hi, lo: the first 16 bytes of the content
sha256 as two big-endian uint64, so numeric order is byte order; shard, row: uint32), 24 bytes
an entry, looked up by ``np.searchsorted``. The full 32-byte key is checked in the shard, so a
prefix collision is a miss, never a wrong vector.

The compacted index file::

    b"SSIDX01\\n"  u32 little-endian header length  header JSON {"shards": [...], "n", "crc"}
    zero padding to a multiple of 8   hi (n uint64 LE)  lo (n uint64 LE)  shard (n u32)  row (n u32)

``crc`` is zlib.crc32 of the shard names, ``n`` and the entries. :func:`decode` checks every
field and raises :class:`IndexFileError` for anything else, so a damaged index is ignored,
never trusted.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MAGIC = b"SSIDX01\n"
_MAX_HEADER = 1 << 28


class IndexFileError(Exception):
    """A compacted index file that is not well formed."""


def split_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 32) uint8 keys -> (hi, lo) uint64 of their first 16 bytes (byte order preserved)."""
    k = np.ascontiguousarray(keys[:, :16])
    pair = k.view(">u8").reshape(-1, 2).astype(np.uint64)
    return pair[:, 0].copy(), pair[:, 1].copy()


@dataclass
class Index:
    """Sorted by (hi, lo), each key once."""

    hi: np.ndarray
    lo: np.ndarray
    shard: np.ndarray
    row: np.ndarray

    @classmethod
    def empty(cls) -> Index:
        z8, z4 = np.zeros(0, np.uint64), np.zeros(0, np.uint32)
        return cls(z8, z8.copy(), z4, z4.copy())

    @classmethod
    def from_keys(cls, keys: np.ndarray, shard: int) -> Index:
        hi, lo = split_keys(keys)
        n = len(hi)
        idx = cls(hi, lo, np.full(n, shard, np.uint32), np.arange(n, dtype=np.uint32))
        return cls.merge([idx])

    def __len__(self) -> int:
        return len(self.hi)

    def select(self, mask: np.ndarray) -> Index:
        return Index(self.hi[mask], self.lo[mask], self.shard[mask], self.row[mask])

    @classmethod
    def merge(cls, parts: Sequence[Index]) -> Index:
        """One sorted index of ``parts``; where a key repeats, the entry of the later part (and,
        within a part, the later row) wins."""
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        hi = np.concatenate([p.hi for p in parts])
        lo = np.concatenate([p.lo for p in parts])
        shard = np.concatenate([p.shard for p in parts])
        row = np.concatenate([p.row for p in parts])
        order = np.lexsort((np.arange(len(hi)), lo, hi))
        hi, lo, shard, row = hi[order], lo[order], shard[order], row[order]
        last = np.ones(len(hi), dtype=bool)
        last[:-1] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
        return cls(hi[last], lo[last], shard[last], row[last])

    def find(self, qhi: np.ndarray, qlo: np.ndarray) -> np.ndarray:
        """Position of each (qhi, qlo) in this index, -1 where absent."""
        n = len(self.hi)
        out = np.full(len(qhi), -1, dtype=np.int64)
        if n == 0 or len(qhi) == 0:
            return out
        # The queries in order (numpy's search starts each where the last one ended: ~3x
        # fewer cache misses for a large index), the answers back in the callers' order.
        order = np.argsort(qhi, kind="stable")
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        sq = qhi[order]
        # Keys sharing the 8-byte hi sit side by side, sorted by lo: binary search in that run.
        left = np.searchsorted(self.hi, sq, side="left")[back]
        right = np.searchsorted(self.hi, sq, side="right")[back]
        while True:
            open_ = left < right
            if not open_.any():
                break
            mid = (left + right) // 2
            go_right = open_ & (self.lo[np.minimum(mid, n - 1)] < qlo)
            left = np.where(go_right, mid + 1, left)
            right = np.where(open_ & ~go_right, mid, right)
        at = np.minimum(left, n - 1)
        hit = (left < n) & (self.hi[at] == qhi) & (self.lo[at] == qlo)
        out[hit] = left[hit]
        return out


def _crc(shards: list[str], n: int, body: bytes) -> int:
    """zlib.crc32 of the shard names, the count and the entries."""
    return zlib.crc32(body, zlib.crc32(json.dumps([shards, n]).encode()))


def encode(shards: Sequence[str], index: Index) -> bytes:
    n = len(index)
    body = b"".join((
        index.hi.astype("<u8").tobytes(),
        index.lo.astype("<u8").tobytes(),
        index.shard.astype("<u4").tobytes(),
        index.row.astype("<u4").tobytes(),
    ))  # fmt: skip
    doc = {"shards": list(shards), "n": n, "crc": _crc(list(shards), n, body)}
    header = json.dumps(doc).encode()
    head = MAGIC + len(header).to_bytes(4, "little") + header
    return head + b"\0" * (-len(head) % 8) + body


def decode(data: bytes) -> tuple[list[str], Index]:
    """Parse an index file; raises IndexFileError naming the first problem."""
    if len(data) < len(MAGIC) + 4 or not data.startswith(MAGIC):
        raise IndexFileError("not a speaker-sim index file (bad magic)")
    hlen = int.from_bytes(data[8:12], "little")
    if hlen > min(_MAX_HEADER, len(data) - 12):
        raise IndexFileError(f"header length {hlen} runs past the end of the file")
    try:
        header = json.loads(data[12 : 12 + hlen].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise IndexFileError("header is not JSON") from None
    if not isinstance(header, dict):
        raise IndexFileError("header is not a JSON object")
    shards, n, crc = header.get("shards"), header.get("n"), header.get("crc")
    if not isinstance(shards, list) or not all(isinstance(s, str) for s in shards):
        raise IndexFileError("header 'shards' is not a list of names")
    if any("/" in s or s.startswith(".") or not s for s in shards) or len(set(shards)) != len(
        shards
    ):
        raise IndexFileError("header 'shards' holds an invalid or repeated name")
    if type(n) is not int or n < 0 or type(crc) is not int:
        raise IndexFileError("header 'n' or 'crc' is not a non-negative integer")
    start = 12 + hlen + (-(12 + hlen) % 8)
    if any(data[12 + hlen : start]):
        raise IndexFileError("padding after the header is not zero")
    body = data[start:]
    if len(body) != 24 * n:
        raise IndexFileError(f"{len(body)} bytes of entries, {24 * n} expected for {n}")
    if _crc(shards, n, body) != crc:
        raise IndexFileError("entries fail their checksum")
    hi = np.frombuffer(body, "<u8", n, 0).astype(np.uint64)
    lo = np.frombuffer(body, "<u8", n, 8 * n).astype(np.uint64)
    shard = np.frombuffer(body, "<u4", n, 16 * n).astype(np.uint32)
    row = np.frombuffer(body, "<u4", n, 20 * n).astype(np.uint32)
    if n and int(shard.max()) >= len(shards):
        raise IndexFileError("an entry names a shard the header does not list")
    if n > 1:
        step_ok = (hi[1:] > hi[:-1]) | ((hi[1:] == hi[:-1]) & (lo[1:] > lo[:-1]))
        if not step_ok.all():
            raise IndexFileError("entries are not sorted by key, or a key repeats")
    return list(shards), Index(hi, lo, shard, row)
