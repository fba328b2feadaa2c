"""``speaker-sim enroll``: add speakers' recordings to a voiceprint library (see identify_cmd)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from . import common as c
from .ui import EXIT_PARTIAL, STATE, EmbedProgress, errors_to_exit, say

if TYPE_CHECKING:
    from ..voiceprints.library import Voiceprints

DbArg = Annotated[
    Path, typer.Argument(help="The library file (SQLite; created on first enrolment).")
]
LibModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model", "-m", help="Model id or alias (default: the library's own; CAM++ zh-en new)."
    ),
]


RecordOpt = Annotated[
    float | None,
    typer.Option(
        "--record",
        min=0.5,
        max=60.0,
        help="Record this many seconds from the default input device instead of files "
        "(needs the server extra and PortAudio).",
        show_default=False,
    ),
]


class Rule(str, Enum):
    unit_mean = "unit-mean"
    raw_mean = "raw-mean"


def register(app: typer.Typer) -> None:
    app.command()(enroll)


def _open(
    db: Path,
    model: str | None,
    model_dir: Path | None,
    cache_dir: Path | None,
    no_cache: bool,
    device: str,
    batch_size: int,
    workers: int,
    create: bool,
    rule: str = "unit-mean",
) -> Voiceprints:
    from ..engine.config import EngineConfig
    from ..voiceprints.library import Voiceprints

    engine = EngineConfig(device=device, batch_size=batch_size, workers=workers)
    return Voiceprints(
        db,
        model,
        model_dir,
        engine=engine,
        cache_dir=cache_dir,
        use_cache=not no_cache,
        create=create,
        rule=rule,
    )


def _speaker_map(
    args: list[str],
    spk2utt: Path | None,
    utt2spk: Path | None,
    wav_scp: Path | None,
    folders: Path | None,
) -> dict[str, list[str]]:
    """Speaker -> recordings (paths) from whichever one form was given."""
    from ..audio.formats import is_audio_path
    from ..errors import UsageError
    from ..io.trials import read_spk2utt, read_utt2spk, read_wav_scp, resolve_path
    from ..voiceprints.mvector_import import folder_recordings

    forms = [x for x in (args, spk2utt, utt2spk, folders) if x]
    if len(forms) != 1:
        raise UsageError(
            "give one of: SPEAKER AUDIO..., --spk2utt FILE, --utt2spk FILE, --folders DIR "
            "(or --mvector DIR)"
        )
    if wav_scp is not None and not (spk2utt or utt2spk):
        raise UsageError("--wav-scp goes with --spk2utt or --utt2spk")
    if args:
        if len(args) < 2:
            raise UsageError("expected SPEAKER AUDIO... (a speaker name, then recordings)")
        return {args[0]: args[1:]}
    if folders is not None:
        return {
            u: [str(f) for f in fs if is_audio_path(f)]
            for u, fs in folder_recordings(folders).items()
        }
    src = spk2utt or utt2spk
    assert src is not None
    if spk2utt is not None:
        pairs = [(s, u) for s, us in read_spk2utt(spk2utt).items() for u in us]
    else:
        pairs = [(s, u) for u, s in read_utt2spk(src).items()]
    scp = read_wav_scp(wav_scp) if wav_scp else None
    out: dict[str, list[str]] = {}
    for s, u in pairs:
        if scp is not None:
            if u not in scp:
                raise UsageError(f"{wav_scp}: no utterance {u!r} (named in {src})")
            target = str(resolve_path(scp[u], wav_scp.parent))  # type: ignore[union-attr]
        else:
            target = str(resolve_path(u, src.parent))
        out.setdefault(s, []).append(target)
    return out


def enroll(
    db: DbArg,
    args: Annotated[
        list[str] | None,
        typer.Argument(help="SPEAKER AUDIO...: a speaker and its recordings.", show_default=False),
    ] = None,
    spk2utt: Annotated[Path | None, typer.Option(help="Kaldi spk2utt (speaker utt...).")] = None,
    utt2spk: Annotated[Path | None, typer.Option(help="Kaldi utt2spk (utt speaker).")] = None,
    wav_scp: Annotated[Path | None, typer.Option(help="utt -> path for the two above.")] = None,
    folders: Annotated[
        Path | None, typer.Option(help="One sub-folder per speaker (mvector's audio_db layout).")
    ] = None,
    mvector: Annotated[
        Path | None,
        typer.Option(help="Import mvector's audio_db folder (re-embeds its audio by default)."),
    ] = None,
    mvector_model: Annotated[
        Path | None,
        typer.Option(
            help="The mvector model.pth that made audio_indexes.bin: import its vectors "
            "as they are when it is the library's checkpoint."
        ),
    ] = None,
    voiceprint: Annotated[
        Rule,
        typer.Option(
            help="New library: voiceprint = unit length of the mean of unit "
            "(unit-mean) or raw (raw-mean, mvector's) embeddings."
        ),
    ] = Rule.unit_mean,
    model: LibModelOpt = None,
    model_dir: c.ModelDirOpt = None,
    cache_dir: c.CacheDirOpt = None,
    no_cache: c.NoCacheOpt = False,
    device: c.DeviceOpt = "auto",
    batch_size: c.BatchSizeOpt = 0,
    workers: c.WorkersOpt = -1,
    record: RecordOpt = None,
    quiet: c.QuietOpt = False,
) -> None:
    """Add recordings to speakers in the library DB (one transaction; speakers are created on
    first use). The same content twice for a speaker is a no-op, reported. Recordings that
    cannot be embedded are listed with their reason (exit 3); the rest is enrolled."""
    STATE["quiet"] = quiet
    with errors_to_exit():
        from ..errors import UsageError

        recorded = None
        if record is not None:
            if len(args or []) != 1 or spk2utt or utt2spk or folders or mvector:
                raise UsageError("--record goes with one SPEAKER name and no recordings")
            recorded = _record(record)
            args = [args[0], str(recorded)]  # type: ignore[index]
        if mvector is not None:
            if args or spk2utt or utt2spk or folders:
                raise UsageError("--mvector imports a whole audio_db; give no other recordings")
            spk = None
        else:
            if mvector_model is not None:
                raise UsageError("--mvector-model goes with --mvector")
            spk = _speaker_map(list(args or []), spk2utt, utt2spk, wav_scp, folders)
        lib = _open(
            db,
            model,
            model_dir,
            cache_dir,
            no_cache,
            device,
            batch_size,
            workers,
            True,
            voiceprint.value,
        )
        with lib, _removed(recorded):
            bar = EmbedProgress()
            try:
                if spk is None:
                    assert mvector is not None
                    res = lib.import_mvector(mvector, mvector_model)
                else:
                    res = lib.enroll_map(spk, *bar.callbacks)
            finally:
                bar.stop()
            rep = res.report
            n_spk = len({e.speaker for e in rep.added})
            say(
                f"{db}: {len(rep.added)} recordings enrolled for {n_spk} speakers "
                f"({len(rep.new_speakers)} new); {res.embedded} embedded, {res.cached} from cache"
            )
            for e, old in rep.duplicates:
                say(
                    f"already enrolled for {escape(e.speaker)}: {escape(e.path)} "
                    f"(same content as {escape(old)}); nothing to do"
                )
            for path, why in res.failures.items():
                say(f"[red]failed[/red] {escape(path)}: {escape(why)}")
    if res.failures:
        raise typer.Exit(EXIT_PARTIAL)


@contextmanager
def _removed(path: Path | None) -> Iterator[None]:
    try:
        yield
    finally:
        if path is not None:
            path.unlink(missing_ok=True)


def _record(seconds: float) -> Path:
    """Record from the microphone to a temporary WAV (removed by the caller)."""
    import tempfile

    from ..voiceprints.recording import record_to_file

    path, speech = record_to_file(seconds, Path(tempfile.gettempdir()), announce=say)
    say(f"recorded: {speech:.1f} s of speech found")
    return path
