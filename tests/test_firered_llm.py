"""FireRedASR-LLM against the golden outputs of the released code (tiny Qwen2 + LoRA, real formats)."""
from __future__ import annotations

import argparse

import pytest
import torch

from llmasr.features.firered import pad_features
from llmasr.firered.load import CheckpointError
from llmasr.firered.llm import clean_text, load_firered_llm

TOL = 1e-4


@pytest.fixture(scope="module")
def fr(golden_dir):
    torch.set_num_threads(1)
    root = golden_dir / "firered"
    exp = torch.load(root / "expected_llm.pt", weights_only=True)
    fe, model = load_firered_llm(root / "llm")
    feats = [torch.from_numpy(fe.from_file(root / u["wav"])) for u in exp["utts"]]
    return argparse.Namespace(root=root, exp=exp, fe=fe, model=model, feats=feats)


def _gen(model, x, lens, o, compat=True):
    return model.transcribe(x, lens, o["beam_size"], o["decode_max_len"], o["decode_min_len"], o["repetition_penalty"],
                            o["llm_length_penalty"], o["temperature"], compat_reference_padding=compat)


def test_prompt_and_special_ids(fr):
    p, sp = fr.exp["prompt"], fr.exp["special_ids"]
    assert fr.model.decode_prompt_ids(1)[0].tolist() == p["input_ids"]
    ids = fr.model.ids
    assert (ids.pad, ids.eos, ids.bos, ids.speech) == (sp["pad"], sp["im_end"], sp["im_start"], sp["speech"])


def test_encoder_override_applied(fr):
    from llmasr.firered.load import load_encoder, load_package

    base, _ = load_encoder(fr.root / "llm" / "asr_encoder.pth.tar")
    _, sd = load_package(fr.root / "llm" / "model.pth.tar")
    key = "layer_stack.0.ffn1.net.0.weight"
    assert torch.equal(fr.model.encoder.state_dict()[key], sd["encoder." + key])
    assert not torch.equal(base.state_dict()[key], sd["encoder." + key])


def test_adapter_merge_and_decode(fr):
    for u, f in zip(fr.exp["utts"], fr.feats):
        x, lens = f[None], torch.tensor([f.size(0)])
        with torch.no_grad():
            enc, enc_lens, speech, speech_lens = fr.model.encode_speech(x, lens)
            merged, mask = fr.model.merge_decode_inputs(speech, speech_lens, compat_reference_padding=True)
        assert (enc[0] - u["enc_out"]).abs().max() <= TOL and int(enc_lens) == u["enc_len"]
        assert speech.shape[1] == u["adapter_out"].shape[0] == enc.shape[1] // 2  # T_enc // 2, not L // 2
        assert (speech[0] - u["adapter_out"]).abs().max() <= TOL and int(speech_lens) == u["adapter_len"]
        assert mask is None and merged.shape[1] == u["merged_embeds"].shape[0]
        assert (merged[0] - u["merged_embeds"]).abs().max() <= TOL
        for name in ("greedy", "beam"):
            ids = _gen(fr.model, x, lens, u[name]["options"])
            assert ids[0].tolist() == u[name]["generated_ids"], (u["uttid"], name)
            assert fr.model.decode_text(ids)[0] == u[name]["text"], (u["uttid"], name)
        # raw LM logits of the first greedy steps (no mask: the reference attends everything)
        g = u["greedy"]
        steps = g["step_logits"].shape[0]
        with torch.no_grad():
            tok = fr.model.llm.get_input_embeddings()(torch.tensor([g["generated_ids"][: steps - 1]]))
            logits = fr.model.llm(inputs_embeds=torch.cat([merged, tok], 1)).logits[0, -steps:]
        assert (logits - g["step_logits"]).abs().max() <= TOL, u["uttid"]


def test_lora_is_used(fr):
    u, f = fr.exp["utts"][0], fr.feats[0]
    with fr.model.llm.disable_adapter():
        ids = _gen(fr.model, f[None], torch.tensor([f.size(0)]), u["greedy"]["options"])
    assert ids[0].tolist() == u["greedy_without_lora_ids"]


def test_batch_compat_and_masked(fr):
    b = fr.exp["batch"]
    x, lens = pad_features(fr.feats)
    ids = _gen(fr.model, x, lens, b["greedy"]["options"])
    assert ids.tolist() == b["greedy"]["generated_ids"]
    # default mode: valid frames only + attention mask -> a batch equals its utterances decoded alone
    masked = _gen(fr.model, x, lens, b["greedy"]["options"], compat=False)
    for i, f in enumerate(fr.feats):
        alone = _gen(fr.model, f[None], torch.tensor([f.size(0)]), b["greedy"]["options"], compat=False)[0].tolist()
        row = masked[i].tolist()
        assert row[: len(alone)] == alone and all(t == fr.model.ids.pad for t in row[len(alone):]), i


def test_unknown_llm_key_is_an_error(fr, tmp_path):
    from llmasr.firered.load import load_package

    d = tmp_path / "llm"
    d.mkdir()
    for name in ("asr_encoder.pth.tar", "cmvn.ark", "Qwen2-7B-Instruct"):
        (d / name).symlink_to(fr.root / "llm" / name)
    args, sd = load_package(fr.root / "llm" / "model.pth.tar")
    sd = dict(sd)
    sd["llm.base_model.model.model.layers.9.self_attn.q_proj.lora_A.default.weight"] = torch.zeros(64, 64)
    torch.save({"args": args, "model_state_dict": sd}, d / "model.pth.tar")
    with pytest.raises(CheckpointError, match=r"model.pth.tar: LLM keys unknown.*layers.9"):
        load_firered_llm(d)


def test_shared_speechllm_takes_firered_weights(fr):
    """Training goes through llmasr.model.SpeechLLM: with FireRed's flags and our state dict it
    computes the same loss as FireRedAsrLlm.forward (valid frames, masked)."""
    from llmasr.encoders import build_speech_encoder
    from llmasr.llm import load_llm
    from llmasr.model import SpeechLLM

    enc = build_speech_encoder("firered", str(fr.root / "llm" / "asr_encoder.pth.tar"))
    llm, tok = load_llm(fr.root / "llm" / "Qwen2-7B-Instruct", dtype=torch.float32, attn_implementation="eager")
    sl = SpeechLLM([enc], llm, tok, prompt_format="firered", downsample_rate=2, projector_activation="relu",
                   projector_dropout=0.0, unfreeze_encoder=True)
    res = sl.load_state_dict(fr.model.state_dict(), strict=False)
    assert not res.unexpected_keys
    assert all(not ("lora_" in k or k.startswith(("encoder", "encoder_projector"))) for k in res.missing_keys)
    sl.eval()
    x, lens = pad_features(fr.feats)
    texts = [clean_text(u["ref_text"]) for u in fr.exp["utts"]]
    with torch.no_grad():
        ours = fr.model(x, lens, texts)
        shared, _ = sl(x, lens, texts)
    assert torch.allclose(ours, shared, rtol=1e-5, atol=1e-5)


def test_speech2text_script_llm(fr, tmp_path):
    import firered_speech2text

    out = tmp_path / "llm.txt"
    firered_speech2text.main([
        "--asr-type", "llm", "--model-dir", str(fr.root / "llm"), "--wav-scp", str(fr.root / "wav" / "wav.scp"),
        "--output", str(out), "--batch-size", "1", "--beam-size", "3", "--decode-max-len", "0",
        "--decode-min-len", "0", "--repetition-penalty", "3.0", "--llm-length-penalty", "1.0", "--temperature", "1.0",
        "--compat-reference-padding",
    ])
    got = [line.split("\t", 1) for line in out.read_text(encoding="utf-8").splitlines()]
    assert got == [[u["uttid"], " ".join(u["beam"]["text"].splitlines())] for u in fr.exp["utts"]]


def test_clean_text():
    # as the released clean_text: the space between a Chinese character and English survives
    assert clean_text("今天 天气，很好！ Hello,  World.") == "今天天气很好 hello world"


def test_llm_trains_with_encoder_unfrozen(fr):
    torch.manual_seed(0)
    _, model = load_firered_llm(fr.root / "llm", freeze_encoder=False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    enc_params = [p for p in model.encoder.parameters() if p.requires_grad]
    assert enc_params and any("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    before = enc_params[0].detach().clone()
    opt = torch.optim.AdamW(params, lr=3e-3)
    x, lens = pad_features(fr.feats)
    texts = [u["ref_text"] for u in fr.exp["utts"]]
    losses = []
    for _ in range(6):
        loss = model(x, lens, texts)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert not torch.equal(before, enc_params[0].detach())
