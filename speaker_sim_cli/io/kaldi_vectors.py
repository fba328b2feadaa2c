"""Kaldi ``ark``/``scp`` of float vectors: what WeSpeaker and Kaldi recipes call xvector.ark.

Binary layout of one entry (Kaldi's ``Vector<float>::Write`` in binary mode)::

    <key> ' ' '\\0' 'B' 'F' 'V' ' ' <0x04> <int32 dim, little-endian> <dim float32, little-endian>

The scp line ``<key> <ark path>:<offset>`` points at the ``\\0B`` of that entry. Readers:
kaldiio, kaldi_io, Kaldi's ``copy-vector``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import UsageError

__all__ = ["check_key", "kaldi_vectors", "read_kaldi_vectors"]


def check_key(key: str) -> bytes:
    """``key`` as UTF-8; a UsageError when an ark cannot hold it (empty, or whitespace)."""
    if not key or any(c.isspace() for c in key):
        raise UsageError(
            f"key {key!r} is empty or contains whitespace, which a Kaldi ark cannot hold: "
            "use --format npy, or ids without spaces (a wav.scp)"
        )
    return key.encode("utf-8")


def kaldi_vectors(keys: Sequence[str], mat: np.ndarray, ark_name: str) -> tuple[bytes, bytes]:
    """(ark bytes, scp bytes) for rows of ``mat`` under ``keys``; the scp names ``ark_name``."""
    if len(keys) != len(mat):
        raise ValueError(f"{len(keys)} keys for {len(mat)} rows")
    data = np.ascontiguousarray(mat, dtype="<f4")
    ark = bytearray()
    scp: list[str] = []
    for key, row in zip(keys, data, strict=True):
        k = check_key(key)
        ark += k + b" "
        scp.append(f"{key} {ark_name}:{len(ark)}\n")
        ark += b"\0BFV " + struct.pack("<bi", 4, row.shape[0]) + row.tobytes()
    return bytes(ark), "".join(scp).encode("utf-8")


def read_kaldi_vectors(scp: str | Path) -> dict[str, np.ndarray]:
    """Read float vectors through an scp written by :func:`kaldi_vectors` (or by Kaldi)."""
    out: dict[str, np.ndarray] = {}
    cache: dict[str, bytes] = {}
    for lineno, line in enumerate(Path(scp).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or ":" not in parts[1]:
            raise ValueError(f"{scp}:{lineno}: expected 'key ark-path:offset'")
        key, where = parts
        path, _, off = where.strip().rpartition(":")
        if path not in cache:
            ark = Path(path)
            if not ark.is_absolute() and not ark.exists():  # relative to the scp, then
                ark = Path(scp).parent / path
            cache[path] = ark.read_bytes()
        buf, pos = cache[path], int(off)
        if buf[pos : pos + 5] != b"\0BFV ":
            raise ValueError(f"{scp}:{lineno}: no binary float vector at {path}:{pos}")
        size_len, dim = struct.unpack_from("<bi", buf, pos + 5)
        if size_len != 4:
            raise ValueError(f"{scp}:{lineno}: unexpected int size {size_len}")
        out[key] = np.frombuffer(buf, dtype="<f4", count=dim, offset=pos + 10).copy()
    return out
