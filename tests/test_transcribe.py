"""src/transcribe.py: its inputs and its one-line errors. Transcribing with a trained model is
tested on the quick demo's model (tests/test_demo.py::test_quick_demo_learns)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from llmasr.config import UserError
from llmasr.recipes import transcribe
from tests.helpers import REPO


def _wav(path, seconds=0.5, rate=16000):
    t = np.arange(int(seconds * rate)) / rate
    sf.write(str(path), (0.1 * np.sin(2 * np.pi * 220 * t)).astype("float32"), rate, subtype="PCM_16")
    return path


def test_inputs_files_and_wav_scp(tmp_path):
    a = _wav(tmp_path / "a.wav")
    b = _wav(tmp_path / "b.flac", rate=8000)
    scp = tmp_path / "wav.scp"
    scp.write_text(f"utt1 {a}\n\nutt2 {b}\n")
    assert transcribe.read_inputs([a], scp) == [("a", a), ("utt1", a), ("utt2", b)]
    cuts = transcribe.make_cuts(transcribe.read_inputs([b], None))
    (cut,) = list(cuts)
    assert cut.id == "b" and cut.sampling_rate == 8000 and abs(cut.duration - 0.5) < 1e-6


def test_input_errors_name_the_file(tmp_path):
    a = _wav(tmp_path / "a.wav")
    with pytest.raises(UserError, match="no input"):
        transcribe.read_inputs([], None)
    with pytest.raises(UserError, match=r"missing\.wav \(utterance missing\) does not exist"):
        transcribe.read_inputs([tmp_path / "missing.wav"], None)
    with pytest.raises(UserError, match="'a' .* occurs twice"):
        transcribe.read_inputs([a, a], None)
    scp = tmp_path / "wav.scp"
    scp.write_text(f"utt1 {a}\nutt2\n")
    with pytest.raises(UserError, match=r"wav\.scp:2: expected '<utt-id> <audio path>'"):
        transcribe.read_inputs([], scp)
    text = tmp_path / "notes.wav"
    text.write_text("not audio")
    with pytest.raises(UserError, match=r"cannot read audio file .*notes\.wav \(utterance notes\)"):
        transcribe.make_cuts([("notes", text)])


def test_cli_without_weights_is_one_line_error(tmp_path):
    a = _wav(tmp_path / "a.wav")
    (tmp_path / "exp").mkdir()
    proc = subprocess.run([sys.executable, str(REPO / "src" / "transcribe.py"), "--exp-dir", str(tmp_path / "exp"),
                           str(a)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "transcribe.py: error: say which weights to use: --checkpoint FILE, or --epoch N [--avg K] (or --iter)")
    proc = subprocess.run([sys.executable, str(REPO / "src" / "transcribe.py"), "--exp-dir", str(tmp_path / "exp"),
                           "--checkpoint", "nope.pt", str(a)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1 and "--checkpoint nope.pt" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.timeout(120)
def test_any_sampling_rate_gives_the_16khz_features(tmp_path):
    """espeak-ng speaks at 22.05 kHz; the same clip resampled to 16 kHz by sox. transcribe's front end
    (Whisper features, as the demo's model) gives both nearly the same features, in the input order;
    unresampled 22.05 kHz audio read as 16 kHz would be 38 % slower speech and other features."""
    from tests.helpers import require_binary

    require_binary("espeak-ng")
    require_binary("sox")
    native = tmp_path / "native.wav"
    subprocess.run(["espeak-ng", "-w", str(native), "the red taxi is parked near the station"], check=True)
    assert sf.info(str(native)).samplerate == 22050
    at16k = tmp_path / "at16k.wav"
    subprocess.run(["sox", str(native), "-r", "16000", str(at16k)], check=True)

    args = transcribe.get_parser().parse_args(["--feature-type", "whisper", "--num-workers", "0"])
    cuts = transcribe.make_cuts(transcribe.read_inputs([native, at16k], None))
    feats = {}
    for batch in transcribe.feature_loader(args, cuts):
        for cut_id, f, n in zip(batch["cut_ids"], batch["features"], batch["feature_lens"]):
            feats[cut_id] = f[: int(n)]
    a, b = feats["native"], feats["at16k"]
    assert abs(a.shape[0] - b.shape[0]) <= 1, (a.shape, b.shape)
    n = min(a.shape[0], b.shape[0])
    rel = ((a[:n] - b[:n]).norm() / (b[:n] - b[:n].mean()).norm()).item()
    assert rel < 0.1, rel  # two resamplers: small differences only
