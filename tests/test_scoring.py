"""Scoring: normalisation, tokenisation, WER/CER against jiwer and hand counts, result files."""
from __future__ import annotations

import ast
import importlib.metadata
import random
import re

import jiwer
import pytest

from llmasr.scoring import (
    compute_error_stats,
    normalize_text,
    read_recogs,
    score_files,
    tokenize_for_scoring,
    write_results,
)


# ---------------------------------------------------------------------------------------------
# Normalisation and tokenisation


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Hello, World!", "hello world"),
        ("DON'T stop", "don't stop"),
        ("It\u2019s 5 o\u2019clock.", "it's 5 o'clock"),  # typographic apostrophes
        ("\u2018Quoted\u2019 words\u2019", "quoted words"),  # quotes are not apostrophes
        ("Rock 'n' roll", "rock n roll"),
        ("the students' books", "the students books"),
        ("\uff28\uff45\uff4c\uff4c\uff4f\uff0c\uff57\uff4f\uff52\uff4c\uff44\uff01", "hello world"),  # full-width
        ("well-known  e.g.\tthat's\n", "well known e g that's"),
        ("50% of $10 -- \"ok\"?", "50 of 10 ok"),
        ("snake_case", "snake case"),
        ("\ufeffco\u00adoperate a\u200bb", "cooperate a b"),  # BOM/soft hyphen vanish, ZWSP splits
        ("", ""),
        (" \t\n ", ""),
    ],
)
def test_normalize_en(text, expected):
    assert normalize_text(text, "en") == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("你好，世界。", "你好世界"),
        ("我用 Python 写代码！", "我用python写代码"),
        ("《三体》、\u201c科幻\u201d；好吗？", "三体科幻好吗"),
        ("Hello World，你好", "hello world你好"),
        ("\uff21\uff22\uff23\uff11\uff12\uff13中文", "abc123中文"),  # full-width letters/digits
        ("他说：\u201cI don\u2019t know.\u201d", "他说i don't know"),
        ("你 好 世 界", "你好世界"),
    ],
)
def test_normalize_zh(text, expected):
    assert normalize_text(text, "zh") == expected


def test_normalize_none_keeps_text_and_splits_on_whitespace():
    text = "Hello,  World! don't"
    assert normalize_text(text, "none") == text
    assert tokenize_for_scoring(text, "none") == ["Hello,", "World!", "don't"]
    # Character level on the raw text: every character counts, spaces and punctuation included
    # (icefall whisper_llm_zh's list(hyp)); a character list comes back unchanged.
    assert tokenize_for_scoring("ab c。", "none", char_level=True) == ["a", "b", " ", "c", "。"]
    assert tokenize_for_scoring(["a", " ", "b"], "none", char_level=True) == ["a", " ", "b"]
    assert tokenize_for_scoring("ab c。", "en", char_level=True) == ["a", "b", "c"]


def test_tokenize_zh_mixed():
    assert tokenize_for_scoring("我用Python写 Hello World代码。", "zh") == [
        "我", "用", "python", "写", "hello", "world", "代", "码",
    ]
    assert tokenize_for_scoring("2024年的AI", "zh") == ["2024", "年", "的", "ai"]
    assert tokenize_for_scoring("don't 说", "zh") == ["don't", "说"]
    # Kana and Hangul are also one token per character.
    assert tokenize_for_scoring("カタカナ 한국", "zh") == ["カ", "タ", "カ", "ナ", "한", "국"]
    # Token lists (e.g. from an icefall recogs file) are joined before tokenisation.
    assert tokenize_for_scoring(["你", "好", "World"], "zh") == ["你", "好", "world"]


def test_unknown_mode_rejected():
    with pytest.raises(ValueError, match="normalisation mode"):
        normalize_text("a", "fr")
    with pytest.raises(ValueError, match="scoring mode"):
        write_results("/nonexistent", "t", "s", [("u", "a", "a")], mode="mer")


# ---------------------------------------------------------------------------------------------
# Error counts


def _jiwer_words(refs, hyps):
    return jiwer.process_words([" ".join(r) for r in refs], [" ".join(h) for h in hyps])


def test_wer_matches_jiwer_on_random_sequences():
    rng = random.Random(1234)
    vocab = ["a", "b", "c", "the", "of", "x"]  # small vocabulary: many repeated words and ties
    pairs = []
    for i in range(400):
        ref = [rng.choice(vocab) for _ in range(rng.randint(1, 15))]
        hyp = [rng.choice(vocab) for _ in range(rng.randint(0, 15))]
        if i % 5 == 0:  # near-misses: a few edits of the reference
            hyp = list(ref)
            for _ in range(rng.randint(0, 3)):
                op = rng.choice("sid")
                pos = rng.randrange(len(hyp) + 1)
                if op == "i":
                    hyp.insert(pos, rng.choice(vocab))
                elif hyp and pos < len(hyp):
                    if op == "s":
                        hyp[pos] = rng.choice(vocab)
                    else:
                        del hyp[pos]
        pairs.append((f"utt-{i:03d}", ref, hyp))

    for cut_id, ref, hyp in pairs:
        ours = compute_error_stats([(cut_id, ref, hyp)])
        theirs = _jiwer_words([ref], [hyp])
        assert ours.num_errors == theirs.substitutions + theirs.deletions + theirs.insertions, cut_id
        assert ours.error_rate == theirs.wer, cut_id
        # Whatever the tie-breaking, the counts must be consistent with the token counts.
        assert ours.num_corr + ours.num_sub + ours.num_del == len(ref)
        assert ours.num_corr + ours.num_sub + ours.num_ins == len(hyp)

    ours = compute_error_stats(pairs)
    theirs = _jiwer_words([p[1] for p in pairs], [p[2] for p in pairs])
    assert ours.error_rate == theirs.wer
    assert ours.num_ref == sum(len(p[1]) for p in pairs)
    assert ours.num_utts == 400


@pytest.mark.parametrize(
    "ref, hyp, sub, ins, dele",
    [
        ("a b c", "", 0, 0, 3),  # empty hypothesis
        ("a b", "x a y b z", 0, 3, 0),  # insertions only
        ("a b c d e", "b d", 0, 0, 3),  # deletions only
        ("a b c", "x y z", 3, 0, 0),  # all substitutions
        ("the the the", "the the", 0, 0, 1),  # repeated words
        ("a a b b", "a a a b b b", 0, 2, 0),
        ("a b c", "a b c", 0, 0, 0),
    ],
)
def test_wer_unambiguous_cases(ref, hyp, sub, ins, dele):
    ours = compute_error_stats([("u", ref.split(), hyp.split())])
    theirs = jiwer.process_words(ref, hyp)
    assert (ours.num_sub, ours.num_ins, ours.num_del) == (sub, ins, dele)
    assert (theirs.substitutions, theirs.insertions, theirs.deletions) == (sub, ins, dele)
    assert ours.error_rate == theirs.wer == (sub + ins + dele) / len(ref.split())


def test_cer_chinese_hand_counts():
    # 今天天气很好 (6 chars) vs 今天天汽很好啊: 气->汽 substituted, 啊 inserted -> 2/6.
    ref = tokenize_for_scoring("今天天气很好。", "zh")
    hyp = tokenize_for_scoring("今天天汽很好啊", "zh")
    s = compute_error_stats([("u", ref, hyp)])
    assert (s.num_ref, s.num_sub, s.num_ins, s.num_del) == (6, 1, 1, 0)
    assert s.percent == pytest.approx(100 * 2 / 6)

    # Mixed: [我 爱 python 编 程] vs [我 爱 派 森 编 程]: one word substituted, one char inserted.
    ref = tokenize_for_scoring("我爱 Python 编程", "zh")
    hyp = tokenize_for_scoring("我爱派森编程", "zh")
    assert ref == ["我", "爱", "python", "编", "程"]
    s = compute_error_stats([("u", ref, hyp)])
    assert (s.num_ref, s.num_sub, s.num_ins, s.num_del) == (5, 1, 1, 0)
    assert s.error_rate == 0.4

    # Case and punctuation do not count: "Hello，World" vs "hello world!" is correct.
    s = compute_error_stats(
        [("u", tokenize_for_scoring("你好Hello，World", "zh"), tokenize_for_scoring("你好 hello world!", "zh"))]
    )
    assert (s.num_ref, s.num_errors) == (4, 0)


def test_empty_reference_is_defined():
    # One empty reference among others: its hypothesis words are insertions over the other refs.
    s = compute_error_stats([("u1", [], ["x", "y"]), ("u2", ["a", "b"], ["a", "b"])])
    assert (s.num_ref, s.num_ins, s.num_empty_ref) == (2, 2, 1)
    assert s.error_rate == 1.0
    # No reference token at all: errors / 1 (finite, matches jiwer 4), 0 if nothing was inserted.
    s = compute_error_stats([("u1", [], ["x", "y"])])
    assert (s.num_ref, s.num_ins) == (0, 2)
    assert s.error_rate == 2.0 and s.percent == 200.0
    assert compute_error_stats([("u1", [], [])]).error_rate == 0.0
    if int(importlib.metadata.version("jiwer").split(".")[0]) >= 4:  # jiwer < 4 raises on empty references
        assert jiwer.process_words([""], ["x y"]).wer == 2


def test_star_token_is_not_epsilon():
    # "*" is icefall's epsilon in printouts; as a real token it must still align correctly.
    s = compute_error_stats([("u", ["*", "a", "*"], ["a", "*"])])
    assert (s.num_corr, s.num_del, s.num_sub, s.num_ins) == (2, 1, 0, 0)


def test_bad_input_names_the_cut(tmp_path):
    with pytest.raises(ValueError, match="duplicate cut id 'u1'"):
        compute_error_stats([("u1", ["a"], ["a"]), ("u1", ["b"], ["b"])])
    with pytest.raises(TypeError, match="cut 'u2'"):
        compute_error_stats([("u2", "a b", ["a"])])
    with pytest.raises(TypeError, match="cut 'u3'"):
        write_results(tmp_path / "out", "t", "s", [("u3", "a", 5)])
    assert not (tmp_path / "out").exists()  # validated before anything is written


# ---------------------------------------------------------------------------------------------
# Result files


def _parse_errs(path):
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    m_rate = re.fullmatch(r"%(WER|CER) = (\d+\.\d\d)", lines[0])
    m_counts = re.fullmatch(
        r"Errors: (\d+) insertions, (\d+) deletions, (\d+) substitutions, over (\d+) reference words \((\d+) correct\)",
        lines[1],
    )
    assert m_rate and m_counts, lines[:2]
    sections = {}
    current = None
    for line in lines[2:]:
        head = re.match(r"(PER-UTT DETAILS|SUBSTITUTIONS|DELETIONS|INSERTIONS|PER-WORD STATS):", line)
        if head:
            current = head.group(1)
            sections[current] = []
        elif current and line:
            sections[current].append(line)
    return m_rate.group(1), float(m_rate.group(2)), [int(x) for x in m_counts.groups()], sections


def test_write_results_wer_files(tmp_path):
    results = [
        ("utt-c", "The cat sat on the mat.", "the bat sat the mat"),
        ("utt-a", "Hello, world!", "hello world"),
        ("utt-b", "a b c d", "a x y d z"),
    ]
    # Normalised: utt-a correct (2); utt-b: b->x, c->y, z inserted (4 ref);
    # utt-c: cat->bat, on deleted (6 ref). Total 12 ref words, 3 sub, 1 del, 1 ins -> 5/12.
    wer = write_results(tmp_path, "test-clean", "epoch-3-avg-1", results, mode="wer")
    assert wer == 41.67

    recogs = (tmp_path / "recogs-test-clean-epoch-3-avg-1.txt").read_text(encoding="utf-8").splitlines()
    assert recogs == [
        "utt-a:\tref=['hello', 'world']",
        "utt-a:\thyp=['hello', 'world']",
        "utt-b:\tref=['a', 'b', 'c', 'd']",
        "utt-b:\thyp=['a', 'x', 'y', 'd', 'z']",
        "utt-c:\tref=['the', 'cat', 'sat', 'on', 'the', 'mat']",
        "utt-c:\thyp=['the', 'bat', 'sat', 'the', 'mat']",
    ]

    metric, rate, (ins, dele, sub, n_ref, corr), sec = _parse_errs(tmp_path / "errs-test-clean-epoch-3-avg-1.txt")
    assert (metric, rate, ins, dele, sub, n_ref, corr) == ("WER", 41.67, 1, 1, 3, 12, 8)
    assert sec["PER-UTT DETAILS"] == [
        "utt-a:\thello world",
        "utt-b:\ta (b c->x y) d (*->z)",
        "utt-c:\tthe (cat->bat) sat (on->*) the mat",
    ]
    # Sorted by count, then by token, descending.
    assert sec["SUBSTITUTIONS"] == ["1   cat -> bat", "1   c -> y", "1   b -> x"]
    assert sec["DELETIONS"] == ["1   on"]
    assert sec["INSERTIONS"] == ["1   z"]
    stats = {line.split()[0]: [int(x) for x in line.split()[1:]] for line in sec["PER-WORD STATS"]}
    assert stats["the"] == [2, 0, 2, 2]  # corr, tot_errs, count_in_ref, count_in_hyp
    assert stats["cat"] == [0, 1, 1, 0]
    assert stats["bat"] == [0, 1, 0, 1]
    assert stats["z"] == [0, 1, 0, 1]
    assert sec["PER-WORD STATS"][-1].split() == ["a", "1", "0", "1", "1"]  # error-free, smallest token last

    summary = tmp_path / "wer-summary-test-clean.txt"
    assert summary.read_text(encoding="utf-8") == "settings\tWER\nepoch-3-avg-1\t41.67\n"
    # A better setting joins the same table, best first; rescoring a setting replaces its row.
    write_results(tmp_path, "test-clean", "epoch-5-avg-2", [(c, r, r) for c, r, _ in results])
    write_results(tmp_path, "test-clean", "epoch-3-avg-1", results)
    assert summary.read_text(encoding="utf-8") == "settings\tWER\nepoch-5-avg-2\t0.0\nepoch-3-avg-1\t41.67\n"
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]

    # Re-scoring the recogs file gives the same counts.
    s = score_files(tmp_path / "recogs-test-clean-epoch-3-avg-1.txt")
    assert (s.num_ins, s.num_del, s.num_sub, s.num_ref) == (1, 1, 3, 12)

    # A CER run cannot silently land in a WER summary.
    with pytest.raises(ValueError, match="holds WER results"):
        write_results(tmp_path, "test-clean", "x", results, mode="cer")


def test_write_results_cer_files(tmp_path):
    results = [
        ("BAC009S0764W0121", "甚至出现交易几乎停滞的情况", "甚至出现交易几乎停止的情况。"),
        ("BAC009S0764W0122", "我用Python", "我用 python 啊"),
    ]
    # 13 + 3 reference tokens; 滞->止 substituted, 啊 inserted -> 2/16 = 12.50%.
    cer = write_results(tmp_path, "aishell-test", "beam-1", results, mode="cer")
    assert cer == 12.5
    metric, rate, (ins, dele, sub, n_ref, corr), sec = _parse_errs(tmp_path / "errs-aishell-test-beam-1.txt")
    assert (metric, rate, ins, dele, sub, n_ref, corr) == ("CER", 12.5, 1, 0, 1, 16, 15)
    assert sec["PER-UTT DETAILS"][1] == "BAC009S0764W0122:\t我 用 python (*->啊)"
    entries = read_recogs(tmp_path / "recogs-aishell-test-beam-1.txt")
    assert entries[1] == ("BAC009S0764W0122", ["我", "用", "python"], ["我", "用", "python", "啊"])
    summary = (tmp_path / "wer-summary-aishell-test.txt").read_text(encoding="utf-8")
    assert summary == "settings\tCER\nbeam-1\t12.5\n"


def test_score_icefall_recogs_file(tmp_path):
    # The format icefall's store_transcripts writes (char level for whisper_llm_zh).
    path = tmp_path / "recogs-test-beam-search.txt"
    path.write_text(
        "u1:\tref=['我', '们', '好']\nu1:\thyp=['我', '门', '好']\n"
        "u2:\tref=['A', 'B']\nu2:\thyp=['A']\n",
        encoding="utf-8",
    )
    s = score_files(path)
    assert (s.num_ref, s.num_sub, s.num_del, s.num_ins, s.num_utts) == (5, 1, 1, 0, 2)
    assert s.percent == 40.0

    bad = tmp_path / "recogs-bad.txt"
    bad.write_text("u1:\tref=['a']\nu1 hyp=['a']\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"recogs-bad.txt:2"):
        score_files(bad)
    bad.write_text("u1:\tref=['a']\n", encoding="utf-8")
    with pytest.raises(ValueError, match="without both a ref and a hyp"):
        score_files(bad)


def test_recogs_tokens_roundtrip_quotes(tmp_path):
    # Tokens with quotes/backslashes survive the list repr written to recogs-*.
    results = [("u", ["it's", 'say"hi"', "a\\b"], ["it's", "a\\b"])]
    write_results(tmp_path, "t", "s", results, normalize="none")
    line = (tmp_path / "recogs-t-s.txt").read_text(encoding="utf-8").splitlines()[0]
    assert ast.literal_eval(line.split("ref=", 1)[1]) == ["it's", 'say"hi"', "a\\b"]
    assert read_recogs(tmp_path / "recogs-t-s.txt") == [("u", results[0][1], results[0][2])]


# ---------------------------------------------------------------------------------------------
# Each recipe's own scoring is the default (src/decode.py): its numbers, its recogs lines


def _recipe_scoring(prompt_format, scoring=None, normalize=None):
    import argparse

    from llmasr.prompt import get_prompt_format
    from llmasr.recipes.decode import scoring_choice

    return scoring_choice(argparse.Namespace(scoring=scoring, normalize=normalize), get_prompt_format(prompt_format))


def test_default_scoring_follows_the_prompt_formats_recipe():
    assert _recipe_scoring("speechllm") == ("wer", "none")
    assert _recipe_scoring("whisper_llm_zh") == ("cer", "none")
    assert _recipe_scoring("whisper_llm_zh", scoring="cer") == ("cer", "none")
    # explicit overrides win; another metric than the recipe's takes llmasr.scoring's default
    assert _recipe_scoring("whisper_llm_zh", normalize="zh") == ("cer", "zh")
    assert _recipe_scoring("speechllm", scoring="cer") == ("cer", None)
    assert _recipe_scoring("firered") == ("wer", None)


def _golden_recogs_dirs(root):
    dirs = sorted(d for d in root.iterdir() if d.is_dir())
    assert dirs, f"no recogs runs under {root}"
    return dirs


def test_whisper_llm_zh_default_scoring_reproduces_the_recipes_files(golden_dir, tmp_path):
    """The recipe's own recogs/errs/wer-summary files: the same recogs lines, the same counts and CER
    (every hypothesis character counts, spaces/punctuation/U+FFFD included)."""
    from llmasr.prompt import get_prompt_format

    fmt = get_prompt_format("whisper_llm_zh")
    metric, normalize = _recipe_scoring(fmt)
    for run in _golden_recogs_dirs(golden_dir / "whisper_llm_zh" / "expected" / "recogs"):
        (recogs,) = run.glob("recogs-*.txt")
        (errs,) = run.glob("errs-*.txt")
        (summary,) = run.glob("wer-summary-*.txt")
        # the recipe's inputs: supervision text (its spaces go: text_transform) and the decoded string
        results = [(c, fmt.transform_text(" ".join(ref)), "".join(hyp)) for c, ref, hyp in read_recogs(recogs)]
        out = tmp_path / run.name
        rate = write_results(out, "aishell_test", "x", results, mode=metric, normalize=normalize)
        assert (out / "recogs-aishell_test-x.txt").read_text(encoding="utf-8") == recogs.read_text(encoding="utf-8")
        ours = (out / "errs-aishell_test-x.txt").read_text(encoding="utf-8").splitlines()
        theirs = errs.read_text(encoding="utf-8").splitlines()
        # (icefall heads the file "%WER = ..." even for its CER)
        assert ours[0] == theirs[0].replace("%WER", "%CER") and ours[1:] == theirs[1:], run.name
        header, row = summary.read_text(encoding="utf-8").splitlines()
        assert header == "settings\tCER" and rate == float(row.split("\t")[1]), run.name
        assert (out / "wer-summary-aishell_test.txt").read_text(encoding="utf-8") == f"settings\tCER\nx\t{rate}\n"


def test_speechllm_default_scoring_is_the_recipes_raw_wer(golden_dir, tmp_path):
    """SpeechLLM scores hyp.split() against its lower-cased reference words, nothing else."""
    from llmasr.prompt import get_prompt_format

    fmt = get_prompt_format("speechllm")
    metric, normalize = _recipe_scoring(fmt)
    base = golden_dir / "speechllm" / "expected" / "baseline" / "recogs"
    checked = 0
    for run in _golden_recogs_dirs(base):
        for recogs in sorted(run.glob("recogs-*.txt")):
            entries = read_recogs(recogs)
            # upper-case references as in the manifests: the format lower-cases them
            results = [(c, fmt.transform_text(" ".join(ref).upper()), " ".join(hyp)) for c, ref, hyp in entries]
            out = tmp_path / run.name
            rate = write_results(out, "t", recogs.stem, results, mode=metric, normalize=normalize)
            written = (out / f"recogs-t-{recogs.stem}.txt").read_text(encoding="utf-8")
            assert written == recogs.read_text(encoding="utf-8")
            s = compute_error_stats(entries)  # the recipe's own word lists, as icefall's write_error_stats counts
            assert rate == float(f"{100.0 * s.num_errors / s.num_ref:.2f}")
            checked += 1
    assert checked >= 2
