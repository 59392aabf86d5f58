"""The feature extractors: one place that maps ``--feature-type`` to a lhotse extractor.

Used both by data preparation (``local/compute_fbank.py``) and by on-the-fly extraction in the
data module, so precomputed and on-the-fly features are computed by the same code.
"""
from __future__ import annotations

from typing import Optional

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


def check_feature_type(encoder_feature_type: Optional[str], data_feature_type: str, encoder_feature_dim=None,
                       num_mel_bins: Optional[int] = None) -> None:
    """Fail early when the data module would feed an encoder features of the wrong kind (e.g. fbank
    manifests to a Whisper encoder): the model would train/decode on garbage without any error."""
    want = ENCODER_FEATURE_TYPES.get(encoder_feature_type or "")
    if want is not None and want != data_feature_type:
        raise UserError(
            f"the speech encoder takes {encoder_feature_type!r} features: use --feature-type {want} "
            f"(and manifests prepared with local/prepare.sh --feature-type {want}), not --feature-type {data_feature_type}"
        )
    if want == "whisper" and encoder_feature_dim and num_mel_bins and encoder_feature_dim != num_mel_bins:
        raise UserError(f"the Whisper encoder takes {encoder_feature_dim} mel bins: use --num-mel-bins {encoder_feature_dim}")


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
