"""FireRedASR-AED against the golden outputs of the released code (tiny random model, real formats)."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from llmasr.features.firered import CmvnError, FireRedFeatureExtractor, load_wav_int16, pad_features, read_kaldi_cmvn
from llmasr.firered.load import CheckpointError, load_aed, load_aed_dir, load_encoder
from llmasr.firered.tokenizer import DictError, FireRedTokenizer

TOL = 1e-4


@pytest.fixture(scope="module")
def fr(golden_dir):
    torch.set_num_threads(1)
    root = golden_dir / "firered"
    exp = torch.load(root / "expected_aed.pt", weights_only=True)
    fe, model, tok = load_aed_dir(root / "aed")
    feats = [torch.from_numpy(fe.from_file(root / u["wav"])) for u in exp["utts"]]
    return argparse.Namespace(root=root, exp=exp, fe=fe, model=model, tok=tok, feats=feats)


def _opts(o):
    return (o["beam_size"], o["nbest"], o["decode_max_len"], o["softmax_smoothing"], o["aed_length_penalty"],
            o["eos_penalty"])


def test_features_match_reference(fr):
    stats, means, istd = read_kaldi_cmvn(fr.root / "aed" / "cmvn.ark")
    cm = fr.exp["meta"]["cmvn"]
    assert np.array_equal(stats, cm["stats"].numpy())
    assert np.allclose(means, cm["means"].numpy(), rtol=0, atol=1e-12)
    assert np.allclose(istd, cm["inverse_std"].numpy(), rtol=0, atol=1e-12)
    u0 = fr.exp["utts"][0]
    samples, sr = load_wav_int16(fr.root / u0["wav"])
    assert sr == 16000 and len(samples) == u0["num_samples"]
    fbank = torch.from_numpy(fr.fe.fbank(samples))
    assert fbank.shape == u0["fbank"].shape
    assert (fbank - u0["fbank"]).abs().max() <= TOL
    for u, f in zip(fr.exp["utts"], fr.feats):
        assert f.shape == (u["feat_len"], 80) and f.dtype == torch.float32
        assert (f - u["feats"]).abs().max() <= TOL, u["uttid"]


def test_lhotse_extractor_matches_reference(fr):
    from lhotse import CutSet, Recording
    from lhotse.dataset import OnTheFlyFeatures

    from llmasr.features.firered import lhotse_extractor

    cuts = CutSet.from_cuts([Recording.from_file(fr.root / u["wav"], recording_id=u["uttid"]).to_cut()
                             for u in fr.exp["utts"]])
    feats, lens = OnTheFlyFeatures(lhotse_extractor(fr.root / "aed" / "cmvn.ark"))(cuts)[:2]
    from lhotse.utils import compute_num_frames

    # lhotse's frame count (round(duration / 10 ms)) = FireRedASR's snip_edges count + 2..3 zero frames.
    for i, u in enumerate(fr.exp["utts"]):
        T = u["feat_len"]
        assert int(lens[i]) == compute_num_frames(u["num_samples"] / 16000, 0.01, 16000) == round(u["num_samples"] / 160)
        assert (feats[i, :T] - u["feats"]).abs().max() <= TOL
        assert (feats[i, T:lens[i]] == 0).all()


def test_tokenizer_matches_reference(fr):
    for u in fr.exp["utts"]:
        tokens, ids = fr.tok.tokenize(u["ref_text"])
        assert tokens == u["ref_tokens"] and ids == u["ref_token_ids"]
        assert fr.tok.detokenize(u["beam"]["token_ids"]) == u["beam"]["text"]


def test_encoder_all_frames(fr):
    for u, f in zip(fr.exp["utts"], fr.feats):
        with torch.no_grad():
            out, lens = fr.model.encoder(f[None], torch.tensor([f.size(0)]))
        assert out.shape[1] == u["enc_out"].shape[0]  # padded length T_enc, not L
        assert int(lens) == u["enc_len"] == int(u["enc_mask"].sum())
        assert (out[0] - u["enc_out"]).abs().max() <= TOL, u["uttid"]


def test_beam_greedy_extra_and_nbest(fr):
    for u, f in zip(fr.exp["utts"], fr.feats):
        x, lens = f[None], torch.tensor([f.size(0)])
        cases = {"beam": u["beam"], "greedy": u["greedy"], **u["extra"]}
        for name, case in cases.items():
            hyp = fr.model.transcribe(x, lens, *_opts(case["options"]))[0][0]
            assert hyp["yseq"].tolist() == case["token_ids"], (u["uttid"], name)
            assert fr.tok.detokenize(hyp["yseq"].tolist()) == case["text"], (u["uttid"], name)
        o = dict(u["beam"]["options"], nbest=3)
        nbest = fr.model.transcribe(x, lens, *_opts(o))[0]
        assert [h["yseq"].tolist() for h in nbest] == u["beam"]["nbest_all"], u["uttid"]
        assert nbest[0]["score"] >= nbest[1]["score"] >= nbest[2]["score"]
    # the extra decodes include an early <eos> and a truncation
    lens = [len(c["token_ids"]) for u in fr.exp["utts"] for c in u["extra"].values()]
    assert min(lens) < 8 and 8 in lens


def test_greedy_step_logprobs(fr):
    for u, f in zip(fr.exp["utts"], fr.feats):
        _, steps = fr.model.transcribe(f[None], torch.tensor([f.size(0)]), *_opts(u["greedy"]["options"]),
                                       return_step_scores=True)
        ref = u["greedy"]["step_logprobs"]
        assert (steps[: ref.shape[0], 0] - ref).abs().max() <= TOL, u["uttid"]


def test_teacher_forcing_matches_reference_steps(fr):
    """The training path (full causal decoder) gives the reference's greedy step log-probs, and the
    loss is the summed negative log-likelihood of targets + <eos>."""
    u, f = fr.exp["utts"][0], fr.feats[0]
    ref = u["greedy"]["step_logprobs"]
    toks = u["greedy"]["token_ids"][: ref.shape[0]]
    with torch.no_grad():
        enc, enc_lens = fr.model.encoder(f[None], torch.tensor([f.size(0)]))
        ys_in = torch.tensor([[fr.model.sos_id] + toks[:-1]])
        logits = fr.model.decoder(ys_in, enc, enc_lens)[0]
        assert (torch.log_softmax(logits / 1.25, -1) - ref).abs().max() <= TOL
        targets = [toks[:5], toks[:3]]
        loss, stats = fr.model(torch.stack([f, f]), torch.tensor([f.size(0)] * 2), targets, label_smoothing=0.0)
        lp = torch.log_softmax(fr.model.decoder(torch.tensor([[fr.model.sos_id] + toks[:5]]), enc, enc_lens)[0], -1)
    nll = lambda n: -(lp[torch.arange(n), toks[:n]].sum() + lp[n, fr.model.eos_id])  # noqa: E731
    assert int(stats["ntokens"]) == 10
    assert torch.allclose(loss, nll(5) + nll(3), rtol=1e-5)


def test_batch_compat_and_per_utterance(fr):
    b = fr.exp["batch"]
    x, lens = pad_features(fr.feats)
    assert lens.tolist() == b["feat_lens"].tolist()
    with torch.no_grad():
        out, out_lens = fr.model.encoder(x, lens)
    assert out_lens.tolist() == b["enc_lens"].tolist()
    assert (out - b["enc_out"]).abs().max() <= TOL
    for name in ("beam", "greedy"):
        o = _opts(b[name]["options"])
        compat = fr.model.transcribe(x, lens, *o, compat_reference_padding=True)
        assert [h[0]["yseq"].tolist() for h in compat] == b[name]["token_ids"], name
        own = fr.model.transcribe(x, lens, *o)
        assert [h[0]["yseq"].tolist() for h in own] == [u[name]["token_ids"] for u in fr.exp["utts"]], name
    # the fixture contains an utterance where the two modes differ
    assert b["beam"]["token_ids"] != [u["beam"]["token_ids"] for u in fr.exp["utts"]]


def test_encoder_registry(fr):
    from llmasr.encoders import build_speech_encoder

    for path in (fr.root / "llm" / "asr_encoder.pth.tar", fr.root / "aed" / "model.pth.tar"):
        enc = build_speech_encoder("firered", str(path)).eval()
        assert (enc.output_dim, enc.feature_dim, enc.feature_type) == (64, 80, "kaldi-fbank-cmvn")
        f, u = fr.feats[1], fr.exp["utts"][1]
        with torch.no_grad():
            out, lens = enc(f[None], torch.tensor([f.size(0)]))
        # the registered encoder reports T_enc (the frames FireRedASR-LLM splices), not L
        assert int(lens) == u["enc_out"].shape[0] > u["enc_len"] and (out[0] - u["enc_out"]).abs().max() <= TOL


def test_speech2text_script(fr, tmp_path):
    import firered_speech2text

    out = tmp_path / "out" / "aed.txt"
    firered_speech2text.main([
        "--asr-type", "aed", "--model-dir", str(fr.root / "aed"), "--wav-scp", str(fr.root / "wav" / "wav.scp"),
        "--output", str(out), "--batch-size", "1", "--beam-size", "3", "--nbest", "1", "--decode-max-len", "0",
        "--softmax-smoothing", "1.25", "--aed-length-penalty", "0.6", "--eos-penalty", "1.0",
        "--ref-text", str(fr.root / "wav" / "text"),
    ])
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines == [f"{u['uttid']}\t{u['beam']['text']}" for u in fr.exp["utts"]]
    assert (out.parent / "wer-summary-wav.txt").is_file()
    assert len(list(out.parent.glob("errs-wav-*.txt"))) == 1


# --------------------------------------------------------------------------- bad inputs


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_bad_cmvn(fr, tmp_path):
    good = (fr.root / "aed" / "cmvn.ark").read_bytes()
    with pytest.raises(FileNotFoundError, match="nope.ark"):
        FireRedFeatureExtractor(tmp_path / "nope.ark")
    with pytest.raises(CmvnError, match="bad.ark"):
        read_kaldi_cmvn(_write(tmp_path / "bad.ark", b"\0BXM " + good[5:]))
    with pytest.raises(CmvnError, match="truncated.ark"):
        read_kaldi_cmvn(_write(tmp_path / "truncated.ark", good[:-8]))
    # a 2 x 41 matrix (40 dims) where the model needs 80
    stats = np.zeros((2, 41))
    stats[0, -1] = 10
    hdr = b"\0BDM \x04" + np.int32(2).tobytes() + b"\x04" + np.int32(41).tobytes()
    with pytest.raises(CmvnError, match="40 dims"):
        read_kaldi_cmvn(_write(tmp_path / "dim40.ark", hdr + stats.astype("<f8").tobytes()))


def test_too_short_audio(fr):
    with pytest.raises(ValueError, match="input #1: too short"):
        fr.fe([np.zeros(16000, dtype=np.int16), np.zeros(1000, dtype=np.int16)])


def test_bad_dict_and_spm(fr, tmp_path):
    spm = fr.root / "aed" / "train_bpe1000.model"
    lines = (fr.root / "aed" / "dict.txt").read_text(encoding="utf-8").splitlines()
    with pytest.raises(FileNotFoundError, match="dict.txt"):
        FireRedTokenizer(tmp_path / "dict.txt", spm)
    (tmp_path / "gap.txt").write_text("\n".join(lines[:5] + lines[6:]) + "\n", encoding="utf-8")
    with pytest.raises(DictError, match=r"gap.txt:6: ids must be contiguous"):
        FireRedTokenizer(tmp_path / "gap.txt", spm)
    (tmp_path / "bad.txt").write_text("\n".join(lines[:3] + ["a b c"] + lines[3:]) + "\n", encoding="utf-8")
    with pytest.raises(DictError, match=r"bad.txt:4"):
        FireRedTokenizer(tmp_path / "bad.txt", spm)
    with pytest.raises(FileNotFoundError, match="missing.model"):
        FireRedTokenizer(fr.root / "aed" / "dict.txt", tmp_path / "missing.model")
    # model dir whose dict does not match the model's output layer
    d = tmp_path / "small_dict_dir"
    d.mkdir()
    for name in ("model.pth.tar", "cmvn.ark", "train_bpe1000.model"):
        (d / name).symlink_to(fr.root / "aed" / name)
    (d / "dict.txt").write_text("\n".join(lines[:100]) + "\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match="100 tokens"):
        load_aed_dir(d)


def test_mismatched_checkpoints(fr, tmp_path):
    src = fr.root / "aed" / "model.pth.tar"
    with torch.serialization.safe_globals([argparse.Namespace]):
        pkg = torch.load(src, weights_only=True)
    sd = pkg["model_state_dict"]

    def save(name, state, args=pkg["args"]):
        p = tmp_path / name
        torch.save({"args": args, "model_state_dict": state}, p)
        return p

    missing = {k: v for k, v in sd.items() if k != "decoder.layer_norm_out.weight"}
    with pytest.raises(CheckpointError, match=r"missing.pth.tar.*1 missing: decoder.layer_norm_out.weight"):
        load_aed(save("missing.pth.tar", missing))
    extra = dict(sd, **{"decoder.extra.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"extra.pth.tar.*1 unexpected: decoder.extra.weight"):
        load_aed(save("extra.pth.tar", extra))
    bigger = argparse.Namespace(**dict(vars(pkg["args"]), odim=316))
    with pytest.raises(CheckpointError, match=r"shape.pth.tar.*shape mismatch: decoder.tgt_word_emb.weight"):
        load_aed(save("shape.pth.tar", sd, bigger))
    no_enc = {k: v for k, v in sd.items() if not k.startswith("encoder.")}
    with pytest.raises(CheckpointError, match="no 'encoder.\\*' parameters"):
        load_encoder(save("noenc.pth.tar", no_enc))
    (tmp_path / "junk.pth.tar").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth.tar"):
        load_aed(tmp_path / "junk.pth.tar")
    with pytest.raises(FileNotFoundError, match="absent"):
        load_aed(tmp_path / "absent" / "model.pth.tar")
