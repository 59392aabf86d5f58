"""SpeechLLM model + decoding on a tiny random model: splicing/labels, loss, batching invariance,
MoSE, frozen encoders, stopping criteria, decode-script errors."""
import gzip
import shutil

import pytest
import torch

from llmasr.io import load_torch_file
import torch.nn as nn

from llmasr.generation import PerRowLimit, RepetitionGuard
from llmasr.llm import load_llm
from llmasr.model import SpeechLLM
from llmasr.prompt import IGNORE_INDEX



class FakeEncoder(nn.Module):
    """Row-independent encoder: concatenate `sub` frames, Linear, tanh (+ dropout to see train mode)."""

    feature_type = "fbank"
    feature_dim = 80

    def __init__(self, output_dim: int, sub: int = 2):
        super().__init__()
        self.output_dim = output_dim
        self.sub = sub
        self.lin = nn.Linear(80 * sub, output_dim)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x, lens):
        n, t, f = x.shape
        t2 = t // self.sub
        y = torch.tanh(self.lin(x[:, : t2 * self.sub].reshape(n, t2, f * self.sub)))
        return self.dropout(y) * 3.0, torch.div(lens, self.sub, rounding_mode="floor")


@pytest.fixture(scope="module")
def tiny_llm_dir(golden_dir, tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    src = golden_dir / "speechllm" / "models" / "llm"
    out = tmp_path_factory.mktemp("tiny_llm")
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(src / f, out / f)
    torch.manual_seed(3)
    cfg = Qwen2Config(vocab_size=528, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.25,
                      tie_word_embeddings=True, rope_theta=10000.0, max_position_embeddings=2048)
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    return out


def _model(llm_dir, encoders, seed=0, **kw):
    llm, tok = load_llm(llm_dir, dtype=torch.float32, attn_implementation="sdpa", use_lora=True, lora_r=8,
                        lora_alpha=16)
    torch.manual_seed(seed)
    model = SpeechLLM(encoders, llm, tok, **kw)
    with torch.no_grad():  # LoRA B starts at 0: make every trainable weight matter
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * (0.3 if "lora_B" in name else 0.05))
    return model.eval()


@pytest.fixture(scope="module")
def single(tiny_llm_dir):
    torch.manual_seed(1)
    return _model(tiny_llm_dir, [FakeEncoder(16, 2)])


@pytest.fixture(scope="module")
def mose(tiny_llm_dir):
    torch.manual_seed(2)
    return _model(tiny_llm_dir, [FakeEncoder(16, 2), FakeEncoder(8, 3)], seed=5)


def _batch(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths)
    feats = torch.full((len(lengths), max(lengths), 80), -23.0258)  # lhotse padding log(1e-10)
    for i, t in enumerate(lengths):
        feats[i, :t] = torch.randn(t, 80, generator=g)
    return feats, lens


def _reference_merge(model, speech, embeds, ids, mask, labels):
    """Per-row splice as described in the golden README (concatenate, then left-pad)."""
    rows, masks, labs = [], [], []
    for i in range(ids.shape[0]):
        keep = mask[i]
        row_ids, row_emb, row_lab = ids[i][keep], embeds[i][keep], labels[i][keep]
        parts, lparts, k, start = [], [], 0, 0
        for pos in (row_ids == model.prompt_ids.speech).nonzero().flatten().tolist():
            frames, lens = speech[k]
            parts += [row_emb[start:pos], frames[i, : lens[i]]]
            lparts += [row_lab[start:pos], torch.full((int(lens[i]),), IGNORE_INDEX)]
            start, k = pos + 1, k + 1
        parts.append(row_emb[start:])
        lparts.append(row_lab[start:])
        rows.append(torch.cat(parts))
        labs.append(torch.cat(lparts))
    length = max(r.shape[0] for r in rows)
    out = torch.zeros(len(rows), length, embeds.shape[-1])
    out_mask = torch.zeros(len(rows), length, dtype=torch.bool)
    out_lab = torch.full((len(rows), length), IGNORE_INDEX)
    for i, (r, lab) in enumerate(zip(rows, labs)):
        out[i, length - r.shape[0]:] = r
        out_mask[i, length - r.shape[0]:] = True
        out_lab[i, length - r.shape[0]:] = lab
    return out, out_mask, out_lab


@pytest.mark.parametrize("which", ["single", "mose"])
def test_merge_splices_true_lengths_and_labels(which, request):
    model = request.getfixturevalue(which)
    from llmasr.prompt import build_prompts

    texts = ["the old man came back", "a river", "no"]
    feats, lens = _batch([57, 31, 44])
    ids, mask, labels = build_prompts(model.tokenizer, model.prompt_format, texts, model.num_encoders)
    speech = model.encode(feats, lens)
    # garbage in the padded frames must never reach the LLM
    speech = [(torch.where(torch.arange(f.shape[1])[None, :, None] < l[:, None, None], f, torch.full_like(f, 1e6)), l)
              for f, l in speech]
    embeds = model.embed_prompt(ids, mask)
    merged, mmask, mlab = model.merge(speech, embeds, ids, mask, labels)
    ref, ref_mask, ref_lab = _reference_merge(model, speech, embeds, ids, mask, labels)
    assert torch.equal(merged, ref) and torch.equal(mmask, ref_mask) and torch.equal(mlab, ref_lab)
    assert merged.abs().max() < 1e5
    prompt_len = mask.sum(1) - model.num_encoders
    speech_len = sum(l for _, l in speech)
    assert mmask.sum(1).tolist() == (prompt_len + speech_len).tolist()
    assert (merged[~mmask] == 0).all()
    # labels: transcript tokens + <|im_end|>, at the end of every row
    tok = model.tokenizer
    for i, t in enumerate(texts):
        want = tok(t, add_special_tokens=False)["input_ids"] + [514]
        row = mlab[i][mlab[i] != IGNORE_INDEX].tolist()
        assert row == want and mlab[i, -len(want):].tolist() == want


def test_forward_loss_matches_hf_and_counts(single):
    texts = ["the old man came back", "a river", "she said hello"]
    feats, lens = _batch([60, 35, 48], seed=1)
    loss, stats = single(feats, lens, texts)
    merged, mask, labels, _, _ = single.prepare_inputs(feats, lens, texts)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    out = single.llm(inputs_embeds=merged, attention_mask=mask.long(), position_ids=pos, labels=labels)
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=1e-5)
    n = sum(len(single.tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)
    assert stats["num_tokens"] == n
    pred = out.logits[:, :-1].argmax(-1)
    tgt = labels[:, 1:]
    sel = tgt != IGNORE_INDEX
    assert stats["num_correct"] == int((pred[sel] == tgt[sel]).sum())
    assert abs(stats["loss_sum"] / n - out.loss.item()) < 1e-4


def test_frozen_encoder_stays_eval_and_gets_no_grad(tiny_llm_dir):
    torch.manual_seed(4)
    model = _model(tiny_llm_dir, [FakeEncoder(16, 2)])
    model.train()
    assert model.training and not model.encoder.training and model.encoder_projector.training
    feats, lens = _batch([40, 30])
    a, b = model.encoder(feats, lens)[0], model.encoder(feats, lens)[0]
    assert torch.equal(a, b)  # the encoder's dropout is off although the model is training
    loss, _ = model(feats, lens, ["a river", "no"])
    loss.backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert model.encoder_projector.proj[1].weight.grad.abs().sum() > 0
    lora = [p for n, p in model.named_parameters() if "lora_A" in n]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    # prompt_embedding (unused, as in SpeechLLM) gets an exact zero gradient, not None
    assert torch.equal(model.prompt_embedding.weight.grad, torch.zeros_like(model.prompt_embedding.weight))
    model.encoder.train()  # (sanity: the dropout is real)
    assert not torch.equal(model.encoder(feats, lens)[0], a)
    model.eval()
    # --unfreeze-encoder: the encoder trains (train mode, gradients)
    model2 = _model(tiny_llm_dir, [FakeEncoder(16, 2)], unfreeze_encoder=True)
    model2.train()
    assert model2.encoder.training
    model2(feats, lens, ["a river", "no"])[0].backward()
    assert model2.encoder.lin.weight.grad.abs().sum() > 0


def test_ctc_compressed_frames_are_what_the_llm_reads(tiny_llm_dir, monkeypatch):
    model = _model(tiny_llm_dir, [FakeEncoder(16, 2)], ctc_compress_frames="cosine")
    emb = model.llm.get_input_embeddings().weight.detach()
    blank = model.ctc_blank_id
    assert model.tokenizer.convert_ids_to_tokens(blank) == "<|endoftext|>"
    # projected frames that "say" known tokens: rows of the embedding, with blanks and repeats
    said = [[blank, 40, 40, blank, 41, 7, 7, 7], [blank, blank, 99, blank, 99, 5, 0, 0]]
    frames = torch.stack([emb[row] for row in said]) * 2.0
    lens = torch.tensor([8, 6])
    monkeypatch.setattr(model, "encode", lambda *a, **k: [(frames, lens)])
    feats, feat_lens = _batch([16, 12])
    texts = ["a river", "no"]
    merged, mask, labels, speech_lens, raw = model.prepare_inputs(feats, feat_lens, texts)
    assert speech_lens[:, 0].tolist() == [8, 6] and raw[0][0] is frames  # the audio's length; what aux CTC aligns
    from llmasr.prompt import build_prompts

    ids, pmask, plabels = build_prompts(model.tokenizer, model.prompt_format, texts, 1)
    read = (2.0 * emb[torch.tensor([[40, 41, 7], [99, 99, 5]])], torch.tensor([3, 3]))  # blanks gone, runs merged
    ref, ref_mask, ref_lab = _reference_merge(model, [read], model.embed_prompt(ids, pmask), ids, pmask, plabels)
    torch.testing.assert_close(merged, ref)
    assert torch.equal(mask, ref_mask) and torch.equal(labels, ref_lab)
    # training: the loss reaches the projector through the compressed frames; decoding runs them
    monkeypatch.undo()
    model.train()
    loss, stats = model(*_batch([50, 30]), ["a river", "no"])
    loss.backward()
    assert torch.isfinite(loss) and model.encoder_projector.proj[1].weight.grad.abs().sum() > 0
    model.eval()
    feats, feat_lens = _batch([95, 40, 71], seed=2)
    batched = _trim(model.generate_ids(feats, feat_lens, max_new_tokens=12))
    alone = [_trim(model.generate_ids(feats[i:i + 1, :n], feat_lens[i:i + 1], max_new_tokens=12))[0]
             for i, n in enumerate(feat_lens.tolist())]
    assert batched == alone
    with pytest.raises(ValueError, match="ctc_compress_frames"):
        _model(tiny_llm_dir, [FakeEncoder(16, 2)], ctc_compress_frames="spectral")


def _trim(ids, eos=514, pad=512):
    """Rows up to and including <|im_end|>; what follows must be padding."""
    out = []
    for row in ids.tolist():
        cut = row.index(eos) + 1 if eos in row else len(row)
        assert all(t == pad for t in row[cut:]), row
        out.append(row[:cut])
    return out


@pytest.mark.parametrize("beam", [1, 2])
def test_batched_equals_unbatched(single, beam):
    feats, lens = _batch([95, 40, 71, 18, 60, 33], seed=2)
    batched = single.generate_ids(feats, lens, beam_size=beam, max_new_tokens=24)
    hyps = single.tokenizer.batch_decode(batched, skip_special_tokens=True)
    lengths = []
    for i in range(len(lens)):
        one = single.generate_ids(feats[i:i + 1, : lens[i]], lens[i:i + 1], beam_size=beam, max_new_tokens=24)
        assert _trim(one) == _trim(batched[i:i + 1]), i
        assert single.tokenizer.batch_decode(one, skip_special_tokens=True)[0] == hyps[i]
        lengths.append(len(_trim(one)[0]))
    assert single.decode(feats, lens, beam_size=beam, max_new_tokens=24) == hyps
    assert len(set(lengths)) > 1 or lengths[0] == 24  # not all identical trivially


def test_mose_decodes_and_is_batch_invariant(mose):
    assert isinstance(mose.encoder, nn.ModuleList) and len(mose.encoders) == 2
    keys = [k for k in mose.state_dict() if k.startswith("encoder_projector.")]
    assert "encoder_projector.0.proj.1.weight" in keys and "encoder_projector.1.proj.3.bias" in keys
    feats, lens = _batch([61, 37, 50], seed=3)
    merged, mask, _, speech_lens, _ = mose.prepare_inputs(feats, lens)
    # 2 groups: 14 prompt tokens, 2 placeholders replaced by lens//2//4 and lens//3//4 frames
    want = [14 - 2 + (t // 2) // 4 + (t // 3) // 4 for t in (61, 37, 50)]
    assert mask.sum(1).tolist() == want and speech_lens.tolist() == [[(t // 2) // 4, (t // 3) // 4] for t in (61, 37, 50)]
    batched = mose.generate_ids(feats, lens, max_new_tokens=16)
    for i in range(3):
        one = mose.generate_ids(feats[i:i + 1, : lens[i]], lens[i:i + 1], max_new_tokens=16)
        assert _trim(one) == _trim(batched[i:i + 1])
    assert len(mose.decode(feats, lens, max_new_tokens=16)) == 3


def test_mose_training_drops_groups(mose):
    feats, lens = _batch([61, 37], seed=4)
    merged, mask, labels, speech_lens, speech = mose.prepare_inputs(feats, lens, ["a", "b"], [1, 2])
    l0, l1 = speech_lens[0].tolist()
    # row 0 has one group filled by one of the two encoders (random.sample)
    n_prompt0 = 11 + 1 + 1  # one-group prompt + "a" + <|im_end|>
    assert int(mask[0].sum()) in (n_prompt0 - 1 + l0, n_prompt0 - 1 + l1)
    assert int(mask[1].sum()) == 11 + 3 + 2 - 2 + int(speech_lens[1].sum())
    mose.train()
    try:
        torch.manual_seed(0)
        import random

        random.seed(0)
        loss, stats = mose(feats, lens, ["a river", "no"])
        loss.backward()
        for proj in mose.encoder_projector:
            assert proj.proj[1].weight.grad is not None  # used or tied in with weight 0
    finally:
        mose.eval()
        mose.zero_grad(set_to_none=True)


def test_stopping_criteria():
    lim = PerRowLimit(torch.tensor([2, 5]))
    assert lim(torch.zeros(4, 2, dtype=torch.long)).tolist() == [True, True, False, False]
    # beam search (3 beams) checks 2 * 3 candidates per utterance
    assert lim(torch.zeros(12, 5, dtype=torch.long)).tolist() == [True] * 12
    assert lim(torch.zeros(12, 2, dtype=torch.long)).tolist() == [True] * 6 + [False] * 6
    guard = RepetitionGuard(repeats=3, max_period=3)
    ids = torch.tensor([
        [1, 2, 3, 4, 5, 6, 7, 8, 9],  # no loop
        [1, 2, 3, 9, 7, 9, 7, 9, 7],  # period 2 x3
        [1, 2, 3, 4, 4, 4, 4, 4, 4],  # period 1
        [5, 6, 1, 2, 3, 1, 2, 3, 1],  # period 3 but only 2.33 repeats
    ])
    assert guard(ids).tolist() == [False, True, True, False]


def test_generation_caps(single):
    feats, lens = _batch([95, 18], seed=2)
    # per-utterance cap: ceil(0.5 * speech tokens) new tokens at most
    ids = single.generate_ids(feats, lens, max_new_tokens=50, max_new_tokens_per_speech_token=0.5)
    speech = [(95 // 2) // 4, (18 // 2) // 4]
    for row, s in zip(ids.tolist(), speech):
        while row and row[-1] == 512:  # rows stopped by the cap are padded
            row.pop()
        assert 1 <= len(row) <= -(-s // 2)
    assert ids.shape[1] == -(-speech[0] // 2) or 514 in ids[0].tolist()


# ---------------------------------------------------------------------- decode script: early errors


def _decode_args(sl, exp_dir, *extra):
    from llmasr.recipes.decode import get_decode_parser

    return get_decode_parser().parse_args([
        "--exp-dir", str(exp_dir), "--max-duration", "300", "--num-workers", "0",
        "--llm-path", str(sl / "models/llm"), "--speech-encoder-type", "tiny_a",
        "--speech-encoder-path", str(sl / "models/zipformer/tiny_a/pretrained.pt"),
        "--manifest-dir", str(sl / "data/fbank"), *extra,
    ])


def test_decode_script_errors_before_model_build(golden_dir, tmp_path, monkeypatch):
    from llmasr.recipes import decode as decoding

    sl = golden_dir / "speechllm"
    exp = tmp_path / "exp"
    exp.mkdir()
    for e in (1, 2):
        shutil.copy(sl / f"exp/baseline/epoch-{e}.pt", exp / f"epoch-{e}.pt")

    def no_build(*a, **k):
        raise AssertionError("the model must not be built")

    monkeypatch.setattr("llmasr.recipes.model_args.build_model_from_args", no_build)
    with pytest.raises(ValueError, match="ctc-mode"):  # joint CTC decoding of a model without a mode
        decoding.run_decode(_decode_args(sl, exp, "--epoch", "2", "--ctc-weight", "0.5"))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        decoding.run_decode(_decode_args(sl, exp, "--epoch", "2", "--ctc-weight", "1.5", "--ctc-mode", "cosine"))
    with pytest.raises(FileNotFoundError, match="epoch-3.pt"):
        decoding.run_decode(_decode_args(sl, exp, "--epoch", "3", "--avg", "2"))
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        decoding.run_decode(_decode_args(sl, exp, "--checkpoint", "nothere.pt"))
    no_tok = tmp_path / "llm_no_tokenizer"
    no_tok.mkdir()
    shutil.copy(sl / "models/llm/config.json", no_tok / "config.json")
    args = _decode_args(sl, exp, "--epoch", "2")
    args.llm_path = str(no_tok)
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        decoding.run_decode(args)
    (tmp_path / "librispeech_cuts_empty.jsonl.gz").write_bytes(gzip.compress(b""))
    args = _decode_args(sl, exp, "--epoch", "2", "--test-sets", str(tmp_path / "librispeech_cuts_empty.jsonl.gz"))
    with pytest.raises(ValueError, match="has no cuts"):
        decoding.run_decode(args)
    # a MoSE checkpoint given to decode.py, and a LoRA-free one with --use-lora true
    sd = load_torch_file(exp / "epoch-2.pt")["model"]
    torch.save({"model": {k.replace("encoder_projector.", "encoder_projector.0."): v for k, v in sd.items()}},
               exp / "mose.pt")
    with pytest.raises(RuntimeError, match="MoSE"):
        decoding.run_decode(_decode_args(sl, exp, "--checkpoint", "mose.pt"))
    torch.save({"model": {k: v for k, v in sd.items() if ".lora_" not in k}}, exp / "nolora.pt")
    with pytest.raises(RuntimeError, match="has no LoRA weights"):
        decoding.run_decode(_decode_args(sl, exp, "--checkpoint", "nolora.pt"))
    assert not (exp / "epoch-3-avg-2.pt").exists()



def test_llm_without_spare_rows(golden_dir, tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    src = golden_dir / "speechllm" / "models" / "llm"
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(src / f, tmp_path / f)
    cfg = Qwen2Config(vocab_size=515, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"no spare vocabulary rows.*--resize-vocab"):
        load_llm(tmp_path, dtype=torch.float32, use_lora=False)
    llm, tok = load_llm(tmp_path, dtype=torch.float32, use_lora=False, resize_vocab=True)
    emb = llm.get_input_embeddings().weight
    assert emb.shape[0] == 576 and len(tok) == 520  # padded to a multiple of 64
    base = Qwen2ForCausalLM.from_pretrained(tmp_path).get_input_embeddings().weight
    assert torch.equal(emb[:515], base)
    torch.testing.assert_close(emb[515:], base.mean(0).expand(61, -1))
    assert llm.get_output_embeddings().weight is emb  # still tied
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_llm(tmp_path / "missing")


def test_decode_mose_script_end_to_end(golden_dir, tmp_path, monkeypatch):
    """decode_mose.py with two encoders and a checkpoint written by save_checkpoint."""
    import decode_mose  # src/decode_mose.py

    from llmasr.checkpoint import save_checkpoint
    from llmasr.recipes.decode import get_decode_parser
    from llmasr.recipes.model_args import build_model_from_args

    sl = golden_dir / "speechllm"
    enc = str(sl / "models/zipformer/tiny_a/pretrained.pt")
    flags = ["--llm-path", str(sl / "models/llm"), "--speech-encoder-type", "tiny_a,tiny_a",
             "--speech-encoder-path", f"{enc},{enc}", "--attn-implementation", "sdpa"]
    torch.manual_seed(0)
    model = build_model_from_args(get_decode_parser(mose=True).parse_args(flags), mose=True)
    exp = tmp_path / "exp"
    save_checkpoint(exp / "epoch-1.pt", model, {"cur_epoch": 1})
    keys = load_torch_file(exp / "epoch-1.pt")["model"]
    assert "encoder_projector.1.proj.3.weight" in keys and "prompt_embedding.weight" in keys
    monkeypatch.chdir(sl)
    rates = decode_mose.main(flags + [
        "--exp-dir", str(exp), "--epoch", "1", "--max-new-tokens", "3", "--max-duration", "300",
        "--num-workers", "0", "--manifest-dir", "data/fbank", "--test-sets", "test-other",
    ])
    recogs = (exp / "decode-epoch-1-avg-1-beam1-maxnew3" / "recogs-librispeech_test_other-decode-beam1-maxnew3-epoch-1-avg-1.txt")
    lines = recogs.read_text().splitlines()
    assert len([l for l in lines if "\thyp=" in l]) == 10 and set(rates) == {"librispeech_test_other"}
    # the single-encoder script refuses this checkpoint before building anything
    import decode

    with pytest.raises(RuntimeError, match="MoSE"):  # (--debug: the exception, not the one-line exit)
        decode.main(["--llm-path", "models/llm", "--speech-encoder-type", "tiny_a", "--speech-encoder-path", enc,
                     "--exp-dir", str(exp), "--epoch", "1", "--manifest-dir", "data/fbank", "--test-sets", "test-other",
                     "--debug"])


def test_rope_theta_from_rope_parameters_for_transformers4(tmp_path, monkeypatch):
    import json
    import types

    import llmasr.llm as llm_mod

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "rope_parameters": {
        "rope_type": "default", "rope_theta": 1000000.0}}))
    cfg = types.SimpleNamespace(rope_theta=10000.0)
    monkeypatch.setattr(llm_mod, "_transformers_version", lambda: (4, 56))
    llm_mod._fix_rope_theta(cfg, tmp_path)
    assert cfg.rope_theta == 1000000.0
    cfg = types.SimpleNamespace(rope_theta=10000.0)
    monkeypatch.setattr(llm_mod, "_transformers_version", lambda: (5, 1))
    llm_mod._fix_rope_theta(cfg, tmp_path)  # transformers 5 reads rope_parameters itself
    assert cfg.rope_theta == 10000.0


def test_joint_ctc_decoding_follows_the_aligned_projector(tiny_llm_dir, monkeypatch):
    """--ctc-weight: projected frames that "say" tokens (embedding rows, blanks between) steer the
    random LLM to exactly those tokens; without the CTC it writes something else."""
    model = _model(tiny_llm_dir, [FakeEncoder(16, 2)])
    emb = model.llm.get_input_embeddings().weight.detach()
    blank = 512  # <|endoftext|>, the pad token: the aux CTC's blank
    said = [[blank, 40, 40, blank, 41, 7, 7, blank], [blank, 99, blank, 99, 5, blank, 0, 0]]
    frames = torch.stack([emb[row] for row in said]) * 2.0
    lens = torch.tensor([8, 6])
    monkeypatch.setattr(model, "encode", lambda *a, **k: [(frames, lens)])
    feats, feat_lens = _batch([16, 12])
    want = [[40, 41, 7, 514], [99, 99, 5, 514]]
    for beam in (1, 2):
        joint = _trim(model.generate_ids(feats, feat_lens, beam_size=beam, max_new_tokens=12, ctc_weight=0.9,
                                         ctc_mode="cosine", ctc_candidates=528))
        assert joint == want, beam
        llm_only = _trim(model.generate_ids(feats, feat_lens, beam_size=beam, max_new_tokens=12))
        assert llm_only != want
    with pytest.raises(ValueError, match="ctc-mode"):
        model.generate_ids(feats, feat_lens, ctc_weight=0.5)
