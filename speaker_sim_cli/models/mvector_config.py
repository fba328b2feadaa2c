"""mvector checkpoints: what a VoiceprintRecognition-Pytorch user has, as a :class:`ModelSpec`.

An mvector trainer leaves ``models/<Model>_<Feature>/best_model/`` with ``model.pth`` (the
state dict of ``nn.Sequential(backbone, classifier)``) and ``model.state`` (JSON: model name,
feature method, version, EER threshold); the architecture and front-end arguments are only in
the training ``config.yml``. :func:`mvector_spec` reads both (torch-free) and returns a spec
whose front end reproduces mvector's ``predict`` (channel mean, loudness normalisation,
features, mean over time) and whose network is built by :mod:`speaker_sim_cli.models.mvector`.

Without a config, an Fbank checkpoint is read with the configuration mvector ships for its
model (``configs/<name>.yml``: 80-bin fbank, -20 dB, the shipped ``model_args``); other
feature methods need the yml, since their arguments cannot be inferred.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..audio.frontend import (
    Frontend,
    MelSpectrogramConfig,
    MFCCConfig,
    MvectorFbankConfig,
    SpectrogramConfig,
)
from ..errors import CheckpointMismatchError, UsageError
from .registry import Arch, ModelSpec

__all__ = ["MvectorConfig", "load_checkpoint", "mvector_spec", "read_config", "read_state"]

CHECKPOINT = "model.pth"
STATE = "model.state"

#: Constructor default of ``embd_dim`` per backbone (mvector 1.1.x).
DEFAULT_EMBD = {"CAMPPlus": 512, "EcapaTdnn": 192, "ERes2Net": 192, "ERes2NetV2": 192,
                "Res2Net": 192, "ResNetSE": 192, "TDNN": 192}  # fmt: skip

#: mvector 1.1.x's shipped configs (``mvector/configs/<yml>``): their ``model_args``. All use
#: Fbank ``{sample_frequency: 16000, num_mel_bins: 80}``, 16 kHz, -20 dB. ERes2NetV2 has none.
SHIPPED: dict[str, tuple[str, dict[str, Any]]] = {
    "CAMPPlus": ("cam++.yml", {"embd_dim": 192}),
    "EcapaTdnn": ("ecapa_tdnn.yml",
                  {"embd_dim": 192, "pooling_type": "ASP", "channels": [512, 512, 512, 512, 1536]}),
    "ERes2Net": ("eres2net.yml", {"embd_dim": 192, "m_channels": 32}),
    "ResNetSE": ("resnet_se.yml", {"embd_dim": 192, "pooling_type": "ASP"}),
    "TDNN": ("tdnn.yml", {"embd_dim": 192, "channels": 512, "pooling_type": "ASP"}),
    "Res2Net": ("res2net.yml", {"embd_dim": 192, "pooling_type": "ASP", "m_channels": 32}),
}  # fmt: skip
SHIPPED_FBANK_ARGS: dict[str, Any] = {"sample_frequency": 16000, "num_mel_bins": 80}

FEATURE_METHODS = ("Fbank", "MelSpectrogram", "Spectrogram", "MFCC")

#: What ``speaker-sim models`` says about the family.
FAMILY_WHAT = (
    "VoiceprintRecognition-Pytorch (mvector 1.1) checkpoints: EcapaTdnn, TDNN, Res2Net, "
    "ResNetSE, ERes2Net, ERes2NetV2, CAMPPlus on Fbank, MelSpectrogram, Spectrogram or MFCC; "
    "threshold from model.state"
)
FAMILY_USAGE = (
    "--model mvector --model-dir models/<Model>_<Feature>/best_model/ --model-config "
    "configs/<your training config>.yml (Fbank checkpoints: the yml may be left out)"
)


@dataclass(frozen=True)
class MvectorConfig:
    """What of a training config.yml the predictor uses."""

    model: str
    model_args: dict[str, Any]
    feature_method: str
    method_args: dict[str, Any]
    sample_rate: int = 16000
    loudness_db: float | None = -20.0
    #: Where it came from, for messages: the yml's path, or the shipped yml it stands for.
    source: str = ""


def _get(d: Any, *keys: str, where: str, default: Any = None) -> Any:
    for k in keys:
        if not isinstance(d, Mapping):
            raise UsageError(f"{where}: {'.'.join(keys)}: expected a mapping above {k!r}")
        if k not in d:
            return default
        d = d[k]
    return d


def read_config(path: str | Path) -> MvectorConfig:
    """Read an mvector training ``config.yml``. Raises UsageError naming the file and key."""
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"--model-config {p}: file not found")
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--model-config {p}: not a readable YAML file ({first})") from None
    where = str(p)
    if not isinstance(doc, Mapping):
        raise UsageError(f"{where}: not an mvector config (expected a mapping at the top)")
    model = _get(doc, "model_conf", "model", where=where)
    if model is None:
        raise UsageError(f"{where}: no model_conf.model: not an mvector training config")
    if _get(doc, "preprocess_conf", "use_hf_model", where=where, default=False):
        raise UsageError(
            f"{where}: preprocess_conf.use_hf_model is true: Hugging Face front ends are not "
            "supported (only Fbank, MelSpectrogram, Spectrogram and MFCC)"
        )
    # mvector's own defaults where the yml is silent (AudioFeaturizer, build_model).
    feature = _get(doc, "preprocess_conf", "feature_method", where=where,
                   default="MelSpectrogram")  # fmt: skip
    method_args = _get(doc, "preprocess_conf", "method_args", where=where) or {}
    model_args = _get(doc, "model_conf", "model_args", where=where) or {}
    for name, val in (("preprocess_conf.method_args", method_args),
                      ("model_conf.model_args", model_args)):  # fmt: skip
        if not isinstance(val, Mapping):
            raise UsageError(f"{where}: {name} must be a mapping, got {type(val).__name__}")
    rate = _get(doc, "dataset_conf", "dataset", "sample_rate", where=where, default=16000)
    use_db = _get(doc, "dataset_conf", "dataset", "use_dB_normalization", where=where,
                  default=True)  # fmt: skip
    target = _get(doc, "dataset_conf", "dataset", "target_dB", where=where, default=-20)
    if not isinstance(rate, int) or rate <= 0:
        raise UsageError(f"{where}: dataset_conf.dataset.sample_rate must be a positive int")
    return MvectorConfig(
        str(model), dict(model_args), str(feature), dict(method_args), rate,
        float(target) if use_db else None, where,
    )  # fmt: skip


def read_state(model_dir: Path) -> dict[str, Any] | None:
    """``model.state`` (JSON) of a trainer folder, or None when there is none."""
    p = model_dir / STATE
    if not p.is_file():
        return None
    try:
        state = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{p}: not mvector's model.state JSON ({exc})") from None
    if not isinstance(state, dict):
        raise UsageError(f"{p}: not mvector's model.state JSON (expected an object)")
    return state


def shipped_config(model: str, feature_method: str, state_path: Path) -> MvectorConfig:
    """The config mvector ships for ``model``, for an Fbank checkpoint without its yml."""
    need = (
        f"pass the training config with --model-config (the config.yml the model was trained "
        f"with; {STATE} names only the model and feature method)"
    )
    if feature_method != "Fbank":
        raise UsageError(
            f"{state_path} says feature_method {feature_method}: its arguments cannot be "
            f"inferred; {need}"
        )
    if model not in SHIPPED:
        raise UsageError(
            f"{state_path} says model {model}, for which mvector ships no config; {need}"
        )
    yml, args = SHIPPED[model]
    return MvectorConfig(model, dict(args), "Fbank", dict(SHIPPED_FBANK_ARGS), 16000, -20.0,
                         f"mvector's shipped {yml} (no --model-config)")  # fmt: skip


# -- front ends --------------------------------------------------------------------------------
# Kaldi fbank options (torchaudio.compliance.kaldi.fbank) -> MvectorFbankConfig field, and
# those only supported at their default.
_FBANK_MAP = {
    "num_mel_bins": "num_mel_bins", "frame_length": "frame_length_ms",
    "frame_shift": "frame_shift_ms", "preemphasis_coefficient": "preemphasis",
    "low_freq": "low_freq", "high_freq": "high_freq", "window_type": "window",
}  # fmt: skip
_FBANK_FIXED: dict[str, Any] = {
    "dither": 0.0, "snip_edges": True, "remove_dc_offset": True, "round_to_power_of_two": True,
    "use_energy": False, "use_log_fbank": True, "use_power": True, "subtract_mean": False,
    "htk_compat": False, "raw_energy": True, "vtln_warp": 1.0, "min_duration": 0.0,
    "channel": -1,
}  # fmt: skip
_FBANK_IGNORED = {"energy_floor", "blackman_coeff", "vtln_low", "vtln_high"}
_SPEC_ARGS = {"n_fft", "win_length", "hop_length", "pad", "power", "normalized", "center",
              "pad_mode"}  # fmt: skip
_MEL_ARGS = _SPEC_ARGS | {"sample_rate", "f_min", "f_max", "n_mels", "norm", "mel_scale"}


def _check_rate(args: dict[str, Any], key: str, rate: int, where: str) -> None:
    if key in args and args[key] != rate:
        raise UsageError(
            f"{where}: method_args {key}={args[key]} differs from the audio rate "
            f"dataset_conf.dataset.sample_rate={rate} (not supported)"
        )


def _spec_kwargs(args: Mapping[str, Any], allowed: set[str], what: str, where: str
                 ) -> dict[str, Any]:  # fmt: skip
    out = dict(args)
    for k in ("onesided", "return_complex"):
        if out.pop(k, True) not in (True, None):
            raise UsageError(f"{where}: {what} {k}=False is not supported")
    if out.get("normalized") == "window":
        out["normalized"] = True
    elif out.get("normalized") == "frame_length":
        raise UsageError(f"{where}: {what} normalized='frame_length' is not supported")
    if out.get("power", 2.0) is None:
        raise UsageError(f"{where}: {what} power=None (a complex spectrogram) is not a feature")
    unknown = sorted(set(out) - allowed)
    if unknown:
        raise UsageError(
            f"{where}: {what} does not take (or speaker-sim does not support) "
            f"{', '.join(unknown)}; accepted: {', '.join(sorted(allowed))}"
        )
    out.pop("sample_rate", None)
    return out


def frontend_for(cfg: MvectorConfig) -> Frontend:
    """The front end of mvector's predictor for ``cfg``. Raises UsageError for arguments
    mvector would reject or speaker-sim does not reproduce."""
    where, args, rate = cfg.source, dict(cfg.method_args), cfg.sample_rate
    common: dict[str, Any] = {
        "sample_rate": rate, "channel": "mean", "loudness_db": cfg.loudness_db,
        "resampler": "kaiser_best",
    }  # fmt: skip
    try:
        if cfg.feature_method == "Fbank":
            _check_rate(args, "sample_frequency", rate, where)
            args.pop("sample_frequency", None)
            kw: dict[str, Any] = {"num_mel_bins": 23}  # Kaldi's default, as mvector's feature_dim
            for k, v in args.items():
                if k in _FBANK_MAP:
                    kw[_FBANK_MAP[k]] = v
                elif k in _FBANK_FIXED:
                    if v != _FBANK_FIXED[k]:
                        raise UsageError(f"{where}: Fbank {k}={v!r} is not supported "
                                         f"(only {_FBANK_FIXED[k]!r})")  # fmt: skip
                elif k not in _FBANK_IGNORED:
                    raise UsageError(f"{where}: Fbank (Kaldi fbank) has no option {k!r}")
            return MvectorFbankConfig(**common, **kw)
        if cfg.feature_method in ("MelSpectrogram", "Spectrogram"):
            mel = cfg.feature_method == "MelSpectrogram"
            _check_rate(args, "sample_rate", rate, where)
            kw = _spec_kwargs(args, _MEL_ARGS if mel else _SPEC_ARGS, cfg.feature_method, where)
            return (MelSpectrogramConfig if mel else SpectrogramConfig)(**common, **kw)
        if cfg.feature_method == "MFCC":
            _check_rate(args, "sample_rate", rate, where)
            melkw = args.pop("melkwargs", None) or {}
            if not isinstance(melkw, Mapping):
                raise UsageError(f"{where}: MFCC melkwargs must be a mapping")
            _check_rate(dict(melkw), "sample_rate", rate, where)
            kw = _spec_kwargs(melkw, _MEL_ARGS, "MFCC melkwargs", where)
            for k, v in args.items():
                if k not in ("sample_rate", "n_mfcc", "dct_type", "norm", "log_mels"):
                    raise UsageError(f"{where}: MFCC has no option {k!r}")
                if k != "sample_rate":
                    kw["dct_norm" if k == "norm" else k] = v
            return MFCCConfig(**common, **kw)
    except (TypeError, ValueError) as exc:
        raise UsageError(
            f"{where}: {cfg.feature_method} method_args {cfg.method_args}: {exc}"
        ) from None
    raise UsageError(
        f"{where}: unknown feature_method {cfg.feature_method!r} "
        f"(mvector's are {', '.join(FEATURE_METHODS)})"
    )


def feature_dim(frontend: Frontend) -> int:
    """The backbone's ``input_size``: the number of features per frame."""
    if isinstance(frontend, MvectorFbankConfig):
        return frontend.num_mel_bins
    return int(frontend.num_features)  # type: ignore[attr-defined]


# -- the spec ----------------------------------------------------------------------------------
def _model_dir(model_dir: str | Path | None) -> Path:
    if model_dir is None:
        raise UsageError(
            "--model mvector needs --model-dir: the trainer's folder "
            "models/<Model>_<Feature>/best_model/ (model.pth, model.state)"
        )
    d = Path(model_dir).expanduser()
    if d.is_file() and d.name == CHECKPOINT:
        d = d.parent
    if not d.is_dir():
        raise UsageError(f"--model-dir {d}: not a folder")
    if not (d / CHECKPOINT).is_file():
        hint = ""
        if (d / "best_model" / CHECKPOINT).is_file():
            hint = f" (did you mean {d / 'best_model'}?)"
        raise UsageError(
            f"--model-dir {d}: no {CHECKPOINT} here{hint}; point it at mvector's "
            "models/<Model>_<Feature>/best_model/"
        )
    return d


def mvector_spec(model_dir: str | Path | None, model_config: str | Path | None = None) -> ModelSpec:
    """The ModelSpec of an mvector trainer folder (``best_model/``) and its training config.

    ``model.state`` gives the decision threshold (its EER threshold) and, when there is no
    config, the model name and feature method. A config that names another model or feature
    method than ``model.state`` is refused, naming both files.
    """
    d = _model_dir(model_dir)
    state = read_state(d)
    state_path = d / STATE
    if model_config is not None:
        cfg = read_config(model_config)
        if state is not None:
            for key, mine in (("model_conf.model", cfg.model),
                              ("feature_method", cfg.feature_method)):  # fmt: skip
                theirs = state.get(key)
                if theirs is not None and str(theirs) != mine:
                    raise UsageError(
                        f"{cfg.source} says {key} {mine} but {state_path} says {theirs}: "
                        "this config is not the one the checkpoint was trained with"
                    )
    elif state is None:
        raise UsageError(
            f"{d}: no {STATE} and no --model-config: pass the training config.yml with "
            "--model-config"
        )
    else:
        model, feature = state.get("model_conf.model"), state.get("feature_method")
        if not model or not feature:
            raise UsageError(f"{state_path} names no model_conf.model / feature_method; "
                             "pass the training config.yml with --model-config")  # fmt: skip
        cfg = shipped_config(str(model), str(feature), state_path)
    frontend = frontend_for(cfg)
    if cfg.model not in DEFAULT_EMBD:
        raise UsageError(
            f"{cfg.source}: unknown mvector model {cfg.model!r} (known: {', '.join(DEFAULT_EMBD)})"
        )
    dim = cfg.model_args.get("embd_dim", DEFAULT_EMBD[cfg.model])
    if not isinstance(dim, int) or dim < 1:
        raise UsageError(f"{cfg.source}: model_args.embd_dim must be a positive int, got {dim!r}")
    threshold = (state or {}).get("threshold")
    version = str((state or {}).get("version", "?"))
    arch = Arch(
        f"mvector-{cfg.model}",
        "mvector",
        "build_backbone",
        {"model_name": cfg.model, "input_size": feature_dim(frontend),
         "model_args": cfg.model_args},
        fixture="mvector",
        loader="speaker_sim_cli.models.mvector_config:load_checkpoint",
    )  # fmt: skip
    return ModelSpec(
        id=f"mvector/{cfg.model}_{cfg.feature_method}",
        alias="mvector",
        revision=version,
        checkpoint=CHECKPOINT,
        arch=arch.name,
        dim=dim,
        trained_on=f"mvector {version} checkpoint; config: {cfg.source}",
        frontend=frontend,
        threshold=float(threshold) if isinstance(threshold, int | float) else None,
        arch_def=arch,
    )


def load_checkpoint(model: Any, path: Path, spec: ModelSpec) -> None:
    """:attr:`Arch.loader` of mvector specs: the backbone part of ``model.pth`` (``0.*``, with
    ``module.`` / ``_orig_mod.`` stripped, the classifier ``1.*`` dropped), strict."""
    import torch

    from .mvector import load_backbone_state

    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CheckpointMismatchError(
            f"{path}: cannot read as a torch checkpoint ({first})"
        ) from None
    config = spec.trained_on.split("config: ", 1)[-1]
    load_backbone_state(model, raw, source=f"{path} (config: {config})")
