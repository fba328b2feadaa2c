"""``speaker-sim identify``: who is speaking, 1:N against a voiceprint library."""

from __future__ import annotations

import csv
import io
import json
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from . import common as c
from .ui import EXIT_PARTIAL, STATE, EmbedProgress, errors_to_exit, say
from .voiceprints_cmd import LibModelOpt, RecordOpt, _open, _record, _removed

if TYPE_CHECKING:
    from ..voiceprints.library import Voiceprints


class OutFormat(str, Enum):
    csv = "csv"
    jsonl = "jsonl"


def register(app: typer.Typer) -> None:
    app.command()(identify)


def identify(
    db: Annotated[Path, typer.Argument(help="The library file.")],
    inputs: Annotated[
        list[Path] | None,
        typer.Argument(
            help="wav.scp files, list files (a path a line) or audio files.", show_default=False
        ),
    ] = None,
    top_k: Annotated[int, typer.Option(min=1, help="Candidates per recording.")] = 5,
    threshold: Annotated[
        float | None,
        typer.Option(
            help="Below this cosine the answer is 'unknown' (default: the model's "
            "published threshold; none published: always the best)."
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output file (default stdout).")
    ] = None,
    fmt: Annotated[OutFormat, typer.Option("--format", help="csv or jsonl.")] = OutFormat.csv,
    labels: Annotated[
        Path | None,
        typer.Option(
            help="True speakers: utt2spk (recording speaker), or a CSV with recording "
            "and speaker columns: reports accuracy and open-set figures."
        ),
    ] = None,
    metrics_out: Annotated[
        Path | None, typer.Option("--metrics", help="Write the --labels figures as JSON here.")
    ] = None,
    ann: Annotated[
        bool, typer.Option("--ann", help="Approximate search (faiss-cpu index; exact otherwise).")
    ] = False,
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
    """Who is speaking: one answer per recording. CSV columns recording,speaker,score (the best
    speaker, or 'unknown' below the threshold), then speaker_i,score_i for the ranked
    candidates, then error; JSONL the same fields with a candidates list. Scores are raw
    cosine to each speaker's voiceprint."""
    STATE["quiet"] = quiet
    with errors_to_exit():
        from ..engine.cache import atomic_write_bytes
        from ..errors import UsageError
        from ..io.trials import read_inputs
        from ..voiceprints.library import _DEFAULT

        if bool(inputs) == (record is not None):
            raise UsageError("give recordings (INPUTS...) or --record SECONDS, one of them")
        recorded = _record(record) if record is not None else None
        recs = read_inputs([str(recorded)] if recorded else [str(p) for p in inputs or []])
        truth = _read_labels(labels) if labels else None
        lib = _open(db, model, model_dir, cache_dir, no_cache, device, batch_size, workers, False)
        with lib, _removed(recorded):
            bar = EmbedProgress()
            try:
                res = lib.identify(
                    [str(r.path) for r in recs],
                    top_k,
                    _DEFAULT if threshold is None else threshold,
                    ann,
                    *bar.callbacks,
                )
            finally:
                bar.stop()
            by_path = {a.recording: a for a in res.answers}
            rows = [(r.key, by_path.get(str(r.path)), res.failures.get(str(r.path))) for r in recs]
            data = _render(rows, top_k, fmt)
            if out is None:
                typer.echo(data, nl=False)
            else:
                atomic_write_bytes(out, data.encode())
            thr = "none" if res.threshold is None else f"{res.threshold:g}"
            say(
                f"{len(res.answers)} recordings identified against {lib.load()} speakers "
                f"(threshold {thr}, {'ANN' if ann else 'exact'} search)"
            )
            if truth is not None:
                _report(rows, recs, truth, lib, res.threshold, labels, metrics_out)
            for key, _, why in rows:
                if why:
                    say(f"[red]failed[/red] {escape(key)}: {escape(why)}")
    if res.failures:
        raise typer.Exit(EXIT_PARTIAL)


def _render(rows: list[tuple[str, Any, str | None]], k: int, fmt: OutFormat) -> str:
    buf = io.StringIO()
    if fmt is OutFormat.jsonl:
        for key, a, why in rows:
            d = (
                a.to_dict()
                if a
                else {"recording": key, "speaker": None, "score": None, "candidates": []}
            )
            d["recording"] = key
            d["error"] = why
            buf.write(json.dumps(c._clean(d)) + "\n")
        return buf.getvalue()
    w = csv.writer(buf, lineterminator="\n")
    head = ["recording", "speaker", "score"]
    for i in range(1, k + 1):
        head += [f"speaker_{i}", f"score_{i}"]
    w.writerow([*head, "error"])
    for key, a, why in rows:
        if a is None:
            w.writerow([key, "", "", *[""] * (2 * k), why or ""])
            continue
        cells = [key, a.speaker, f"{a.score:.6f}"]
        for i in range(k):
            s, v = a.candidates[i] if i < len(a.candidates) else ("", None)
            cells += [s, "" if v is None else f"{v:.6f}"]
        w.writerow([*cells, ""])
    return buf.getvalue()


def _read_labels(path: Path) -> dict[str, str]:
    """Recording -> true speaker, keyed as written and by the path it resolves to."""
    from ..errors import UsageError
    from ..io.trials import read_text, read_utt2spk, resolve_path

    text = read_text(path)
    first = text.splitlines()[0] if text.strip() else ""
    if "," in first:
        rows = list(csv.reader(io.StringIO(text)))
        head = [h.strip().lower() for h in rows[0]]
        rc = next((head.index(x) for x in ("recording", "utt", "key", "path") if x in head), None)
        sc = next((head.index(x) for x in ("true_speaker", "speaker", "label") if x in head), None)
        if rc is None or sc is None:
            raise UsageError(f"{path}: a CSV needs a recording column and a speaker column")
        pairs = {r[rc]: r[sc] for r in rows[1:] if len(r) > max(rc, sc)}
    else:
        pairs = read_utt2spk(path)
    out = dict(pairs)
    for k, v in pairs.items():
        out.setdefault(str(resolve_path(k, path.parent).resolve()), v)
    return out


def _report(
    rows: list[tuple[str, Any, str | None]],
    recs: list[Any],
    truth: dict[str, str],
    lib: Voiceprints,
    thr: float | None,
    labels: Path | None,
    metrics_out: Path | None,
) -> None:
    from ..errors import UsageError
    from ..voiceprints.metrics import identification_metrics

    ranked, best, true = [], [], []
    for (key, a, _), r in zip(rows, recs):
        t = truth.get(key, truth.get(str(Path(r.path).resolve())))
        if t is None:
            raise UsageError(f"{labels}: no true speaker for {key!r}")
        if a is None:
            continue
        ranked.append([s for s, _ in a.candidates])
        best.append(a.score)
        true.append(t)
    enrolled = {s.name for s in lib.speakers()}
    m = identification_metrics(ranked, best, true, enrolled, thr)
    if metrics_out is not None:
        c.write_json(metrics_out, m)
    pct = lambda x: "n/a" if x is None else f"{100 * x:.2f} %"  # noqa: E731
    say(
        f"top-1 accuracy {pct(m['top1_accuracy'])}, top-{m['k']} {pct(m['topk_accuracy'])} "
        f"({m['enrolled_speaker_queries']} queries of enrolled speakers, "
        f"{m['unknown_speaker_queries']} of others)"
    )
    o = m["open_set"]
    if thr is not None:
        say(f"at threshold {thr:g}: DIR {pct(o.get('dir'))}, FAR {pct(o.get('far'))}")
    for p in o["dir_at_far"]:
        say(f"DIR {pct(p['dir'])} at FAR {pct(p['far'])} (threshold > {p['threshold']:.4f})")
