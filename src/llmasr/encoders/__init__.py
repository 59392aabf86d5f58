"""One registry for every speech encoder.

A speech encoder is an ``nn.Module`` with

    forward(features: (N, T, F) float, feature_lens: (N,) int64) -> (encoder_out (N, T', C), encoder_out_lens (N,))

and the attributes ``output_dim`` (C), ``feature_dim`` (F) and ``feature_type`` (a string naming the
features it expects, e.g. ``"fbank"`` for 80-dim lhotse/icefall fbank, ``"whisper-mel"``,
``"kaldi-fbank-cmvn"``). Frames at or beyond ``encoder_out_lens`` are padding.

Encoders are registered by name with :func:`register_encoder`; recipes build them with
:func:`build_speech_encoder` from ``--speech-encoder-type`` / ``--speech-encoder-path``. The model
code never imports a concrete encoder, so a new encoder plugs in by registering itself.
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Optional

import torch.nn as nn

EncoderBuilder = Callable[..., nn.Module]

_REGISTRY: Dict[str, EncoderBuilder] = {}

# Modules that register encoders when imported. Imported lazily so that e.g. decoding a
# Zipformer model does not need openai-whisper installed.
_PROVIDERS = (
    "llmasr.encoders.zipformer",
    "llmasr.encoders.whisper",
    "llmasr.encoders.firered",
)


def register_encoder(*names: str):
    """Decorator: register ``builder(path=None, **options) -> nn.Module`` under each name."""

    def wrap(builder: EncoderBuilder) -> EncoderBuilder:
        for name in names:
            if name in _REGISTRY and _REGISTRY[name] is not builder:
                raise ValueError(f"speech encoder type {name!r} registered twice")
            _REGISTRY[name] = builder
        return builder

    return wrap


def _load_providers() -> None:
    for mod in _PROVIDERS:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            # A provider whose optional dependency is missing registers nothing; anything
            # else (a bug in the provider) must surface.
            if e.name and (e.name == mod or mod.startswith(e.name + ".")):
                continue
            if e.name in ("whisper",):
                continue
            raise


def available_encoders() -> list:
    _load_providers()
    return sorted(_REGISTRY)


def resolve_builder(encoder_type: str, path: Optional[str] = None) -> EncoderBuilder:
    _load_providers()
    if encoder_type in _REGISTRY:
        return _REGISTRY[encoder_type]
    # Providers may accept types defined next to the checkpoint (e.g. a Zipformer
    # model_params.json); they expose ``accepts(encoder_type, path)``.
    for mod in _PROVIDERS:
        m = importlib.import_module(mod) if _is_importable(mod) else None
        accepts = getattr(m, "accepts", None)
        if accepts is not None and accepts(encoder_type, path):
            return getattr(m, "build_from_type")
    raise ValueError(
        f"unknown --speech-encoder-type {encoder_type!r}; known types: {', '.join(sorted(_REGISTRY))}"
    )


def _is_importable(mod: str) -> bool:
    try:
        importlib.import_module(mod)
        return True
    except ModuleNotFoundError:
        return False


def build_speech_encoder(encoder_type: str, path: Optional[str] = None, **options) -> nn.Module:
    """Build a registered encoder and load its weights from ``path`` (if given)."""
    builder = resolve_builder(encoder_type, path)
    return builder(encoder_type=encoder_type, path=path, **options)
