"""Decoding speed-ups keep the results (speed itself: local/bench/, README "Speed").

- LoRA merged into the LLM for inference: the recipe's generated ids on the SpeechLLM golden set;
- bf16 decoding on CPU (SpeechLLM.set_decode_dtype): the recipe's fp32 first tokens, logits close to fp32,
  and the decode script's --decode-dtype;
- the output layer's pre-hook that spares generate()'s prefill a per-row copy of the weight;
- the AED beam search's growing key/value cache: every hypothesis' score is its teacher-forced log-prob;
- bf16 AED decoding (FireRedAsrAed.set_decode_dtype) and the Conformer's pointwise convolutions as matmuls.
"""
import json
import shutil

import pytest
from tests.helpers import build_golden_speechllm
import torch
import torch.nn as nn
import torch.nn.functional as F

from llmasr.checkpoint import average_checkpoints, load_model_state

GREEDY = "epoch-2-avg-2-beam-1"


@pytest.fixture(scope="module")
def greedy(sl):
    """(recorded greedy batches of the recipe, their features)."""
    from lhotse import CutSet
    from lhotse.dataset.collation import collate_features

    cuts = {}
    for part in ("test-clean", "test-other"):
        cs = CutSet.from_file(sl / f"data/fbank/librispeech_cuts_{part}.jsonl.gz").with_features_path_prefix(str(sl))
        cuts.update({c.id: c for c in cs})
    batches = json.loads((sl / "expected" / "baseline.json").read_text())["runs"][GREEDY]["batches"]
    return batches, [collate_features(CutSet.from_cuts([cuts[i] for i in b["cut_ids"]])) for b in batches]


def _golden_model(sl):
    model = build_golden_speechllm(sl, "--speech-encoder-bpe-path", str(sl / "models/zipformer/bpe.model"))
    avg = average_checkpoints([sl / "exp/baseline/epoch-1.pt", sl / "exp/baseline/epoch-2.pt"])
    load_model_state(model, avg, source="epoch-2-avg-2")
    return model.eval()


@pytest.mark.timeout(240)
def test_merged_lora_gives_the_recipe_ids(sl, greedy):
    model = _golden_model(sl).merge_lora_for_inference()
    # one plain Linear per projection: no peft wrapper, no adapter left
    assert not any("lora" in name for name, _ in model.named_modules())
    assert type(model.llm).__name__ == "Qwen2ForCausalLM"
    assert type(model.llm.model.layers[0].self_attn.q_proj) is nn.Linear
    batches, feats = greedy
    for b, (x, lens) in zip(batches, feats):
        assert model.generate_ids(x, lens).tolist() == b["generated_ids"], b["cut_ids"]


@pytest.mark.timeout(240)
def test_bf16_decode_keeps_first_tokens_and_logits_close(sl, greedy):
    model = _golden_model(sl).merge_lora_for_inference()
    batches, feats = greedy

    def first_step_logits():
        out = []
        with torch.inference_mode():
            for x, lens in feats:
                merged, mask, _, _, _ = model.prepare_inputs(x, lens)
                pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
                out.append(model.llm(inputs_embeds=merged, attention_mask=mask.long(), position_ids=pos).logits[:, -1])
        return torch.cat(out).float()

    fp32 = first_step_logits()
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        model.set_decode_dtype(torch.float64)
    model.set_decode_dtype(torch.bfloat16)
    assert {p.dtype for p in model.llm.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.encoder.parameters()} == {torch.float32}  # autocast, fp32 weights
    assert {p.dtype for p in model.encoder_projector.parameters()} == {torch.float32}
    bf16 = first_step_logits()
    # measured: relative L2 error 0.022 (torch 2.13 CPU, AMX)
    assert ((bf16 - fp32).norm() / fp32.norm()).item() < 0.05
    # the recipe's (fp32) first token of all 20 utterances; the whole greedy decode runs (to 200 tokens)
    assert bf16.argmax(-1).tolist() == [ids[0] for b in batches for ids in b["generated_ids"]]
    for b, (x, lens) in zip(batches, feats):
        got = model.generate_ids(x, lens)
        assert got.shape[0] == len(b["cut_ids"]) and got.shape[1] <= 200


@pytest.mark.timeout(300)
def test_decode_script_decode_dtype(sl, tmp_path, monkeypatch):
    import decode  # src/decode.py

    exp = tmp_path / "exp"
    exp.mkdir()
    for e in (1, 2):
        shutil.copy(sl / f"exp/baseline/epoch-{e}.pt", exp / f"epoch-{e}.pt")
    monkeypatch.chdir(sl)  # the manifests' feature paths are relative to the golden directory
    rates = decode.main([
        "--exp-dir", str(exp), "--epoch", "2", "--avg", "2", "--max-duration", "300", "--num-workers", "0",
        "--llm-path", "models/llm", "--speech-encoder-type", "tiny_a",
        "--speech-encoder-path", "models/zipformer/tiny_a/pretrained.pt",
        "--speech-encoder-bpe-path", "models/zipformer/bpe.model", "--manifest-dir", "data/fbank",
        "--attn-implementation", "eager", "--test-sets", "test-clean", "--decode-dtype", "bfloat16",
    ])
    out = exp / "decode-epoch-2-avg-2-beam1-bfloat16"
    recogs = (out / "recogs-librispeech_test_clean-decode-beam1-bfloat16-epoch-2-avg-2.txt").read_text()
    assert recogs.count("\tref=") == 10 and set(rates) == {"librispeech_test_clean"}
    assert any("bfloat16" in line for line in next(out.glob("log-decode-*")).read_text().splitlines())


def test_output_layer_input_is_made_foldable(sl):
    from llmasr.llm import _foldable_input, load_llm

    # generate()'s prefill: the last position of the hidden states; for one row is_contiguous() is
    # True, but the leading strides do not fold (F.linear would then expand the weight per row)
    for batch in (1, 16):
        last = torch.randn(batch, 84, 8)[:, -1:, :]
        (fixed,) = _foldable_input(None, (last,))
        assert torch.equal(fixed, last) and fixed.stride() == (8, 8, 1)
    assert _foldable_input(None, (torch.randn(16, 1, 8),)) is None
    assert _foldable_input(None, (torch.randn(84, 8)[-1:],)) is None
    llm, _ = load_llm(sl / "models/llm", dtype="float32", use_lora=True)
    head = llm.get_output_embeddings()
    assert _foldable_input in head._forward_pre_hooks.values()
    hidden = torch.randn(3, 5, head.in_features)
    assert torch.equal(head(hidden[:, -1:, :]), head(hidden[:, -1:, :].contiguous()))


@pytest.mark.timeout(120)
def test_aed_beam_scores_are_teacher_forced_log_probs():
    """40 steps (the key/value cache grows 16 -> 32 -> 40, hypotheses are reordered every step),
    per-utterance step limits: each n-best score is the sum of its tokens' log-probs computed over
    the whole prefix at once."""
    from llmasr.firered.aed import FireRedAsrAed

    torch.manual_seed(0)
    model = FireRedAsrAed(idim=80, n_layers_enc=2, n_head=4, d_model=64, residual_dropout=0.1, dropout_rate=0.1,
                          kernel_size=5, pe_maxlen=200, sos_id=3, eos_id=4, pad_id=2, odim=40, n_layers_dec=2).eval()
    lens = torch.tensor([160, 120, 90])
    x = torch.randn(3, 160, 80)
    maxlens = torch.tensor([40, 17, 40])
    smoothing = 1.25
    with torch.inference_mode():
        enc, enc_lens = model.encoder(x, lens)
        hyps = model.decoder.beam_search(enc, enc_lens, beam_size=3, nbest=3, maxlens=maxlens,
                                         softmax_smoothing=smoothing)
        for n, nbest in enumerate(hyps):
            for h in nbest:
                toks = h["yseq"].tolist()
                assert len(toks) <= maxlens[n]
                if len(toks) < maxlens[n]:
                    toks.append(model.eos_id)  # finished by <eos> (its log-prob is in the score)
                ys_in = torch.tensor([[model.sos_id] + toks[:-1]])
                logp = F.log_softmax(model.decoder(ys_in, enc[n:n + 1], enc_lens[n:n + 1]) / smoothing, dim=-1)
                forced = logp[0, torch.arange(len(toks)), torch.tensor(toks)].sum().item()
                assert forced == pytest.approx(h["score"], abs=1e-3), (n, toks)


def test_aed_bf16_decode_casts_matmul_weights_once_and_keeps_the_release_results_close(golden_dir):
    """FireRedAsrAed.set_decode_dtype on the released-format golden AED: Linear/Embedding weights in
    bf16 (the tied decoder rows stay one tensor), norms and convolutions fp32; the encoder output
    within 2 % of the release's fp32 one; every bf16 token of the first 16 of each recorded beam and
    greedy decode is one that fp32 would take too, up to bf16's rounding (teacher-forced in fp32 on
    bf16's own prefix: within NEAR_TIE of the k-th best log-prob, k the beam size), and greedy's tokens
    equal the release's up to its first step where fp32's top two are within NEAR_TIE. Tiny random
    weights have such near ties, and where bf16 breaks them depends on the CPU's bf16 kernels; the
    real models' CER cost is in the README's Speed section."""
    from llmasr.firered.load import load_aed_dir

    near_tie = 0.25  # nats: well above bf16's logit error on this model, well below a wrong token's gap
    root = golden_dir / "firered"
    exp = torch.load(root / "expected_aed.pt", weights_only=True)
    fe, model, _ = load_aed_dir(root / "aed")
    _, model32, _ = load_aed_dir(root / "aed")
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        model.set_decode_dtype(torch.float64)
    model.set_decode_dtype(torch.bfloat16)
    for name, module in model.named_modules():
        own = {p.dtype for p in module.parameters(recurse=False)}
        if isinstance(module, (nn.Linear, nn.Embedding)):
            assert own == {torch.bfloat16}, name
        elif own:
            assert own == {torch.float32}, name  # LayerNorm, Conv*, ...
    assert model.decoder.tgt_word_prj.weight is model.decoder.tgt_word_emb.weight

    for u in exp["utts"]:
        feats = torch.from_numpy(fe.from_file(root / u["wav"]))[None]
        lens = torch.tensor([feats.size(1)])
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            enc, _ = model.encoder(feats, lens)
        ref = u["enc_out"].reshape(enc.shape).float()
        assert (enc.float() - ref).norm() <= 0.02 * ref.norm(), u["uttid"]
        for case in (u["beam"], u["greedy"]):
            o = case["options"]
            hyp = model.transcribe(feats, lens, o["beam_size"], o["nbest"], o["decode_max_len"],
                                   o["softmax_smoothing"], o["aed_length_penalty"], o["eos_penalty"])[0][0]
            toks = hyp["yseq"].tolist()[:16]
            lp = _fp32_step_logprobs(model32, feats, lens, toks, o["softmax_smoothing"])
            kth = lp.topk(max(1, o["beam_size"]), dim=-1).values[:, -1]
            chosen = lp[torch.arange(len(toks)), torch.tensor(toks)]
            assert bool((chosen >= kth - near_tie).all()), (u["uttid"], o, (kth - chosen).max().item())
            if o["beam_size"] == 1:
                ref = case["token_ids"][:16]
                top2 = _fp32_step_logprobs(model32, feats, lens, ref, o["softmax_smoothing"]).topk(2, dim=-1).values
                ties = (top2[:, 0] - top2[:, 1] < near_tie).nonzero()
                first_tie = int(ties[0]) if len(ties) else len(ref)
                assert toks[:first_tie + 1] == ref[:first_tie + 1], (u["uttid"], first_tie)


def _fp32_step_logprobs(model, feats, lens, toks, smoothing):
    """Each step's log-probs (softmax smoothing as in the search) of the fp32 decoder fed ``toks``."""
    with torch.inference_mode():
        enc, enc_lens = model.encoder(feats, lens)
        ys_in = torch.tensor([[model.sos_id] + toks[:-1]])
        return F.log_softmax(model.decoder(ys_in, enc, enc_lens)[0] / smoothing, dim=-1)


def test_pointwise_conv_is_the_convolution_in_fp32_and_a_half_matmul_under_autocast():
    from llmasr.layers import pointwise_conv1d

    torch.manual_seed(0)
    conv = nn.Conv1d(24, 40, kernel_size=1, bias=True)
    x = torch.randn(3, 24, 17)
    with torch.inference_mode():
        assert torch.equal(pointwise_conv1d(conv, x), conv(x))  # fp32: the convolution itself
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = pointwise_conv1d(conv, x)
        assert y.dtype == torch.bfloat16 and y.shape == (3, 40, 17)
        torch.testing.assert_close(y.float(), conv(x), rtol=2e-2, atol=2e-2)
        y = pointwise_conv1d(conv, x.bfloat16())  # half input, fp32 weights, no autocast
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), conv(x), rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="not a pointwise convolution"):
        pointwise_conv1d(nn.Conv1d(24, 40, kernel_size=3), x)
