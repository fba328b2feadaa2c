"""FunASR's ResNet34 x-vector (``speech_xvector_sv-zh-cn-cnceleb-16k-spk3465-pytorch``).

The network FunASR 0.x serves for speaker verification, written from its description in
``specs/funasr_xvector.md``: fbank (B, T, 80) -> a 2-D ResNet34 of pre-activation basic layers
with TensorFlow-"same" padding -> 1x1 dense conv -> statistics pooling over time x frequency ->
a dense decoder whose first linear layer's output (256, before ReLU / BN) is the embedding.
Parameter names follow FunASR's state dict (``encoder.*``, ``decoder.*``), so ``sv.pb`` loads
with ``strict=True``.

Exact batching. Rows are zero-padded to T with their valid frame counts in ``lengths``. Before
every 3x3 convolution the input is zeroed past each row's valid length, so the convolution sees
the zeros a lone row's own padding gives. The stride-2 layers pad ``(W % 2, 1, H % 2, 1)``: the
top padding depends on the parity of the row's own length at that stride, so odd rows are
shifted down one frame behind a zero frame before each stride-2 convolution, which then runs
once for the whole batch with top padding 0. The pooling counts only each row's valid frames
(x 10 frequency bins).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointMismatchError

BN_EPS = 1e-3
LAYERS = (3, 4, 6, 3)
FILTERS = (32, 64, 128, 256)
#: The model folder's config file beside ``sv.pb`` (checked, not required).
CONFIG_FILE = "sv.yaml"


def _half(lengths: torch.Tensor) -> torch.Tensor:
    """Lengths after a stride-2 'same' layer: ceil(n / 2)."""
    return torch.div(lengths + 1, 2, rounding_mode="floor")


def _mask_time(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Zero x (B, C, T, F) past each row's valid length along T."""
    if lengths is None:
        return x
    valid = torch.arange(x.shape[2], device=x.device)[None, :] < lengths[:, None]
    return x * valid[:, None, :, None].to(x.dtype)


def _conv_same(conv: nn.Conv2d, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """TensorFlow-'same' 3x3 convolution of x (B, C, T, F), FunASR's padding.

    Stride 1: one frame / bin of zeros on every side. Stride 2: ``(F % 2, 1, T_i % 2, 1)`` with
    T_i each row's own valid length: a row of odd length gets one frame of zeros on top, one
    of even length none. Prepending that frame to the odd rows only (a per-row shift by one
    frame, selected with ``where``) lets one convolution with top padding 0 serve every row:
    the same windows, no extra multiply-adds, no host read and no Python branch on a value, so
    the graph traces with dynamic batch and time axes (ONNX, TorchScript).
    """
    if conv.stride[0] == 1:
        return conv(F.pad(_mask_time(x, lengths), (1, 1, 1, 1)))
    width = x.shape[3]
    t_out = (x.shape[2] + 1) // 2
    if lengths is None:
        return conv(F.pad(x, (width % 2, 1, x.shape[2] % 2, 1)))
    x = _mask_time(x, lengths)
    odd = (lengths % 2 == 1)[:, None, None, None]
    # (B, C, T + 1, F): odd rows shifted down one frame behind a zero frame, even rows as they
    # are with a zero frame after (both zero past the row's own end).
    x = torch.where(odd, F.pad(x, (0, 0, 1, 0)), F.pad(x, (0, 0, 0, 1)))
    return _fit_time(conv(F.pad(x, (width % 2, 1, 0, 1))), t_out)


def _fit_time(y: torch.Tensor, size: int) -> torch.Tensor:
    """Crop or zero-pad y (B, C, T, F) along T to ``size`` frames (only padded frames move)."""
    if y.shape[2] >= size:
        return y[:, :, :size]
    return F.pad(y, (0, 0, 0, size - y.shape[2]))


class BasicLayer(nn.Module):
    """Pre-activation basic layer: ``conv2(pad(relu(bn2(conv1(pad(relu(bn1(x))))))) + sc``."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.bn1 = nn.BatchNorm2d(cin, eps=BN_EPS)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, bias=False)
        self.has_sc = cin != cout or stride != 1
        if self.has_sc:
            self.conv_sc = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
            self.bn_sc = nn.BatchNorm2d(cout, eps=BN_EPS)

    def forward(
        self, x: torch.Tensor, lengths: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        sc = self.bn_sc(self.conv_sc(x)) if self.has_sc else x
        y = _conv_same(self.conv1, F.relu(self.bn1(x)), lengths)
        if self.stride != 1 and lengths is not None:
            lengths = _half(lengths)
        y = _conv_same(self.conv2, F.relu(self.bn2(y)), lengths)
        return y + sc, lengths


class Block(nn.Module):
    def __init__(self, n_layers: int, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        for i in range(n_layers):
            self.add_module(
                f"layer_{i}", BasicLayer(cin if i == 0 else cout, cout, stride if i == 0 else 1)
            )

    def forward(
        self, x: torch.Tensor, lengths: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        for layer in self.children():
            x, lengths = layer(x, lengths)
        return x, lengths


class ResNet34Encoder(nn.Module):
    """(B, T, F) fbank -> (B, 256, T', F / 8) feature maps and their valid lengths T'."""

    def __init__(self, pooling_nodes: int = 256) -> None:
        super().__init__()
        self.pre_conv = nn.Conv2d(1, FILTERS[0], 3, stride=1, padding=1, bias=False)
        self.pre_conv_bn = nn.BatchNorm2d(FILTERS[0], eps=BN_EPS)
        cin = FILTERS[0]
        for b, (n, cout) in enumerate(zip(LAYERS, FILTERS)):
            self.add_module(f"block_{b}", Block(n, cin, cout, 1 if b == 0 else 2))
            cin = cout
        self.resnet0_dense = nn.Conv2d(cin, pooling_nodes, 1)
        self.resnet0_bn = nn.BatchNorm2d(pooling_nodes, eps=BN_EPS)

    def forward(
        self, feats: torch.Tensor, lengths: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = _mask_time(feats.unsqueeze(1), lengths)
        x = F.relu(self.pre_conv_bn(self.pre_conv(x)))
        for b in range(len(LAYERS)):
            x, lengths = getattr(self, f"block_{b}")(x, lengths)
        x = self.resnet0_bn(F.relu(self.resnet0_dense(x)))
        return x, lengths


class DenseDecoder(nn.Module):
    """Statistics -> resnet1_dense (the embedding) -> ... -> output_dense (the classifier)."""

    def __init__(
        self, in_dim: int = 512, hidden: int = 256, last: int = 256, n_classes: int = 3465
    ) -> None:
        super().__init__()
        self.resnet1_dense = nn.Linear(in_dim, hidden)
        self.resnet1_bn = nn.BatchNorm1d(hidden, eps=BN_EPS)
        self.resnet2_dense = nn.Linear(hidden, last)
        self.resnet2_bn = nn.BatchNorm1d(last, eps=BN_EPS)
        self.output_dense = nn.Linear(last, n_classes, bias=False)

    def embedding(self, stats: torch.Tensor) -> torch.Tensor:
        """(B, 512) statistics -> (B, 256) embedding: resnet1_dense's output, before ReLU / BN."""
        return self.resnet1_dense(stats)


def statistics_pooling(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Mean and standard deviation (biased, variance floored at 1e-12) of x (B, C, T, F) over
    each row's valid frames x all bins -> (B, 2C)."""
    if lengths is None:
        mean = x.mean(dim=(2, 3))
        var = (x - mean[:, :, None, None]).square().mean(dim=(2, 3))
    else:
        valid = (torch.arange(x.shape[2], device=x.device)[None, :] < lengths[:, None]).to(x.dtype)
        w = valid[:, None, :, None]
        n = (lengths.clamp_min(1) * x.shape[3]).to(x.dtype)[:, None]
        mean = (x * w).sum(dim=(2, 3)) / n
        var = ((x - mean[:, :, None, None]).square() * w).sum(dim=(2, 3)) / n
    return torch.cat([mean, var.clamp_min(1e-12).sqrt()], dim=1)


class FunASRXVector(nn.Module):
    """FunASR's ResNet34 x-vector: ``model(feats (B, T, 80), lengths (B,)) -> (B, 256)``."""

    def __init__(
        self,
        feat_dim: int = 80,
        embedding_size: int = 256,
        pooling_nodes: int = 256,
        num_classes: int = 3465,
    ) -> None:
        super().__init__()
        if feat_dim % 8:
            raise ValueError(f"feat_dim must be a multiple of 8, got {feat_dim}")
        self.feat_dim = feat_dim
        self.encoder = ResNet34Encoder(pooling_nodes)
        self.decoder = DenseDecoder(2 * pooling_nodes, embedding_size, embedding_size, num_classes)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if lengths is not None:
            # No shortcut for a batch of full rows: deciding it would read a value back from
            # the device every batch (a sync on a GPU); the masks cost little.
            lengths = lengths.to(device=feats.device, dtype=torch.long)
        x, lengths = self.encoder(feats, lengths)
        return self.decoder.embedding(statistics_pooling(x, lengths))

    def check_model_folder(self, folder: Path) -> None:
        """Check the model folder's ``sv.yaml`` (when present) against this network and the
        registry's front end; raise CheckpointMismatchError naming the file and the field."""
        path = Path(folder) / CONFIG_FILE
        if path.is_file():
            check_sv_yaml(path, self.feat_dim, self.decoder.output_dense.out_features,
                          self.decoder.resnet1_dense.out_features)  # fmt: skip


def _get(conf: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(conf, dict):
            return None
        conf = conf.get(k)
    return conf


def check_sv_yaml(path: Path, feat_dim: int = 80, num_classes: int = 3465, dim: int = 256) -> None:
    """What speaker-sim takes from a FunASR ``sv.yaml``: nothing is configured from it, but a
    config for a different network or front end is refused with the field that differs.

    Checked: encoder ``resnet34`` (head conv, no head max-pool, blocks and filters as built),
    pooling ``statistic`` with ``num_nodes_pooling_layer`` 256, decoder ``dense`` with
    ``num_nodes_resnet1`` = the embedding size, the token list's length = the classifier's
    classes, and ``frontend_conf`` (16 kHz, povey window, 80 mels, 25 / 10 ms, no LFR). Fields
    the file leaves out are not checked.
    """
    from ..audio.frontend import FbankConfig
    from .registry import FUNASR_FBANK

    try:
        import yaml

        conf = yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception as exc:
        raise CheckpointMismatchError(
            f"{path}: cannot read as YAML ({str(exc).splitlines()[0][:200]})"
        ) from None
    if not isinstance(conf, dict):
        raise CheckpointMismatchError(f"{path}: not a FunASR sv.yaml (no mapping at the top)")
    fe: FbankConfig = FUNASR_FBANK
    expected: list[tuple[tuple[str, ...], Any]] = [
        (("encoder",), "resnet34"),
        (("encoder_conf", "use_head_conv"), True),
        (("encoder_conf", "use_head_maxpool"), False),
        (("encoder_conf", "num_nodes_pooling_layer"), 256),
        (("encoder_conf", "layers_in_block"), list(LAYERS)),
        (("encoder_conf", "filters_in_block"), list(FILTERS)),
        (("pooling_type",), "statistic"),
        (("decoder",), "dense"),
        (("decoder_conf", "num_nodes_resnet1"), dim),
        (("frontend",), "wav_frontend"),
        (("frontend_conf", "fs"), fe.sample_rate),
        (("frontend_conf", "window"), fe.window),
        (("frontend_conf", "n_mels"), feat_dim),
        (("frontend_conf", "frame_length"), fe.frame_length_ms),
        (("frontend_conf", "frame_shift"), fe.frame_shift_ms),
        (("frontend_conf", "lfr_m"), 1),
        (("frontend_conf", "lfr_n"), 1),
    ]
    bad = []
    for keys, want in expected:
        got = _get(conf, *keys)
        if got is not None and got != want:
            bad.append(f"{'.'.join(keys)} is {got!r}, expected {want!r}")
    tokens = conf.get("token_list")
    if isinstance(tokens, list) and len(tokens) != num_classes:
        bad.append(f"token_list has {len(tokens)} speakers, the network {num_classes}")
    if bad:
        raise CheckpointMismatchError(
            f"{path} does not describe the FunASR ResNet34 x-vector speaker-sim serves: "
            + "; ".join(bad)
        )
