"""FireRedASR Conformer as a registered speech encoder ("firered" / "firered-conformer").

``path``: a FireRedASR-LLM ``asr_encoder.pth.tar``, a FireRedASR-AED ``model.pth.tar`` (its
``encoder.*`` part is used, the decoder is ignored), or a directory holding one of them.
Without ``path`` the options ``idim, n_layers_enc, n_head, d_model, kernel_size, residual_dropout,
dropout_rate`` build a randomly initialised encoder (training from scratch).

Input features: 80-dim Kaldi fbank (kaldi-native-fbank, int16-valued samples) normalised with the
model's global ``cmvn.ark`` (``feature_type = "kaldi-fbank-cmvn"``; see
:class:`llmasr.features.firered.FireRedFeatureExtractor`). Output frames: 40 ms; frames at or beyond
``out_lens`` are padding (the encoder computes a few extra frames there, see
:mod:`llmasr.firered.conformer`).
"""
from __future__ import annotations

from typing import Optional

from llmasr.encoders import register_encoder
from llmasr.firered.conformer import ConformerEncoder, set_dropout
from llmasr.firered.load import load_encoder

_SCRATCH_DEFAULTS = dict(idim=80, n_layers_enc=16, n_head=20, d_model=1280, residual_dropout=0.1,
                         dropout_rate=0.1, kernel_size=33, pe_maxlen=5000)


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
    if dropout is not None:
        set_dropout(encoder, dropout)
    if device is not None or dtype is not None:
        encoder = encoder.to(device=device, dtype=dtype)
    return encoder
