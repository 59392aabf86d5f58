"""Voice activity detection for long recordings: speech segments no longer than a maximum duration.

A file is streamed in blocks (soundfile), mixed down to mono (channels averaged), resampled to 16 kHz
when needed, and scored by silero-vad's model (shipped inside the ``silero-vad`` wheel: nothing is
downloaded) one 32 ms window at a time, together with each window's energy. Only the per-window
scores (two floats per 32 ms) are kept, so an hour of audio never sits in memory.

From the scores, pure functions (unit-tested on synthetic scores):

* :func:`speech_segments`: silero's hysteresis (speech starts at ``threshold``, ends after
  ``min_silence`` below ``threshold - 0.15``), segments shorter than ``min_speech`` dropped, each
  padded by ``speech_pad`` (a gap shorter than two pads is split in the middle);
* :func:`split_long`: a segment longer than ``max_duration`` is cut at its quietest window (lowest
  energy) inside the window of allowed cut points, so that no piece exceeds ``max_duration``.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import soundfile as sf
import torch

from llmasr.config import UserError

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
WINDOW = 512  # silero's window at 16 kHz
FRAME_SECONDS = WINDOW / SAMPLE_RATE

# Defaults. silero's own are threshold 0.5, min silence 0.1 s, pad 0.03 s (tuned for voice chat).
# For recognition a 0.1 s silence is often a pause inside a sentence (a comma, a stop consonant):
# cutting there takes the LLM's context away, so a segment ends after 0.5 s of silence; 0.2 s of
# padding keeps soft onsets and word endings that the 0.03 s pad clips.
THRESHOLD = 0.5
MIN_SILENCE = 0.5
SPEECH_PAD = 0.2
MIN_SPEECH = 0.25


@dataclass
class FrameScores:
    """Per 32 ms window of a file: silero's speech probability and the log energy (dB)."""

    prob: np.ndarray
    energy_db: np.ndarray
    duration: float  # seconds of the (original) file
    sampling_rate: int
    channels: int


# ----------------------------------------------------------------------------- resampling


def _sinc_kernel(orig: int, new: int, zeros: int = 6, rolloff: float = 0.99) -> Tuple[torch.Tensor, int]:
    """Windowed-sinc (Hann) polyphase kernel for ``orig`` -> ``new`` samples (both divided by their
    gcd): output ``t * new + p`` reads input ``t * orig - width .. t * orig + orig + width``."""
    cutoff = min(orig, new) * rolloff
    width = math.ceil(zeros * orig / cutoff)
    idx = torch.arange(-width, width + orig, dtype=torch.float64) / orig
    t = (idx[None, :] - torch.arange(new, dtype=torch.float64)[:, None] / new) * cutoff
    t = t.clamp(-zeros, zeros)
    window = torch.cos(t * math.pi / zeros / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / torch.where(t == 0, torch.ones_like(t), t))
    kernel = (sinc * window * cutoff / orig).to(torch.float32)
    return kernel[:, None, :], width


class StreamResampler:
    """Resamples a stream fed in blocks of any size to 16 kHz; the output equals resampling the
    concatenated blocks at once (the kernel's context is carried over between blocks)."""

    def __init__(self, rate: int, new_rate: int = SAMPLE_RATE):
        g = math.gcd(rate, new_rate)
        self.orig, self.new = rate // g, new_rate // g
        self.kernel, self.width = _sinc_kernel(self.orig, self.new)
        self.buf = np.zeros(self.width, dtype=np.float32)  # the stream starts with `width` zeros
        self.n_in = 0
        self.n_out = 0

    def _run(self, final: bool) -> np.ndarray:
        k = self.kernel.shape[-1]
        groups = (len(self.buf) - k) // self.orig + 1 if len(self.buf) >= k else 0
        if groups <= 0:
            return np.zeros(0, dtype=np.float32)
        x = torch.from_numpy(self.buf[: (groups - 1) * self.orig + k])[None, None]
        y = torch.nn.functional.conv1d(x, self.kernel, stride=self.orig)[0].t().reshape(-1).numpy()
        self.buf = self.buf[groups * self.orig:]
        if final:  # only the outputs of real input samples
            y = y[: max(0, math.ceil(self.n_in * self.new / self.orig) - self.n_out)]
        self.n_out += len(y)
        return y

    def __call__(self, block: np.ndarray) -> np.ndarray:
        self.n_in += len(block)
        self.buf = np.concatenate([self.buf, block.astype(np.float32)])
        return self._run(False)

    def flush(self) -> np.ndarray:
        self.buf = np.concatenate([self.buf, np.zeros(self.width + 2 * self.orig, dtype=np.float32)])
        return self._run(True)


# ----------------------------------------------------------------------------- streaming scores


def load_model():
    """silero-vad's TorchScript model from inside its wheel (never a download)."""
    try:
        from silero_vad import load_silero_vad
    except ModuleNotFoundError:
        raise UserError("--vad silero needs the silero-vad package (pip install silero-vad==6.2.3), "
                        "or use --vad none") from None
    return load_silero_vad()


def open_audio(path: Path) -> sf.SoundFile:
    try:
        return sf.SoundFile(str(path))
    except Exception as e:  # libsndfile says why in its own words
        raise UserError(f"cannot read audio file {path}: {e}") from None


def _blocks16k(path: Path, block_seconds: float):
    """Yields (mono 16 kHz float32 block, seconds of the original read so far); logs what is done
    to multi-channel / non-16 kHz audio."""
    with open_audio(path) as f:
        rate, channels = f.samplerate, f.channels
        if channels > 1:
            logger.info(f"{path}: {channels} channels, averaged to mono")
        if rate != SAMPLE_RATE:
            logger.info(f"{path}: {rate} Hz, resampled to {SAMPLE_RATE} Hz")
        resample = StreamResampler(rate) if rate != SAMPLE_RATE else None
        done = 0
        while True:
            try:
                block = f.read(int(block_seconds * rate), dtype="float32", always_2d=True)
            except Exception as e:
                raise UserError(f"cannot read audio file {path}: {e}") from None
            if len(block) == 0:
                break
            done += len(block)
            mono = block.mean(axis=1) if channels > 1 else block[:, 0]
            yield (resample(mono) if resample else mono), done / rate
        if resample is not None:
            yield resample.flush(), done / rate


def frame_scores(path: Path, model=None, block_seconds: float = 30.0, log_interval: float = 30.0) -> FrameScores:
    """Streams ``path`` and scores every 32 ms window (the last one zero-padded, as silero does)."""
    model = load_model() if model is None else model
    with open_audio(path) as f:
        rate, channels, total = f.samplerate, f.channels, f.frames / f.samplerate
    model.reset_states()
    probs: List[float] = []
    energy: List[float] = []
    rest = np.zeros(0, dtype=np.float32)
    start = last = time.time()
    for block, seconds in _blocks16k(path, block_seconds):
        rest = np.concatenate([rest, block])
        n = len(rest) // WINDOW
        _score(model, rest[: n * WINDOW], probs, energy)
        rest = rest[n * WINDOW:]
        now = time.time()
        if now - last >= log_interval and total > 0:
            last = now
            eta = (now - start) / max(seconds, 1e-9) * (total - seconds)
            logger.info(f"VAD {path}: {seconds:.0f}/{total:.0f} s, ETA {eta:.0f} s")
    if len(rest):
        _score(model, np.pad(rest, (0, WINDOW - len(rest))), probs, energy)
    return FrameScores(np.asarray(probs, dtype=np.float32), np.asarray(energy, dtype=np.float32), total,
                       rate, channels)


def _score(model, samples: np.ndarray, probs: List[float], energy: List[float]) -> None:
    if not len(samples):
        return
    windows = torch.from_numpy(np.ascontiguousarray(samples)).view(-1, WINDOW)
    with torch.inference_mode():
        for w in windows:
            probs.append(float(model(w[None], SAMPLE_RATE)))
    energy.extend((10 * torch.log10(windows.pow(2).mean(dim=1) + 1e-10)).tolist())


# ----------------------------------------------------------------------------- segments (pure)


def speech_segments(prob: np.ndarray, duration: float, threshold: float = THRESHOLD,
                    min_silence: float = MIN_SILENCE, speech_pad: float = SPEECH_PAD,
                    min_speech: float = MIN_SPEECH, frame: float = FRAME_SECONDS) -> List[Tuple[float, float]]:
    """(start, end) seconds of speech from per-window probabilities (silero's rules, see the module)."""
    neg = max(threshold - 0.15, 0.01)
    raw = []
    begin, quiet_since = None, None
    for i, p in enumerate(prob):
        if begin is None:
            if p >= threshold:
                begin, quiet_since = i, None
            continue
        if p >= threshold:
            quiet_since = None
        elif p < neg and quiet_since is None:
            quiet_since = i
        if quiet_since is not None and (i + 1 - quiet_since) * frame >= min_silence:
            raw.append((begin * frame, quiet_since * frame))
            begin, quiet_since = None, None
    if begin is not None:
        raw.append((begin * frame, (quiet_since if quiet_since is not None else len(prob)) * frame))
    raw = [(a, min(b, duration)) for a, b in raw if b - a >= min_speech]
    out = []
    for k, (a, b) in enumerate(raw):
        lo = max(0.0, a - speech_pad) if k == 0 else max(a - speech_pad, (raw[k - 1][1] + a) / 2)
        hi = min(duration, b + speech_pad) if k == len(raw) - 1 else min(b + speech_pad, (b + raw[k + 1][0]) / 2)
        out.append((round(lo, 3), round(hi, 3)))
    return out


def split_long(segments: List[Tuple[float, float]], energy_db: np.ndarray, max_duration: float,
               frame: float = FRAME_SECONDS) -> List[Tuple[float, float]]:
    """Cuts every segment longer than ``max_duration`` at its quietest window (lowest ``energy_db``;
    a cut is the middle of that window). The allowed cut points keep every piece within
    ``max_duration``: for a segment up to twice the limit, those leaving both halves within it (and
    no piece under a quarter of the limit or 1 s: an encoder may refuse a tiny input); longer ones
    lose a first piece of between half the limit and the limit."""
    if max_duration <= 2 * frame:
        raise ValueError(f"max_duration {max_duration} s is below two VAD windows")
    shortest = min(1.0, max_duration / 4)
    out = []
    for start, end in segments:
        while end - start > max_duration:
            if end - start <= 2 * max_duration:
                lo, hi = max(end - max_duration, start + shortest), min(start + max_duration, end - shortest)
            else:
                lo, hi = start + max_duration / 2, start + max_duration
            out.append((start, _quietest(energy_db, lo, hi, frame)))
            start = out[-1][1]
        out.append((start, end))
    return out


def _quietest(energy_db: np.ndarray, lo: float, hi: float, frame: float) -> float:
    """The middle of the quietest window whose middle lies in [lo, hi] (``hi`` itself if none)."""
    first = max(0, math.ceil(lo / frame - 0.5))
    last = min(len(energy_db) - 1, math.floor(hi / frame - 0.5))
    if last < first:
        return round(hi, 3)
    i = first + int(np.argmin(energy_db[first: last + 1]))
    return round(min(max((i + 0.5) * frame, lo), hi), 3)


def segment_file(path: Path, max_duration: float, threshold: float = THRESHOLD, min_silence: float = MIN_SILENCE,
                 speech_pad: float = SPEECH_PAD, model=None,
                 on_scores: Optional[Callable[[FrameScores], None]] = None) -> Tuple[List[Tuple[float, float]], float]:
    """(speech segments no longer than ``max_duration``, file duration) of one file."""
    scores = frame_scores(path, model)
    if on_scores is not None:
        on_scores(scores)
    segs = speech_segments(scores.prob, scores.duration, threshold, min_silence, speech_pad)
    return split_long(segs, scores.energy_db, max_duration), scores.duration
