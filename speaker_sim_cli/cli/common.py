"""Options shared by several commands, and the pieces they assemble from them."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from ..models.registry import DEFAULT_MODEL

ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="ModelScope id (iic/ or damo/) or alias.")
]
ModelDirOpt = Annotated[
    Path | None,
    typer.Option(help="Folder holding the model's checkpoint under its official file name."),
]
ModelConfigOpt = Annotated[
    Path | None,
    typer.Option(
        help="Training config of a model described by your own files: mvector's config.yml, "
        "with --model mvector --model-dir models/<Model>_<Feature>/best_model/ "
        "(without it, Fbank checkpoints use mvector's shipped config for their model).",
    ),
]
CacheDirOpt = Annotated[
    Path | None,
    typer.Option(help="Embedding cache folder (default: $SPEAKER_SIM_CACHE or the user cache)."),
]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the cache.")]
DeviceOpt = Annotated[
    str, typer.Option(help="auto, cpu, cuda or cuda:N (auto: the GPU when there is one).")
]
BatchSizeOpt = Annotated[
    int,
    typer.Option(
        min=0,
        help="Most rows (recordings or windows) in one batch [0: 32 on a CPU, 1024 on a GPU; "
        "the frame budget binds too].",
    ),
]
BatchFramesOpt = Annotated[
    int,
    typer.Option(min=0, help="Padded-frame budget of a batch (0: 2.4k on CPU, 200k on GPU)."),
]
WorkersOpt = Annotated[
    int,
    typer.Option(
        min=-1,
        help="Decoding worker processes (-1: cores - 1, at most 8, on a GPU; 0 on a CPU, "
        "where the runner threads use every core).",
    ),
]
ChunkOpt = Annotated[
    float | None,
    typer.Option(
        min=0.5,
        help="Embed every recording as the average of windows of S seconds "
        "(default: whole recordings, windows of 10 s only beyond 300 s).",
    ),
]
MinDurOpt = Annotated[
    float, typer.Option(min=0.0, help="Recordings shorter than this many seconds fail.")
]
MaxDurOpt = Annotated[
    float,
    typer.Option(min=0.0, help="Recordings longer than this many seconds fail (0: no limit)."),
]


class Backend(str, Enum):
    auto = "auto"
    torch = "torch"
    onnxruntime = "onnxruntime"


BackendOpt = Annotated[
    Backend,
    typer.Option(
        help="What runs the model: torch, onnxruntime (its exported ONNX graph, built once and "
        "cached; CPU, fp32), or auto: onnxruntime on a CPU at fp32 when it is installed and the "
        "graph is cached or the run has >= 2 h of audio, else torch.",
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary on stderr.")]


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


PrecisionOpt = Annotated[Precision, typer.Option(help="Model precision.")]


class ScoreFormat(str, Enum):
    csv = "csv"
    kaldi = "kaldi"
    wespeaker = "wespeaker"


class OutScoreFormat(str, Enum):
    """``score --format``: the score file formats plus Parquet (streamed runs)."""

    csv = "csv"
    kaldi = "kaldi"
    wespeaker = "wespeaker"
    parquet = "parquet"


def out_format(fmt: OutScoreFormat | None, out: Path | None) -> str:
    """--format as given; else parquet for an --out ending .parquet / .pq, else csv."""
    if fmt is not None:
        return fmt.value
    if out is not None and out.suffix.lower() in (".parquet", ".pq"):
        return "parquet"
    return "csv"


class EmbedFormat(str, Enum):
    npy = "npy"
    kaldi = "kaldi"


class Norm(str, Enum):
    asnorm = "asnorm"
    snorm = "snorm"


class ScoreScale(str, Enum):
    funasr = "funasr"


ScoreScaleOpt = Annotated[
    ScoreScale | None,
    typer.Option(
        "--score-scale",
        help="Add a rescaled score beside the raw cosine (which stays the score): funasr = "
        "FunASR 0.x's max(cos - 0.9465, 0) / (1 - 0.9465) * 100.",
    ),
]


class OnError(str, Enum):
    keep = "keep"
    skip = "skip"
    fail = "fail"


DEFAULT = DEFAULT_MODEL


def with_invocation(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` plus ``invocation``: the config file used (if any) and the resolved options."""
    from .config_opt import config_record

    record = config_record()
    return doc if record is None else {**doc, "invocation": record}


def write_json(path: Path, data: dict[str, Any]) -> None:
    from ..job.report import write_json as write

    write(path, data)


def _clean(x: Any) -> Any:
    from ..job.report import clean_json

    return clean_json(x)


def metrics_block(m: Any) -> dict[str, Any]:
    """The report's ``metrics`` (see :func:`speaker_sim_cli.scoring.evaluation.metrics_block`)."""
    from ..scoring.evaluation import metrics_block as block

    return block(m)


def metrics_table(rows: list[tuple[str, Any]], title: str) -> Any:
    from rich.table import Table

    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("")
    t.add_column("EER %", justify="right")
    ps = sorted({p for _, m in rows for p in m.min_dcf})
    for p in ps:
        t.add_column(f"minDCF({p:g})", justify="right")
    t.add_column("targets", justify="right")
    t.add_column("non-targets", justify="right")
    for name, m in rows:
        t.add_row(
            name,
            f"{100 * m.eer:.3f}",
            *[f"{m.min_dcf[p]:.4f}" if p in m.min_dcf else "" for p in ps],
            str(m.n_targets),
            str(m.n_nontargets),
        )
    return t
