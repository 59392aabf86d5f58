"""local/prepare.sh --feature-type firered: FireRedASR features (Kaldi fbank + the model's global
CMVN) stored in lhotse manifests, checked against the FireRedASR reference features of the golden
wavs; a missing cmvn.ark is a clear error."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_prepare import load_cuts, run_prepare

# lhotse's LilcomChunkyWriter stores with tick_power -5: values are rounded to multiples of 2^-5,
# so the absolute error is at most half a tick (measured on the golden wavs: 0.015625).
LILCOM_MAX_ERR = 2.0 ** -6 + 1e-6
UTTS = ("zh_0001", "en_0001", "mix_0001")


def kaldi_dir(golden_dir: Path, root: Path) -> Path:
    """The golden FireRedASR wavs as a Kaldi data dir (absolute paths)."""
    kdir = root / "firered_golden" / "eval"
    kdir.mkdir(parents=True)
    wav_dir = golden_dir / "firered" / "wav"
    (kdir / "wav.scp").write_text("".join(f"{u} {wav_dir / u}.wav\n" for u in UTTS))
    shutil.copy(wav_dir / "text", kdir / "text")
    return kdir


@pytest.fixture(scope="module")
def prepared_firered(tmp_path_factory, golden_dir):
    work = tmp_path_factory.mktemp("firered_prepare")
    kdir = kaldi_dir(golden_dir, work / "dl")
    cmvn = golden_dir / "firered" / "aed" / "cmvn.ark"
    args = ("--corpus", "kaldi", "--name", "fr", "--dl-dir", str(kdir), "--feature-type", "firered",
            "--firered-cmvn", str(cmvn), "--nj", "2")  # 2 jobs: the extractor must pickle into workers
    first = run_prepare(work, *args)
    return {"work": work, "args": args, "cmvn": cmvn, "fbank": work / "data" / "fbank_firered",
            "first_run": first.stdout}


def test_stored_features_match_firered(prepared_firered, golden_dir, monkeypatch):
    from lhotse.dataset.collation import collate_features

    from llmasr.features.firered import FireRedFeatureExtractor

    fbank = prepared_firered["fbank"]
    monkeypatch.chdir(prepared_firered["work"])  # feature paths are relative to where prepare.sh ran
    assert "Stage 4" in prepared_firered["first_run"] and "fr_cuts_eval.jsonl.gz: OK" in prepared_firered["first_run"]
    for marker in (".fr.done", ".fr-validated.done"):
        assert (fbank / marker).is_file()
    assert (fbank / "firered_cmvn.ark").read_bytes() == prepared_firered["cmvn"].read_bytes()
    assert not (prepared_firered["work"] / "data" / "fbank").exists()  # feature-type-specific dir only

    # The FireRedASR reference code's features of the same wavs (produced by the golden generator).
    golden = {u["uttid"]: u for u in torch.load(golden_dir / "firered" / "expected_aed.pt", weights_only=True)["utts"]}
    ours = FireRedFeatureExtractor(prepared_firered["cmvn"])
    cuts = load_cuts(fbank / "fr_cuts_eval.jsonl.gz")
    assert sorted(cuts.ids) == sorted(UTTS)
    worst = 0.0
    for cut in cuts:
        ref = golden[cut.id]["feats"].numpy()
        T = golden[cut.id]["feat_len"]
        assert ref.shape == (T, 80)
        direct = ours.from_file(golden_dir / "firered" / "wav" / f"{cut.id}.wav")
        np.testing.assert_allclose(direct, ref, atol=1e-5)
        stored = cut.load_features()
        # lhotse needs round(duration / 10 ms) frames; FireRedASR has 1 + (samples - 400) // 160.
        n = golden[cut.id]["num_samples"]
        assert stored.shape == (cut.num_frames, 80) == (round(n / 160), 80)
        assert cut.num_frames - T in (2, 3)
        err = np.abs(stored[:T] - ref).max()
        worst = max(worst, err)
        assert err <= LILCOM_MAX_ERR, (cut.id, err)
        assert np.abs(stored[T:]).max() <= LILCOM_MAX_ERR  # zero padding (FireRedASR's pad value after CMVN)
        assert cut.features.type == "firered-fbank"
    assert worst > 1e-3  # really lilcom-compressed (the bound is meaningful)
    feats, lens = collate_features(cuts)  # what the data module's PrecomputedFeatures does
    assert feats.shape == (3, max(c.num_frames for c in cuts), 80)


def test_rerun_is_idempotent_and_cmvn_is_pinned(prepared_firered, tmp_path):
    fbank = prepared_firered["fbank"]
    files = sorted(p for p in fbank.rglob("*") if p.is_file())
    before = {p: p.stat().st_mtime_ns for p in files}
    out = run_prepare(prepared_firered["work"], *prepared_firered["args"]).stdout
    assert out.count("exists - skipping") == 3 and "computing" not in out
    assert {p: p.stat().st_mtime_ns for p in sorted(p for p in fbank.rglob("*") if p.is_file())} == before

    # Features normalised with one cmvn.ark are not silently reused with another.
    other = tmp_path / "cmvn.ark"
    data = bytearray(prepared_firered["cmvn"].read_bytes())
    data[-9] ^= 1  # a different statistic, same format
    other.write_bytes(bytes(data))
    args = list(prepared_firered["args"])
    args[args.index("--firered-cmvn") + 1] = str(other)
    proc = run_prepare(prepared_firered["work"], *args, check=False)
    assert proc.returncode != 0
    assert f"{Path('data/fbank_firered/firered_cmvn.ark')} differs from" in proc.stdout and str(other) in proc.stdout


def test_missing_cmvn_is_a_clear_error(golden_dir, tmp_path):
    import subprocess
    import sys

    from tests.helpers import REPO

    kdir = kaldi_dir(golden_dir, tmp_path / "dl")
    base = ("--corpus", "kaldi", "--name", "fr", "--dl-dir", str(kdir), "--feature-type", "firered")
    proc = run_prepare(tmp_path, *base, check=False)
    assert proc.returncode != 0 and "--feature-type firered needs --firered-cmvn" in proc.stdout
    missing = tmp_path / "models" / "FireRedASR-AED-L" / "cmvn.ark"
    proc = run_prepare(tmp_path, *base, "--firered-cmvn", str(missing), check=False)
    assert proc.returncode != 0 and f"--firered-cmvn {missing}: cmvn.ark not found or not readable" in proc.stdout
    assert not (tmp_path / "data" / "manifests").exists()  # stopped before doing any work

    # The stage-3 script on its own (manifests present) names the file too, before computing anything.
    run_prepare(tmp_path, "--corpus", "kaldi", "--name", "fr", "--dl-dir", str(kdir), "--stop-stage", "1")
    proc = subprocess.run([sys.executable, str(REPO / "local" / "compute_fbank.py"), "--prefix", "fr",
                           "--fbank-dir", "data/fbank_firered", "--feature-type", "firered",
                           "--firered-cmvn", str(missing)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert f"--firered-cmvn {missing}: cmvn.ark not found or not readable" in proc.stderr
    assert not list((tmp_path / "data").glob("fbank_firered/fr_cuts_*"))


def firered_batch(work: Path, cmvn: Path, on_the_fly: bool) -> dict:
    """The one training batch (all 3 cuts, no SpecAugment) of AsrDataModule over the firered manifests."""
    import argparse

    from llmasr.data import AsrDataModule

    p = argparse.ArgumentParser()
    AsrDataModule.add_arguments(p)
    args = p.parse_args(["--manifest-dir", str(work / "data" / "fbank_firered"), "--dataset-prefix", "fr",
                         "--feature-type", "firered", "--firered-cmvn", str(cmvn),
                         "--on-the-fly-feats", str(on_the_fly), "--num-workers", "0",
                         "--enable-spec-aug", "false", "--bucketing-sampler", "false", "--shuffle", "false",
                         "--drop-last", "false", "--max-duration", "100"])
    dm = AsrDataModule(args)
    batches = list(dm.train_dataloader(dm.load_cuts("eval"), world_size=1, rank=0))
    assert len(batches) == 1 and sorted(batches[0]["cut_ids"]) == sorted(UTTS)
    return batches[0]


def test_datamodule_batches_feed_the_firered_encoder(prepared_firered, golden_dir, monkeypatch):
    """Stored and on-the-fly --feature-type firered batches are FireRedASR's own batch (its frame
    counts, zero padding, padded length) and give the reference AED encoder outputs."""
    import math
    import pickle

    from llmasr.features import make_feature_extractor
    from llmasr.firered.load import load_encoder

    monkeypatch.chdir(prepared_firered["work"])
    exp = torch.load(golden_dir / "firered" / "expected_aed.pt", weights_only=True)
    golden = {u["uttid"]: u for u in exp["utts"]}
    ref_batch = {u: exp["batch"]["enc_out"][i] for i, u in enumerate(exp["batch"]["uttids"])}
    encoder, _ = load_encoder(golden_dir / "firered" / "aed" / "model.pth.tar")
    encoder.eval()

    worst = {}
    for on_the_fly in (False, True):
        b = firered_batch(prepared_firered["work"], prepared_firered["cmvn"], on_the_fly)
        feats, lens, ids = b["features"], b["feature_lens"], b["cut_ids"]
        assert lens.tolist() == [golden[u]["feat_len"] for u in ids]  # FireRedASR's frames, not lhotse's
        assert list(feats.shape) == exp["batch"]["padded_feat_shape"]  # padded to max(feat_len), as FireRedASR
        for i, u in enumerate(ids):
            assert (feats[i, lens[i]:] == 0.0).all()  # FireRedASR's padding value
        with torch.no_grad():
            out, out_lens = encoder(feats, lens)
            # the encoder ignores the padding value: lhotse's log(1e-10) padding gives the same output
            other = feats.clone()
            for i in range(len(ids)):
                other[i, lens[i]:] = math.log(1e-10)
            assert torch.equal(encoder(other, lens)[0], out)
        assert out_lens.tolist() == [golden[u]["enc_len"] for u in ids]
        err = 0.0
        for i, u in enumerate(ids):
            L = golden[u]["enc_len"]
            err = max(err, float((out[i, :L] - golden[u]["enc_out"][:L]).abs().max()))
            # the whole padded batch (frames >= L too) equals the reference's padded batch
            err = max(err, float((out[i] - ref_batch[u]).abs().max()))
        worst[on_the_fly] = err
    print(f"max |enc_out - reference|: stored (lilcom) {worst[False]:.2e}, on the fly {worst[True]:.2e}")
    assert worst[True] <= 1e-4
    # lilcom's <= 2^-6 feature error (LILCOM_MAX_ERR) moves the outputs (|enc_out| up to ~4) of this
    # tiny random model by 0.055 (measured; rounding the reference features to 2^-5 gives 0.056,
    # uniform +-2^-6 noise 0.046-0.059), while lengths off by +2 or -1 frames move them by 0.34 / 1.3.
    assert 1e-3 < worst[False] <= 0.1

    # The extractor pickles (--nj and dataloader workers) and rebuilds its front end after unpickling.
    import soundfile as sf

    ext = make_feature_extractor("firered", 80, str(prepared_firered["cmvn"]))
    copy = pickle.loads(pickle.dumps(ext))
    samples, sr = sf.read(str(golden_dir / "firered" / "wav" / "en_0001.wav"), dtype="float32")
    got = copy.extract(samples, sr)
    assert got.shape == (round(len(samples) / 160), 80)
    assert np.abs(got[:175] - golden["en_0001"]["feats"].numpy()).max() <= 1e-5 and not got[175:].any()
