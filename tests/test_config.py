"""``--config FILE.yaml``: precedence, errors, every command has it, every shipped preset runs."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from speaker_sim_cli.cli.main import app
from speaker_sim_cli.io.config import PRESET_DIR, presets
from speaker_sim_cli.models.registry import DEFAULT_MODEL

REPO = Path(__file__).resolve().parents[1]

# The command each shipped preset is for. A preset missing here fails test_every_preset_is_run.
PRESET_COMMANDS = {
    "voxceleb1-o": "score",
    "cnceleb": "score",
    "cv3-eval": "score",
    "ci-gate": "eval",
    "seed-tts-eval-sim": "score",
    "funasr-xvector": "score",
    "mvector": "score",
}


@pytest.fixture
def runner():
    return CliRunner()


def _write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _labels(shared: Path) -> Path:
    return shared / "audio" / "dev_hard" / "trials.csv"


def _ref_scores(shared: Path) -> Path:
    return shared / "fixtures" / "reference" / "dev_hard_campplus_zh_en_advanced.scores.csv"


def test_presets_live_in_configs_and_the_package():
    names = set(presets())
    assert {"voxceleb1-o", "cnceleb", "cv3-eval", "ci-gate"} <= names
    assert PRESET_DIR.resolve() == (REPO / "configs").resolve()
    for path in presets().values():
        head = path.read_text().splitlines()[0]
        assert head.startswith("# "), f"{path.name} needs a comment header saying what it is"


def test_every_command_with_options_takes_config():
    cmd = typer.main.get_command(app)
    seen = []

    def walk(c, path):
        subs = getattr(c, "commands", None)
        if isinstance(subs, dict):
            for name, sub in subs.items():
                walk(sub, [*path, name])
            return
        names = {p.name for p in c.params}
        if names - {"help", "config"}:
            assert "config" in names, f"`{' '.join(path)}` has no --config"
            seen.append(" ".join(path))

    walk(cmd, [])
    assert {"score", "embed", "eval", "serve", "calibrate", "compare"} <= set(seen)


def test_eval_config_values_and_flag_precedence(runner, shared, tmp_path):
    text = f"labels: {_labels(shared)}\np-target: [0.05]\nthreshold: 0.3\nquiet: true\n"
    cfg = _write(tmp_path, text)
    report = tmp_path / "r.json"
    res = runner.invoke(app, ["eval", str(_ref_scores(shared)), "--config", str(cfg),
                              "--threshold", "0.5", "--report", str(report)])  # fmt: skip
    assert res.exit_code == 0, res.output
    doc = json.loads(report.read_text())
    inv = doc["invocation"]
    assert inv["file"] == str(cfg.resolve())
    assert set(inv["from_file"]) == {"labels", "p_target", "threshold", "quiet"}
    assert inv["options"]["threshold"] == 0.5  # the flag beat the file
    assert inv["options"]["p_target"] == [0.05]  # the file beat the default
    assert doc["metrics"]["threshold"] == 0.5
    assert list(doc["metrics"]["min_dcf"]) == ["0.05"]


def test_report_records_options_without_a_config(runner, shared, tmp_path):
    report = tmp_path / "r.json"
    res = runner.invoke(app, ["eval", str(_ref_scores(shared)), "--labels", str(_labels(shared)),
                              "--report", str(report), "-q"])  # fmt: skip
    assert res.exit_code == 0, res.output
    inv = json.loads(report.read_text())["invocation"]
    assert inv["file"] is None and inv["options"]["quiet"] is True


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("bogus: 1\n", ["unknown key 'bogus'", "allowed keys:", "max-eer"]),
        ("max-eer: high\n", ["key 'max-eer'", "valid number"]),
        ("quiet: 3\n", ["key 'quiet' takes true or false"]),
        ("p-target: {a: 1}\n", ["key 'p-target'", "mapping"]),
        ("threshold: [1, 2]\n", ["key 'threshold' takes one value"]),
        ("- a\n- b\n", ["must be a mapping"]),
        ("a: [\n", ["not valid YAML", "line"]),
        ("threshold: 1\nthreshold: 2\n", []),  # YAML keeps the last; not an error
        ("threshold: 1\nthreshold_: 2\n", ["unknown key 'threshold_'"]),
    ],
)
def test_config_errors_are_usage_errors_naming_file_and_key(runner, shared, tmp_path, text, expect):
    cfg = _write(tmp_path, text)
    res = runner.invoke(app, ["eval", str(_ref_scores(shared)), "--labels", str(_labels(shared)),
                              "--config", str(cfg), "-q"])  # fmt: skip
    if not expect:
        assert res.exit_code == 0, res.output
        return
    assert res.exit_code == 2, res.output
    flat = " ".join(res.output.replace("│", " ").split())
    assert str(cfg) in flat.replace(" ", "") or cfg.name in flat
    for piece in expect:
        assert piece in flat, (piece, flat)
    assert "Traceback" not in res.output


def test_missing_config_and_unknown_preset(runner, tmp_path):
    res = runner.invoke(app, ["eval", "x.csv", "--config", str(tmp_path / "nope.yaml")])
    assert res.exit_code == 2
    flat = " ".join(res.output.replace("│", " ").split())
    assert "no shipped preset" in flat and "voxceleb1-o" in flat


def test_positional_argument_from_config(runner, shared, tmp_path):
    cfg = _write(tmp_path, f"scores: [{_ref_scores(shared)}]\nlabels: {_labels(shared)}\n")
    res = runner.invoke(app, ["eval", "--config", str(cfg), "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["metrics"]["eer"] == pytest.approx(0.14342, abs=1e-4)


# -- every shipped preset, run on ../shared -------------------------------------------------


def _enroll_map(shared: Path, tmp_path: Path) -> tuple[Path, Path]:
    """An enrolment map (speaker -> first two VCTK recordings) and speaker-vs-recording trials."""
    by_spk: dict[str, list[str]] = {}
    for line in (shared / "audio" / "utt2spk.tsv").read_text().splitlines():
        path, spk = line.split("\t")
        if path.startswith("audio/vctk/"):
            by_spk.setdefault(spk, []).append(path)
    emap = tmp_path / "enroll.map"
    emap.write_text("".join(f"{s} {' '.join(r[:2])}\n" for s, r in sorted(by_spk.items())))
    rows = ["enrollment,test,label"]
    for s in sorted(by_spk):
        for t, recs in sorted(by_spk.items()):
            rows += [f"{s},{r},{int(s == t)}" for r in recs[2:4]]
    trials = tmp_path / "trials.csv"
    trials.write_text("\n".join(rows) + "\n")
    return emap, trials


@pytest.mark.weights
@pytest.mark.slow
def test_every_preset_is_run(runner, shared, real_ckpt, tmp_path):
    shipped = presets()
    assert set(shipped) <= set(PRESET_COMMANDS), set(shipped) - set(PRESET_COMMANDS)
    emap, spk_trials = _enroll_map(shared, tmp_path)
    for name, path in shipped.items():
        report = tmp_path / f"{name}.json"
        if PRESET_COMMANDS[name] == "eval":
            args = ["eval", str(_ref_scores(shared)), "--labels", str(_labels(shared)),
                    "--baseline", str(_baseline(runner, shared, tmp_path))]  # fmt: skip
        elif name == "mvector":  # its own model: an mvector case folder from the fixtures
            case = shared / "fixtures" / "mvector" / "cases" / "CAMPPlus_Fbank"
            lists = case / "eval_lists"
            args = ["score", "--model-dir", str(case / "models" / "CAMPPlus_Fbank" / "best_model"),
                    "--model-config", str(case / "config.yml"), "--mvector-lists",
                    str(lists / "enroll_list.txt"), str(lists / "trials_list.txt"),
                    "--root", str(shared), "--out", str(tmp_path / f"{name}.csv")]  # fmt: skip
        else:
            trials = spk_trials if name == "cnceleb" else _labels(shared)
            # The preset's model is swapped for the one real checkpoint here.
            args = ["score", "--model", DEFAULT_MODEL, "--out", str(tmp_path / f"{name}.csv")]
            if name == "seed-tts-eval-sim":  # its pair-list form: generated|prompt|text
                args += ["--pairs", str(_pairs(shared, tmp_path))]
            else:
                args += [str(trials)]
            if name == "cnceleb":
                args += ["--enroll-map", str(emap), "--root", str(shared)]
        res = runner.invoke(app, [*args, "--config", name, "--report", str(report), "-q"])
        assert res.exit_code == 0, (name, res.output)
        doc = json.loads(report.read_text())
        assert doc["invocation"]["file"] == str(path.resolve()), name
        if name == "cnceleb":  # enrolment averaged per speaker, and it separates speakers
            assert doc["metrics"]["eer"] < 0.2, doc["metrics"]
        if name == "ci-gate":
            assert doc["gate"]["passed"] is True
        if name == "seed-tts-eval-sim":
            assert doc["sim"]["count_scored"] == doc["sim"]["count_total"] == 6, doc["sim"]
        if name == "funasr-xvector":
            assert "funasr" in (tmp_path / f"{name}.csv").read_text().splitlines()[0]


def _pairs(shared: Path, tmp_path: Path) -> Path:
    """A seed-tts-eval pair list over the VCTK recordings (generated|prompt|text)."""
    wavs = sorted((shared / "audio" / "vctk" / "p225").glob("*.wav"))[:7]
    lst = tmp_path / "pairs.lst"
    lst.write_text("".join(f"{w}|{wavs[0]}|some text\n" for w in wavs[1:]))
    return lst


def _baseline(runner, shared: Path, tmp_path: Path) -> Path:
    out = tmp_path / "baseline.json"
    res = runner.invoke(app, ["eval", str(_ref_scores(shared)), "--labels", str(_labels(shared)),
                              "--report", str(out), "-q"])  # fmt: skip
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.slow
def test_non_editable_wheel_ships_the_presets(tmp_path):
    """`pip install .` gets the presets as package data (configs/ is linked into the package)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("speaker_sim-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in (REPO / "configs").glob("*.yaml"):
        assert f"speaker_sim_cli/configs/{path.name}" in names
