"""The library and the model behind the endpoints: decode-checked clips in, decisions out.

Embedding goes through the micro-batcher (one forward pass for the requests waiting together,
in its worker thread); identify's search runs in the same pass, one matrix product for the
batch. Library reads and writes run in threads, never on the event loop. A speaker whose
enrolments through the service hold less net speech than ``enrol_seconds`` is incomplete: it is
not identified and cannot be verified until it has enough.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..library import UNKNOWN, Voiceprints
from ..search import unit_rows
from ..store import Enrolment
from .batching import MicroBatcher
from .config import SPEAKER_ID, ServiceConfig
from .errors import ServiceError
from .uploads import Clip

#: Used when the model publishes no threshold (CAM++ zh-en). On the shared VCTK clips (four
#: speakers, voiceprints of three recordings, 28 held-out recordings), the speaker's own scored
#: 0.84 and up, other speakers at most 0.435: 0.6 leaves a margin on both sides. Calibrate on
#: your own recordings (speaker-sim calibrate) and pass --threshold.
FALLBACK_THRESHOLD = 0.6


@dataclass
class _Job:
    wave: np.ndarray
    search_k: int  # 0: embed only


def check_speaker_id(speaker: str) -> str:
    if not SPEAKER_ID.fullmatch(speaker) or speaker == UNKNOWN:
        raise ServiceError(
            "invalid_speaker_id",
            "a speaker id is 1-64 letters, digits, '.', '_' or '-', starting with a letter or "
            f"digit (and not {UNKNOWN!r})",
        )
    return speaker


class LoginEngine:
    """Owns the library (:class:`Voiceprints`: store + model) and the batcher."""

    def __init__(self, cfg: ServiceConfig) -> None:
        from ...engine.config import EngineConfig

        self.cfg = cfg
        engine = EngineConfig(device=cfg.device, batch_size=max(cfg.max_batch, 1), workers=0)
        self.lib = Voiceprints(cfg.library, cfg.model, engine=engine, use_cache=False)
        spec = self.lib.extractor.spec
        self.sample_rate = spec.sample_rate
        self.resampler = spec.frontend.resampler
        self.loudness_db = spec.frontend.loudness_db
        published = self.lib.default_threshold
        self.threshold = (
            cfg.threshold
            if cfg.threshold is not None
            else (published if published is not None else FALLBACK_THRESHOLD)
        )
        self._mat_lock = threading.Lock()
        self._index: tuple[int, dict[str, int], set[str]] | None = None
        self.batcher: MicroBatcher[_Job, tuple[np.ndarray, Any]] = MicroBatcher(
            self._process, cfg.max_batch, cfg.batch_wait_ms / 1000.0, cfg.queue_size,
            self._runners(),
        )  # fmt: skip
        self.ready = False
        self._stale = threading.Event()  # the library changed since its int8 copy was made
        self._refresher: threading.Thread | None = None

    def _runners(self) -> int:
        """Batches embedded at once: on a CPU, one single-threaded forward per core (up to 4),
        as the offline engine runs them; one on an accelerator."""
        import torch

        from ...engine.embedder import cpu_runners

        if self.lib.extractor.engine_cfg.device not in ("cpu", "auto") or (
            self.lib.extractor.engine_cfg.device == "auto" and torch.cuda.is_available()
        ):
            return 1
        runners = cpu_runners()
        torch.set_num_threads(max(1, torch.get_num_threads() // runners))
        return runners

    # -- life ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Load the model (one warm-up pass), the voiceprints, and start the batcher."""
        self.lib.extractor.load()
        rng = np.random.default_rng(0)
        self._embed([(rng.standard_normal(self.sample_rate) * 0.05).astype(np.float32)])
        self._snapshot()
        self.lib.load(prescan=True)  # the int8 copy single queries use (large libraries only)
        self.batcher.start()
        self.ready = True

    def _refresh_prescan(self) -> None:
        """After a change: remake the int8 copy off the request path (searches use the float32
        scan meanwhile). One thread does it; changes during a remake cause one more."""
        self._stale.set()
        if self._refresher is None:
            self._refresher = threading.Thread(
                target=self._refresh_loop, name="speaker-sim-prescan", daemon=True
            )
            self._refresher.start()

    def _refresh_loop(self) -> None:
        while self._stale.wait() and self.ready:
            self._stale.clear()
            self.lib.load(prescan=True)

    def stop(self) -> None:
        self.ready = False
        self._stale.set()  # lets the refresher see ready=False and end
        self.batcher.stop()
        self.lib.close()

    # -- the batch ----------------------------------------------------------------------------
    def _embed(self, waves: list[np.ndarray]) -> np.ndarray:
        import torch

        embs = self.lib.extractor.embedder.embed_waves([torch.from_numpy(w) for w in waves])
        if not np.isfinite(embs).all():
            raise ServiceError("internal", "the model produced a non-finite embedding")
        return embs

    def _snapshot(self) -> tuple[int, list[str], np.ndarray, dict[str, int], set[str]]:
        """(generation, names, voiceprints, name -> row, incomplete speakers), cached."""
        with self._mat_lock:
            gen, names, mat = self.lib._matrix()
            if self._index is None or self._index[0] != gen:
                rows = {n: i for i, n in enumerate(names)}
                incomplete = self.lib.store.incomplete(self.cfg.enrol_seconds)
                self._index = (gen, rows, incomplete)
            return gen, names, mat, self._index[1], self._index[2]

    def _process(self, jobs: list[_Job]) -> list[tuple[np.ndarray, Any]]:
        t0 = time.perf_counter()
        embs = self._embed([j.wave for j in jobs])
        t1 = time.perf_counter()
        self.batcher.times.add("embed", t1 - t0)
        out: list[tuple[np.ndarray, Any]] = [(e, None) for e in embs]
        ask = [i for i, j in enumerate(jobs) if j.search_k]
        if ask:
            k = max(jobs[i].search_k for i in ask)
            _, _, _, _, incomplete = self._snapshot()
            names, idx, sc = self.lib.search(embs[ask], k + len(incomplete))
            for i, ii, ss in zip(ask, idx, sc):
                cands = [(names[a], float(s)) for a, s in zip(ii, ss) if a >= 0]
                cands = [c for c in cands if c[0] not in incomplete][: jobs[i].search_k]
                out[i] = (embs[i], cands)
            self.batcher.times.add("search", time.perf_counter() - t1)
        return out

    # -- operations ---------------------------------------------------------------------------
    def progress(self, speaker: str) -> dict[str, Any]:
        rows = self.lib.store.speakers(speaker)
        if not rows:
            raise ServiceError("unknown_speaker", f"no speaker {speaker!r} is enrolled")
        r = rows[0]
        need = self.cfg.enrol_seconds
        have = r.speech_seconds
        complete = have is None or have >= need
        return {
            "speaker": r.name,
            "recordings": r.recordings,
            "enrolled": r.enrolled,
            "last_seen": r.last_seen,
            "speech_seconds": None if have is None else round(have, 2),
            "required_seconds": need,
            "remaining_seconds": 0.0 if complete else round(need - (have or 0.0), 2),
            "complete": complete,
        }

    async def enrol(self, speaker: str, clip: Clip, data: bytes) -> dict[str, Any]:
        check_speaker_id(speaker)
        emb, _ = await self.batcher.submit(_Job(clip.wave, 0))
        item = Enrolment(
            speaker, clip.sha256, f"upload:{clip.sha256[:16]}", emb, clip.speech_seconds,
            data if self.cfg.retain_audio else None,
        )  # fmt: skip
        rep = await asyncio.to_thread(self.lib.store.add, [item])
        self._refresh_prescan()
        out = await asyncio.to_thread(self.progress, speaker)
        out["added_speech_seconds"] = round(clip.speech_seconds, 2) if rep.added else 0.0
        out["duplicate"] = bool(rep.duplicates)
        return out

    async def verify(self, speaker: str, clip: Clip) -> dict[str, Any]:
        check_speaker_id(speaker)
        _, _, mat, rows, incomplete = await asyncio.to_thread(self._snapshot)
        if speaker not in rows:
            raise ServiceError("unknown_speaker", f"no speaker {speaker!r} is enrolled")
        if speaker in incomplete:
            raise ServiceError(
                "enrolment_incomplete", f"{speaker!r} has not enrolled enough speech yet"
            )
        emb, _ = await self.batcher.submit(_Job(clip.wave, 0))
        score = float(unit_rows(emb)[0] @ mat[rows[speaker]])
        accept = score >= self.threshold
        if accept:
            await asyncio.to_thread(self.lib.store.touch, [speaker])
        return {
            "speaker": speaker,
            "decision": "accept" if accept else "reject",
            "score": round(score, 6),
            "threshold": self.threshold,
            "speech_seconds": round(clip.speech_seconds, 2),
        }

    async def identify(self, clip: Clip, top_k: int) -> dict[str, Any]:
        _, cands = await self.batcher.submit(_Job(clip.wave, top_k))
        best = cands[0] if cands else None
        who = best[0] if best is not None and best[1] >= self.threshold else UNKNOWN
        if who != UNKNOWN:
            t0 = time.perf_counter()
            await asyncio.to_thread(self.lib.store.touch, [who])
            self.batcher.times.add("touch", time.perf_counter() - t0)
        return {
            "speaker": who,
            "score": None if best is None else round(best[1], 6),
            "threshold": self.threshold,
            "candidates": [{"speaker": s, "score": round(v, 6)} for s, v in cands],
            "speech_seconds": round(clip.speech_seconds, 2),
        }

    def delete(self, speaker: str) -> dict[str, Any]:
        check_speaker_id(speaker)
        from ...errors import UsageError

        try:
            n = self.lib.store.remove(speaker)
        except UsageError:
            raise ServiceError("unknown_speaker", f"no speaker {speaker!r} is enrolled") from None
        self._refresh_prescan()
        return {"speaker": speaker, "deleted": True, "recordings": n}

    def speakers(self) -> list[dict[str, Any]]:
        need = self.cfg.enrol_seconds
        return [
            {
                "speaker": r.name,
                "recordings": r.recordings,
                "enrolled": r.enrolled,
                "last_seen": r.last_seen,
                "speech_seconds": r.speech_seconds,
                "complete": r.speech_seconds is None or r.speech_seconds >= need,
            }
            for r in self.lib.store.speakers()
        ]
