"""FireRedASR-LLM (released directory -> SpeechLLM) against the golden outputs of the released code
(tiny Qwen2 + LoRA, real formats): the default reproduces the release's batch-size-1 ids whatever the
batch, --compat-reference-padding its batched ids; fine-tuning goes through src/train.py."""
from __future__ import annotations

import argparse

import pytest
import torch

from llmasr.features.firered import pad_features
from llmasr.firered.llm import generation_options, load_firered_llm
from llmasr.firered.load import CheckpointError
from llmasr.prompt import build_prompts, firered_clean_text

TOL = 1e-4
# the README's FireRedASR-LLM command (inference_fireredasr_llm.sh options)
README_FLAGS = ["--decode-max-len", "0", "--decode-min-len", "0", "--repetition-penalty", "3.0",
                "--llm-length-penalty", "1.0", "--temperature", "1.0"]


@pytest.fixture(scope="module")
def fr(golden_dir):
    torch.set_num_threads(1)
    root = golden_dir / "firered"
    exp = torch.load(root / "expected_llm.pt", weights_only=True)
    fe, model = load_firered_llm(root / "llm")
    feats = [torch.from_numpy(fe.from_file(root / u["wav"])) for u in exp["utts"]]
    return argparse.Namespace(root=root, exp=exp, fe=fe, model=model, feats=feats)


def _opts(o):
    return generation_options(o["beam_size"], o["decode_max_len"], o["decode_min_len"], o["repetition_penalty"],
                              o["llm_length_penalty"], o["temperature"])


def _is_result(row, want, pad):
    """A generated row = the expected ids, then padding (rows that stopped earlier than the batch)."""
    return row[: len(want)] == want and all(t == pad for t in row[len(want):])


def test_prompt_and_special_ids(fr):
    p, sp = fr.exp["prompt"], fr.exp["special_ids"]
    input_ids, _, _ = build_prompts(fr.model.tokenizer, "firered", batch_size=1)
    assert input_ids[0].tolist() == p["input_ids"]
    ids = fr.model.prompt_ids
    assert (ids.pad, ids.eos, ids.bos, ids.speech) == (sp["pad"], sp["im_end"], sp["im_start"], sp["speech"])


def test_encoder_override_applied(fr):
    from llmasr.firered.load import load_encoder, load_package

    base, _ = load_encoder(fr.root / "llm" / "asr_encoder.pth.tar")
    _, sd = load_package(fr.root / "llm" / "model.pth.tar")
    key = "layer_stack.0.ffn1.net.0.weight"
    assert torch.equal(fr.model.encoder.state_dict()[key], sd["encoder." + key])
    assert not torch.equal(base.state_dict()[key], sd["encoder." + key])


def test_release_frames_and_merge(fr):
    """Alone, an utterance's <speech> becomes all T_enc // 2 adapter frames (the last ones computed from
    the encoder's context padding), as in the release; merged inputs and first LM logits match."""
    worst = {"enc_out": 0.0, "adapter_out": 0.0, "merged_embeds": 0.0, "step_logits": 0.0}
    for u, f in zip(fr.exp["utts"], fr.feats):
        x, lens = f[None], torch.tensor([f.size(0)])
        t_enc = u["enc_out"].shape[0]
        with torch.no_grad():
            enc, enc_lens = fr.model.encoder(x, lens)
            merged, mask, _, speech_lens, ((speech, _),) = fr.model.prepare_inputs(x, lens)
        assert int(enc_lens) == t_enc and t_enc >= u["enc_len"]  # reported: T_enc, not L
        assert int(speech_lens) == speech.shape[1] == u["adapter_out"].shape[0] == t_enc // 2
        assert bool(mask.all()) and merged.shape[1] == u["merged_embeds"].shape[0]
        g = u["greedy"]
        steps = g["step_logits"].shape[0]
        with torch.no_grad():
            tok = fr.model.llm.get_input_embeddings()(torch.tensor([g["generated_ids"][: steps - 1]]))
            logits = fr.model.llm(inputs_embeds=torch.cat([merged, tok], 1)).logits[0, -steps:]
        for name, ours, ref in (("enc_out", enc[0], u["enc_out"]), ("adapter_out", speech[0], u["adapter_out"]),
                                ("merged_embeds", merged[0], u["merged_embeds"]), ("step_logits", logits, g["step_logits"])):
            worst[name] = max(worst[name], float((ours - ref).abs().max()))
    print("max |ours - release|:", {k: f"{v:.1e}" for k, v in worst.items()})
    assert all(v <= TOL for v in worst.values()), worst


def test_batch_rows_equal_alone(fr):
    """In a padded batch, frames [L, T_enc(T)) of a row are those computed alone (keys and conv inputs
    >= L are masked inside the encoder), so the merged row equals the row built alone."""
    x, lens = pad_features(fr.feats)
    with torch.no_grad():
        enc, enc_lens = fr.model.encoder(x, lens)
        merged, mask, _, speech_lens, _ = fr.model.prepare_inputs(x, lens)
    worst_enc = worst_merged = 0.0
    for i, (u, f) in enumerate(zip(fr.exp["utts"], fr.feats)):
        t_enc = u["enc_out"].shape[0]
        assert int(enc_lens[i]) == t_enc and int(speech_lens[i]) == t_enc // 2
        worst_enc = max(worst_enc, float((enc[i, :t_enc] - u["enc_out"]).abs().max()))
        with torch.no_grad():
            alone, _, _, _, _ = fr.model.prepare_inputs(f[None], torch.tensor([f.size(0)]))
        n = alone.shape[1]
        assert int(mask[i].sum()) == n and bool(mask[i, -n:].all())  # left padding
        worst_merged = max(worst_merged, float((merged[i, -n:] - alone[0]).abs().max()))
    print(f"batch vs alone: enc_out {worst_enc:.1e}, merged rows {worst_merged:.1e}")
    assert worst_enc <= TOL and worst_merged <= 1e-5


@pytest.mark.parametrize("name", ["greedy", "beam"])
def test_default_ids_are_the_release_batch_size_1_ids(fr, name):
    """Batch size 1 and 3: every utterance gets the ids the release gives it alone (its own speech
    frames, mask, and max_new_tokens = its own adapter length)."""
    opts = _opts(fr.exp["utts"][0][name]["options"])
    pad = fr.model.prompt_ids.pad
    for bs in (1, 3):
        for i in range(0, len(fr.feats), bs):
            x, lens = pad_features(fr.feats[i: i + bs])
            ids = fr.model.generate_ids(x, lens, **opts)
            for j, row in enumerate(ids.tolist()):
                u = fr.exp["utts"][i + j]
                assert _is_result(row, u[name]["generated_ids"], pad), (name, bs, u["uttid"])


def test_compat_reference_padding_gives_the_release_batch_ids(fr):
    b = fr.exp["batch"]
    x, lens = pad_features(fr.feats)
    fr.model.compat_reference_padding = True
    try:
        ids = fr.model.generate_ids(x, lens, **_opts(b["greedy"]["options"]))
    finally:
        fr.model.compat_reference_padding = False
    assert ids.tolist() == b["greedy"]["generated_ids"]


def test_lora_is_used(fr):
    u, f = fr.exp["utts"][0], fr.feats[0]
    with fr.model.llm.disable_adapter():
        ids = fr.model.generate_ids(f[None], torch.tensor([f.size(0)]), **_opts(u["greedy"]["options"]))
    assert ids[0].tolist() == u["greedy_without_lora_ids"]


def _speech2text(fr, tmp_path, *flags):
    import firered_speech2text

    out = tmp_path / "llm.txt"
    firered_speech2text.main(["--asr-type", "llm", "--model-dir", str(fr.root / "llm"),
                              "--wav-scp", str(fr.root / "wav" / "wav.scp"), "--output", str(out), *flags])
    return [line.split("\t", 1) for line in out.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("beam", [1, 3])
def test_speech2text_readme_command(fr, tmp_path, beam):
    """The README's command (no extra flag) prints the release's batch-size-1 results at batch size 1
    and 3; with --compat-reference-padding a batch of 3 prints the release's batched results."""
    name = "greedy" if beam == 1 else "beam"
    want = [[u["uttid"], " ".join(u[name]["text"].splitlines())] for u in fr.exp["utts"]]
    for bs in ("1", "3"):
        assert _speech2text(fr, tmp_path, "--batch-size", bs, "--beam-size", str(beam), *README_FLAGS) == want, bs
    if beam == 1:
        b = fr.exp["batch"]
        got = _speech2text(fr, tmp_path, "--batch-size", "3", "--beam-size", "1", *README_FLAGS,
                           "--compat-reference-padding")
        assert got == [[u, " ".join(t.splitlines())] for u, t in zip(b["uttids"], b["greedy"]["text"])]


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
    with pytest.raises(CheckpointError, match=r"model.pth.tar does not match the model \(FireRedASR-LLM\): 1 unexpected: .*layers\.9"):
        load_firered_llm(d)


def test_clean_text():
    # as the released clean_text: the space between a Chinese character and English survives
    assert firered_clean_text("今天 天气，很好！ Hello,  World.") == "今天天气很好 hello world"


def test_finetuning_labels_carry_clean_text(fr):
    tok = fr.model.tokenizer
    _, _, labels = build_prompts(tok, "firered", ["Hello, World。你好！"])
    assert firered_clean_text("Hello, World。你好！") == "hello world你好"
    want = tok("hello world你好", add_special_tokens=False)["input_ids"] + [fr.model.prompt_ids.eos]
    assert labels[0][labels[0] != -100].tolist() == want
    assert tok("Hello, World。你好！", add_special_tokens=False)["input_ids"] != want[:-1]


def test_finetuning_through_train_py(fr, tmp_path, monkeypatch):
    """src/train.py's recipe with the README's FireRedASR-LLM flags (--init-from-firered, trainable
    encoder, LoRA) on the golden wavs: the loss falls and the encoder and LoRA weights move."""
    from lhotse import CutSet, Recording, RecordingSet, SupervisionSegment, SupervisionSet

    from llmasr.checkpoint import load_checkpoint
    from llmasr.recipes.train import main as train_main

    d = fr.root / "llm"
    texts = dict(line.split(" ", 1) for line in (fr.root / "wav" / "text").read_text(encoding="utf-8").splitlines())
    recs = [Recording.from_file(fr.root / u["wav"], recording_id=u["uttid"]) for u in fr.exp["utts"]]
    sups = [SupervisionSegment(id=r.id, recording_id=r.id, start=0.0, duration=r.duration,
                               text=texts[r.id] + "。")  # punctuation: cleaned by the format
            for r in recs]
    cuts = CutSet.from_manifests(recordings=RecordingSet.from_recordings(recs),
                                 supervisions=SupervisionSet.from_segments(sups))
    manifests = tmp_path / "data"
    manifests.mkdir()
    for part in ("train", "dev"):
        cuts.to_file(manifests / f"fr_cuts_{part}.jsonl.gz")
    exp = tmp_path / "exp"
    monkeypatch.chdir(tmp_path)
    train_main(argv=[
        "--exp-dir", str(exp), "--init-from-firered", str(d), "--speech-encoder-type", "firered",
        "--speech-encoder-path", str(d / "asr_encoder.pth.tar"), "--encoder-projector-ds-rate", "2",
        "--projector-activation", "relu", "--projector-dropout", "0", "--prompt-format", "firered",
        "--llm-path", str(d / "Qwen2-7B-Instruct"), "--unfreeze-encoder", "true", "--llm-dtype", "float32",
        "--attn-implementation", "eager", "--manifest-dir", str(manifests), "--dataset-prefix", "fr",
        "--train-cuts", "train", "--dev-cuts", "dev", "--feature-type", "firered", "--firered-cmvn", str(d / "cmvn.ark"),
        "--on-the-fly-feats", "true", "--num-workers", "0", "--enable-spec-aug", "false", "--min-duration", "0.1",
        "--max-duration", "100", "--bucketing-sampler", "false", "--drop-last", "false", "--num-epochs", "8",
        "--optimizer", "adamw", "--base-lr", "3e-3", "--tensorboard", "false", "--save-every-n", "0",
        "--valid-interval", "1000", "--log-interval", "1", "--seed", "1",
    ])
    first, last = (load_checkpoint(exp / f"epoch-{e}.pt") for e in (1, 8))
    assert last["train_loss"] < 0.7 * first["train_loss"], (first["train_loss"], last["train_loss"])
    init = fr.model.state_dict()
    for key in ("encoder.layer_stack.0.ffn1.net.1.weight",
                "llm.base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"):
        assert not torch.equal(last["model"][key], init[key]), key
