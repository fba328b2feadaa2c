"""Time and memory of ``scoring.metrics.evaluate`` on many synthetic trials.

Usage: ``python benchmarks/bench_metrics.py [--trials 10000000] [--target-rate 0.01]``

Prints one JSON line: trials, seconds for evaluate(), peak traced numpy memory of evaluate()
(tracemalloc, MiB), and the process' peak RSS (ru_maxrss, MiB; includes the input arrays).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import tracemalloc

import numpy as np

from speaker_sim_cli.scoring.metrics import evaluate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10_000_000)
    ap.add_argument("--target-rate", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--float32", action="store_true", help="float32 scores (as cosine files)")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    labels = rng.random(args.trials) < args.target_rate
    # non-targets ~ N(0, 0.1), targets ~ N(0.5, 0.15): a cosine-like EER of a few %
    scores = rng.normal(0.0, 0.1, args.trials)
    scores[labels] = rng.normal(0.5, 0.15, int(labels.sum()))
    if args.float32:
        scores = scores.astype(np.float32)

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tracemalloc.start()
    t0 = time.perf_counter()
    m = evaluate(scores, labels, threshold=0.3)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print(
        json.dumps(
            {
                "bench": "evaluate",
                "trials": args.trials,
                "targets": m.n_targets,
                "dtype": str(scores.dtype),
                "seconds": round(seconds, 3),
                "evaluate_peak_mib": round(peak / 2**20, 1),
                "input_mib": round((scores.nbytes + labels.nbytes) / 2**20, 1),
                "rss_peak_mib_before": round(rss_before, 1),
                "rss_peak_mib": round(rss_after, 1),
                "eer": round(m.eer, 6),
                "min_dcf_p0.01": round(m.min_dcf[0.01], 6),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
