"""Loading released FireRedASR packages with strict checks and clear errors.

The package format and the Conformer encoder's loading live with the encoder
(:mod:`llmasr.encoders.firered`); this module builds the AED, its tokenizer and front end.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

from llmasr.encoders.firered import load_encoder, load_package  # noqa: F401 (re-exported: the package format)
from llmasr.features.firered import FireRedFeatureExtractor
from llmasr.io import CheckpointError, load_state_dict_strict

from .aed import FireRedAsrAed
from .tokenizer import FireRedTokenizer

PathLike = Union[str, Path]


def build_aed(args, source: str = "<args>") -> FireRedAsrAed:
    return FireRedAsrAed.from_args(args, source)


def load_aed(path: PathLike) -> FireRedAsrAed:
    """``model.pth.tar`` (or a directory holding it) -> FireRedAsrAed in eval mode (strict)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pth.tar"
    args, sd = load_package(path)
    model = build_aed(args, str(path))
    # Positional tables are deterministic sinusoids: allow packages that omit them.
    load_state_dict_strict(model, sd, str(path),
                           allow_missing=("encoder.positional_encoding.pe", "decoder.positional_encoding.pe"))
    return model.eval()


def load_tokenizer(model_dir: PathLike) -> FireRedTokenizer:
    model_dir = Path(model_dir)
    return FireRedTokenizer(model_dir / "dict.txt", model_dir / "train_bpe1000.model")


def load_feature_extractor(model_dir: PathLike, dither: float = 0.0) -> FireRedFeatureExtractor:
    return FireRedFeatureExtractor(Path(model_dir) / "cmvn.ark", dither=dither)


def check_tokenizer_matches(model: FireRedAsrAed, tokenizer: FireRedTokenizer, source: str) -> None:
    odim = model.decoder.odim
    if len(tokenizer) != odim:
        raise CheckpointError(f"{source}: dict.txt has {len(tokenizer)} tokens but the model's odim is {odim}")


def load_aed_dir(model_dir: PathLike):
    """(features, model, tokenizer) from a released FireRedASR-AED directory."""
    model_dir = Path(model_dir)
    feats = load_feature_extractor(model_dir)
    model = load_aed(model_dir / "model.pth.tar")
    tok = load_tokenizer(model_dir)
    check_tokenizer_matches(model, tok, str(model_dir / "dict.txt"))
    return feats, model, tok


__all__ = [
    "CheckpointError",
    "load_package",
    "load_aed",
    "load_encoder",
    "load_tokenizer",
    "load_feature_extractor",
    "load_aed_dir",
]
