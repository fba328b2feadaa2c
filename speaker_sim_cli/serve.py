"""The ``serve`` loop: pair requests in, cosine answers out, one model, many requests in flight.

Protocol (text, the default), one request a line::

    <id>->/path/a.wav,/path/b.wav      ->  <id>-><cosine, 6 decimals>
    a bad request                      ->  Error: <id> <reason>
    <id>->close                            (the harness's acknowledgement: ignored)

and with ``jsonl=True``: ``{"id": ..., "a": ..., "b": ...}`` in, ``{"id": ..., "score": ...}``
or ``{"id": ..., "error": ...}`` out (the score in full float64 precision).

A reader thread parses lines and queues them; the serving loop (the caller's thread) answers
at once every request whose two recordings are in memory, and collects the others for a few
milliseconds (``window``) so that they are embedded as one batch through the engine. Answers
may therefore come out of order; each names its id. End of input (or :meth:`Server.stop`, which
is safe to call from a signal handler) ends serving after every request already read is
answered. Nothing but answers is written to ``out``; ``log`` gets the rest.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TextIO

import numpy as np

__all__ = [
    "Backend",
    "Request",
    "ServeStats",
    "Server",
    "parse_jsonl",
    "parse_text",
    "read_lines_fd",
]

NO_ID = "-"  # the id an answer names when the request line has none


class Backend(Protocol):
    """What the server needs from a model: :class:`~speaker_sim_cli.api.SpeakerSim` has it."""

    def cached(self, path: str) -> np.ndarray | None:
        """The embedding of ``path`` when it is in memory, else None (cheap: no decode)."""
        ...

    def lookup(self, paths: Iterable[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """Embed files (batched): ``(embeddings, failure reasons)`` keyed by the paths given."""
        ...


@dataclass(frozen=True)
class Request:
    """One parsed line: a pair to score, or a request already known to be bad (``error``)."""

    id: Any
    a: str = ""
    b: str = ""
    error: str | None = None


# -- parsing ------------------------------------------------------------------------------
def parse_text(line: str) -> Request | None:
    """Parse ``<id>->a.wav,b.wav``. None for lines to ignore (blank, ``<id>->close``).

    >>> parse_text("u1->/x/a.wav,/x/b.wav")
    Request(id='u1', a='/x/a.wav', b='/x/b.wav', error=None)
    >>> parse_text("u1->close") is None
    True
    >>> parse_text("u2->/x/a.wav").error
    'expected 2 comma-separated paths, got 1'
    """
    s = line.rstrip("\r\n")
    if not s.strip():
        return None
    if "->" not in s:
        return Request(NO_ID, error="malformed request: expected <id>->a.wav,b.wav")
    rid, rest = s.split("->", 1)
    rid, rest = rid.strip(), rest.strip()
    if rest == "close":
        return None
    if not rid:
        return Request(NO_ID, error="malformed request: empty id before '->'")
    parts = [p.strip() for p in rest.split(",")] if rest else []
    if len(parts) != 2:
        pair = _split_existing(rest) if len(parts) > 2 else None
        if pair is None:
            return Request(rid, error=f"expected 2 comma-separated paths, got {len(parts)}")
        parts = list(pair)
    if not parts[0] or not parts[1]:
        return Request(rid, error="empty path")
    return Request(rid, parts[0], parts[1])


def _split_existing(rest: str) -> tuple[str, str] | None:
    """A path with a comma in its name: the one split whose two sides are both files."""
    found: list[tuple[str, str]] = []
    for i, ch in enumerate(rest):
        if ch == ",":
            a, b = rest[:i].strip(), rest[i + 1 :].strip()
            if a and b and os.path.isfile(a) and os.path.isfile(b):
                found.append((a, b))
    return found[0] if len(found) == 1 else None


def parse_jsonl(line: str) -> Request | None:
    """Parse ``{"id": ..., "a": ..., "b": ...}``. None for blank lines.

    >>> parse_jsonl('{"id": 7, "a": "x.wav", "b": "y.wav"}')
    Request(id=7, a='x.wav', b='y.wav', error=None)
    """
    s = line.strip()
    if not s:
        return None
    try:
        obj = json.loads(s)
    except ValueError as exc:
        return Request(None, error=f"invalid JSON: {exc}")
    if not isinstance(obj, dict):
        return Request(None, error='expected a JSON object {"id": ..., "a": ..., "b": ...}')
    rid = obj.get("id")
    if isinstance(rid, dict | list):
        return Request(None, error="'id' must be a string or a number")
    a, b = obj.get("a"), obj.get("b")
    if not isinstance(a, str) or not isinstance(b, str) or not a or not b:
        return Request(rid, error="'a' and 'b' must be two paths (non-empty strings)")
    return Request(rid, a, b)


def format_score(rid: Any, score: float, jsonl: bool) -> str:
    if jsonl:
        return json.dumps({"id": rid, "score": float(score)}, ensure_ascii=False)
    return f"{rid}->{score:.6f}"


def format_error(rid: Any, reason: str, jsonl: bool) -> str:
    reason = " ".join(reason.split())  # one line, whatever the reason says
    if jsonl:
        return json.dumps({"id": rid, "error": reason}, ensure_ascii=False)
    return f"Error: {rid} {reason}"


def read_lines_fd(fd: int, chunk: int = 1 << 16) -> Iterator[str]:
    """Lines (without the newline) from a file descriptor, as they arrive, until EOF.

    Reads with ``os.read`` rather than ``sys.stdin``: a thread blocked here holds no Python
    lock, so the process can end while it waits. Bytes that are not UTF-8 are kept as
    surrogates (``os.fsdecode``'s convention), so any file name round-trips.
    """
    buf = b""
    while True:
        try:
            data = os.read(fd, chunk)
        except InterruptedError:  # pragma: no cover - PEP 475 retries for us
            continue
        except OSError:
            data = b""
        if not data:
            break
        buf += data
        if b"\n" not in data:
            continue
        *lines, buf = buf.split(b"\n")
        for ln in lines:
            yield ln.decode("utf-8", "surrogateescape")
    if buf:
        yield buf.decode("utf-8", "surrogateescape")


# -- serving -------------------------------------------------------------------------------
@dataclass
class ServeStats:
    """What a server did: requests read, answers written, batches embedded."""

    requests: int = 0  # request lines (good and bad)
    scored: int = 0
    errors: int = 0
    ignored: int = 0  # blank lines and ``<id>->close``
    from_memory: int = 0  # requests answered without waiting for the model
    batches: int = 0  # look-ups that went past memory (disk cache or model)
    largest_batch: int = 0  # requests in the largest of them
    seconds: float = 0.0
    stdout_closed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_STOP = object()


class Server:
    """Answers requests with a :class:`Backend`; see the module docstring.

    Args:
        backend: the model and its caches.
        out: where answers go (text stream); flushed after every group of answers.
        jsonl: JSON lines in and out instead of ``<id>->a,b``.
        window: seconds to wait for more requests before embedding a batch of misses.
        max_batch: most requests collected into one batch.
        log: a function that takes one line for the operator (stderr), or None.
    """

    def __init__(
        self,
        backend: Backend,
        out: TextIO,
        *,
        jsonl: bool = False,
        window: float = 0.005,
        max_batch: int = 256,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if window < 0 or max_batch < 1:
            raise ValueError("window must be >= 0 and max_batch >= 1")
        self.backend = backend
        self.out = out
        self.jsonl = jsonl
        self.window = window
        self.max_batch = max_batch
        self.log = log or (lambda _msg: None)
        self.stats = ServeStats()
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()  # put() is signal-safe
        self._write_lock = threading.Lock()
        self._stopping = False
        self._parse = parse_jsonl if jsonl else parse_text

    # -- the reader side ----------------------------------------------------------------
    def submit(self, line: str) -> None:
        """Parse one line and queue it (any thread). Bad lines are answered at once."""
        req = self._parse(line)
        if req is None:
            self.stats.ignored += 1
            return
        self.stats.requests += 1
        if req.error is not None:
            self._emit([format_error(req.id, req.error, self.jsonl)], errors=1)
            return
        self._q.put(req)

    def close(self) -> None:
        """End of input: serving ends once every queued request is answered."""
        self._q.put(_STOP)

    def stop(self) -> None:
        """Stop reading; finish the requests already read. Safe in a signal handler."""
        self._stopping = True
        self._q.put(_STOP)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def feed(self, lines: Iterable[str]) -> None:
        """Submit every line, then :meth:`close` (the reader thread's job)."""
        try:
            for line in lines:
                if self._stopping:
                    break
                self.submit(line)
        except Exception as exc:  # a broken input must still end serving cleanly
            self.log(f"reading requests failed: {type(exc).__name__}: {exc}")
        finally:
            self.close()

    def serve(self, lines: Iterable[str]) -> ServeStats:
        """Read ``lines`` in a daemon thread and serve in this one until they end."""
        reader = threading.Thread(target=self.feed, args=(lines,), name="serve-reader")
        reader.daemon = True
        reader.start()
        return self.run()

    # -- the serving loop ---------------------------------------------------------------
    def run(self) -> ServeStats:
        """Answer queued requests until the input ends or :meth:`stop` is called."""
        t0 = time.perf_counter()
        try:
            while True:
                item = self._get(None)
                if item is _STOP:
                    break
                batch, ended = self._drain([item])
                pending = self._answer_ready(batch)
                if pending and not ended and self.window > 0:
                    ended = self._collect(pending)
                if pending:
                    self._answer_pending(pending)
                if ended:
                    break
            # Requests read before the stop (or slipped in beside it) are still answered.
            rest, _ = self._drain([], limit=None)
            if rest:
                pending = self._answer_ready(rest)
                for s in range(0, len(pending), self.max_batch):
                    self._answer_pending(pending[s : s + self.max_batch])
        finally:
            self.stats.seconds += time.perf_counter() - t0
        return self.stats

    def _get(self, timeout: float | None) -> Any:
        """Block for the next item (in slices, so signal handlers run promptly)."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        while True:
            step = 0.25 if deadline is None else min(0.25, deadline - time.perf_counter())
            if step <= 0:
                raise queue.Empty
            try:
                return self._q.get(timeout=step)
            except queue.Empty:
                continue

    def _drain(self, batch: list[Any], limit: int | None = -1) -> tuple[list[Request], bool]:
        """Add what is queued now (up to ``max_batch``; ``limit=None``: all)."""
        cap = self.max_batch if limit == -1 else limit
        ended = False
        while cap is None or len(batch) < cap:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                ended = True
                if cap is not None:
                    break
                continue
            batch.append(item)
        return batch, ended

    def _collect(self, pending: list[Request]) -> bool:
        """Wait up to ``window`` for more requests to join a batch that needs the model."""
        deadline = time.perf_counter() + self.window
        while len(pending) < self.max_batch:
            left = deadline - time.perf_counter()
            if left <= 0:
                return False
            try:
                item = self._q.get(timeout=left)
            except queue.Empty:
                return False
            if item is _STOP:
                return True
            more, ended = self._drain([item], limit=self.max_batch - len(pending))
            pending.extend(self._answer_ready(more))
            if ended:
                return True
        return False

    def _answer_ready(self, batch: list[Request]) -> list[Request]:
        """Answer the requests whose two embeddings are in memory; return the others."""
        ready: list[tuple[Request, np.ndarray, np.ndarray]] = []
        pending: list[Request] = []
        for r in batch:
            ea = self.backend.cached(r.a)
            eb = self.backend.cached(r.b) if ea is not None else None
            if ea is not None and eb is not None:
                ready.append((r, ea, eb))
            else:
                pending.append(r)
        if ready:
            self.stats.from_memory += len(ready)
            self._emit_scores(ready)
        return pending

    def _answer_pending(self, pending: list[Request]) -> None:
        """Embed what the batch needs (one engine call) and answer every request in it."""
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(pending))
        paths = list(dict.fromkeys(p for r in pending for p in (r.a, r.b)))
        try:
            embs, fails = self.backend.lookup(paths)
        except Exception as exc:  # an engine failure: retry alone, so it costs one request
            self.log(f"embedding a batch of {len(paths)} recordings failed: {exc!r}")
            if len(pending) > 1:
                for r in pending:
                    self._answer_pending([r])
                return
            reason = f"internal error: {type(exc).__name__}: {exc}"
            self._emit([format_error(pending[0].id, reason, self.jsonl)], errors=1)
            return
        ok: list[tuple[Request, np.ndarray, np.ndarray]] = []
        bad: list[str] = []
        for r in pending:
            reasons = [f"{p}: {fails[p]}" for p in dict.fromkeys((r.a, r.b)) if p in fails]
            if reasons or r.a not in embs or r.b not in embs:
                reason = "; ".join(reasons) or "no embedding"
                bad.append(format_error(r.id, reason, self.jsonl))
            else:
                ok.append((r, embs[r.a], embs[r.b]))
        if bad:
            self._emit(bad, errors=len(bad))
        if ok:
            self._emit_scores(ok)

    def _emit_scores(self, items: Sequence[tuple[Request, np.ndarray, np.ndarray]]) -> None:
        # The scoring stage's own cosine: what ``speaker-sim score`` gives the same two files.
        from .job.stage import score_pairs

        scores = score_pairs([(ea, eb) for _, ea, eb in items])
        lines = [
            format_score(r.id, s, self.jsonl) for (r, _, _), s in zip(items, scores, strict=True)
        ]
        self._emit(lines, scored=len(items))

    def _emit(self, lines: list[str], scored: int = 0, errors: int = 0) -> None:
        with self._write_lock:
            self.stats.scored += scored
            self.stats.errors += errors
            if self.stats.stdout_closed:
                return
            try:
                self.out.write("".join(ln + "\n" for ln in lines))
                self.out.flush()
            except (BrokenPipeError, ValueError, OSError) as exc:
                self.stats.stdout_closed = True
                self.log(f"cannot write answers ({type(exc).__name__}); stopping")
                self.stop()
