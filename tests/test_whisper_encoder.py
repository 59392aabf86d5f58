"""Whisper speech encoder: parity with openai-whisper, variable length, checkpoint formats, features."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import require_module  # noqa: E402

whisper = require_module("whisper")  # openai-whisper (requirements.txt): missing -> failure, not a skip
from whisper.model import ModelDimensions, Whisper  # noqa: E402

from llmasr.encoders import available_encoders, build_speech_encoder  # noqa: E402
from llmasr.encoders.whisper import WhisperEncoder, whisper_log_mel  # noqa: E402

# 64-dim heads like every released Whisper, so the head count is inferable from shapes.
DIMS = ModelDimensions(
    n_mels=80, n_audio_ctx=1500, n_audio_state=128, n_audio_head=2, n_audio_layer=2,
    n_vocab=300, n_text_ctx=16, n_text_state=128, n_text_head=2, n_text_layer=1,
)


@pytest.fixture(scope="module")
def tiny_whisper():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = Whisper(DIMS).eval()
    # Random init leaves LayerNorms at identity; perturb them so that a wrongly mapped
    # LayerNorm would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _encoder_from(model: Whisper, **kw) -> WhisperEncoder:
    enc = WhisperEncoder.from_dims(model.dims, **kw)
    enc.load_state_dict(model.encoder.state_dict())
    return enc


def _icefall_patch_forward(audio_encoder, mel_nft: torch.Tensor) -> torch.Tensor:
    """The forward icefall's whisper_encoder_forward_monkey_patch installs (restated from its definition)."""
    x = F.gelu(audio_encoder.conv1(mel_nft))
    x = F.gelu(audio_encoder.conv2(x))
    x = x.permute(0, 2, 1)
    x = (x + audio_encoder.positional_embedding[: x.shape[1], :]).to(x.dtype)
    for block in audio_encoder.blocks:
        x = block(x)
    return audio_encoder.ln_post(x)


def test_full_30s_matches_openai_whisper(tiny_whisper):
    enc = _encoder_from(tiny_whisper)
    feats = torch.randn(2, 3000, 80)
    out, out_lens = enc(feats, torch.tensor([3000, 3000]))
    with torch.no_grad():
        ref = tiny_whisper.encoder(feats.transpose(1, 2))  # the package's own forward (asserts 3000 frames)
    assert out.shape == (2, 1500, 128)
    assert out_lens.tolist() == [1500, 1500]
    assert torch.allclose(out, ref, atol=1e-5, rtol=0), (out - ref).abs().max()


@pytest.mark.parametrize("num_frames", [1000, 1001, 57])
def test_short_input_matches_icefall_patch(tiny_whisper, num_frames):
    enc = _encoder_from(tiny_whisper)
    feats = torch.randn(1, num_frames, 80)
    out, out_lens = enc(feats, torch.tensor([num_frames]))
    with torch.no_grad():
        ref = _icefall_patch_forward(tiny_whisper.encoder, feats.transpose(1, 2))
    expected_len = (num_frames - 1) // 2 + 1
    assert out.shape[1] == ref.shape[1] == expected_len
    assert out_lens.tolist() == [expected_len]
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)


def test_padded_batch_equals_each_utterance_alone(tiny_whisper):
    enc = _encoder_from(tiny_whisper)
    lens = [800, 613, 200]
    utts = [torch.randn(n, 80) for n in lens]
    # Pad with large values: masking must make them irrelevant.
    batch = torch.full((3, 800, 80), 5.0)
    for i, u in enumerate(utts):
        batch[i, : len(u)] = u
    out, out_lens = enc(batch, torch.tensor(lens))
    assert out_lens.tolist() == [400, 307, 100]
    for i, u in enumerate(utts):
        alone, alone_len = enc(u[None], torch.tensor([len(u)]))
        n = alone_len.item()
        assert torch.allclose(out[i, :n], alone[0], atol=1e-5, rtol=0), (i, (out[i, :n] - alone[0]).abs().max())


def test_mask_padding_false_reproduces_icefall_batch_behaviour(tiny_whisper):
    enc = _encoder_from(tiny_whisper, mask_padding=False)
    batch = torch.randn(2, 600, 80)
    out, _ = enc(batch, torch.tensor([600, 300]))
    with torch.no_grad():
        ref = _icefall_patch_forward(tiny_whisper.encoder, batch.transpose(1, 2))
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)
    # ... and there the padding leaks into the shorter utterance, unlike the default.
    masked, _ = _encoder_from(tiny_whisper)(batch, torch.tensor([600, 300]))
    assert (masked[1, :150] - out[1, :150]).abs().max() > 1e-3


def test_plain_module_freezing_is_the_owners(tiny_whisper):
    # Freezing, train/eval mode and no_grad belong to SpeechLLM (tests/test_encoder_freezing.py):
    # the encoder itself follows train()/requires_grad like any module.
    enc = _encoder_from(tiny_whisper)
    enc.train()
    assert enc.training and all(p.requires_grad for p in enc.parameters())
    out, _ = enc(torch.randn(1, 100, 80), torch.tensor([100]))
    out.sum().backward()
    assert enc.conv1.weight.grad.abs().sum() > 0 and enc.blocks[0].attn.query.weight.grad.abs().sum() > 0


def test_input_checks(tiny_whisper):
    enc = _encoder_from(tiny_whisper)
    with pytest.raises(ValueError, match="at most 3000"):
        enc(torch.randn(1, 3001, 80), torch.tensor([3001]))
    with pytest.raises(ValueError, match=r"\(N, T, 80\)"):
        enc(torch.randn(1, 100, 128), torch.tensor([100]))


def test_attributes_and_registry(tiny_whisper):
    enc = _encoder_from(tiny_whisper)
    assert (enc.output_dim, enc.feature_dim, enc.feature_type) == (128, 80, "whisper-mel")
    names = available_encoders()
    assert "whisper" in names and "whisper-large-v2" in names and "whisper-large-v3" in names


def _save(obj, path):
    torch.save(obj, path)
    return str(path)


def test_load_checkpoint_formats(tiny_whisper, tmp_path):
    sd = tiny_whisper.state_dict()
    feats = torch.randn(1, 300, 80)
    with torch.no_grad():
        ref = _icefall_patch_forward(tiny_whisper.encoder, feats.transpose(1, 2))
    half = {k: v.half() for k, v in sd.items()}  # openai ships fp16 weights
    files = {
        "openai": _save({"dims": DIMS.__dict__, "model_state_dict": sd}, tmp_path / "openai.pt"),
        "openai_fp16": _save({"dims": DIMS.__dict__, "model_state_dict": half}, tmp_path / "openai16.pt"),
        "icefall_avg": _save(sd, tmp_path / "epoch-10-avg-6.pt"),  # decode.py: torch.save(model.state_dict())
        # icefall save_checkpoint(): DDP prefix and non-tensor objects (needs weights_only=False)
        "icefall_ckpt": _save(
            {"model": {f"module.{k}": v for k, v in sd.items()}, "params": {"exp_dir": Path("exp")}},
            tmp_path / "epoch-3.pt",
        ),
        "encoder_only": _save(tiny_whisper.encoder.state_dict(), tmp_path / "enc.pt"),
    }
    for kind, path in files.items():
        enc = build_speech_encoder("whisper", path)
        assert isinstance(enc, WhisperEncoder), kind
        assert enc.n_head == 2 and len(enc.blocks) == 2, kind
        out, _ = enc(feats, torch.tensor([300]))
        tol = 5e-2 if kind == "openai_fp16" else 1e-5
        assert torch.allclose(out, ref, atol=tol, rtol=0), (kind, (out - ref).abs().max())
        assert enc.conv1.weight.dtype == torch.float32


def test_load_errors(tiny_whisper, tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        build_speech_encoder("whisper", "large-v2")
    bad = tmp_path / "notes.txt"
    bad.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.txt"):
        build_speech_encoder("whisper", str(bad))
    other = _save({"model": {"linear.weight": torch.zeros(2, 2)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="no Whisper encoder weights.*other.pt|other.pt.*no Whisper encoder weights"):
        build_speech_encoder("whisper", other)
    sd = dict(tiny_whisper.state_dict())
    del sd["encoder.blocks.1.mlp.0.weight"]
    broken = _save({"dims": DIMS.__dict__, "model_state_dict": sd}, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="blocks.1.mlp.0.weight"):
        build_speech_encoder("whisper", broken)
    good = _save({"dims": DIMS.__dict__, "model_state_dict": tiny_whisper.state_dict()}, tmp_path / "good.pt")
    with pytest.raises(ValueError, match="whisper-base expects"):
        build_speech_encoder("whisper-base", good)
    with pytest.raises(ValueError, match="needs --speech-encoder-path"):
        build_speech_encoder("whisper", None)


def _test_audio(num_samples: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(num_samples) / 16000
    audio = 0.3 * np.sin(2 * np.pi * 440 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.01 * rng.standard_normal(num_samples)
    audio[: num_samples // 5] *= 1e-3  # a quiet stretch, so the max - 8 clamp is exercised
    return audio.astype(np.float32)


@pytest.mark.parametrize("num_samples", [16000 * 2 + 37, 16000 * 3 + 100])
@pytest.mark.parametrize("n_mels", [80, 128])
def test_whisper_log_mel_matches_openai(num_samples, n_mels):
    audio = _test_audio(num_samples)
    ours = whisper_log_mel(audio, n_mels)
    assert ours.shape == ((num_samples + 80) // 160, n_mels)
    ref = whisper.log_mel_spectrogram(torch.from_numpy(audio), n_mels).T  # (num_samples // 160, n_mels)
    assert torch.allclose(ours[: ref.shape[0]], ref, atol=1e-6, rtol=0)
    assert (ref.min() - (ref.max() - 2.0)).abs() < 1e-5  # the clamp at max - 8 (in log10) is active
    if ours.shape[0] > ref.shape[0]:
        assert torch.all(ours[ref.shape[0]:] == 0)  # lhotse pads the extra frame with zeros
    # openai's transcribe() pads 30 s of zeros before computing: identical except near the end.
    padded = whisper.log_mel_spectrogram(torch.from_numpy(audio), n_mels, padding=16000 * 30).T
    assert torch.allclose(ours[: ref.shape[0] - 1], padded[: ref.shape[0] - 1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_whisper_log_mel_matches_lhotse_whisper_fbank(n_mels):
    require_module("librosa", "lhotse's WhisperFbank needs it")
    from lhotse.features import WhisperFbank, WhisperFbankConfig

    extractor = WhisperFbank(WhisperFbankConfig(num_filters=n_mels))
    for num_samples in (16000 * 2 + 37, 16000 * 3 + 100):
        audio = _test_audio(num_samples)
        theirs = torch.from_numpy(extractor.extract(audio, 16000))
        ours = whisper_log_mel(audio, n_mels)
        assert ours.shape == theirs.shape
        assert torch.allclose(ours, theirs, atol=1e-6, rtol=0), (ours - theirs).abs().max()
