"""Loading released FireRedASR packages with strict checks and clear errors.

A package is ``torch.save({"args": argparse.Namespace, "model_state_dict": OrderedDict})``, read with
:func:`llmasr.io.load_torch_file` (``argparse.Namespace`` is on its allow-list).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Mapping, Tuple, Union

import torch

from llmasr.io import CheckpointError, load_state_dict_strict, load_torch_file

from .aed import FireRedAsrAed
from .conformer import ConformerEncoder
from llmasr.features.firered import FireRedFeatureExtractor
from .tokenizer import FireRedTokenizer

PathLike = Union[str, Path]


def load_package(path: PathLike) -> Tuple[argparse.Namespace, Mapping[str, torch.Tensor]]:
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FireRedASR package not found: {path}")
    pkg = load_torch_file(path, "FireRedASR package")
    if not isinstance(pkg, dict) or "args" not in pkg:
        raise CheckpointError(f"{path}: expected a dict with 'args' and 'model_state_dict'")
    sd = pkg.get("model_state_dict", {})
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path}: 'model_state_dict' is not a mapping")
    return pkg["args"], sd


# The name this package's callers use for the one strict loader.
load_state_dict_checked = load_state_dict_strict


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


ENCODER_BUFFERS = ("positional_encoding.pe",)


def load_encoder(path: PathLike) -> Tuple[ConformerEncoder, argparse.Namespace]:
    """Conformer encoder from ``asr_encoder.pth.tar`` (encoder only) or an AED ``model.pth.tar``.

    Every encoder parameter must be present; decoder keys are ignored.
    """
    path = Path(path)
    if path.is_dir():
        cand = [path / "asr_encoder.pth.tar", path / "model.pth.tar"]
        path = next((c for c in cand if c.is_file()), cand[0])
    args, sd = load_package(path)
    aed = build_aed(args, str(path))
    enc_sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    if not enc_sd:
        raise CheckpointError(f"{path}: no 'encoder.*' parameters in model_state_dict")
    load_state_dict_strict(aed.encoder, enc_sd, str(path), allow_missing=ENCODER_BUFFERS)
    return aed.encoder, args


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
    "load_state_dict_checked",
    "load_aed",
    "load_encoder",
    "load_tokenizer",
    "load_feature_extractor",
    "load_aed_dir",
]
