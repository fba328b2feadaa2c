"""Cold vs warm ``speaker-sim score``: the whole command, as a user runs it.

Usage: ``python benchmarks/bench_warm.py [--trials FILE] [--root DIR] [--repeat 3]
[--out bench-results/warm.json]``

Default trials: ../shared/audio/dev_hard/trials.csv (3,160 trials over 80 recordings). Each
round starts from an empty cache folder, runs ``score`` once (cold: every recording decoded and
embedded) and then again on the same cache (warm: nothing embedded). Times are wall clock of the
whole subprocess, start-up included; the best round of each is reported with the ratio
cold / warm. The two score files must be byte-identical and the warm report must say 0
embedded, or the benchmark fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def find_shared() -> Path:
    return Path(os.environ.get("SPEAKER_SIM_SHARED", REPO.parent / "shared")).resolve()


def run(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr}")
    return took


def main() -> None:
    shared = find_shared()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=Path, default=shared / "audio/dev_hard/trials.csv")
    ap.add_argument("--root", type=Path, default=shared)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    exe = Path(sys.executable).with_name("speaker-sim")
    rounds = []
    with tempfile.TemporaryDirectory(prefix="bench-warm-") as tmp:
        for r in range(args.repeat):
            cache = Path(tmp) / f"cache{r}"
            env = {**os.environ, "SPEAKER_SIM_CACHE": str(cache)}
            times = {}
            for phase in ("cold", "warm"):
                out = Path(tmp) / f"{phase}{r}.csv"
                rep = Path(tmp) / f"{phase}{r}.json"
                cmd = [str(exe), "score", str(args.trials), "--root", str(args.root), "-q",
                       "-o", str(out), "--report", str(rep)]  # fmt: skip
                if args.model:
                    cmd += ["--model", args.model]
                times[phase] = run(cmd, env)
                counts = json.loads(rep.read_text())["counts"]
                times[f"{phase}_embedded"] = counts["embedded"]
            same = (Path(tmp) / f"cold{r}.csv").read_bytes() == (
                Path(tmp) / f"warm{r}.csv"
            ).read_bytes()
            if not same or times["warm_embedded"] != 0:
                sys.exit(f"round {r}: warm run embedded {times['warm_embedded']}, same={same}")
            rounds.append(times)
            print(
                f"round {r + 1}: cold {times['cold']:.2f} s ({times['cold_embedded']} embedded), "
                f"warm {times['warm']:.2f} s (0 embedded)",
                file=sys.stderr,
            )
    cold = min(t["cold"] for t in rounds)
    warm = min(t["warm"] for t in rounds)
    doc = {
        "benchmark": "score cold vs warm (whole command)",
        "trials": str(args.trials),
        "recordings": rounds[0]["cold_embedded"],
        "cold_s": round(cold, 3),
        "warm_s": round(warm, 3),
        "ratio_cold_over_warm": round(cold / warm, 2),
        "rounds": [{k: round(v, 3) for k, v in t.items()} for t in rounds],
        "scores_identical": True,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
        },
    }
    print(f"cold {cold:.2f} s, warm {warm:.2f} s: warm is {cold / warm:.1f}x faster",
          file=sys.stderr)  # fmt: skip
    print(json.dumps(doc, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
