"""Streamed scoring (io/trial_stream, scoring/stream, job/stream_stage): the chunked reader
reads every list as the in-memory reader does, bad lines late in a list are named before any
output, and streamed scores, score files, metrics and reports are the in-memory route's, on
the shared lists."""

from __future__ import annotations

import filecmp
import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from speaker_sim_cli.cli.main import app
from speaker_sim_cli.errors import UsageError
from speaker_sim_cli.io.score_writer import StreamedScores
from speaker_sim_cli.io.scorefiles import write_scores
from speaker_sim_cli.io.trial_stream import TrialStream, regroup, scan
from speaker_sim_cli.io.trials import read_trials
from speaker_sim_cli.job import ModelSource, Outputs, ScoreJob, ScoringSetup, TrialSource
from speaker_sim_cli.scoring import sorted_metrics
from speaker_sim_cli.scoring.metrics import evaluate
from speaker_sim_cli.scoring.sorted_metrics import ScoreCollector, evaluate_sorted
from speaker_sim_cli.scoring.stream import VectorTable, score_chunks

SHARED_LISTS = ("audio/trials.csv", "audio/dev_hard/trials.csv")


def streamed(
    path: Path, block: int = 64, group: int = 0
) -> tuple[list[str], list[str], np.ndarray | None, list]:
    s: Any = TrialStream(path, block_bytes=block)
    if group:
        s = regroup(s, group)
    e: list[str] = []
    t: list[str] = []
    labs: list[np.ndarray] = []
    lines: list[int] = []
    for ch in s:
        e += ch.enroll.to_pylist()
        t += ch.test.to_pylist()
        if ch.labels is not None:
            labs.append(ch.labels)
        lines += [ch.line_of(i) for i in range(len(ch))]
    return e, t, (np.concatenate(labs) if labs else None), lines


def same_as_in_memory(path: Path, block: int = 64) -> None:
    tl = read_trials(path)
    for group in (0, 7):  # as read, and joined into chunks of >= 7 trials
        e, t, labs, lines = streamed(path, block, group)
        assert e == tl.enroll and t == tl.test
        assert (labs is None) == (tl.labels is None)
        if labs is not None:
            assert np.array_equal(labs, tl.labels)
        assert lines == tl.line_numbers
    s = scan(TrialStream(path, block_bytes=block))
    assert s.keys.to_list() == tl.items()
    assert s.describe() == tl.describe()


LISTS = {
    "kaldi": "a.wav b.wav target\nc.wav d.wav nontarget\na.wav d.wav 1\n" * 20,
    "kaldi_nolabel": "a b\nc d\n" * 30 + "e f",
    "vox": "1 x/a.wav y/b.wav\n0 x/c.wav y/d.wav\n" * 25,
    "kaldi_odd": "\ufeffa\tb target\r\n\nc  d nontarget\n\x0ce f 1\nü ß 0\n" * 15 + "g h 1",
    "csv": "enrollment,test,label\n" + "a.wav,b.wav,1\n c.wav , d.wav ,0\n" * 30,
    "csv_quoted": "utt1,utt2,is_target,notes\n" + '"a,1.wav",b.wav,true,\nc,d,false,x\n' * 20,
    "csv_noheader": "a.wav,b.wav\nc.wav,d.wav\n" * 20 + ",,\n" + "e,f\n",
    "tsv": "enroll\ttest\tlabel\n" + "a b.wav\tc.wav\t1\nd\te\t0\n" * 30,
}


@pytest.mark.parametrize("name", sorted(LISTS))
@pytest.mark.parametrize("block", [16, 64, 1 << 20])
def test_reader_reads_as_the_in_memory_reader(tmp_path, name, block):
    p = tmp_path / "t.txt"
    p.write_bytes(LISTS[name].encode())
    same_as_in_memory(p, block)


def test_reader_on_the_shared_lists(shared):
    for rel in SHARED_LISTS:
        same_as_in_memory(shared / rel, 4096)


def test_parquet_lists_read_as_the_csv_they_were_made_from(shared, tmp_path):
    tl = read_trials(shared / SHARED_LISTS[1])
    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"enrollment": tl.enroll, "test": tl.test,
                             "label": pa.array(tl.labels, pa.int8())}), p,
                   row_group_size=500)  # fmt: skip
    back = read_trials(p)
    assert back.format == "parquet"
    assert back.enroll == tl.enroll and back.test == tl.test
    assert np.array_equal(back.labels, tl.labels)
    # labels as words, keys dictionary-encoded, other column names: read the same
    words = np.where(tl.labels == 1, "target", "nontarget")
    q = tmp_path / "u.pq"
    pq.write_table(pa.table({"utt1": pa.array(tl.enroll).dictionary_encode(), "utt2": tl.test,
                             "is_target": words}), q)  # fmt: skip
    again = read_trials(q)
    assert again.enroll == tl.enroll and np.array_equal(again.labels, tl.labels)


def _kaldi(n: int) -> list[str]:
    return [f"spk{i % 97}/u{i}.wav spk{i % 89}/v{i}.wav {'target' if i % 7 else 'nontarget'}"
            for i in range(n)]  # fmt: skip


@pytest.mark.parametrize(
    "bad, why",
    [
        ("x.wav y.wav target extra", "expected 'enroll test"),
        ("x.wav y.wav maybe", "unknown label"),
        ("x.wav " + "y" * 200_000 + " target", "longer than"),
        ("x.wav y.wav", "no label"),
    ],
)
def test_a_bad_line_late_in_a_long_list_is_named(tmp_path, bad, why):
    lines = _kaldi(30_000)
    lines[27_345] = bad
    p = tmp_path / "t.txt"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(UsageError, match=re.escape(f"{p}:27346: ")) as exc:
        scan(TrialStream(p, block_bytes=1 << 16))
    assert why in str(exc.value)


def test_truncated_and_mixed_encoding_lists_are_named(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("\n".join(_kaldi(5000)) + "\nspk1/u.wav spk2/v.wav targ")
    with pytest.raises(UsageError, match=re.escape(f"{p}:5001: unknown label")):
        scan(TrialStream(p, block_bytes=4096))
    q = tmp_path / "u.txt"
    lines = [s.encode() for s in _kaldi(5000)]
    lines[4321] = "caf\u00e9.wav b.wav target".encode("latin-1")
    q.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(UsageError, match=re.escape(f"{q}:4322: not a UTF-8 text file")):
        scan(TrialStream(q, block_bytes=4096))
    with pytest.raises(UsageError, match=re.escape(f"{q}:4322: not a UTF-8 text file")):
        read_trials(q)


def test_a_field_over_the_limit_is_named_in_kaldi_lists_too(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("a b target\n" + "x" * 200_000 + " b target\n")
    with pytest.raises(UsageError, match=re.escape(f"{p}:2: malformed line")):
        read_trials(p)


# -- metrics -----------------------------------------------------------------------------------


def test_sorted_metrics_are_evaluate_bit_for_bit(monkeypatch, tmp_path):
    monkeypatch.setattr(sorted_metrics, "BLOCK", 257)  # many blocks, curve points across them
    rng = np.random.default_rng(3)
    for k in range(25):
        n = int(rng.integers(20, 30_000))
        dtype = np.float32 if k % 2 else np.float64
        s = np.round(rng.normal(size=n), int(rng.integers(1, 5))).astype(dtype)  # many ties
        y = (rng.random(n) < rng.uniform(0.01, 0.7)).astype(np.int8)
        y[:2] = (1, 0)
        thr = float(rng.normal())
        ref = evaluate(s, y, (0.01, 0.05, 0.5), threshold=thr)
        got = evaluate_sorted(np.sort(s[y == 1]), np.sort(s[y == 0]), (0.01, 0.05, 0.5),
                              threshold=thr)  # fmt: skip
        assert got == ref
        # the same scores as several sorted runs of each class (ties across runs included)
        cut = rng.integers(0, 3, n)
        runs = [[np.sort(s[(y == c) & (cut == r)]) for r in range(3)] for c in (1, 0)]
        assert evaluate_sorted(*runs, (0.01, 0.05, 0.5), threshold=thr) == ref
        n_t = int(y.sum())
        for col in (ScoreCollector(dtype), ScoreCollector(dtype, n_t + 5, n - n_t),
                    ScoreCollector(dtype, spill=tmp_path)):  # fmt: skip
            for lo in range(0, n, 999):
                col.add(s[lo : lo + 999], y[lo : lo + 999])
            monkeypatch.setattr(sorted_metrics, "EXACT_LIMIT", 0 if k % 3 else 10**9)
            assert col.evaluate((0.01, 0.05, 0.5), threshold=thr) == ref
    with pytest.raises(ValueError, match="no target trials"):
        evaluate_sorted(np.empty(0), np.zeros(3))


# -- writers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "kaldi", "wespeaker"])
@pytest.mark.parametrize("skip", [False, True])
def test_streamed_score_files_are_byte_identical(tmp_path, fmt, skip):
    rng = np.random.default_rng(0)
    n = 1000
    e = [f"e{i % 13}" for i in range(n)]
    t = [f"t{i % 17}" for i in range(n)]
    s = rng.normal(size=n)
    s[rng.random(n) < 0.05] = np.nan
    y = (rng.random(n) < 0.3).astype(np.int8)
    err = [None if np.isfinite(v) else "e: bad" for v in s]
    whole = tmp_path / "whole"
    with open(whole, "w", newline="") as f:
        write_scores(f, e, t, s, y, err, fmt, skip_failed=skip)
    out = tmp_path / "part"
    with StreamedScores(out, fmt, True, True, skip) as w:
        for lo in range(0, n, 333):
            sl = slice(lo, lo + 333)
            w.write(pa.array(e[sl]), t[sl], s[sl], y[sl], err[sl])
    assert filecmp.cmp(whole, out, shallow=False)


def test_a_failing_stream_leaves_no_file(tmp_path):
    out = tmp_path / "s.parquet"
    with pytest.raises(RuntimeError), StreamedScores(out, "parquet", False, False) as w:
        w.write(["a"], ["b"], np.array([0.5]), None, None)
        raise RuntimeError("late")
    assert list(tmp_path.iterdir()) == []


# -- streamed == in-memory ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def vectors(tmp_path_factory, shared) -> Path:
    """An ``embed`` folder with a random vector for every item of the shared lists but three,
    and a cohort list of 40 of them."""
    d = tmp_path_factory.mktemp("emb")
    items = list(
        dict.fromkeys(k for rel in SHARED_LISTS for k in read_trials(shared / rel).items())
    )
    rng = np.random.default_rng(0)
    keep = [k for i, k in enumerate(items) if i not in (2, len(items) - 1, len(items) - 2)]
    np.save(d / "embeddings.npy", rng.normal(size=(len(keep), 192)).astype(np.float32))
    (d / "index.csv").write_text("key\n" + "".join(k + "\n" for k in keep))
    (d / "cohort.lst").write_text("".join(k + "\n" for k in items[5:45]))
    spk = {k: k.split("/")[-2] for k in items}
    (d / "map.spk2utt").write_text("".join(f"{k} {k}\n" for k in keep if " " not in k))
    (d / "utt2spk").write_text("".join(f"{k} {spk[k]}\n" for k in items[5:45]))
    return d


def run_job(lst: Path, emb: Path, out: Path, stream: bool, fmt: str = "csv", **scoring):
    job = ScoreJob(TrialSource(lst), ModelSource(embeddings=emb), ScoringSetup(**scoring),
                   Outputs(out, fmt, stream=stream))  # fmt: skip
    doc = job.run().comparable()
    doc.pop("scores")
    return doc


CASES = {
    "cosine": {},
    "asnorm": {"norm": "asnorm", "top_n": 25, "cohort": "cohort.lst"},
    "snorm+spk": {"norm": "snorm", "cohort": "cohort.lst", "cohort_utt2spk": "utt2spk"},
    "enroll-map (embedding stage)": {"enroll_map": "map.spk2utt", "on_error": "skip"},
}


@pytest.mark.parametrize("rel", SHARED_LISTS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_scores_and_reports_are_the_in_memory_ones(shared, vectors, tmp_path, rel, case):
    opts = {k: vectors / v if isinstance(v, str) and k != "norm" and k != "on_error" else v
            for k, v in CASES[case].items()}  # fmt: skip
    fmts = ["csv"] + (["kaldi", "wespeaker"] if rel == SHARED_LISTS[0] else [])
    docs = {}
    for fmt in fmts:
        a = run_job(shared / rel, vectors, tmp_path / f"s.{fmt}", True, fmt, **opts)
        b = run_job(shared / rel, vectors, tmp_path / f"m.{fmt}", False, fmt, **opts)
        assert a == b
        assert filecmp.cmp(tmp_path / f"s.{fmt}", tmp_path / f"m.{fmt}", shallow=False)
        docs[fmt] = b
    if case == "cosine":
        assert docs["csv"]["counts"]["failed_recordings"] >= 1
        assert docs["csv"]["metrics"]["eer"] is not None
    p = run_job(shared / rel, vectors, tmp_path / "s.parquet", True, "parquet", **opts)
    docs["csv"]["score_format"] = "parquet"
    assert p == docs["csv"]
    got = pq.read_table(tmp_path / "s.parquet").to_pydict()
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO((tmp_path / "m.csv").read_text())))
    assert got["enrollment"] == [r["enrollment"] for r in rows]
    assert [f"{x:.6f}" if x is not None else "" for x in got["score"]] == [r["score"] for r in rows]


def test_cli_streams_to_parquet_by_suffix_and_names_a_late_bad_line(shared, vectors, tmp_path):
    runner = CliRunner()
    lst = tmp_path / "t.txt"
    items = read_trials(shared / SHARED_LISTS[0]).items()[:50]
    lines = [f"{a} {b} {'target' if i % 3 else 'nontarget'}"
             for i, (a, b) in enumerate(zip(items * 400, items[1:] * 400))]  # fmt: skip
    lst.write_text("\n".join(lines) + "\n")
    out = tmp_path / "o" / "s.parquet"
    res = runner.invoke(app, ["score", str(lst), "--embeddings", str(vectors), "--out", str(out),
                              "--report", str(tmp_path / "r.json"), "--quiet"])  # fmt: skip
    assert res.exit_code == 3, res.output  # one item has no vector: its trials fail
    assert pq.read_table(out).num_rows == len(lines)
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["score_format"] == "parquet" and rep["counts"]["trials"] == len(lines)
    lines[17_001] = lines[17_001] + " extra"
    lst.write_text("\n".join(lines) + "\n")
    out2 = tmp_path / "o2" / "s.csv"
    res = runner.invoke(app, ["score", str(lst), "--embeddings", str(vectors), "--out",
                              str(out2), "--quiet"])  # fmt: skip
    assert res.exit_code == 2
    assert f"{lst}:17002" in " ".join(res.output.split()) or "17002" in res.output
    assert not out2.parent.exists() or list(out2.parent.iterdir()) == []


def test_eval_reads_csv_and_parquet_score_files_in_chunks(shared, vectors, tmp_path, monkeypatch):
    """eval's chunked reader gives read_scores' arrays, so evaluate's metrics."""
    from speaker_sim_cli.io import score_stream
    from speaker_sim_cli.io.scorefiles import read_scores
    from speaker_sim_cli.scoring.evaluation import evaluate_file

    monkeypatch.setattr(score_stream, "BLOCK_BYTES", 4096)
    lst = shared / SHARED_LISTS[1]
    for name in ("s.csv", "s.parquet"):
        fmt = name.split(".")[1]
        run_job(lst, vectors, tmp_path / name, True, fmt)
        table = read_scores(tmp_path / name)
        got = score_stream.score_arrays(tmp_path / name)
        assert got is not None and got[2] == fmt
        assert np.array_equal(got[0], table.scores, equal_nan=True)
        assert np.array_equal(got[1], table.labels)
        ok = ~np.isnan(table.scores)
        res = evaluate_file(tmp_path / name, None, [0.01, 0.05], 1.0, 1.0, 0.1)
        assert res.metrics == evaluate(table.scores[ok], table.labels[ok], threshold=0.1)
        assert res.failed == int((~ok).sum()) > 0
    # a bad row late in a CSV score file is named
    text = (tmp_path / "s.csv").read_text().splitlines()
    text[3000] = text[3000].replace(",0,", ",maybe,").replace(",1,", ",maybe,")
    (tmp_path / "b.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(UsageError, match=re.escape(f"{tmp_path / 'b.csv'}:3001: ")):
        score_stream.score_arrays(tmp_path / "b.csv")


# -- the one-pass route, its pieces ------------------------------------------------------------


def present_list(vectors: Path, path: Path, n: int = 3000, bad_line: int | None = None) -> Path:
    """A Kaldi list of ``n`` labelled trials over keys that all have a vector."""
    keys = [k for k in (vectors / "index.csv").read_text().splitlines()[1:] if " " not in k]
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, len(keys), n), rng.integers(0, len(keys), n)
    lines = [f"{keys[i]} {keys[j]} {'target' if (i + j) % 3 else 'nontarget'}"
             for i, j in zip(a.tolist(), b.tolist())]  # fmt: skip
    if bad_line is not None:
        lines[bad_line - 1] += " extra"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("fmt", ["csv", "kaldi", "wespeaker", "parquet"])
def test_one_pass_writes_what_two_passes_and_the_in_memory_route_write(
    vectors, tmp_path, monkeypatch, fmt
):
    from speaker_sim_cli.io import trial_stream
    from speaker_sim_cli.job import stream_stage

    lst = present_list(vectors, tmp_path / "t.txt")
    scans = []
    real_scan = stream_stage.scan
    monkeypatch.setattr(stream_stage, "scan", lambda s: scans.append(1) or real_scan(s))
    monkeypatch.setattr(trial_stream, "BLOCK_BYTES", 4096)  # many blocks, many chunks
    monkeypatch.setattr(trial_stream, "CHUNK_TRIALS", 700)
    one = run_job(lst, vectors, tmp_path / f"one.{fmt}", True, fmt)
    assert scans == []  # read once
    mem = run_job(lst, vectors, tmp_path / f"mem.{fmt}", False, fmt if fmt != "parquet" else "csv")
    if fmt == "parquet":  # the in-memory route writes no Parquet: its report, its CSV
        mem["score_format"] = "parquet"
    job = ScoreJob(TrialSource(lst), ModelSource(embeddings=vectors), ScoringSetup(),
                   Outputs(tmp_path / f"two.{fmt}", fmt, stream=True))  # fmt: skip
    two = stream_stage._run(job, None, False, 0.0).comparable()
    two.pop("scores")
    assert scans == [1]
    assert one == mem == two
    assert one["counts"]["trials"] == 3000 and one["metrics"]["eer"] is not None
    if fmt == "parquet":
        assert pq.read_table(tmp_path / "one.parquet").equals(
            pq.read_table(tmp_path / "two.parquet")
        )
    else:
        assert filecmp.cmp(tmp_path / f"one.{fmt}", tmp_path / f"mem.{fmt}", shallow=False)
        assert filecmp.cmp(tmp_path / f"one.{fmt}", tmp_path / f"two.{fmt}", shallow=False)


def test_one_pass_hands_a_list_with_an_unknown_key_to_two_passes(vectors, tmp_path):
    lst = present_list(vectors, tmp_path / "t.txt")
    text = lst.read_text().splitlines()
    text[2500] = "no/such/key.wav " + text[2500].split(" ", 1)[1]
    lst.write_text("\n".join(text) + "\n")
    one = run_job(lst, vectors, tmp_path / "s.csv", True)
    mem = run_job(lst, vectors, tmp_path / "m.csv", False)
    assert one == mem and one["counts"]["failed_recordings"] == 1
    assert filecmp.cmp(tmp_path / "s.csv", tmp_path / "m.csv", shallow=False)
    assert ",error" in (tmp_path / "s.csv").read_text().splitlines()[0]


def test_one_pass_names_a_late_bad_line_and_leaves_no_file(vectors, tmp_path):
    lst = present_list(vectors, tmp_path / "t.txt", 40_000, bad_line=39_001)
    out = tmp_path / "o" / "s.parquet"
    res = CliRunner().invoke(app, ["score", str(lst), "--embeddings", str(vectors), "--out",
                                   str(out), "--quiet"])  # fmt: skip
    assert res.exit_code == 2, res.output
    assert "39001" in res.output
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_fixed6_is_pythons_format_for_every_value():
    from speaker_sim_cli.io.score_text import fixed6

    rng = np.random.default_rng(0)
    edges = [0.0, -0.0, np.inf, -np.inf, np.nan, 1e300, -1e-300, 5e-7, -5e-7, 0.0078125,
             -0.0078125, 2.5e-6, 0.9999995, -0.9999995, 1.0000005, 1e15, 2.0**52 / 1e6,
             123456789.1234565, 4503599627.370497, -1.0, 1.0]  # fmt: skip
    x = np.concatenate([
        rng.uniform(-1, 1, 50_000), rng.normal(0, 40, 5000), np.array(edges),
        rng.integers(-(2**20), 2**20, 5000) / 2**20,  # exact binary halves of 1e-6 steps
        rng.integers(-(10**7), 10**7, 5000) / 1e6 + 5e-7,  # near-ties
    ])  # fmt: skip
    want = ["" if np.isnan(v) else f"{v:.6f}" for v in x.tolist()]
    assert fixed6(x).to_pylist() == want


@pytest.mark.parametrize("fmt", ["csv", "kaldi", "wespeaker"])
def test_arrow_score_lines_are_pythons_with_quoting_errors_and_extra_columns(tmp_path, fmt):
    from speaker_sim_cli.io.score_text import text_rows

    rng = np.random.default_rng(3)
    n = 3000
    e = [f"e{i % 13}" + ("," if fmt == "csv" and i == 2000 else "") for i in range(n)]
    t = [f't"{i % 17}' if fmt == "csv" and i == 2500 else f"t{i % 17}" for i in range(n)]
    s = rng.normal(size=n)
    s[rng.random(n) < 0.05] = np.nan
    s[:4] = [-0.0, np.inf, -np.inf, 0.0078125]
    y = (rng.random(n) < 0.3).astype(np.int8)
    err = [None if np.isfinite(v) else "e: bad, really" for v in s]
    extra = {"score_pct": s * 100} if fmt == "csv" else None
    for skip in (False, True):
        whole = tmp_path / f"whole{skip}"
        with open(whole, "w", newline="") as f:
            write_scores(f, e, t, s, y, err, fmt, skip_failed=skip, extra=extra)
        out = tmp_path / f"part{skip}"
        with StreamedScores(out, fmt, True, True, skip, tuple(extra or ())) as w:
            for lo in range(0, n, 1000):  # the 3rd part has a key that needs quoting
                sl = slice(lo, lo + 1000)
                w.write(
                    pa.array(e[sl]),
                    pa.chunked_array([pa.array(t[sl])]),
                    s[sl],
                    y[sl],
                    err[sl],
                    {k: v[sl] for k, v in extra.items()} if extra else None,
                )
        assert out.read_bytes() == whole.read_bytes()
    quoted = text_rows("csv", pa.array(["a,b"]), pa.array(["c"]), np.ones(1), None, None, None,
                       False, False)  # fmt: skip
    assert quoted is None  # Python's csv writer quotes it


def test_prefetch_raises_where_the_item_would_come_and_stops_its_producer():
    import threading

    from speaker_sim_cli.io.trial_stream import prefetch

    def items():
        yield 1
        yield 2
        raise UsageError("line 3: bad")

    got = []
    with pytest.raises(UsageError, match="line 3"):
        for x in prefetch(items()):
            got.append(x)
    assert got == [1, 2]
    made = []

    def endless():
        i = 0
        while True:
            made.append(i)
            yield i
            i += 1

    it = prefetch(endless(), depth=2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()  # the consumer stops: so does the thread
    assert not any(t.name == "speaker-sim-prefetch" for t in threading.enumerate())
    assert len(made) <= 6


def test_score_collector_with_a_capacity_gives_the_same_metrics():
    rng = np.random.default_rng(0)
    s = rng.normal(size=30_000)
    y = (rng.random(30_000) < 0.2).astype(np.int8)
    want = evaluate(s, y)
    for cap in (40_000, 30_000, 10_000, 0):  # fits, exactly, overflows, none
        c = ScoreCollector(np.float64, capacity=cap)
        for lo in range(0, len(s), 4096):
            c.add(s[lo : lo + 4096], y[lo : lo + 4096])
        assert c.count == len(s)
        assert c.evaluate() == want


def test_spilled_scores_leave_no_file_and_give_the_same_metrics(tmp_path, monkeypatch):
    monkeypatch.setattr(sorted_metrics, "EXACT_LIMIT", 0)  # the sorted walk, two sort threads
    rng = np.random.default_rng(1)
    s = np.round(rng.normal(size=50_000), 3)
    y = (rng.random(50_000) < 0.1).astype(np.int8)
    c = ScoreCollector(np.float64, capacity=10, spill=tmp_path)
    for lo in range(0, len(s), 4096):
        c.add(s[lo : lo + 4096], y[lo : lo + 4096])
    assert list(tmp_path.iterdir()) == []  # unnamed temp files: nothing to leave behind
    assert c.count == len(s)
    assert c.evaluate() == evaluate(s, y)
    closed = ScoreCollector(np.float64, spill=tmp_path)
    closed.add(s[:10], y[:10])
    closed.close()
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_in_one_pass_leaves_no_file_and_no_reader_thread(
    vectors, tmp_path, monkeypatch
):
    import threading

    from speaker_sim_cli.io import trial_stream

    monkeypatch.setattr(trial_stream, "BLOCK_BYTES", 4096)
    monkeypatch.setattr(trial_stream, "CHUNK_TRIALS", 500)
    lst = present_list(vectors, tmp_path / "t.txt")
    seen = []

    def progress(ev):
        if ev.stage == "score" and ev.event == "advance":
            seen.append(ev.n)
            if len(seen) == 2:
                raise KeyboardInterrupt

    out = tmp_path / "o" / "s.csv"
    job = ScoreJob(TrialSource(lst), ModelSource(embeddings=vectors), ScoringSetup(),
                   Outputs(out, "csv", stream=True))  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        job.run(progress)
    assert list(out.parent.iterdir()) == []
    assert not any(t.name.startswith(("speaker-sim-prefetch", "speaker-sim-write"))
                   for t in threading.enumerate())  # fmt: skip


class _SlowWriter:
    """A score writer that takes its time, fails on a given chunk, and says whether a write
    was under way when the scorer returned or raised."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.fail_on, self.calls, self.busy, self.rows = fail_on, 0, False, []

    def write(self, enroll, test, scores, labels, errors, extra=None):
        import time

        self.busy = True
        self.calls += 1
        time.sleep(0.02)
        self.busy = False
        if self.calls == self.fail_on:
            raise OSError("disk full")
        self.rows.append(scores.copy())
        return len(scores)


class _Chunk(SimpleNamespace):
    def __len__(self) -> int:
        return len(self.enroll)


def _chunks(n_chunks: int, fail_at: int | None = None):
    rng = np.random.default_rng(4)
    for k in range(n_chunks):
        if k == fail_at:
            raise UsageError("t.txt:1234: malformed line")
        a = rng.integers(-1, 50, 300)
        b = rng.integers(0, 50, 300)
        lab = (rng.random(300) < 0.3).astype(np.int8)
        yield _Chunk(enroll=[f"k{i}" for i in a], test=[f"k{i}" for i in b], labels=lab,
                     rows=(a, b))  # fmt: skip


@pytest.mark.parametrize("behind", [1, 2])
def test_writing_behind_the_scorer_gives_the_same_rows_stats_and_metrics(behind):
    vt = VectorTable(np.random.default_rng(5).normal(size=(50, 8)).astype(np.float32))
    runs = []
    for b in (0, behind):
        w = _SlowWriter()
        st = score_chunks(_chunks(9), lambda ch: ch.rows, vt, lambda k: "gone", w, behind=b)
        assert not w.busy
        runs.append((w.rows, st.trials, st.scored, st.written, st.score_sum, st.metrics.evaluate()))
    (rows0, *rest0), (rows1, *rest1) = runs
    assert rest0 == rest1 and len(rows0) == len(rows1) == 9
    assert all(np.array_equal(x, y, equal_nan=True) for x, y in zip(rows0, rows1))


def test_a_late_error_while_writing_behind_waits_for_the_write_under_way():
    import threading

    vt = VectorTable(np.random.default_rng(5).normal(size=(50, 8)).astype(np.float32))
    w = _SlowWriter()
    with pytest.raises(UsageError, match="1234"):  # the reader fails on its 6th chunk
        score_chunks(_chunks(9, fail_at=5), lambda ch: ch.rows, vt, lambda k: "gone", w,
                     behind=1)  # fmt: skip
    assert not w.busy and 4 <= w.calls <= 5  # no write left under way (the last may not start)
    w = _SlowWriter(fail_on=3)
    seen = []
    with pytest.raises(OSError, match="disk full"):  # the writer fails: the scorer stops
        score_chunks(_chunks(9), lambda ch: ch.rows, vt, lambda k: "gone", w,
                     progress=seen.append, behind=1)  # fmt: skip
    assert not w.busy and w.calls <= 4 and seen == [300, 300]
    assert not any(t.name.startswith("speaker-sim-write") for t in threading.enumerate())
