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


_HEADERS = {b"\0BFV ": ("<f4", 4), b"\0BDV ": ("<f8", 8)}  # float and double vectors


def read_kaldi_vectors(scp: str | Path) -> dict[str, np.ndarray]:
    """Read vectors (binary float or double) through an scp written by :func:`kaldi_vectors`,
    Kaldi or kaldiio. Returns float32 vectors by key. Any defect (bad line, missing or truncated
    ark, wrong header) is a UsageError naming the scp line and the ark."""
    scp = Path(scp)
    from .trials import read_text

    out: dict[str, np.ndarray] = {}
    cache: dict[str, bytes] = {}
    for lineno, line in enumerate(read_text(scp).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{scp}:{lineno}"
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or ":" not in parts[1]:
            raise UsageError(f"{where}: expected 'key ark-path:offset'")
        key, target = parts
        path, _, off = target.strip().rpartition(":")
        if not off.isdigit():
            raise UsageError(f"{where}: offset {off!r} is not a byte offset")
        if key in out:
            raise UsageError(f"{where}: key {key!r} appears twice")
        if path not in cache:
            ark = Path(path)
            if not ark.is_absolute() and not ark.exists():  # relative to the scp, then
                ark = scp.parent / path
            try:
                cache[path] = ark.read_bytes()
            except OSError as exc:
                raise UsageError(
                    f"{where}: cannot read the ark {ark} ({exc.strerror or exc})"
                ) from None
        buf, pos = cache[path], int(off)
        kind = _HEADERS.get(buf[pos : pos + 5])
        if kind is None:
            raise UsageError(f"{where}: no binary float vector at {path}:{pos}")
        dtype, size = kind
        if len(buf) < pos + 10 or buf[pos + 5] != 4:
            raise UsageError(f"{where}: truncated or malformed vector header at {path}:{pos}")
        (dim,) = struct.unpack_from("<i", buf, pos + 6)
        end = pos + 10 + dim * size
        if dim < 0 or end > len(buf):
            raise UsageError(f"{where}: vector of dimension {dim} runs past the end of {path}")
        out[key] = np.frombuffer(buf, dtype=dtype, count=dim, offset=pos + 10).astype(np.float32)
    if not out:
        raise UsageError(f"{scp}: no vectors listed")
    return out
