"""The icefall whisper_llm_zh recipe through the shared scripts (src/train.py, src/decode.py).

Tiny random Whisper (openai-whisper .pt) + tiny Qwen2, a Mandarin espeak-ng corpus in AISHELL
layout prepared by local/prepare.sh with Whisper features, the flags of
local/conf/whisper_llm_zh_aishell.yaml; icefall-layout checkpoints (projector keys
linear1/linear2, bare state dicts, epoch-N/pytorch_model.bin) decode unchanged; a DeepSpeed
ZeRO-1 run with local/conf/ds_zero1_whisper.json on CPU converts and decodes.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import GOLDEN, require_binary, require_module

REPO = Path(__file__).resolve().parents[1]
GOLDEN_LLM = GOLDEN / "speechllm" / "models" / "llm"  # $LLMASR_GOLDEN or ../shared/golden
CONFIG = REPO / "local" / "conf" / "whisper_llm_zh_aishell.yaml"
# flags of the recipe config that name real model/data locations or cluster settings (replaced here)
EPOCHS = 20
LOCAL_FLAGS = {"speech-encoder-path", "llm-path", "manifest-dir", "max-duration", "num-epochs", "deepspeed",
               "deepspeed-config", "base-lr", "max-new-tokens", "test-sets", "dev-cuts"}


def _flags(section: dict, **overrides) -> list:
    opts = {k: v for k, v in section.items() if k not in LOCAL_FLAGS}
    opts.update({k.replace("_", "-"): v for k, v in overrides.items()})
    out = []
    for k, v in opts.items():
        out += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    return out


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def wz(tmp_path_factory, golden_dir):  # golden_dir: a clear failure when the fixtures are missing
    """Models + data + one training run (EPOCHS epochs), shared by the tests of this file."""
    require_binary("espeak-ng")
    require_binary("sox")
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from whisper.model import ModelDimensions, Whisper

    from llmasr.demo.espeak import make_espeak_corpus

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("whisper_llm_zh")
    torch.manual_seed(0)
    dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=1, n_audio_layer=1,
                           n_vocab=64, n_text_ctx=8, n_text_state=64, n_text_head=1, n_text_layer=1)
    whisper_pt = root / "whisper-tiny-random.pt"
    torch.save({"dims": dataclasses.asdict(dims), "model_state_dict": Whisper(dims).state_dict()}, whisper_pt)
    torch.manual_seed(1)
    cfg = Qwen2Config(vocab_size=528, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                      max_position_embeddings=1024, rope_theta=10000.0, initializer_range=0.3)
    Qwen2ForCausalLM(cfg).save_pretrained(root / "llm")
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(GOLDEN_LLM / f, root / "llm" / f)

    make_espeak_corpus(root / "dl", lang="cmn", num_train=12, num_dev=2, num_test=3, seed=5, num_jobs=2)
    proc = subprocess.run(["bash", str(REPO / "local" / "prepare.sh"), "--corpus", "aishell", "--dl-dir",
                           str(root / "dl"), "--feature-type", "whisper", "--nj", "1", "--stop-stage", "3"],
                          cwd=root, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    conf = yaml.safe_load(CONFIG.read_text())
    models = dict(speech_encoder_path=whisper_pt, llm_path=root / "llm", manifest_dir=root / "data" / "fbank_whisper80",
                  attn_implementation="eager")
    train_argv = _flags(conf["train"], **models, max_duration=40, num_epochs=EPOCHS, base_lr=0.01,
                        num_workers=0, enable_spec_aug="false", min_duration=0.1, drop_last="false",
                        bucketing_sampler="false", dev_cuts="dev", tensorboard="false", log_interval=1,
                        valid_interval=1000, save_every_n=0, seed=3, lora_r=8)
    decode_argv = _flags(conf["decode"], **models, max_duration=40, num_workers=0, max_new_tokens=20,
                         test_sets="test", lora_r=8)
    exp = root / "exp"
    from llmasr.recipes.train import main as train_main

    cwd = os.getcwd()
    os.chdir(root)  # prepare.sh wrote feature paths relative to its working directory
    try:
        train_main(mose=False, argv=["--exp-dir", str(exp), *train_argv])
    finally:
        os.chdir(cwd)
    return dict(root=root, exp=exp, conf=conf, train_argv=train_argv, decode_argv=decode_argv,
                whisper_pt=whisper_pt)


def _build_model(wz):
    from llmasr.recipes.model_args import add_model_arguments, build_model_from_args
    import argparse

    p = argparse.ArgumentParser()
    add_model_arguments(p)
    args, _ = p.parse_known_args(wz["train_argv"])
    return build_model_from_args(args)


def _batch(wz, part="train"):
    from lhotse import CutSet
    from lhotse.dataset.collation import collate_features

    cuts = CutSet.from_file(wz["root"] / "data" / "fbank_whisper80" / f"aishell_cuts_{part}.jsonl.gz")
    cuts = cuts.with_features_path_prefix(str(wz["root"])).subset(first=6)
    feats, lens = collate_features(cuts)
    return feats, lens, [c.supervisions[0].text for c in cuts]


def _decode(wz, exp, *args):
    import decode  # src/decode.py

    cwd = os.getcwd()
    os.chdir(wz["root"])
    try:
        return decode.main(["--exp-dir", str(exp), *wz["decode_argv"], *args])
    finally:
        os.chdir(cwd)


def _read_recogs(d: Path) -> str:
    (f,) = sorted(d.glob("recogs-*.txt"))
    return f.read_text()


def _icefall_layout(sd: dict) -> dict:
    """Our state dict as icefall whisper_llm_zh writes it (EncoderProjector linear1/linear2)."""
    names = {"encoder_projector.proj.1.": "encoder_projector.linear1.", "encoder_projector.proj.3.": "encoder_projector.linear2."}
    out = {}
    for k, v in sd.items():
        for ours, theirs in names.items():
            if k.startswith(ours):
                k = theirs + k[len(ours):]
        out[k] = v.clone()
    return out


# --------------------------------------------------------------------------- unit level


def test_text_transform_shared_by_labels_and_references(golden_dir):
    from transformers import AutoTokenizer

    from llmasr.prompt import add_speech_tokens, build_prompts, get_prompt_format

    tok = AutoTokenizer.from_pretrained(GOLDEN_LLM)
    add_speech_tokens(tok)
    assert get_prompt_format("whisper_llm_zh").transform_text(" 今天 天气\t好 ") == "今天天气好"
    assert get_prompt_format("speechllm").transform_text("HELLO World") == "hello world"
    assert get_prompt_format("firered").transform_text("Hello, 世界！") == "hello 世界"  # FireRed's clean_text
    # training labels see the normalised transcript
    _, _, spaced = build_prompts(tok, "whisper_llm_zh", ["今天 天气 好"])
    _, _, joined = build_prompts(tok, "whisper_llm_zh", ["今天天气好"])
    assert torch.equal(spaced, joined)
    _, _, upper = build_prompts(tok, "speechllm", ["HELLO WORLD"])
    _, _, lower = build_prompts(tok, "speechllm", ["hello world"])
    assert torch.equal(upper, lower)
    _, _, upper = build_prompts(tok, "firered", ["HELLO, WORLD."])
    _, _, lower = build_prompts(tok, "firered", ["hello world"])
    assert torch.equal(upper, lower)
    # label ids: the transcript without spaces + <|im_end|>
    text_ids = tok("今天天气好", add_special_tokens=False)["input_ids"]
    assert spaced[0][spaced[0] != -100].tolist() == text_ids + [tok.convert_tokens_to_ids("<|im_end|>")]


def test_icefall_projector_keys_and_epoch_dirs_are_read(tmp_path):
    from llmasr.checkpoint import averaged_checkpoint, load_checkpoint

    torch.manual_seed(0)
    a = {"encoder_projector.linear1.weight": torch.randn(4, 6), "encoder_projector.linear2.bias": torch.randn(3),
         "llm.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight": torch.randn(2, 4)}
    b = {k: torch.randn_like(v) for k, v in a.items()}
    for e, sd in ((1, a), (2, b)):
        (tmp_path / f"epoch-{e}").mkdir()
        torch.save(sd, tmp_path / f"epoch-{e}" / "pytorch_model.bin")
    one = load_checkpoint(tmp_path / "epoch-1" / "pytorch_model.bin")["model"]
    assert set(one) == {"encoder_projector.proj.1.weight", "encoder_projector.proj.3.bias",
                        "llm.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"}
    assert torch.equal(one["encoder_projector.proj.1.weight"], a["encoder_projector.linear1.weight"])
    avg = averaged_checkpoint(tmp_path, epoch=2, avg=2)
    want = (a["encoder_projector.linear1.weight"] + b["encoder_projector.linear1.weight"]) / 2
    assert torch.allclose(avg["encoder_projector.proj.1.weight"], want, atol=1e-7, rtol=0)
    assert (tmp_path / "epoch-2-avg-2.pt").is_file()
    # both key layouts at once is an error, not a silent overwrite
    torch.save({**a, "encoder_projector.proj.1.weight": torch.zeros(4, 6)}, tmp_path / "mixed.pt")
    with pytest.raises(RuntimeError, match="both linear1/linear2 and proj"):
        load_checkpoint(tmp_path / "mixed.pt")


def test_repetition_penalty_independent_of_left_padding():
    """decoding.generate applies the penalty to every generated token of every row: a row decoded
    in a left-padded batch equals the same row decoded alone."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from llmasr.generation import GenerationOptions, generate
    from llmasr.prompt import PromptIds

    torch.manual_seed(0)
    llm = Qwen2ForCausalLM(Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, initializer_range=0.5)).eval()
    ids = PromptIds(pad=0, eos=1, bos=None, speech=2, prompt_embedding=(), suffix=())
    emb = torch.randn(2, 9, 32)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :6] = False  # row 1: 3 real positions, 6 of left padding
    emb[1, :6] = 0
    opts = GenerationOptions(max_new_tokens=12, repetition_penalty=3.0)
    with torch.no_grad():
        batch = generate(llm, emb, mask, ids, opts)
        alone = generate(llm, emb[1:, 6:], mask[1:, 6:], ids, opts)
        plain = generate(llm, emb[1:, 6:], mask[1:, 6:], ids, GenerationOptions(max_new_tokens=12))
    n = alone.shape[1]
    assert batch[1, :n].tolist() == alone[0].tolist()
    assert alone[0].tolist() != plain[0].tolist()  # the penalty does change this output
    # a penalised row repeats no token before its eos
    row = [t for t in alone[0].tolist() if t not in (0, 1)]
    assert len(row) == len(set(row))


# --------------------------------------------------------------------------- the recipe


@pytest.mark.timeout(900)  # several processes (torchrun/DeepSpeed); a hang still fails, a loaded machine does not
def test_train_loss_falls_and_decode_writes_cer(wz):
    from llmasr.checkpoint import load_checkpoint, load_model_state

    exp = wz["exp"]
    assert all((exp / f"epoch-{e}.pt").is_file() for e in range(1, EPOCHS + 1))
    feats, lens, texts = _batch(wz)
    model = _build_model(wz)
    model.eval()
    with torch.no_grad():
        before, _ = model(feats, lens, texts)
        load_model_state(model, load_checkpoint(exp / f"epoch-{EPOCHS}.pt")["model"], source="last epoch")
        after, stats = model(feats, lens, texts)
    assert float(after) < 0.6 * float(before), (float(before), float(after))
    ck = load_checkpoint(exp / f"epoch-{EPOCHS}.pt")["model"]
    assert "encoder_projector.proj.1.weight" in ck and ck["encoder_projector.proj.1.weight"].shape[1] == 8 * 64
    # frozen Whisper weights are not saved (its positional-embedding buffer is, like every buffer)
    assert [k for k in ck if k.startswith("encoder.")] == ["encoder.positional_embedding"]

    rates = _decode(wz, exp, "--epoch", str(EPOCHS), "--avg", "2")
    assert set(rates) == {"aishell_test"}
    out = exp / f"decode-epoch-{EPOCHS}-avg-2-beam1-maxnew20"
    suffix = f"decode-beam1-maxnew20-epoch-{EPOCHS}-avg-2"
    # Exactly icefall's three result files (+ the decode log); no skipped-* list: every cut was decoded.
    written = sorted(p.name for p in out.iterdir() if not p.name.startswith("log-"))
    assert written == [f"errs-aishell_test-{suffix}.txt", f"recogs-aishell_test-{suffix}.txt",
                       "wer-summary-aishell_test.txt"], written
    assert len(list(out.glob(f"log-{suffix}-*"))) == 1
    assert (out / "wer-summary-aishell_test.txt").read_text() == f"settings\tCER\n{suffix}\t{rates['aishell_test']}\n"

    # The CER recomputed here from the recogs file (parsed here, edit distances from kaldialign):
    # every character is a token (icefall's CER, spaces included); the references are the test
    # transcripts without spaces.
    import ast

    import kaldialign
    from lhotse import CutSet

    texts = {c.id: c.supervisions[0].text for c in
             CutSet.from_file(wz["root"] / "data" / "fbank_whisper80" / "aishell_cuts_test.jsonl.gz")}
    recogs = {}
    for line in _read_recogs(out).splitlines():
        cut_id, rest = line.split(":\t", 1)
        side, tokens = rest.split("=", 1)
        recogs.setdefault(cut_id, {})[side] = ast.literal_eval(tokens)
    assert sorted(recogs) == sorted(texts) and len(texts) == 3
    for cut_id, r in recogs.items():
        assert r["ref"] == [ch for ch in texts[cut_id] if not ch.isspace()], (r["ref"], texts[cut_id])
        assert all(len(tok) == 1 for tok in r["hyp"]), r["hyp"]
    errors = sum(kaldialign.edit_distance(r["ref"], r["hyp"])["total"] for r in recogs.values())
    cer = 100.0 * errors / sum(len(r["ref"]) for r in recogs.values())
    assert rates["aishell_test"] == pytest.approx(cer, abs=0.005), (rates, cer)  # (written with 2 decimals)
    assert (out / f"errs-aishell_test-{suffix}.txt").read_text().startswith(f"%CER = {cer:.2f}\n")


def test_icefall_checkpoints_decode_unchanged(wz, tmp_path):
    """epoch-N/pytorch_model.bin (DeepSpeed-converted, projector linear1/linear2, trainable only)
    with --epoch/--avg, and a published full model.state_dict() file with --avg 1, give the same
    recognitions as our own files."""
    from llmasr.checkpoint import load_checkpoint, load_model_state

    exp = wz["exp"]
    ice = tmp_path / "icefall"
    for e in (EPOCHS - 1, EPOCHS):
        (ice / f"epoch-{e}").mkdir(parents=True)
        torch.save(_icefall_layout(load_checkpoint(exp / f"epoch-{e}.pt")["model"]),
                   ice / f"epoch-{e}" / "pytorch_model.bin")
    _decode(wz, ice, "--epoch", str(EPOCHS), "--avg", "2")
    tag = f"epoch-{EPOCHS}-avg-2-beam1-maxnew20"
    assert _read_recogs(ice / f"decode-{tag}") == _read_recogs(exp / f"decode-{tag}")

    # the released file: torch.save(model.state_dict()) of the whole model, linked as epoch-999.pt
    model = _build_model(wz)
    load_model_state(model, load_checkpoint(exp / f"epoch-{EPOCHS}.pt")["model"])
    pub = tmp_path / "published"
    pub.mkdir()
    torch.save(_icefall_layout(model.state_dict()), pub / "epoch-999.pt")
    _decode(wz, pub, "--epoch", "999", "--avg", "1")
    _decode(wz, exp, "--epoch", str(EPOCHS), "--avg", "1")
    assert _read_recogs(pub / "decode-epoch-999-avg-1-beam1-maxnew20") == \
        _read_recogs(exp / f"decode-epoch-{EPOCHS}-avg-1-beam1-maxnew20")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(900)  # several processes (torchrun/DeepSpeed); a hang still fails, a loaded machine does not
def test_deepspeed_zero1_whisper_config_on_cpu(wz, tmp_path):
    require_module("deepspeed")  # requirements.txt: missing -> failure, not a skip
    from llmasr.checkpoint import load_checkpoint

    exp = tmp_path / "ds"
    argv = [a for a in wz["train_argv"]]
    i = argv.index("--num-epochs")
    argv[i + 1] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(_free_port()),
           str(REPO / "src" / "train.py"), "--deepspeed", "--deepspeed-config",
           str(REPO / wz["conf"]["train"]["deepspeed-config"]), "--exp-dir", str(exp), *argv]
    proc = subprocess.run(cmd, cwd=wz["root"], env=_env(), capture_output=True, text=True, timeout=800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (exp / "zero-epoch-1").is_dir()
    sd = load_checkpoint(exp / "epoch-1.pt")["model"]
    assert all(v.dtype == torch.float32 for v in sd.values())
    model = _build_model(wz)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(sd) - {"encoder.positional_embedding"} == trainable  # (+ the encoder's buffer)
    rates = _decode(wz, exp, "--epoch", "1", "--avg", "1")
    assert set(rates) == {"aishell_test"}
    assert len([ln for ln in _read_recogs(exp / "decode-epoch-1-avg-1-beam1-maxnew20").splitlines()
                if "hyp=" in ln]) == 3


# --------------------------------------------------------------------------- FireRed integration


def test_init_from_firered_loads_the_released_weights(golden_dir):
    import argparse

    from llmasr.firered.llm import load_firered_llm
    from llmasr.recipes.model_args import add_model_arguments, build_model_from_args

    d = golden_dir / "firered" / "llm"
    p = argparse.ArgumentParser()
    add_model_arguments(p)
    flags = ["--speech-encoder-type", "firered", "--speech-encoder-path", str(d / "asr_encoder.pth.tar"),
             "--encoder-projector-ds-rate", "2", "--projector-activation", "relu", "--projector-dropout", "0",
             "--prompt-format", "firered", "--llm-path", str(d / "Qwen2-7B-Instruct"), "--unfreeze-encoder", "true",
             "--llm-dtype", "float32", "--attn-implementation", "eager"]
    ours = build_model_from_args(p.parse_args(flags + ["--init-from-firered", str(d)])).state_dict()
    _, ref = load_firered_llm(d, dtype=torch.float32)
    ref = ref.state_dict()
    # the encoder override, the adapter and the LoRA weights of model.pth.tar all arrived
    for k in ("encoder.layer_stack.0.ffn1.net.0.weight", "encoder_projector.proj.1.weight",
              "encoder_projector.proj.3.bias",
              "llm.base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"):
        assert torch.equal(ours[k], ref[k]), k
    assert ref["llm.base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"].abs().max() > 0
    plain = build_model_from_args(p.parse_args(flags)).state_dict()
    assert not torch.equal(plain["encoder_projector.proj.1.weight"], ref["encoder_projector.proj.1.weight"])
    with pytest.raises(ValueError, match="encoder_downsample_rate 2"):
        build_model_from_args(p.parse_args(flags + ["--init-from-firered", str(d), "--encoder-projector-ds-rate", "4"]))


def test_feature_type_firered_matches_firered_front_end(golden_dir):
    import soundfile as sf

    from llmasr.features import make_feature_extractor
    from llmasr.features.firered import FireRedFeatureExtractor

    d = golden_dir / "firered"
    wav = d / "wav" / "zh_0001.wav"
    ext = make_feature_extractor("firered", firered_cmvn=str(d / "llm" / "cmvn.ark"))
    samples, sr = sf.read(str(wav), dtype="float32")
    got = ext.extract(samples, sr)
    want = FireRedFeatureExtractor(d / "llm" / "cmvn.ark").from_file(wav)
    T = want.shape[0]
    # lhotse's frame count: FireRedASR's frames, then 2..3 zero frames (its padding value after CMVN).
    assert got.shape == (round(len(samples) / 160), 80) and got.shape[0] - T in (2, 3)
    assert abs(got[:T] - want).max() < 1e-4 and not got[T:].any()
    raw = make_feature_extractor("firered").extract(samples, sr)[:T]  # no CMVN
    assert abs(raw - want).max() > 1.0
