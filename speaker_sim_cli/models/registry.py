"""The model zoo: one table, the single source of truth for ids, archs and checkpoints.

Every ModelScope id that 3D-Speaker's ``speakerlab/bin/infer_sv.py`` serves, with the revision
3D-Speaker pins, the checkpoint's file name, the architecture and its arguments, and the front
end. ``damo/...`` ids are accepted for ``iic/...``; each model also has a short alias.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..audio.frontend import FbankConfig, Frontend, WaveformConfig
from ..errors import UsageError

DEFAULT_MODEL = "iic/speech_campplus_sv_zh_en_16k-common_advanced"


@dataclass(frozen=True)
class Arch:
    """An architecture: the class that builds it and its constructor arguments."""

    name: str
    module: str
    cls: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: The folder under ``shared/fixtures/`` holding ``<name>.schema.json`` (and ``.npz``): the
    #: 3D-Speaker archs are in ``arch/``; other families in their own folder.
    fixture: str = "arch"
    #: ``module:function`` loading a checkpoint file into the built network, ``(model, path,
    #: spec)``; None: a strict load of a plain state dict (:func:`.weights.load_checkpoint_into`).
    loader: str | None = None

    def build(self) -> Any:
        mod = importlib.import_module(f"speaker_sim_cli.models.{self.module}")
        return getattr(mod, self.cls)(**self.kwargs)


ARCHS: dict[str, Arch] = {
    a.name: a
    for a in [
        Arch("campplus192", "campplus", "CAMPPlus", {"feat_dim": 80, "embedding_size": 192}),
        Arch("campplus512", "campplus", "CAMPPlus", {"feat_dim": 80, "embedding_size": 512}),
        Arch(
            "eres2net_vox",
            "eres2net",
            "ERes2Net",
            {"feat_dim": 80, "embedding_size": 192, "m_channels": 32},
        ),
        Arch(
            "eres2net_base512",
            "eres2net",
            "ERes2Net",
            {"feat_dim": 80, "embedding_size": 512, "m_channels": 32},
        ),
        Arch(
            "eres2net_large512",
            "eres2net",
            "ERes2Net",
            {"feat_dim": 80, "embedding_size": 512, "m_channels": 64},
        ),
        Arch(
            "eres2net_huge192", "eres2net", "ERes2NetHuge", {"feat_dim": 80, "embedding_size": 192}
        ),
        Arch(
            "eres2netv2_192",
            "eres2netv2",
            "ERes2NetV2",
            {"feat_dim": 80, "embedding_size": 192, "baseWidth": 26, "scale": 2, "expansion": 2},
        ),
        Arch(
            "eres2netv2_w24s4ep4",
            "eres2netv2",
            "ERes2NetV2",
            {"feat_dim": 80, "embedding_size": 192, "baseWidth": 24, "scale": 4, "expansion": 4},
        ),
        Arch(
            "ecapa1024",
            "ecapa",
            "ECAPATDNN",
            {"input_size": 80, "lin_neurons": 192, "channels": [1024, 1024, 1024, 1024, 3072]},
        ),
        Arch(
            "funasr_xvector",
            "funasr_xvector",
            "FunASRXVector",
            {"feat_dim": 80, "embedding_size": 256},
            fixture="funasr",
        ),
        # WavLM-Large + ECAPA_TDNN_SMALL (UniSpeech), the TTS "SIM" model (wavlm_ecapa.py).
        Arch("wavlm_large_ecapa", "wavlm_ecapa", "WavLMECAPA", {}, fixture="wavlm_sim"),
    ]
}

#: FunASR's WavFrontend (specs/funasr_xvector.md): int16-range input, no CMN, dither 0.
FUNASR_FBANK = FbankConfig(mean_norm=False, input_scale=32768.0)


@dataclass(frozen=True)
class ModelSpec:
    """One row of the zoo."""

    id: str
    alias: str
    revision: str
    checkpoint: str
    arch: str
    dim: int
    trained_on: str
    frontend: Frontend = field(default_factory=FbankConfig)
    #: The published decision threshold on raw cosine (model card), None where none is published.
    threshold: float | None = None
    #: Other file names the checkpoint may have in a model folder, tried after ``checkpoint``.
    alt_checkpoints: tuple[str, ...] = ()
    #: The architecture when it is not a row of ARCHS: built from a user's training config
    #: (mvector); its kwargs are part of the cache key.
    arch_def: Arch | None = None

    @property
    def name(self) -> str:
        """The folder name the hub uses (the part after ``iic/``)."""
        return self.id.split("/", 1)[1]

    @property
    def sample_rate(self) -> int:
        return self.frontend.sample_rate

    @property
    def architecture(self) -> Arch:
        return self.arch_def if self.arch_def is not None else ARCHS[self.arch]

    def build(self) -> Any:
        return self.architecture.build()


MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(DEFAULT_MODEL, "campplus-zh-en", "v1.0.0", "campplus_cn_en_common.pt",
              "campplus192", 192, "large zh+en corpus"),
    ModelSpec("iic/speech_campplus_sv_zh-cn_16k-common", "campplus-zh", "v1.0.0",
              "campplus_cn_common.bin", "campplus192", 192, "200k zh speakers",
              threshold=0.31),
    ModelSpec("iic/speech_campplus_sv_en_voxceleb_16k", "campplus-vox", "v1.0.2",
              "campplus_voxceleb.bin", "campplus512", 512, "VoxCeleb"),
    ModelSpec("iic/speech_eres2net_sv_en_voxceleb_16k", "eres2net-vox", "v1.0.2",
              "pretrained_eres2net.ckpt", "eres2net_vox", 192, "VoxCeleb"),
    ModelSpec("iic/speech_eres2net_sv_zh-cn_16k-common", "eres2net-zh", "v1.0.5",
              "pretrained_eres2net_aug.ckpt", "eres2net_huge192", 192, "200k zh speakers"),
    ModelSpec("iic/speech_eres2net_base_200k_sv_zh-cn_16k-common", "eres2net-base-zh", "v1.0.0",
              "pretrained_eres2net.pt", "eres2net_base512", 512, "200k zh speakers"),
    ModelSpec("iic/speech_eres2net_base_sv_zh-cn_3dspeaker_16k", "eres2net-base-3dspeaker",
              "v1.0.1", "eres2net_base_model.ckpt", "eres2net_base512", 512, "3D-Speaker",
              threshold=0.249),
    ModelSpec("iic/speech_eres2net_large_sv_zh-cn_3dspeaker_16k", "eres2net-large-3dspeaker",
              "v1.0.0", "eres2net_large_model.ckpt", "eres2net_large512", 512, "3D-Speaker"),
    ModelSpec("iic/speech_eres2netv2_sv_zh-cn_16k-common", "eres2netv2-zh", "v1.0.1",
              "pretrained_eres2netv2.ckpt", "eres2netv2_192", 192, "200k zh speakers"),
    ModelSpec("iic/speech_eres2netv2w24s4ep4_sv_zh-cn_16k-common", "eres2netv2-w24s4ep4-zh",
              "v1.0.1", "pretrained_eres2netv2w24s4ep4.ckpt", "eres2netv2_w24s4ep4", 192,
              "200k zh speakers"),
    ModelSpec("iic/speech_ecapa-tdnn_sv_zh-cn_cnceleb_16k", "ecapa-cnceleb", "v1.0.0",
              "ecapa-tdnn.ckpt", "ecapa1024", 192, "CN-Celeb"),
    ModelSpec("iic/speech_ecapa-tdnn_sv_zh-cn_3dspeaker_16k", "ecapa-3dspeaker", "v1.0.0",
              "ecapa-tdnn.ckpt", "ecapa1024", 192, "3D-Speaker"),
    ModelSpec("iic/speech_ecapa-tdnn_sv_en_voxceleb_16k", "ecapa-vox", "v1.0.1",
              "ecapa_tdnn.bin", "ecapa1024", 192, "VoxCeleb"),
    ModelSpec("iic/speech_xvector_sv-zh-cn-cnceleb-16k-spk3465-pytorch", "xvector-cnceleb",
              "master", "sv.pb", "funasr_xvector", 256, "CN-Celeb + AliMeeting (FunASR)",
              frontend=FUNASR_FBANK, threshold=0.9465, alt_checkpoints=("sv.pth",)),
    # The SIM of seed-tts-eval / UltraEval "Simo" / F5-TTS / CosyVoice papers. Not on a hub
    # (revision ""): UniSpeech's README links wavlm_large_finetune.pth; put it in
    # pretrained/wavlm_large_finetune/.
    ModelSpec("microsoft/wavlm_large_finetune", "wavlm-ecapa-sim", "",
              "wavlm_large_finetune.pth", "wavlm_large_ecapa", 256,
              "VoxCeleb2 (UniSpeech WavLM-Large + ECAPA-TDNN)",
              # seed-tts-eval resamples with torchaudio's default Resample (audio/sinc.py).
              frontend=WaveformConfig(resampler="sinc_hann")),
)  # fmt: skip

_BY_KEY: dict[str, ModelSpec] = {}
for _m in MODELS:
    _BY_KEY[_m.id.lower()] = _m
    _BY_KEY[_m.alias.lower()] = _m
    _BY_KEY["damo/" + _m.name.lower()] = _m
    _BY_KEY[_m.name.lower()] = _m


def get_model(key: str) -> ModelSpec:
    """Look a model up by ModelScope id (``iic/`` or ``damo/``), folder name or alias."""
    spec = _BY_KEY.get(key.strip().lower())
    if spec is None:
        known = ", ".join(m.alias for m in MODELS)
        raise UsageError(
            f"unknown model {key!r}: use a ModelScope id or an alias ({known}), or "
            f"{' / '.join(FAMILIES)} with --model-dir; `speaker-sim models` lists them"
        )
    return spec


#: Families whose model is described by the user's own files rather than a row of the zoo:
#: ``--model KEY --model-dir DIR [--model-config FILE]`` -> ``module:function(model_dir,
#: model_config) -> ModelSpec``.
FAMILIES: dict[str, str] = {
    "mvector": "speaker_sim_cli.models.mvector_config:mvector_spec",
}


def resolve_model(
    key: str, model_dir: str | Path | None = None, model_config: str | Path | None = None
) -> ModelSpec:
    """The ModelSpec for ``--model KEY`` (a zoo id or alias, or a family of :data:`FAMILIES`
    built from ``model_dir`` and ``model_config``)."""
    family = FAMILIES.get(key.strip().lower())
    if family is not None:
        module, _, fn = family.partition(":")
        built: ModelSpec = getattr(importlib.import_module(module), fn)(model_dir, model_config)
        return built
    if model_config is not None:
        raise UsageError(
            f"--model-config is read for {' / '.join(FAMILIES)} checkpoints, not for {key!r} "
            "(a zoo model's front end and architecture are fixed)"
        )
    return get_model(key)
