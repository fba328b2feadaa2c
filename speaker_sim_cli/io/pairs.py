"""seed-tts-eval pair lists (``|``-separated), read into a :class:`TrialList`; no torch.

seed-tts-eval (``cal_sim.sh``) scores speaker similarity between each generated utterance and
its prompt. Two list shapes occur, told apart by the field count and ``--gen-dir``:

- ``generated|prompt|text`` (what ``get_wav_res_ref_text.py`` writes and
  ``verification_pair_list_v2.py`` reads; also F5-TTS's and UltraEval's lists): the two wav
  paths. Relative paths resolve like any trial list's (the list's folder).
- The test set's ``meta.lst`` with ``--gen-dir DIR`` (the folder of generated wavs), as
  ``cal_sim.sh meta.lst DIR`` reads it: ``utt|prompt_text|prompt_wav|infer_text[|infer_wav]``
  (3 fields: ``utt|infer_text|prompt_wav``); the generated file is ``DIR/<utt>.wav`` and the
  prompt wav is relative to the meta.lst's folder. Without ``--gen-dir`` a 5-field line's
  ``infer_wav`` (the ground-truth recording) is the "generated" side: the human baseline.

Where seed-tts-eval silently drops a line whose generated wav is missing (and later any pair
that fails), every line here becomes a trial: a missing or broken file fails its trial, which
is counted and named in the report.

Trials keep the file's order of sides: ``enroll`` = generated, ``test`` = prompt (cosine is
symmetric).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..records import TrialList
from .trials import read_text

FORMAT = "seed-tts-eval"


def looks_like_pairs(first_line: str) -> bool:
    """Whether a list's first non-empty line is a ``|``-separated seed-tts-eval line."""
    return first_line.count("|") >= 1 and "," not in first_line.split("|", 1)[0]


def read_pairs(path: str | Path, gen_dir: str | Path | None = None) -> TrialList:
    """Read a seed-tts-eval list (module docstring). Raises UsageError naming file and line."""
    p = Path(path)
    text = read_text(p)
    base = p.resolve().parent
    gen = None
    if gen_dir is not None:
        gen = Path(gen_dir).expanduser().resolve()
        if not gen.is_dir():
            raise UsageError(f"--gen-dir {gen_dir}: not a folder")
    generated: list[str] = []
    prompts: list[str] = []
    numbers: list[int] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        f = line.split("|")
        where = f"{p}:{lineno}"
        if gen is None:
            if len(f) == 3:
                g, pr = f[0].strip(), f[1].strip()
            elif len(f) == 5:
                g, pr = _rel(f[4], base), _rel(f[2], base)
            elif len(f) == 4:
                raise UsageError(
                    f"{where}: a seed-tts-eval meta.lst line (utt|prompt_text|prompt_wav|"
                    "infer_text): pass --gen-dir, the folder of the generated <utt>.wav files"
                )
            else:
                raise UsageError(
                    f"{where}: expected 'generated|prompt|text' (3 fields), found {len(f)}"
                )
        else:
            if len(f) in (4, 5):
                utt, pr = f[0].strip(), _rel(f[2], base)
            elif len(f) == 3:
                utt, pr = f[0].strip(), _rel(f[2], base)
                utt = utt[:-4] if utt.endswith(".wav") else utt
            else:
                raise UsageError(
                    f"{where}: expected 'utt|prompt_text|prompt_wav|infer_text[|infer_wav]' "
                    f"(or 'utt|infer_text|prompt_wav'), found {len(f)} fields"
                    + (": a line without a prompt wav has no SIM" if len(f) == 2 else "")
                )
            g = str(gen / f"{utt}.wav")
        if not g or not pr:
            raise UsageError(f"{where}: empty generated or prompt path")
        generated.append(g)
        prompts.append(pr)
        numbers.append(lineno)
    if not generated:
        raise UsageError(f"{p}: the pair list is empty")
    fmt = FORMAT + (" meta.lst" if gen is not None else "")
    return TrialList(generated, prompts, None, str(p), fmt, numbers)


def _rel(item: str, base: Path) -> str:
    """``item`` resolved against ``base`` when relative (seed-tts-eval joins the meta.lst's
    folder), as an absolute path string."""
    q = Path(item.strip()).expanduser()
    return str(q if q.is_absolute() else base / q)


def sim_summary(
    trials: TrialList, scores: np.ndarray, reasons: dict[str, str]
) -> dict[str, object]:
    """The SIM block of a report: mean, std and counts over ALL pairs, failures by reason.

    ``scores``: (N,) cosine, NaN for a pair that was not scored; ``reasons``: item -> why it
    failed. The mean and std are over the scored pairs, and the block always says how many
    that is out of how many (never a mean over a silently shrunk set).
    """
    ok = ~np.isnan(scores)
    good = scores[ok].astype(np.float64)
    by_reason: dict[str, int] = {}
    failed = []
    for i in np.flatnonzero(~ok).tolist():
        sides = [
            (side, item)
            for side, item in (("generated", trials.enroll[i]), ("prompt", trials.test[i]))
            if item in reasons
        ]
        why = "; ".join(f"{side}: {reasons[item]}" for side, item in sides) or "not scored"
        by_reason[why] = by_reason.get(why, 0) + 1
        line = trials.line_numbers[i] if trials.line_numbers else i + 1
        failed.append(
            {"line": line, "generated": trials.enroll[i], "prompt": trials.test[i], "reason": why}
        )
    return {
        "mean": round(float(good.mean()), 6) if good.size else None,
        "std": round(float(good.std()), 6) if good.size else None,
        "count_total": len(scores),
        "count_scored": int(ok.sum()),
        "count_failed": int((~ok).sum()),
        "failed_by_reason": dict(sorted(by_reason.items(), key=lambda kv: -kv[1])),
        "failed_pairs": failed,
        "note": "mean/std over the scored pairs only; count_total - count_scored pairs failed "
        "(seed-tts-eval would have dropped them silently)",
    }
