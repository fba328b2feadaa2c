"""mvector's evaluation lists as a trial list: every trial recording against every enrolment one.

mvector's ``eval.py`` (``MVectorTrainer.evaluate``) reads two lists of ``path<TAB>speaker-id``
lines, ``enroll_list`` and ``trials_list``, scores each trial utterance against each enrolment
utterance (no speaker means) and labels a pair target when the two ids are equal. This reader
builds that trial list (trial-major, as mvector flattens its score matrix), so ``speaker-sim
score --mvector-lists ENROLL TRIALS`` scores the same pairs with the usual metrics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..records import TrialList
from .trials import read_text

__all__ = ["read_mvector_list", "read_mvector_lists"]


def read_mvector_list(path: str | Path) -> list[tuple[str, str]]:
    """``(path, speaker id)`` per non-blank line of an mvector list (``path<TAB>id``).
    Raises UsageError naming the file and line."""
    p = Path(path)
    out: list[tuple[str, str]] = []
    for n, line in enumerate(read_text(p).splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rstrip("\r\n").split("\t")
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise UsageError(
                f"{p}:{n}: expected 'path<TAB>speaker-id' (mvector's enroll/trials list), "
                f"got {line.strip()[:80]!r}"
            )
        out.append((parts[0].strip(), parts[1].strip()))
    if not out:
        raise UsageError(f"{p}: the list is empty")
    return out


def read_mvector_lists(enroll: str | Path, trials: str | Path) -> TrialList:
    """Every trial-list recording against every enrolment-list recording, trial-major, labelled
    target when the speaker ids match. ``source`` is the trials list (relative paths resolve
    as for any trial file: ``--root``, else the nearest folder up from it that has them)."""
    enr = read_mvector_list(enroll)
    tri = read_mvector_list(trials)
    e_paths = [p for p, _ in enr]
    e_ids = np.array([s for _, s in enr])
    n_e = len(enr)
    labels = np.concatenate([(e_ids == s).astype(np.int8) for _, s in tri])
    return TrialList(
        enroll=e_paths * len(tri),
        test=[p for p, _ in tri for _ in range(n_e)],
        labels=labels,
        source=str(trials),
        format="mvector-lists",
        line_numbers=[i + 1 for i in range(len(tri)) for _ in range(n_e)],
    )
