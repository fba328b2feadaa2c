"""Published decision thresholds: in the registry, in `models`, and as `compare`'s verdict."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from speaker_sim_cli.cli.main import app
from speaker_sim_cli.models.registry import MODELS, get_model


def test_published_thresholds():
    assert get_model("iic/speech_campplus_sv_zh-cn_16k-common").threshold == 0.31
    assert get_model("iic/speech_eres2net_base_sv_zh-cn_3dspeaker_16k").threshold == 0.249
    for m in MODELS:
        assert m.threshold is None or -1.0 < m.threshold < 1.0, m.id


def test_models_json_lists_thresholds():
    res = CliRunner().invoke(app, ["models", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["id"]: r for r in json.loads(res.stdout)}
    assert rows["iic/speech_campplus_sv_zh-cn_16k-common"]["threshold"] == 0.31


@pytest.mark.weights
def test_compare_verdict_column(shared, real_ckpt, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    folder = shared / "audio" / "3dspeaker_examples"
    runner = CliRunner()
    plain = runner.invoke(app, ["compare", str(folder), "-q"])
    assert plain.exit_code == 0, plain.output
    assert "verdict" not in plain.stdout  # this model's card publishes no threshold
    res = runner.invoke(app, ["compare", str(folder), "--threshold", "0.3", "-q"])
    assert res.exit_code == 0, res.output
    rows = [line.split("│") for line in res.stdout.splitlines() if ".wav" in line]
    assert rows and "verdict" in res.stdout
    for cells in rows:
        cos, verdict = float(cells[3]), cells[4].strip()
        assert verdict == ("same" if cos >= 0.3 else "different"), cells
    # same person, same language (speaker1_a/b) is judged the same at 0.3
    same = [c for c in rows if "speaker1_a_cn" in c[1] and "speaker1_b_cn" in c[2]]
    assert same and same[0][4].strip() == "same"
