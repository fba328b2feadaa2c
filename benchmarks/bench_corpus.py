"""Corpus-scale streamed scoring: ``speaker-sim score`` of a Kaldi list of N trials over R
recordings whose embeddings were computed earlier, whole command, with labels.

Usage: ``python benchmarks/bench_corpus.py [--trials 100000000] [--recordings 1000000]
[--scratch DIR] [--out bench-results/corpus.json] [--baseline TREE]``

Generates, deterministically (seeded, vectorised), R speaker-structured random 192-dim vectors
(an ``embed`` folder: embeddings.npy + index.csv — the seam where the sharded store's vectors
come in) and a Kaldi trial list ``enroll test target|nontarget`` (10 % targets), once per
scratch folder. Then runs the command in a subprocess and reports its wall time, trials/s and
peak RSS (wait4's ru_maxrss of that process alone), and checks its EER / minDCF against
``evaluate`` of an in-memory numpy computation of the same scores: cosine of the same rows in
float64 for the first ``--reference`` trials (compared score for score with the Parquet
output), and the command's metrics against ``evaluate`` of all the scores it wrote (read back
from the Parquet file) when ``--trials`` is at most ``--reference-all``.

``--baseline TREE`` first runs the same command with another checkout's code (its
``.venv/bin/python``, e.g. main's tree) on the same files, and reports both runs, the ratio of
their trials/s, and whether the two score files hold the same rows and the two reports the
same metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

KEY_WIDTH = 10  # "r" + 9 digits


def keys_matrix(n: int) -> np.ndarray:
    """(n, KEY_WIDTH) uint8: r000000000, r000000001, ..."""
    digits = np.empty((n, KEY_WIDTH - 1), dtype=np.uint8)
    v = np.arange(n, dtype=np.int64)
    for i in range(KEY_WIDTH - 2, -1, -1):
        digits[:, i] = ord("0") + v % 10
        v //= 10
    return np.hstack([np.full((n, 1), ord("r"), np.uint8), digits])


def trial_rows(rng: np.random.Generator, n: int, r: int) -> tuple[np.ndarray, ...]:
    """Enrolment row, test row, label: 10 % targets (same speaker: 10 recordings each)."""
    a = rng.integers(0, r, n)
    lab = rng.random(n) < 0.1
    b = rng.integers(0, r, n)
    same = (a // 10) * 10 + rng.integers(0, 10, n)
    b = np.where(lab, np.minimum(same, r - 1), b)
    return a, b, (a // 10 == b // 10).astype(np.int8)


def generate(scratch: Path, n_trials: int, n_rec: int, dim: int, seed: int) -> Path:
    """Write embeddings (npy folder) and the Kaldi list, once; returns the list's path."""
    emb = scratch / "emb"
    lst = scratch / "trials.txt"
    stamp = scratch / "done.json"
    want = {"trials": n_trials, "recordings": n_rec, "dim": dim, "seed": seed}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return lst
    emb.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cent = rng.standard_normal(((n_rec + 9) // 10, dim), dtype=np.float32)
    mat = np.empty((n_rec, dim), np.float32)
    for lo in range(0, n_rec, 100_000):
        hi = min(n_rec, lo + 100_000)
        noise = rng.standard_normal((hi - lo, dim), dtype=np.float32)
        mat[lo:hi] = cent[np.arange(lo, hi) // 10] + 2.5 * noise
    np.save(emb / "embeddings.npy", mat)
    del mat
    keys = keys_matrix(n_rec)
    with open(emb / "index.csv", "wb") as f:
        f.write(b"key\n")
        rows = np.hstack([keys, np.full((n_rec, 1), ord("\n"), np.uint8)])
        f.write(rows.tobytes())
    words = [b"nontarget", b"target"]
    width = 2 * KEY_WIDTH + 2 + 9 + 1
    with open(lst, "wb") as f:
        for lo in range(0, n_trials, 2_000_000):
            m = min(n_trials, lo + 2_000_000) - lo
            a, b, lab = trial_rows(np.random.default_rng([seed, lo]), m, n_rec)
            line = np.zeros((m, width), np.uint8)  # 0 = padding, dropped below
            line[:, :KEY_WIDTH] = keys[a]
            line[:, KEY_WIDTH] = ord(" ")
            line[:, KEY_WIDTH + 1 : 2 * KEY_WIDTH + 1] = keys[b]
            line[:, 2 * KEY_WIDTH + 1] = ord(" ")
            for v, w in enumerate(words):
                rows_v = lab == v
                arr = np.frombuffer(w + b"\n", np.uint8)
                line[rows_v, 2 * KEY_WIDTH + 2 : 2 * KEY_WIDTH + 2 + len(arr)] = arr
            flat = line.reshape(-1)
            f.write(flat[flat != 0].tobytes())
    stamp.write_text(json.dumps(want))
    return lst


def run_command(
    cmd: list[str], env: dict[str, str], cwd: Path | None = None
) -> tuple[int, float, float, float, str]:
    """(exit code, wall seconds, peak RSS MiB, CPU seconds of that process, stderr tail)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         cwd=cwd)  # fmt: skip
    assert p.stderr is not None
    err = p.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    return p.returncode, time.perf_counter() - t0, usage.ru_maxrss / 1024, cpu, err[-2000:]


def _same_runs(a: Path, b: Path, rep_a: Path, rep_b: Path, fmt: str) -> dict:
    """Whether two runs wrote the same score rows and the same metrics."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        same_rows = pq.read_table(a).equals(pq.read_table(b))
    else:
        import filecmp

        same_rows = filecmp.cmp(a, b, shallow=False)
    ma = json.loads(rep_a.read_text()).get("metrics")
    mb = json.loads(rep_b.read_text()).get("metrics")
    return {"score_rows_identical": same_rows, "metrics_identical": ma == mb}


def reference(scratch: Path, out: Path, n_trials: int, n_rec: int, n_ref: int, seed: int,
              all_limit: int, report: dict) -> dict:  # fmt: skip
    """The command's scores and metrics against an in-memory numpy computation."""
    import pyarrow.parquet as pq

    from speaker_sim_cli.scoring.metrics import evaluate

    mat = np.load(scratch / "emb" / "embeddings.npy", mmap_mode="r")
    e = mat.astype(np.float64)
    e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    got = pq.read_table(out, columns=["score", "label"])
    scores = got.column("score").to_numpy()
    labels = got.column("label").to_numpy()
    a_all, b_all, lab_all = [], [], []
    for lo in range(0, min(n_ref, n_trials), 2_000_000):
        m = min(n_trials, lo + 2_000_000) - lo
        a, b, lab = trial_rows(np.random.default_rng([seed, lo]), m, n_rec)
        a_all.append(a)
        b_all.append(b)
        lab_all.append(lab)
    a = np.concatenate(a_all)[:n_ref]
    b = np.concatenate(b_all)[:n_ref]
    lab = np.concatenate(lab_all)[:n_ref]
    ref = np.empty(len(a))
    for lo in range(0, len(a), 2048):
        ref[lo : lo + 2048] = np.einsum("ij,ij->i", e[a[lo : lo + 2048]], e[b[lo : lo + 2048]])
    sub = evaluate(ref, lab)
    out_doc = {
        "reference_trials": len(a),
        "scores_identical": bool(np.array_equal(ref, scores[: len(a)])),
        "labels_identical": bool(np.array_equal(lab, labels[: len(a)])),
        "subset_eer": sub.eer,
        "subset_eer_of_written_scores_identical": evaluate(scores[: len(a)], labels[: len(a)])
        == sub,
    }
    if n_trials <= all_limit:
        full = evaluate(scores, labels)
        from speaker_sim_cli.scoring.evaluation import metrics_block

        ref_block = json.loads(json.dumps(metrics_block(full)))
        out_doc["all_trials_metrics_identical"] = ref_block == report["metrics"]
        out_doc["all_trials_eer"] = full.eer
    return out_doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=100_000_000)
    ap.add_argument("--recordings", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scratch", type=Path, default=Path("bench-results/corpus-scratch"))
    ap.add_argument("--format", default="parquet", help="score file format of the run")
    ap.add_argument("--reference", type=int, default=10_000_000)
    ap.add_argument(
        "--reference-all",
        type=int,
        default=100_000_000,
        help="check the metrics against all written scores up to this many trials",
    )
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="another checkout (with its .venv) run first on the same files",
    )
    args = ap.parse_args(argv)
    args.scratch = args.scratch.resolve()
    args.scratch.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    lst = generate(args.scratch, args.trials, args.recordings, args.dim, args.seed)
    gen_s = time.perf_counter() - t0
    suffix = {"parquet": "parquet", "csv": "csv"}.get(args.format, "txt")
    scores = args.scratch / f"scores.{suffix}"
    rep = args.scratch / "report.json"
    exe = [sys.executable, "-m", "speaker_sim_cli.cli.main"]
    cmd = [*exe, "score", str(lst), "--embeddings", str(args.scratch / "emb"), "--out",
           str(scores), "--format", args.format, "--report", str(rep), "--quiet"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    base = None
    if args.baseline is not None:
        b_scores = args.scratch / f"scores-baseline.{suffix}"
        b_rep = args.scratch / "report-baseline.json"
        b_cmd = [str(args.baseline / ".venv" / "bin" / "python"), *cmd[1:]]
        b_cmd[b_cmd.index(str(scores))] = str(b_scores)
        b_cmd[b_cmd.index(str(rep))] = str(b_rep)
        b_load0 = os.getloadavg()
        b_rc, b_wall, b_rss, b_cpu, b_err = run_command(b_cmd, {**env, "PYTHONPATH": ""},
                                                 cwd=args.baseline)  # fmt: skip
        base = {"tree": str(args.baseline), "exit_code": b_rc, "wall_s": round(b_wall, 2),
                "trials_per_s": round(args.trials / b_wall), "cpu_s": round(b_cpu, 1),
                "peak_rss_mib": round(b_rss),
                "loadavg_before": b_load0, "loadavg_after": os.getloadavg()}  # fmt: skip
        if b_rc != 0:
            base["stderr"] = b_err
    load0 = os.getloadavg()
    rc, wall, rss, cpu, err = run_command(cmd, env)
    load1 = os.getloadavg()
    doc: dict = {
        "trials": args.trials,
        "recordings": args.recordings,
        "format": args.format,
        "list_bytes": lst.stat().st_size,
        "generate_s": round(gen_s, 1),
        "exit_code": rc,
        "wall_s": round(wall, 2),
        "trials_per_s": round(args.trials / wall),
        "cpu_s": round(cpu, 1),
        "peak_rss_mib": round(rss),
        "loadavg_before": load0,
        "loadavg_after": load1,
        "cpus": os.cpu_count(),
    }
    if base is not None:
        doc["baseline"] = base
        doc["speedup_vs_baseline"] = round(base["wall_s"] / wall, 2)
        if rc == 0 and base["exit_code"] == 0:
            doc["same_as_baseline"] = _same_runs(scores, b_scores, rep, b_rep, args.format)
    if rc != 0:
        doc["stderr"] = err
    else:
        report = json.loads(rep.read_text())
        doc["metrics"] = report["metrics"]
        doc["report_timing"] = report["timing"]
        if args.format == "parquet":
            doc["check"] = reference(args.scratch, scores, args.trials, args.recordings,
                                     args.reference, args.seed, args.reference_all,
                                     report)  # fmt: skip
    text = json.dumps(doc, indent=1, default=float)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
