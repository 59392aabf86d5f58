"""Bad inputs (issue #13): each gives a one-line error naming the file, cut or line (exit status 1
through the entry scripts, traceback only with --debug), or a skip that is counted and listed.

Models and features are the golden SpeechLLM fixture's (tiny Zipformer + tiny Qwen2); every other
input is built here in tmp dirs.
"""
from __future__ import annotations

import gzip
import json
import re
import runpy
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

from tests.helpers import REPO
from llmasr.config import UserError


def _local_script(name: str):
    """local/<name>.py's functions (the script is run as a module, not as __main__)."""
    return SimpleNamespace(**runpy.run_path(str(REPO / "local" / f"{name}.py"), run_name=f"local_{name}"))


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # lhotse: eager CutSets in samplers




@pytest.fixture(scope="module")
def golden_cuts(sl):
    from lhotse import CutSet

    cuts = CutSet.from_file(sl / "data/fbank/librispeech_cuts_test-clean.jsonl.gz")
    return cuts.with_features_path_prefix(str(sl)).to_eager()  # absolute feature paths


def _one_line_error(capsys, run, *expected: str) -> str:
    """``run()`` must exit with status 1 and one "<script>: error: ..." line on stderr (besides the
    log lines a script prints there) holding every ``expected``, and no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run()
    assert exc.value.code == 1
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if ": error: " in line]
    assert len(err) == 1 and "Traceback" not in stderr, stderr
    for text in expected:
        assert text in err[0], err[0]
    return err[0]


def _cut_with_features(cut_id: str, feats: np.ndarray, storage_dir: Path, text: str = "HELLO WORLD",
                       sampling_rate: int = 16000):
    from lhotse import Features, MonoCut, NumpyFilesWriter, SupervisionSegment

    with NumpyFilesWriter(storage_dir) as writer:
        key = writer.write(cut_id, feats.astype(np.float32))
    duration = round(feats.shape[0] * 0.01, 2)
    f = Features(type="kaldi-fbank", num_frames=feats.shape[0], num_features=feats.shape[1], frame_shift=0.01,
                 sampling_rate=sampling_rate, start=0.0, duration=duration, storage_type=writer.name,
                 storage_path=str(storage_dir), storage_key=key)
    return MonoCut(id=cut_id, start=0.0, duration=duration, channel=0, features=f,
                   supervisions=[SupervisionSegment(id=cut_id, recording_id=cut_id, start=0.0, duration=duration,
                                                    text=text)])


def _wav_cut(path: Path, sr: int, seconds: float = 1.0, freq: float = 440.0):
    from lhotse import MonoCut, Recording, SupervisionSegment

    t = np.arange(int(sr * seconds)) / sr
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr)
    rec = Recording.from_file(path)
    return MonoCut(id=rec.id, start=0.0, duration=rec.duration, channel=0, recording=rec,
                   supervisions=[SupervisionSegment(id=rec.id, recording_id=rec.id, start=0.0,
                                                    duration=rec.duration, text="A TONE")])


# --------------------------------------------------------------------------- the CLI helper


def test_run_cli_prints_one_line_and_debug_shows_the_traceback(capsys, monkeypatch):
    from llmasr.config import DEBUG_ENV, run_cli

    def bad_data(argv):
        raise UserError(f"cut c-7 of {argv[0]}: empty\ntranscript")

    monkeypatch.delenv(DEBUG_ENV, raising=False)
    _one_line_error(capsys, lambda: run_cli(bad_data, ["x.jsonl.gz"]), "error: cut c-7 of x.jsonl.gz: empty transcript")
    _one_line_error(capsys, lambda: run_cli(lambda argv: open("/nonexistent/llmasr-file")), "/nonexistent/llmasr-file")
    with pytest.raises(UserError, match="c-7"):  # --debug is removed from argv and lets the error through
        run_cli(bad_data, ["x.jsonl.gz", "--debug"])
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(UserError):
        run_cli(bad_data, ["x.jsonl.gz"])
    monkeypatch.delenv(DEBUG_ENV)
    with pytest.raises(KeyError):  # a bug keeps its traceback
        run_cli(lambda argv: {}["missing"], [])


def test_user_error_raised_in_a_dataloader_worker_keeps_its_message():
    from torch._utils import ExceptionWrapper

    from llmasr.config import user_message

    try:
        raise UserError("non-finite feature values (NaN/inf) in cut(s) c-3 (feats, key c-3.npy)")
    except UserError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(UserError) as exc:
        wrapped.reraise()
    assert "Original Traceback" in str(exc.value)
    assert user_message(exc.value) == "non-finite feature values (NaN/inf) in cut(s) c-3 (feats, key c-3.npy)"


# --------------------------------------------------------------------------- decoding


@pytest.fixture(scope="module")
def decode_env(sl, golden_cuts, tmp_path_factory):
    """A test set of 3 golden cuts, one with a NaN feature value and four of 0, 5, 8 and 20 frames
    (the tiny Zipformer + 4x projector needs 21 for one speech position), and an exp dir."""
    from lhotse import CutSet

    root = tmp_path_factory.mktemp("decode_env")
    good = list(golden_cuts)[:3]
    nan = good[0].load_features().copy()
    nan[17, 3] = np.nan
    bad = [_cut_with_features("nan-cut", nan, root / "feats")]
    bad += [_cut_with_features(f"short-{n}", good[1].load_features()[:n], root / "feats") for n in (0, 5, 8, 20)]
    CutSet.from_cuts(good + bad).to_file(root / "librispeech_cuts_bad.jsonl.gz")
    exp = root / "exp"
    exp.mkdir()
    shutil.copy(sl / "exp/baseline/epoch-2.pt", exp / "epoch-2.pt")
    return {"root": root, "exp": exp, "good": [c.id for c in good]}


def _decode_argv(sl, exp, *extra):
    return ["--exp-dir", str(exp), "--checkpoint", "epoch-2.pt", "--max-duration", "300", "--num-workers", "0",
            "--llm-path", str(sl / "models/llm"), "--speech-encoder-type", "tiny_a",
            "--speech-encoder-path", str(sl / "models/zipformer/tiny_a/pretrained.pt"),
            "--max-new-tokens", "4", *extra]


@pytest.fixture(scope="module")
def decoded(sl, decode_env):
    import decode  # src/decode.py

    env = decode_env
    # one batch: the NaN cut leaves a batch it shares with the good ones
    rates = decode.main(_decode_argv(sl, env["exp"], "--manifest-dir", str(env["root"]), "--test-sets", "bad",
                                     "--test-num-buckets", "1"))
    out = env["exp"] / "decode-epoch-2-beam1-maxnew4"
    skipped = dict(line.split("\t") for line in
                   (out / "skipped-librispeech_bad-decode-beam1-maxnew4-epoch-2.txt").read_text().splitlines())
    recogs = (out / "recogs-librispeech_bad-decode-beam1-maxnew4-epoch-2.txt").read_text()
    return {"rates": rates, "skipped": skipped, "recog_ids": sorted({l.split(":")[0] for l in recogs.splitlines()}),
            "log": "".join(p.read_text() for p in out.glob("log-decode-*"))}


def test_decode_nan_features_skip_the_cut_named_and_listed(decoded, decode_env):
    # before: the cut got an empty hypothesis and was scored, exit 0 with nothing said
    assert decoded["skipped"]["nan-cut"] == "non-finite feature values (NaN/inf)"
    assert "skipping cut nan-cut: non-finite feature values" in decoded["log"]
    assert decoded["recog_ids"] == sorted(decode_env["good"])  # decoded and scored: the other cuts


def test_decode_too_short_cuts_are_skipped_up_front(decoded):
    # before: "Zipformer needs at least 9 feature frames ... (batch index, frames)" stopped the whole set
    assert {k: v for k, v in decoded["skipped"].items() if k.startswith("short")} == {
        f"short-{n}": f"too short to decode ({n} feature frames < 21)" for n in (0, 5, 8, 20)}
    assert "5 of 8 cuts not decoded and not scored (non-finite feature values: 1, too short to decode: 4)" \
        in decoded["log"]
    assert set(decoded["rates"]) == {"librispeech_bad"}


def test_nan_features_in_a_training_batch_name_the_cut(golden_cuts, tmp_path):
    from lhotse import CutSet

    from llmasr.data import AsrDataset

    good = list(golden_cuts)[0]
    feats = good.load_features().copy()
    feats[3, :] = np.inf
    cut = _cut_with_features("inf-cut", feats, tmp_path / "feats")
    with pytest.raises(UserError, match=rf"non-finite feature values \(NaN/inf\) in cut\(s\) inf-cut "
                                        rf"\({tmp_path}/feats, key "):
        AsrDataset()[CutSet.from_cuts([good, cut])]


def test_corrupt_llm_safetensors_names_the_file(sl, decode_env, tmp_path, capsys):
    import decode  # src/decode.py

    llm = tmp_path / "llm"
    shutil.copytree(sl / "models/llm", llm)
    data = (llm / "model.safetensors").read_bytes()
    (llm / "model.safetensors").write_bytes(data[: len(data) // 2])
    argv = _decode_argv(sl, decode_env["exp"], "--manifest-dir", str(decode_env["root"]), "--test-sets", "bad")
    argv[argv.index("--llm-path") + 1] = str(llm)
    # before: "SafetensorError: Error while deserializing header: incomplete metadata ..." (no file)
    _one_line_error(capsys, lambda: decode.main(argv), f"could not load the LLM weights {llm}/model.safetensors")


# --------------------------------------------------------------------------- sampling rates


def test_on_the_fly_features_of_8khz_audio_are_resampled(tmp_path, caplog):
    from lhotse import CutSet
    from lhotse.dataset import OnTheFlyFeatures

    from llmasr.data import AsrDataset
    from llmasr.features import make_feature_extractor

    c8 = _wav_cut(tmp_path / "tone8k.wav", 8000)
    c16 = _wav_cut(tmp_path / "tone16k.wav", 16000)
    ds = AsrDataset(OnTheFlyFeatures(make_feature_extractor("fbank")))
    # before: 50 frames for 1 s (8000 samples read as 16 kHz audio), WER 775%; a mixed batch failed
    # with "cannot collate batch of cuts [...]: " (an empty reason)
    with caplog.at_level("WARNING"):
        b8 = ds[CutSet.from_cuts([c8])]
        mixed = ds[CutSet.from_cuts([c8, c16])]
    assert b8["feature_lens"].tolist() == [100]
    assert mixed["feature_lens"].tolist() == [100, 100]
    assert "cut tone8k is 8000 Hz audio: resampling it" in caplog.text
    # the 440 Hz tone recorded at 8 kHz gives the features of the 16 kHz recording (the mel bins
    # below ~2 kHz; 8 kHz audio has nothing above 4 kHz), not those of an 880 Hz tone
    f8 = mixed["features"][mixed["cut_ids"].index("tone8k"), :, :40]
    f16 = mixed["features"][mixed["cut_ids"].index("tone16k"), :, :40]
    as_if_16k = torch.from_numpy(make_feature_extractor("fbank").extract(c8.load_audio(), 16000))[:, :40]
    assert as_if_16k.shape[0] == 50
    assert (f8 - f16).abs().mean() < 0.1 and (as_if_16k - f16[:50]).abs().mean() > 2


def test_stored_features_of_8khz_audio_name_the_cut(golden_cuts):
    from lhotse import CutSet
    from lhotse.utils import fastcopy

    from llmasr.data import AsrDataset

    c = list(golden_cuts)[0]
    c8 = fastcopy(c, features=fastcopy(c.features, sampling_rate=8000))
    with pytest.raises(UserError, match=rf"cut {c.id}: its stored features .* were computed from 8000 Hz audio"):
        AsrDataset()[CutSet.from_cuts([c8])]


def test_prepare_stage3_resamples_an_8khz_recording_manifest(tmp_path, caplog):
    from lhotse import Fbank, FbankConfig, RecordingSet, SupervisionSet, load_manifest

    from llmasr.data.corpus import compute_features

    cut = _wav_cut(tmp_path / "tone8k.wav", 8000)
    man = tmp_path / "manifests"
    man.mkdir()
    RecordingSet.from_recordings([cut.recording]).to_file(man / "x_recordings_test.jsonl.gz")
    SupervisionSet.from_segments(cut.supervisions).to_file(man / "x_supervisions_test.jsonl.gz")
    with caplog.at_level("WARNING"):
        out = compute_features(man, tmp_path / "fbank", "x", Fbank(FbankConfig(num_mel_bins=80)))
    (stored,) = load_manifest(out["test"])
    assert stored.num_frames == 100 and stored.features.sampling_rate == 16000  # before: 50 frames "at 8 kHz"
    assert "resampling 1 cuts to 16000 Hz (first: tone8k at 8000 Hz)" in caplog.text


# --------------------------------------------------------------------------- corpus preparation


def _write_kaldi_dir(d: Path, utts: dict, text: dict) -> None:
    d.mkdir(parents=True)
    scp = []
    for uid, num_samples in utts.items():
        sf.write(d / f"{uid}.wav", (0.1 * np.random.default_rng(len(uid)).standard_normal(num_samples)).astype(np.float32),
                 16000)
        scp.append(f"{uid} {d / uid}.wav\n")
    (d / "wav.scp").write_text("".join(scp))
    (d / "text").write_bytes(b"".join(f"{u} ".encode() + (t if isinstance(t, bytes) else t.encode()) + b"\n"
                                      for u, t in text.items()))


@pytest.fixture(scope="module")
def kaldi_prepared(tmp_path_factory):
    """local/prepare_manifests.py + local/compute_fbank.py on a Kaldi dir with five good utterances,
    an 8-sample wav and a transcript whose id is not in wav.scp."""
    compute_fbank, prepare_manifests = _local_script("compute_fbank"), _local_script("prepare_manifests")

    root = tmp_path_factory.mktemp("kaldi")
    utts = {f"good{i}": 16000 for i in range(5)} | {"tiny": 8}
    _write_kaldi_dir(root / "test", utts, {u: "hello world" for u in utts} | {"ghost": "no audio here"})
    prepare_manifests.main(["--corpus", "kaldi", "--corpus-dir", str(root / "test"), "--output-dir",
                            str(root / "manifests"), "--prefix", "k", "--max-skip-fraction", "0.5"])
    compute_fbank.main(["--manifest-dir", str(root / "manifests"), "--fbank-dir", str(root / "fbank"),
                        "--prefix", "k"])
    skipped = {line.split("\t")[0]: line.split("\t")[2] for line in
               (root / "manifests" / "k_skipped_test.tsv").read_text().splitlines()}
    return {"root": root, "skipped": skipped}


def test_kaldi_text_without_audio_is_a_counted_skip(kaldi_prepared):
    # before: dropped silently
    assert kaldi_prepared["skipped"]["ghost"] == f"in {kaldi_prepared['root']}/test/text but not in wav.scp: no audio"


def test_kaldi_8_sample_wav_is_skipped_at_stage1(kaldi_prepared):
    from lhotse import load_manifest

    # before: accepted by stage 1, stage 3 died in a torch pad error
    assert kaldi_prepared["skipped"]["tiny"] == "too short (0.001 s < 0.1 s: too little audio for features)"
    cuts = load_manifest(kaldi_prepared["root"] / "fbank" / "k_cuts_test.jsonl.gz")
    assert sorted(cuts.ids) == [f"good{i}" for i in range(5)]


def test_kaldi_text_not_utf8_names_file_and_line(tmp_path, capsys):
    prepare_manifests = _local_script("prepare_manifests")

    _write_kaldi_dir(tmp_path / "d", {"a": 16000, "b": 16000}, {"a": "fine", "b": "caf\xe9".encode("latin-1")})
    # before: UnicodeDecodeError traceback without file or line
    _one_line_error(capsys, lambda: prepare_manifests.main(
        ["--corpus", "kaldi", "--corpus-dir", str(tmp_path / "d"), "--output-dir", str(tmp_path / "m"), "--prefix", "k"]),
        f"{tmp_path}/d/text:2: not UTF-8 text (byte 0xe9 at column 6)")


def test_manifest_not_utf8_names_file_and_line(golden_cuts, tmp_path):
    from llmasr.data.corpus import load_cuts_lazy

    lines = [json.dumps(c.to_dict()).encode() for c in list(golden_cuts)[:3]]
    lines[1] = lines[1].replace(b'"text": "', b'"text": "\xff')
    path = tmp_path / "x_cuts_test.jsonl.gz"
    path.write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    with pytest.raises(UserError, match=rf"{path}:2: not UTF-8 text \(byte 0xff"):
        list(load_cuts_lazy(path))


def test_firered_ref_text_not_utf8_names_file_and_line(tmp_path):
    from llmasr.firered.decode import read_text

    ref = tmp_path / "text"
    ref.write_bytes("u1 你好\nu2 世界\n".encode() + "u3 再见\n".encode("gbk"))
    with pytest.raises(UserError, match=rf"{ref}:3: not UTF-8 text"):
        read_text(str(ref))


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def train_env(sl, golden_cuts, tmp_path_factory):
    """Train cuts: the golden test-clean cuts and one with a 3000-word transcript; dev: one cut."""
    from lhotse import CutSet
    from lhotse.utils import fastcopy

    root = tmp_path_factory.mktemp("train_env")
    cuts = list(golden_cuts)
    long = fastcopy(cuts[0], id="long-text",
                    supervisions=[fastcopy(cuts[0].supervisions[0], id="long-text", text=" ".join(["WORD"] * 3000))])
    CutSet.from_cuts(cuts + [long]).to_file(root / "librispeech_cuts_train.jsonl.gz")
    CutSet.from_cuts(cuts[:1]).to_file(root / "librispeech_cuts_dev.jsonl.gz")
    return root


def _train_argv(sl, root, exp, *extra):
    return ["--exp-dir", str(exp), "--manifest-dir", str(root), "--train-cuts", "train", "--dev-cuts", "dev",
            "--llm-path", str(sl / "models/llm"), "--speech-encoder-type", "tiny_a",
            "--speech-encoder-path", str(sl / "models/zipformer/tiny_a/pretrained.pt"),
            "--world-size", "1", "--tensorboard", "false", "--num-workers", "0", "--enable-spec-aug", "false",
            "--use-fp16", "false", "--num-epochs", "1", "--save-every-n", "0", "--valid-interval", "1000",
            "--min-duration", "0.5", "--seed", "3", *extra]


@pytest.fixture(scope="module")
def trained(sl, train_env, tmp_path_factory):
    import train  # src/train.py

    exp = tmp_path_factory.mktemp("exp")
    # 10 cuts of 1.3-2.3 s (+ the long transcript) in 2 buckets, batches of at most 6 s: some cuts of
    # each bucket do not fill a batch
    train.main(_train_argv(sl, train_env, exp, "--num-buckets", "2", "--max-duration", "6", "--max-cut-duration", "2.5",
                           "--drop-last", "true"))
    return {"exp": exp, "log": "".join(p.read_text() for p in (exp / "log").glob("log-train-*"))}


def test_long_transcript_is_filtered_with_a_count(trained):
    # before: trained on, no length filter
    assert re.search(r"train: dropping cut long-text: transcript too long \(\d+ tokens > --max-text-tokens 400\)",
                     trained["log"])
    assert "(1 dropped: transcript too long: 1)" in trained["log"]


def test_drop_last_losses_are_counted_per_epoch(trained):
    # before: 28-35% of the cuts of a bucketed corpus vanished per epoch without a word
    m = re.search(r"train: 10 cuts \(0\.01 h\) passed the filters \(1 dropped: [^)]*\); the sampler made (\d+) "
                  r"batches of (\d+) cuts; (\d+) cuts \((\d+\.\d)%\) were left out by --drop-last", trained["log"])
    assert m, trained["log"]
    batches, kept, left = int(m.group(1)), int(m.group(2)), int(m.group(3))
    assert kept + left == 10 and left > 0 and batches >= 2


def test_one_cut_dev_set_validates(trained):
    # before: a bare AssertionError from lhotse's bucketing sampler
    assert re.search(r"Epoch 1, global batch \d+, validation: ", trained["log"])
    assert (trained["exp"] / "epoch-1.pt").is_file()


def test_epoch_without_a_batch_names_the_cause(sl, train_env, tmp_path, capsys):
    import train  # src/train.py

    # before: "epoch 1 produced no training batch on rank 0: check --max-duration ..." (a traceback)
    _one_line_error(capsys, lambda: train.main(_train_argv(sl, train_env, tmp_path / "exp", "--num-buckets", "30",
                                                           "--max-duration", "200", "--drop-last", "true")),
                    "epoch 1 produced no training batch: 10 cuts, 19 s of audio; with --num-buckets 30 and "
                    "--max-duration 200.0 no bucket fills a batch and --drop-last drops them: lower --num-buckets "
                    "or --max-duration or set --drop-last false")


def test_one_cut_training_set_trains(sl, train_env, tmp_path):
    import train  # src/train.py

    # before: a bare AssertionError from lhotse's bucketing sampler (it needs two buckets)
    exp = tmp_path / "exp"
    train.main(_train_argv(sl, train_env, exp, "--train-cuts", "dev", "--max-duration", "60", "--drop-last", "false"))
    log = "".join(p.read_text() for p in (exp / "log").glob("log-train-*"))
    assert re.search(r"the sampler made 1 batches of 1 cuts", log), log[-2000:]
    assert (exp / "epoch-1.pt").is_file()
