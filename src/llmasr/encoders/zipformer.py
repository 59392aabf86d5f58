"""icefall Zipformer2 (non-streaming) speech encoder: configs, checkpoint loading, registry entries.

Types registered here: ``medium`` / ``zipformer-medium``, ``large`` / ``zipformer-large`` (the published
LibriSpeech models used by SpeechLLM) and ``zipformer-small``. Any other type name works when a
``model_params.json`` (icefall's hyper-parameters, string form such as ``"2,2,4,5,4,2"``) sits next to
the checkpoint, e.g. ``build_speech_encoder("tiny_a", "models/zipformer/tiny_a/pretrained.pt")``.

Checkpoints: an icefall ``pretrained.pt`` (``{"model": state_dict}`` of a whole ASR model; the
``encoder_embed.*`` and ``encoder.*`` entries are used, the transducer/CTC/attention-decoder heads are
ignored), or this project's saved encoder (``{"model": encoder_state_dict}`` or a bare state dict). Any
other mismatch is an error that names the file, the assumed config and the offending keys/shapes.

The module maps ``(features (N, T, 80) fbank, lengths) -> (encoder_out (N, T', C), out_lengths)`` with
``T' = ((T - 7) // 2 + 1) // 2``, exactly like icefall's ``AsrModel.forward_encoder``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from llmasr.encoders import register_encoder
from llmasr.io import load_state_dict_strict, load_torch_file
from llmasr.encoders.zipformer_modules import Conv2dSubsampling, Zipformer2

logger = logging.getLogger(__name__)

MIN_NUM_FRAMES = 9  # (9 - 7) // 2 = 1 frame after the front end -> 1 output frame

# Hyper-parameters that change the network (and thus the checkpoint); everything else in an icefall
# model_params.json (decoder_dim, vocab, chunk sizes, ...) is irrelevant to the encoder.
_PER_STACK = (
    "num_encoder_layers",
    "downsampling_factor",
    "feedforward_dim",
    "num_heads",
    "encoder_dim",
    "encoder_unmasked_dim",
    "query_head_dim",
    "value_head_dim",
    "pos_head_dim",
    "cnn_module_kernel",
)


@dataclasses.dataclass(frozen=True)
class ZipformerConfig:
    """icefall Zipformer2 hyper-parameters (train.py's ``--num-encoder-layers`` etc.), one value per stack."""

    num_encoder_layers: Tuple[int, ...]
    downsampling_factor: Tuple[int, ...]
    feedforward_dim: Tuple[int, ...]
    num_heads: Tuple[int, ...]
    encoder_dim: Tuple[int, ...]
    encoder_unmasked_dim: Tuple[int, ...]  # only used by icefall's training-time feature masking
    query_head_dim: Tuple[int, ...]
    value_head_dim: Tuple[int, ...]
    pos_head_dim: Tuple[int, ...]
    cnn_module_kernel: Tuple[int, ...]
    pos_dim: int = 48
    feature_dim: int = 80
    output_downsampling_factor: int = 2
    causal: bool = False

    @classmethod
    def from_dict(cls, params: Mapping[str, Any], source: str = "config") -> "ZipformerConfig":
        """Build from icefall-style params: per-stack values as "2,2,4,5,4,2", a single "32", ints or lists."""
        missing = [k for k in ("num_encoder_layers", "encoder_dim", "feedforward_dim") if k not in params]
        if missing:
            raise ValueError(f"{source}: Zipformer config lacks {missing}")
        defaults = MEDIUM  # icefall train.py defaults for anything not given
        ds = params.get("downsampling_factor", defaults.downsampling_factor)
        num_stacks = len(_parse_ints(ds, "downsampling_factor", source))
        values: Dict[str, Any] = {}
        for key in _PER_STACK:
            if key == "encoder_unmasked_dim" and key not in params:
                raw = params["encoder_dim"]  # irrelevant at inference; any value <= encoder_dim is valid
            else:
                raw = params.get(key, getattr(defaults, key))
            ints = _parse_ints(raw, key, source)
            if len(ints) == 1:
                ints = ints * num_stacks
            if len(ints) != num_stacks:
                raise ValueError(
                    f"{source}: {key}={raw!r} has {len(ints)} values but downsampling_factor has {num_stacks} stacks"
                )
            values[key] = ints
        for key in ("pos_dim", "feature_dim", "output_downsampling_factor"):
            values[key] = int(params.get(key, getattr(defaults, key)))
        causal = params.get("causal", False)
        values["causal"] = causal if isinstance(causal, bool) else str(causal).lower() in ("1", "true", "yes")
        cfg = cls(**values)
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        if self.causal:
            raise ValueError(
                f"{source}: causal (streaming) Zipformer checkpoints are not supported; "
                "use a non-streaming model (causal=False)"
            )
        if self.output_downsampling_factor != 2:
            raise ValueError(f"{source}: output_downsampling_factor must be 2, got {self.output_downsampling_factor}")
        for u, d in zip(self.encoder_unmasked_dim, self.encoder_dim):
            if u > d:
                raise ValueError(f"{source}: encoder_unmasked_dim {u} > encoder_dim {d}")

    def to_icefall_dict(self) -> Dict[str, Any]:
        """icefall's string form (what model_params.json holds)."""
        out: Dict[str, Any] = {k: ",".join(map(str, getattr(self, k))) for k in _PER_STACK}
        out.update(
            pos_dim=self.pos_dim,
            feature_dim=self.feature_dim,
            output_downsampling_factor=self.output_downsampling_factor,
            causal=self.causal,
        )
        return out

    def describe(self) -> str:
        d = self.to_icefall_dict()
        keys = ("num_encoder_layers", "encoder_dim", "feedforward_dim", "num_heads", "cnn_module_kernel",
                "query_head_dim", "value_head_dim", "pos_head_dim", "pos_dim", "downsampling_factor")
        return " ".join(f"{k}={d[k]}" for k in keys)


def _parse_ints(raw: Any, key: str, source: str) -> Tuple[int, ...]:
    try:
        if isinstance(raw, str):
            return tuple(int(v) for v in raw.split(",") if v.strip() != "")
        if isinstance(raw, int):
            return (raw,)
        return tuple(int(v) for v in raw)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: cannot parse {key}={raw!r} as comma-separated integers") from None


def _cfg(layers: str, ff: str, dims: str, unmasked: str) -> ZipformerConfig:
    def ints(s: str) -> Tuple[int, ...]:
        return tuple(int(v) for v in s.split(","))

    # Built directly (not via from_dict, whose fallback defaults are MEDIUM itself).
    return ZipformerConfig(
        num_encoder_layers=ints(layers),
        downsampling_factor=(1, 2, 4, 8, 4, 2),
        feedforward_dim=ints(ff),
        num_heads=(4, 4, 4, 8, 4, 4),
        encoder_dim=ints(dims),
        encoder_unmasked_dim=ints(unmasked),
        query_head_dim=(32,) * 6,
        value_head_dim=(12,) * 6,
        pos_head_dim=(4,) * 6,
        cnn_module_kernel=(31, 31, 15, 15, 15, 31),
        pos_dim=48,
    )


# icefall egs/librispeech/ASR/zipformer (train.py defaults = "medium"; RESULTS.md for small/large).
MEDIUM = _cfg("2,2,3,4,3,2", "512,768,1024,1536,1024,768", "192,256,384,512,384,256", "192,192,256,256,256,192")
LARGE = _cfg("2,2,4,5,4,2", "512,768,1536,2048,1536,768", "192,256,512,768,512,256", "192,192,256,320,256,192")
SMALL = _cfg("2,2,2,2,2,2", "512,768,768,768,768,768", "192,256,256,256,256,256", "192,192,192,192,192,192")

NAMED_CONFIGS: Dict[str, ZipformerConfig] = {
    "small": SMALL,
    "medium": MEDIUM,
    "large": LARGE,
}


def named_config(encoder_type: str) -> ZipformerConfig:
    name = encoder_type[len("zipformer-"):] if encoder_type.startswith("zipformer-") else encoder_type
    if name not in NAMED_CONFIGS:
        raise ValueError(f"unknown Zipformer config {encoder_type!r}; known: {', '.join(NAMED_CONFIGS)}")
    return NAMED_CONFIGS[name]


# ---------------------------------------------------------------------------------------------------------
# The encoder module
# ---------------------------------------------------------------------------------------------------------


class ZipformerEncoder(nn.Module):
    """icefall ``encoder_embed`` (Conv2dSubsampling) + ``encoder`` (Zipformer2); keys match icefall's."""

    feature_type = "fbank"

    def __init__(self, config: ZipformerConfig, dropout: float = 0.0) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.feature_dim = config.feature_dim
        self.output_dim = max(config.encoder_dim)
        self.encoder_embed = Conv2dSubsampling(config.feature_dim, config.encoder_dim[0], dropout=dropout)
        self.encoder = Zipformer2(
            downsampling_factor=config.downsampling_factor,
            encoder_dim=config.encoder_dim,
            num_encoder_layers=config.num_encoder_layers,
            query_head_dim=config.query_head_dim,
            pos_head_dim=config.pos_head_dim,
            value_head_dim=config.value_head_dim,
            num_heads=config.num_heads,
            feedforward_dim=config.feedforward_dim,
            cnn_module_kernel=config.cnn_module_kernel,
            pos_dim=config.pos_dim,
            output_downsampling_factor=config.output_downsampling_factor,
            dropout=dropout,
        )

    @staticmethod
    def output_lengths(feature_lens: Tensor) -> Tensor:
        return torch.div(torch.div(feature_lens - 7, 2, rounding_mode="floor") + 1, 2, rounding_mode="floor")

    def _check_input(self, features: Tensor, feature_lens: Tensor) -> None:
        if features.dim() != 3 or features.size(-1) != self.feature_dim:
            raise ValueError(
                f"Zipformer expects features (N, T, {self.feature_dim}), got shape {tuple(features.shape)}"
            )
        if feature_lens.dim() != 1 or feature_lens.size(0) != features.size(0):
            raise ValueError(
                f"feature_lens must have shape ({features.size(0)},), got {tuple(feature_lens.shape)}"
            )
        lens = feature_lens.tolist()  # one host sync per batch; the checks below need the values
        short = [(i, n) for i, n in enumerate(lens) if n < MIN_NUM_FRAMES]
        if short:
            raise ValueError(
                f"Zipformer needs at least {MIN_NUM_FRAMES} feature frames per utterance (one output frame); "
                f"too short (batch index, frames): {short[:5]}" + (f" and {len(short) - 5} more" if len(short) > 5 else "")
            )
        if max(lens) > features.size(1):
            raise ValueError(f"feature_lens max {max(lens)} exceeds the padded length {features.size(1)}")

    def forward(self, features: Tensor, feature_lens: Tensor) -> Tuple[Tensor, Tensor]:
        self._check_input(features, feature_lens)
        feature_lens = feature_lens.to(features.device)
        x, x_lens = self.encoder_embed(features, feature_lens)
        key_padding_mask = torch.arange(x.size(1), device=x.device)[None, :] >= x_lens[:, None]
        return self.encoder(x, x_lens, key_padding_mask)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------

# Parts of an icefall AsrModel that are not the encoder.
IGNORED_PREFIXES = ("decoder.", "joiner.", "simple_am_proj.", "simple_lm_proj.", "ctc_output.", "attention_decoder.")


def read_checkpoint(path: str) -> Dict[str, Tensor]:
    """The state dict inside ``path`` (``{"model": sd}`` or a bare ``sd``), tensors on CPU."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Zipformer checkpoint not found: {path}")
    # mmap avoids holding a second full copy of a large model while its weights are copied in.
    obj = load_torch_file(path, "Zipformer checkpoint", mmap=True)
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        kind = type(obj).__name__
        keys = list(obj.keys())[:5] if isinstance(obj, Mapping) else []
        raise ValueError(
            f"Zipformer checkpoint {path}: expected {{'model': state_dict}} or a state dict, got {kind} "
            f"with keys {keys}"
        )
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):  # saved from a DDP-wrapped model
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _infer_shape_hint(sd: Mapping[str, Tensor]) -> str:
    """A guess of the checkpoint's layers/dims from its keys, to make mismatch errors actionable."""
    layers: Dict[int, int] = {}
    dims: Dict[int, int] = {}
    for k, v in sd.items():
        parts = k.split(".")
        if len(parts) > 4 and parts[0] == "encoder" and parts[1] == "encoders" and k.endswith("norm.bias"):
            stack = int(parts[2])
            layer_idx = parts.index("layers") + 1
            layers[stack] = max(layers.get(stack, 0), int(parts[layer_idx]) + 1)
            dims[stack] = v.shape[0]
    if not layers:
        return ""
    n = max(layers) + 1
    return (
        f"the checkpoint looks like num_encoder_layers="
        f"{','.join(str(layers.get(i, '?')) for i in range(n))} "
        f"encoder_dim={','.join(str(dims.get(i, '?')) for i in range(n))}"
    )


def load_zipformer_checkpoint(model: ZipformerEncoder, path: str, config_source: str = "") -> None:
    """Load icefall ``pretrained.pt`` / this project's encoder checkpoint into ``model`` (strictly)."""
    sd = read_checkpoint(path)

    def hints(mismatch):
        out = [_infer_shape_hint(sd)] if _infer_shape_hint(sd) else []
        json_path = _params_json(path)
        if json_path is not None:
            try:
                out.append(f"{json_path} describes: {config_from_json(str(json_path)).describe()}")
            except ValueError as e:
                out.append(str(e))
        if any(".causal_conv." in k or ".chunkwise_conv." in k for k in mismatch.unexpected):
            out.append("this is a causal/streaming Zipformer; only non-streaming models are supported")
        return out

    load_state_dict_strict(model, sd, f"Zipformer checkpoint {path}", ignore_unexpected_prefixes=IGNORED_PREFIXES,
                           context=f"{config_source or 'given config'}: {model.config.describe()}", hints=hints)


# ---------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------

def build_zipformer(
    config: ZipformerConfig,
    path: Optional[str] = None,
    config_source: str = "",
    dropout: float = 0.0,
    device: Optional[Any] = None,
    dtype: Optional[torch.dtype] = None,
    **options,
) -> ZipformerEncoder:
    """Build the encoder for ``config`` (random init if ``path`` is None) and load ``path``.

    A plain module: freezing is :class:`llmasr.model.SpeechLLM`'s (``--unfreeze-encoder``)."""
    if options:
        logger.warning("Zipformer encoder ignores options %s", list(options))
    model = ZipformerEncoder(config, dropout=dropout)
    if path is not None:
        load_zipformer_checkpoint(model, path, config_source=config_source)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model


@register_encoder("zipformer-small", "medium", "zipformer-medium", "large", "zipformer-large")
def build_named(encoder_type: str, path: Optional[str] = None, **options) -> ZipformerEncoder:
    return build_zipformer(named_config(encoder_type), path, config_source=f"type {encoder_type!r}", **options)


def _params_json(path: Optional[str]) -> Optional[Path]:
    if path is None:
        return None
    p = Path(path).parent / "model_params.json"
    return p if p.is_file() else None


def accepts(encoder_type: str, path: Optional[str]) -> bool:
    """Any type name is a Zipformer when a model_params.json sits next to the checkpoint."""
    return _params_json(path) is not None


def config_from_json(json_path: str) -> ZipformerConfig:
    try:
        with open(json_path, encoding="utf-8") as f:
            params = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read Zipformer params {json_path}: {e}") from None
    if not isinstance(params, dict):
        raise ValueError(f"{json_path}: expected a JSON object of icefall model params")
    return ZipformerConfig.from_dict(params, source=str(json_path))


def build_from_type(encoder_type: str, path: Optional[str] = None, **options) -> ZipformerEncoder:
    """Build from the ``model_params.json`` next to ``path``."""
    json_path = _params_json(path)
    if json_path is None:
        raise ValueError(f"speech encoder type {encoder_type!r}: no model_params.json next to {path}")
    config = config_from_json(str(json_path))
    return build_zipformer(config, path, config_source=f"type {encoder_type!r} from {json_path}", **options)
