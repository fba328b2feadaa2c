"""One shard of the embedding store: its Arrow IPC layout, writing it, parsing and checking it.

A shard is an Arrow IPC file of one record batch: ``key`` fixed_size_binary(32) (the content
sha256), ``check`` uint32 (:func:`row_checks`) and ``vec`` fixed_size_list<float32>[dim],
with ``format``, ``dim`` and ``rows`` in the schema metadata. Parsing is zero-copy over a
memory map or an in-memory buffer and raises :class:`ShardError` for anything unexpected.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

SHARD_SUFFIX = ".arrow"
SHARD_FORMAT = "speaker-sim-shard/1"


class ShardError(Exception):
    """A shard that cannot be read or fails its checks."""


@dataclass
class Shard:
    """One opened shard: keys (n, 32) uint8, crc (n,) uint32 check words, vectors (n, dim)."""

    name: str
    keys: np.ndarray
    crc: np.ndarray
    vec: np.ndarray
    handle: Any = None  # keeps the memory map / buffer alive
    #: Byte offset of the vectors in the shard's file (a memory-mapped shard; else None): a
    #: read that wants many of its rows reads them in one call instead of faulting pages in.
    vec_offset: int | None = None


def digest_bytes(digest: str) -> bytes:
    """The 32 bytes of a sha256 hex digest (any other string is hashed first)."""
    if len(digest) == 64:
        with contextlib.suppress(ValueError):
            return bytes.fromhex(digest)
    import hashlib

    return hashlib.sha256(digest.encode()).digest()


_HEX = np.full(256, 255, dtype=np.uint8)
_HEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)
_HEX[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16, dtype=np.uint8)


def digests_to_keys(digests: Sequence[str]) -> np.ndarray:
    """(n, 32) uint8 keys of hex digests, vectorised (1 M in ~0.2 s); others one by one."""
    n = len(digests)
    try:
        raw = np.array(digests, dtype="S64")
    except (UnicodeEncodeError, ValueError):
        raw = None
    if raw is not None:
        nib = _HEX[raw.view(np.uint8).reshape(n, 64)]
        bad = (nib == 255).any(axis=1) | (np.char.str_len(raw) != 64)
        keys = (nib[:, 0::2] << 4) | nib[:, 1::2]
        for i in np.flatnonzero(bad).tolist():
            keys[i] = np.frombuffer(digest_bytes(digests[i]), np.uint8)
        return keys
    return np.frombuffer(b"".join(digest_bytes(d) for d in digests), np.uint8).reshape(n, 32)


def _weights(n: int) -> np.ndarray:
    """Odd 32-bit multipliers, one per word of a row (fixed: part of the shard format)."""
    i = np.arange(n, dtype=np.uint64)
    return ((i * np.uint64(0x9E3779B9) + np.uint64(0x7F4A7C15)) & np.uint64(0xFFFFFFFF)) | 1


def row_checks(keys: np.ndarray, vecs: np.ndarray, block: int = 4096) -> np.ndarray:
    """Per-row check word: sum of (odd weight x 32-bit word) over key and vector, mod 2^32.
    Any change of one word (every single bit flip) changes it. Computed in uint32, whose
    products and sums wrap mod 2^32 exactly as the definition does (~0.13 us a row)."""
    n, dim = vecs.shape
    w = _weights(8 + dim).astype(np.uint32)
    out = np.empty(n, dtype=np.uint32)
    kw = np.ascontiguousarray(keys).view("<u4").reshape(n, 8)
    vw = np.ascontiguousarray(vecs, dtype=np.float32).view("<u4").reshape(n, dim)
    for s in range(0, n, block):
        out[s : s + block] = kw[s : s + block] @ w[:8] + vw[s : s + block] @ w[8:]
    return out


def shard_table(keys: np.ndarray, vecs: np.ndarray) -> Any:
    """An Arrow table of ``keys`` (n, 32) uint8 and ``vecs`` (n, dim) float32, with CRCs."""
    import pyarrow as pa

    n, dim = vecs.shape
    crc = row_checks(keys, vecs)
    # From buffers, not pa.array(ndarray): that imports pandas, which fails at interpreter exit
    # (where the last flush may run).
    key_arr = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(32), n, [None, pa.py_buffer(np.ascontiguousarray(keys).tobytes())]
    )
    flat = pa.Array.from_buffers(
        pa.float32(), n * dim, [None, pa.py_buffer(np.ascontiguousarray(vecs).tobytes())]
    )
    crc_arr = pa.Array.from_buffers(pa.uint32(), n, [None, pa.py_buffer(crc.tobytes())])
    vec_arr = pa.FixedSizeListArray.from_arrays(flat, dim)
    meta = {"format": SHARD_FORMAT, "dim": str(dim), "rows": str(n)}
    table = pa.table({"key": key_arr, "check": crc_arr, "vec": vec_arr})
    return table.replace_schema_metadata(meta)


def shard_bytes(keys: np.ndarray, vecs: np.ndarray) -> bytes:
    import pyarrow as pa

    table = shard_table(keys, vecs)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table, max_chunksize=max(1, len(vecs)))
    return sink.getvalue().to_pybytes()


def parse_shard(name: str, source: Any, dim: int) -> Shard:
    """Open a shard from a pyarrow memory map or buffer; raises ShardError on any problem."""
    import pyarrow as pa

    try:
        reader = pa.ipc.open_file(source)
        meta = {k.decode(): v.decode() for k, v in (reader.schema.metadata or {}).items()}
        if meta.get("format") != SHARD_FORMAT or meta.get("dim") != str(dim):
            raise ShardError(f"not a {SHARD_FORMAT} shard of dim {dim} ({meta})")
        if reader.num_record_batches != 1:
            raise ShardError(f"{reader.num_record_batches} record batches, expected 1")
        batch = reader.get_batch(0)
        n = batch.num_rows
        if str(n) != meta.get("rows"):
            raise ShardError(f"{n} rows, the header says {meta.get('rows')}")
        kcol, ccol, vcol = batch.column("key"), batch.column("check"), batch.column("vec")
        if kcol.type != pa.binary(32) or vcol.type.list_size != dim or kcol.null_count:
            raise ShardError("unexpected column types")
        kbuf = np.frombuffer(kcol.buffers()[1], dtype=np.uint8)
        keys = kbuf[kcol.offset * 32 : (kcol.offset + n) * 32].reshape(n, 32)
        crc = ccol.to_numpy(zero_copy_only=True)
        vec = vcol.flatten().to_numpy(zero_copy_only=True).reshape(n, dim)
        if vec.dtype != np.float32 or crc.dtype != np.uint32 or len(crc) != n:
            raise ShardError("unexpected column types")
    except ShardError:
        raise
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise ShardError(f"cannot read ({type(exc).__name__}: {exc})"[:300]) from None
    return Shard(name, keys, crc, vec, source, _file_offset(source, vec))


def _file_offset(source: Any, vec: np.ndarray) -> int | None:
    """Where ``vec`` (a view into the memory map ``source``) starts in the file."""
    import pyarrow as pa

    if not isinstance(source, pa.MemoryMappedFile) or not vec.size:
        return None
    source.seek(0)
    base = source.read_buffer(1).address  # zero-copy: the start of the mapping
    off = vec.__array_interface__["data"][0] - base
    return off if 0 <= off <= source.size() - vec.nbytes else None


def read_vectors(path: str, sh: Shard) -> np.ndarray:
    """All of ``sh``'s vectors read from ``path`` in one call (``sh.vec_offset`` is set)."""
    assert sh.vec_offset is not None
    n, dim = sh.vec.shape
    got = np.fromfile(path, np.float32, count=n * dim, offset=sh.vec_offset)
    if got.size != n * dim:
        raise ShardError(f"{n * dim - got.size} values short of {n} rows")
    return got.reshape(n, dim)


def new_shard_name() -> str:
    host = "".join(c for c in socket.gethostname() if c.isalnum())[:16] or "host"
    return f"{time.time_ns():020d}-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}{SHARD_SUFFIX}"
