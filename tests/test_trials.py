"""Every trial format, wav.scp and path lists; errors name the file and the line."""

from __future__ import annotations

import pytest

from speaker_sim_cli.errors import UsageError
from speaker_sim_cli.io.trials import read_inputs, read_trials, read_wav_scp, resolve_trial_items


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


@pytest.mark.parametrize(
    "header", ["enrollment,test,label", "enroll,test,target", "utt1,utt2,is_target",
               "Enrollment,Test,Label", "audio1,audio2,label"],
)  # fmt: skip
def test_csv_header_synonyms(tmp_path, header):
    t = read_trials(write(tmp_path, "t.csv", f"{header}\na.wav,b.wav,1\nb.wav,c.wav,0\n"))
    assert t.enroll == ["a.wav", "b.wav"] and t.test == ["b.wav", "c.wav"]
    assert t.labels is not None and t.labels.tolist() == [1, 0]
    assert t.format == "csv"


def test_csv_columns_in_any_order_and_extra_columns(tmp_path):
    t = read_trials(write(tmp_path, "t.csv", "label,note,test,enrollment\ntarget,x,b.wav,a.wav\n"))
    assert (t.enroll, t.test, t.labels.tolist()) == (["a.wav"], ["b.wav"], [1])


def test_csv_without_labels_and_with_spaces(tmp_path):
    t = read_trials(write(tmp_path, "t.csv", "enrollment,test\nmy take 1.wav,ä ö.flac\n"))
    assert t.labels is None
    assert t.enroll == ["my take 1.wav"] and t.test == ["ä ö.flac"]


def test_headerless_csv_is_positional(tmp_path):
    t = read_trials(write(tmp_path, "t.csv", "a.wav,b.wav,1\nc.wav,d.wav,0\n"))
    assert t.enroll == ["a.wav", "c.wav"] and t.labels.tolist() == [1, 0]
    assert "no header" in t.format


@pytest.mark.parametrize(("line", "label"), [("target", 1), ("nontarget", 0), ("1", 1), ("0", 0)])
def test_kaldi_trials(tmp_path, line, label):
    t = read_trials(write(tmp_path, "trials", f"spk1-utt1 spk1-utt2 {line}\n"))
    assert t.format == "kaldi"
    assert (t.enroll, t.test, t.labels.tolist()) == (["spk1-utt1"], ["spk1-utt2"], [label])


def test_kaldi_trials_without_labels(tmp_path):
    t = read_trials(write(tmp_path, "trials", "u1 u2\nu2 u3\n"))
    assert t.labels is None and len(t) == 2


def test_voxceleb_list(tmp_path):
    text = "1 id10270/x6uYqmx31kE/00001.wav id10270/8jEAjG6SegY/00008.wav\n0 a/b/1.wav c/d/2.wav\n"
    t = read_trials(write(tmp_path, "veri_test.txt", text))
    assert t.format == "voxceleb"
    assert t.enroll[0] == "id10270/x6uYqmx31kE/00001.wav" and t.labels.tolist() == [1, 0]


def test_errors_name_file_and_line(tmp_path):
    p = write(tmp_path, "t.csv", "enrollment,test,label\na.wav,b.wav,1\na.wav,b.wav,maybe\n")
    with pytest.raises(UsageError, match=r"t\.csv:3: unknown label 'maybe'"):
        read_trials(p)
    p = write(tmp_path, "t2.csv", "enrollment,test,label\na.wav,b.wav\n")
    with pytest.raises(UsageError, match=r"t2\.csv:2: expected 3 fields, found 2"):
        read_trials(p)
    p = write(tmp_path, "trials", "a b target\na b c d\n")
    with pytest.raises(UsageError, match=r"trials:2: expected"):
        read_trials(p)
    with pytest.raises(UsageError, match="file not found"):
        read_trials(tmp_path / "missing.csv")
    with pytest.raises(UsageError, match="empty"):
        read_trials(write(tmp_path, "e.csv", "\n"))


def test_relative_paths_resolve_against_root_or_trial_folder(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.wav").write_bytes(b"x")
    t = read_trials(write(tmp_path / "data", "t.csv", "enrollment,test\na.wav,b.wav\n"))
    recs, missing = resolve_trial_items(t)
    assert recs["a.wav"].path == (tmp_path / "data" / "a.wav").resolve()
    recs, _ = resolve_trial_items(t, root=tmp_path / "elsewhere")
    assert recs["a.wav"].path == tmp_path / "elsewhere" / "a.wav"
    assert not missing


def test_paths_relative_to_a_parent_folder_are_found(tmp_path):
    (tmp_path / "audio").mkdir()
    (tmp_path / "audio" / "a.wav").write_bytes(b"x")
    (tmp_path / "lists").mkdir()
    t = read_trials(
        write(tmp_path / "lists", "t.csv", "enrollment,test\naudio/a.wav,audio/b.wav\n")
    )
    recs, _ = resolve_trial_items(t)
    assert recs["audio/a.wav"].path == (tmp_path / "audio" / "a.wav").resolve()


def test_wav_scp_and_ids(tmp_path):
    scp = write(tmp_path, "wav.scp", "u1 /data/a b.wav\nu2 rel/c.wav\n")
    table = read_wav_scp(scp)
    assert table == {"u1": "/data/a b.wav", "u2": "rel/c.wav"}
    t = read_trials(write(tmp_path, "trials", "u1 u2 target\nu1 u3 nontarget\n"))
    recs, missing = resolve_trial_items(t, wav_scp=table, scp_dir=tmp_path)
    assert str(recs["u1"].path) == "/data/a b.wav"
    assert recs["u2"].path == tmp_path / "rel" / "c.wav"
    assert missing == {"u3": "utterance id not in wav.scp"}


def test_wav_scp_commands_are_refused_clearly(tmp_path):
    scp = write(tmp_path, "wav.scp", "u1 sox a.wav -t wav - |\n")
    with pytest.raises(UsageError, match=r"wav\.scp:1: entry 'u1' is a command"):
        read_wav_scp(scp)


def test_wav_scp_duplicate_ids(tmp_path):
    with pytest.raises(UsageError, match="appears twice"):
        read_wav_scp(write(tmp_path, "wav.scp", "u1 a.wav\nu1 b.wav\n"))


def test_embed_inputs(tmp_path):
    (tmp_path / "x.wav").write_bytes(b"x")
    lst = write(tmp_path, "list.txt", "x.wav\nsub dir/y.flac\n")
    scp = write(tmp_path, "wav.scp", "k1 x.wav\n")
    recs = read_inputs([str(tmp_path / "x.wav"), str(lst), str(scp)])
    assert [r.key for r in recs] == [str(tmp_path / "x.wav"), "x.wav", "sub dir/y.flac", "k1"]
    assert recs[2].path == tmp_path / "sub dir" / "y.flac"
    assert recs[3].path == tmp_path / "x.wav"
