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
RESAMPLERS = ("soxr", "kaiser_best", "sinc_hann")


@dataclass(frozen=True)
class Frontend:
    """What every front end shares. Subclasses add their feature settings."""

    sample_rate: int = 16000
    channel: str = "first"  # "first" (channel 0) or "mean" (average of the channels)
    loudness_db: float | None = None  # normalise the waveform to this loudness (mvector: -20)
    #: How other rates are brought to ``sample_rate``: ``soxr`` (HQ), ``kaiser_best``
    #: (resampy's filter, which mvector reads audio with; audio/kaiser.py) or ``sinc_hann``
    #: (torchaudio's default Resample, which seed-tts-eval feeds the SIM model; audio/sinc.py).
    resampler: str = "soxr"

    kind: ClassVar[str] = "frontend"
    #: ``module:function`` computing ``(waves (B, N), lengths (B,), cfg) -> (feats, n_frames)``.
    compute: ClassVar[str] = ""
    #: Fields left out of :meth:`to_dict` while at their default, so adding an option to the
    #: family does not change the cache keys of models that do not use it.
    _quiet: ClassVar[frozenset[str]] = frozenset({"channel", "loudness_db", "resampler"})

    def __post_init__(self) -> None:
        if self.channel not in CHANNELS:
            raise ValueError(f"channel must be one of {CHANNELS}, got {self.channel!r}")
        if self.resampler not in RESAMPLERS:
            raise ValueError(f"resampler must be one of {RESAMPLERS}, got {self.resampler!r}")

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
            quiet = self._quiet | Frontend._quiet  # the base's quiet fields in every member
            if f.name in quiet and getattr(self, f.name) == f.default:
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
class MvectorFbankConfig(FbankConfig):
    """mvector's ``Fbank``: torchaudio's Kaldi fbank arithmetic (float32 window and filters),
    stacked time-contiguous, then the time mean subtracted on that layout (bit-exact with
    mvector; :class:`FbankConfig`'s float64 filters differ by up to ~1e-3 in the log domain)."""

    kind: ClassVar[str] = "mvector_fbank"
    compute: ClassVar[str] = "speaker_sim_cli.audio.spectral:mvector_fbank_features"


@dataclass(frozen=True)
class SpectrogramConfig(Frontend):
    """``torchaudio.transforms.Spectrogram`` (power, no log), time mean subtracted (mvector).

    Field names are torchaudio's, so an mvector ``method_args`` maps onto them one to one.
    """

    n_fft: int = 400
    win_length: int | None = None  # None: n_fft
    hop_length: int | None = None  # None: win_length // 2
    pad: int = 0
    power: float = 2.0
    normalized: bool = False
    center: bool = True
    pad_mode: str = "reflect"
    mean_norm: bool = True

    kind: ClassVar[str] = "spectrogram"
    compute: ClassVar[str] = "speaker_sim_cli.audio.spectral:spectrogram_features"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.win <= self.n_fft or self.hop <= 0:
            raise ValueError(
                f"need 0 < win_length <= n_fft and hop_length > 0 (n_fft={self.n_fft}, "
                f"win_length={self.win}, hop_length={self.hop})"
            )
        if self.power is None or self.power <= 0:
            raise ValueError(f"power must be > 0, got {self.power}")
        if self.pad_mode not in ("reflect", "constant", "replicate", "circular"):
            raise ValueError(f"unknown pad_mode {self.pad_mode!r}")

    @property
    def win(self) -> int:
        return self.win_length if self.win_length is not None else self.n_fft

    @property
    def hop(self) -> int:
        return self.hop_length if self.hop_length is not None else self.win // 2

    @property
    def num_features(self) -> int:
        return self.n_fft // 2 + 1

    def budget_frames(self, fbank_frames: int) -> int:
        """A budget of ``fbank_frames`` 10 ms frames in this front end's frames (hop samples),
        so a batch holds about as much audio as a fbank batch."""
        return max(1, int(fbank_frames * self.sample_rate // 100 // self.hop))

    def num_frames(self, num_samples: Any) -> Any:
        """STFT frames: ``1 + (N + 2*pad [+ 2*(n_fft//2) when centred] - n_fft) // hop``."""
        total = num_samples + 2 * self.pad + (2 * (self.n_fft // 2) if self.center else 0)
        n = (total - self.n_fft) // self.hop + 1
        if isinstance(n, int):
            return max(0, n)
        return n.clamp_min(0)


@dataclass(frozen=True)
class MelSpectrogramConfig(SpectrogramConfig):
    """``torchaudio.transforms.MelSpectrogram``: linear mel power (no log; mvector feeds it so),
    time mean subtracted."""

    f_min: float = 0.0
    f_max: float | None = None  # None: sample_rate // 2
    n_mels: int = 128
    norm: str | None = None  # mel filter norm: None or "slaney"
    mel_scale: str = "htk"

    kind: ClassVar[str] = "melspectrogram"
    compute: ClassVar[str] = "speaker_sim_cli.audio.spectral:melspectrogram_features"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mel_scale not in ("htk", "slaney"):
            raise ValueError(f"mel_scale must be 'htk' or 'slaney', got {self.mel_scale!r}")
        if self.norm not in (None, "slaney"):
            raise ValueError(f"norm must be None or 'slaney', got {self.norm!r}")
        if not 0 <= self.f_min < self.mel_f_max:
            raise ValueError(f"need 0 <= f_min < f_max, got {self.f_min}, {self.mel_f_max}")

    @property
    def mel_f_max(self) -> float:
        return float(self.f_max) if self.f_max is not None else float(self.sample_rate // 2)

    @property
    def num_features(self) -> int:
        return self.n_mels


@dataclass(frozen=True)
class MFCCConfig(MelSpectrogramConfig):
    """``torchaudio.transforms.MFCC``: mel power in dB (floored ``top_db`` below the
    recording's peak) or ``log(x + 1e-6)`` with ``log_mels``, DCT-II; time mean subtracted.
    The mel fields are MFCC's ``melkwargs``; ``dct_norm`` is MFCC's ``norm``."""

    n_mfcc: int = 40
    dct_type: int = 2
    dct_norm: str | None = "ortho"
    log_mels: bool = False
    top_db: float | None = 80.0

    kind: ClassVar[str] = "mfcc"
    compute: ClassVar[str] = "speaker_sim_cli.audio.spectral:mfcc_features"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dct_type != 2:
            raise ValueError(f"only DCT type 2 is supported, got {self.dct_type}")
        if self.dct_norm not in (None, "ortho"):
            raise ValueError(f"dct norm must be None or 'ortho', got {self.dct_norm!r}")
        if not 0 < self.n_mfcc <= self.n_mels:
            raise ValueError(f"need 0 < n_mfcc <= n_mels, got {self.n_mfcc}, {self.n_mels}")

    @property
    def num_features(self) -> int:
        return self.n_mfcc


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
