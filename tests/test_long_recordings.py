"""Long recordings: llmasr.vad (streaming VAD scores, segments, splitting at the quietest point) and
src/transcribe.py's --vad / --segments on recordings longer than the model's limit."""
from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from llmasr import vad
from llmasr.config import UserError
from llmasr.recipes import transcribe
from tests.helpers import REPO

VOICE = ("en-us+m3", 160, 50)  # espeak-ng voice, words per minute, pitch: a test-set-like speaker


def _espeak(text: str, path: Path, voice=VOICE) -> np.ndarray:
    """16 kHz mono float32 speech of ``text`` (espeak-ng, resampled by sox as the demo's corpus)."""
    wav = subprocess.run(["espeak-ng", "--stdout", "-v", voice[0], "-s", str(voice[1]), "-p", str(voice[2]), text],
                         check=True, capture_output=True).stdout
    subprocess.run(["sox", "-D", "-V1", "-t", "wav", "-", "-r", "16000", "-c", "1", "-b", "16", str(path)],
                   input=wav, check=True, capture_output=True)
    return sf.read(str(path), dtype="float32")[0]


def build_long_recording(out: Path, num_sentences: int = 30, seed: int = 27) -> dict:
    """Template sentences as separate clips and as one recording, with 0.7-2 s pauses between the
    clips. ``starts``: where each sentence's speech begins in the recording (first sample above
    1 % of the clip's peak, after espeak-ng's own leading silence)."""
    from llmasr.demo.espeak import generate_sentences

    out.mkdir(parents=True, exist_ok=True)
    texts = generate_sentences("en", num_sentences, seed=seed)
    rng = random.Random(seed)
    parts, starts, clips, pos = [], [], [], 0
    for k, text in enumerate(texts):
        clip = _espeak(text, out / f"clip{k:02d}.wav")
        clips.append(out / f"clip{k:02d}.wav")
        pause = np.zeros(int(16000 * rng.uniform(0.7, 2.0)), dtype=np.float32)
        lead = int(np.argmax(np.abs(clip) > 0.01 * np.abs(clip).max()))
        starts.append((pos + len(pause) + lead) / 16000)
        parts += [pause, clip]
        pos += len(pause) + len(clip)
    audio = np.concatenate(parts + [np.zeros(16000, dtype=np.float32)])
    sf.write(str(out / "long.wav"), audio, 16000, subtype="PCM_16")
    return {"long": out / "long.wav", "clips": clips, "texts": texts, "starts": starts,
            "duration": len(audio) / 16000}
