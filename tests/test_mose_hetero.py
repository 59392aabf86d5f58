"""MoSE with encoders of different front ends (issue #17): a tiny random Zipformer (80-dim fbank), a
tiny random Whisper (log-mel) and the golden tiny FireRedASR Conformer (Kaldi fbank + CMVN) in one
SpeechLLM, each fed its own features of the same cut - stored manifests of each type joined by cut id,
or computed on the fly - trained with src/train_mose.py's recipe and decoded with src/decode_mose.py.
Data: the espeak-ng corpus of test_training.py (24 train + 4 dev utterances).
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import random

import pytest
import torch

from tests.helpers import GOLDEN
from tests.test_training import training_env

FIRERED = GOLDEN / "firered" / "llm"  # asr_encoder.pth.tar (tiny Conformer) + its cmvn.ark
TYPES = ("fbank", "whisper", "firered")
# Zipformer 25 Hz / 4, Whisper 50 Hz / 8, Conformer 25 Hz / 2: three projector rates
DS_RATES = "4,8,2"


@pytest.fixture(scope="module")
def hetero(tmp_path_factory):
    """The espeak corpus with stored fbank (test_training's), Whisper and FireRedASR features (one
    manifest dir per type, as local/prepare.sh --feature-type writes them) and the three encoders."""
    from lhotse import CutSet, NumpyFilesWriter
    from whisper.model import ModelDimensions, Whisper

    from llmasr.features import make_feature_extractor

    env = training_env(tmp_path_factory.getbasetemp())
    root = tmp_path_factory.mktemp("mose_hetero")
    torch.manual_seed(0)
    dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=32, n_audio_head=2, n_audio_layer=1,
                           n_vocab=64, n_text_ctx=8, n_text_state=32, n_text_head=1, n_text_layer=1)
    whisper_pt = root / "whisper-tiny-random.pt"
    torch.save({"dims": dataclasses.asdict(dims), "model_state_dict": Whisper(dims).state_dict()}, whisper_pt)
    dirs = {"fbank": env["manifests"]}
    for t in ("whisper", "firered"):
        dirs[t] = root / f"fbank_{t}"
        extractor = make_feature_extractor(t, 80, FIRERED / "cmvn.ark")
        for part in ("train", "dev"):
            cuts = CutSet.from_file(env["manifests"] / f"librispeech_cuts_{part}.jsonl.gz").drop_features()
            cuts = cuts.compute_and_store_features(extractor, storage_path=str(dirs[t] / f"feats_{part}"),
                                                   storage_type=NumpyFilesWriter, num_jobs=1)
            cuts.to_file(dirs[t] / f"librispeech_cuts_{part}.jsonl.gz")
    return dict(env=env, root=root, dirs=dirs,
                encoders=("tiny", "whisper", "firered"),
                paths=(env["zip_a"], whisper_pt, FIRERED / "asr_encoder.pth.tar"))


def model_flags(h, ds_rates=DS_RATES) -> list:
    return ["--llm-path", str(h["env"]["llm"]), "--attn-implementation", "eager",
            "--speech-encoder-type", ",".join(h["encoders"]),
            "--speech-encoder-path", ",".join(map(str, h["paths"])),
            "--encoder-projector-ds-rate", ds_rates]


def data_flags(h, on_the_fly=False, dirs=None, types=TYPES) -> list:
    dirs = dirs or [h["dirs"][t] for t in types]
    return ["--feature-type", ",".join(types), "--manifest-dir", ",".join(map(str, dirs)),
            "--on-the-fly-feats", str(on_the_fly).lower(), "--firered-cmvn", str(FIRERED / "cmvn.ark"),
            "--max-duration", "100", "--num-workers", "0", "--test-num-buckets", "1", "--enable-spec-aug", "false",
            "--min-duration", "0.1", "--bucketing-sampler", "false", "--shuffle", "false", "--drop-last", "false"]


def data_module(flags):
    from llmasr.data import AsrDataModule

    p = argparse.ArgumentParser()
    AsrDataModule.add_arguments(p)
    return AsrDataModule(p.parse_args(flags))


def build(h, seed=0, **kw):
    from llmasr.recipes.decode import get_decode_parser
    from llmasr.recipes.model_args import build_model_from_args

    args = get_decode_parser(mose=True).parse_args(model_flags(h, **kw))
    torch.manual_seed(seed)
    return build_model_from_args(args, mose=True, dtype=torch.float32).eval()


def one_batch(dm, cuts):
    """The test loader's only batch of a part (name) or CutSet."""
    batches = list(dm.test_dataloader(dm.test_cuts(cuts) if isinstance(cuts, str) else cuts))
    assert len(batches) == 1
    return batches[0]


def test_batches_hold_each_feature_type_as_a_batch_of_that_type_alone(hetero):
    from lhotse.utils import LOG_EPSILON

    stored = one_batch(data_module(data_flags(hetero)), "dev")
    fly = one_batch(data_module(data_flags(hetero, on_the_fly=True)), "dev")
    assert sorted(stored["features_by_type"]) == sorted(TYPES) and stored["cut_ids"] == fly["cut_ids"]
    assert len(stored["cut_ids"]) == 4
    # "features" is the first type's, as in a single-type batch
    assert stored["features"] is stored["features_by_type"]["fbank"][0]
    for t in TYPES:
        alone = one_batch(data_module(data_flags(hetero, types=(t,))), "dev")
        assert "features_by_type" not in alone and alone["cut_ids"] == stored["cut_ids"]
        feats, lens = stored["features_by_type"][t]
        assert torch.equal(feats, alone["features"]) and torch.equal(lens, alone["feature_lens"]), t
        # stored and on-the-fly features are the same front end (lossless .npy storage; lhotse's batched
        # Kaldi fbank differs from its per-cut one in a few near-silent bins: max 0.66, mean 3e-5)
        assert torch.equal(lens, fly["features_by_type"][t][1]), t
        assert float((feats - fly["features_by_type"][t][0]).abs().mean()) < 1e-4, t
        # each type keeps its own padding: lhotse's log(1e-10), FireRedASR's 0 after CMVN
        short = int(lens.argmin())
        pad = feats[short, int(lens[short]):]
        assert pad.numel() > 0 and torch.all(pad == (0.0 if t == "firered" else LOG_EPSILON)), t
    # FireRedASR's snip_edges frame counts: 2-3 frames fewer than lhotse's
    diff = stored["features_by_type"]["fbank"][1] - stored["features_by_type"]["firered"][1]
    assert diff.tolist() and all(d in (2, 3) for d in diff.tolist()), diff


def test_missing_or_misplaced_feature_type_is_a_clear_error(hetero, tmp_path):
    from llmasr.config import UserError
    from llmasr.features import check_feature_type

    # the Whisper manifest lacks one dev cut: the error names that cut and the manifest
    src = hetero["dirs"]["whisper"] / "librispeech_cuts_dev.jsonl.gz"
    lines = gzip.open(src, "rt").read().splitlines()
    missing = json.loads(lines[2])["id"]
    partial = tmp_path / "fbank_whisper"
    partial.mkdir()
    with gzip.open(partial / src.name, "wt") as f:
        f.write("\n".join(lines[:2] + lines[3:]) + "\n")
    dm = data_module(data_flags(hetero, dirs=[hetero["dirs"]["fbank"], partial, hetero["dirs"]["firered"]]))
    with pytest.raises(UserError, match=rf"cut {missing} of .*has no whisper features in {partial / src.name}"):
        list(dm.test_dataloader(dm.test_cuts("dev")))
    # a part whose manifest exists for one type only
    with pytest.raises(FileNotFoundError, match=rf"{partial}/librispeech_cuts_train.jsonl.gz \(the whisper features"):
        dm.train_cuts("train")
    # manifest dirs not in the order of --feature-type: features of the wrong kind
    swapped = [hetero["dirs"]["fbank"], hetero["dirs"]["firered"], hetero["dirs"]["whisper"]]
    dm = data_module(data_flags(hetero, dirs=swapped))
    with pytest.raises(UserError, match=r"holds 'firered-fbank' features, not whisper ones"):
        dm.test_cuts("dev")
    # stored features of three types cannot come from one directory
    with pytest.raises(UserError, match="one --manifest-dir per entry"):
        data_module(data_flags(hetero, dirs=[hetero["dirs"]["fbank"]]))
    with pytest.raises(UserError, match="lists 2 directories for 3 --feature-type entries"):
        data_module(data_flags(hetero, dirs=[hetero["dirs"]["fbank"], hetero["dirs"]["whisper"]]))
    # the recipes' check of the flags against the encoders, and the model without features_by_type
    model = build(hetero)
    assert model.input_feature_types == list(TYPES)
    assert check_feature_type(model.feature_types, "fbank,whisper,firered", model.feature_dims, 80) == list(TYPES)
    with pytest.raises(UserError, match="use --feature-type fbank,whisper,firered "):
        check_feature_type(model.feature_types, "fbank", model.feature_dims, 80)
    with pytest.raises(UserError, match="use --feature-type fbank,whisper,firered "):
        check_feature_type(model.feature_types, "fbank,firered,whisper", model.feature_dims, 80)
    batch = one_batch(data_module(data_flags(hetero)), "dev")
    with pytest.raises(ValueError, match=r"pass features_by_type"):
        model.generate_ids(batch["features"], batch["feature_lens"], max_new_tokens=2)
    partial_types = {t: batch["features_by_type"][t] for t in ("fbank", "whisper")}
    with pytest.raises(ValueError, match=r"speech encoder 2 takes firered features but the batch has only"):
        model.generate_ids(batch["features"], batch["feature_lens"], max_new_tokens=2, features_by_type=partial_types)


def test_group_dropout_and_encoder_cache_across_types(hetero):
    """Training prompts keep a random subset of the groups, filled by randomly chosen encoders: every
    encoder (of every type) fills dropped-group prompts with its own frames at its own rate."""
    model = build(hetero, seed=1)
    batch = one_batch(data_module(data_flags(hetero)), "dev")
    feats, lens, by_type = batch["features"], batch["feature_lens"], batch["features_by_type"]
    texts = batch["texts"]
    b = len(texts)
    speech = model.encode(feats, lens, features_by_type=by_type)
    speech_lens = torch.stack([n for _, n in speech], 1)
    # per-encoder frame counts of each type: Zipformer ((T-7)//2+1)//2 // 4, Whisper ((T-1)//2+1) // 8,
    # Conformer ((T_firered+3)//2//2) // 2
    t_fb, t_fr = by_type["fbank"][1], by_type["firered"][1]
    want = torch.stack([((t_fb - 7) // 2 + 1) // 2 // 4, ((t_fb - 1) // 2 + 1) // 8, (t_fr + 3) // 2 // 2 // 2], 1)
    assert torch.equal(speech_lens, want) and len({tuple(r) for r in want.tolist()}) > 1
    assert len(set(want[0].tolist())) == 3  # the three encoders give different lengths

    random.seed(0)
    chosen = set()
    for _ in range(8):
        groups = [1] * b
        slots = []
        orig = model._slot_assignment

        def spy(g):
            out = orig(g)
            slots.append(out)
            return out

        model._slot_assignment = spy
        try:
            merged, mask, labels, _, _ = model.prepare_inputs(feats, lens, texts, groups,
                                                              features_by_type=by_type)
        finally:
            del model._slot_assignment
        enc = slots[0][:, 0]
        for r in range(b):
            e = int(enc[r])
            chosen.add(e)
            frames = speech[e][0][r, : int(speech_lens[r, e])]
            row = merged[r][mask[r]]
            # the row holds exactly the chosen encoder's frames, contiguous, and nothing of the others
            n = frames.shape[0]
            hits = [i for i in range(row.shape[0] - n + 1) if torch.equal(row[i:i + n], frames)]
            assert len(hits) == 1, (r, e)
            for o in set(range(3)) - {e}:
                assert not any(torch.equal(row[i], speech[o][0][r, 0]) for i in range(row.shape[0])), (r, e, o)
    assert chosen == {0, 1, 2}

    # training steps with sample_speech_groups: every projector gets a real gradient over a few steps
    model.train()
    got_grad = set()
    try:
        for step in range(6):
            random.seed(step)
            model.zero_grad(set_to_none=True)
            loss, stats = model(feats, lens, texts, features_by_type=by_type)
            loss.backward()
            got_grad |= {k for k, proj in enumerate(model.encoder_projector)
                         if float(proj.proj[1].weight.grad.abs().sum()) > 0}
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)
    assert got_grad == {0, 1, 2}

    # the encoder output cache keys (encoder index, cut id): the same frames, cut by cut
    cache = model.enable_encoder_cache(0.1)
    try:
        cached = model.encode(feats, lens, batch["cut_ids"], features_by_type=by_type)
        again = model.encode(feats, lens, batch["cut_ids"], features_by_type=by_type)
        assert sorted(cache.store) == sorted((e, c) for e in range(3) for c in batch["cut_ids"])
        assert cache.hits == 3 * b
        for (f0, n0), (f1, n1), (f2, n2) in zip(speech, cached, again):
            assert torch.equal(n0, n1) and torch.equal(n1, n2)
            for r in range(b):
                assert torch.allclose(f0[r, : n0[r]], f1[r, : n1[r]], atol=1e-5)
                assert torch.equal(f1[r, : n1[r]], f2[r, : n2[r]])
    finally:
        model.encoder_cache = None


def _token_loss(model, batches) -> float:
    from llmasr.data.datamodule import speech_inputs

    total = tokens = 0.0
    with torch.no_grad():
        for batch in batches:
            feats, lens, more = speech_inputs(batch, "cpu")
            _, stats = model(feats, lens, batch["texts"], **more)
            total += stats["loss_sum"]
            tokens += stats["num_tokens"]
    return total / tokens


def test_train_mose_and_decode_mose_with_three_feature_types(hetero, tmp_path):
    import decode_mose  # src/decode_mose.py
    import train_mose  # src/train_mose.py

    from llmasr.checkpoint import load_checkpoint, load_model_state

    exp = tmp_path / "exp"
    flags = model_flags(hetero) + data_flags(hetero)
    train_mose.main(["--exp-dir", str(exp), *flags, "--train-cuts", "train", "--dev-cuts", "dev",
                     "--max-duration", "12", "--num-epochs", "3", "--optimizer", "adamw", "--base-lr", "0.01",
                     "--world-size", "1", "--seed", "11", "--save-every-n", "0", "--tensorboard", "false",
                     "--valid-interval", "1000", "--log-interval", "10", "--lora-r", "8"])
    ckpt = load_checkpoint(exp / "epoch-3.pt")
    assert {k.split(".")[1] for k in ckpt["model"] if k.startswith("encoder_projector.")} == {"0", "1", "2"}
    assert ckpt["model"]["encoder_projector.1.proj.1.weight"].shape[1] == 8 * 32  # Whisper: 8 x 32-dim frames

    # the loss on the training cuts, before (the recipe's initial weights: seed 11) and after training
    from lhotse.utils import fix_random_seed

    from llmasr.recipes.model_args import build_model_from_args
    from llmasr.recipes.train import get_parser

    args = get_parser(mose=True).parse_args(flags + ["--lora-r", "8"])
    fix_random_seed(11)
    model = build_model_from_args(args, mose=True, dtype=torch.float32).eval()
    dm = data_module(data_flags(hetero))
    batches = list(dm.test_dataloader(dm.test_cuts("train")))
    before = _token_loss(model, batches)
    load_model_state(model, ckpt["model"])
    after = _token_loss(model, batches)
    print(f"token loss on the 24 training cuts: {before:.3f} -> {after:.3f}")
    assert after < before - 1.0, (before, after)

    # decode_mose.py: every dev cut decoded from the checkpoint, recogs written
    rates = decode_mose.main(["--exp-dir", str(exp), "--epoch", "3", "--avg", "1", *flags, "--lora-r", "8",
                              "--test-sets", "dev", "--max-new-tokens", "12"])
    assert list(rates) == ["librispeech_dev"]
    recogs = list(exp.glob("decode-epoch-3-avg-1-*/recogs-librispeech_dev-*.txt"))
    assert len(recogs) == 1 and recogs[0].read_text().count("hyp=") == 4


def test_batched_decoding_equals_one_cut_at_a_time(hetero):
    """12 cuts of different lengths in one batch (three feature types, three frame rates, three padded
    lengths) give each cut the token ids it gets alone."""
    from lhotse import CutSet

    from llmasr.data.datamodule import speech_inputs

    model = build(hetero, seed=3)
    with torch.no_grad():  # LoRA B starts at 0: make every trainable weight matter
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * (0.3 if "lora_B" in name else 0.05))
    dm = data_module(data_flags(hetero))
    cuts = dm.test_cuts("train").to_eager().subset(first=12)
    batch = one_batch(dm, cuts)
    dataset = dm.test_dataloader(cuts).dataset
    feats, lens, more = speech_inputs(batch, "cpu")
    assert len(set(lens.tolist())) == 12
    with torch.inference_mode():
        batched = model.generate_ids(feats, lens, max_new_tokens=12, **more)
        for i, cut_id in enumerate(batch["cut_ids"]):
            one = dataset[CutSet.from_cuts([cuts[cut_id]])]
            f1, l1, m1 = speech_inputs(one, "cpu")
            alone = model.generate_ids(f1, l1, max_new_tokens=12, **m1)
            n = alone.shape[1]
            assert alone[0].tolist() == batched[i, :n].tolist(), cut_id
            assert all(t == model.tokenizer.pad_token_id for t in batched[i, n:].tolist()), cut_id
    assert len({tuple(r) for r in batched.tolist()}) == 12  # the cuts decode to different outputs
