"""WavLM-Large + ECAPA-TDNN (``wavlm-ecapa-sim``): speed, peak memory and precision cost.

Usage: ``python benchmarks/bench_wavlm.py [--device cpu] [--seconds 60] [--clips 8]
[--precisions fp32,bf16] [--tiny] [--out bench-results/wavlm.json]``

The registry's model with synthetic weights (values do not change the speed) embeds ``--clips``
synthetic 16 kHz clips of 2-12 s (``--seconds`` of audio in all) through the engine
(:class:`Embedder`, exact padded batches), once per precision after one warm-up batch.
Reported per precision: x-realtime (audio seconds / wall seconds), the process's peak RSS
(VmHWM, Linux, from after the model is built: weights plus inference) or the GPU's
peak allocation, and the lowest cosine of an embedding to its fp32
counterpart. ``--tiny`` runs the fixtures' 2-layer geometry (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Restart VmHWM from the current RSS (Linux), so building the synthetic weights (a
    second copy of the model, briefly) does not count as inference memory."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def clips(n: int, total_seconds: float, seed: int = 0) -> list[torch.Tensor]:
    """``n`` speech-like clips (a harmonic buzz with noise), lengths spread over 2-12 s."""
    rng = np.random.default_rng(seed)
    lengths = rng.uniform(2.0, 12.0, n)
    lengths *= total_seconds / lengths.sum()
    out = []
    for sec in lengths:
        t = np.arange(int(sec * 16000)) / 16000
        f0 = 120 + 30 * np.sin(2 * np.pi * 0.5 * t)
        phase = 2 * np.pi * np.cumsum(f0) / 16000
        wav = sum(np.sin(k * phase) / k for k in range(1, 12)) * 0.1
        wav = wav + 0.01 * rng.standard_normal(t.shape)
        out.append(torch.from_numpy(wav.astype(np.float32)))
    return out


def build(tiny: bool) -> torch.nn.Module:
    from speaker_sim_cli.models.wavlm_ecapa import TINY, WavLMECAPA

    model = WavLMECAPA(**TINY) if tiny else WavLMECAPA()
    shared = Path(os.environ.get("SPEAKER_SIM_SHARED", REPO.parent / "shared"))
    tools = shared / "tools" / "synth_sim_weights.py"
    if tools.is_file():  # the fixtures' weights; otherwise the random init (same speed)
        sys.path.insert(0, str(tools.parent))
        from synth_sim_weights import synth  # type: ignore[import-not-found]

        state = {k: torch.from_numpy(synth(k, v.shape)) for k, v in model.state_dict().items()}
        model.load_state_dict(state)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--clips", type=int, default=8)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from speaker_sim_cli.engine.embedder import Embedder, EngineConfig
    from speaker_sim_cli.models.registry import get_model

    spec = get_model("wavlm-ecapa-sim")
    t0 = time.perf_counter()
    model = build(args.tiny)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    waves = clips(args.clips, args.seconds)
    import gc

    gc.collect()
    reset_peak_rss()
    audio_s = sum(w.shape[0] for w in waves) / 16000
    rows: list[dict[str, object]] = []
    ref: np.ndarray | None = None
    for precision in args.precisions.split(","):
        emb = Embedder(spec, model, EngineConfig(device=args.device, precision=precision))
        cuda = emb.device.type == "cuda"
        emb.embed_waves(waves[:1])  # warm-up (kernels, allocator)
        if cuda:
            torch.cuda.reset_peak_memory_stats(emb.device)
        t1, c1 = time.perf_counter(), time.process_time()
        out = emb.embed_waves(waves)
        wall, cpu = time.perf_counter() - t1, time.process_time() - c1
        if ref is None:
            ref = out
        cosines = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
        row = {
            "precision": precision,
            "wall_s": round(wall, 2),
            "x_realtime": round(audio_s / wall, 2),
            # CPU seconds per audio second (all threads): the figure a busy machine keeps
            "cpu_s_per_audio_s": round(cpu / audio_s, 3),
            "batches": emb.stats.batches,
            "min_cosine_to_fp32": round(float(cosines.min()), 6),
            "peak_rss_mb": round(peak_rss_mb()),
        }
        if cuda:
            row["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated(emb.device) / 2**20)
        rows.append(row)
        print(json.dumps(row), flush=True)
    doc = {
        "model": "wavlm-ecapa-sim" + (" (tiny geometry)" if args.tiny else ""),
        "parameters": n_params,
        "weights_mb": round(n_params * 4 / 2**20),
        "build_s": round(build_s, 1),
        "device": args.device,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "clips": args.clips,
        "audio_s": round(audio_s, 1),
        "torch": torch.__version__,
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
