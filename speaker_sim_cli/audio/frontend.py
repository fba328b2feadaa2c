"""Front ends as a family of frozen, torch-free configs (the registry and ``eval`` need no torch).

Every member says how a decoded recording becomes the model's input: the sample rate, which
channel (``"first"`` as 3D-Speaker's infer_sv.py, or ``"mean"`` as mvector), an optional loudness
normalisation of the waveform, and the features. Each config is part of every embedding's cache
key (:meth:`Frontend.to_dict`); the torch computation it names lives in ``compute`` (a
``module:function`` path, imported only when features are computed).

Members: :class:`FbankConfig` (Kaldi fbank: 3D-Speaker, FunASR, mvector's Fbank) here; other
members (mvector's MelSpectrogram / Spectrogram / MFCC, raw waveforms for SSL models) subclass
:class:`Frontend` in the same way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

CHANNELS = ("first", "mean")


@dataclass(frozen=True)
class Frontend:
    """What every front end shares. Subclasses add their feature settings."""

    sample_rate: int = 16000
    channel: str = "first"  # "first" (channel 0) or "mean" (average of the channels)
    loudness_db: float | None = None  # normalise the waveform to this loudness (mvector: -20)

    kind: ClassVar[str] = "frontend"
    #: ``module:function`` computing ``(waves (B, N), lengths (B,), cfg) -> (feats, n_frames)``.
    compute: ClassVar[str] = ""
    #: Fields left out of :meth:`to_dict` while at their default, so adding an option to the
    #: family does not change the cache keys of models that do not use it.
    _quiet: ClassVar[frozenset[str]] = frozenset({"channel", "loudness_db"})

    def __post_init__(self) -> None:
        if self.channel not in CHANNELS:
            raise ValueError(f"channel must be one of {CHANNELS}, got {self.channel!r}")

    # Frames (model time steps) produced from ``num_samples``; int or torch tensor in, same out.
    def num_frames(self, num_samples: Any) -> Any:
        return num_samples

    def budget_frames(self, fbank_frames: int) -> int:
        """The engine's batch budget, written in 10 ms fbank frames, in this front end's
        frames (the same for the spectral members; samples for :class:`WaveformConfig`)."""
        return int(fbank_frames)

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        for f in fields(self):
            if f.name in self._quiet and getattr(self, f.name) == f.default:
                del out[f.name]
        if self.kind != "fbank":
            out["kind"] = self.kind
        return out


@dataclass(frozen=True)
class FbankConfig(Frontend):
    """Kaldi fbank (``compute-fbank-feats`` / ``torchaudio.compliance.kaldi.fbank``) settings."""

    num_mel_bins: int = 80
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    preemphasis: float = 0.97
    low_freq: float = 20.0
    high_freq: float = 0.0  # <= 0: offset from Nyquist, as in Kaldi
    window: str = "povey"
    mean_norm: bool = True
    input_scale: float = 1.0  # 32768.0: waveform in int16 range before fbank (FunASR, mvector)
    dither: float = 0.0  # always 0 here: dither makes embeddings random

    kind: ClassVar[str] = "fbank"
    compute: ClassVar[str] = "speaker_sim_cli.audio.features:fbank_features"
    _quiet: ClassVar[frozenset[str]] = frozenset(
        {"channel", "loudness_db", "input_scale", "dither"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dither != 0.0:
            raise ValueError("dither must be 0: it would make embeddings random")

    @property
    def window_size(self) -> int:
        return int(self.sample_rate * self.frame_length_ms * 0.001)

    @property
    def window_shift(self) -> int:
        return int(self.sample_rate * self.frame_shift_ms * 0.001)

    @property
    def n_fft(self) -> int:
        return 1 << (self.window_size - 1).bit_length()

    def num_frames(self, num_samples: Any) -> Any:
        """Frames Kaldi produces with snip edges (0 when too short)."""
        if isinstance(num_samples, int):
            if num_samples < self.window_size:
                return 0
            return 1 + (num_samples - self.window_size) // self.window_shift
        n = (num_samples - self.window_size) // self.window_shift + 1
        return n.clamp_min(0)


@dataclass(frozen=True)
class WaveformConfig(Frontend):
    """The raw waveform, for self-supervised models (WavLM): features are (B, N) samples.

    ``normalize``: each row layer-normed over its own valid samples as s3prl does before WavLM
    (``F.layer_norm(wav, wav.shape)``: biased variance, ``eps`` 1e-5, no affine). A frame is a
    sample, so the engine's batch budget (written in 10 ms fbank frames) is scaled by
    :meth:`budget_frames`.
    """

    normalize: bool = True
    eps: float = 1e-5

    kind: ClassVar[str] = "waveform"
    compute: ClassVar[str] = "speaker_sim_cli.audio.waveform:waveform_features"

    def budget_frames(self, fbank_frames: int) -> int:
        """A budget of ``fbank_frames`` 10 ms frames, in samples."""
        return int(fbank_frames) * self.sample_rate // 100
