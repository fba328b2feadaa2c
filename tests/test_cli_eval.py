"""``speaker-sim eval`` and ``speaker-sim calibrate`` in-process (typer's CliRunner).

Reference numbers come from ../shared/fixtures/reference (skipped when absent); everything
else runs on seeded synthetic score files written in tmp_path.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner, Result

from speaker_sim_cli.cli import common
from speaker_sim_cli.cli.main import app
from speaker_sim_cli.io.scorefiles import read_scores, write_scores
from speaker_sim_cli.scoring.calibration import Calibration, cllr, fit_calibration, min_cllr
from speaker_sim_cli.scoring.metrics import error_rates_at, evaluate

REF = "fixtures/reference"
HARD = "dev_hard_campplus_zh_en_advanced"
DEV = "dev_trials_campplus_zh_en_advanced"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SCORE_COUNT_KEYS = {"trials", "scored", "failed", "targets", "nontargets"}

runner = CliRunner()


def run(*args: object) -> Result:
    """Invoke the app; never let an exception escape as a traceback."""
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"uncaught {result.exception!r}\n{result.stderr}")
    assert "Traceback" not in result.stderr
    return result


def one_line(stderr: str, prefix: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith(prefix)]
    assert len(lines) == 1, stderr
    return lines[0]


def png_ok(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    assert data.endswith(b"IEND\xaeB`\x82"), f"{path} is truncated"
    w, h = struct.unpack(">II", data[16:24])
    return w, h


def synthetic(n: int = 2000, seed: int = 0, sep: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.2).astype(np.int8)
    s = np.round(np.tanh(rng.normal(y * sep, 1.0) / 3.0), 6)  # cosine-like, 6 decimals
    return s, y


def write(
    path: Path,
    s: np.ndarray,
    y: np.ndarray | None,
    fmt: str = "csv",
    names: tuple[list[str], list[str]] | None = None,
    errors: list[str | None] | None = None,
) -> Path:
    enroll, test = names or ([f"e{i}" for i in range(len(s))], [f"t{i}" for i in range(len(s))])
    with open(path, "w", encoding="utf-8", newline="") as f:
        write_scores(f, enroll, test, s, y, errors, fmt)
    return path


@pytest.fixture
def syn(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    s, y = synthetic()
    return write(tmp_path / "syn.csv", s, y), s, y


@pytest.fixture(scope="session")
def ref(shared: Path) -> Path:
    return shared / REF


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------


@pytest.mark.shared
@pytest.mark.parametrize("name", [HARD, DEV])
def test_reference_metrics_match(ref: Path, tmp_path: Path, name: str) -> None:
    expected = json.loads((ref / f"{name}.metrics.json").read_text())
    out = tmp_path / "r.json"
    res = run("eval", ref / f"{name}.scores.csv", "--report", out)
    assert res.exit_code == 0, res.stderr
    assert res.stdout == ""  # the report went to the file
    doc = json.loads(out.read_text())
    m = doc["metrics"]
    assert m["eer"] == pytest.approx(expected["eer"], abs=1e-12)
    assert m["min_dcf"]["0.01"] == pytest.approx(expected["min_dcf_p0.01"], abs=1e-12)
    assert m["min_dcf"]["0.05"] == pytest.approx(expected["min_dcf_p0.05"], abs=1e-12)
    # the score file holds 6 decimals, the reference threshold the float32 score
    assert m["eer_threshold"] == pytest.approx(expected["eer_threshold"], abs=1e-6)
    assert set(m["min_dcf_threshold"]) == {"0.01", "0.05"}
    assert doc["counts"]["targets"] == expected["targets"]
    assert doc["counts"]["nontargets"] == expected["nontargets"]
    assert "NIST SRE16" in m["definition"]


def test_report_keys_match_score_report(syn: tuple[Path, np.ndarray, np.ndarray]) -> None:
    path, s, y = syn
    res = run("eval", path)  # JSON to stdout
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    expected = common.metrics_block(evaluate(s, y, p_targets=[0.01, 0.05]))
    assert doc["metrics"].keys() == expected.keys()
    assert doc["metrics"]["eer"] == expected["eer"]
    assert doc["metrics"]["min_dcf"] == expected["min_dcf"]
    assert set(doc["counts"]) == SCORE_COUNT_KEYS  # the keys `score --report` writes too
    assert doc["scores"] == str(path)
    assert doc["score_format"] == "csv"


def test_p_target_and_costs(syn: tuple[Path, np.ndarray, np.ndarray]) -> None:
    path, s, y = syn
    res = run("eval", path, "--p-target", "0.001", "--p-target", "0.1", "--c-miss", "10")
    assert res.exit_code == 0, res.stderr
    m = json.loads(res.stdout)["metrics"]
    want = evaluate(s, y, p_targets=[0.001, 0.1], c_miss=10.0)
    assert m["min_dcf"] == {"0.001": want.min_dcf[0.001], "0.1": want.min_dcf[0.1]}
    assert m["c_miss"] == 10.0
    assert m["c_fa"] == 1.0


def test_threshold_far_frr_hand_computed(tmp_path: Path) -> None:
    path = write(tmp_path / "tiny.csv", np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    res = run("eval", path, "--threshold", "0.35", "--p-target", "0.01")
    assert res.exit_code == 0, res.stderr
    m = json.loads(res.stdout)["metrics"]
    # accept when score > 0.35: non-target 0.4 accepted (FAR 1/2), target 0.35 rejected (FRR 1/2)
    assert (m["threshold"], m["far"], m["frr"]) == (0.35, 0.5, 0.5)
    assert m["actual_dcf"]["0.01"] == pytest.approx((0.01 * 0.5 + 0.99 * 0.5) / 0.01)
    assert "FAR 50.0000%, FRR 50.0000%" in res.stderr


def test_threshold_matches_library(syn: tuple[Path, np.ndarray, np.ndarray]) -> None:
    path, s, y = syn
    res = run("eval", path, "--threshold", "0.2")
    m = json.loads(res.stdout)["metrics"]
    assert (m["far"], m["frr"]) == error_rates_at(s, y, 0.2)


def test_failed_rows_are_left_out_and_counted(tmp_path: Path) -> None:
    s, y = synthetic(300)
    s = s.copy()
    s[:5] = np.nan
    errors: list[str | None] = ["decode error"] * 5 + [None] * 295
    path = write(tmp_path / "f.csv", s, y, errors=errors)
    res = run("eval", path)
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["counts"] == {
        "trials": 300,
        "scored": 295,
        "failed": 5,
        "targets": int(y[5:].sum()),
        "nontargets": int(295 - y[5:].sum()),
    }
    assert doc["metrics"]["eer"] == evaluate(s[5:], y[5:]).eer
    assert "5 rows without a score" in res.stderr


def test_several_files(tmp_path: Path) -> None:
    a = write(tmp_path / "a.csv", *synthetic(seed=1))
    b = write(tmp_path / "b.csv", *synthetic(seed=2, sep=1.0))
    res = run("eval", a, b)
    assert res.exit_code == 0, res.stderr
    files = json.loads(res.stdout)["files"]
    assert list(files) == [str(a), str(b)]
    assert files[str(a)]["metrics"]["eer"] < files[str(b)]["metrics"]["eer"]


# ---------------------------------------------------------------------------------------------
# formats and labels
# ---------------------------------------------------------------------------------------------


@pytest.mark.shared
@pytest.mark.parametrize("fmt", ["csv", "kaldi", "wespeaker"])
def test_formats_round_trip(ref: Path, tmp_path: Path, fmt: str) -> None:
    t = read_scores(ref / f"{HARD}.scores.csv")
    assert t.labels is not None
    # whitespace formats cannot hold the one dev_hard file name with a space
    names = ([e.replace(" ", "_") for e in t.enroll], [x.replace(" ", "_") for x in t.test])
    path = write(tmp_path / f"s.{fmt}", t.scores, t.labels, fmt, names)
    res = run("eval", path)
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    expected = json.loads((ref / f"{HARD}.metrics.json").read_text())
    assert doc["score_format"] == fmt
    assert doc["metrics"]["eer"] == pytest.approx(expected["eer"], abs=1e-12)
    assert doc["metrics"]["min_dcf"]["0.01"] == pytest.approx(expected["min_dcf_p0.01"], abs=1e-12)
    assert doc["counts"]["trials"] == len(t.scores)


@pytest.mark.parametrize("fmt", ["csv", "kaldi", "wespeaker"])
def test_labels_option_works_with_every_format(tmp_path: Path, fmt: str) -> None:
    s, y = synthetic(500, seed=3)
    enroll = [f"spk{i % 7}-utt{i}" for i in range(500)]
    test = [f"spk{i % 5}-utt{i + 1000}" for i in range(500)]
    unlabelled = write(tmp_path / f"u.{fmt}", s, None, fmt, (enroll, test))
    trials = tmp_path / "trials.txt"  # Kaldi trials, in shuffled order
    order = np.random.default_rng(0).permutation(500)
    trials.write_text(
        "".join(f"{enroll[i]} {test[i]} {'target' if y[i] else 'nontarget'}\n" for i in order)
    )
    no_labels = run("eval", unlabelled)
    assert no_labels.exit_code == 2
    assert "--labels" in one_line(no_labels.stderr, "error:")
    res = run("eval", unlabelled, "--labels", trials)
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["metrics"]["eer"] == evaluate(s, y).eer
    assert doc["labels"] == str(trials)


def test_labels_option_overrides_file_labels(tmp_path: Path) -> None:
    s, y = synthetic(200, seed=4)
    path = write(tmp_path / "s.csv", s, 1 - y)  # wrong labels in the file
    trials = tmp_path / "trials.csv"
    trials.write_text(
        "enrollment,test,label\n" + "".join(f"e{i},t{i},{int(v)}\n" for i, v in enumerate(y))
    )
    res = run("eval", path, "--labels", trials)
    assert res.exit_code == 0
    assert json.loads(res.stdout)["metrics"]["eer"] == evaluate(s, y).eer
    assert "differ" in res.stderr


def test_pair_missing_from_labels_is_usage_error(tmp_path: Path) -> None:
    path = write(tmp_path / "s.csv", *synthetic(50))
    trials = tmp_path / "trials.csv"
    trials.write_text("enrollment,test,label\ne0,t0,1\n")
    res = run("eval", path, "--labels", trials)
    assert res.exit_code == 2
    assert "not in the labelled list" in one_line(res.stderr, "error:")


def test_all_target_input_is_a_clear_usage_error(tmp_path: Path) -> None:
    path = write(tmp_path / "all.csv", np.array([0.1, 0.5, 0.9]), np.array([1, 1, 1]))
    res = run("eval", path)
    assert res.exit_code == 2
    line = one_line(res.stderr, "error:")
    assert str(path) in line and "no non-target" in line
    assert res.stdout == ""


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("", "empty"),
        ("a b c d e\n", "fields"),
        ("enrollment,test,label,score\ne1,t1,0,0.5\n", "no target"),
    ],
)
def test_bad_score_files_exit_2(tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(content)
    res = run("eval", path)
    assert res.exit_code == 2
    assert needle in one_line(res.stderr, "error:")


def test_missing_file_exit_2(tmp_path: Path) -> None:
    res = run("eval", tmp_path / "nope.csv")
    assert res.exit_code == 2
    assert "not found" in one_line(res.stderr, "error:")


# ---------------------------------------------------------------------------------------------
# the CI gate
# ---------------------------------------------------------------------------------------------


def test_gate_absolute_limits(syn: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path) -> None:
    path, s, y = syn
    m = evaluate(s, y, p_targets=[0.01, 0.05, 0.001])
    ok = run("eval", path, "-q", "--max-eer", m.eer, "--max-min-dcf", m.min_dcf[0.01])
    assert ok.exit_code == 0, ok.stderr  # equal to the limit passes
    assert json.loads(ok.stdout)["gate"]["passed"] is True

    report = tmp_path / "gate.json"
    bad = run("eval", path, "-q", "--max-eer", m.eer - 1e-4, "--report", report)
    assert bad.exit_code == 1
    assert bad.stderr.count("\n") == 1  # -q: exactly the one-line reason
    line = one_line(bad.stderr, "gate failed:")
    assert f"EER {m.eer:.6f} > max {m.eer - 1e-4:g}" in line
    gate = json.loads(report.read_text())["gate"]  # the report is written before exiting
    assert gate["passed"] is False
    assert [c["metric"] for c in gate["checks"] if not c["passed"]] == ["eer"]

    dcf = run("eval", path, "-q", "--max-min-dcf", m.min_dcf[0.01] - 1e-4)
    assert dcf.exit_code == 1
    assert "minDCF(0.01)" in one_line(dcf.stderr, "gate failed:")

    # --gate-p picks the prior (and adds it to the report when it was not asked for)
    p05 = run("eval", path, "-q", "--max-min-dcf", m.min_dcf[0.05], "--gate-p", "0.05")
    assert p05.exit_code == 0
    p001 = run("eval", path, "-q", "--max-min-dcf", m.min_dcf[0.001] - 1e-4, "--gate-p", "0.001")
    assert p001.exit_code == 1
    assert "minDCF(0.001)" in one_line(p001.stderr, "gate failed:")
    assert "0.001" in json.loads(p001.stdout)["metrics"]["min_dcf"]

    both = run("eval", path, "-q", "--max-eer", "0", "--max-min-dcf", "0")
    assert both.exit_code == 1
    line = one_line(both.stderr, "gate failed:")
    assert "EER" in line and "minDCF(0.01)" in line


@pytest.mark.parametrize("args", [["--max-eer", "5"], ["--tolerance", "-1"], ["--p-target", "1"]])
def test_gate_bad_options_exit_2(syn: tuple[Path, np.ndarray, np.ndarray], args: list[str]) -> None:
    res = run("eval", syn[0], *args)
    assert res.exit_code == 2


def test_baseline_same_run_passes_and_worse_fails(tmp_path: Path) -> None:
    good = write(tmp_path / "good.csv", *synthetic(seed=5, sep=2.5))
    worse = write(tmp_path / "worse.csv", *synthetic(seed=5, sep=2.0))
    base = tmp_path / "main.json"
    assert run("eval", good, "-q", "--report", base).exit_code == 0
    old = json.loads(base.read_text())["metrics"]

    same = run("eval", good, "-q", "--baseline", base)
    assert same.exit_code == 0, same.stderr

    res = run("eval", worse, "-q", "--baseline", base)
    assert res.exit_code == 1
    line = one_line(res.stderr, "gate failed:")
    new = json.loads(res.stdout)["metrics"]
    assert f"EER {new['eer']:.6f} is worse than baseline {old['eer']:.6f}" in line
    assert "minDCF(0.01)" in line and "minDCF(0.05)" in line

    # improvements never fail; a generous tolerance lets the worse run pass
    assert run("eval", good, "-q", "--baseline", tmp_path / "main.json").exit_code == 0
    gaps = [new["eer"] - old["eer"]] + [
        new["min_dcf"][p] - old["min_dcf"][p] for p in old["min_dcf"]
    ]
    worst_gap = max(gaps)
    loose = run("eval", worse, "-q", "--baseline", base, "--tolerance", worst_gap + 1e-9)
    assert loose.exit_code == 0, loose.stderr
    tight = run("eval", worse, "-q", "--baseline", base, "--tolerance", worst_gap - 1e-6)
    assert tight.exit_code == 1


def test_baseline_tolerance_is_absolute(
    syn: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    path, s, y = syn
    m = evaluate(s, y)
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"metrics": {"eer": m.eer - 0.001, "min_dcf": {}}}))
    assert run("eval", path, "-q", "--baseline", base).exit_code == 1
    assert run("eval", path, "-q", "--baseline", base, "--tolerance", "0.002").exit_code == 0
    fail = run("eval", path, "-q", "--baseline", base, "--tolerance", "0.0005")
    assert fail.exit_code == 1
    assert "tolerance 0.0005" in one_line(fail.stderr, "gate failed:")


def test_dcf_tolerance_is_separate(
    syn: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    path, s, y = syn
    m = evaluate(s, y)
    base = tmp_path / "base.json"
    base.write_text(
        json.dumps({"metrics": {"eer": m.eer - 0.001, "min_dcf": {"0.01": m.min_dcf[0.01] - 0.01}}})
    )
    res = run("eval", path, "-q", "--baseline", base, "--tolerance", "0.002")
    assert res.exit_code == 1
    line = one_line(res.stderr, "gate failed:")
    assert "minDCF(0.01)" in line and "EER" not in line
    ok = run(
        "eval", path, "-q", "--baseline", base, "--tolerance", "0.002", "--dcf-tolerance", 0.02
    )
    assert ok.exit_code == 0, ok.stderr
    gate = json.loads(ok.stdout)["gate"]
    assert gate["tolerance"] == {"eer": 0.002, "min_dcf": 0.02}
    assert [c["metric"] for c in gate["checks"]] == ["eer", "min_dcf[0.01]"]


def test_baseline_from_score_report_shape(
    syn: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    path, s, y = syn
    m = evaluate(s, y, p_targets=[0.01, 0.05])
    doc: dict[str, Any] = {  # what `speaker-sim score --report` writes
        "trials": {"source": "trials.csv", "format": "csv", "trials": len(s)},
        "metrics": common.metrics_block(m),
        "counts": {"trials": len(s), "scored": len(s), "failed": 0},
        "model": {"id": "x"},
        "scores": "new.csv",
        "score_format": "csv",
    }
    base = tmp_path / "score-report.json"
    common.write_json(base, doc)
    assert run("eval", path, "-q", "--baseline", base).exit_code == 0
    doc["metrics"]["min_dcf"]["0.05"] -= 0.01
    common.write_json(base, doc)
    res = run("eval", path, "-q", "--baseline", base)
    assert res.exit_code == 1
    line = one_line(res.stderr, "gate failed:")
    assert "minDCF(0.05)" in line and "EER" not in line

    doc["metrics"] = None  # an unlabelled score run has no metrics
    common.write_json(base, doc)
    res = run("eval", path, "-q", "--baseline", base)
    assert res.exit_code == 2
    assert "no metrics" in one_line(res.stderr, "error:")


@pytest.mark.shared
def test_baseline_flat_reference_json(ref: Path) -> None:
    res = run("eval", ref / f"{HARD}.scores.csv", "-q", "--baseline", ref / f"{HARD}.metrics.json")
    assert res.exit_code == 0, res.stderr
    worse = run("eval", ref / f"{HARD}.scores.csv", "-q", "--baseline", ref / f"{DEV}.metrics.json")
    assert worse.exit_code == 1
    assert "baseline 0.000000" in one_line(worse.stderr, "gate failed:")


def test_baseline_several_files_matched_by_name(tmp_path: Path) -> None:
    (tmp_path / "main").mkdir()
    (tmp_path / "pr").mkdir()
    for d, sep in (("main", 2.0), ("pr", 2.0)):
        write(tmp_path / d / "a.csv", *synthetic(seed=6, sep=sep))
        write(tmp_path / d / "b.csv", *synthetic(seed=7, sep=1.0 if d == "main" else 0.5))
    base = tmp_path / "main.json"
    main_files = [tmp_path / "main" / "a.csv", tmp_path / "main" / "b.csv"]
    assert run("eval", *main_files, "-q", "--report", base).exit_code == 0
    pr = [tmp_path / "pr" / "a.csv", tmp_path / "pr" / "b.csv"]
    res = run("eval", *pr, "-q", "--baseline", base)
    assert res.exit_code == 1
    line = one_line(res.stderr, "gate failed:")
    assert line.startswith("gate failed: b: EER") and "a: " not in line

    other = write(tmp_path / "c.csv", *synthetic(seed=8))
    res = run("eval", pr[0], other, "-q", "--baseline", base)
    assert res.exit_code == 2
    assert "no entry for" in one_line(res.stderr, "error:")


def test_baseline_with_other_costs_is_usage_error(
    syn: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    base = tmp_path / "b.json"
    assert run("eval", syn[0], "-q", "--c-miss", "10", "--report", base).exit_code == 0
    res = run("eval", syn[0], "-q", "--baseline", base)
    assert res.exit_code == 2
    assert "c_miss" in one_line(res.stderr, "error:")


@pytest.mark.parametrize("content", ["not json", "[1, 2]", '{"metrics": {"eer": "x"}}', "{}"])
def test_bad_baseline_exit_2(
    syn: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path, content: str
) -> None:
    base = tmp_path / "b.json"
    base.write_text(content)
    res = run("eval", syn[0], "-q", "--baseline", base)
    assert res.exit_code == 2
    one_line(res.stderr, "error:")


# ---------------------------------------------------------------------------------------------
# pictures
# ---------------------------------------------------------------------------------------------


def test_plots_written(tmp_path: Path) -> None:
    a = write(tmp_path / "sys a.scores.csv", *synthetic(seed=9))
    (tmp_path / "x").mkdir()
    b = write(tmp_path / "x" / "b.txt", *synthetic(seed=10, sep=1.0), fmt="kaldi")
    out = tmp_path / "plots"
    res = run("eval", a, b, "--plot", out, "-q")
    assert res.exit_code == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["det.png", "hist_b.png", "hist_sys_a.png"]
    for p in out.iterdir():
        w, h = png_ok(p)
        assert w > 300 and h > 300
    plots = json.loads(res.stdout)["plots"]
    assert plots["det"] == str(out / "det.png")
    assert plots["histograms"] == {
        str(a): str(out / "hist_sys_a.png"),
        str(b): str(out / "hist_b.png"),
    }


def test_plots_same_file_names_stay_apart(tmp_path: Path) -> None:
    paths = []
    for d in ("run1", "run2"):
        (tmp_path / d).mkdir()
        paths.append(write(tmp_path / d / "scores.csv", *synthetic(seed=len(d))))
    out = tmp_path / "plots"
    assert run("eval", *paths, "--plot", out, "-q").exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "det.png",
        "hist_run1_scores.png",
        "hist_run2_scores.png",
    ]


@pytest.mark.shared
def test_plots_of_reference_scores(ref: Path, tmp_path: Path) -> None:
    out = tmp_path / "plots"
    res = run("eval", ref / f"{HARD}.scores.csv", ref / f"{DEV}.scores.csv", "--plot", out, "-q")
    assert res.exit_code == 0, res.stderr
    for name in ("det.png", f"hist_{HARD}.png", f"hist_{DEV}.png"):
        png_ok(out / name)


def test_eval_does_not_import_torch(tmp_path: Path) -> None:
    path = write(tmp_path / "s.csv", *synthetic(300))
    code = (
        "import sys, json\n"
        "from typer.testing import CliRunner\n"
        "from speaker_sim_cli.cli.main import app\n"
        f"r = CliRunner().invoke(app, ['eval', {str(path)!r}, '--plot', {str(tmp_path / 'p')!r}])\n"
        "assert r.exit_code == 0, r.stderr\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []


def test_help_names_the_definition() -> None:
    res = runner.invoke(app, ["eval", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    assert "NIST SRE16" in res.stdout
    for opt in ("--plot", "--max-eer", "--max-min-dcf", "--gate-p", "--baseline", "--tolerance"):
        assert opt in res.stdout


# ---------------------------------------------------------------------------------------------
# calibrate
# ---------------------------------------------------------------------------------------------


def test_calibrate_fit_and_apply(tmp_path: Path) -> None:
    s_tr, y_tr = synthetic(3000, seed=11)
    s_ev, y_ev = synthetic(1000, seed=12)
    train = write(tmp_path / "train.csv", s_tr, y_tr)
    ev = write(tmp_path / "eval.csv", s_ev, y_ev)
    unl = write(tmp_path / "unl.txt", s_ev[:100], None, fmt="kaldi")
    cal_path = tmp_path / "cal.json"
    res = run(
        "calibrate", train, "--out", cal_path, "--apply", ev, "--apply", unl,
        "--out-dir", tmp_path / "out",
    )  # fmt: skip
    assert res.exit_code == 0, res.stderr
    assert res.stdout == ""
    doc = json.loads(cal_path.read_text())
    want = fit_calibration(s_tr, y_tr)
    assert doc["slope"] == pytest.approx(want.slope) and doc["slope"] > 0
    assert doc["offset"] == pytest.approx(want.offset)
    assert doc["prior"] == 0.5
    assert doc["cllr"] == pytest.approx(want.cllr)
    assert doc["min_cllr"] == pytest.approx(min_cllr(s_tr, y_tr))
    assert 0.0 < doc["min_cllr"] <= doc["cllr"] < 1.0
    assert doc["train"]["targets"] == int(y_tr.sum())
    cal = Calibration.from_dict(doc)

    out = (tmp_path / "out" / "eval.llr.csv").read_text().splitlines()
    assert out[0] == "enrollment,test,label,score,llr"
    llr = np.array([float(r.split(",")[4]) for r in out[1:]])
    np.testing.assert_allclose(llr, cal.apply(s_ev), atol=1e-6)
    back = read_scores(tmp_path / "out" / "eval.llr.csv")  # still a score file eval reads
    np.testing.assert_array_equal(back.scores, s_ev)
    assert (tmp_path / "out" / "unl.llr.csv").exists()
    # the table shows Cllr / minCllr of the labelled file, and says the other is unlabelled
    assert f"{cllr(cal.apply(s_ev), y_ev):.4f}" in res.stderr
    assert f"{min_cllr(s_ev, y_ev):.4f}" in res.stderr
    assert "unlabelled" in res.stderr


@pytest.mark.parametrize("fmt", ["kaldi", "wespeaker"])
def test_calibrate_saved_calibration_other_formats(tmp_path: Path, fmt: str) -> None:
    s, y = synthetic(800, seed=13)
    train = write(tmp_path / "train.csv", s, y)
    res = run("calibrate", train, "-q")  # calibration JSON to stdout
    assert res.exit_code == 0, res.stderr
    cal_path = tmp_path / "cal.json"
    cal_path.write_text(res.stdout)
    cal = Calibration.from_dict(json.loads(res.stdout))
    res = run(
        "calibrate", "--calibration", cal_path, "--apply", train, "--out-dir", tmp_path / "o",
        "--format", fmt, "-q",
    )  # fmt: skip
    assert res.exit_code == 0, res.stderr
    back = read_scores(tmp_path / "o" / "train.llr.txt")
    assert back.format == fmt
    np.testing.assert_allclose(back.scores, cal.apply(s), atol=1e-6)
    np.testing.assert_array_equal(back.labels, y)


@pytest.mark.shared
def test_calibrate_reference(ref: Path, tmp_path: Path) -> None:
    res = run(
        "calibrate", ref / f"{HARD}.scores.csv", "--out", tmp_path / "cal.json",
        "--apply", ref / f"{DEV}.scores.csv", "--out-dir", tmp_path / "o",
    )  # fmt: skip
    assert res.exit_code == 0, res.stderr
    doc = json.loads((tmp_path / "cal.json").read_text())
    assert doc["slope"] > 0
    assert 0.0 < doc["min_cllr"] < doc["cllr"] < 1.0
    # the dev trials are perfectly separated: minCllr 0
    assert "0.0000" in res.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ([], "TRAIN_SCORES"),
        (["{train}", "--calibration", "{train}"], "not both"),
        (["{train}", "--apply", "{train}"], "--out-dir"),
        (["--calibration", "{cal}"], "--apply"),
        (["{unl}"], "no labels"),
        (["{alltgt}"], "no non-target"),
        (["--calibration", "{train}", "--apply", "{train}", "--out-dir", "{tmp}"], "calibration"),
    ],
)
def test_calibrate_usage_errors(tmp_path: Path, args: list[str], needle: str) -> None:
    s, y = synthetic(100)
    files = {
        "train": write(tmp_path / "train.csv", s, y),
        "unl": write(tmp_path / "unl.csv", s, None),
        "alltgt": write(tmp_path / "all.csv", s, np.ones_like(y)),
        "cal": tmp_path / "cal.json",
        "tmp": tmp_path / "o",
    }
    files["cal"].write_text(json.dumps({"slope": 1.0, "offset": 0.0}))
    res = run("calibrate", *[a.format(**files) for a in args])
    assert res.exit_code == 2
    assert needle in one_line(res.stderr, "error:")


def test_json_stays_finite(tmp_path: Path) -> None:
    # at p_target 0.99 this poor system is cheapest accepting everything: threshold -inf,
    # which the JSON writes as null (never Infinity, which is not JSON)
    path = write(tmp_path / "p.csv", np.array([0.1, 0.2, 0.3, 0.4]), np.array([1, 0, 1, 0]))
    res = run("eval", path, "--p-target", "0.99")
    assert res.exit_code == 0, res.stderr
    assert "Infinity" not in res.stdout and "NaN" not in res.stdout
    m = json.loads(res.stdout)["metrics"]
    assert m["min_dcf"]["0.99"] == 1.0
    assert m["min_dcf_threshold"]["0.99"] is None


def test_read_scores_resolves_lines_that_read_both_ways(tmp_path: Path) -> None:
    """'a b 0 1' is WeSpeaker (score 0, target) or Kaldi (nontarget, score 1): the file's
    other lines decide, wherever the ambiguous line stands; a file of only such lines is
    refused, and mixed formats are named."""
    from speaker_sim_cli.errors import UsageError

    def read(name: str, text: str):
        f = tmp_path / name
        f.write_text(text)
        return read_scores(f)

    we = read("we.txt", "a b 0 1\nc d 0.25 nontarget\n")
    assert we.format == "wespeaker"
    assert we.scores.tolist() == [0.0, 0.25] and we.labels.tolist() == [1, 0]
    ka = read("ka.txt", "c d target 0.75\na b 0 1\n")
    assert ka.format == "kaldi"
    assert ka.scores.tolist() == [0.75, 1.0] and ka.labels.tolist() == [1, 0]
    with pytest.raises(UsageError, match="reads both as"):
        read("both.txt", "a b 0 1\nc d 1 0\n")
    with pytest.raises(UsageError, match=r"mixed.txt:2: line format kaldi differs"):
        read("mixed.txt", "a b 0.5 target\nc d nontarget 0.25\n")
    with pytest.raises(UsageError, match=r"odd.txt:1: cannot tell score from label"):
        read("odd.txt", "a b x y\n")
    with pytest.raises(UsageError, match=r"five.txt:1: expected 3 or 4 fields, found 5"):
        read("five.txt", "a b 0.5 target z\n")
