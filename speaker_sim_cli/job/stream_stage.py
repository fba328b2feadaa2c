"""The streamed route of a :class:`~speaker_sim_cli.job.score.ScoreJob`: a trial file read in
chunks, vectors looked up by a hash index over the key table, scores written as they come and
kept for the metrics as two compact arrays. Same scores, metrics and report as the in-memory
route (:func:`~speaker_sim_cli.job.stage.score_stage`), in memory of the recordings' vectors
plus one chunk.

When every vector is known before the list is read (an ``embed`` npy folder, plain cosine,
scores to a file) the list is read once: each chunk is parsed (a thread ahead), looked up,
scored and written; a bad line late in the list still leaves no score file (the temp file is
removed) and its message names the line. Otherwise a first pass checks every line and
collects the unique keys before any model work, and a second pass scores.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from ..errors import UsageError
from ..io.trial_stream import KeyTable, ListSummary, TrialStream, prefetch, regroup, scan
from ..records import EmbedResult, Failure
from ..scoring.sorted_metrics import ScoreCollector
from ..scoring.stream import CohortNorm, StreamStats, VectorTable, score_chunks
from .events import Progress, ProgressFn, embed_callbacks
from .items import ScoringOptions, embed_items
from .report import ScoreReport, job_report
from .setup import keys_as_paths, scoring_options

if TYPE_CHECKING:
    from .score import ScoreJob

DUPLICATES_LIMIT = 16_000_000  # 8 bytes a trial to count duplicate trials
WRITE_BEHIND = 1  # chunks written by a thread of their own while the next ones are scored
SPILL_TRIALS = 8_000_000  # past this many, the metrics' scores wait in a temp file


def streamable(job: ScoreJob) -> bool:
    """A trial file the chunked reader takes (not a pair list, mvector lists or a parsed
    list), for a caller that does not want the per-trial arrays back."""
    src = job.source
    if not job.outputs.stream or src.trials is not None or src.path is None:
        return False
    if src.gen_dir is not None or src.mvector_lists is not None:
        return False
    from ..io.storage import is_url
    from ..io.trials import is_parquet

    # A list or score file in a bucket takes the whole-list route, which reads and writes URLs
    # (io/storage); the chunked reader and writer work on local files.
    if is_url(src.path) or (job.outputs.out is not None and is_url(job.outputs.out)):
        return False

    p = Path(src.path)
    if not p.is_file():
        return True  # the reader's own "file not found" / "is a directory"
    if is_parquet(p):
        return True
    from ..io.pairs import looks_like_pairs

    with open(p, "rb") as f:
        head = f.read(65536).decode("utf-8", errors="replace").lstrip("\ufeff")
    first = next((ln for ln in head.splitlines() if ln.strip()), "")
    return not looks_like_pairs(first)


class _Items:
    """What the embedding stage reads of a TrialList, from the first pass."""

    def __init__(self, s: ListSummary) -> None:
        self._items = s.keys.to_list()
        self.enroll = s.enroll_keys.to_list()
        self.source = s.source

    def items(self) -> list[str]:
        return self._items


class _Lookup:
    """Vectors by key row, why each other trial key has none, the cohort, what was found."""

    def __init__(
        self, table: KeyTable, vt: VectorTable, reasons: dict[str, str],
        cohort: np.ndarray | None, failures: list[Failure], result: EmbedResult,
        recordings: int, info: dict[str, Any], norm_rows: np.ndarray, source: Any,
    ) -> None:  # fmt: skip
        self.table, self.vt, self.reasons, self.cohort = table, vt, reasons, cohort
        self.failures, self.result, self.recordings = failures, result, recordings
        self.info, self.norm_rows = info, norm_rows
        self.source = source  # what the report's "model" block describes

    def release(self) -> None:
        """Let go of the vectors (a memory-mapped matrix is unmapped) and the key index."""
        self.vt = VectorTable(np.zeros((0, 1), np.float32))
        self.table = KeyTable(pa.array([], pa.string()))  # and the hash index
        release = getattr(self.source, "release", None)
        if release is not None:
            release()


def _compact(job: ScoreJob, s: ListSummary, opt: ScoringOptions) -> _Lookup:
    """An ``embed`` npy folder looked up as one key column and one matrix: no Python object
    per vector (the corpus-scale route; the sharded store feeds the same two things)."""
    from ..io.vector_table import load_npy_folder
    from ..scoring.norm import speaker_mean_cohort

    assert job.model.embeddings is not None
    t0 = time.perf_counter()
    km = load_npy_folder(job.model.embeddings)
    keys_as_paths(opt)
    table = KeyTable(km.keys)
    (ids,) = table.ids(s.keys.keys)
    why = km.reason()
    missing = s.keys.keys.filter(pa.array(ids < 0)).to_pylist()
    reasons = dict.fromkeys(missing, why)
    failures = [Failure(k, k, why) for k in missing]
    paths = set(s.keys.to_list()) if opt.cohort else None
    cohort = None
    info: dict[str, Any] = {}
    n_found = len(s.keys) - len(missing)
    n_paths = len(s.keys)
    if opt.cohort:
        ckeys = [r.key for r in opt.cohort]
        (cids,) = table.ids(pa.array(ckeys, pa.string()))
        keep = np.flatnonzero(cids >= 0)
        seen = set(missing)
        assert paths is not None
        for k, i in zip(ckeys, cids.tolist()):
            if k in paths:
                continue
            paths.add(k)
            n_paths += 1
            if i < 0 and k not in seen:
                failures.append(Failure(k, k, why))
                seen.add(k)
            elif i >= 0:
                n_found += 1
        if len(keep):
            cohort = km.matrix[cids[keep]].astype(np.float64)
            if opt.cohort_speakers is not None:
                _, cohort = speaker_mean_cohort(cohort, [opt.cohort_speakers[i] for i in keep])
    res = EmbedResult({}, {}, 0, n_found, time.perf_counter() - t0)
    job.extractor = None
    return _Lookup(table, VectorTable(km.matrix), reasons, cohort, failures, res, n_paths,
                   info, _distinct(ids[ids >= 0]), km)  # fmt: skip


def _general(
    job: ScoreJob, s: ListSummary, scp: dict[str, str] | None, opt: ScoringOptions,
    progress: ProgressFn | None,
) -> _Lookup:  # fmt: skip
    """Every unique recording embedded once by the job's embedding stage (cache, engine)."""
    items = _Items(s)
    source, recs, missing = job._embedding_source(items, scp, opt)  # type: ignore[arg-type]
    advance, start = embed_callbacks(progress)
    stop = job.scoring.on_error == "fail"
    emb = embed_items(items, recs, missing, source, advance, start, stop, opt)  # type: ignore[arg-type]
    v = emb.vectors
    table = KeyTable(pa.array(v.keys, pa.string()))
    return _Lookup(table, VectorTable(v.matrix), v.reasons, v.cohort, emb.failures, emb.result,
                   emb.recordings, dict(v.info), np.arange(len(v.keys)), source)  # fmt: skip


class _Unknown(Exception):
    """A key of the list has no vector: the one-pass route hands over to the two-pass one."""


class _OnePass:
    """The keys of a list read once, looked up chunk by chunk in a key table that holds every
    one of them (else :class:`_Unknown`); which rows the list used."""

    def __init__(self, table: KeyTable, check_fmt: str | None) -> None:
        self.table, self.check_fmt = table, check_fmt
        self.seen = np.zeros(len(table), bool)

    def ids(self, ch: Any) -> tuple[np.ndarray, np.ndarray]:
        from ..io.scorefiles import check_whitespace_safe

        if self.check_fmt is not None:  # keys of a CSV / TSV / Parquet list may hold spaces
            u = pa.chunked_array([ch.enroll, ch.test]).unique()
            check_whitespace_safe(u.to_pylist(), self.check_fmt)
        a, b = self.table.ids(ch.enroll, ch.test)
        if (a < 0).any() or (b < 0).any():
            raise _Unknown
        self.seen[a] = True
        self.seen[b] = True
        return a, b


def _table(job: ScoreJob) -> _Lookup:
    """An ``embed`` npy folder's keys (hash-indexed) and memory-mapped matrix, for a list
    not read yet."""
    from ..io.vector_table import load_npy_folder

    assert job.model.embeddings is not None
    t0 = time.perf_counter()
    km = load_npy_folder(job.model.embeddings)
    table = KeyTable(km.keys)
    table.ids()  # the index, built now
    res = EmbedResult({}, {}, 0, 0, time.perf_counter() - t0)
    job.extractor = None
    return _Lookup(table, VectorTable(km.matrix), {}, None, [], res, 0, {},
                   np.empty(0, np.int64), km)  # fmt: skip


def _estimate_trials(path: Path) -> int:
    """About how many trials a list holds, from its size and its first MiB."""
    from ..io.trials import is_parquet

    if is_parquet(path):
        import pyarrow.parquet as pq

        try:
            return int(pq.ParquetFile(path).metadata.num_rows)
        except (pa.ArrowException, OSError):
            return 0
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    return int(size * max(head.count(b"\n"), 1) / max(len(head), 1))


def run_streamed(job: ScoreJob, progress: ProgressFn | None = None) -> ScoreReport:
    """The job's run for a streamable trial file (:func:`streamable`)."""
    from ..io.vector_table import is_npy_folder

    t0 = time.perf_counter()
    m, out, sc = job.model, job.outputs, job.scoring
    # Every vector known before the list is read, plain cosine, scores to a file: one pass
    # (to stdout, a late bad line would follow rows already printed). A key with no vector
    # makes an error column, which a score file's header must know of: then two passes.
    once = (m.embeddings is not None and is_npy_folder(Path(m.embeddings))
            and not sc.norm and sc.cohort is None and sc.enroll_map is None
            and sc.mean_from is None and (out.out is not None or not out.stdout))  # fmt: skip
    if once:
        try:
            return _run(job, progress, True, t0)
        except _Unknown:
            pass  # nothing was written (the temp file is gone)
    return _run(job, progress, False, t0)


def _run(job: ScoreJob, progress: ProgressFn | None, once: bool, t0: float) -> ScoreReport:
    from ..io.score_writer import StreamedScores
    from ..io.scorefiles import check_whitespace_safe
    from ..io.trials import read_wav_scp
    from ..io.vector_table import is_npy_folder

    src, m, out, sc = job.source, job.model, job.outputs, job.scoring
    assert src.path is not None
    path = Path(src.path)
    stream = TrialStream(path)
    summary = None if once else scan(stream)  # every line read and checked before model work
    if m.embeddings is not None and src.wav_scp is not None:
        raise UsageError("--embeddings and --wav-scp do not go together: trial items are keys")
    if m.embeddings is not None and m.ray is not None:
        raise UsageError("--embeddings and --ray do not go together: nothing is embedded")
    scp = read_wav_scp(src.wav_scp, src.allow_commands) if src.wav_scp else None
    if src.root is not None and not src.root.is_dir():
        raise UsageError(f"--root {src.root}: not a folder")
    if out.fmt not in ("csv", "parquet") and summary is not None:
        check_whitespace_safe(summary.keys.to_list(), out.fmt)
    if sc.score_scale and out.fmt not in ("csv", "parquet"):
        raise UsageError(f"--score-scale adds a column, which the {out.fmt} format has no "
                         "place for: use --format csv")  # fmt: skip
    if out.fmt == "parquet" and out.out is None and out.stdout:
        raise UsageError("--format parquet needs --out FILE (Parquet is not written to stdout)")
    root = src.root or path.resolve().parent
    opt = scoring_options(sc, root, scp, src.scp_dir)
    t_load = time.perf_counter()
    one: _OnePass | None = None
    if summary is None:
        lk = _table(job)
        keys_as_paths(opt)
        check = None
        if out.fmt not in ("csv", "parquet") and stream.format not in ("kaldi", "voxceleb"):
            check = out.fmt
        one = _OnePass(lk.table, check)
        total = _estimate_trials(path)
        labelled = stream.has_labels
    else:
        compact = (m.embeddings is not None and is_npy_folder(Path(m.embeddings))
                   and opt.enroll_map is None and opt.mean_from is None)  # fmt: skip
        lk = _compact(job, summary, opt) if compact else _general(job, summary, scp, opt,
                                                                  progress)  # fmt: skip
        # The list's keys are looked up: let them go (and the parser's freed buffers too).
        summary.keys = summary.enroll_keys = KeyTable(pa.array([], pa.string()))
        pa.default_memory_pool().release_unused()
        total = summary.trials
        labelled = summary.targets is not None
    load_s = time.perf_counter() - t_load - lk.result.seconds
    if progress is not None:
        progress(Progress("embed", "done"))
    norm = None
    stage_info: dict[str, Any] = {}
    if opt.norm:
        if lk.cohort is None:
            raise ValueError("--cohort: none of its recordings could be embedded")
        if opt.norm not in ("snorm", "asnorm"):
            raise ValueError(f"unknown score normalisation {opt.norm!r}: use asnorm or snorm")
        c = lk.cohort
        stage_info["norm"] = {"method": opt.norm, "cohort": len(c), "top_n": min(opt.top_n, len(c))}
        top_n = None if opt.norm == "snorm" else opt.top_n
        norm = CohortNorm.build(lk.vt, c, top_n, lk.norm_rows)
    reasons = lk.reasons
    scale = sc.score_scale
    writer = None
    if out.out is not None or out.stdout:
        from ..scoring.scales import rescaled_columns

        names = tuple(rescaled_columns(scale, np.zeros(1)))
        writer = StreamedScores(out.out, out.fmt, labelled, bool(reasons),
                                sc.on_error == "skip", names)  # fmt: skip
    # duplicate trials: one int64 per trial, for lists up to DUPLICATES_LIMIT (one pass: the
    # count is known at the end, so the array is let go as soon as the list is longer)
    pairs = None
    if total <= DUPLICATES_LIMIT or one is not None:
        pairs = np.empty(total if one is None else DUPLICATES_LIMIT, np.int64)
    table, n_keys = lk.table, max(len(lk.table), 1)
    done = 0

    def ids(ch: Any) -> tuple[np.ndarray, np.ndarray]:
        nonlocal done, pairs
        a, b = one.ids(ch) if one is not None else table.ids(ch.enroll, ch.test)
        if pairs is not None and done + len(a) > len(pairs):
            pairs = None
        if pairs is not None:  # the same two keys (keys with no row: told apart by their text)
            pairs[done : done + len(a)] = _pair_codes(ch, a, b, n_keys)
        done += len(a)
        return a, b

    def looked_up(chunks: Any) -> Any:  # in the reader's thread: parse, then look up
        for ch in chunks:
            ch.rows = ids(ch)
            yield ch

    def advance(n: int) -> None:
        if progress is not None:
            progress(Progress("score", "advance", n))

    extra = None
    if scale:
        from ..scoring.scales import rescaled_columns

        def extra(s: np.ndarray) -> dict[str, np.ndarray]:
            return rescaled_columns(scale, s)

    collector = None
    # A long list's scores wait on disk (beside the score file) while the vectors are in
    # memory, and are read back for the metrics once the vectors are let go.
    spill = None
    if total > SPILL_TRIALS:
        spill = str(out.out.parent) if out.out is not None else tempfile.gettempdir()
    if summary is not None and summary.targets is not None:
        t = summary.targets
        collector = ScoreCollector(np.float64, t, summary.trials - t, spill=spill)
    elif labelled:
        collector = ScoreCollector(np.float64, capacity=total + total // 4 + 1024, spill=spill)
    if progress is not None:
        progress(Progress("score", "start", total))
    with writer if writer is not None else contextlib.nullcontext():
        chunks = prefetch(looked_up(regroup(stream)))
        try:
            st = score_chunks(chunks, _rows_of, lk.vt, reasons.get, writer, norm, advance,
                              extra, collector=collector, behind=WRITE_BEHIND)  # fmt: skip
        finally:
            chunks.close()  # a run that stops early (an error, an interrupt) stops the reader
        if st.trials == 0:
            raise UsageError(f"{path}: the trial list has no trials")
    # The vectors and the key index are no longer needed: the metrics get the memory. The
    # lookup closure (``table``) and the one-pass reader hold the index too: point them at the
    # emptied table so that it is freed.
    lk.release()
    table = lk.table
    if one is not None:
        one.table = lk.table
    if progress is not None:
        progress(Progress("score", "done", st.trials))
    if summary is None:
        none = KeyTable(pa.array([], pa.string()))
        summary = ListSummary(none, none, st.trials, st.targets if labelled else None,
                              stream.format, stream.source)  # fmt: skip
        assert one is not None
        lk.recordings = int(np.count_nonzero(one.seen))
        lk.result = EmbedResult({}, {}, 0, lk.recordings, lk.result.seconds)
    elif st.trials != summary.trials:
        raise RuntimeError(f"{path}: changed while it was read ({summary.trials} trials, "
                           f"then {st.trials})")  # fmt: skip
    dup = None
    if pairs is not None and done == st.trials:
        p = pairs[:done]
        p.sort()
        dup = int(np.count_nonzero(p[1:] == p[:-1]))
        del pairs, p
    return _report(job, summary, lk, st, stage_info, dup, t0, load_s)


def _rows_of(ch: Any) -> tuple[np.ndarray, np.ndarray]:
    """The key rows the reader's thread looked up (``looked_up`` in :func:`_run`)."""
    return ch.rows


def _distinct(x: np.ndarray) -> np.ndarray:
    """The distinct values, sorted (np.unique's hash path is several times slower here)."""
    x = np.sort(x)
    return x[np.concatenate([[True], x[1:] != x[:-1]])] if len(x) else x


def _pair_codes(ch: Any, a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """One int64 per trial, equal for equal (enrolment, test) pairs of keys."""
    codes = a.astype(np.int64) * n + b
    bad = (a < 0) | (b < 0)
    if bad.any():  # keys with no row: told apart by their text
        e = ch.enroll.to_pylist() if not isinstance(ch.enroll, list) else ch.enroll
        t = ch.test.to_pylist() if not isinstance(ch.test, list) else ch.test
        for i in np.flatnonzero(bad).tolist():
            codes[i] = -1 - (hash((e[i], t[i])) & ((1 << 62) - 1))
    return codes


def _report(
    job: ScoreJob, s: ListSummary, lk: _Lookup, st: StreamStats, stage_info: dict[str, Any],
    dup: int | None, t0: float, load_s: float,
) -> ScoreReport:  # fmt: skip
    sc = job.scoring
    notes: list[str] = []
    metrics = None
    if st.labelled:
        try:
            metrics = st.metrics.evaluate(p_targets=sc.p_targets)
        except ValueError as exc:
            notes.append(f"no metrics: {exc}")
    if dup is None:
        notes.append(f"duplicate trials not counted above {DUPLICATES_LIMIT:,} trials")
    return job_report(
        job,
        trials=s.describe(),
        trial_counts={
            "trials": st.trials,
            "scored": st.scored,
            "failed": st.failed,
            "written": st.written,
            "targets": s.targets,
            "nontargets": s.trials - s.targets if s.targets is not None else None,
        },
        duplicates=dup,
        recordings=lk.recordings,
        failures=lk.failures,
        result=lk.result,
        model=lk.source.describe(),
        vectors_info=lk.info,
        stage_info=stage_info,
        metrics=metrics,
        t0=t0,
        load_s=load_s,
        notes=notes,
    )


__all__ = ["run_streamed", "streamable"]
