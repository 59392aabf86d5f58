"""FireRedASR-AED fine-tuning: a few steps on the golden wavs, loss falls, decoding writes CER files."""
from __future__ import annotations

import argparse

import pytest
import torch

from llmasr.firered import train as fr_train
from llmasr.firered.load import load_aed_dir
from llmasr.firered.tokenizer import FireRedTokenizer


def _cuts(golden_dir, out_path):
    from lhotse import CutSet, Recording, RecordingSet, SupervisionSegment, SupervisionSet

    wav = golden_dir / "firered" / "wav"
    recs, sups = [], []
    for line in (wav / "text").read_text(encoding="utf-8").splitlines():
        uttid, text = line.split(maxsplit=1)
        rec = Recording.from_file(wav / f"{uttid}.wav", recording_id=uttid)
        recs.append(rec)
        sups.append(SupervisionSegment(id=uttid, recording_id=uttid, start=0, duration=rec.duration, text=text))
    CutSet.from_manifests(recordings=RecordingSet.from_recordings(recs),
                          supervisions=SupervisionSet.from_segments(sups)).to_file(out_path)
    return out_path


def _args(argv):
    p = argparse.ArgumentParser()
    fr_train.add_train_args(p)
    return p.parse_args(argv)


def test_schedule_and_specaug():
    f = fr_train.parse_schedule("0:0.0,2000:0.1")
    assert (f(0), f(1000), f(2000), f(10**6)) == (0.0, 0.05, 0.1, 0.1)
    with pytest.raises(ValueError, match="bad schedule"):
        fr_train.parse_schedule("0-0.1")
    x = torch.ones(2, 100, 80)
    lens = torch.tensor([100, 60])
    g = torch.Generator().manual_seed(0)
    assert torch.equal(fr_train.spec_augment(x, lens, 0.0, g), x)
    y = fr_train.spec_augment(x, lens, 1.0, g)
    assert 0 < (y == 0).float().mean() < 0.5


def test_from_scratch_model(golden_dir):
    aed = golden_dir / "firered" / "aed"
    args = _args(["--exp-dir", "unused", "--cmvn", str(aed / "cmvn.ark"), "--dict", str(aed / "dict.txt"),
                  "--spm-model", str(aed / "train_bpe1000.model"), "--d-model", "32", "--n-layers-enc", "1",
                  "--n-layers-dec", "1", "--n-head", "2", "--kernel-size", "5"])
    tok = FireRedTokenizer(aed / "dict.txt", aed / "train_bpe1000.model")
    model, aed_args = fr_train.build_model(args, tok)
    assert aed_args["odim"] == 315 and (aed_args["sos_id"], aed_args["eos_id"], aed_args["pad_id"]) == (3, 4, 2)
    loss, stats = model(torch.randn(2, 120, 80), torch.tensor([120, 90]), [[5, 6, 7], [8]])
    loss.backward()
    assert int(stats["ntokens"]) == 6 and torch.isfinite(loss)
    with pytest.raises(ValueError, match="--cmvn"):
        fr_train.model_files(_args(["--exp-dir", "x"]))


def test_finetune_decode_export(golden_dir, tmp_path):
    torch.set_num_threads(1)
    cuts = str(_cuts(golden_dir, tmp_path / "cuts_golden.jsonl.gz"))
    exp = tmp_path / "exp"
    args = _args([
        "--init-from", str(golden_dir / "firered" / "aed"), "--exp-dir", str(exp), "--train-cuts", cuts,
        "--test-cuts", cuts, "--max-duration", "100", "--num-workers", "0", "--num-buckets", "0",
        "--num-epochs", "6", "--lr", "3e-3", "--warmup-steps", "0", "--log-interval", "100",
        "--dropout-schedule", "0:0.0,4:0.1", "--spec-aug-schedule", "0:0,4:0.3", "--tensorboard", "0",
        "--avg", "2", "--export-dir", str(tmp_path / "export"),
    ])
    fr_train.train(0, 1, args)
    ckpt = torch.load(exp / "epoch-6.pt", map_location="cpu", weights_only=False)
    losses = ckpt["losses"]
    assert len(losses) == 6 and losses[-1] < 0.6 * losses[0], losses
    rates = fr_train.decode(args)
    assert set(rates) == {"golden"} and 0.0 <= rates["golden"] < 1000
    for name in ("recogs-golden-epoch-6-avg-2-beam-3.txt", "errs-golden-epoch-6-avg-2-beam-3.txt",
                 "wer-summary-golden.txt"):
        assert (exp / name).is_file(), name
    assert "CER" in (exp / "wer-summary-golden.txt").read_text()
    # the export is a released-format directory (strict load) holding the averaged weights
    _, model, _ = load_aed_dir(tmp_path / "export")
    key = "decoder.layer_norm_out.weight"
    a, b = (torch.load(exp / f"epoch-{e}.pt", map_location="cpu", weights_only=False)["model"][key] for e in (5, 6))
    assert not torch.equal(a, b)
    assert torch.allclose(model.state_dict()[key], (a + b) / 2, rtol=0, atol=1e-6)
