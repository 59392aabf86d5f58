"""FireRedASR-AED through the shared recipes: fine-tune the golden tiny AED with src/train_aed.py (icefall
flags, checkpoints, mid-epoch resume), decode with src/decode_aed.py (CER files), export with
src/export_aed.py and decode the export with src/firered_speech2text.py; the untrained AED through the
recipe's decode path reproduces the reference's beam-search ids."""
from __future__ import annotations

import argparse
import ast
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import kaldialign
import pytest
import torch

from llmasr.io import load_torch_file

from llmasr.firered.aed_recipe import build_aed_model, parse_schedule

EPOCHS = 12
SAVE_EVERY_N = 3  # 2 batches per epoch: checkpoint-3.pt is the middle of epoch 2


def _aed_dir(golden_dir: Path) -> Path:
    return golden_dir / "firered" / "aed"


def _write_cuts(golden_dir: Path, path: Path) -> Path:
    """The three golden wavs with their transcripts (wav/text), cut ids = utterance ids."""
    from lhotse import CutSet, Recording, RecordingSet, SupervisionSegment, SupervisionSet

    wav = golden_dir / "firered" / "wav"
    recs, sups = [], []
    for line in (wav / "text").read_text(encoding="utf-8").splitlines():
        uttid, text = line.split(maxsplit=1)
        rec = Recording.from_file(wav / f"{uttid}.wav", recording_id=uttid)
        recs.append(rec)
        sups.append(SupervisionSegment(id=uttid, recording_id=uttid, start=0, duration=rec.duration, text=text))
    cuts = CutSet.from_manifests(recordings=RecordingSet.from_recordings(recs),
                                 supervisions=SupervisionSet.from_segments(sups))
    cuts.modify_ids(lambda cut_id: cut_id.rsplit("-", 1)[0]).to_file(path)
    return path


def _run(repo_dir: Path, script: str, *argv: str) -> float:
    """Run ``src/<script>`` in a subprocess (one thread: the shared CPU is oversubscribed); seconds."""
    start = time.time()
    proc = subprocess.run([sys.executable, str(repo_dir / "src" / script), *map(str, argv)],
                          capture_output=True, text=True, timeout=280, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, f"{script} failed:\n{proc.stderr[-4000:]}"
    return time.time() - start


def _features(golden_dir: Path):
    return ["--on-the-fly-feats", "true", "--firered-cmvn", _aed_dir(golden_dir) / "cmvn.ark", "--num-workers", "0"]


def _train_argv(golden_dir: Path, cuts: Path, exp: Path):
    return ["--init-from", _aed_dir(golden_dir), "--exp-dir", exp, *_features(golden_dir),
            "--train-cuts", cuts, "--dev-cuts", cuts, "--max-duration", "5", "--bucketing-sampler", "false",
            "--drop-last", "false", "--num-epochs", EPOCHS, "--base-lr", "5e-3", "--warmup-steps", "0",
            "--use-fp16", "false", "--enable-spec-aug", "true", "--dropout-schedule", "0:0.0,8:0.1",
            "--save-every-n", SAVE_EVERY_N, "--log-interval", "1"]


@pytest.fixture(scope="module")
def trained(golden_dir, repo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("firered_aed")
    cuts = _write_cuts(golden_dir, root / "golden_cuts.jsonl.gz")
    exp = root / "exp"
    seconds = _run(repo_dir, "train_aed.py", *_train_argv(golden_dir, cuts, exp), "--tensorboard", "true")
    return argparse.Namespace(root=root, cuts=cuts, exp=exp, seconds=seconds)


@pytest.fixture(scope="module")
def decoded(trained, golden_dir, repo_dir):
    _run(repo_dir, "decode_aed.py", "--init-from", _aed_dir(golden_dir), "--exp-dir", trained.exp,
         *_features(golden_dir), "--epoch", EPOCHS, "--avg", 2, "--test-sets", trained.cuts, "--max-duration", 10)
    decode_dir = trained.exp / f"decode-epoch-{EPOCHS}-avg-2-beam3"
    suffix = f"decode-beam3-epoch-{EPOCHS}-avg-2"
    return argparse.Namespace(dir=decode_dir, recogs=decode_dir / f"recogs-golden_cuts-{suffix}.txt",
                              errs=decode_dir / f"errs-golden_cuts-{suffix}.txt",
                              summary=decode_dir / "wer-summary-golden_cuts.txt", suffix=suffix)


def _load(path: Path):
    return load_torch_file(path)


def _parse_recogs(path: Path):
    """{cut id: {"ref": tokens, "hyp": tokens}} from an icefall recogs file (read here, not with llmasr)."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.fullmatch(r"(.*?):\t(ref|hyp)=(.*)", line)
        assert m, line
        out.setdefault(m.group(1), {})[m.group(2)] = ast.literal_eval(m.group(3))
    return out


# --------------------------------------------------------------------------- in-process


def test_schedule_loss_contract_and_bad_inputs(golden_dir, tmp_path):
    torch.set_num_threads(1)
    f = parse_schedule("0:0.0,8:0.1")
    assert (f(0), f(4), f(8), f(10**6)) == (0.0, 0.05, 0.1, 0.1)
    with pytest.raises(ValueError, match="bad schedule"):
        parse_schedule("0-0.1")
    aed = _aed_dir(golden_dir)
    model = build_aed_model(argparse.Namespace(init_from=str(aed), label_smoothing=0.0, dropout_schedule="0:0.0,8:0.1"))
    # the recipes' contract: texts in, mean CE per target token (transcript ids + <eos>) out
    model.eval()
    x, lens = torch.randn(2, 120, 80), torch.tensor([120, 90])
    texts = ["今天天气很好", "HELLO WORLD"]
    with torch.no_grad():
        loss, stats = model(x, lens, texts)
        ids = [model.tokenizer.encode(t) for t in texts]
        total, _ = super(type(model), model).forward(x, lens, ids, label_smoothing=0.0)
    assert stats["num_tokens"] == sum(len(i) + 1 for i in ids) == 6 + 1 + len(ids[1]) + 1
    assert torch.allclose(loss * stats["num_tokens"], total) and stats["loss_sum"] == pytest.approx(float(total))

    # the training loop sets the dropout of the global batch index before each batch
    from llmasr.recipes.train import _set_precision, get_params, get_parser
    from llmasr.training.loop import train_one_epoch
    from llmasr.training.optim import build_optimizer
    from llmasr.training.schedulers import build_scheduler

    params = get_params()
    params.update(vars(get_parser(model_type="aed").parse_args(["--init-from", str(aed), "--exp-dir", str(tmp_path)])))
    _set_precision(params)
    optimizer = build_optimizer("adamw", model, 1e-4)
    batch = {"features": x, "feature_lens": lens, "texts": texts, "cut_ids": ["a", "b"]}
    train_one_epoch(params, model, optimizer, build_scheduler("fixed", optimizer), [batch] * 3,
                    None, torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"))
    assert params.batch_idx_train == 3
    rates = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert rates and rates == pytest.approx([0.1 * 3 / 8] * len(rates))

    # bad inputs: one-line errors naming the file / flag
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(aed / "model.pth.tar", partial)
    with pytest.raises(FileNotFoundError, match=r"missing cmvn.ark, dict.txt, train_bpe1000.model"):
        build_aed_model(argparse.Namespace(init_from=str(partial)))
    with pytest.raises(ValueError, match="--firered-cmvn .*cmvn.ark"):
        build_aed_model(argparse.Namespace(init_from=str(aed), on_the_fly_feats=True, firered_cmvn=None))
    other = tmp_path / "fbank_firered"  # stored features of another model (local/prepare.sh keeps its cmvn.ark)
    other.mkdir()
    (other / "firered_cmvn.ark").write_text("[ " + " ".join(["1"] * 80) + " 10\n " + " ".join(["2"] * 80) + " 0 ]\n")
    with pytest.raises(ValueError, match=r"fbank_firered/firered_cmvn.ark, which differs from the model's"):
        build_aed_model(argparse.Namespace(init_from=str(aed), on_the_fly_feats=False, manifest_dir=other))


def test_untrained_decode_path_reproduces_reference_ids(golden_dir, tmp_path):
    """The decode recipe's pieces (flags, model builder, data module features, options) on the
    untrained golden AED at batch size 1 give the reference's beam-3 ids."""
    from llmasr.data import AsrDataModule
    from llmasr.recipes.decode import generation_options_from_args, get_decode_parser
    from llmasr.recipes.model_args import build_model_from_args

    torch.set_num_threads(1)
    expected = torch.load(golden_dir / "firered" / "expected_aed.pt", weights_only=True)
    cuts = _write_cuts(golden_dir, tmp_path / "golden_cuts.jsonl.gz")
    args = get_decode_parser(model_type="aed").parse_args(
        ["--init-from", str(_aed_dir(golden_dir)), *map(str, _features(golden_dir)), "--max-duration", "2.6"])
    gen = generation_options_from_args(args)
    opts = expected["utts"][0]["beam"]["options"]  # the released script's defaults = ours
    assert gen == dict(beam_size=opts["beam_size"], max_new_tokens=None, softmax_smoothing=opts["softmax_smoothing"],
                       length_penalty=opts["aed_length_penalty"], eos_penalty=opts["eos_penalty"])
    model = build_model_from_args(args).eval()
    data = AsrDataModule(args)
    got = {}
    with torch.inference_mode():
        for batch in data.test_dataloader(data.test_cuts(str(cuts))):
            assert len(batch["cut_ids"]) == 1
            got[batch["cut_ids"][0]] = (model.decode_ids(batch["features"], batch["feature_lens"], **gen),
                                        model.decode(batch["features"], batch["feature_lens"], **gen))
    assert len(got) == len(expected["utts"]) == 3
    for u in expected["utts"]:
        ids, texts = got[u["uttid"]]
        assert ids == [u["beam"]["token_ids"]], u["uttid"]
        assert texts == [u["beam"]["text"]], u["uttid"]


# --------------------------------------------------------------------------- through the scripts


def test_train_loss_falls_and_icefall_layout(trained):
    exp = trained.exp
    first, last = _load(exp / "epoch-1.pt"), _load(exp / f"epoch-{EPOCHS}.pt")
    ratio = last["train_loss"] / first["train_loss"]
    print(f"train loss/token: epoch 1 {first['train_loss']:.3f} -> epoch {EPOCHS} {last['train_loss']:.3f} "
          f"(ratio {ratio:.3f}); training took {trained.seconds:.1f} s")
    assert ratio < 0.35, (first["train_loss"], last["train_loss"])
    for e in range(1, EPOCHS + 1):
        assert (exp / f"epoch-{e}.pt").is_file(), e
    batches = 2 * EPOCHS
    assert sorted(int(p.stem.split("-")[1]) for p in exp.glob("checkpoint-*.pt")) == list(
        range(SAVE_EVERY_N, batches + 1, SAVE_EVERY_N))
    assert (exp / "best-train-loss.pt").is_file() and (exp / "best-valid-loss.pt").is_file()
    assert list((exp / "log").glob("log-train-*")) and list((exp / "tensorboard").glob("events.out.tfevents.*"))
    # the checkpoint holds every AED tensor under the released names, and the options it was run with
    assert last["batch_idx_train"] == batches and last["model_type"] == "aed" and last["base_lr"] == 5e-3
    assert last["optimizer_type"] == "adamw" and last["feature_type"] == "firered"
    assert any(k.startswith("encoder.") for k in last["model"]) and any(k.startswith("decoder.") for k in last["model"])


def test_mid_epoch_resume_is_bit_identical(trained, golden_dir, repo_dir, tmp_path):
    exp = tmp_path / "resumed"
    exp.mkdir()
    shutil.copy(trained.exp / f"checkpoint-{SAVE_EVERY_N}.pt", exp)
    ckpt = _load(exp / f"checkpoint-{SAVE_EVERY_N}.pt")
    assert (ckpt["cur_epoch"], ckpt["cur_batch_idx"]) == (2, 1)  # really the middle of an epoch
    seconds = _run(repo_dir, "train_aed.py", *_train_argv(golden_dir, trained.cuts, exp),
                   "--tensorboard", "false", "--start-batch", SAVE_EVERY_N)
    a, b = _load(trained.exp / f"epoch-{EPOCHS}.pt"), _load(exp / f"epoch-{EPOCHS}.pt")
    diff = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
    print(f"resumed from checkpoint-{SAVE_EVERY_N}.pt in {seconds:.1f} s: max |weight difference| {diff}")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), diff
    assert a["train_loss"] == b["train_loss"]


def test_decode_writes_cer_files_that_rescore(decoded):
    for path in (decoded.recogs, decoded.errs, decoded.summary):
        assert path.is_file(), path
    summary = decoded.summary.read_text(encoding="utf-8").splitlines()
    assert summary[0] == "settings\tCER"
    cer = dict(line.split("\t") for line in summary[1:])[decoded.suffix]
    # independent recomputation from the recogs file: edit distance over the scored tokens
    recogs = _parse_recogs(decoded.recogs)
    assert set(recogs) == {"zh_0001", "en_0001", "mix_0001"}
    assert recogs["zh_0001"]["ref"] == list("今天天气很好")  # Mandarin: one token per character
    errors = sum(kaldialign.edit_distance(r["ref"], r["hyp"])["total"] for r in recogs.values())
    ref_len = sum(len(r["ref"]) for r in recogs.values())
    print(f"CER {cer}% = {errors}/{ref_len}; hyps {[' '.join(r['hyp']) for r in recogs.values()]}")
    assert float(cer) == round(100.0 * errors / ref_len, 2)
    assert float(cer) < 90.0  # fine-tuning learned something (the untrained AED outputs gibberish)
    assert decoded.errs.read_text(encoding="utf-8").startswith(f"%CER = {float(cer):.2f}\n")


def test_decode_dtype_bfloat16(trained, decoded, golden_dir, repo_dir):
    """--decode-dtype bfloat16: its own decode directory, and the fine-tuned model's CER within 10
    points of the fp32 decode's (3 utterances of a tiny model: a changed token is 2-3 points)."""
    _run(repo_dir, "decode_aed.py", "--init-from", _aed_dir(golden_dir), "--exp-dir", trained.exp,
         *_features(golden_dir), "--epoch", EPOCHS, "--avg", 2, "--test-sets", trained.cuts, "--max-duration", 10,
         "--decode-dtype", "bfloat16")
    bf16_dir = trained.exp / f"decode-epoch-{EPOCHS}-avg-2-beam3-bfloat16"

    def cer(summary):
        return float(summary.read_text(encoding="utf-8").splitlines()[1].split("\t")[1])

    assert abs(cer(bf16_dir / "wer-summary-golden_cuts.txt") - cer(decoded.summary)) <= 10.0
    assert any("decode dtype bfloat16" in line for line in next(bf16_dir.glob("log-decode-*")).read_text().splitlines())


def test_export_decodes_like_the_recipe(trained, decoded, golden_dir, repo_dir, tmp_path):
    from llmasr.firered.load import load_aed_dir
    from llmasr.scoring import tokenize_for_scoring

    out = tmp_path / "FireRedASR-AED-finetuned"
    _run(repo_dir, "export_aed.py", "--init-from", _aed_dir(golden_dir), "--exp-dir", trained.exp,
         "--epoch", EPOCHS, "--avg", 2, "--export-dir", out)
    _, model, _ = load_aed_dir(out)  # strict load of the released format
    averaged = _load(trained.exp / f"epoch-{EPOCHS}-avg-2.pt")["model"]  # written by the decode
    assert all(torch.equal(model.state_dict()[k], v) for k, v in averaged.items())
    hyp_file = tmp_path / "hyp.txt"
    _run(repo_dir, "firered_speech2text.py", "--asr-type", "aed", "--model-dir", out,
         "--wav-scp", golden_dir / "firered" / "wav" / "wav.scp", "--output", hyp_file, "--beam-size", 3,
         "--softmax-smoothing", 1.25, "--aed-length-penalty", 0.6, "--eos-penalty", 1.0, "--decode-max-len", 0)
    lines = [line.split("\t") for line in hyp_file.read_text(encoding="utf-8").splitlines()]
    recogs = _parse_recogs(decoded.recogs)
    assert {u: tokenize_for_scoring(t, "zh") for u, t in lines} == {u: r["hyp"] for u, r in recogs.items()}
