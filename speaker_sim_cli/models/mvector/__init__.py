"""Backbones of VoiceprintRecognition-Pytorch (``mvector`` 1.1.x), written in the project.

:func:`build_backbone` builds what mvector's ``getattr(models, model)(input_size,
**model_args)`` builds (same constructor arguments and defaults, same state-dict keys), and
:func:`load_backbone_state` loads a trainer's ``model.pth`` into it. Every backbone's
``forward(feats, n_frames)`` takes (B, T, F) mean-subtracted features, zero-padded, and (B,)
int64 valid frames per row (None: all T), and returns (B, embd_dim) raw embeddings (what
mvector's ``predict`` returns: not L2-normalised). Padded rows give their single-utterance
embedding: every convolution, stride and pooling is masked per row.

Every returned module has ``input_size``, ``embd_dim`` and ``min_frames`` (the fewest valid
frames a row may have; shorter rows raise ValueError in ``forward``).

No I/O here: reading ``model.pth`` / ``config.yml`` is the caller's job.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ...errors import CheckpointMismatchError, UsageError
from .campplus import CAMPPlus
from .ecapa_tdnn import EcapaTdnn
from .eres2net import ERes2Net, ERes2NetV2
from .pooling import POOLING_TYPES
from .res2net import Res2Net
from .resnet_se import ResNetSE
from .tdnn import TDNN

__all__ = [
    "BACKBONES",
    "POOLING_TYPES",
    "backbone_state_dict",
    "build_backbone",
    "load_backbone_state",
]

_CLASSES: dict[str, type[nn.Module]] = {
    "CAMPPlus": CAMPPlus,
    "EcapaTdnn": EcapaTdnn,
    "ERes2Net": ERes2Net,
    "ERes2NetV2": ERes2NetV2,
    "Res2Net": Res2Net,
    "ResNetSE": ResNetSE,
    "TDNN": TDNN,
}
BACKBONES: tuple[str, ...] = tuple(_CLASSES)
"""mvector's ``model_conf.model`` names this package builds."""

# mvector arguments that take a Python class (never expressible in a yml); only their
# defaults are supported.
_CLASS_ARGS = {"activation", "block", "block_fuse"}
_WRAPPERS = ("module.", "_orig_mod.")
_SHOW = 8


def _accepted_args(cls: type[nn.Module]) -> list[str]:
    params = inspect.signature(cls.__init__).parameters
    return [p for p in params if p not in ("self", "input_size")]


def build_backbone(
    model_name: str, input_size: int, model_args: Mapping[str, Any] | None = None
) -> nn.Module:
    """mvector's ``model_name`` backbone on ``input_size`` features with ``model_args``.

    Raises UsageError naming the model and the problem for an unknown name, an argument mvector's
    constructor does not take, or a network mvector itself could not run (e.g. ResNetSE on
    features whose size is not a multiple of 8).

    >>> build_backbone("TDNN", 80, {"channels": 64, "embd_dim": 32}).embd_dim
    32
    """
    cls = _CLASSES.get(model_name)
    if cls is None:
        raise UsageError(f"unknown mvector model {model_name!r}; known: {', '.join(BACKBONES)}")
    args = dict(model_args or {})
    accepted = _accepted_args(cls)
    unknown = [k for k in args if k not in accepted]
    if unknown:
        names = ", ".join(map(repr, unknown))
        why = (
            " (a Python class in mvector: only its default is supported)"
            if set(unknown) & _CLASS_ARGS
            else ""
        )
        raise UsageError(
            f"mvector {model_name}: unsupported model_args {names}{why}; "
            f"accepted: {', '.join(accepted)}"
        )
    if not isinstance(input_size, int) or isinstance(input_size, bool) or input_size < 1:
        raise UsageError(
            f"mvector {model_name}: input_size must be a positive int, got {input_size!r}"
        )
    pooling = args.get("pooling_type")
    if pooling is not None and pooling not in POOLING_TYPES:
        raise UsageError(
            f"mvector {model_name}: pooling_type must be one of {', '.join(POOLING_TYPES)}, "
            f"got {pooling!r}"
        )
    try:
        return cls(input_size, **args)
    except (ValueError, TypeError, IndexError, ZeroDivisionError, RuntimeError) as exc:
        raise UsageError(
            f"mvector {model_name} with input_size {input_size} and model_args {args}: {exc}"
        ) from None


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPERS:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def backbone_state_dict(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The backbone's tensors from a trainer's ``model.pth`` state dict.

    mvector saves ``nn.Sequential(backbone, classifier).state_dict()``: backbone keys ``0.*``,
    classifier keys ``1.*``. ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes are
    stripped wherever they sit before or after the ``0.``; ``1.*`` keys are dropped; the ``0.``
    is removed. A dict without ``0.*`` keys is taken as a bare backbone state dict.
    """
    if not isinstance(state, Mapping):
        raise CheckpointMismatchError(
            f"expected a state dict (mapping of tensors), got {type(state).__name__}"
        )
    tensors = {_strip_wrappers(str(k)): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not any(k.startswith("0.") for k in tensors):
        return tensors
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key.startswith("1."):
            continue
        out[_strip_wrappers(key[2:]) if key.startswith("0.") else key] = value
    return out


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    return shown + (f", ... ({len(keys) - _SHOW} more)" if len(keys) > _SHOW else "")


def load_backbone_state(
    model: nn.Module, state: Mapping[str, Any], source: str = "model.pth"
) -> None:
    """Load a ``model.pth`` state dict into ``model`` with ``strict=True``.

    Raises CheckpointMismatchError naming ``source``, the model, and the missing, unexpected and
    shape-mismatched keys (the usual cause: a config.yml whose model, model_args or feature
    settings differ from the training run's).
    """
    weights = backbone_state_dict(state)
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    shapes = [
        f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in weights and tuple(weights[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
    if shapes:
        problems.append(
            f"{len(shapes)} keys of another shape (checkpoint vs model): {_listing(shapes)}"
        )
    name = type(model).__name__
    size = getattr(model, "input_size", "?")
    if problems:
        raise CheckpointMismatchError(
            f"{source}: does not fit mvector {name} (input_size {size}): "
            + "; ".join(problems)
            + ". Check that the config.yml (model, model_args, feature method and its "
            "arguments) is the one this checkpoint was trained with."
        )
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:  # dtype or other problems the key/shape checks do not catch
        first = str(exc).strip().splitlines()[0][:300]
        raise CheckpointMismatchError(
            f"{source}: cannot load into mvector {name}: {first}"
        ) from None
