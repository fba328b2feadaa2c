"""``speaker-sim bench``: the engine against a 3D-Speaker infer_sv.py loop, in one run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from . import common as c
from .ui import STATE, err_console, errors_to_exit, say, warn


def register(app: typer.Typer) -> None:
    """Add this module's command(s) to the app."""
    app.command()(bench)


def bench(
    files: Annotated[
        Path | None,
        typer.Option(
            "--files",
            help="A folder of audio, one audio file, or a text file listing one recording a "
            "line [default: ../shared/audio].",
        ),
    ] = None,
    model: c.ModelOpt = c.DEFAULT,
    model_dir: c.ModelDirOpt = None,
    device: c.DeviceOpt = "auto",
    precision: c.PrecisionOpt = c.Precision.fp32,
    batch_size: c.BatchSizeOpt = 0,
    batch_frames: c.BatchFramesOpt = 0,
    workers: c.WorkersOpt = -1,
    repeat_corpus: Annotated[
        int,
        typer.Option(
            min=1,
            help="Use the corpus N times over (copies 2..N are re-encoded with a tiny DC offset, "
            "which the fbank removes, so their content differs and the cache cannot share them).",
        ),
    ] = 1,
    rounds: Annotated[
        int, typer.Option(min=1, help="Time (a) and (b) this many times; report the best.")
    ] = 1,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the JSON here [default: stdout].")
    ] = None,
    quiet: c.QuietOpt = False,
) -> None:
    """Time (a) a loop equivalent to 3D-Speaker's infer_sv.py (decode, fbank, model, one
    recording at a time, batch 1, no workers) and (b) the engine, both cold (empty cache).

    Prints recordings/s, x-realtime, the speedup (b)/(a), achieved model GFLOP/s and the device
    (table on stderr, JSON on stdout or --out), and checks that (a) and (b) give the same scores.
    Targets: (b) >= 2x (a) on a CPU; >= 20x and >= 10,000x realtime (CAM++) on a GPU.
    Exit 1 when the two disagree on any score.
    """
    STATE["quiet"] = quiet
    with errors_to_exit():
        import tempfile

        from ..benchmark import default_corpus_dir, read_corpus, run_benchmark
        from ..engine.config import EngineConfig

        paths = read_corpus(files)
        source = str(files if files is not None else default_corpus_dir())
        engine = EngineConfig(
            device=device, precision=precision.value, batch_size=batch_size,
            batch_frames=batch_frames, workers=workers,
        )  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="speaker-sim-corpus-") as tmp:
            if repeat_corpus > 1:
                from ..benchmark import expand_corpus

                say(f"writing {repeat_corpus - 1} distinct copies of {len(paths)} recordings")
                paths = expand_corpus(paths, repeat_corpus, Path(tmp))
            say(f"benchmark: {len(paths)} recordings from {source}")
            result = run_benchmark(
                paths, model=model, model_dir=model_dir, engine=engine, rounds=rounds,
                log=say, corpus_source=source, repeat=repeat_corpus,
            )  # fmt: skip
        if not quiet:
            err_console.print(result_table(result))
            if "stages" in result:
                err_console.print(stage_table(result))
        if out is not None:
            c.write_json(out, result)
            say(f"wrote {out}")
        else:
            typer.echo(json.dumps(c._clean(result), indent=2))
        par = result["parity"]
        if not result["targets"]["met"] and par["identical"]:
            warn(_missed(result))
        if not par["identical"]:
            warn(
                f"(a) and (b) disagree: largest score difference {par['max_score_diff']} "
                f"> {par.get('score_tolerance')} ({par['compared']} recordings compared)"
            )
            raise typer.Exit(1)


def _missed(r: dict[str, Any]) -> str:
    t = r["targets"]
    msg = f"target missed: speedup {r['speedup']:.2f}x < {t['speedup']:g}x"
    if "x_realtime" in t:
        msg += f" or x-realtime {r['engine']['x_realtime']:.0f} < {t['x_realtime']:g}"
    return msg


def result_table(r: dict[str, Any]) -> Any:
    """The human summary: one column per side, one row per rate."""
    from rich.table import Table

    dev = r["device"]
    load, start = dev.get("load_average"), dev.get("load_average_start")
    title = (
        f"{r['model']['id']} on {dev['name']} — {r['corpus']['recordings']} recordings, "
        f"{r['corpus']['audio_s']:.0f} s of audio"
    )
    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("")
    t.add_column("(a) infer_sv.py loop", justify="right")
    t.add_column("(b) engine, cold", justify="right")
    a, b = r["baseline"], r["engine"]
    o = r.get("ort", {})
    has_c = "wall_s" in o
    if has_c:
        t.add_column("(c) ONNX Runtime engine, cold", justify="right")
    rows = [
        ("wall s", "wall_s", "{:.2f}"),
        ("recordings/s", "recordings_per_s", "{:.1f}"),
        ("x realtime", "x_realtime", "{:.1f}"),
        ("model GFLOP/s", "gflops_per_s", "{:.1f}"),
        ("padding overhead", "padding_overhead", "{:.1%}"),
    ]
    for label, key, fmt in rows:
        t.add_row(label, fmt.format(a[key]), fmt.format(b[key]),
                  *([fmt.format(o[key])] if has_c else []))  # fmt: skip
    t.add_row("recordings embedded", str(a["recordings"]), str(b["recordings"]),
              *([str(o["recordings"])] if has_c else []))  # fmt: skip
    if has_c:
        op, ob = r["ort_parity"], r["ort_vs_engine_parity"]
        t.add_row(
            "[bold](c)/(a), (c)/(b)[/bold]", "", "",
            f"[bold]{r['ort_speedup']:.2f}x[/bold], {r['ort_over_engine']:.2f}x "
            f"(target 3.5x, 110x realtime)",
        )  # fmt: skip
        t.add_row(
            "(c) scores vs (a), (b)", "", "",
            f"max |Δscore| {op['max_score_diff'] or 0:.1e}, {ob['max_score_diff'] or 0:.1e}",
        )  # fmt: skip
        prof = o["profile"]
        t.add_row(
            "(c) x-realtime per core", "", "",
            ", ".join(f"{k.replace('_and_', '+')} {prof[k]['x_realtime_per_core']:.0f}"
                      for k in ("decode", "fbank_and_python", "model")),
        )  # fmt: skip
    elif o.get("skipped"):
        t.add_row("(c) ONNX Runtime", "", f"skipped: {o['skipped']}")
    t.add_row(
        "[bold]speedup (b)/(a)[/bold]",
        "",
        f"[bold]{r['speedup']:.2f}x[/bold] (target {r['targets']['speedup']:g}x)",
    )
    if len(r["paired_speedups"]) > 1:
        t.add_row(
            "per-round (b)/(a)",
            "",
            ", ".join(f"{x:.2f}x" for x in r["paired_speedups"])
            + f" (median {r['median_paired_speedup']:.2f}x)",
        )
    w = r["engine_warm"]
    t.add_row(
        "(b) again, warm cache",
        "",
        f"{w['wall_s']:.3f} s, {w['embedded']} embedded, {w['speedup_over_cold']:.0f}x over cold",
    )
    par = r["parity"]
    t.add_row(
        "scores identical",
        "",
        f"{'yes' if par['identical'] else '[red]no[/red]'} "
        f"(max |Δscore| {par['max_score_diff'] or 0:.1e})",
    )
    t.caption = (
        f"device {dev['device']}, torch {dev['torch']}, {dev['torch_threads']} threads, "
        f"(b): {b['runners']} runner(s), {b['workers']} decode worker(s), batch "
        f"{b['batch_size']} / {b['batch_frames']} frames, {b['batches']} batches, "
        f"{b['precision']}, rounds {r['rounds']}"
        + (f", (c): batch {o['batch_frames']} frames" if has_c else "")
        + (f", load average {start[0]:.1f} at start" if start else "")
        + (f", {load[0]:.1f} at end" if load else "")
    )
    return t


def stage_table(r: dict[str, Any]) -> Any:
    """Per stage, the x-realtime it allows a GPU run, from this machine's measurements."""
    from rich.table import Table

    st = r["stages"]
    t = Table(title="what bounds a GPU run (per stage, measured here)", header_style="bold")
    t.add_column("stage")
    t.add_column("measured", justify="right")
    t.add_column("x realtime", justify="right")
    d, h, m = st["decode"], st["host"], st["model"]
    rows = [
        ("decode + resample", f"{d['x_realtime_per_core']:.0f}x per core x {d['workers']} "
         "worker(s)", d["x_realtime"]),
        ("host work per batch", f"{h['seconds_per_batch'] * 1e3:.1f} ms, {h['ops_per_batch']} "
         f"ops for {h['rows_per_batch']} rows x {h['frames_per_row']} frames", h["x_realtime"]),
        ("model", f"on {m['device']}", m["x_realtime"]),
    ]  # fmt: skip
    for name, what, x in rows:
        mark = "[bold]" if name.startswith(st["bound_by"][:4]) else ""
        t.add_row(f"{mark}{name}", what, f"{mark}{x:,.0f}")
    t.caption = f"bound by {st['bound_by']}: {st['x_realtime_bound']:,.0f}x realtime"
    return t
