"""FireRedASR Conformer as a registered speech encoder ("firered" / "firered-conformer").

``path``: a FireRedASR-LLM ``asr_encoder.pth.tar``, a FireRedASR-AED ``model.pth.tar`` (its
``encoder.*`` part is used, the decoder is ignored), or a directory holding one of them.
Without ``path`` the options ``idim, n_layers_enc, n_head, d_model, kernel_size, residual_dropout,
dropout_rate`` build a randomly initialised encoder (training from scratch).

Input features: 80-dim Kaldi fbank (kaldi-native-fbank, int16-valued samples) normalised with the
model's global ``cmvn.ark`` (``feature_type = "kaldi-fbank-cmvn"``; see
:class:`llmasr.features.firered.FireRedFeatureExtractor`). Output frames: 40 ms.

Output lengths: this encoder reports ``T_enc(T) = ((T + 3) // 2) // 2`` frames per utterance of T
input frames (``lengths_include_context``), not the valid length ``L = ((T - 3) // 2 + 1 - 3) // 2 + 1``
(1 or 2 frames less): the released FireRedASR-LLM splices every frame of an utterance padded by the
encoder's own 6 context frames, so these lengths make :class:`llmasr.model.SpeechLLM` (decoding,
fine-tuning, encoder cache, aux CTC) see exactly the frames the release sees at batch size 1, whatever
the batch. The extra frames depend only on the utterance (keys >= L are masked inside, see
:mod:`llmasr.encoders.firered_conformer`), and the masks inside still use L.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Mapping, Optional, Tuple, Union

import torch

from llmasr.encoders import register_encoder
from llmasr.encoders.firered_conformer import ConformerEncoder, set_dropout
from llmasr.io import CheckpointError, load_state_dict_strict, load_torch_file

PathLike = Union[str, Path]
# The constructor arguments of ConformerEncoder, as named in a package's ``args``.
ENCODER_ARG_NAMES = ("idim", "n_layers_enc", "n_head", "d_model", "residual_dropout", "dropout_rate", "kernel_size",
                     "pe_maxlen")
# Deterministic sinusoid tables: packages may omit them (asr_encoder.pth.tar stores no buffers).
ENCODER_BUFFERS = ("positional_encoding.pe",)

_SCRATCH_DEFAULTS = dict(idim=80, n_layers_enc=16, n_head=20, d_model=1280, residual_dropout=0.1,
                         dropout_rate=0.1, kernel_size=33, pe_maxlen=5000)


def load_package(path: PathLike) -> Tuple[argparse.Namespace, Mapping[str, torch.Tensor]]:
    """A released FireRedASR package: ``torch.save({"args": argparse.Namespace, "model_state_dict": ...})``,
    read with :func:`llmasr.io.load_torch_file` (``argparse.Namespace`` is on its allow-list)."""
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


def load_encoder(path: PathLike) -> Tuple[ConformerEncoder, argparse.Namespace]:
    """Conformer encoder from ``asr_encoder.pth.tar`` (encoder only) or an AED ``model.pth.tar``
    (or a directory holding one of them). Every encoder parameter must be present; decoder keys are ignored."""
    path = Path(path)
    if path.is_dir():
        cand = [path / "asr_encoder.pth.tar", path / "model.pth.tar"]
        path = next((c for c in cand if c.is_file()), cand[0])
    args, sd = load_package(path)
    get = args.get if isinstance(args, dict) else lambda k, d=None: getattr(args, k, d)
    missing = [k for k in ENCODER_ARG_NAMES if get(k, None) is None]
    if missing:
        raise CheckpointError(f"{path}: model args lack {missing}")
    encoder = ConformerEncoder(*(get(k) for k in ENCODER_ARG_NAMES))
    enc_sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    if not enc_sd:
        raise CheckpointError(f"{path}: no 'encoder.*' parameters in model_state_dict")
    load_state_dict_strict(encoder, enc_sd, str(path), allow_missing=ENCODER_BUFFERS)
    return encoder, args


@register_encoder("firered", "firered-conformer")
def build_firered_encoder(encoder_type: str = "firered", path: Optional[str] = None, dropout: Optional[float] = None,
                          device=None, dtype=None, **options) -> ConformerEncoder:
    if path is not None:
        if options:
            raise ValueError(f"speech encoder {encoder_type!r}: options {sorted(options)} conflict with the "
                             f"configuration stored in {path}")
        encoder, _ = load_encoder(path)
    else:
        cfg = dict(_SCRATCH_DEFAULTS)
        unknown = set(options) - set(cfg)
        if unknown:
            raise ValueError(f"speech encoder {encoder_type!r}: unknown options {sorted(unknown)}")
        cfg.update(options)
        encoder = ConformerEncoder(cfg["idim"], cfg["n_layers_enc"], cfg["n_head"], cfg["d_model"],
                                   cfg["residual_dropout"], cfg["dropout_rate"], cfg["kernel_size"], cfg["pe_maxlen"])
    encoder.lengths_include_context = True
    if dropout is not None:
        set_dropout(encoder, dropout)
    if device is not None or dtype is not None:
        encoder = encoder.to(device=device, dtype=dtype)
    return encoder
