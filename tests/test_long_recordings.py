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


# --------------------------------------------------------------------------- llmasr.vad (pure functions)


def test_speech_segments_follow_silero_hysteresis_and_pad():
    f = vad.FRAME_SECONDS
    prob = np.zeros(200, dtype=np.float32)
    prob[10:40] = 0.9   # speech
    prob[40:45] = 0.4   # between the two thresholds: still speech
    prob[45:50] = 0.1   # 5 windows (0.16 s) of silence: shorter than min_silence, no cut
    prob[50:80] = 0.9
    prob[120:124] = 0.9  # 0.128 s: shorter than min_speech, dropped
    prob[150:170] = 0.9  # ends 30 windows before the end of the file
    segs = vad.speech_segments(prob, duration=200 * f, threshold=0.5, min_silence=0.3, speech_pad=0.1,
                               min_speech=0.25)
    assert segs == [(round(10 * f - 0.1, 3), round(80 * f + 0.1, 3)), (round(150 * f - 0.1, 3), round(170 * f + 0.1, 3))]
    # a gap shorter than two pads is shared in the middle; the pad stops at the file's start
    prob2 = np.zeros(100, dtype=np.float32)
    prob2[0:30] = 0.9
    prob2[40:70] = 0.9
    segs = vad.speech_segments(prob2, duration=100 * f, min_silence=0.3, speech_pad=0.5)
    assert segs == [(0.0, round(35 * f, 3)), (round(35 * f, 3), round(70 * f + 0.5, 3))]
    assert vad.speech_segments(np.zeros(50, dtype=np.float32), 50 * f) == []


def test_split_long_cuts_at_the_quietest_window():
    f = vad.FRAME_SECONDS
    energy = np.full(1000, -20.0, dtype=np.float32)  # 32 s of loud speech
    energy[150] = -60.0   # 4.8 s: outside the allowed window of a 25 s segment (7-18 s)
    energy[420] = -50.0   # 13.44 s: the quietest inside it
    energy[500] = -45.0
    assert vad.split_long([(0.0, 25.0)], energy, max_duration=18.0) == [(0.0, round(420.5 * f, 3)),
                                                                         (round(420.5 * f, 3), 25.0)]
    # short segments are kept as they are
    assert vad.split_long([(1.0, 5.0), (6.0, 9.0)], energy, max_duration=4.0) == [(1.0, 5.0), (6.0, 9.0)]


def test_split_long_never_leaves_a_piece_over_the_limit():
    rng = np.random.default_rng(0)
    f = vad.FRAME_SECONDS
    for limit in (1.0, 4.0, 7.5, 30.0):
        energy = rng.normal(-30, 10, size=int(400 / f)).astype(np.float32)
        segs = [(0.5, 2.0), (3.0, 3.0 + 2 * limit - 0.01), (80.0, 80.0 + 2 * limit + 0.2), (150.0, 390.0)]
        pieces = vad.split_long(segs, energy, limit)
        assert max(b - a for a, b in pieces) <= limit + 1e-9, limit
        assert min(b - a for a, b in pieces) >= min(1.0, limit / 4) - 1e-9, limit  # no tiny piece
        # the pieces tile the segments: same union, nothing lost
        assert sum(b - a for a, b in pieces) == pytest.approx(sum(b - a for a, b in segs), abs=1e-6)
        assert len(pieces) < 2 * sum(np.ceil((b - a) / limit) for a, b in segs)


def test_stream_resampler_blocks_equal_one_pass_and_the_true_signal():
    rate = 22050
    t = np.arange(2 * rate) / rate
    x = (np.sin(2 * np.pi * 440 * t) + 0.3 * np.sin(2 * np.pi * 3000 * t)).astype(np.float32)
    r = vad.StreamResampler(rate)
    whole = np.concatenate([r(x), r.flush()])
    r = vad.StreamResampler(rate)
    blocks = np.concatenate([r(x[i:i + 777]) for i in range(0, len(x), 777)] + [r.flush()])
    assert len(whole) == len(blocks) == 32000
    assert np.abs(whole - blocks).max() < 1e-5
    t16 = np.arange(32000) / 16000
    truth = np.sin(2 * np.pi * 440 * t16) + 0.3 * np.sin(2 * np.pi * 3000 * t16)
    assert np.abs(whole - truth)[200:-200].max() < 3e-3  # away from the edges' zero padding


def test_max_segment_duration_defaults_and_refusals():
    def args(*argv):
        return transcribe.get_parser().parse_args(list(argv))

    assert transcribe.max_segment_duration(args("--speech-encoder-type", "whisper")) == 30.0
    assert transcribe.max_segment_duration(args("--speech-encoder-type", "whisper", "--max-cut-duration", "20")) == 20.0
    assert transcribe.max_segment_duration(args("--speech-encoder-type", "large", "--max-cut-duration", "45")) == 45.0
    with pytest.raises(UserError, match="--max-segment-duration 31 is above the encoder's limit of 30 s"):
        transcribe.max_segment_duration(args("--speech-encoder-type", "whisper", "--max-segment-duration", "31"))
    with pytest.raises(UserError, match="above the encoder's limit of 30 s"):
        transcribe.max_segment_duration(args("--speech-encoder-type", "firered", "--max-segment-duration", "40"))


def test_vad_none_refuses_a_file_over_the_encoder_limit(tmp_path):
    """Before: Whisper's "input has 12516 frames; at most 3000" traceback after loading the model."""
    path = tmp_path / "long.wav"
    sf.write(str(path), np.zeros(16000 * 31, dtype=np.float32), 16000)
    args = transcribe.get_parser().parse_args(["--speech-encoder-type", "whisper", "--vad", "none"])
    with pytest.raises(UserError, match=rf"{path} \(utterance long\) is 31.0 s long, above the encoder's limit "
                                        rf"of 30 s: use --vad silero"):
        transcribe.segment_inputs([("long", path)], args)
    for flags, message in ((["--vad-threshold", "1.5"], "--vad-threshold 1.5: a speech probability"),
                           (["--vad-min-silence", "-1"], "--vad-min-silence -1: seconds, at least 0")):
        with pytest.raises(UserError, match=message):
            transcribe.segment_inputs([("long", path)], transcribe.get_parser().parse_args(flags))


# --------------------------------------------------------------------------- streaming VAD on speech


@pytest.mark.timeout(300)
def test_vad_streams_stereo_22khz_speech(tmp_path, caplog):
    """Two sentences 1.5 s apart, stereo (speech in one channel only) at 22.05 kHz, read in 1 s
    blocks: two segments, each starting within 0.5 s of its sentence."""
    from tests.helpers import require_binary

    require_binary("espeak-ng")
    require_binary("sox")
    a = _espeak("the red taxi is parked near the station", tmp_path / "a.wav")
    b = _espeak("my sister bought seven green apples", tmp_path / "b.wav")
    mono16 = np.concatenate([np.zeros(8000), a, np.zeros(24000), b, np.zeros(8000)]).astype(np.float32)
    starts = [0.5 + np.argmax(np.abs(a) > 0.01) / 16000, (8000 + len(a) + 24000 + np.argmax(np.abs(b) > 0.01)) / 16000]
    r = vad.StreamResampler(16000, 22050)
    mono22 = np.concatenate([r(mono16), r.flush()])
    path = tmp_path / "stereo.wav"
    sf.write(str(path), np.stack([mono22, np.zeros_like(mono22)], axis=1), 22050, subtype="PCM_16")
    with caplog.at_level(logging.INFO, logger="llmasr.vad"):
        scores = vad.frame_scores(path, block_seconds=1.0)
    assert f"{path}: 2 channels, averaged to mono" in caplog.text
    assert f"{path}: 22050 Hz, resampled to 16000 Hz" in caplog.text
    assert scores.duration == pytest.approx(len(mono22) / 22050)
    assert len(scores.prob) == int(np.ceil(len(mono16) / vad.WINDOW))
    segs = vad.split_long(vad.speech_segments(scores.prob, scores.duration), scores.energy_db, 30.0)
    assert len(segs) == 2, segs
    assert all(abs(s - seg[0]) <= 0.5 for s, seg in zip(starts, segs)), (starts, segs)


# --------------------------------------------------------------------------- transcribe (golden tiny model)


def _golden_argv(sl, exp, *extra):
    return ["--exp-dir", str(exp), "--checkpoint", "epoch-2.pt", "--num-workers", "0",
            "--llm-path", str(sl / "models/llm"), "--speech-encoder-type", "tiny_a",
            "--speech-encoder-path", str(sl / "models/zipformer/tiny_a/pretrained.pt"),
            "--max-new-tokens", "4", *map(str, extra)]


@pytest.fixture(scope="module")
def golden_inputs(sl, tmp_path_factory):
    import shutil

    from tests.helpers import require_binary

    require_binary("espeak-ng")
    require_binary("sox")
    root = tmp_path_factory.mktemp("long_golden")
    (root / "exp").mkdir()
    shutil.copy(sl / "exp/baseline/epoch-2.pt", root / "exp" / "epoch-2.pt")
    said = [_espeak(t, root / f"s{k}.wav") for k, t in enumerate(
        ["the red taxi is parked near the station", "my sister bought seven green apples",
         "we will meet at the library on monday"])]
    gap = np.zeros(24000, dtype=np.float32)
    # the long file at 22.05 kHz in stereo (the right channel silent): segments of a resampled downmix
    r = vad.StreamResampler(16000, 22050)
    long = np.concatenate([r(np.concatenate([gap, said[0], gap, said[1], gap, said[2], gap])), r.flush()])
    sf.write(str(root / "long.wav"), np.stack([long, np.zeros_like(long)], axis=1), 22050)
    sf.write(str(root / "short.wav"), said[0], 16000)
    sf.write(str(root / "silence.wav"), np.zeros(16000, dtype=np.float32), 16000)
    sf.write(str(root / "empty.wav"), np.zeros(0, dtype=np.float32), 16000)
    (root / "notes.wav").write_text("not audio")
    return root


@pytest.mark.timeout(600)
def test_transcribe_long_file_as_segments(sl, golden_inputs, caplog):
    root = golden_inputs
    seg_file, out_file = root / "segments.jsonl", root / "out.txt"
    files = [root / n for n in ("long.wav", "short.wav", "silence.wav", "empty.wav")]
    with caplog.at_level(logging.INFO):
        results = transcribe.main(_golden_argv(sl, root / "exp", *files, "--segments", seg_file, "--output", out_file,
                                               "--max-segment-duration", 2.0))
    assert [uid for uid, _ in results] == ["long", "short", "silence", "empty"]
    assert out_file.read_text() == "".join(f"{u}\t{t}\n" for u, t in results)
    texts = dict(results)
    assert texts["silence"] == texts["empty"] == ""
    assert f"{root / 'silence.wav'} (utterance silence): no speech found, empty transcript" in caplog.text
    assert f"{root / 'empty.wav'} (utterance empty): zero-length audio, empty transcript" in caplog.text
    assert f"{root / 'long.wav'}: 2 channels, averaged to mono" in caplog.text
    assert f"{root / 'long.wav'}: 22050 Hz, resampled to 16000 Hz" in caplog.text
    segs = [json.loads(line) for line in seg_file.read_text().splitlines()]
    long = [s for s in segs if s["id"] == "long"]
    # three sentences of 1.9-2.5 s, each padded: cut to pieces of at most 2 s
    assert len(long) >= 4 and all(0 < s["end"] - s["start"] <= 2.0 for s in long), long
    assert [s["start"] for s in long] == sorted(s["start"] for s in long)
    assert long[0]["start"] == pytest.approx(1.5, abs=0.5)
    assert texts["long"] == " ".join(s["text"] for s in long if s["text"])
    assert [s["id"] for s in segs] == ["long"] * len(long) + ["short"] * (len(segs) - len(long))


@pytest.mark.timeout(600)
def test_short_file_same_text_with_and_without_vad(sl, golden_inputs, capsys):
    root = golden_inputs
    seg_file = root / "short.jsonl"
    (with_vad,) = transcribe.main(_golden_argv(sl, root / "exp", root / "short.wav", "--segments", seg_file))
    (without,) = transcribe.main(_golden_argv(sl, root / "exp", root / "short.wav", "--vad", "none"))
    assert with_vad == without and with_vad[1], (with_vad, without)
    (seg,) = [json.loads(line) for line in seg_file.read_text().splitlines()]
    assert seg == {"id": "short", "start": 0.0, "end": round(sf.info(str(root / "short.wav")).duration, 3),
                   "text": with_vad[1]}
    # unreadable audio: one line naming the file
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        transcribe.main(_golden_argv(sl, root / "exp", root / "notes.wav"))
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"cannot read audio file {root / 'notes.wav'} (utterance notes)" in err


# --------------------------------------------------------------------------- the quick demo's trained model


def long_recording_wer(decode_args, env, out: Path) -> dict:
    """Transcribes a >= 90 s recording of 30 template sentences and the same sentences as separate
    files in one src/transcribe.py run; returns the segments, WERs (long-form and per-clip) and the
    share of sentence starts within 0.5 s of a segment start."""
    from llmasr.scoring import compute_error_stats, normalize_text

    rec = build_long_recording(out / "rec")
    seg_file = out / "segments.jsonl"
    proc = subprocess.run([sys.executable, str(REPO / "src" / "transcribe.py"), *decode_args, "--epoch", "1",
                           str(rec["long"]), *map(str, rec["clips"]), "--segments", str(seg_file)],
                          cwd=str(REPO), env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hyps = dict(line.split("\t", 1) for line in proc.stdout.splitlines())
    words = lambda s: normalize_text(s, "en").split()  # noqa: E731
    clip_ids = [p.stem for p in rec["clips"]]
    per_clip = compute_error_stats([(u, words(t), words(hyps[u])) for u, t in zip(clip_ids, rec["texts"])])
    long_form = compute_error_stats([("long", words(" ".join(rec["texts"])), words(hyps["long"]))])
    segs = [json.loads(line) for line in seg_file.read_text().splitlines()]
    long_segs = [s for s in segs if s["id"] == "long"]
    found = sum(any(abs(s["start"] - t) <= 0.5 for s in long_segs) for t in rec["starts"])
    return {"duration": rec["duration"], "segments": long_segs, "starts_found": found / len(rec["starts"]),
            "wer_long": long_form.percent, "wer_clips": per_clip.percent, "stderr": proc.stderr}


@pytest.mark.timeout(1800)
def test_long_recording_with_the_quick_demo_model(quick_demo, tmp_path):
    """Measured on the quick model (RESULTS in the README's "Long recordings")."""
    assert quick_demo.result is not None, quick_demo.output[-3000:]
    r = long_recording_wer(quick_demo.result["decode_args"], quick_demo.env, tmp_path)
    assert r["duration"] >= 90
    assert max(s["end"] - s["start"] for s in r["segments"]) <= 30.0  # the Whisper encoder's limit
    assert r["starts_found"] >= 0.8, (r["segments"], r["starts_found"])
    assert r["wer_long"] <= r["wer_clips"] + 5, (r["wer_long"], r["wer_clips"])


@pytest.mark.timeout(600)
def test_firered_speech2text_splits_files_over_the_limit(golden_dir, tmp_path, capsys):
    """The released-format AED (golden, random weights) with --max-segment-duration 5: a 10.6 s file
    of the three golden clips with 1.5 s gaps is decoded as three segments, one per clip; the clips
    themselves (under the limit) keep the release's results."""
    import torch

    import firered_speech2text

    root = golden_dir / "firered"
    exp = torch.load(root / "expected_aed.pt", weights_only=True)
    gap = np.zeros(24000, dtype=np.float32)
    parts, spans, pos = [gap], [], len(gap)
    for u in exp["utts"]:
        clip = sf.read(str(root / u["wav"]), dtype="float32")[0]
        parts += [clip, gap]
        spans.append((pos / 16000, (pos + len(clip)) / 16000))
        pos += len(clip) + len(gap)
    sf.write(str(tmp_path / "long.wav"), np.concatenate(parts), 16000, subtype="PCM_16")
    scp = tmp_path / "wav.scp"
    scp.write_text(f"long {tmp_path / 'long.wav'}\n" + "".join(f"{u['uttid']} {root / u['wav']}\n" for u in exp["utts"]))
    seg_file, out = tmp_path / "segments.jsonl", tmp_path / "aed.txt"
    results = firered_speech2text.main([
        "--asr-type", "aed", "--model-dir", str(root / "aed"), "--wav-scp", str(scp), "--output", str(out),
        "--batch-size", "2", "--beam-size", "3", "--nbest", "1", "--decode-max-len", "0",
        "--softmax-smoothing", "1.25", "--aed-length-penalty", "0.6", "--eos-penalty", "1.0",
        "--max-segment-duration", "5", "--segments", str(seg_file)])
    texts = dict(results)
    assert [u for u, _ in results] == ["long"] + [u["uttid"] for u in exp["utts"]]
    for u in exp["utts"]:
        assert texts[u["uttid"]] == u["beam"]["text"]
    segs = [json.loads(line) for line in seg_file.read_text().splitlines()]
    long = [s for s in segs if s["id"] == "long"]
    assert len(long) == 3, long
    for s, (a, b) in zip(long, spans):
        assert s["start"] <= a + 0.3 and s["end"] >= b - 0.3 and s["end"] - s["start"] <= 5.0, (s, a, b)
    assert texts["long"] == " ".join(s["text"] for s in long)
    assert out.read_text(encoding="utf-8") == "".join(f"{u}\t{t}\n" for u, t in results)
    with pytest.raises(SystemExit):
        firered_speech2text.main(["--asr-type", "llm", "--model-dir", str(root / "llm"), "--wav-scp", str(scp),
                                  "--max-segment-duration", "40"])
    assert "--max-segment-duration 40 is above FireRedASR-LLM's limit of 30 s" in capsys.readouterr().err


@pytest.mark.timeout(600)
def test_two_ranks_transcribe_what_one_process_does(sl, golden_inputs, tmp_path):
    """torchrun --nproc-per-node 2 src/transcribe.py: each rank segments and decodes a share of the
    files, rank 0 writes every file's line (input order) and segment; the same as one process."""
    import os
    import re

    root = golden_inputs
    files = [root / n for n in ("long.wav", "s1.wav", "short.wav", "silence.wav", "s2.wav")]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    outputs = {}
    for n in (1, 2):
        launcher = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc-per-node", "2"]
        out, segs = tmp_path / f"out{n}.txt", tmp_path / f"segments{n}.jsonl"
        p = subprocess.run(launcher + [str(REPO / "src" / "transcribe.py"), *_golden_argv(
            sl, root / "exp", *files, "--max-segment-duration", 2.0, "--output", out, "--segments", segs)],
            env=env, capture_output=True, text=True, timeout=500)
        assert p.returncode == 0, p.stderr[-4000:]
        outputs[n] = (p.stdout, out.read_text(), segs.read_text(), p.stderr)
    one, two = outputs[1], outputs[2]
    assert [line.split("\t")[0] for line in one[1].splitlines()] == ["long", "s1", "short", "silence", "s2"]
    assert two[:3] == (one[1], one[1], one[2])  # rank 0 printed and wrote it all, once
    shares = sorted(int(k) for k in re.findall(r"rank \d of 2: (\d+) files", two[3]))
    assert len(shares) == 2 and min(shares) >= 1 and sum(shares) == len(files), two[3][-3000:]
