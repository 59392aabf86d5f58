"""The espeak-ng demo corpus builder: layout, audio format, disjoint test/train sentences, determinism."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import soundfile as sf

from conftest import REPO, require_binary
from test_prepare import NUM_DEV, NUM_TEST, NUM_TEST_OTHER, NUM_TRAIN, prepared_en_for, read_trans


@pytest.fixture(scope="session")
def prepared_en(tmp_path_factory):
    return prepared_en_for(tmp_path_factory)


def test_number_words():
    from llmasr.demo.espeak import number_to_words, ordinal_words, year_words, zh_number

    assert number_to_words(0) == "zero"
    assert number_to_words(42) == "forty two"
    assert number_to_words(115) == "one hundred fifteen"
    assert number_to_words(7005) == "seven thousand five"
    assert ordinal_words(1) == "first" and ordinal_words(12) == "twelfth"
    assert ordinal_words(23) == "twenty third" and ordinal_words(30) == "thirtieth"
    assert year_words(1999) == "nineteen ninety nine" and year_words(2004) == "two thousand four"
    assert year_words(1905) == "nineteen oh five" and year_words(2020) == "twenty twenty"
    assert [zh_number(n) for n in (10, 12, 20, 105, 110, 1050)] == ["十", "十二", "二十", "一百零五", "一百一十",
                                                                      "一千零五十"]


def test_librispeech_layout(prepared_en):
    root = prepared_en["root"]
    trans = read_trans(root)
    per_subset = {}
    for uid, (subset, text) in trans.items():
        per_subset.setdefault(subset, []).append(text)
        spk, chapter, idx = uid.split("-")
        assert spk.isdigit() and chapter.isdigit() and re.fullmatch(r"\d{4}", idx)
        flac = root / subset / spk / chapter / f"{uid}.flac"
        info = sf.info(str(flac))
        assert (info.format, info.samplerate, info.channels, info.subtype) == ("FLAC", 16000, 1, "PCM_16")
        assert 0.5 < info.frames / 16000 < 15
        assert re.fullmatch(r"[A-Z']+( [A-Z']+)*", text), text  # LibriSpeech-style upper case
    assert {k: len(v) for k, v in per_subset.items()} == {
        "train-clean-100": NUM_TRAIN, "dev-clean": NUM_DEV, "test-clean": NUM_TEST, "test-other": NUM_TEST_OTHER}
    train = set(per_subset["train-clean-100"])
    for subset in ("dev-clean", "test-clean", "test-other"):
        assert not train & set(per_subset[subset])
    all_texts = [t for v in per_subset.values() for t in v]
    assert len(set(all_texts)) == len(all_texts)
    # Speakers never shared between subsets (like LibriSpeech).
    spk = {s: {u.split("-")[0] for u, (sub, _) in trans.items() if sub == s} for s in per_subset}
    assert not spk["train-clean-100"] & (spk["test-clean"] | spk["test-other"] | spk["dev-clean"])


def test_deterministic_and_seeded(tmp_path):
    require_binary("espeak-ng")
    from llmasr.demo.espeak import make_espeak_corpus

    a = make_espeak_corpus(tmp_path / "a", num_train=3, num_test=2, num_dev=0, num_test_other=0, seed=11)
    b = make_espeak_corpus(tmp_path / "b", num_train=3, num_test=2, num_dev=0, num_test_other=0, seed=11)
    c = make_espeak_corpus(tmp_path / "c", num_train=3, num_test=2, num_dev=0, num_test_other=0, seed=12)
    ta, tb, tc = read_trans(a), read_trans(b), read_trans(c)
    assert ta == tb and set(ta.values()) != set(tc.values())
    for uid, (subset, _) in ta.items():
        rel = f"{subset}/{uid.split('-')[0]}/{uid.split('-')[1]}/{uid}.flac"
        assert (a / rel).read_bytes() == (b / rel).read_bytes()


def test_sentence_variety():
    from llmasr.data import generate_sentences

    en = generate_sentences("en", 1000, seed=0)
    assert len(set(en)) == 1000
    vocab = {w for s in en for w in s.split()}
    assert len(vocab) > 500  # measured: 724 distinct words in 5000 sentences, ~600 in 1000
    starts = {" ".join(s.split()[:2]) for s in en}
    assert len(starts) > 100  # many templates/openings, not a handful of frames
    zh = generate_sentences("cmn", 300, seed=0)
    assert len(set(zh)) == 300 and all(" " not in s for s in zh)
    assert len({ch for s in zh for ch in s}) > 150


def test_mandarin_layout_and_cli(tmp_path):
    """The command-line builder writes the AISHELL layout lhotse's prepare_aishell reads."""
    require_binary("espeak-ng")
    subprocess.run([sys.executable, str(REPO / "local" / "make_espeak_corpus.py"), "--lang", "cmn",
                    "--out-dir", str(tmp_path), "--num-train", "3", "--num-dev", "1", "--num-test", "1",
                    "--seed", "2", "--nj", "2"], check=True, capture_output=True)
    base = tmp_path / "aishell" / "data_aishell"
    lines = (base / "transcript" / "aishell_transcript_v0.8.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 5
    wavs = {w.stem: w for w in (base / "wav").rglob("*.wav")}
    for line in lines:
        uid, chars = line.split(" ", 1)
        assert re.fullmatch(r"BAC009S\d{4}W\d{4}", uid)
        assert all(len(tok) == 1 for tok in chars.split(" "))  # one character per token
        w = wavs[uid]
        assert w.parent.name == uid[6:11] and w.parts[-3] in ("train", "dev", "test")
        info = sf.info(str(w))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    assert sorted(w.parts[-3] for w in wavs.values()) == ["dev", "test", "train", "train", "train"]
