"""Driver side of ``--ray``: hands work units to an elastic pool of model actors and survives
their loss.

An actor lost with its node is replaced (on a node that has room, or one added later) and its
units go back to the queue; a unit whose actor *process* died is split into single recordings,
and a recording that kills its worker ``MAX_CRASHES`` times fails alone with a reason. Nothing
waits for an actor that cannot come back: no progress for ``stall_s`` stops the job with a
message saying what the cluster lacks. An actor that Ray has placed on a node but that is still
loading its model is waited for (``stall_s`` more from when the stall found it so); one that no
node has room for is not. Which is which comes from the actor itself: its constructor is cheap,
so its ``ready()`` answers once it is on a node, its ``setup()`` once the model is loaded.
The driver holds only the units in flight.
"""

from __future__ import annotations

import queue
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ..errors import SpeakerSimError
from .ray_worker import pack_paths, unpack_paths

# A recording whose worker process died this many times (counting the crash of the unit it was
# first part of) fails alone; a node lost with the actor does not count.
MAX_CRASHES = 3
# Units queued on each actor: one running, one waiting, so no actor idles for a round trip.
IN_FLIGHT = 2
# How often the pool compares its size with what the cluster has room for (nodes come and go).
RESIZE_S = 2.0
# An actor that fails to start is re-created after a back-off that doubles with each failure
# in a row, from the first to the last value. When every creation fails at once (the actor is
# bound to a node that is gone, or Ray drops it: seen when a process ran a second Ray cluster),
# re-creating at once made 200-300 actor creations a second, which flooded Ray's control store
# until the job stalled.
START_BACKOFF_S = (0.25, 8.0)


@dataclass
class Unit:
    """Work items ``lo .. lo+n-1`` (their paths as one :func:`pack_paths` block) and the
    crashes they have caused."""

    lo: int
    n: int
    paths: bytes | list[str]
    crashes: int = 0
    last: str = ""
    # Was on an actor that died with more than one unit on it: runs alone from then on (no
    # other unit queued on its actor), so that a crash it causes is charged to it alone.
    suspect: bool = False


@dataclass
class _Slot:
    handle: Any
    info: dict[str, Any]
    queue: list[Any] = field(default_factory=list)  # refs in submission order


class ActorPool:
    """Runs ``units`` on actors made by ``make()``; yields each unit's result row.

    ``want()`` is how many actors the pool should hold now (called every ``RESIZE_S``), so a
    node added mid-run gets actors. Actors are created with no Ray-level restarts: a dead actor
    is replaced here, where its units are known, instead of Ray waiting to restart it in place.
    """

    def __init__(
        self,
        ray: Any,
        make: Callable[[], Any],
        want: Callable[[], int],
        stall_s: float,
        describe: Callable[[], str],
        in_flight: int = IN_FLIGHT,
    ) -> None:
        self.ray = ray
        self.make = make
        self.want = want
        self.stall_s = stall_s
        self.describe = describe
        self.starting: dict[Any, Any] = {}  # setup() ref -> handle
        # ready() ref -> its actor's setup() ref: ready() answers as soon as Ray has placed the
        # actor on a node (its constructor is cheap), setup() once the model is loaded.
        self.placing: dict[Any, Any] = {}
        self.on_node: set[Any] = set()  # setup() refs of starting actors placed on a node
        self.slots: dict[Any, _Slot] = {}  # actor id -> slot
        self.work: dict[Any, tuple[Any, Unit]] = {}  # run() ref -> (actor id, unit)
        self.retry: deque[Unit] = deque()
        self.rows: deque[dict[str, Any]] = deque()
        self.failed: list[tuple[Unit, str]] = []  # single recordings given up on
        self.lost_actors = 0
        self.crashes = 0
        self.retried_units = 0
        self.target = 0
        self.in_flight = in_flight
        # Actors with room for another unit (insertion-ordered set): assigning work visits
        # only these, and a finished unit's answer arrives on ``done`` (a callback per ref), so
        # the driver's work per unit does not grow with the number of actors or units in
        # flight (ray.wait over every ref in flight costs ~0.6 us per ref per call).
        self.hungry: dict[Any, None] = {}
        # Starting actors seen placed on a node (loading the model) once the job stalled: when.
        self.placed: dict[Any, float] = {}
        self.slow_loads = 0
        self.start_failures = 0  # in a row; an actor that starts resets it
        self.make_after = 0.0  # no actor is created before this (monotonic) time
        self.done: queue.SimpleQueue[tuple[Any, Future[Any]]] = queue.SimpleQueue()

    def run(self, units: Iterator[Unit]) -> Iterator[dict[str, Any]]:
        source: Iterator[Unit] | None = units
        last_progress = time.monotonic()
        next_resize = 0.0
        while True:
            now = time.monotonic()
            if now >= next_resize:
                self.target = max(1, self.want())
                next_resize = now + RESIZE_S
            while len(self.slots) + len(self.starting) < self.target and now >= self.make_after:
                handle = self.make()
                placed, ref = handle.ready.remote(), handle.setup.remote()
                self.starting[ref] = handle
                self.placing[placed] = ref
                self._watch(placed)
                self._watch(ref)
            source = self._assign(source)
            while self.failed:
                unit, why = self.failed.pop()
                yield {"lo": unit.lo, "n": 1, "given_up": why}
            while self.rows:  # results of an actor that died after returning them
                row = self.rows.popleft()
                if row.get("fatal"):
                    raise SpeakerSimError(row["fatal"])
                yield row
            if source is None and not self.work and not self.retry and not self.rows:
                return
            done = self._completed(0.2 if not self.work and not self.starting else 1.0)
            for ref, fut in done:
                if ref in self.placing:  # placed on a node (or gone: setup() will say)
                    setup = self.placing.pop(ref)
                    if setup in self.starting and fut.exception() is None:
                        self.on_node.add(setup)
                    continue
                if ref in self.starting:
                    if self._started(ref, fut):
                        last_progress = time.monotonic()
                    continue
                if ref not in self.work:  # its actor died and its unit went back to the queue
                    continue
                aid, unit = self.work.pop(ref)
                slot = self.slots.get(aid)
                try:
                    row = fut.result()
                except Exception as exc:
                    if not _actor_gone(exc):
                        raise SpeakerSimError(f"a Ray worker failed: {_first_line(exc)}") from None
                    self._lost(aid, slot, ref, unit, exc)
                    continue
                if slot is not None:
                    if ref in slot.queue:
                        slot.queue.remove(ref)
                    self.hungry[aid] = None
                last_progress = time.monotonic()
                if row.get("fatal"):
                    raise SpeakerSimError(row["fatal"])
                yield row
            now = time.monotonic()
            if now - last_progress > self.stall_s and not self._loading(now):
                slow = f", {self.slow_loads} placed on a node but still loading the model " \
                    f"{self.stall_s:.0f} s later" if self.slow_loads else ""  # fmt: skip
                raise SpeakerSimError(
                    f"the Ray job made no progress for {self.stall_s:.0f} s "
                    f"({len(self.slots)} actors ready, {len(self.starting) - len(self.on_node)} "
                    f"waiting for a node with room{slow}, {len(self.work)} units running, "
                    f"{len(self.retry)} to retry, {self.lost_actors} actors lost so far): "
                    f"{self.describe()}"
                )

    def _loading(self, now: float) -> bool:
        """Is an actor placed on a node still loading its model (given ``stall_s`` more from
        when it was first seen so), as opposed to waiting for a node with room? Asked only
        once the job has made no progress for ``stall_s``."""
        loading = False
        self.slow_loads = 0
        for ref in self.starting:
            if ref not in self.on_node:  # waiting for a node with room
                continue
            since = self.placed.setdefault(ref, now)
            if now - since <= self.stall_s:
                loading = True
            else:
                self.slow_loads += 1
        return loading

    def _watch(self, ref: Any) -> None:
        """``ref``'s outcome goes to ``done`` when it is ready (on a Ray thread)."""
        ref.future().add_done_callback(lambda fut, ref=ref: self.done.put((ref, fut)))

    def _completed(self, timeout: float) -> list[tuple[Any, Future[Any]]]:
        """The refs that completed (waits up to ``timeout`` s for the first)."""
        try:
            done = [self.done.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                done.append(self.done.get_nowait())
            except queue.Empty:
                return done

    def _assign(self, source: Iterator[Unit] | None) -> Iterator[Unit] | None:
        for aid in list(self.hungry):
            slot = self.slots.get(aid)
            if slot is None:  # lost meanwhile
                del self.hungry[aid]
                continue
            while len(slot.queue) < self.in_flight:
                if any(self.work[r][1].suspect for r in slot.queue if r in self.work):
                    break  # a suspect runs alone on its actor
                if self.retry:
                    if self.retry[0].suspect and slot.queue:
                        break
                    unit = self.retry.popleft()
                elif source is not None:
                    got = next(source, None)
                    if got is None:
                        return None
                    unit = got
                else:
                    return source
                ref = slot.handle.run.remote(unit.lo, unit.paths)
                slot.queue.append(ref)
                self.work[ref] = (aid, unit)
                self._watch(ref)
            # Full, or held by a suspect: it is hungry again when one of its units ends.
            del self.hungry[aid]
        return source

    def _started(self, ref: Any, fut: Future[Any]) -> bool:
        handle = self.starting.pop(ref)
        self.placed.pop(ref, None)
        self.on_node.discard(ref)
        try:
            info = fut.result()
        except Exception as exc:  # its node went away while it started: replace it
            if "No module named" in str(exc):
                raise SpeakerSimError(
                    "a Ray worker node cannot import speaker-sim: install the same version on "
                    f"every node (pip install 'speaker-sim[ray]'): {_first_line(exc)}"
                ) from None
            if not _actor_gone(exc):
                raise SpeakerSimError(f"a Ray worker failed to start: {_first_line(exc)}") from None
            self.lost_actors += 1
            first, last = START_BACKOFF_S
            self.make_after = time.monotonic() + min(
                last, first * 2 ** min(self.start_failures, 16)
            )
            self.start_failures += 1
            return False
        if info.get("fatal"):
            raise SpeakerSimError(info["fatal"])
        self.start_failures = 0
        self.slots[handle._actor_id] = _Slot(handle, info)
        self.hungry[handle._actor_id] = None
        return True

    def _lost(self, aid: Any, slot: _Slot | None, ref: Any, unit: Unit, exc: BaseException
              ) -> None:  # fmt: skip
        """``ref``'s actor died: every unit queued on it goes back to the queue; the one it was
        running (the first) is charged a crash, unless the actor went down with its node."""
        if slot is None:
            self.retry.appendleft(unit)
            return
        self.slots.pop(aid, None)
        self.lost_actors += 1
        with _quiet():
            self.ray.kill(slot.handle, no_restart=True)
        node_lost = _node_died(exc) or not self._node_alive(slot.info.get("node_id"))
        lost: list[Unit] = []
        for r in slot.queue:
            u = unit if r == ref else self.work.pop(r, (None, None))[1]
            if u is None:
                continue
            if r != ref:  # a unit it finished before dying: its row may be here already
                done, _ = self.ray.wait([r], timeout=0.5)
                if done:
                    try:
                        self.rows.append(self.ray.get(r))
                        continue
                    except Exception as other:
                        if not _actor_gone(other):
                            raise
            lost.append(u)
        self.retried_units += len(lost)
        if node_lost:
            self.retry.extendleft(reversed(lost))
        elif lost:
            self._crashed(lost, exc)

    def _crashed(self, lost: list[Unit], exc: BaseException) -> None:
        """The actor died on its own with ``lost`` on it. One single recording: it is charged
        the crash. Otherwise which one did it is not known (a finished unit's answer can be
        lost with the actor): every recording of them is retried alone as a suspect."""
        self.crashes += 1
        why = _first_line(exc)
        if len(lost) > 1 or lost[0].n > 1:
            for u in reversed(lost):
                paths = unpack_paths(u.paths)
                for k in reversed(range(u.n)):
                    self.retry.appendleft(Unit(u.lo + k, 1, pack_paths([paths[k]]), u.crashes,
                                               u.last or why, suspect=True))  # fmt: skip
            return
        unit = lost[0]
        unit.crashes += 1
        unit.last = why
        if unit.crashes >= MAX_CRASHES:
            self.failed.append((unit, (
                f"the Ray worker process died while processing this recording "
                f"({unit.crashes} tries; last: {why})")))  # fmt: skip
        else:
            self.retry.appendleft(unit)

    def _node_alive(self, node_id: str | None) -> bool:
        if not node_id:
            return True
        try:
            return any(n.get("NodeID") == node_id and n.get("Alive") for n in self.ray.nodes())
        except Exception:
            return True

    def shutdown(self) -> None:
        for slot in self.slots.values():
            with _quiet():
                self.ray.kill(slot.handle, no_restart=True)
        for handle in self.starting.values():
            with _quiet():
                self.ray.kill(handle, no_restart=True)
        self.slots.clear()
        self.starting.clear()
        self.placing.clear()
        self.on_node.clear()


class _quiet:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


def _actor_gone(exc: BaseException) -> bool:
    """A Ray error that means the actor (or its node) is gone, not a bug in our code."""
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & {"RayActorError", "ActorDiedError", "ActorUnavailableError",
                         "ActorUnschedulableError", "NodeDiedError", "OwnerDiedError",
                         "ObjectLostError", "WorkerCrashedError"})  # fmt: skip


def _node_died(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "node has died" in text or "node died" in text or "raylet" in text


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    for marker in ("unexpectedly", "exit"):
        for line in text.splitlines():
            if marker in line.lower() and line.strip():
                return line.strip()[:200]
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    return first[:200]
