"""CTranslate2 Whisper-base -> openai-whisper converter: format parsing, errors, real conversion."""
from __future__ import annotations

import hashlib
import os
import re
import struct
import subprocess

import numpy as np
import pytest
import torch

from tests.helpers import DEMO_MODEL_PACKAGES, require_binary, require_distribution, require_module  # noqa: E402
from llmasr.demo import ct2_whisper  # noqa: E402
from llmasr.demo.ct2_whisper import CT2FormatError, read_ct2_model, reassemble  # noqa: E402

# Sentences Whisper-base transcribes from espeak-ng's en-us voice (checked by listening to the
# model, not to this code); numbers and names avoided where Whisper formats them differently.
SENTENCES = [
    "please open the door",
    "we are going to the market tomorrow morning",
    "my name is john and i live in london",
]


def _installed_parts():
    """The Whisper-base parts (local/setup.sh installs their packages): missing -> failure, not a skip."""
    require_distribution(*DEMO_MODEL_PACKAGES[1:])
    return ct2_whisper.find_installed_parts()


@pytest.fixture(scope="module")
def whisper():
    return require_module("whisper")  # openai-whisper (requirements.txt)


# --- a small CTranslate2 file written by the test itself, following the documented layout ------


def _ct2_string(s: str) -> bytes:
    raw = s.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def _ct2_file(version=6, spec="WhisperSpec", revision=3, variables=(), aliases=()) -> bytes:
    type_ids = {np.dtype("float32"): 0, np.dtype("int8"): 1, np.dtype("int16"): 2, np.dtype("int32"): 3, np.dtype("float16"): 4}
    out = struct.pack("<I", version) + _ct2_string(spec) + struct.pack("<I", revision)
    out += struct.pack("<I", len(variables))
    for name, arr in variables:
        arr = np.asarray(arr)  # (ascontiguousarray would turn a scalar into shape (1,))
        out += _ct2_string(name) + struct.pack("<B", arr.ndim)
        out += b"".join(struct.pack("<I", d) for d in arr.shape)
        out += struct.pack("<B", type_ids[arr.dtype]) + struct.pack("<I", arr.nbytes) + arr.tobytes()
    out += struct.pack("<I", len(aliases))
    for alias, target in aliases:
        out += _ct2_string(alias) + _ct2_string(target)
    return out


SMALL_VARS = [
    ("encoder/conv1/weight", np.arange(24, dtype=np.float16).reshape(4, 2, 3)),
    ("encoder/num_heads", np.array(8, dtype=np.int16)),
    ("decoder/embeddings/weight", np.linspace(-1, 1, 10, dtype=np.float32).reshape(5, 2)),
    ("some/int8", np.array([-3, 7], dtype=np.int8)),
]


def test_parse_small_ct2_file(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(_ct2_file(variables=SMALL_VARS, aliases=[("decoder/projection/weight", "decoder/embeddings/weight")]))
    model = read_ct2_model(path)
    assert (model.binary_version, model.spec_name, model.revision) == (6, "WhisperSpec", 3)
    assert list(model.variables) == [name for name, _ in SMALL_VARS]
    for name, arr in SMALL_VARS:
        t = model.variables[name]
        assert tuple(t.shape) == arr.shape
        assert np.array_equal(t.numpy(), arr) and t.numpy().dtype == arr.dtype
    assert model.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert torch.equal(model.get("decoder/projection/weight"), model.variables["decoder/embeddings/weight"])


def test_wrong_spec_name(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(_ct2_file(spec="TransformerSpec", variables=SMALL_VARS))
    with pytest.raises(CT2FormatError, match=r"spec is 'TransformerSpec', expected 'WhisperSpec'"):
        read_ct2_model(path)


def test_unsupported_version(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(_ct2_file(version=2, variables=SMALL_VARS))
    with pytest.raises(CT2FormatError, match="binary version 2 is not supported"):
        read_ct2_model(path)


def test_truncated_small_file(tmp_path):
    data = _ct2_file(variables=SMALL_VARS)
    path = tmp_path / "model.bin"
    path.write_bytes(data[:-20])
    with pytest.raises(CT2FormatError, match="truncated"):
        read_ct2_model(path)


def test_sha256_mismatch_on_reassembly(tmp_path):
    a, b = tmp_path / "a.part1", tmp_path / "b.part2"
    a.write_bytes(b"first half ")
    b.write_bytes(b"second half")
    good = hashlib.sha256(b"first half second half").hexdigest()
    out = reassemble([a, b], tmp_path / "model.bin", good)
    assert out.read_bytes() == b"first half second half"
    with pytest.raises(ValueError, match="sha256 mismatch"):
        reassemble([b, a], tmp_path / "swapped.bin", good)  # wrong order -> wrong hash
    assert not (tmp_path / "swapped.bin").exists() and not list(tmp_path.glob("*.tmp"))


def test_truncated_real_file(tmp_path):
    part1 = _installed_parts()[0]
    with open(part1, "rb") as f:
        head = f.read(5_000_000)
    path = tmp_path / "truncated.bin"
    path.write_bytes(head)
    with pytest.raises(CT2FormatError, match=r"truncated.*need \d+ bytes for data of decoder/"):
        read_ct2_model(path)
    # The CLI refuses the half file by its hash.
    with pytest.raises(ValueError, match="sha256 mismatch"):
        ct2_whisper.main(["--model-bin", str(part1), "--output", str(tmp_path / "x.pt")])


# --- the real Whisper-base ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    _installed_parts()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    out = tmp_path_factory.mktemp("ct2") / "whisper-base.pt"
    ct2_whisper.convert_installed_whisper_base(out)
    return out


@pytest.fixture(scope="module")
def espeak_audio(tmp_path_factory):
    espeak, sox = require_binary("espeak-ng"), require_binary("sox")
    import soundfile as sf

    d = tmp_path_factory.mktemp("espeak")
    audios = []
    for i, text in enumerate(SENTENCES):
        raw, wav = d / f"{i}.raw.wav", d / f"{i}.wav"
        subprocess.run([espeak, "-v", "en-us", "-s", "150", "-w", str(raw), text], check=True)
        subprocess.run([sox, str(raw), "-r", "16000", "-c", "1", "-b", "16", str(wav)], check=True)
        audio, sr = sf.read(wav, dtype="float32")
        assert sr == 16000
        audios.append(audio)
    return audios


def _wer(refs, hyps) -> float:
    import jiwer

    def norm(s):
        return re.sub(r"[^a-z' ]", " ", s.lower()).split()

    return jiwer.wer([" ".join(norm(r)) for r in refs], [" ".join(norm(h)) for h in hyps])


def test_converted_checkpoint_is_whisper_base(converted, whisper):
    ckpt = torch.load(converted, map_location="cpu", weights_only=True)
    assert ckpt["dims"] == dict(
        n_mels=80, n_audio_ctx=1500, n_audio_state=512, n_audio_head=8, n_audio_layer=6,
        n_vocab=51865, n_text_ctx=448, n_text_state=512, n_text_head=8, n_text_layer=6,
    )
    sd = ckpt["model_state_dict"]
    assert "encoder.blocks.0.attn.key.bias" not in sd and "encoder.blocks.0.attn.query.bias" in sd
    assert sum(v.numel() for v in sd.values()) == 72_593_920  # Whisper-base's published 74M incl. the fixed sinusoids
    model = whisper.model.Whisper(whisper.model.ModelDimensions(**ckpt["dims"]))
    model.load_state_dict(sd, strict=True)


def test_converted_whisper_transcribes_espeak(converted, espeak_audio, whisper):
    model = whisper.load_model(str(converted), device="cpu")  # the package's own loader
    mels = torch.stack([whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(a))) for a in espeak_audio])
    options = whisper.DecodingOptions(language="en", fp16=False, without_timestamps=True, temperature=0.0)
    results = whisper.decode(model, mels, options)
    hyps = [r.text for r in results]
    wer = _wer(SENTENCES, hyps)
    assert wer <= 0.15, (wer, hyps)


def test_ct2_runtime_gives_same_encoder_output(converted, espeak_audio, tmp_path, whisper):
    ctranslate2 = require_module("ctranslate2", "the CTranslate2 runtime cross-check")
    from llmasr.encoders import build_speech_encoder

    parts = _installed_parts()
    model_dir = tmp_path / "ct2"
    model_dir.mkdir()
    reassemble(parts, model_dir / "model.bin", ct2_whisper.WHISPER_BASE_CT2_SHA256)
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        src = parts[0].parent / name
        if src.is_file():
            (model_dir / name).symlink_to(src)
    ct2 = ctranslate2.models.Whisper(str(model_dir), device="cpu", compute_type="float32", intra_threads=1)

    def ct2_encode(x):  # x: (N, 80, T)
        out = ct2.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(x.numpy())), to_cpu=True)
        return torch.from_numpy(np.array(out))

    # Our encoder loads the converted checkpoint; at 3000 frames it equals openai-whisper's own
    # encoder (tests/test_whisper_encoder.py), and it cuts positions for shorter inputs as
    # CTranslate2 does. A 6 s input keeps the test cheap.
    enc = build_speech_encoder("whisper-base", str(converted))
    audio = torch.from_numpy(espeak_audio[1][: 16000 * 6])
    mel = whisper.log_mel_spectrogram(audio)[None]  # (1, 80, T)
    t = mel.shape[-1]
    ours, lens = enc(mel.transpose(1, 2), torch.tensor([t]))
    theirs = ct2_encode(mel)
    assert lens.tolist() == [(t - 1) // 2 + 1] and theirs.shape == ours.shape == (1, (t - 1) // 2 + 1, 512)
    # Same fp16 weights, fp32 compute, different kernels: measured max |diff| ~5e-4 on outputs
    # whose max magnitude is ~25.
    assert ours.abs().max() > 1.0
    assert (ours - theirs).abs().max() < 5e-3
