"""Readers for trial lists, wav.scp and path lists; no torch.

Trial formats (detected from the content):

- CSV / TSV with a header: ``enrollment,test[,label]`` and the usual synonyms
  (enroll/test, utt1/utt2, audio1/audio2, label/target/is_target, ...);
- Kaldi trials: ``enroll test [target|nontarget|1|0]``, whitespace separated;
- VoxCeleb lists: ``1 path1 path2``;
- seed-tts-eval pair lists ``generated|prompt|text`` and meta.lst (:mod:`.pairs`).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..records import Recording, TrialList
from . import storage

ENROLL_NAMES = (
    "enrollment",
    "enroll",
    "enrol",
    "enrolment",
    "utt1",
    "audio1",
    "path1",
    "wav1",
    "file1",
    "a",
    "left",
    "ref",
    "reference",
    "prompt",
    "spk",
    "model",
    "enroll_path",
)
TEST_NAMES = ("test", "utt2", "audio2", "path2", "wav2", "file2", "b", "right", "hyp", "probe",
              "segment", "test_path", "trial")  # fmt: skip
LABEL_NAMES = ("label", "target", "is_target", "same", "same_speaker", "key", "labels", "y")
TARGET_WORDS = {"1": 1, "0": 0, "target": 1, "nontarget": 0, "non-target": 0, "true": 1,
                "false": 0, "yes": 1, "no": 0, "tgt": 1, "imp": 0, "impostor": 0}  # fmt: skip


def parse_label(value: str, where: str) -> int:
    v = value.strip().lower()
    if v in TARGET_WORDS:
        return TARGET_WORDS[v]
    try:
        f = float(v)
    except ValueError:
        f = float("nan")
    if f in (0.0, 1.0):
        return int(f)
    raise UsageError(f"{where}: unknown label {value!r} (use 1/0, target/nontarget or true/false)")


def read_text(path: Path | str) -> str:
    if storage.is_url(path):
        url = storage.as_url(path)
        try:
            data = storage.read_bytes(url)
        except FileNotFoundError:
            raise UsageError(f"{url}: object not found") from None
        except OSError as exc:
            raise UsageError(f"{url}: cannot read ({exc.strerror or exc})") from None
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise UsageError(f"{url}: not a UTF-8 text file") from None
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: file not found")
    if path.is_dir():
        raise UsageError(f"{path}: is a directory, expected a file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror})") from None
    return decode_text(path, data)


def decode_text(path: Path | str, data: bytes, first_line: int = 1, bom: bool = True) -> str:
    """``data`` as UTF-8 text; a byte that is not names its line (``first_line`` is the line
    ``data`` starts on) in a UsageError."""
    try:
        return data.decode("utf-8-sig" if bom else "utf-8")
    except UnicodeDecodeError as exc:
        line = first_line + data.count(b"\n", 0, exc.start)
        raise UsageError(f"{path}:{line}: not a UTF-8 text file (byte 0x{data[exc.start]:02x}; "
                         "mixed encodings?)") from None  # fmt: skip


# The longest field any trial-list reader accepts (the csv module's own limit, in characters).
FIELD_LIMIT = csv.field_size_limit()


def read_trials(path: str | Path, gen_dir: str | Path | None = None) -> TrialList:
    """Read a trial list in any supported format. Raises UsageError naming file and line.

    seed-tts-eval's ``|``-separated pair lists (and, with ``gen_dir``, its test sets'
    meta.lst) are read by :func:`speaker_sim_cli.io.pairs.read_pairs`.
    """
    p = Path(path)
    if storage.is_url(path):  # a str that prints as the URL (Path would fold its "//")
        p = _UrlName(storage.as_url(path))  # type: ignore[assignment]
    if is_parquet(p):
        from .trial_parquet import read_parquet_trials

        return read_parquet_trials(p)
    text = read_text(p)
    lines = [(i + 1, ln) for i, ln in enumerate(text.splitlines()) if ln.strip()]
    if not lines:
        raise UsageError(f"{p}: the trial list is empty")
    first = lines[0][1]
    from .pairs import looks_like_pairs, read_pairs

    if gen_dir is not None or looks_like_pairs(first):
        return read_pairs(p, gen_dir)
    if "," in first or ("\t" in first and _header_columns(first.split("\t")) is not None):
        return _read_delimited(p, text, "\t" if "," not in first else ",")
    return _read_whitespace(p, lines)


def is_parquet(path: Path) -> bool:
    """A Parquet file: by its suffix, or its magic bytes."""
    if path.suffix.lower() in (".parquet", ".pq"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PAR1"
    except OSError:
        return False


def _norm(name: str) -> str:
    return name.strip().lower().replace(" ", "_").replace("-", "_")


def _header_columns(fields: Sequence[str]) -> tuple[int, int, int | None] | None:
    names = [_norm(f) for f in fields]
    e = next((names.index(n) for n in ENROLL_NAMES if n in names), None)
    t = next((names.index(n) for n in TEST_NAMES if n in names and names.index(n) != e), None)
    if e is None or t is None:
        return None
    lab = next((names.index(n) for n in LABEL_NAMES if n in names), None)
    return e, t, lab


def csv_rows(
    p: Path, text: str, delim: str = ",", first_line: int = 1, allow_empty: bool = False
) -> list[tuple[int, list[str]]]:
    """The non-blank records of a delimited file with the line each starts on. A malformed
    record (a field past the csv module's size limit, a stray NUL, ...) is a UsageError naming
    the file and the line, never a csv.Error. ``text`` starts on line ``first_line`` (a part
    of a streamed file)."""
    reader = csv.reader(io.StringIO(text), delimiter=delim)
    rows: list[tuple[int, list[str]]] = []
    while True:
        start = reader.line_num + first_line
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            msg = str(exc)
            if "field larger than field limit" in msg:
                msg = f"a field is longer than {csv.field_size_limit():,} characters"
            raise UsageError(f"{p}:{start}: malformed line ({msg})") from None
        if any(c.strip() for c in row):
            rows.append((start, row))
    if not rows and not allow_empty:
        raise UsageError(f"{p}: no rows (only blank lines or empty fields)")
    return rows


def _read_delimited(p: Path, text: str, delim: str) -> TrialList:
    rows = csv_rows(p, text, delim)
    header = rows[0][1]
    cols = _header_columns(header)
    fmt = "csv" if delim == "," else "tsv"
    if cols is None:
        # No recognisable header: positional columns enrollment,test[,label].
        if len(header) not in (2, 3):
            raise UsageError(
                f"{p}:{rows[0][0]}: no header naming the enrollment and test columns "
                f"(expected e.g. 'enrollment,test,label'), and {len(header)} fields"
            )
        e, t, lab = 0, 1, (2 if len(header) == 3 else None)
        body = rows
        fmt += " (no header)"
    else:
        e, t, lab = cols
        body = rows[1:]
    enroll, test, labels, numbers = delimited_body(p, body, e, t, lab, len(header))
    if not enroll:
        raise UsageError(f"{p}: the trial list has a header but no trials")
    arr = np.asarray(labels, dtype=np.int8) if lab is not None else None
    return TrialList(enroll, test, arr, str(p), fmt, numbers)


def delimited_body(
    p: Path, body: list[tuple[int, list[str]]], e: int, t: int, lab: int | None, width: int
) -> tuple[list[str], list[str], list[int], list[int]]:
    """The trials of delimited records (after the header): enroll, test, labels, lines."""
    enroll: list[str] = []
    test: list[str] = []
    labels: list[int] = []
    numbers: list[int] = []
    for lineno, r in body:
        if len(r) != width:
            raise UsageError(f"{p}:{lineno}: expected {width} fields, found {len(r)}")
        a, b = r[e].strip(), r[t].strip()
        if not a or not b:
            raise UsageError(f"{p}:{lineno}: empty enrollment or test field")
        enroll.append(a)
        test.append(b)
        numbers.append(lineno)
        if lab is not None:
            labels.append(parse_label(r[lab], f"{p}:{lineno}"))
    return enroll, test, labels, numbers


def _remember(known: dict[str, int], word: str, where: str) -> int:
    known[word] = parse_label(word, where)
    return known[word]


def _read_whitespace(p: Path, lines: list[tuple[int, str]]) -> TrialList:
    first = lines[0][1].split()
    vox = (
        len(first) == 3
        and first[0].lower() in TARGET_WORDS
        and first[2].lower() not in TARGET_WORDS
    )
    enroll, test, labels, numbers = [], [], [], []
    has_label: bool | None = None
    first_line = 0
    known: dict[str, int] = {}  # label spellings parsed so far
    for lineno, line in lines:
        f = line.split()
        where = f"{p}:{lineno}"
        if len(line) > FIELD_LIMIT and max(map(len, f)) > FIELD_LIMIT:
            raise UsageError(f"{where}: malformed line (a field is longer than "
                             f"{FIELD_LIMIT:,} characters)")  # fmt: skip
        if vox:
            if len(f) != 3:
                raise UsageError(f"{where}: expected 'label path1 path2', found {len(f)} fields")
            lab = known.get(f[0])
            labels.append(lab if lab is not None else _remember(known, f[0], where))
            enroll.append(f[1])
            test.append(f[2])
        else:
            if len(f) not in (2, 3):
                raise UsageError(
                    f"{where}: expected 'enroll test [target|nontarget]', found {len(f)} fields"
                )
            if has_label is None:
                has_label, first_line = len(f) == 3, lineno
            elif has_label != (len(f) == 3):
                raise UsageError(
                    f"{where}: {'no label' if has_label else 'a label'}, but line {first_line} "
                    f"{'has one' if has_label else 'has none'} (some lines have a label and some "
                    "do not)"
                )
            enroll.append(f[0])
            test.append(f[1])
            if has_label:
                lab = known.get(f[2])
                labels.append(lab if lab is not None else _remember(known, f[2], where))
        numbers.append(lineno)
    arr = np.asarray(labels, dtype=np.int8) if labels else None
    return TrialList(enroll, test, arr, str(p), "voxceleb" if vox else "kaldi", numbers)


def read_wav_scp(path: str | Path, allow_commands: bool = False) -> dict[str, str]:
    """Kaldi wav.scp: ``utt path`` (the path may contain spaces). Raises UsageError."""
    p = _UrlName(storage.as_url(path)) if storage.is_url(path) else Path(path)
    out: dict[str, str] = {}
    for lineno, line in enumerate(read_text(p).splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(maxsplit=1)
        if len(parts) != 2:
            raise UsageError(f"{p}:{lineno}: expected 'utt-id path', found {line.strip()!r}")
        utt, target = parts
        if target.rstrip().endswith("|") and not allow_commands:
            raise UsageError(
                f"{p}:{lineno}: entry {utt!r} is a command ({target.strip()!r}); "
                "pass --allow-commands to run wav.scp commands, or list audio files"
            )
        if utt in out:
            raise UsageError(f"{p}:{lineno}: utterance id {utt!r} appears twice")
        out[utt] = target.strip()
    if not out:
        raise UsageError(f"{p}: wav.scp is empty")
    return out


def read_inputs(inputs: Sequence[str | Path]) -> list[Recording]:
    """``embed`` inputs: wav.scp files, list files (one path a line) or audio paths."""
    from ..audio.formats import is_audio_path

    recs: list[Recording] = []
    for item in inputs:
        p = Path(item)
        url = storage.as_url(item) if storage.is_url(item) else None
        if is_audio_path(p):
            recs.append(Recording(url or str(item), Path(url) if url else p.resolve()))
            continue
        text = read_text(url or p)
        base: Path | str = storage.url_parent(url) if url else p.parent
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if p.suffix == ".scp" or (
            all(len(ln.split(maxsplit=1)) == 2 for ln in lines)
            and not any(is_audio_path(Path(ln.split()[0])) for ln in lines)
            and (url is not None or not any(resolve_path(ln, base).exists() for ln in lines[:20]))
        ):
            for utt, target in read_wav_scp(url or p).items():
                recs.append(Recording(utt, resolve_path(target, base)))
        else:
            recs.extend(Recording(ln, resolve_path(ln, base)) for ln in lines)
    if not recs:
        raise UsageError("no recordings given")
    return recs


def resolve_path(item: str, root: Path | str) -> Path:
    """``item`` against ``root``. A URL (or an item under a URL root) comes back as a Path
    that folds ``//``; :func:`storage.as_url` restores it where it is opened."""
    if item.rstrip().endswith("|"):  # a wav.scp command, run as written
        return Path(item)
    if storage.is_url(item) or storage.is_url(root):
        return Path(storage.join(root, item))
    p = Path(item).expanduser()
    return p if p.is_absolute() else (Path(root) / p)


class _UrlName(str):
    """A URL standing where a path is expected: ``.parent`` is the URL's folder."""

    @property
    def parent(self) -> str:
        return storage.url_parent(self)

    @property
    def suffix(self) -> str:
        return Path(self).suffix

    @property
    def name(self) -> str:
        return self.rstrip("/").rsplit("/", 1)[-1]


def source_folder(source: str) -> Path | str:
    """The folder of a trial list (a URL's folder for a URL), against which items resolve."""
    if storage.is_url(source):
        return storage.url_parent(source)
    return Path(source).resolve().parent


def resolve_trial_items(
    trials: TrialList,
    root: Path | None = None,
    wav_scp: dict[str, str] | None = None,
    scp_dir: Path | None = None,
) -> tuple[dict[str, Recording], dict[str, str]]:
    """Map each unique item to a Recording; items missing from wav.scp are returned apart.

    Without ``root``, relative paths resolve against the trial file's folder; when the first
    item is not there, against the nearest parent folder that has it.
    """
    items = trials.items()
    missing: dict[str, str] = {}
    out: dict[str, Recording] = {}
    if wav_scp is not None:
        base = scp_dir or Path.cwd()
        for it in items:
            if it in wav_scp:
                out[it] = Recording(it, resolve_path(wav_scp[it], base))
            else:
                missing[it] = "utterance id not in wav.scp"
        return out, missing
    if root is None:
        folder = source_folder(trials.source)
        root = guess_root(folder, items) if isinstance(folder, Path) else folder  # type: ignore[assignment]
    for it in items:
        out[it] = Recording(it, resolve_path(it, root))  # type: ignore[arg-type]
    return out, missing


def guess_root(start: Path, items: Sequence[str]) -> Path:
    rel = [it for it in items if not Path(it).expanduser().is_absolute()][:20]
    if not rel:
        return start
    for cand in (start, *start.parents):
        if any((cand / it).exists() for it in rel):
            return cand
    return start


def _read_table(path: str | Path, min_fields: int, what: str) -> list[tuple[int, list[str]]]:
    p = Path(path)
    rows = []
    for lineno, line in enumerate(read_text(p).splitlines(), 1):
        f = line.split()
        if not f:
            continue
        if len(f) < min_fields:
            raise UsageError(f"{p}:{lineno}: expected {what}, found {line.strip()!r}")
        rows.append((lineno, f))
    if not rows:
        raise UsageError(f"{p}: the file is empty")
    return rows


def read_spk2utt(path: str | Path) -> dict[str, list[str]]:
    """Kaldi spk2utt: ``speaker utt1 utt2 ...`` (utterances are ids or paths)."""
    out: dict[str, list[str]] = {}
    for lineno, f in _read_table(path, 2, "'speaker utt1 [utt2 ...]'"):
        if f[0] in out:
            raise UsageError(f"{path}:{lineno}: speaker {f[0]!r} appears twice")
        out[f[0]] = f[1:]
    return out


def read_utt2spk(path: str | Path) -> dict[str, str]:
    """Kaldi utt2spk: ``utt speaker`` (tab or space separated; the utt may be a path)."""
    out: dict[str, str] = {}
    for lineno, f in _read_table(path, 2, "'utt speaker'"):
        if len(f) > 2:
            raise UsageError(f"{path}:{lineno}: expected 'utt speaker', found {len(f)} fields")
        out[f[0]] = f[1]
    return out
