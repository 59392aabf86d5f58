"""The vLLM engine (``--engine vllm``, llmasr/vllm_engine.py) against the hf engine on a tiny SpeechLLM
whose LLM vLLM's CPU kernels accept (random Qwen2 with head_dim 64; the golden LLM's 16 is refused):
the golden set's 20 cuts decoded by src/decode.py with both engines, per-row limits and the repetition
guard on the engine itself, and the options it refuses. vLLM is a declared dependency of the test
environment (local/setup.sh --with-vllm, CI installs it): missing, these tests fail with that line.
Two engine starts per run (~15-30 s each)."""
import shutil
import sys

import pytest
import torch

from llmasr.scoring import read_recogs
from tests.helpers import build_golden_speechllm, require_module

MAX_NEW = 24


def _vllm():
    return require_module("vllm", "the --engine vllm tests need it: bash local/setup.sh --with-vllm")


@pytest.fixture(scope="module")
def llm64_dir(sl, tmp_path_factory):
    """Random Qwen2, 2 heads of 64 (hidden 128), the golden tokenizer; large weights so that greedy
    choices are rarely near-ties, and a strong <|im_end|> row so that some rows stop before the limit."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = tmp_path_factory.mktemp("llm64")
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(sl / "models/llm" / f, out / f)
    torch.manual_seed(11)
    cfg = Qwen2Config(vocab_size=528, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, initializer_range=0.2,
                      tie_word_embeddings=True, rope_theta=10000.0, max_position_embeddings=2048)
    llm = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        llm.model.embed_tokens.weight[514] *= 1.6  # <|im_end|>
    llm.save_pretrained(out)
    return out


def _model(sl, llm_dir):
    return build_golden_speechllm(sl, "--llm-path", str(llm_dir), "--lora-r", "8")


@pytest.fixture(scope="module")
def exp_dir(sl, llm64_dir, tmp_path_factory):
    """An experiment dir with epoch-1.pt: the tiny model's trainable weights (projector, LoRA with non-zero B)."""
    model = _model(sl, llm64_dir)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * (0.2 if "lora_B" in name else 0.05))
    exp = tmp_path_factory.mktemp("exp")
    torch.save({"model": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}},
               exp / "epoch-1.pt")
    return exp


def _decode_argv(exp, llm_dir, *extra):
    return ["--exp-dir", str(exp), "--epoch", "1", "--avg", "1", "--max-duration", "300", "--num-workers", "0",
            "--llm-path", str(llm_dir), "--lora-r", "8", "--speech-encoder-type", "tiny_a",
            "--speech-encoder-path", "models/zipformer/tiny_a/pretrained.pt",
            "--speech-encoder-bpe-path", "models/zipformer/bpe.model", "--manifest-dir", "data/fbank",
            "--max-new-tokens", str(MAX_NEW), *extra]


@pytest.fixture(scope="module")
def decoded(sl, exp_dir, llm64_dir):
    """{engine: {test set: (recogs, WER)}} of src/decode.py on the golden 20 cuts (one vLLM engine start)."""
    _vllm()
    import decode  # src/decode.py

    mp = pytest.MonkeyPatch()
    mp.chdir(sl)  # the manifests' feature paths are relative to the golden directory
    try:
        out = {}
        for engine in ("hf", "vllm"):
            rates = decode.main(_decode_argv(exp_dir, llm64_dir, "--engine", engine, "--vllm-enforce-eager", "true"))
            tag = "beam1-maxnew24" + ("-vllm" if engine == "vllm" else "")
            out[engine] = {s: (read_recogs(exp_dir / f"decode-epoch-1-avg-1-{tag}" /
                                           f"recogs-{s}-decode-{tag}-epoch-1-avg-1.txt"), r)
                           for s, r in rates.items()}
        return out
    finally:
        mp.undo()


@pytest.mark.timeout(600)
def test_decode_script_vllm_matches_hf(decoded):
    hf, vl = decoded["hf"], decoded["vllm"]
    assert set(hf) == set(vl) == {"librispeech_test_clean", "librispeech_test_other"}
    same = total = 0
    for s in hf:
        a, b = dict((c, h) for c, _, h in hf[s][0]), dict((c, h) for c, _, h in vl[s][0])
        assert set(a) == set(b) and len(a) == 10
        same += sum(a[c] == b[c] for c in a)
        total += len(a)
        assert abs(hf[s][1] - vl[s][1]) <= 1.0, (s, hf[s][1], vl[s][1])
    print(f"vllm vs hf: {same}/{total} hypotheses equal; WER hf {[hf[s][1] for s in hf]} vllm {[vl[s][1] for s in vl]}")
    assert same >= 0.9 * total, f"{same}/{total} hypotheses equal"
    # the hypotheses are not trivial: words, and some rows stop before the limit
    hyps = [h for _, _, h in hf["librispeech_test_clean"][0]]
    assert sum(len(h) > 0 for h in hyps) >= 8


@pytest.fixture(scope="module")
def engine_and_model(sl, exp_dir, llm64_dir):
    _vllm()
    from llmasr.checkpoint import load_model_state
    from llmasr.vllm_engine import VllmEngine

    model = _model(sl, llm64_dir)
    load_model_state(model, torch.load(exp_dir / "epoch-1.pt")["model"])
    model.eval()
    engine = VllmEngine(model, enforce_eager=True)  # merges LoRA on a copy: the hf model keeps its adapters
    yield engine, model
    engine.close()


def _golden_batch(sl, n=8):
    from lhotse import CutSet
    from lhotse.dataset.collation import collate_features

    cs = CutSet.from_file(sl / "data/fbank/librispeech_cuts_test-clean.jsonl.gz").with_features_path_prefix(str(sl))
    cuts = sorted(cs, key=lambda c: -c.duration)[:n]
    return collate_features(CutSet.from_cuts(cuts))


@pytest.mark.timeout(600)
def test_engine_per_row_limit_and_repetition_guard(engine_and_model, sl):
    engine, model = engine_and_model
    assert engine.startup_seconds > 0 and hasattr(model.llm, "merge_and_unload")  # hf model left unmerged
    feats, lens = _golden_batch(sl)
    opts = dict(max_new_tokens=40, max_new_tokens_per_speech_token=0.5, repetition_guard=2)
    want = model.generate_ids(feats, lens, **opts)
    got = engine.generate_ids(feats, lens, **opts)
    speech = model.prepare_inputs(feats, lens)[3].sum(1)
    limits = torch.ceil(speech.float() * 0.5).long().clamp(1, 40)
    pad = model.prompt_ids.pad
    same = 0
    for i, row in enumerate(got):
        assert len(row) <= int(limits[i])
        hf_row = [t for t in want[i].tolist()]
        while hf_row and hf_row[-1] == pad:  # finished rows are padded on the hf path
            hf_row.pop()
        same += row == hf_row
    assert same >= 7, (got, want.tolist())
    assert any(len(r) == int(limits[i]) for i, r in enumerate(got))  # a limit was reached
    assert engine.decode(feats, lens, max_new_tokens=6) == [h for h in model.decode(feats, lens, max_new_tokens=6)]


def test_guard_cut_stops_where_the_hf_criterion_does():
    from llmasr.generation import RepetitionGuard
    from llmasr.vllm_engine import guard_cut

    ids = [5, 6, 7, 8, 7, 8, 7, 8, 9]
    assert guard_cut(ids, 3, 8) == [5, 6, 7, 8, 7, 8, 7, 8]
    assert guard_cut(ids, 2, 8) == [5, 6, 7, 8, 7, 8]
    assert guard_cut([1, 2, 3], 2, 8) == [1, 2, 3]
    row = torch.tensor([guard_cut(ids, 3, 8)])
    assert bool(RepetitionGuard(3, 8)(row)[0]) and not bool(RepetitionGuard(3, 8)(row[:, :-1])[0])


@pytest.mark.parametrize("flags, line", [
    (["--beam-size", "2"], "--beam-size 2 is not supported with --engine vllm"),
    (["--ctc-weight", "0.3", "--ctc-mode", "cosine"], "--ctc-weight 0.3 (joint CTC decoding) is not supported"),
    (["--repetition-penalty", "3.0"], "--repetition-penalty 3 is not supported with --engine vllm"),
])
def test_unsupported_options_refused_before_the_model_is_built(sl, exp_dir, llm64_dir, monkeypatch, capsys,
                                                              flags, line):
    import decode  # src/decode.py

    from llmasr.recipes import inference

    def never(*a, **k):
        raise AssertionError("the model was built")

    monkeypatch.setattr(inference, "load_weights", never)
    monkeypatch.chdir(sl)
    with pytest.raises(SystemExit) as e:
        decode.main(_decode_argv(exp_dir, llm64_dir, "--engine", "vllm", *flags))
    assert e.value.code == 1
    assert line in capsys.readouterr().err.strip().splitlines()[-1]


def test_transcribe_refuses_what_vllm_cannot_serve_before_the_model_is_built(sl, exp_dir, llm64_dir, monkeypatch,
                                                                             capsys, tmp_path):
    import numpy as np
    import soundfile as sf

    from llmasr.recipes import inference, transcribe

    def never(*a, **k):
        raise AssertionError("the model was built")

    wav = tmp_path / "a.wav"
    sf.write(str(wav), np.zeros(8000, dtype=np.float32), 16000)
    monkeypatch.setattr(inference, "load_weights", never)
    monkeypatch.chdir(sl)
    with pytest.raises(SystemExit) as e:
        transcribe.main(_decode_argv(exp_dir, llm64_dir, "--engine", "vllm", "--beam-size", "4", str(wav)))
    assert e.value.code == 1
    assert "--beam-size 4 is not supported with --engine vllm" in capsys.readouterr().err.strip().splitlines()[-1]


def test_missing_vllm_named_with_the_install_command(sl, exp_dir, llm64_dir, monkeypatch, capsys):
    import decode  # src/decode.py

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    monkeypatch.chdir(sl)
    with pytest.raises(SystemExit):
        decode.main(_decode_argv(exp_dir, llm64_dir, "--engine", "vllm"))
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: --engine vllm needs vLLM: bash local/setup.sh --with-vllm" in last


def test_engine_flags_in_the_decode_parsers():
    from llmasr.recipes.decode import get_decode_parser

    for mose in (False, True):
        args = get_decode_parser(mose=mose).parse_args([])
        assert (args.engine, args.vllm_tensor_parallel_size, args.vllm_gpu_memory_utilization) == ("hf", 1, 0.9)
    args = get_decode_parser().parse_args(["--engine", "vllm", "--vllm-tensor-parallel-size", "2",
                                           "--vllm-gpu-memory-utilization", "0.5"])
    assert (args.engine, args.vllm_tensor_parallel_size, args.vllm_gpu_memory_utilization) == ("vllm", 2, 0.5)
