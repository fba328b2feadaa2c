"""Every reader of a user's file or line, fed generated garbage and near-valid variants.

Properties, for each reader:
* garbage: the reader returns, or raises UsageError naming the file — never another exception
  (which the CLI would turn into "internal error", exit 1, instead of a usage error);
* near-valid: valid lines with one line broken: either a UsageError naming the file *and the
  broken line's number*, or — when the broken line happens to be valid — a result that still holds
  every valid line (nothing silently dropped).

Seeded (derandomize) and bounded (max_examples) so CI runs the same inputs in a few seconds.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from speaker_sim_cli.errors import UsageError
from speaker_sim_cli.io.kaldi_vectors import kaldi_vectors, read_kaldi_vectors
from speaker_sim_cli.io.scorefiles import read_scores
from speaker_sim_cli.io.trials import (
    read_spk2utt,
    read_trials,
    read_utt2spk,
    read_wav_scp,
)
from speaker_sim_cli.serve import parse_jsonl, parse_text

EXAMPLES = 120
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: 200 KB inputs shrink for minutes
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# Characters that break line-oriented formats: separators, quotes, odd newlines, NUL, BOM,
# non-ASCII, plus ordinary path characters.
NASTY = st.sampled_from(list(",|\t \"'\r\n\x00\x0b\x0c\x1c\u2028\ufeff\\#;=:-_.é中/"))
WORDY = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
GARBAGE_TEXT = st.one_of(
    st.text(
        alphabet=st.one_of(NASTY, st.characters(codec="utf-8", exclude_categories=("Cs",))),
        max_size=400,
    ),
    st.lists(st.one_of(WORDY, NASTY), max_size=30).map("".join),
    st.builds(lambda n, c: c * n, st.integers(150_000, 210_000), st.sampled_from('ab,"')),
)
GARBAGE_BYTES = st.one_of(st.binary(max_size=400), GARBAGE_TEXT.map(lambda s: s.encode()))

TRIED: dict[str, int] = {}


_WORK: list[Path] = []  # this module's temp folder, removed when the module is done


@pytest.fixture(scope="module", autouse=True)
def _workdir():
    folder = Path(tempfile.mkdtemp(prefix="hostile-"))
    _WORK.append(folder)
    yield
    shutil.rmtree(folder, ignore_errors=True)
    _WORK.clear()


def _fresh() -> Path:
    """A new empty folder inside the module's temp folder."""
    return Path(tempfile.mkdtemp(dir=_WORK[0]))


def _write(data: bytes | str, name: str) -> Path:
    folder = _fresh()
    p = folder / name
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return p


def _garbage_ok(reader: Callable[[Path], Any], data: bytes | str, name: str, tag: str) -> None:
    TRIED[tag] = TRIED.get(tag, 0) + 1
    p = _write(data, name)
    try:
        reader(p)
    except UsageError as exc:
        assert str(p) in str(exc), f"the message does not name the file: {exc}"


def _near_valid(
    reader: Callable[[Path], Any],
    header: list[str],
    rows: list[str],
    bad_at: int,
    bad: str,
    name: str,
    tag: str,
    count: Callable[[Any], int],
) -> None:
    """``rows`` are valid; row ``bad_at`` is replaced by ``bad``. Lines are 1-based, header
    included."""
    TRIED[tag] = TRIED.get(tag, 0) + 1
    bad_at %= len(rows)
    lines = [*header, *rows[:bad_at], bad, *rows[bad_at + 1 :]]
    p = _write("\n".join(lines) + "\n", name)
    bad_line = len(header) + bad_at + 1
    try:
        result = reader(p)
    except UsageError as exc:
        msg = str(exc)
        assert str(p) in msg, msg
        # the error names a line, and the broken one is among those it names (or it is a
        # note on the whole file)
        named = [int(n) for n in re.findall(re.escape(str(p)) + r":(\d+)", msg)]
        named += [int(n) for n in re.findall(r"\bline (\d+)", msg)]
        if named:
            assert bad_line in named, (bad_line, msg)
        return
    # the broken line was accepted (or skipped as blank): every other valid line is still there
    assert count(result) >= len(rows) - 1, (lines[:4], result)
    numbers = getattr(result, "line_numbers", None)
    if numbers:
        others = {len(header) + i + 1 for i in range(len(rows)) if i != bad_at}
        assert others <= set(numbers), (others, numbers)


VALID_PATH = st.from_regex(r"[a-z0-9_/]{1,12}\.wav", fullmatch=True)


def _valid_rows(n: int, sep: str, label: bool) -> st.SearchStrategy[list[str]]:
    row = st.tuples(VALID_PATH, VALID_PATH, st.sampled_from(["1", "0"])).map(
        lambda t: sep.join(t if label else t[:2])
    )
    return st.lists(row, min_size=2, max_size=n)


# -- trial lists ---------------------------------------------------------------------------


@SETTINGS
@given(GARBAGE_BYTES)
def test_trials_garbage(data):
    _garbage_ok(read_trials, data, "trials.csv", "trials (garbage)")


@SETTINGS
@given(_valid_rows(8, ",", True), st.integers(0, 50), GARBAGE_TEXT)
def test_trials_csv_near_valid(rows, at, bad):
    _near_valid(read_trials, ["enrollment,test,label"], rows, at, bad.replace("\n", " "),
                "t.csv", "trials csv (near-valid)", lambda t: len(t))  # fmt: skip


@SETTINGS
@given(_valid_rows(8, " ", True), st.integers(0, 50), GARBAGE_TEXT)
def test_trials_kaldi_near_valid(rows, at, bad):
    rows = [f"{r.split()[0]} {r.split()[1]} {'target' if r[-1] == '1' else 'nontarget'}"
            for r in rows]  # fmt: skip
    bad = re.sub(r"[\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]", " ", bad)
    if "," in bad or "|" in bad:  # another format's separator on a later line: still read as
        bad = bad.replace(",", " ").replace("|", " ")  # Kaldi, the first line decides
    _near_valid(read_trials, [], rows, at, bad, "trials.txt", "trials kaldi (near-valid)",
                lambda t: len(t))  # fmt: skip


def test_csv_field_over_the_csv_limit_is_a_usage_error(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("enrollment,test,label\na.wav,b.wav,1\n" + '"' + "x" * 200_000 + '",b.wav,1\n')
    with pytest.raises(UsageError, match=re.escape(f"{p}:3")):
        read_trials(p)


# -- Parquet trial lists (io/trial_stream) ---------------------------------------------------


def _parquet(cols: dict[str, Any]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = pa.BufferOutputStream()
    pq.write_table(pa.table(cols), buf, row_group_size=3)
    return buf.getvalue().to_pybytes()


def _parquet_rows_ok(p: Path, n_rows: int, bad_row: int | None) -> None:
    """read_trials of a Parquet list: a UsageError naming the file (and the bad row, when it
    names one), or every row."""
    try:
        tl = read_trials(p)
    except UsageError as exc:
        msg = str(exc)
        assert str(p) in msg, msg
        named = [int(n) for n in re.findall(r"\brow (\d+)", msg)]
        if named and bad_row is not None:
            assert bad_row in named, (bad_row, msg)
        return
    assert len(tl) == n_rows
    assert tl.line_numbers == list(range(1, n_rows + 1))
    assert all(isinstance(x, str) and x.strip() == x and x for x in tl.enroll + tl.test)
    assert tl.labels is None or set(tl.labels.tolist()) <= {0, 1}


@SETTINGS
@given(GARBAGE_BYTES, st.booleans())
def test_parquet_trials_garbage(data, magic):
    _garbage_ok(read_trials, b"PAR1" + data + b"PAR1" if magic else data, "t.parquet",
                "trials parquet (garbage)")  # fmt: skip


@SETTINGS
@given(_valid_rows(8, ",", True), st.integers(0, 100_000), st.binary(max_size=8), st.booleans())
def test_parquet_trials_corrupted(rows, at, splice, cut):
    """A valid file with bytes spliced in or cut off: a UsageError naming it, or its rows."""
    TRIED["trials parquet (corrupted)"] = TRIED.get("trials parquet (corrupted)", 0) + 1
    cols = [r.split(",") for r in rows]
    data = _parquet({"enrollment": [c[0] for c in cols], "test": [c[1] for c in cols],
                     "label": [int(c[2]) for c in cols]})  # fmt: skip
    at %= len(data)
    data = data[:at] if cut else data[:at] + splice + data[at + len(splice) :]
    _parquet_rows_ok(_write(data, "t.parquet"), len(rows), None)


PARQUET_BAD = st.one_of(st.none(), st.just(""), GARBAGE_TEXT, st.just("x" * 200_000))


@SETTINGS
@given(_valid_rows(8, ",", True), st.integers(0, 50), PARQUET_BAD, st.sampled_from([0, 1, 2]))
def test_parquet_trials_near_valid(rows, at, bad, col):
    """One value of one row replaced (null, empty, garbage, 200 KB): the row is named."""
    TRIED["trials parquet (near-valid)"] = TRIED.get("trials parquet (near-valid)", 0) + 1
    cols = [r.split(",") for r in rows]
    at %= len(cols)
    cols[at] = list(cols[at])
    cols[at][col] = bad  # type: ignore[call-overload]
    data = _parquet({"enrollment": [c[0] for c in cols], "test": [c[1] for c in cols],
                     "label": [c[2] for c in cols]})  # fmt: skip
    _parquet_rows_ok(_write(data, "t.parquet"), len(rows), at + 1)


@pytest.mark.parametrize(
    "cols, row",
    [
        ({"enrollment": ["a", "b"], "test": ["c", "d"], "label": [1, 2]}, 2),
        ({"enrollment": ["a", "b"], "test": ["c", "d"], "label": [1.0, 0.5]}, 2),
        ({"enrollment": ["a", None], "test": ["c", "d"], "label": [True, False]}, 2),
        ({"enrollment": [1, 2], "test": ["c", "d"]}, None),
        ({"speaker": ["a"], "utterance": ["b"]}, None),
    ],
)
def test_parquet_trials_bad_columns(tmp_path, cols, row):
    p = tmp_path / "t.parquet"
    p.write_bytes(_parquet(cols))
    with pytest.raises(UsageError) as exc:
        read_trials(p)
    assert str(p) in str(exc.value)
    if row is not None:
        assert f"row {row}" in str(exc.value)


@SETTINGS
@given(GARBAGE_BYTES)
def test_pair_lists_garbage(data):
    from speaker_sim_cli.io.pairs import read_pairs

    _garbage_ok(read_pairs, data, "meta.lst", "seed-tts-eval pairs (garbage)")


@SETTINGS
@given(st.lists(st.tuples(VALID_PATH, VALID_PATH, st.text("abc xyz", max_size=10)),
                min_size=2, max_size=8),
       st.integers(0, 50), GARBAGE_TEXT)  # fmt: skip
def test_pair_lists_near_valid(rows, at, bad):
    from speaker_sim_cli.io.pairs import read_pairs

    body = [f"/g/{g}|/p/{p}|{text}" for g, p, text in rows]
    bad = re.sub(r"[\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]", " ", bad)
    _near_valid(read_pairs, [], body, at, bad, "meta.lst", "seed-tts-eval pairs (near-valid)",
                len)  # fmt: skip


@SETTINGS
@given(GARBAGE_BYTES)
def test_mvector_lists_garbage(data):
    from speaker_sim_cli.io.mvector_lists import read_mvector_list

    _garbage_ok(read_mvector_list, data, "trials_list.txt", "mvector lists (garbage)")


@SETTINGS
@given(st.lists(st.tuples(VALID_PATH, st.from_regex(r"[0-9]{1,3}", fullmatch=True)),
                min_size=2, max_size=8),
       st.integers(0, 50), GARBAGE_TEXT)  # fmt: skip
def test_mvector_lists_near_valid(rows, at, bad):
    from speaker_sim_cli.io.mvector_lists import read_mvector_list

    body = [f"{p}\t{s}" for p, s in rows]
    bad = re.sub(r"[\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]", " ", bad)
    _near_valid(read_mvector_list, [], body, at, bad, "enroll_list.txt",
                "mvector lists (near-valid)", len)  # fmt: skip


# -- wav.scp, spk2utt, utt2spk ------------------------------------------------------------


@SETTINGS
@given(GARBAGE_BYTES)
def test_wav_scp_garbage(data):
    _garbage_ok(read_wav_scp, data, "wav.scp", "wav.scp (garbage)")


@SETTINGS
@given(st.lists(st.tuples(st.from_regex(r"u[0-9]{1,6}", fullmatch=True), VALID_PATH),
                min_size=2, max_size=8, unique_by=lambda t: t[0]),
       st.integers(0, 50), GARBAGE_TEXT)  # fmt: skip
def test_wav_scp_near_valid(pairs, at, bad):
    rows = [f"{u} {p}" for u, p in pairs]
    bad = re.sub(r"[\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]", " ", bad)
    _near_valid(read_wav_scp, [], rows, at, bad, "wav.scp", "wav.scp (near-valid)", len)


@SETTINGS
@given(GARBAGE_BYTES)
def test_spk2utt_utt2spk_garbage(data):
    _garbage_ok(read_spk2utt, data, "spk2utt", "spk2utt (garbage)")
    _garbage_ok(read_utt2spk, data, "utt2spk", "utt2spk (garbage)")


# -- score files ----------------------------------------------------------------------------


@SETTINGS
@given(GARBAGE_BYTES)
def test_score_files_garbage(data):
    _garbage_ok(read_scores, data, "scores.txt", "score files (garbage)")


@SETTINGS
@given(st.lists(st.tuples(VALID_PATH, VALID_PATH, st.floats(-1, 1), st.sampled_from("01")),
                min_size=2, max_size=8),
       st.integers(0, 50), GARBAGE_TEXT, st.sampled_from(["csv", "kaldi"]))  # fmt: skip
def test_score_files_near_valid(rows, at, bad, fmt):
    if fmt == "csv":
        header = ["enrollment,test,label,score"]
        body = [f"{e},{t},{lab},{s:.6f}" for e, t, s, lab in rows]
        bad = bad.replace("\n", " ")
    else:
        header = []
        body = [f"{e} {t} {'target' if lab == '1' else 'nontarget'} {s:.6f}"
                for e, t, s, lab in rows]  # fmt: skip
        bad = re.sub(r"[\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029,]", " ", bad)
    _near_valid(read_scores, header, body, at, bad, f"s.{fmt}", f"score {fmt} (near-valid)",
                lambda t: len(t.scores))  # fmt: skip


# -- Kaldi vectors -------------------------------------------------------------------------


@SETTINGS
@given(st.binary(max_size=300), st.integers(0, 200), st.binary(max_size=8))
def test_kaldi_vectors_corrupt_ark(noise, cut, splice):
    """A real ark/scp pair, then the ark truncated / spliced / replaced: UsageError or vectors."""
    TRIED["kaldi ark/scp (corrupt)"] = TRIED.get("kaldi ark/scp (corrupt)", 0) + 1
    folder = _fresh()
    ark = folder / "xvector.ark"
    mat = np.arange(12, dtype=np.float32).reshape(3, 4)
    ark_bytes, scp_bytes = kaldi_vectors(["a", "b", "c"], mat, str(ark))
    kind = cut % 3
    if kind == 0:
        ark_bytes = ark_bytes[: cut % (len(ark_bytes) + 1)]
    elif kind == 1:
        pos = cut % (len(ark_bytes) + 1)
        ark_bytes = ark_bytes[:pos] + splice + ark_bytes[pos + len(splice) :]
    else:
        ark_bytes = noise
    ark.write_bytes(ark_bytes)
    scp = folder / "xvector.scp"
    scp.write_bytes(scp_bytes)
    try:
        out = read_kaldi_vectors(scp)
    except UsageError as exc:
        assert str(scp) in str(exc) or str(ark) in str(exc), str(exc)
        return
    assert set(out) <= {"a", "b", "c"}


@SETTINGS
@given(GARBAGE_BYTES)
def test_kaldi_scp_garbage(data):
    _garbage_ok(read_kaldi_vectors, data, "xvector.scp", "kaldi scp (garbage)")


# -- config files ---------------------------------------------------------------------------


@SETTINGS
@given(GARBAGE_BYTES)
def test_config_garbage(data):
    from speaker_sim_cli.io.config import read_config

    _garbage_ok(read_config, data, "c.yaml", "config (garbage)")


# -- serve request lines ----------------------------------------------------------------------


@SETTINGS
@given(GARBAGE_TEXT)
def test_serve_lines(line):
    """A request line parses to a request, None (blank), or a UsageError — nothing else."""
    TRIED["serve lines"] = TRIED.get("serve lines", 0) + 1
    for parse in (parse_text, parse_jsonl):
        req = parse(line)  # a bad line is a Request carrying an error, never an exception
        assert req is None or isinstance(req.id, object)


@SETTINGS
@given(
    st.dictionaries(
        st.sampled_from(["id", "a", "b", "enroll", "test", "x"]),
        st.one_of(st.none(), st.integers(), st.text(max_size=20), st.lists(st.integers())),
        max_size=4,
    )
)
def test_serve_jsonl_objects(obj):
    TRIED["serve jsonl objects"] = TRIED.get("serve jsonl objects", 0) + 1
    req = parse_jsonl(json.dumps(obj))
    assert req is not None
    good = isinstance(obj.get("a"), str) and isinstance(obj.get("b"), str) and obj["a"] and obj["b"]
    assert (req.error is None) == bool(good and not isinstance(obj.get("id"), list)), (obj, req)


def test_inputs_tried_per_reader():
    """Runs last in this module: every reader got its share of generated inputs."""
    for tag, n in TRIED.items():
        assert n >= 20, (tag, n)
    print("\ngenerated inputs per reader:", json.dumps(TRIED, indent=1))
