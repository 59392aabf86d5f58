"""FireRedASR front end: Kaldi fbank (kaldi-native-fbank) + global CMVN from ``cmvn.ark``.

Matches the released ``ASRFeatExtractor``: 80 mel bins, 25 ms / 10 ms frames, no dither,
``snip_edges`` (T = 1 + (num_samples - 400) // 160), povey window, pre-emphasis 0.97, samples used as
int16 VALUES (not scaled to [-1, 1]). CMVN statistics are float64; the float32 fbank is normalised in
float64 and cast back to float32, as the reference does. Padding value after CMVN is 0.

``FireRedFbank`` (``lhotse_extractor``) is the same front end as a lhotse extractor for stored
manifests and on-the-fly features; it appends zero frames up to lhotse's frame count.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Sequence, Tuple, Union

import kaldiio
import numpy as np
import torch
from lhotse.features.base import FeatureExtractor, register_extractor
from lhotse.utils import compute_num_frames

from llmasr.config import UserError

FEATURE_DIM = 80
SAMPLE_RATE = 16000
# The encoder's two 3x3 stride-2 convolutions need 7 frames (1360 samples, 85 ms) for one output frame.
MIN_FRAMES = 7


class CmvnError(UserError):
    pass


def read_kaldi_cmvn(path: Union[str, Path], expected_dim: int = FEATURE_DIM) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read global CMVN stats -> (stats (2, D+1), means (D,), inverse_std (D,)), float64."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CMVN file not found: {path}")
    try:
        # kaldiio reads Kaldi binary (float32/float64) and text matrices stored without a key.
        stats = np.asarray(kaldiio.load_mat(path), dtype=np.float64)
    except Exception as e:  # kaldiio raises ValueError/RuntimeError/struct errors for malformed files
        raise CmvnError(f"{path}: not a readable Kaldi matrix ({type(e).__name__}: {e})".replace("\n", " ")) from None
    if stats.ndim != 2 or stats.shape[0] != 2:
        raise CmvnError(f"{path}: CMVN stats must have 2 rows, got shape {tuple(stats.shape)}")
    dim = stats.shape[1] - 1
    if expected_dim is not None and dim != expected_dim:
        raise CmvnError(f"{path}: CMVN has {dim} dims, the model expects {expected_dim}")
    count = stats[0, dim]
    if not count >= 1:
        raise CmvnError(f"{path}: CMVN frame count is {count} (< 1)")
    means = stats[0, :dim] / count
    var = stats[1, :dim] / count - means * means
    var = np.maximum(var, 1e-20)
    inverse_std = 1.0 / np.sqrt(var)
    return stats, means, inverse_std


class KaldiFbank:
    """kaldi-native-fbank with the FireRedASR options (dither only when training)."""

    def __init__(self, num_mel_bins: int = FEATURE_DIM, dither: float = 0.0):
        import kaldi_native_fbank as knf

        self._knf = knf
        opts = knf.FbankOptions()
        opts.frame_opts.dither = dither
        opts.frame_opts.snip_edges = True
        opts.frame_opts.frame_length_ms = 25
        opts.frame_opts.frame_shift_ms = 10
        opts.mel_opts.num_bins = num_mel_bins
        opts.mel_opts.debug_mel = False
        self.opts = opts
        self.num_mel_bins = num_mel_bins

    def __call__(self, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
        """samples: 1-D array of int16 VALUES (any dtype) -> (T, num_mel_bins) float32."""
        samples = np.asarray(samples)
        if samples.ndim != 1:
            raise ValueError(f"expected mono 1-D samples, got shape {samples.shape}")
        fb = self._knf.OnlineFbank(self.opts)
        fb.accept_waveform(sample_rate, samples.astype(np.float32))
        n = fb.num_frames_ready
        if n == 0:
            return np.zeros((0, self.num_mel_bins), dtype=np.float32)
        return np.stack([fb.get_frame(i) for i in range(n)]).astype(np.float32)


def load_wav_int16(path: Union[str, Path]) -> Tuple[np.ndarray, int]:
    """Read a 16-bit PCM wav (mono) as int16 sample values."""
    import soundfile as sf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"wav not found: {path}")
    samples, sr = sf.read(str(path), dtype="int16", always_2d=True)
    if samples.shape[1] != 1:
        raise UserError(f"{path}: expected mono audio, got {samples.shape[1]} channels")
    return samples[:, 0], sr


class FireRedFeatureExtractor:
    """wav paths / sample arrays -> padded CMVN-normalised features (N, T, 80) + lengths."""

    def __init__(self, cmvn_path: Union[str, Path, None], dither: float = 0.0):
        self.fbank = KaldiFbank(FEATURE_DIM, dither=dither)
        if cmvn_path:
            self.cmvn_stats, self.means, self.inverse_std = read_kaldi_cmvn(cmvn_path)
        else:
            self.cmvn_stats = self.means = self.inverse_std = None

    def apply_cmvn(self, fbank: np.ndarray) -> np.ndarray:
        if self.means is None:
            return fbank.astype(np.float32)
        # float64 normalisation then cast, like the reference.
        return ((fbank - self.means) * self.inverse_std).astype(np.float32)

    def from_samples(self, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
        if sample_rate != SAMPLE_RATE:
            raise ValueError(f"FireRedASR expects {SAMPLE_RATE} Hz audio, got {sample_rate} Hz")
        return self.apply_cmvn(self.fbank(samples, sample_rate))

    def from_file(self, path: Union[str, Path]) -> np.ndarray:
        samples, sr = load_wav_int16(path)
        if sr != SAMPLE_RATE:
            raise UserError(f"{path}: FireRedASR expects {SAMPLE_RATE} Hz audio, got {sr} Hz")
        return self.from_samples(samples, sr)

    def __call__(self, wavs: Sequence[Union[str, Path, np.ndarray]]) -> Tuple[torch.Tensor, torch.Tensor, List[float]]:
        feats, durs = [], []
        for i, w in enumerate(wavs):
            if isinstance(w, np.ndarray):
                feats.append(self.from_samples(w))
                durs.append(len(w) / SAMPLE_RATE)
            else:
                samples, sr = load_wav_int16(w)
                if sr != SAMPLE_RATE:
                    raise UserError(f"{w}: FireRedASR expects {SAMPLE_RATE} Hz audio, got {sr} Hz")
                feats.append(self.from_samples(samples, sr))
                durs.append(len(samples) / sr)
            check_length(feats[-1].shape[0], w if not isinstance(w, np.ndarray) else f"input #{i}")
        x, lens = pad_features([torch.from_numpy(f) for f in feats])
        return x, lens, durs


def check_length(frames: int, what) -> None:
    if frames < MIN_FRAMES:
        raise UserError(f"{what}: too short for FireRedASR ({frames} frames; at least {MIN_FRAMES} frames = "
                         f"{400 + (MIN_FRAMES - 1) * 160} samples at 16 kHz are needed)")


def pad_features(feats: Sequence[torch.Tensor], pad_value: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    lens = torch.tensor([f.size(0) for f in feats], dtype=torch.long)
    out = torch.nn.utils.rnn.pad_sequence(list(feats), batch_first=True, padding_value=pad_value)
    return out, lens


def num_frames(num_samples: int) -> int:
    """Frames produced by snip_edges 25/10 ms framing at 16 kHz."""
    return 0 if num_samples < 400 else 1 + (num_samples - 400) // 160


# ---------------------------------------------------------------------------------------------
# lhotse adapter (for lhotse OnTheFlyFeatures / compute_and_store_features)
# ---------------------------------------------------------------------------------------------


@dataclass
class FireRedFbankConfig:
    cmvn_path: str = ""  # "" = raw Kaldi fbank (apply CMVN later)
    dither: float = 0.0

    def to_dict(self):
        return asdict(self)

    @staticmethod
    def from_dict(data):
        return FireRedFbankConfig(**data)


@register_extractor
class FireRedFbank(FeatureExtractor):
    """FireRedASR's front end as a lhotse extractor: lhotse's float samples in [-1, 1] are scaled back
    to int16 values, then Kaldi fbank (+ CMVN when ``cmvn_path`` is set).

    lhotse manifests need ``compute_num_frames(duration, 10 ms)`` = round(duration / 10 ms) frames,
    FireRedASR's snip_edges framing gives ``num_frames(num_samples)`` (2-3 fewer): ``extract`` returns
    FireRedASR's frames followed by zero frames (0 = FireRedASR's padding value after CMVN), so
    the first ``num_frames(num_samples)`` rows are exactly the released front end's features.

    The front end is built (and ``cmvn.ark`` read and checked) when the extractor is created; it is
    dropped when pickled (kaldi-native-fbank objects do not pickle) and rebuilt on first use in
    the receiving process (``--nj`` workers, dataloader workers).
    """

    name = "firered-fbank"
    config_type = FireRedFbankConfig

    def __init__(self, config=None):
        super().__init__(config)
        self._fe = None
        self.front_end  # bad cmvn.ark -> error now, not in a worker

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fe"] = None
        return state

    @property
    def front_end(self) -> FireRedFeatureExtractor:
        if self._fe is None:
            self._fe = FireRedFeatureExtractor(self.config.cmvn_path or None, dither=self.config.dither)
        return self._fe

    @property
    def frame_shift(self) -> float:
        return 0.01

    def feature_dim(self, sampling_rate: int) -> int:
        return FEATURE_DIM

    def extract(self, samples, sampling_rate: int) -> np.ndarray:
        samples = np.asarray(samples)
        if samples.ndim == 2:
            if samples.shape[0] != 1:
                raise ValueError(f"FireRedFbank expects mono audio, got shape {samples.shape}")
            samples = samples[0]
        feats = self.front_end.from_samples(np.round(samples * 32768.0), sampling_rate)
        want = compute_num_frames(samples.shape[0] / sampling_rate, self.frame_shift, sampling_rate)
        if feats.shape[0] > want:  # cannot happen with snip_edges framing; fail loudly if it ever does
            raise ValueError(f"FireRedASR fbank gave {feats.shape[0]} frames for {samples.shape[0]} samples, "
                             f"more than lhotse's {want}")
        return np.concatenate([feats, np.zeros((want - feats.shape[0], FEATURE_DIM), dtype=feats.dtype)])


def lhotse_extractor(cmvn_path: Union[str, Path, None] = None, dither: float = 0.0) -> FireRedFbank:
    """A lhotse ``FeatureExtractor`` computing FireRedASR features (registered as "firered-fbank")."""
    return FireRedFbank(FireRedFbankConfig(cmvn_path=str(cmvn_path or ""), dither=dither))


__all__ = [
    "lhotse_extractor",
    "FireRedFbank",
    "FireRedFbankConfig",
    "CmvnError",
    "check_length",
    "FireRedFeatureExtractor",
    "KaldiFbank",
    "load_wav_int16",
    "num_frames",
    "pad_features",
    "read_kaldi_cmvn",
]
