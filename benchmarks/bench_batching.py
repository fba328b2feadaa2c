"""Batch invariance and the throughput cost of exactness, for every architecture.

For each arch (synthetic weights from ../shared/tools, the official layouts) on all 80 files of
../shared/audio/dev_hard, on the CPU (or --device):

- exactness: max relative L2 between batch size 1 and the engine's batches of 32;
- time of four ways to run the same recordings:
  batch 1 | 32 in input order, masked (no bucketing) | 32 bucketed by length, masked (the
  engine) | 32 bucketed, no masks (lengths=None: fast but inexact, as other tools do).

Usage: python benchmarks/bench_batching.py [--arch NAME ...] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from speaker_sim_cli.audio.decode import load
from speaker_sim_cli.audio.features import compute_features, num_frames
from speaker_sim_cli.engine.data import pad_rows, plan_batches
from speaker_sim_cli.engine.embedder import Embedder, EngineConfig
from speaker_sim_cli.models.registry import ARCHS, MODELS

SHARED = Path(__file__).resolve().parents[2] / "shared"


def synth(arch: str) -> dict[str, torch.Tensor]:
    sys.path.insert(0, str(SHARED / "tools"))
    from synth_weights import synth_state_dict  # type: ignore[import-not-found]

    schema = json.loads((SHARED / "fixtures" / "arch" / f"{arch}.schema.json").read_text())
    return {k: torch.from_numpy(v) for k, v in synth_state_dict(schema).items()}


@torch.inference_mode()
def run_unmasked(model: torch.nn.Module, waves: list[torch.Tensor], batches: list[list[int]],
                 device: torch.device) -> None:  # fmt: skip
    cfg = MODELS[0].frontend
    for b in batches:
        x, n = pad_rows([waves[i] for i in b])
        feats, _ = compute_features(x.to(device), n.to(device), cfg)
        model(feats, None)


def bench_arch(arch: str, waves: list[torch.Tensor], device: str) -> dict[str, object]:
    spec = next(m for m in MODELS if m.arch == arch)
    model = ARCHS[arch].build()
    model.load_state_dict(synth(arch), strict=True)
    big = 10**9
    one = Embedder(spec, model, EngineConfig(device=device, batch_size=1, batch_frames=big))
    eng = Embedder(spec, model, EngineConfig(device=device, batch_size=32, batch_frames=big))
    eng.embed_waves(waves[:2])  # warm-up
    t = time.perf_counter()
    a = one.embed_waves(waves)
    t_one = time.perf_counter() - t
    t = time.perf_counter()
    b = eng.embed_waves(waves)
    t_bucket = time.perf_counter() - t
    t = time.perf_counter()
    for s in range(0, len(waves), 32):  # input order: no bucketing
        eng._forward_rows(waves[s : s + 32])
    t_plain = time.perf_counter() - t
    frames = [int(num_frames(w.shape[0], spec.frontend)) for w in waves]
    t = time.perf_counter()
    run_unmasked(eng.model, waves, plan_batches(frames, big, 32), eng.device)
    t_nomask = time.perf_counter() - t
    rel = np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)
    audio = sum(w.shape[0] for w in waves) / 16000
    return {
        "arch": arch,
        "max_rel_l2_batch1_vs_32": float(rel.max()),
        "seconds": {"batch1": t_one, "b32_input_order_masked": t_plain,
                    "b32_bucketed_masked": t_bucket, "b32_bucketed_unmasked": t_nomask},
        "x_realtime_engine": audio / t_bucket,
        "mask_cost": t_bucket / t_nomask,
        "bucketing_gain": t_plain / t_bucket,
        "speedup_vs_batch1": t_one / t_bucket,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", action="append", choices=sorted(ARCHS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    files = sorted(p for p in (SHARED / "audio" / "dev_hard").rglob("*")
                   if p.is_file() and p.suffix != ".csv")  # fmt: skip
    waves = [torch.from_numpy(load(p, 16000)) for p in files]
    rows = []
    for arch in args.arch or sorted(ARCHS):
        r = bench_arch(arch, waves, args.device)
        rows.append(r)
        s = r["seconds"]
        assert isinstance(s, dict)
        print(
            f"{arch:22s} rel L2 {r['max_rel_l2_batch1_vs_32']:.1e}  "
            f"b1 {s['batch1']:6.1f}s  b32 plain {s['b32_input_order_masked']:6.1f}s  "
            f"b32 bucketed {s['b32_bucketed_masked']:6.1f}s  unmasked "
            f"{s['b32_bucketed_unmasked']:6.1f}s  mask cost x{r['mask_cost']:.2f}  "
            f"bucketing x{r['bucketing_gain']:.2f}",
            flush=True,
        )
    out = {"files": len(files), "device": args.device, "threads": torch.get_num_threads(),
           "archs": rows}  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
