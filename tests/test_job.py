"""One scoring job behind every front end: ``speaker-sim score``, ``SpeakerSim.score`` and
``serve`` give the same scores, metrics and report on the shared lists (real CAM++ weights,
real speech). Also the job as a library object: its progress events and its stage contract."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from speaker_sim_cli.job import PER_RUN_KEYS, Progress
from speaker_sim_cli.job.items import ItemVectors
from speaker_sim_cli.job.stage import score_pairs, score_stage

LISTS = ["audio/trials.csv", "audio/dev_hard/trials.csv"]


def _comparable(path: Path) -> dict:
    doc = json.loads(path.read_text())
    return {k: v for k, v in doc.items() if k not in PER_RUN_KEYS}


@pytest.mark.weights
@pytest.mark.parametrize("trials", LISTS)
def test_cli_api_and_serve_give_one_result(shared, real_ckpt, tmp_path, trials):
    from speaker_sim_cli import SpeakerSim
    from speaker_sim_cli.cli.main import app
    from speaker_sim_cli.serve import Server

    src, cache, out = shared / trials, tmp_path / "cache", tmp_path / "scores.csv"
    kw = {"model_dir": real_ckpt.parent, "device": "cpu", "cache_dir": cache}
    # The API embeds the list once (cold cache); every run below reads the same vectors.
    cold = SpeakerSim(**kw).score_report(src, root=shared)
    assert cold.counts["embedded"] == cold.counts["recordings"] > 0

    res = CliRunner().invoke(
        app,
        ["score", str(src), "--root", str(shared), "--device", "cpu", "--cache-dir", str(cache),
         "--model-dir", str(real_ckpt.parent), "--out", str(out), "--report",
         str(tmp_path / "cli.json"), "--quiet"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    cli_scores = out.read_bytes()
    out.unlink()

    api = SpeakerSim(**kw)  # a fresh instance: nothing in memory, the disk cache warm
    df = api.score(src, root=shared, out=out, report=tmp_path / "api.json")
    # The same score file, byte for byte, and the same report but for timing / invocation.
    assert out.read_bytes() == cli_scores
    cli_rep, api_rep = _comparable(tmp_path / "cli.json"), _comparable(tmp_path / "api.json")
    assert api_rep == cli_rep
    assert cli_rep["counts"]["from_cache"] == cli_rep["counts"]["recordings"]
    assert cli_rep["metrics"]["eer"] is not None and cli_rep["counts"]["failed"] == 0
    csv = pd.read_csv(out)
    np.testing.assert_array_equal(csv.score.to_numpy(), df.score.round(6).to_numpy())

    # serve: every trial as a request (JSON lines: full float64), the same numbers exactly.
    lines = [
        json.dumps({"id": i, "a": str(shared / e), "b": str(shared / t)})
        for i, (e, t) in enumerate(zip(df.enrollment, df.test, strict=True))
    ]
    answers = io.StringIO()
    stats = Server(api, answers, jsonl=True).serve(lines)
    assert stats.scored == len(df) and stats.errors == 0
    got = {d["id"]: d["score"] for d in map(json.loads, answers.getvalue().splitlines())}
    assert [got[i] for i in range(len(df))] == df.score.tolist()


@pytest.mark.weights
def test_job_reports_progress_and_never_prints(shared, real_ckpt, tmp_path, capsys):
    from speaker_sim_cli.job import ModelSource, Outputs, ScoreJob, TrialSource

    trials = tmp_path / "t.csv"
    ex = "audio/3dspeaker_examples"
    trials.write_text(
        "enrollment,test,label\n"
        f"{ex}/speaker1_a_cn_16k.wav,{ex}/speaker1_b_cn_16k.wav,1\n"
        f"{ex}/speaker1_a_cn_16k.wav,missing.wav,0\n"
    )
    events: list[Progress] = []
    job = ScoreJob(
        TrialSource(trials, root=shared),
        ModelSource(model_dir=real_ckpt.parent, cache_dir=tmp_path / "c"),
        outputs=Outputs(tmp_path / "s.csv", report=tmp_path / "r.json"),
    )
    rep = job.run(events.append)
    assert capsys.readouterr() == ("", "")  # the job never prints: the CLI renders
    kinds = [(e.stage, e.event) for e in events]
    assert kinds[0] == ("embed", "start") and events[0].n == 2
    assert ("embed", "advance") in kinds and kinds[-1] == ("score", "done")
    assert sum(e.n for e in events if e.event == "advance") == 2
    assert rep.counts["failed"] == 1 and [f.reason for f in rep.failures] == ["file not found"]
    assert rep.errors is not None and rep.errors[1] == "missing.wav: file not found"
    assert rep.comparable() == _comparable(tmp_path / "r.json")
    # One scored trial, a target only: no metrics, said in a note (the CLI warns with it).
    assert rep.metrics is None and len(rep.notes) == 1 and rep.notes[0].startswith("no metrics")


def test_scoring_stage_contract():
    """Trial keys + a lookup in; scores (NaN unscored), ok mask, rows written, reasons out."""
    rng = np.random.default_rng(0)
    mat = rng.standard_normal((3, 8))
    lookup = ItemVectors(["a", "b", "c"], mat, {"x": "file not found"})
    written: list[tuple[np.ndarray, list]] = []

    def write(scores: np.ndarray, errors: list) -> int:
        written.append((scores, errors))
        return len(scores)

    res = score_stage(["a", "a", "x", "c"], ["b", "c", "a", "c"], lookup, write)
    assert res.written == 4 and len(written) == 1
    assert res.ok.tolist() == [True, True, False, True]
    assert np.isnan(res.scores[2]) and res.errors == [None, None, "x: file not found", None]
    assert res.scores[3] == pytest.approx(1.0)
    assert res.scores[0] == score_pairs([(mat[0], mat[1])])[0]
    with pytest.raises(ValueError, match="--cohort"):
        score_stage(["a"], ["b"], lookup, None, norm="asnorm")


def _imports(module: Path, pkg_root: Path) -> set[str]:
    """Every speaker_sim_cli module ``module`` imports (absolute names), and third parties."""
    import ast

    rel = module.relative_to(pkg_root.parent).with_suffix("").parts
    package = rel[:-1]  # what a relative import of level 1 names
    out: set[str] = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            name = ".".join([*base, *(node.module.split(".") if node.module else [])])
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)
    return out


# layer -> names it must never import (anything above it)
FRONT = ("speaker_sim_cli.cli", "speaker_sim_cli.api", "speaker_sim_cli.serve")
ABOVE = {
    "job": FRONT,
    "engine": (*FRONT, "speaker_sim_cli.job", "speaker_sim_cli.pipeline"),
    "scoring": (
        *FRONT,
        "speaker_sim_cli.job",
        "speaker_sim_cli.pipeline",
        "speaker_sim_cli.engine",
        "torch",
    ),
    "io": (*FRONT, "speaker_sim_cli.job", "speaker_sim_cli.pipeline", "torch"),
}


def test_imports_point_down_and_modules_stay_small():
    import speaker_sim_cli

    root = Path(speaker_sim_cli.__file__).parent
    for layer, banned in ABOVE.items():
        for f in sorted((root / layer).glob("*.py")):
            bad = [n for n in _imports(f, root) if n.startswith(banned)]
            assert not bad, f"{f.relative_to(root)} imports up a layer: {bad}"
    for name in ("pipeline.py", "api.py", "benchmark.py", "engine/embedder.py"):
        lines = len((root / name).read_text().splitlines())
        assert lines <= 450, f"{name}: {lines} lines"
    for f in (root / "job").glob("*.py"):
        assert f.read_text().lstrip().startswith('"""'), f"{f.name}: no role docstring"


def test_a_scoring_stage_can_be_swapped_in(tmp_path):
    """ScoreJob(stage=...) calls the given stage with the contract's inputs; here on vectors
    computed earlier (no model), with AS-norm, against the default in-memory stage."""
    from speaker_sim_cli.job import ModelSource, Outputs, ScoreJob, ScoringSetup

    rng = np.random.default_rng(7)
    keys = [f"u{i}" for i in range(12)]
    folder = tmp_path / "emb"
    folder.mkdir()
    np.save(folder / "embeddings.npy", rng.standard_normal((12, 16)).astype(np.float32))
    (folder / "index.csv").write_text("key,path\n" + "".join(f"{k},{k}.wav\n" for k in keys))
    trials = tmp_path / "trials.txt"
    pairs = [(keys[i], keys[j], int(i // 3 == j // 3)) for i in range(6) for j in range(6, 12)]
    pairs += [(keys[0], keys[1], 1), (keys[0], "nope", 0)]
    trials.write_text("".join(f"{a} {b} {'target' if t else 'nontarget'}\n" for a, b, t in pairs))
    (tmp_path / "cohort.txt").write_text("".join(f"{k}\n" for k in keys[6:]))
    calls: list[int] = []

    def recording_stage(enroll, test, lookup, write=None, norm=None, top_n=300):
        calls.append(len(enroll))
        assert norm == "asnorm" and lookup.cohort is not None and lookup.cohort.shape == (6, 16)
        return score_stage(enroll, test, lookup, write, norm, top_n)

    def job(name: str, **kw) -> ScoreJob:
        return ScoreJob(
            trials,
            ModelSource(embeddings=folder),
            ScoringSetup(norm="asnorm", cohort=tmp_path / "cohort.txt", top_n=3),
            Outputs(tmp_path / f"{name}.csv", "kaldi", tmp_path / f"{name}.json"),
            **kw,
        )

    swapped = job("swapped", stage=recording_stage).run()
    plain = job("plain").run()
    assert calls == [len(pairs)]
    assert (tmp_path / "swapped.csv").read_bytes() == (tmp_path / "plain.csv").read_bytes()
    assert swapped.comparable() == plain.comparable() | {"scores": str(tmp_path / "swapped.csv")}
    assert swapped.counts["written"] == len(pairs) - 1 and swapped.counts["failed"] == 1
    assert swapped.scoring["norm"] == {"method": "asnorm", "cohort": 6, "top_n": 3}
