"""The feature extractors: one place that maps ``--feature-type`` to a lhotse extractor.

Used both by data preparation (``local/compute_fbank.py``) and by on-the-fly extraction in the
data module, so precomputed and on-the-fly features are computed by the same code.
"""
from __future__ import annotations

import argparse
from typing import List, Optional, Sequence, Union

from lhotse import Fbank, FbankConfig, WhisperFbank, WhisperFbankConfig
from lhotse.features.base import FeatureExtractor

from llmasr.config import UserError

FEATURE_TYPES = ("fbank", "whisper", "firered")


def make_feature_extractor(
    feature_type: str = "fbank", num_mel_bins: int = 80, firered_cmvn: Optional[str] = None
) -> FeatureExtractor:
    """``fbank``: Kaldi-compatible log-mel fbank, 25 ms window / 10 ms shift (icefall's features);
    ``whisper``: Whisper's log-mel spectrogram (n_fft 400, hop 160, per-utterance max-8 clamp,
    (x + 4) / 4), 80 bins for Whisper <= v2 and 128 for large-v3 (needs librosa for the mel filters);
    ``firered``: FireRedASR's 80-bin Kaldi fbank of int16-scaled samples, normalised with the model's
    ``cmvn.ark`` (``firered_cmvn``; without it raw fbank), zero-padded from FireRedASR's snip_edges
    frame count to lhotse's round(duration / 10 ms) (the data module's ``--feature-type firered``
    batches use FireRedASR's count again).
    """
    if feature_type == "firered":
        from llmasr.features.firered import lhotse_extractor

        if num_mel_bins != 80:
            raise UserError(f"FireRedASR features have 80 mel bins, got --num-mel-bins {num_mel_bins}")
        return lhotse_extractor(firered_cmvn)
    if feature_type == "fbank":
        return Fbank(FbankConfig(num_mel_bins=num_mel_bins))
    if feature_type == "whisper":
        if num_mel_bins not in (80, 128):
            raise UserError(f"Whisper features have 80 or 128 mel bins, got --num-mel-bins {num_mel_bins}")
        return WhisperFbank(WhisperFbankConfig(num_filters=num_mel_bins))
    raise UserError(f"unknown --feature-type {feature_type!r}; expected one of {FEATURE_TYPES}")


# What each encoder's ``feature_type`` (llmasr.encoders) needs from the data side (--feature-type).
ENCODER_FEATURE_TYPES = {"fbank": "fbank", "whisper-mel": "whisper", "kaldi-fbank-cmvn": "firered"}
# lhotse extractor names (``Features.type`` in a manifest) of the --feature-type values other than fbank.
_STORED_FEATURE_TYPES = {"whisper-fbank": "whisper", "firered-fbank": "firered"}


def data_feature_type_of(encoder_feature_type: Optional[str]) -> Optional[str]:
    """The --feature-type an encoder's ``feature_type`` needs (an unknown one maps to itself)."""
    return ENCODER_FEATURE_TYPES.get(encoder_feature_type or "", encoder_feature_type)


def stored_feature_type(extractor_name: str) -> str:
    """The --feature-type of stored features made by the lhotse extractor ``extractor_name`` (every
    fbank extractor - lhotse's, kaldifeat's - counts as fbank)."""
    return _STORED_FEATURE_TYPES.get(extractor_name, "fbank")


def split_feature_types(value: str) -> List[str]:
    """--feature-type: one type, or a comma-separated list with one entry per speech encoder (MoSE
    whose encoders have different front ends, e.g. ``fbank,whisper,firered``)."""
    types = [t.strip() for t in str(value).split(",") if t.strip()]
    if not types or any(t not in FEATURE_TYPES for t in types):
        raise UserError(f"--feature-type {value!r}: expected one of {FEATURE_TYPES} or a comma-separated list of them")
    return types


def feature_type_arg(value: str) -> str:
    """argparse type of --feature-type: the checked value, still a string ("fbank", "fbank,whisper")."""
    try:
        return ",".join(split_feature_types(value))
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def check_feature_type(encoder_feature_type: Union[Optional[str], Sequence[Optional[str]]], data_feature_type: str,
                       encoder_feature_dim=None, num_mel_bins: Optional[int] = None) -> List[str]:
    """Fail early when the data module would feed an encoder features of the wrong kind (e.g. fbank
    manifests to a Whisper encoder): the model would train/decode on garbage without any error.

    ``encoder_feature_type`` / ``encoder_feature_dim``: one encoder's, or lists with one entry per
    encoder (MoSE); ``data_feature_type``: --feature-type, one type for every encoder or a list with
    one entry per encoder. Returns the --feature-type of each encoder."""
    several = encoder_feature_type is not None and not isinstance(encoder_feature_type, str)
    enc_types = list(encoder_feature_type) if several else [encoder_feature_type]
    enc_dims = list(encoder_feature_dim) if several and encoder_feature_dim is not None else \
        [encoder_feature_dim] * len(enc_types)
    given = split_feature_types(data_feature_type)
    data_types = given * len(enc_types) if len(given) == 1 else given
    # encoders of no known front end (custom ones) take the features they are given
    needed = [ENCODER_FEATURE_TYPES.get(t or "") or (data_types[i] if i < len(data_types) else given[0])
              for i, t in enumerate(enc_types)]
    if needed != data_types:
        want = needed[0] if len(set(needed)) == 1 else ",".join(needed)
        if len(enc_types) == 1:
            raise UserError(
                f"the speech encoder takes {enc_types[0]!r} features: use --feature-type {want} (and manifests "
                f"prepared with local/prepare.sh --feature-type {want}), not --feature-type {data_feature_type}"
            )
        raise UserError(
            f"the speech encoders take {enc_types} features: use --feature-type {want} (one entry per encoder; "
            f"stored features: one --manifest-dir per entry, prepared with local/prepare.sh --feature-type "
            f"<entry>), not --feature-type {data_feature_type}"
        )
    mixed = len(set(data_types)) > 1
    for t, d, dim in zip(enc_types, data_types, enc_dims):
        if d == "whisper" and dim and num_mel_bins and dim != num_mel_bins:
            raise UserError(f"the Whisper encoder takes {dim} mel bins: use --num-mel-bins {dim}")
        if mixed and d != "whisper" and dim and dim != 80:
            raise UserError(f"a speech encoder taking {t!r} features has {dim} input dims: with several "
                            f"--feature-type entries {d} features are 80-dim (--num-mel-bins sets the Whisper ones)")
    return data_types


def default_storage_type():
    """lhotse's compressed chunked archives (lilcom) when available, else lossless .npy files."""
    try:
        import lilcom  # noqa: F401
        from lhotse import LilcomChunkyWriter

        return LilcomChunkyWriter
    except ImportError:
        import logging

        from lhotse import NumpyFilesWriter

        logging.warning("lilcom is not installed: storing features as .npy files (pip install lilcom)")
        return NumpyFilesWriter
