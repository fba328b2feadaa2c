"""Find, verify and load checkpoints. The only module that may touch a model hub.

Lookup order for a model's checkpoint file:
``--model-dir`` -> ``$SPEAKER_SIM_PRETRAINED/<name>/`` -> ``./pretrained/<name>/`` ->
the user's pretrained folder (:func:`user_pretrained_dir`, where ``make install`` links the
weights it sets up, so they are found from any working folder) -> the ModelScope cache ->
``modelscope.snapshot_download(id, revision)`` unless offline (``SPEAKER_SIM_OFFLINE=1`` or
``MODELSCOPE_OFFLINE=1``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointMismatchError, WeightsNotFoundError
from .registry import ModelSpec

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net")


@dataclass(frozen=True)
class Found:
    """Where a checkpoint was found and how (``model-dir``, ``env``, ``pretrained``, ...)."""

    path: Path
    source: str


def user_pretrained_dir() -> Path:
    """``$SPEAKER_SIM_DATA/pretrained`` or the user data dir's (``~/.local/share/speaker-sim/
    pretrained`` on Linux): checkpoints there are found from any working folder."""
    env = os.environ.get("SPEAKER_SIM_DATA")
    if env:
        return Path(env).expanduser() / "pretrained"
    from platformdirs import user_data_dir

    return Path(user_data_dir("speaker-sim")) / "pretrained"


def candidate_dirs(spec: ModelSpec, model_dir: str | Path | None = None) -> list[tuple[Path, str]]:
    """The folders searched for ``spec.checkpoint``, in order, with a label for each."""
    dirs: list[tuple[Path, str]] = []
    if model_dir is not None:
        dirs.append((Path(model_dir).expanduser(), "model-dir"))
    env = os.environ.get("SPEAKER_SIM_PRETRAINED")
    if env:
        dirs.append((Path(env).expanduser() / spec.name, "SPEAKER_SIM_PRETRAINED"))
    dirs.append((Path.cwd() / "pretrained" / spec.name, "pretrained"))
    dirs.append((user_pretrained_dir() / spec.name, "user-pretrained"))
    ms_cache = Path(
        os.environ.get("MODELSCOPE_CACHE", Path.home() / ".cache" / "modelscope" / "hub")
    ).expanduser()
    for org in ("iic", "damo"):
        dirs.append((ms_cache / "models" / org / spec.name, "modelscope-cache"))
        dirs.append((ms_cache / org / spec.name, "modelscope-cache"))
    return dirs


def find_checkpoint(spec: ModelSpec, model_dir: str | Path | None = None) -> Found | None:
    """The first existing checkpoint file along the lookup order, or None."""
    for folder, source in candidate_dirs(spec, model_dir):
        for name in (spec.checkpoint, *spec.alt_checkpoints):  # e.g. FunASR: sv.pb, then sv.pth
            path = folder / name
            if path.is_file():
                return Found(path.resolve(), source)
    return None


def offline() -> bool:
    return any(os.environ.get(v, "") in ("1", "true", "True") for v in (
        "SPEAKER_SIM_OFFLINE", "MODELSCOPE_OFFLINE", "HF_HUB_OFFLINE"))  # fmt: skip


def resolve_checkpoint(spec: ModelSpec, model_dir: str | Path | None = None) -> Found:
    """Find the checkpoint, downloading it when online. Raises WeightsNotFoundError."""
    found = find_checkpoint(spec, model_dir)
    if found is not None:
        return found
    if model_dir is not None:
        raise WeightsNotFoundError(
            f"{spec.checkpoint} not found in --model-dir {Path(model_dir).resolve()}: "
            f"put the checkpoint of {spec.id} there under its official name"
        )
    where = Path.cwd() / "pretrained" / spec.name
    searched = "; ".join(f"{folder}/ ({source})" for folder, source in candidate_dirs(spec))
    hint = (
        f"checkpoint {spec.checkpoint} of {spec.id} not found; put it in {where}/ or "
        f"{user_pretrained_dir() / spec.name}/ (or set SPEAKER_SIM_PRETRAINED, or pass "
        f"--model-dir). Searched: {searched}"
    )
    if not spec.revision:  # not on ModelScope (e.g. UniSpeech's wavlm_large_finetune.pth)
        raise WeightsNotFoundError(hint + " — it is not on a model hub: download it from its "
                                   "publisher (README: 'TTS speaker similarity')")  # fmt: skip
    if offline():
        raise WeightsNotFoundError(hint + " — offline, so no download was tried")
    try:
        path = _download(spec)
    except Exception as exc:  # any hub / network failure
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise WeightsNotFoundError(f"{hint} — download from ModelScope failed: {reason}") from None
    return Found(path, "download")


def _download(spec: ModelSpec) -> Path:
    from modelscope.hub.snapshot_download import snapshot_download

    folder = Path(snapshot_download(spec.id, revision=spec.revision))
    for name in (spec.checkpoint, *spec.alt_checkpoints):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"the download has no {spec.checkpoint}")


def checkpoint_hash(path: Path) -> str:
    """sha256 of a checkpoint, memoised under the user cache (``hashes/``) by size, mtime and
    inode, so a warm run does not re-read hundreds of megabytes."""
    from ..paths import default_cache_dir, memoised_sha256

    return memoised_sha256(path, default_cache_dir() / "hashes")


def unwrap_state_dict(obj: Any) -> dict[str, Any]:
    """A plain state dict from what hubs ship: wrapped under a key, with ``module.`` prefixes."""
    import torch

    seen = 0
    while isinstance(obj, Mapping) and seen < 3:
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj, seen = inner, seen + 1
    if not isinstance(obj, Mapping):
        raise CheckpointMismatchError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    out = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for prefix in ("module.", "model.", "encoder.", "embedding_model."):
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix) :]: v for k, v in out.items()}
    return out


def load_checkpoint_into(module: Any, path: Path, arch: str) -> None:
    """Load ``path`` into ``module`` with strict=True; a clear error when keys do not fit."""
    import torch

    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointMismatchError(
            f"{path}: cannot read as a torch checkpoint ({str(exc).splitlines()[0][:200]})"
        ) from None
    state = unwrap_state_dict(raw)
    # Keys a family's checkpoints carry that inference never uses (a training classifier):
    # the only ones let through; every other key must fit exactly.
    ignored = getattr(module, "ignored_checkpoint_keys", ())
    state = {k: v for k, v in state.items() if k not in ignored}
    check_folder = getattr(module, "check_model_folder", None)
    if check_folder is not None:  # a family that reads its model folder's config (FunASR sv.yaml)
        check_folder(path.parent)
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = [f"{path} does not fit architecture {arch}:"]
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:5])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (first: {'; '.join(shapes[:3])})")
        raise CheckpointMismatchError(" ".join(parts))
    module.load_state_dict(state, strict=True)


def load_spec_checkpoint(module: Any, path: Path, spec: ModelSpec) -> None:
    """Load ``path`` into ``spec``'s built network: its architecture's own loader
    ``(module, path, spec)`` when it has one (mvector: the backbone part of
    ``nn.Sequential(backbone, classifier)``), else the strict load of a plain state dict."""
    import importlib

    loader = spec.architecture.loader
    if loader is None:
        load_checkpoint_into(module, path, spec.arch)
        return
    mod, _, fn = loader.partition(":")
    getattr(importlib.import_module(mod), fn)(module, path, spec)
