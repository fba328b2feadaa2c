"""``EmbedJob``: recordings in, an embedding matrix and its index out (``speaker-sim embed``):
read the inputs, embed each content once through the chosen engine, write the npy or Kaldi
files atomically with ``index.csv``, ``failures.csv`` and ``model.json``. Never prints."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..pipeline import Extractor
from ..records import EmbedResult, Recording
from .events import ProgressFn, embed_callbacks
from .report import write_json
from .setup import ModelSource


@dataclass
class EmbedReport:
    """What an :class:`EmbedJob` wrote: the embedded and the failed recordings, the file
    holding the vectors, and the engine's result (``embedded`` / ``cached`` counts)."""

    good: list[Recording]
    bad: list[Recording]
    written: Path
    result: EmbedResult
    extractor: Extractor = field(repr=False)

    def reason(self, r: Recording) -> str:
        return self.result.failures[str(r.path)]


class EmbedJob:
    """Embed ``inputs`` (wav.scp, list files or audio files) into ``out`` in ``fmt``
    (``npy``: embeddings.npy + index.csv; ``kaldi``: xvector.ark + xvector.scp)."""

    def __init__(
        self,
        inputs: list[Path],
        out: Path,
        model: ModelSource | None = None,
        fmt: str = "npy",
        invocation: dict[str, Any] | None = None,
    ) -> None:
        self.inputs, self.out, self.fmt = inputs, out, fmt
        self.model = model or ModelSource()
        self.invocation = invocation

    def run(self, progress: ProgressFn | None = None) -> EmbedReport:
        from ..io.kaldi_vectors import check_key
        from ..io.trials import read_inputs

        m = self.model
        recs = read_inputs([str(p) for p in self.inputs])
        if self.fmt == "kaldi":
            for r in recs:
                check_key(r.key)  # before any embedding work
        ex = Extractor(m.model, m.model_dir, m.engine_config(), m.cache_dir,
                       use_cache=m.use_cache, model_config=m.model_config, ray=m.ray)  # fmt: skip
        res = ex.embed_paths([str(r.path) for r in recs], *embed_callbacks(progress))
        good = [r for r in recs if str(r.path) in res.embeddings]
        bad = [r for r in recs if str(r.path) in res.failures]
        written = self._write(ex, good, bad, res)
        return EmbedReport(good, bad, written, res, ex)

    def _write(
        self, ex: Extractor, good: list[Recording], bad: list[Recording], res: EmbedResult
    ) -> Path:
        from ..io.kaldi_vectors import kaldi_vectors
        from ..paths import atomic_write_bytes

        out = self.out
        mat = (
            np.stack([res.embeddings[str(r.path)] for r in good]).astype(np.float32)
            if good
            else np.zeros((0, ex.spec.dim), np.float32)
        )
        out.mkdir(parents=True, exist_ok=True)
        if self.fmt == "kaldi":
            ark = (out / "xvector.ark").resolve()
            ark_bytes, scp_bytes = kaldi_vectors([r.key for r in good], mat, str(ark))
            atomic_write_bytes(ark, ark_bytes)
            atomic_write_bytes(out / "xvector.scp", scp_bytes)
            written = out / "xvector.scp"
        else:
            from ..engine.cache import npy_bytes

            atomic_write_bytes(out / "embeddings.npy", npy_bytes(mat))
            written = out / "embeddings.npy"
        index = [[r.key, str(r.path)] for r in good]
        atomic_write_bytes(out / "index.csv", _csv(["key", "path"], index))
        failures = out / "failures.csv"
        if bad:
            rows = [[r.key, str(r.path), res.failures[str(r.path)]] for r in bad]
            atomic_write_bytes(failures, _csv(["key", "path", "error"], rows))
        else:  # an earlier run's list must not outlive it
            failures.unlink(missing_ok=True)
        doc = {**ex.describe(), **ex.engine_report()}
        if self.invocation is not None:
            doc["invocation"] = self.invocation
        write_json(out / "model.json", doc)
        return written


def _csv(header: list[str], rows: list[list[str]]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().encode()
