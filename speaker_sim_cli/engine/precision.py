"""Precision switches of the engine: submodules kept in fp32 under autocast (forward hooks
scoped per Embedder and thread) and TF32 turned off around our forwards, restored after."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .config import fp32_submodules

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def keep_fp32(model: torch.nn.Module, arch: str, precision: str) -> dict[str, int]:
    """The :data:`FP32_SUBMODULES` of ``arch`` at ``precision``, by name -> ``id(module)``.

    Each gets (once) a pair of forward hooks that, while an Embedder that asked for it is
    running (:func:`fp32_scope`) under autocast, turn autocast off for the submodule and cast
    its floating inputs to fp32, and turn it back on after. Otherwise the hooks do nothing.
    """
    out: dict[str, int] = {}
    for name in fp32_submodules(arch, precision):
        try:
            sub = model.get_submodule(name)
        except AttributeError:
            continue
        if not getattr(sub, "_speaker_sim_fp32_hooks", False):
            sub.register_forward_pre_hook(_fp32_enter)
            sub.register_forward_hook(_fp32_exit)
            sub._speaker_sim_fp32_hooks = True  # type: ignore[assignment]
        out[name] = id(sub)
    return out


_TF32_LOCK = threading.Lock()
_TF32_DEPTH = 0
_TF32_SAVED: list[tuple[Any, str, Any]] = []


def _tf32_switches() -> list[tuple[Any, str, Any]]:
    """(object, attribute, value meaning "no TF32") of every TF32 switch this torch has."""
    b = torch.backends
    out: list[tuple[Any, str, Any]] = [(b.cudnn, "allow_tf32", False),
                                       (b.cuda.matmul, "allow_tf32", False)]  # fmt: skip
    # torch >= 2.9's per-backend precision; "none" defers to the switches above, and setting it
    # while an application uses the old ones is refused, so only touch it when it is in use.
    for obj in (getattr(b.cudnn, "conv", None), getattr(b.cudnn, "rnn", None),
                getattr(b.cuda.matmul, "fp32_precision", None) and b.cuda.matmul):  # fmt: skip
        if obj is not None and getattr(obj, "fp32_precision", "none") not in ("none", "ieee"):
            out.append((obj, "fp32_precision", "ieee"))
    return out


@contextmanager
def tf32_off() -> Iterator[None]:
    """Within: no TF32 anywhere (convolutions and matmuls run in true fp32), so fp32 means fp32
    and the submodules bf16 keeps in fp32 (:data:`FP32_SUBMODULES`) are not TF32 in disguise.

    The switches are process-global: they are saved on entry and restored on exit (the
    outermost of nested or concurrent entries, by CPU runner threads, restores them), so an
    application embedding speaker-sim keeps its own setting outside our forwards.
    """
    global _TF32_DEPTH, _TF32_SAVED
    with _TF32_LOCK:
        if _TF32_DEPTH == 0:
            _TF32_SAVED = [(o, a, getattr(o, a)) for o, a, _ in _tf32_switches()]
            for o, a, off in _tf32_switches():
                setattr(o, a, off)
        _TF32_DEPTH += 1
    try:
        yield
    finally:
        with _TF32_LOCK:
            _TF32_DEPTH -= 1
            if _TF32_DEPTH == 0:
                for o, a, v in _TF32_SAVED:
                    setattr(o, a, v)


_FP32 = threading.local()  # .active: ids of submodules to run in fp32; .stacks: entered contexts


@contextmanager
def fp32_scope(ids: frozenset[int]) -> Iterator[None]:
    """Within: the hooked submodules in ``ids`` run in fp32. On the way out (also after an
    error inside one of them) every context they entered is left, innermost first."""
    _FP32.active, _FP32.stacks = ids, {}
    try:
        yield
    finally:
        for stack in _FP32.stacks.values():
            while stack:
                stack.pop().__exit__(None, None, None)
        _FP32.active = frozenset()


def _autocast_on(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4: no device argument
        if device_type == "cpu":
            return bool(torch.is_autocast_cpu_enabled())
        return bool(torch.is_autocast_enabled())


def _fp32_enter(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    if id(module) not in getattr(_FP32, "active", ()):
        return None
    tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
    device_type = tensor.device.type if tensor is not None else "cpu"
    if not _autocast_on(device_type):
        return None
    ctx = torch.autocast(device_type, enabled=False)
    ctx.__enter__()
    _FP32.stacks.setdefault(id(module), []).append(ctx)
    return tuple(
        a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args
    )


def _fp32_exit(module: torch.nn.Module, _args: Any, _out: Any) -> None:
    stack = getattr(_FP32, "stacks", {}).get(id(module))
    if stack:
        stack.pop().__exit__(None, None, None)
