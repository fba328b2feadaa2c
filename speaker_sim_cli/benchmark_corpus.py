"""The benchmark's recordings: the shared corpus, a folder, a file or a list of them, and the
corpus repeated as distinct content so a cache cannot share it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .errors import UsageError

AUDIO_SUFFIXES = frozenset({".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus"})


# -- corpus ---------------------------------------------------------------------------------
def default_corpus_dir() -> Path:
    """``$SPEAKER_SIM_SHARED/audio``, else ``../shared/audio`` from the working directory or
    from the checkout this package lives in. Raises UsageError when none exists."""
    candidates = []
    env = os.environ.get("SPEAKER_SIM_SHARED")
    if env:
        candidates.append(Path(env).expanduser() / "audio")
    candidates.append(Path.cwd().parent / "shared" / "audio")
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "audio")
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    raise UsageError(
        "no benchmark corpus: ../shared/audio not found (looked in "
        + ", ".join(str(c) for c in candidates)
        + "); pass --files FOLDER or a list file"
    )


def list_audio(folder: Path) -> list[Path]:
    """Audio files under ``folder`` (recursively, by suffix), sorted."""
    return sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()
    )


def read_corpus(source: Path | None) -> list[Path]:
    """The benchmark's recordings.

    ``source`` is a folder (every audio file under it), one audio file, or a text file listing one
    recording per line (blank lines and ``#`` comments skipped; relative paths resolve against
    the list's folder). None: :func:`default_corpus_dir`.
    """
    if source is None:
        source = default_corpus_dir()
    if source.is_dir():
        paths = list_audio(source)
    elif source.is_file() and source.suffix.lower() in AUDIO_SUFFIXES:
        paths = [source]
    elif source.is_file():
        paths = []
        for line in source.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            p = Path(line).expanduser()
            paths.append(p if p.is_absolute() else source.parent / p)
    else:
        raise UsageError(f"--files {source}: no such file or folder")
    if not paths:
        raise UsageError(f"--files {source}: no audio files")
    return [p.resolve() for p in paths]


def expand_corpus(paths: Sequence[Path], repeat: int, workdir: Path) -> list[Path]:
    """The corpus ``repeat`` times over, each copy distinct content (so the cache cannot share).

    Copy ``k >= 1`` of a file is its audio plus a DC offset of ``k`` 16-bit steps (``k / 2**15``),
    which the fbank's per-frame DC removal takes out again, so the speech is the same; written
    under ``workdir/rK/`` in the original container and subtype where libsndfile can write them,
    else as float wav.
    """
    import soundfile as sf

    out = list(paths)
    for k in range(1, repeat):
        offset = k / 2**15
        for i, p in enumerate(paths):
            data, rate = sf.read(str(p), dtype="float64", always_2d=True)
            info = sf.info(str(p))
            dest = workdir / f"r{k:03d}" / f"{i:05d}_{p.name}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                sf.write(str(dest), data + offset, rate, format=info.format, subtype=info.subtype)
            except Exception:  # libsndfile cannot write every format it reads
                dest = dest.with_suffix(".wav")
                sf.write(str(dest), data + offset, rate, format="WAV", subtype="FLOAT")
            out.append(dest)
    return out
