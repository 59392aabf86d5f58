"""The espeak-ng demo corpus builder: layout, audio format, disjoint test/train sentences, determinism."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import soundfile as sf

from tests.helpers import REPO, require_binary
from tests.test_prepare import NUM_DEV, NUM_TEST, NUM_TEST_OTHER, NUM_TRAIN, prepared_en_for, read_trans


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


def test_extra_training_subset_has_its_own_speakers_and_sentences(tmp_path):
    """num_train_extra: a train-clean-360 subset with its own speakers and no sentence shared with the
    other subsets; the Mandarin layout refuses it."""
    require_binary("espeak-ng")
    require_binary("sox")
    from llmasr.demo.espeak import make_espeak_corpus

    root = make_espeak_corpus(tmp_path / "dl", "en", num_train=4, num_train_extra=6, num_test=2, num_dev=0,
                              num_test_other=0, seed=5, utts_per_speaker=2, num_jobs=2, common_fraction=0.5)
    trans = read_trans(root)
    per_subset = {}
    for uid, (subset, text) in trans.items():
        per_subset.setdefault(subset, []).append((uid.split("-")[0], text))
    assert {k: len(v) for k, v in per_subset.items()} == {"train-clean-100": 4, "train-clean-360": 6, "test-clean": 2}
    speakers = {k: {spk for spk, _ in v} for k, v in per_subset.items()}
    assert not speakers["train-clean-100"] & speakers["train-clean-360"]
    texts = [t for v in per_subset.values() for _, t in v]
    assert len(set(texts)) == len(texts)
    with pytest.raises(ValueError, match="num_train_extra"):
        make_espeak_corpus(tmp_path / "zh", "cmn", num_train=2, num_train_extra=2, num_test=1)


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
    from llmasr.demo.espeak import generate_sentences

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


def test_markov_text_is_speakable_open_domain_text():
    """The open-domain training text: lower-case words espeak-ng reads as written, at most
    max_words long, seeded, and far more varied than the templates."""
    import random

    from llmasr.demo.espeak import generate_sentences, markov_sentence

    a = [markov_sentence(random.Random(i), max_words=10) for i in range(200)]
    assert a == [markov_sentence(random.Random(i), max_words=10) for i in range(200)]
    for s in a:
        words = s.split()
        assert 4 <= len(words) <= 10, s
        assert all(re.fullmatch(r"[a-z]+('[a-z]+)?", w) for w in words), s
    vocab = {w for s in a for w in s.split()}
    template_vocab = {w for s in generate_sentences("en", 200, seed=0) for w in s.split()}
    # measured: ~1300 distinct words in 200 Markov sentences, ~330 in 200 template sentences
    assert len(vocab) > 2 * len(template_vocab) and len(vocab - template_vocab) > 800


def test_common_word_sequences():
    import random

    from llmasr.demo.espeak import common_words_sentence

    en = [common_words_sentence(random.Random(i)) for i in range(100)]
    assert all(4 <= len(s.split()) <= 10 and re.fullmatch(r"[a-z]+( [a-z]+)*", s) for s in en)
    # ~6100 words drawn by frequency ** 0.5: measured 599 distinct words in these 674
    assert len({w for s in en for w in s.split()}) > 450
    zh = [common_words_sentence(random.Random(i), "zh") for i in range(50)]
    assert all(re.fullmatch(r"[\u4e00-\u9fff]{2,}", s) for s in zh) and len(set(zh)) == 50


def test_word_sequence_vocabulary_leaves_out_what_espeak_would_spell_or_expand():
    from llmasr.demo.espeak import _en_vocabulary

    words, weights = _en_vocabulary()
    vocab = set(words)
    assert len(words) == len(weights) > 5000
    # initials and abbreviations among wordfreq's most frequent "words": espeak-ng says "mister",
    # "p m", "n f l", so their transcripts would not be what is spoken
    assert not vocab & {"mr", "mrs", "pm", "vs", "nfl", "tv", "dvd", "bbc", "st", "ft", "de"}
    assert {"the", "because", "kitchen", "weather", "i", "a"} <= vocab
    assert weights[words.index("the")] > 10 * weights[words.index("kitchen")]


def test_heldout_sentences_come_from_other_sources():
    from llmasr.demo.espeak import EN_OPEN_DOMAIN, generate_sentences, heldout_sentences

    train = generate_sentences("en", 5000, seed=0)
    # the first three words of a template sentence nearly fix its template ("the train to",
    # "my phone number"): no novel-shape sentence may open like a training sentence
    openings = {" ".join(s.split()[:3]) for s in train}
    novel = heldout_sentences("en", "novel_shape", 60, seed=0)
    assert len(set(novel)) == 60 and not openings & {" ".join(s.split()[:3]) for s in novel}
    vocab = {w for s in train for w in s.split()}
    # in-vocabulary: the names, places, numbers (measured: 81 % of the words; the frames' own words are new)
    assert sum(w in vocab for s in novel for w in s.split()) > 0.75 * sum(len(s.split()) for s in novel)
    open_domain = heldout_sentences("en", "open_domain", 30, seed=0)
    assert set(open_domain) <= set(EN_OPEN_DOMAIN) and len(set(open_domain)) == 30
    assert heldout_sentences("en", "open_domain", 30, seed=0) == open_domain
    # excluded texts (the training transcripts) never come back
    assert not set(heldout_sentences("en", "open_domain", 30, seed=0, exclude=set(open_domain[:5]))) & set(open_domain[:5])
    zh = heldout_sentences("cmn", "novel_shape", 20, seed=0) + heldout_sentences("cmn", "open_domain", 20, seed=0)
    assert all(" " not in s for s in zh) and not set(zh) & set(generate_sentences("cmn", 3000, seed=0))
    with pytest.raises(ValueError, match="open-domain"):
        heldout_sentences("en", "open_domain", len(EN_OPEN_DOMAIN) + 1)


def test_heldout_sets_kaldi_dirs_and_unseen_voices(tmp_path):
    """make_heldout_sets: Kaldi data dirs (read by prepare.sh --corpus kaldi) whose voices no
    training corpus uses, and a corpus mixing Markov text into train/dev only."""
    require_binary("espeak-ng")
    import json

    from llmasr.data.corpus import scan_kaldi
    from llmasr.demo.espeak import HELDOUT_SETS, make_espeak_corpus, make_heldout_sets, read_corpus_transcripts

    root = make_espeak_corpus(tmp_path / "c", num_train=8, num_dev=2, num_test=2, num_test_other=0, seed=3,
                              markov_fraction=0.5, more_voices=True, num_jobs=2)
    trans = read_corpus_transcripts(root)
    plain = read_corpus_transcripts(make_espeak_corpus(tmp_path / "p", num_train=8, num_dev=2, num_test=2,
                                                       num_test_other=0, seed=3, num_jobs=2))

    def texts(t, subset):
        return {text for sub, text in t.values() if sub == subset}

    train = texts(trans, "train-clean-100")
    assert len(train) == 8 and len(train & texts(plain, "train-clean-100")) == 4  # half from the Markov text
    assert texts(trans, "test-clean") == texts(plain, "test-clean")  # the template test set is unchanged
    out = make_heldout_sets(tmp_path / "h", "en", num_per_set=3, seed=3, exclude={t.lower() for t in train},
                            num_jobs=2)
    parts = scan_kaldi(out)
    assert sorted(parts) == sorted(HELDOUT_SETS) and all(len(u) == 3 for u in parts.values())
    for utts in parts.values():
        for u in utts:
            info = sf.info(u.audio)
            assert (info.samplerate, info.channels) == (16000, 1) and u.text and u.speaker
    train_voices = {v for _, _, v, _, _ in json.loads((root / "espeak_corpus.json").read_text())["speakers"]}
    heldout_voices = {v for _, _, v, _, _ in json.loads((out / "espeak_heldout.json").read_text())["speakers"]}
    train_variants = {v.split("+")[1] for v in train_voices}
    assert not {v.split("+")[1] for v in heldout_voices} & train_variants
