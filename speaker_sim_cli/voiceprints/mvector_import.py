"""mvector's voiceprint folder (``audio_db/<user>/<k>.wav`` plus ``audio_indexes.bin``).

``audio_indexes.bin`` is a pickle of ``{"users_name": [str], "faces_feature": float32 (N, D)
raw embeddings, "users_image_path": [str]}`` (the odd key names are mvector's). A pickle can run
any code while it loads, so it is read with :class:`RestrictedUnpickler`: plain containers and
strings come from pickle opcodes, and the only globals it resolves are numpy's array
reconstruction (``numpy(._core|.core).multiarray._reconstruct``, ``numpy.ndarray``,
``numpy.dtype``); anything else is refused before it is called.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError

INDEX_NAME = "audio_indexes.bin"
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers, str, numbers and numpy arrays; refuses any other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused persistent id")


def restricted_loads(data: bytes) -> Any:
    """``pickle.loads`` through :class:`RestrictedUnpickler`; object arrays are refused too.

    >>> restricted_loads(pickle.dumps({"a": [1, "x"], "v": np.arange(3.0)}))["v"]
    array([0., 1., 2.])
    >>> import os
    >>> restricted_loads(pickle.dumps(os.getcwd))
    Traceback (most recent call last):
    ...
    _pickle.UnpicklingError: refused global posix.getcwd
    """
    obj = RestrictedUnpickler(io.BytesIO(data)).load()
    _no_object_arrays(obj)
    return obj


def _no_object_arrays(x: Any) -> None:
    if isinstance(x, np.ndarray):
        if x.dtype.hasobject:
            raise pickle.UnpicklingError("refused an array of Python objects")
    elif isinstance(x, dict):
        for v in x.values():
            _no_object_arrays(v)
    elif isinstance(x, list | tuple):
        for v in x:
            _no_object_arrays(v)


@dataclass
class MvectorIndex:
    """The contents of ``audio_indexes.bin``: one row per registered recording."""

    users: list[str]
    features: np.ndarray  # (N, D) float32, raw
    paths: list[str]


def read_index(path: str | Path) -> MvectorIndex:
    """Read and check ``audio_indexes.bin``. Raises UsageError naming the file."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise UsageError(f"{p}: cannot read ({exc.strerror or exc})") from None
    try:
        obj = restricted_loads(data)
    except Exception as exc:  # UnpicklingError, EOFError, ValueError ... from a bad file
        raise UsageError(
            f"{p}: not an mvector audio_indexes.bin this tool will load ({exc})"
        ) from None
    keys = ("users_name", "faces_feature", "users_image_path")
    if not isinstance(obj, dict) or any(k not in obj for k in keys):
        raise UsageError(f"{p}: expected a dict with keys {', '.join(keys)}")
    users, feats, paths = (obj[k] for k in keys)
    if not (isinstance(users, list) and all(isinstance(u, str) for u in users)):
        raise UsageError(f"{p}: users_name is not a list of strings")
    if not (isinstance(paths, list) and all(isinstance(u, str) for u in paths)):
        raise UsageError(f"{p}: users_image_path is not a list of strings")
    arr = np.asarray(feats if len(users) else np.zeros((0, 0)), dtype=np.float32)
    if arr.ndim != 2 or len(arr) != len(users) or len(paths) != len(users):
        raise UsageError(
            f"{p}: {len(users)} names, {len(paths)} paths and features of shape "
            f"{getattr(feats, 'shape', '?')} do not line up"
        )
    return MvectorIndex(users, arr, paths)


def resolve_stored(audio_db: Path, stored: str) -> Path | None:
    """Where a path stored by mvector (relative to mvector's working folder) is now."""
    p = Path(stored)
    cands = [p] if p.is_absolute() else [audio_db.parent / p, audio_db / Path(*p.parts[1:])]
    if p.is_absolute() and len(p.parts) >= 2:  # the folder moved: keep <user>/<file>
        cands.append(audio_db / p.parent.name / p.name)
    for c in cands:
        if c.is_file():
            return c
    return None


def folder_recordings(audio_db: Path) -> dict[str, list[Path]]:
    """mvector's own walk: every file in every ``<user>/`` sub-folder (sorted here)."""
    if not audio_db.is_dir():
        raise UsageError(f"{audio_db}: not a folder")
    out: dict[str, list[Path]] = {}
    for d in sorted(audio_db.iterdir()):
        if d.is_dir():
            files = sorted(f for f in d.iterdir() if f.is_file())
            if files:
                out[d.name] = files
    return out


def import_mvector(lib: Any, audio_db: Path, vectors_from: str | Path | None = None) -> Any:
    """Import mvector's ``audio_db`` into ``lib`` (a :class:`Voiceprints`), one transaction.

    With ``vectors_from`` (the mvector ``model.pth`` that made ``audio_indexes.bin``) whose
    sha256 is the library's checkpoint, the stored vectors are imported as they are (entries
    whose file is gone are dropped, as mvector drops them); files in the user folders that the
    index lacks are embedded with the library's model. Without it, every file of every user
    folder is re-embedded with the library's model (vectors of another model would give
    meaningless scores).
    """
    from ..paths import file_sha256
    from .library import EnrollResult
    from .store import AddReport, Enrolment, ModelMismatchError

    folders = folder_recordings(audio_db)
    items: list[Enrolment] = []
    failures: dict[str, str] = {}
    todo: dict[str, list[str]] = {u: [str(f) for f in fs] for u, fs in folders.items()}
    if vectors_from is not None:
        sha = file_sha256(Path(vectors_from))
        mine = lib.model.checkpoint_sha256
        if sha != mine:
            raise ModelMismatchError(
                f"{vectors_from} (sha256 {sha[:12]}) is not the library's checkpoint "
                f"({lib.model.model}, sha256 {mine[:12]}): its vectors cannot be imported as "
                "they are; import without the model to re-embed the audio"
            )
        index_path = audio_db / INDEX_NAME
        if not index_path.is_file():
            raise UsageError(f"{audio_db}: no {INDEX_NAME} to import vectors from")
        idx = read_index(index_path)
        if idx.features.shape[1] != lib.model.dim and len(idx.users):
            raise UsageError(
                f"{index_path}: {idx.features.shape[1]}-dim vectors, the library holds "
                f"{lib.model.dim}-dim"
            )
        for user, vec, stored in zip(idx.users, idx.features, idx.paths):
            where = resolve_stored(audio_db, stored)
            if where is None:
                continue
            items.append(Enrolment(user, file_sha256(where), str(where), vec.copy()))
            in_folder = todo.get(user, [])
            if str(where) in in_folder:
                in_folder.remove(str(where))
    todo = {u: fs for u, fs in todo.items() if fs}
    embedded = cached = 0
    if todo:
        if lib._extractor is None:
            for fs in todo.values():
                for f in fs:
                    failures[f] = (
                        f"not in {INDEX_NAME}, and this library has no model here to embed it"
                    )
        else:
            for name in todo:
                from .library import check_name

                check_name(name)
            embs, shas, fails, res = lib._embed([f for fs in todo.values() for f in fs])
            failures.update(fails)
            embedded, cached = res.embedded, res.cached
            items += [
                Enrolment(u, shas[f], f, embs[f]) for u, fs in todo.items() for f in fs if f in embs
            ]
    report = lib.store.add(items) if items else AddReport()
    return EnrollResult(report, failures, embedded, cached)
