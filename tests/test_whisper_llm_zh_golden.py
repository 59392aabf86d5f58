"""Parity with icefall egs/speech_llm/ASR_LLM/whisper_llm_zh on its golden set (../shared/golden/whisper_llm_zh).

The recipe's own DeepSpeed-converted checkpoints (exp/epoch-N/pytorch_model.bin) load unchanged; with
local/conf/whisper_llm_zh_aishell.yaml (--compat-reference-padding true) every recorded batch gives the
recipe's encoder/projector outputs and merged LLM inputs (within 1e-4) and its generated ids token for
token - its own batching (padding leaks into shorter utterances) and one cut per batch -, and
src/decode.py writes the recipe's recogs lines, error counts and CER. Everything is derived from
expected/expected.json (runs, epochs, decode options), so a fixture made with other seeds/sizes works too.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import torch

from llmasr.io import load_torch_file

from tests.helpers import GOLDEN, require_module

require_module("whisper", "the Whisper encoder of whisper_llm_zh")

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "local" / "conf" / "whisper_llm_zh_aishell.yaml"
TOL = 1e-4


def _run_names(batching=None):
    """Decode runs recorded in the fixture (read at collection; a missing fixture fails in golden_dir)."""
    path = GOLDEN / "whisper_llm_zh" / "expected" / "expected.json"
    if not path.is_file():
        return ["epoch-2-avg-1"]
    runs = json.loads(path.read_text(encoding="utf-8"))["runs"]
    return [name for name, run in runs.items() if batching is None or run["batching"] == batching]



@pytest.fixture(scope="module")
def wz(golden_dir) -> Path:
    return golden_dir / "whisper_llm_zh"


@pytest.fixture(scope="module")
def expected(wz):
    return json.loads((wz / "expected" / "expected.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tensors(wz):
    return load_torch_file(wz / "expected" / "expected.pt")


@pytest.fixture(scope="module")
def exp(wz, tmp_path_factory):
    """The recipe's exp dir as it is (the fixture is read-only: links to its files)."""
    d = tmp_path_factory.mktemp("exp")
    for f in sorted((wz / "exp").glob("epoch-*/pytorch_model.bin")):
        (d / f.parent.name).mkdir()
        os.symlink(f, d / f.parent.name / f.name)
    return d


def _recipe_flags(run: dict) -> dict:
    argv = run["argv"]
    return {k: v for k, v in zip(argv[::2], argv[1::2])}


def _decode_argv(wz: Path, exp: Path, run: dict) -> list:
    """The README's command (src/decode.py --config local/conf/whisper_llm_zh_aishell.yaml) with the
    recipe's paths, test set and --max-duration; every other setting is the config's/default."""
    flags = _recipe_flags(run)
    assert flags["--dataset"] == "aishell" and flags["--method"] == "beam-search" and flags["--beam-size"] == "1"
    return ["--config", str(CONFIG), "--exp-dir", str(exp), "--epoch", str(run["epoch"]), "--avg", str(run["avg"]),
            "--speech-encoder-path", str(wz / flags["--speech-encoder-path-or-name"]),
            "--llm-path", str(wz / flags["--llm-path-or-name"]), "--manifest-dir", flags["--manifest-dir"],
            "--test-sets", "test", "--max-duration", flags["--max-duration"], "--num-workers", flags["--num-workers"]]


@pytest.fixture(scope="module")
def built(wz, exp, expected):
    """(args, model) as src/decode.py builds them from the config."""
    from llmasr.config import parse_args_with_config
    from llmasr.recipes.decode import get_decode_parser
    from llmasr.recipes.model_args import build_model_from_args

    run = expected["runs"]["epoch-2-avg-1"]
    args = parse_args_with_config(get_decode_parser(), _decode_argv(wz, exp, run), section="decode", inherit="train")
    assert args.compat_reference_padding
    return args, build_model_from_args(args).eval()


def _average(exp: Path, epoch: int, avg: int):
    from llmasr.checkpoint import averaged_checkpoint

    # outside no_grad on purpose: DeepSpeed's converter saved tensors with requires_grad=True
    return averaged_checkpoint(exp, epoch, avg, save=False)


def _load(model, exp: Path, epoch: int, avg: int) -> None:
    from llmasr.checkpoint import load_model_state

    load_model_state(model, _average(exp, epoch, avg), source=f"epoch-{epoch}-avg-{avg}")


def test_recipe_checkpoints_load_and_average(built, wz, exp, expected):
    from llmasr.checkpoint import average_checkpoints, load_checkpoint, load_model_state, to_our_layout

    _, model = built
    assert model.prompt_embedding is None  # the icefall model has none
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for f in sorted(exp.glob("epoch-*/pytorch_model.bin")):
        sd = load_checkpoint(f)["model"]
        # the recipe's trainable parameters + the encoder's positional-embedding buffer, nothing missing
        assert set(sd) - {"encoder.positional_embedding"} == trainable, f
        load_model_state(model, sd, source=str(f))
    assert set(to_our_layout(dict.fromkeys(expected["checkpoint_keys"], torch.zeros(0)))) == set(sd)
    # the recipe's --epoch 2 --avg 2, computed here (never a file written earlier)
    ours = average_checkpoints([exp / "epoch-1/pytorch_model.bin", exp / "epoch-2/pytorch_model.bin"])
    theirs = to_our_layout(torch.load(wz / "expected" / "epoch-2-avg-2.pt", map_location="cpu", weights_only=True))
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype for k in theirs)


def _batches(args, wz: Path, run: dict):
    """The recipe's test batches (lhotse DynamicBucketingSampler) or one cut per batch, through our
    data module (PrecomputedFeatures, LOG_EPSILON padding, longest first)."""
    from lhotse import CutSet

    from llmasr.data import AsrDataModule

    data = AsrDataModule(args)
    cuts = data.test_cuts("test")
    loader = data.test_dataloader(cuts)
    if run["batching"] == "recipe":
        return list(loader)
    assert run["batching"] == "single"
    by_id = {c.id: c for c in cuts}
    return [loader.dataset[CutSet.from_cuts([by_id[b["cut_ids"][0]]])] for b in run["batches"]]


@pytest.mark.parametrize("run_name", _run_names())
def test_recorded_batches(built, wz, exp, expected, tensors, run_name, monkeypatch, tmp_path):
    from llmasr.recipes.decode import scoring_choice
    from llmasr.scoring import write_results

    args, model = built
    run = expected["runs"][run_name]
    _load(model, exp, run["epoch"], run["avg"])
    monkeypatch.chdir(wz)  # the manifests' feature paths are relative to the recipe's directory
    batches = _batches(args, wz, run)
    assert [b["cut_ids"] for b in batches] == [b["cut_ids"] for b in run["batches"]]
    recorded = tensors.get(run_name)
    captured = {}
    hook = model.encoder.register_forward_hook(lambda m, i, o: captured.update(encoder_out=o[0]))
    diffs = {"encoder_out": 0.0, "projector_out": 0.0, "inputs_embeds": 0.0}
    results, mismatched = [], []
    try:
        for i, (batch, want) in enumerate(zip(batches, run["batches"])):
            feats, lens = batch["features"], batch["feature_lens"]
            assert lens.tolist() == want["num_frames"] and feats.shape[1] == want["padded_num_frames"]
            with torch.inference_mode():
                merged, mask, _, speech_lens, speech = model.prepare_inputs(feats, lens)
            # every cut gets all T'//8 frames of the padded batch; equal rows, no padding
            assert speech_lens[:, 0].tolist() == [want["speech_tokens"]] * len(lens)
            assert merged.shape[1] == want["merged_length"] and bool(mask.all())
            if recorded is not None:
                rec = recorded[i]
                assert rec["cut_ids"] == want["cut_ids"]
                got = {"encoder_out": captured["encoder_out"], "projector_out": speech[0][0], "inputs_embeds": merged}
                for k, v in got.items():
                    assert v.shape == rec[k].shape, (k, i)
                    diffs[k] = max(diffs[k], float((v - rec[k]).abs().max()))
                assert torch.equal(mask, rec["attention_mask"])
                assert torch.equal((mask.long().cumsum(-1) - 1), rec["position_ids"])
            ids = model.generate_ids(feats, lens)
            if ids.tolist() != want["generated_ids"]:
                mismatched.append(want["cut_ids"])
            hyps = model.tokenizer.batch_decode(ids, skip_special_tokens=True)
            results += list(zip(batch["cut_ids"], batch["texts"], hyps))
    finally:
        hook.remove()
    print(f"{run_name}: max abs diff vs the recipe {diffs}")
    assert all(d <= TOL for d in diffs.values()), diffs
    assert not mismatched, f"{run_name}: generated ids differ for batches {mismatched}"

    # the recipe's CER and counts from these hypotheses, scored as src/decode.py does by default
    metric, normalize = scoring_choice(argparse.Namespace(scoring=None, normalize=None), model.prompt_format)
    results = [(c, model.prompt_format.transform_text(ref), hyp) for c, ref, hyp in results]
    rate = write_results(tmp_path, "aishell_test", "x", results, mode=metric, normalize=normalize)
    assert rate == run["cer"]
    (want_recogs,) = (wz / "expected" / "recogs" / run_name).glob("recogs-*.txt")
    got_recogs = (tmp_path / "recogs-aishell_test-x.txt").read_text(encoding="utf-8")
    assert got_recogs == want_recogs.read_text(encoding="utf-8")


@pytest.mark.parametrize("run_name", _run_names("recipe"))
def test_decode_script_reproduces_the_recipe(wz, exp, expected, run_name, monkeypatch):
    """src/decode.py --config local/conf/whisper_llm_zh_aishell.yaml with the recipe's paths: its
    recogs lines, error counts and CER."""
    import decode  # src/decode.py

    run = expected["runs"][run_name]
    monkeypatch.chdir(wz)
    rates = decode.main(_decode_argv(wz, exp, run))
    assert rates == {"aishell_test": run["cer"]}
    out = exp / f"decode-epoch-{run['epoch']}-avg-{run['avg']}-beam1"
    suffix = f"decode-beam1-epoch-{run['epoch']}-avg-{run['avg']}"
    want = wz / "expected" / "recogs" / run_name
    (want_recogs,) = want.glob("recogs-*.txt")
    (want_errs,) = want.glob("errs-*.txt")
    (want_summary,) = want.glob("wer-summary-*.txt")
    got_recogs = (out / f"recogs-aishell_test-{suffix}.txt").read_text(encoding="utf-8")
    assert got_recogs == want_recogs.read_text(encoding="utf-8")
    got = (out / f"errs-aishell_test-{suffix}.txt").read_text(encoding="utf-8").splitlines()
    theirs = want_errs.read_text(encoding="utf-8").splitlines()
    # identical but for the header: icefall writes "%WER = ..." for its CER
    assert got[0] == theirs[0].replace("%WER", "%CER") and got[1:] == theirs[1:]
    (_, their_rate) = want_summary.read_text(encoding="utf-8").splitlines()[1].split("\t")
    summary = (out / "wer-summary-aishell_test.txt").read_text(encoding="utf-8")
    assert summary == f"settings\tCER\n{suffix}\t{their_rate}\n"


def test_compat_training_splices_like_icefall(built, wz, exp, expected):
    """Training with --compat-reference-padding: the loss icefall's SPEECH_LLM.forward computes - the
    unmasked Whisper output of the padded batch, all T'//8 projector frames spliced into each
    left-padded prompt (pad embeddings zero), llm(inputs_embeds, attention_mask, labels), no position ids."""
    from lhotse import CutSet
    from lhotse.dataset.collation import collate_features

    from llmasr.prompt import build_prompts

    _, model = built
    _load(model, exp, 2, 1)
    cuts = CutSet.from_file(wz / "data/fbank/aishell_cuts_train.jsonl.gz").with_features_path_prefix(str(wz))
    chosen = {}  # the longest cut of each transcript length: prompts of different lengths
    for c in cuts.sort_by_duration(ascending=False):
        chosen.setdefault(len("".join(c.supervisions[0].text.split())), c)
    cuts = CutSet.from_cuts(list(chosen.values())[:3])
    feats, lens = collate_features(cuts)  # lhotse: LOG_EPSILON padding, longest first
    assert len(set(lens.tolist())) == 3
    texts = [c.supervisions[0].text for c in cuts]
    with torch.no_grad():
        loss, stats = model(feats, lens, texts)

        ids, mask, labels = build_prompts(model.tokenizer, model.prompt_format, texts)
        assert not bool(mask.all())  # prompts of different lengths: left padding
        enc, _ = model.encoder(feats, lens)
        frames = model.encoder_projector.proj(enc[:, : enc.shape[1] // 8 * 8].reshape(len(lens), -1, 8 * enc.shape[2]))
        emb = model.llm.get_input_embeddings()(ids) * mask[..., None]
        rows = []
        for r in range(len(lens)):
            at = int((ids[r] == model.prompt_ids.speech).nonzero())
            rows.append((torch.cat([emb[r, :at], frames[r], emb[r, at + 1:]]),
                         torch.cat([mask[r, :at], torch.ones(frames.shape[1], dtype=torch.bool), mask[r, at + 1:]]),
                         torch.cat([labels[r, :at], torch.full((frames.shape[1],), -100), labels[r, at + 1:]])))
        embeds, amask, lab = (torch.stack(t) for t in zip(*rows))
        want = model.llm(inputs_embeds=embeds, attention_mask=amask.long(), labels=lab).loss
    assert stats["num_speech_tokens"] == len(lens) * frames.shape[1]
    assert abs(float(loss) - float(want)) < 1e-5, (float(loss), float(want))
    # the batch-independent mode splices fewer frames into the shorter cuts: another loss
    model.compat_reference_padding = False
    try:
        with torch.no_grad():
            assert abs(float(model(feats, lens, texts)[0]) - float(want)) > 1e-3
    finally:
        model.compat_reference_padding = True
    assert not model.encoder.mask_padding
