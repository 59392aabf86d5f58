"""AsrDataModule: batch layout, samplers (max duration, DDP ranks, exact resume), filters, mux,
on-the-fly features, and the decode batching of the SpeechLLM golden fixtures."""
from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_prepare import NUM_DEV, NUM_TEST, NUM_TRAIN, prepared_en_for

LOG_EPS = math.log(1e-10)


@pytest.fixture(scope="session")
def prepared_en(tmp_path_factory):
    return prepared_en_for(tmp_path_factory)


@pytest.fixture
def work(prepared_en, monkeypatch):
    monkeypatch.chdir(prepared_en["work"])  # manifests/feature paths are relative to it
    return prepared_en


def make_dm(*argv, **kw):
    from llmasr.data import AsrDataModule

    p = argparse.ArgumentParser()
    AsrDataModule.add_arguments(p)
    args = p.parse_args(["--num-workers", "0", "--enable-spec-aug", "false", *argv])
    return AsrDataModule(args, **kw)


def durations(cuts) -> dict:
    return {c.id: c.duration for c in cuts}


def test_batch_layout(work):
    dm = make_dm("--max-duration", "12")
    cuts = dm.test_cuts("test-clean").to_eager()
    dur = durations(cuts)
    texts = {c.id: c.supervisions[0].text for c in cuts}
    seen = []
    for batch in dm.test_dataloader(cuts):
        feats, lens = batch["features"], batch["feature_lens"]
        assert feats.dtype == torch.float32 and lens.dtype == torch.int64 and feats.shape[2] == 80
        assert feats.shape[0] == len(batch["cut_ids"]) == len(batch["texts"]) == lens.shape[0]
        assert feats.shape[1] == int(lens.max())
        ds = [dur[i] for i in batch["cut_ids"]]
        assert ds == sorted(ds, reverse=True)  # longest first
        assert batch["texts"] == [texts[i] for i in batch["cut_ids"]]
        for k, cid in enumerate(batch["cut_ids"]):
            stored = torch.from_numpy(cuts[cid].load_features())
            assert torch.equal(feats[k, : lens[k]], stored)
            assert (feats[k, lens[k]:] == torch.tensor(LOG_EPS, dtype=torch.float32)).all()
        seen += batch["cut_ids"]
    assert sorted(seen) == sorted(dur)  # test loader: every cut once, nothing filtered


def test_sampler_max_duration_ranks_and_resume(work):
    dm = make_dm("--max-duration", "9", "--drop-last", "false", "--num-buckets", "4", "--seed", "5")
    cuts = dm.train_cuts()
    dur = durations(cuts)
    assert len(dur) == NUM_TRAIN

    # Two ranks: same number of batches; together every cut exactly once (lhotse pads the last
    # rank with copies named "<id>_dup<k>" so that DDP ranks stay in step).
    # No batch holds more than --max-duration seconds of audio.
    per_rank, totals = [], []
    for rank in range(2):
        batches = [b["cut_ids"] for b in dm.train_dataloader(cuts, world_size=2, rank=rank)]
        for ids in batches:
            totals.append(sum(dur[i.split("_dup")[0]] for i in ids))
        per_rank.append(batches)
    assert max(totals) <= 9.0
    assert sum(totals) / len(totals) > 0.5 * 9.0  # ... and batches are not needlessly small
    assert len(per_rank[0]) == len(per_rank[1])
    ids = [i for batches in per_rank for b in batches for i in b]
    originals = [i for i in ids if "_dup" not in i]
    assert sorted(originals) == sorted(dur)
    assert all(i.split("_dup")[0] in dur for i in ids if "_dup" in i)

    # Resume: state after 3 batches -> a new loader continues with exactly the remaining batches.
    dl = dm.train_dataloader(cuts, world_size=1, rank=0)
    full = [b["cut_ids"] for b in dl]
    dl = dm.train_dataloader(cuts, world_size=1, rank=0)
    it = iter(dl)
    head = [next(it)["cut_ids"] for _ in range(3)]
    state = dl.sampler.state_dict()
    resumed = [b["cut_ids"] for b in dm.train_dataloader(cuts, sampler_state_dict=state, world_size=1, rank=0)]
    assert head == full[:3]
    assert resumed == full[3:]
    # A different epoch reshuffles.
    dl = dm.train_dataloader(cuts, world_size=1, rank=0)
    dl.sampler.set_epoch(1)
    assert [b["cut_ids"] for b in dl] != full


def test_lhotse_budget_without_strict(work):
    """--strict-max-duration false: lhotse's own sampler (icefall batches); its budget is checked
    after adding a cut, so only the batch minus its last (longest) cut is within --max-duration."""
    dm = make_dm("--max-duration", "9", "--drop-last", "false", "--num-buckets", "4", "--seed", "5",
                 "--strict-max-duration", "false")
    cuts = dm.train_cuts()
    dur = durations(cuts)
    batches = [b["cut_ids"] for b in dm.train_dataloader(cuts, world_size=1, rank=0)]
    assert sorted(i for b in batches for i in b) == sorted(dur)
    for ids in batches:
        ds = [dur[i] for i in ids]
        assert sum(ds) - max(ds) <= 9.0


def test_filters_are_logged_and_counted(work, caplog):
    cuts = make_dm().test_cuts("test-clean").to_eager()
    dur = sorted(durations(cuts).items(), key=lambda kv: kv[1])
    shortest, longest = dur[0], dur[-1]
    words = {c.id: len(c.supervisions[0].text.split()) for c in cuts}
    middle = [cid for cid, _ in dur[1:-1]]
    limit = sorted(words[c] for c in middle)[2]  # a "token" is a word here
    long_text = {c for c in middle if words[c] > limit}
    assert long_text and len(long_text) < len(middle)
    dm = make_dm("--min-duration", f"{shortest[1] + 1e-3}", "--max-cut-duration", f"{longest[1] - 1e-3}",
                 "--max-duration", "100", text_len_fn=lambda t: len(t.split()), max_text_len=limit)
    with caplog.at_level(logging.WARNING):
        kept = [i for b in dm.valid_dataloader(cuts) for i in b["cut_ids"]]
    f = dm.filters["valid"]
    assert sorted(kept) == sorted(set(middle) - long_text)
    assert f.dropped[shortest[0]].startswith("too short")
    assert f.dropped[longest[0]].startswith("too long")
    for cid in long_text:
        assert f.dropped[cid] == f"transcript too long ({words[cid]} tokens > --max-text-tokens {limit})"
    assert f.summary() == {"too short": 1, "too long": 1, "transcript too long": len(long_text)}
    assert f"valid: dropping cut {shortest[0]}: too short" in caplog.text


def test_cut_names_and_errors(work):
    dm = make_dm()
    assert dm.cuts_path("test-clean") == Path("data/fbank/librispeech_cuts_test-clean.jsonl.gz")
    assert len(dm.dev_cuts().to_eager()) == NUM_DEV
    full = str(work["fbank"] / "librispeech_cuts_test-clean.jsonl.gz")
    assert len(dm.test_cuts(full).to_eager()) == NUM_TEST
    with pytest.raises(FileNotFoundError, match=r"data/fbank/librispeech_cuts_test-nope.jsonl.gz"):
        dm.test_cuts("test-nope")


def test_missing_feature_file_in_batch(work, tmp_path):
    from lhotse import CutSet
    from lhotse.utils import fastcopy

    dm = make_dm("--max-duration", "1000")
    cuts = dm.test_cuts("test-other").to_eager()
    victim = sorted(cuts, key=lambda c: -c.duration)[0]
    broken = CutSet.from_cuts(
        fastcopy(c, features=fastcopy(c.features, storage_path=str(tmp_path / "gone.lca"))) if c.id == victim.id
        else c for c in cuts)
    with pytest.raises(RuntimeError, match=rf"cannot load features of cut {victim.id} from {tmp_path}/gone.lca"):
        next(iter(dm.test_dataloader(broken)))


def test_mux_weights():
    from lhotse import CutSet
    from lhotse.testing.dummies import dummy_cut

    from llmasr.data import mux

    a = CutSet.from_cuts(dummy_cut(i, duration=1.0).with_id(f"a{i}") for i in range(300))
    b = CutSet.from_cuts(dummy_cut(i, duration=1.0).with_id(f"b{i}") for i in range(300))
    mixed = [c.id for c in mux([a, b], weights=[3.0, 1.0], seed=1)]
    assert sorted(mixed) == sorted(list(a.ids) + list(b.ids))  # nothing lost or repeated
    first = mixed[:200]
    frac_a = sum(i.startswith("a") for i in first) / len(first)
    assert 0.65 < frac_a < 0.85  # ~0.75 while both corpora last
    early = [c.id for c in mux([a, b], weights=[3.0, 1.0], seed=1, stop_early=True)]
    assert len(early) < 600
    with pytest.raises(ValueError, match="2 cut sets but 1 weights"):
        mux([a, b], weights=[1.0])


def test_train_cuts_mux_spec(work):
    dm = make_dm("--train-cuts", "train-clean-100:2,dev-clean:1")
    ids = [c.id for c in dm.train_cuts()]
    assert len(ids) == NUM_TRAIN + NUM_DEV and len(set(ids)) == len(ids)


def test_on_the_fly_features_match_precomputed(work):
    dm = make_dm("--max-duration", "1000", "--on-the-fly-feats", "true")
    cuts = dm.test_cuts("test-other").to_eager()
    batch = next(iter(dm.test_dataloader(cuts)))
    for k, cid in enumerate(batch["cut_ids"]):
        stored = cuts[cid].load_features()
        n = min(stored.shape[0], int(batch["feature_lens"][k]))
        assert abs(int(batch["feature_lens"][k]) - stored.shape[0]) <= 1
        assert np.abs(batch["features"][k, :n].numpy() - stored[:n]).max() < 0.05  # lilcom precision


@pytest.mark.parametrize("bins", [80, 128])
def test_whisper_features(work, bins):
    from tests.helpers import require_module

    require_module("librosa", "lhotse's WhisperFbank builds its mel filters with it")
    whisper = require_module("whisper")

    dm = make_dm("--max-duration", "1000", "--on-the-fly-feats", "true", "--feature-type", "whisper",
                 "--num-mel-bins", str(bins))
    cuts = dm.test_cuts("test-other").to_eager()
    batch = next(iter(dm.test_dataloader(cuts)))
    cid = batch["cut_ids"][0]
    audio = torch.from_numpy(cuts[cid].load_audio()[0])
    ref = whisper.log_mel_spectrogram(audio, n_mels=bins).T  # (T, bins) openai-whisper
    ours = batch["features"][0, : batch["feature_lens"][0]]
    assert ours.shape[1] == bins
    n = min(ref.shape[0], ours.shape[0])
    assert abs(ref.shape[0] - ours.shape[0]) <= 1
    assert torch.allclose(ours[:n], ref[:n], atol=1e-3)


def test_golden_decode_batches(golden_dir):
    """test_dataloader reproduces the batches of the reference recipe's decode run."""
    from lhotse import CutSet

    root = golden_dir / "speechllm"
    runs = json.loads((root / "expected" / "baseline.json").read_text())["runs"]
    run = runs["epoch-2-avg-2-beam-1"]
    assert run["batching"] == "recipe"
    dm = make_dm("--max-duration", "300", "--manifest-dir", str(root / "data" / "fbank"))
    got = []
    for part in ("test-clean", "test-other"):
        cuts = CutSet.from_cuts(c.with_features_path_prefix(str(root)) for c in dm.test_cuts(part)).to_eager()
        for b in dm.test_dataloader(cuts):
            got.append((part, b["cut_ids"], b["feature_lens"].tolist(), b["features"].shape[1]))
            last = cuts[b["cut_ids"][-1]].features
            npy = np.load(Path(last.storage_path) / last.storage_key)
            assert torch.equal(b["features"][-1, : npy.shape[0]], torch.from_numpy(npy))
    want = [(b["test_set"], b["cut_ids"], b["num_frames"], b["padded_num_frames"]) for b in run["batches"]]
    assert got == want


def test_musan_stage_and_mixing(work, tmp_path):
    """local/compute_fbank_musan.py on a tiny MUSAN-layout dir, then --enable-musan mixes it in."""
    import subprocess
    import sys

    import soundfile as sf

    from tests.helpers import REPO

    rng = np.random.default_rng(0)
    musan = tmp_path / "musan"
    for part, name in (("noise", "noise-free-sound-0001"), ("speech", "speech-librivox-0001"),
                       ("music", "music-fma-0001")):
        (musan / part / "sub").mkdir(parents=True)
        sf.write(str(musan / part / "sub" / f"{name}.wav"), 0.1 * rng.standard_normal(16000 * 12), 16000)
    (musan / "music" / "sub" / "ANNOTATIONS").write_text("music-fma-0001 pop N someone\n")
    fbank = tmp_path / "fbank"
    subprocess.run([sys.executable, str(REPO / "local" / "compute_fbank_musan.py"), "--musan-dir", str(musan),
                    "--manifest-dir", str(tmp_path / "manifests"), "--fbank-dir", str(fbank)],
                   check=True, capture_output=True)
    from lhotse import load_manifest

    noise = load_manifest(fbank / "musan_cuts.jsonl.gz")
    assert len(noise) == 3  # 12 s -> a 10 s window (kept) and a 2 s one (dropped: <= 5 s)
    assert all(c.duration == 10.0 and c.load_features().shape == (1000, 80) for c in noise)

    train = str(work["fbank"] / "librispeech_cuts_train-clean-100.jsonl.gz")
    base = ["--manifest-dir", str(fbank), "--train-cuts", train, "--max-duration", "1000", "--shuffle", "false",
            "--drop-last", "false", "--num-buckets", "2"]
    clean = next(iter(make_dm(*base).train_dataloader(make_dm(*base).train_cuts(), world_size=1, rank=0)))
    dm = make_dm(*base, "--enable-musan", "true")
    noisy = next(iter(dm.train_dataloader(dm.train_cuts(), world_size=1, rank=0)))
    assert sorted(noisy["cut_ids"]) == sorted(clean["cut_ids"])  # ids preserved
    pos = {cid: k for k, cid in enumerate(noisy["cut_ids"])}
    changed = 0
    for k, cid in enumerate(clean["cut_ids"]):
        j = pos[cid]
        n = int(clean["feature_lens"][k])
        # lhotse CutMix(pad_to_longest=True), as icefall: cuts may be extended with noise.
        assert int(noisy["feature_lens"][j]) >= n
        changed += not torch.allclose(noisy["features"][j, :n], clean["features"][k, :n])
    assert changed > 0
    assert int(noisy["feature_lens"].max()) == int(clean["feature_lens"].max())


def test_encoder_and_data_feature_types_must_agree():
    from llmasr.features import check_feature_type

    check_feature_type("fbank", "fbank", 80, 80)
    check_feature_type("whisper-mel", "whisper", 128, 128)
    check_feature_type("kaldi-fbank-cmvn", "firered", 80, 80)
    with pytest.raises(ValueError, match="use --feature-type whisper"):
        check_feature_type("whisper-mel", "fbank", 80, 80)
    with pytest.raises(ValueError, match="use --feature-type firered"):
        check_feature_type("kaldi-fbank-cmvn", "fbank", 80, 80)
    with pytest.raises(ValueError, match="use --feature-type fbank"):
        check_feature_type("fbank", "whisper", 80, 80)
    with pytest.raises(ValueError, match="--num-mel-bins 128"):
        check_feature_type("whisper-mel", "whisper", 128, 80)


def test_test_num_buckets_sets_the_decoding_batches(work):
    # Default: lhotse's 10 buckets (the reference decode batches); a small set fits one batch with 1.
    cuts = make_dm().test_cuts("test-clean").to_eager()
    assert len(cuts) >= 4
    default = list(make_dm("--max-duration", "1000").test_dataloader(cuts))
    one = list(make_dm("--max-duration", "1000", "--test-num-buckets", "1").test_dataloader(cuts))
    assert len(default) > 1
    assert len(one) == 1 and sorted(one[0]["cut_ids"]) == sorted(c.id for c in cuts)
    # A one-cut set gets one bucket whatever was asked (lhotse's bucketing sampler needs two).
    single = list(make_dm("--max-duration", "1000").test_dataloader(cuts.subset(first=1)))
    assert [b["cut_ids"] for b in single] == [[next(iter(cuts)).id]]
    with pytest.raises(ValueError, match="--test-num-buckets"):
        make_dm("--test-num-buckets", "0").test_dataloader(cuts)
