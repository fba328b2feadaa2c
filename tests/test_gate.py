"""The regression gate as a library (``speaker_sim_cli.scoring.gate``), without the CLI."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import pytest

from speaker_sim_cli.errors import UsageError
from speaker_sim_cli.scoring import gate as gate_mod
from speaker_sim_cli.scoring.evaluation import metrics_block
from speaker_sim_cli.scoring.gate import load_baseline, run_gate
from speaker_sim_cli.scoring.metrics import evaluate

GOOD = evaluate([0.9, 0.8, 0.7, 0.3, 0.2, 0.1], [1, 1, 1, 0, 0, 0], p_targets=[0.01])
WORSE = evaluate([0.9, 0.25, 0.7, 0.3, 0.2, 0.1], [1, 1, 1, 0, 0, 0], p_targets=[0.01])


def _report(tmp_path: Path, m, name="base.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps({"metrics": metrics_block(m)}))
    return p


def test_ceilings():
    res = run_gate([("dev", Path("dev.csv"), WORSE)], max_eer=0.1, max_min_dcf=5.0)
    assert not res.passed and len(res.checks) == 2
    assert res.failures == [f"EER {WORSE.eer:.6f} > max 0.1"]
    assert run_gate([("dev", Path("dev.csv"), GOOD)], max_eer=0.1).passed


def test_baseline_worse_fails_better_passes(tmp_path):
    base = _report(tmp_path, GOOD)
    worse = run_gate([("dev", Path("dev.csv"), WORSE)], baseline=base)
    assert not worse.passed and "worse than baseline" in worse.failures[0]
    assert run_gate([("dev", Path("dev.csv"), WORSE)], baseline=base, tolerance=1.0).passed
    assert run_gate([("dev", Path("dev.csv"), GOOD)], baseline=_report(tmp_path, WORSE, "w.json"))


def test_bad_baseline_is_a_usage_error(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(UsageError, match="not JSON"):
        load_baseline(p)
    p.write_text(json.dumps({"metrics": None}))
    with pytest.raises(UsageError, match="no metrics"):
        load_baseline(p)


def test_docstring_examples():
    assert doctest.testmod(gate_mod).failed == 0
