"""A hash index over a column of unique string keys, probed a whole Arrow column at a time:
the row of each key, or -1. numpy / pyarrow only.

Built once per run over the key table (e.g. the million keys of an ``embed`` folder) and
probed with every chunk of a trial list, where ``pc.index_in`` would hash the whole table
again for each chunk. Open addressing with linear probing over a power-of-two table of
64-bit key hashes; every hit is confirmed by comparing the key's bytes with the table key's,
so a hash collision can never return another key's row.

>>> import pyarrow as pa
>>> ix = KeyIndex(pa.array(["a.wav", "b.wav", "c.wav"]))
>>> ix.rows(pa.array(["c.wav", "x.wav", "a.wav"])).tolist()
[2, -1, 0]
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

_M1 = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constants (golden ratio, splitmix64)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)
# the low k bytes of a word kept, k = 0..8
_MASKS = np.array([(1 << (8 * k)) - 1 for k in range(9)], np.uint64)
_S32 = np.uint64(32)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
SLICE = 1 << 16  # keys hashed / compared at a time (bounds the temporaries)
WORDS = 4  # table keys of up to 32 bytes are kept as word columns too


class _Bytes:
    """An Arrow string array's bytes as 8-byte little-endian words at any byte offset."""

    def __init__(self, col: pa.Array) -> None:
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            col = col.cast(pa.string())
        if col.null_count:
            raise ValueError("keys must not be null")
        bufs = col.buffers()
        off_t = np.int64 if pa.types.is_large_string(col.type) else np.int32
        n = len(col)
        offsets = np.frombuffer(bufs[1], off_t, n + 1, col.offset * np.dtype(off_t).itemsize)
        self.starts = offsets[:-1].astype(np.int64)
        self.lengths = np.diff(offsets).astype(np.int64)
        self.longest = int(self.lengths.max()) if n else 0
        lo, hi = (int(offsets[0]), int(offsets[-1])) if n else (0, 0)
        # Zero bytes past the last key: every word of every key is read in bounds.
        padded = np.zeros(hi - lo + self.longest + 16, np.uint8)
        if hi > lo:
            padded[: hi - lo] = np.frombuffer(bufs[2], np.uint8, hi - lo, lo)
        self.starts -= lo
        self._padded = padded  # kept alive: the word view below reads it
        self.words = np.ndarray((len(padded) - 7,), np.dtype("<u8"), padded, 0, (1,))

    def __len__(self) -> int:
        return len(self.starts)

    def key_words(self, idx: np.ndarray | slice, count: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """Lengths and the first ``count`` words of keys ``idx``, zeroed past each key's end."""
        start, length = self.starts[idx], self.lengths[idx]
        same = len(length) > 0 and length.min() == length.max()
        out = []
        for k in range(count):
            w = self.words[start + 8 * k]
            if same:  # one length for all: one mask
                w &= _MASKS[min(max(int(length[0]) - 8 * k, 0), 8)]
            else:
                w &= _MASKS[np.clip(length - 8 * k, 0, 8)]
            out.append(w)
        return length, out


def _hashes(length: np.ndarray, words: list[np.ndarray]) -> np.ndarray:
    """A 64-bit hash of each key from its length and its words (splitmix64-mixed)."""
    with np.errstate(over="ignore"):
        h = length.astype(np.uint64) * _M1
        for k, w in enumerate(words):  # a key's words only: its hash is its own alone
            m = _mix(h ^ w)
            h = m if length.min() > 8 * k else np.where(length > 8 * k, m, h)
    return h


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> _S30)) * _M2
    z = (z ^ (z >> _S27)) * _M3
    return z ^ (z >> _S31)


class KeyIndex:
    """Unique string keys -> their row. ``hash_bits`` below 64 keeps only that many bits of
    each hash, which forces collisions (tests prove that they cost nothing but probes)."""

    def __init__(self, keys: pa.Array | pa.ChunkedArray, hash_bits: int = 64) -> None:
        if isinstance(keys, pa.ChunkedArray):
            keys = keys.combine_chunks()
        self.keys = _Bytes(keys)
        n = len(self.keys)
        self._hmask = np.uint64((1 << hash_bits) - 1 if hash_bits < 64 else 2**64 - 1)
        size = 1 << max(4, int(4 * n - 1).bit_length())  # load factor <= 1/4
        self._mask = np.int64(size - 1)
        self._row = np.full(size, -1, np.int32 if n < 2**31 else np.int64)
        self._hash = np.zeros(size, np.uint32)  # each slot's key's hash, its high half
        h = np.empty(n, np.uint64)
        words = _count(self.keys.lengths)
        # Keys of up to WORDS words keep them as columns (8 bytes a key each): a probe's
        # check reads one word a key there instead of finding it in the key bytes.
        self._words = [np.empty(n, np.uint64) for _ in range(words)] if words <= WORDS else None
        for lo in range(0, n, SLICE):
            sl = slice(lo, min(n, lo + SLICE))
            length, w = self.keys.key_words(sl, _count(self.keys.lengths[sl]))
            h[sl] = _hashes(length, w)
            if self._words is not None:
                for col, x in zip(self._words, w):
                    col[sl] = x
                for col in self._words[len(w) :]:
                    col[sl] = 0
        h &= self._hmask
        rows = np.arange(n, dtype=np.int64)
        pos = (h & np.uint64(self._mask)).astype(np.int64)
        while len(rows):  # each round, every free slot wanted takes its lowest pending row
            free = np.flatnonzero(self._row[pos] < 0)
            slots, first = np.unique(pos[free], return_index=True)
            self._row[slots] = rows[free[first]]
            self._hash[slots] = (h[rows[free[first]]] >> _S32).astype(np.uint32)
            left = np.ones(len(rows), bool)
            left[free[first]] = False
            rows, pos = rows[left], (pos[left] + 1) & self._mask
        if n:
            got = self.rows(keys)
            dup = np.flatnonzero(got != np.arange(n))
            if len(dup):
                raise ValueError(f"key {keys[int(dup[0])].as_py()!r} appears twice")

    def __len__(self) -> int:
        return len(self.keys)

    def rows(self, col: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """The row of every key of ``col`` (int64; -1 where it is not in the index)."""
        parts = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
        out = [self._rows(p) for p in parts]
        if not out:
            return np.empty(0, np.int64)
        return np.concatenate(out) if len(out) != 1 else out[0]

    def _rows(self, col: pa.Array) -> np.ndarray:
        q = _Bytes(col)
        res = np.empty(len(q), np.int64)
        for lo in range(0, len(q), SLICE):
            sl = slice(lo, min(len(q), lo + SLICE))
            res[sl] = self._probe(*q.key_words(sl, _count(q.lengths[sl])))
        return res

    def _probe(self, length: np.ndarray, words: list[np.ndarray]) -> np.ndarray:
        """Rows of the keys given by their lengths and words (-1 where absent)."""
        out = np.full(len(length), -1, np.int64)
        h = _hashes(length, words) & self._hmask
        pos = (h & np.uint64(self._mask)).astype(np.int64)
        h = (h >> _S32).astype(np.uint32)  # the slot keeps this half: a first filter
        todo = np.arange(len(length))
        while len(todo):
            r = self._row[pos].astype(np.int64)
            live = r >= 0  # an empty slot ends the probe: not there
            c = np.flatnonzero(live & (self._hash[pos] == h))
            if len(c):  # same hash: the same key only if the same bytes
                qi, ti = todo[c], r[c]
                tl = self.keys.lengths[ti]
                ql = length[qi]
                same = ql == tl
                most = min(int(ql.max()), self.keys.longest)
                need = _count(np.array([most]))
                if self._words is not None:
                    tw = [col[ti] for col in self._words[:need]]
                else:
                    _, tw = self.keys.key_words(ti, need)
                for w, t in zip(words, tw):
                    same &= w[qi] == t
                out[qi[same]] = ti[same]
                live[c[same]] = False
            todo, h, pos = todo[live], h[live], (pos[live] + 1) & self._mask
        return out


def _count(lengths: np.ndarray) -> int:
    """Words that hold the longest of these keys."""
    return (int(lengths.max()) + 7) // 8 if len(lengths) else 0


__all__ = ["KeyIndex"]
