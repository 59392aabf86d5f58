"""Synthetic demo/test corpora spoken by espeak-ng, in the LibriSpeech or AISHELL-1 layout.

The corpora are real speech audio (espeak-ng formant synthesis, many voices, speeds and pitches,
converted with sox to 16 kHz mono 16-bit) laid out exactly like the published corpora, so that
``local/prepare.sh`` (lhotse's LibriSpeech / AISHELL conventions) runs on them unchanged:

* ``lang="en"``:  ``<out_dir>/LibriSpeech/<subset>/<spk>/<chapter>/<spk>-<chapter>-<utt:04d>.flac`` and
  ``<spk>-<chapter>.trans.txt`` (``<uttid> UPPER CASE TEXT`` per line); subsets ``train-clean-100``,
  ``dev-clean``, ``test-clean``, ``test-other``.
* ``lang="cmn"``: ``<out_dir>/aishell/data_aishell/wav/{train,dev,test}/<spk>/<uttid>.wav`` and
  ``<out_dir>/aishell/data_aishell/transcript/aishell_transcript_v0.8.txt`` (``<uttid> 字 字 字``),
  uttids ``BAC009S0002W0123`` like AISHELL.

Sentences are generated from templates and word lists (numbers, dates, times, names, places, short
everyday statements) by a seeded RNG, optionally mixed in train/dev with open-domain text (a Markov
chain over encyclopaedic English, ``markov_fraction``) and random common-word sequences
(``common_fraction``); every sentence is unique and the sentences of the test/dev subsets never occur
in the training subset. :func:`make_heldout_sets` writes test sets from other sources (new sentence
shapes, hand-written everyday sentences) spoken by voices no training corpus uses. Everything (texts,
speakers, voices, audio bytes) is a deterministic function of the arguments.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import random
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Dict, List, Optional, Sequence, Tuple

from llmasr.demo.llm_text import SHORT_WORDS, cached_everyday_sentences
from llmasr.io import atomic_write, atomic_write_json, atomic_write_text

SAMPLING_RATE = 16000

# --------------------------------------------------------------------------------------------
# English number words
# --------------------------------------------------------------------------------------------
_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_ORD_IRREGULAR = {"one": "first", "two": "second", "three": "third", "five": "fifth",
                  "eight": "eighth", "nine": "ninth", "twelve": "twelfth"}


def number_to_words(n: int) -> str:
    """0 <= n < 1_000_000 as spoken English words ("four hundred and twelve" style without "and")."""
    if not 0 <= n < 1_000_000:
        raise ValueError(f"number out of range: {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_to_words(rest))
    rest = n % 1000
    return number_to_words(n // 1000) + " thousand" + ("" if rest == 0 else " " + number_to_words(rest))


def ordinal_words(n: int) -> str:
    words = number_to_words(n).split()
    last = words[-1]
    if last in _ORD_IRREGULAR:
        words[-1] = _ORD_IRREGULAR[last]
    elif last.endswith("y"):
        words[-1] = last[:-1] + "ieth"
    else:
        words[-1] = last + "th"
    return " ".join(words)


def year_words(y: int) -> str:
    if 2000 <= y < 2010:
        return number_to_words(y)
    hi, lo = divmod(y, 100)
    if lo == 0:
        return number_to_words(hi) + " hundred"
    if lo < 10:
        return number_to_words(hi) + " oh " + number_to_words(lo)
    return number_to_words(hi) + " " + number_to_words(lo)


def digits_words(s: str) -> str:
    return " ".join("oh" if c == "0" else _ONES[int(c)] for c in s)


def time_words(h: int, m: int) -> str:
    if m == 0:
        return number_to_words(h) + " o'clock"
    if m < 10:
        return number_to_words(h) + " oh " + number_to_words(m)
    return number_to_words(h) + " " + number_to_words(m)


# --------------------------------------------------------------------------------------------
# English word lists and templates
# --------------------------------------------------------------------------------------------
def _w(s: str) -> List[str]:
    return s.split()


EN = {
    "first": _w("alice bob carol david emma frank grace henry isabel jack karen liam maria nathan olivia "
                "peter quentin rachel samuel tina victor wendy xavier yvonne zachary anna brian chloe daniel "
                "ella george hannah ian julia kevin laura michael nina oscar paula robert sarah thomas uma "
                "walter amy ben clara dylan fiona gavin helen jason kate leo megan noah ruth simon"),
    "last": _w("smith johnson brown taylor wilson davies evans thomas roberts walker wright robinson "
               "thompson white hughes edwards green hall wood harris lewis martin jackson clarke clark "
               "turner hill scott cooper morris ward moore king watson baker harrison morgan patel young "
               "allen mitchell anderson bell campbell kelly parker miller"),
    "city": _w("london paris berlin madrid rome boston chicago denver dallas seattle toronto sydney "
               "dublin vienna prague oslo lisbon athens cairo tokyo delhi lagos lima houston atlanta "
               "phoenix miami glasgow leeds bristol oxford cambridge york belfast warsaw munich geneva "
               "milan naples venice"),
    "noun": _w("book letter ticket table chair window garden kitchen report picture bottle bicycle "
               "camera laptop phone wallet jacket umbrella basket blanket candle ladder mirror notebook "
               "package pencil pillow recipe suitcase sweater teapot towel bucket drawer hammer helmet "
               "kettle lamp map parcel radio ribbon rope sandwich scarf shovel stamp tent toaster "
               "trophy violin whistle"),
    "adj": _w("old new small large bright dark heavy light quiet noisy clean dirty warm cold cheap "
              "expensive simple strange famous empty full busy lazy lucky gentle modern ancient narrow "
              "wide sweet bitter friendly careful brave clever calm proud rapid silver golden wooden "
              "broken shiny rusty fresh"),
    "animal": _w("cat dog horse rabbit sheep goat duck goose mouse fox bear wolf tiger lion eagle owl "
                 "parrot turtle frog deer camel zebra monkey donkey pigeon swan"),
    "food": _w("bread cheese apples oranges soup rice pasta pizza salad chicken fish carrots potatoes "
               "tomatoes cake cookies honey coffee tea milk butter eggs noodles bananas grapes yogurt"),
    "colour": _w("red blue green yellow black white orange purple brown grey pink"),
    "place": _w("market station library museum hospital airport office school bakery garage harbour "
                "theatre stadium park church bank pharmacy hotel cinema factory"),
    "profession": _w("doctor teacher nurse farmer pilot driver lawyer engineer baker painter plumber "
                     "writer singer dentist chef gardener tailor carpenter banker"),
    "relative": _w("brother sister mother father uncle aunt cousin grandmother grandfather neighbour "
                   "friend daughter son wife husband"),
    "vehicle": _w("car bus truck van taxi tractor boat train"),
    "verb": _w("open close carry clean fix paint move check wash sell buy borrow return bring find "
               "post print sign read pack"),
    "past": _w("opened closed carried cleaned fixed painted moved checked washed sold bought borrowed "
               "returned brought found posted printed signed read packed"),
    "weekday": _w("monday tuesday wednesday thursday friday saturday sunday"),
    "month": _w("january february march april may june july august september october november december"),
    "unit": _w("miles kilometres metres blocks minutes hours"),
    "period": _w("week month year summer winter spring autumn"),
    "adverb": _w("very quite really rather extremely slightly"),
    "ampm": ["in the morning", "in the afternoon", "in the evening", "at night"],
}


def _n(rng: random.Random, lo: int, hi: int) -> str:
    return number_to_words(rng.randint(lo, hi))


def _pick(rng: random.Random, key: str) -> str:
    return rng.choice(EN[key])


def _plural(word: str) -> str:
    if word in ("sheep", "deer", "fish"):
        return word
    if word.endswith("mouse"):
        return word[:-5] + "mice"
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    if word.endswith("f"):
        return word[:-1] + "ves"
    if word.endswith("fe"):
        return word[:-2] + "ves"
    return word + "s"


def _date(rng: random.Random) -> str:
    return f"{_pick(rng, 'month')} {ordinal_words(rng.randint(1, 28))}"


def _en_templates() -> List[Callable[[random.Random], str]]:
    p, n = _pick, _n
    return [
        lambda r: f"{p(r, 'first')} bought {n(r, 2, 19)} {_plural(p(r, 'noun'))} at the {p(r, 'place')} on {p(r, 'weekday')}",
        lambda r: f"the meeting is on {_date(r)} at {time_words(r.randint(1, 12), r.choice([0, 15, 30, 45]))}",
        lambda r: f"please call {p(r, 'first')} {p(r, 'last')} back before {n(r, 1, 12)} {r.choice(EN['ampm'])}",
        lambda r: f"my phone number is {digits_words(''.join(str(r.randint(0, 9)) for _ in range(7)))}",
        lambda r: f"{p(r, 'first')} was born on {_date(r)} {year_words(r.randint(1930, 2015))}",
        lambda r: f"the train to {p(r, 'city')} leaves from platform {n(r, 1, 12)} at {time_words(r.randint(1, 12), r.randint(0, 59))}",
        lambda r: f"it costs {n(r, 2, 999)} dollars and {n(r, 2, 99)} cents",
        lambda r: f"{p(r, 'first')} likes {p(r, 'adj')} {_plural(p(r, 'noun'))} and {p(r, 'colour')} {_plural(p(r, 'vehicle'))}",
        lambda r: f"the {p(r, 'adj')} {p(r, 'animal')} ran past the {p(r, 'adj')} {p(r, 'place')}",
        lambda r: f"we need {n(r, 2, 60)} {_plural(p(r, 'noun'))} for the party on {p(r, 'weekday')}",
        lambda r: f"turn left after {n(r, 2, 20)} {p(r, 'unit')} and you will see the {p(r, 'place')}",
        lambda r: f"the temperature in {p(r, 'city')} will be {n(r, 0, 40)} degrees tomorrow",
        lambda r: f"{p(r, 'first')} and {p(r, 'first')} went to {p(r, 'city')} in {p(r, 'month')}",
        lambda r: f"can you send me the {p(r, 'noun')} by {p(r, 'weekday')} morning",
        lambda r: f"i have lived in {p(r, 'city')} for {n(r, 2, 40)} years",
        lambda r: f"the {p(r, 'profession')} told {p(r, 'first')} to {p(r, 'verb')} the {p(r, 'noun')}",
        lambda r: f"there are {n(r, 2, 300)} {_plural(p(r, 'animal'))} in the {p(r, 'adj')} park",
        lambda r: f"flight {n(r, 10, 999)} to {p(r, 'city')} is delayed by {n(r, 5, 90)} minutes",
        lambda r: f"{p(r, 'first')}'s {p(r, 'relative')} works as a {p(r, 'profession')} in {p(r, 'city')}",
        lambda r: f"don't forget to {p(r, 'verb')} the {p(r, 'noun')} before {time_words(r.randint(1, 12), 0)}",
        lambda r: f"room {n(r, 100, 999)} is on the {ordinal_words(r.randint(1, 20))} floor",
        lambda r: f"the score was {n(r, 0, 9)} to {n(r, 0, 9)} at half time",
        lambda r: f"{p(r, 'first')} read {n(r, 2, 30)} books last {p(r, 'period')}",
        lambda r: f"my favourite colour is {p(r, 'colour')} and i love {p(r, 'food')}",
        lambda r: f"the {p(r, 'colour')} {p(r, 'vehicle')} is parked near the {p(r, 'place')}",
        lambda r: f"{p(r, 'first')} paid {n(r, 2, 500)} pounds for a {p(r, 'adj')} {p(r, 'noun')}",
        lambda r: f"the {p(r, 'place')} opens at {time_words(r.randint(6, 11), r.choice([0, 30]))} on {p(r, 'weekday')}",
        lambda r: f"the {p(r, 'noun')} was {p(r, 'adverb')} {p(r, 'adj')}",
        lambda r: f"{p(r, 'first')} {p(r, 'past')} the {p(r, 'adj')} {p(r, 'noun')} yesterday",
        lambda r: f"we will meet at the {p(r, 'place')} on {p(r, 'weekday')} the {ordinal_words(r.randint(1, 31))}",
        lambda r: f"the {p(r, 'profession')} from {p(r, 'city')} ordered {n(r, 2, 12)} plates of {p(r, 'food')}",
        lambda r: f"i think the {p(r, 'relative')} of {p(r, 'first')} {p(r, 'last')} is a {p(r, 'profession')}",
        lambda r: f"our {p(r, 'relative')} arrives on {_date(r)} with {n(r, 2, 9)} suitcases",
        lambda r: f"the year {year_words(r.randint(1900, 2030))} was a {p(r, 'adj')} year for {p(r, 'city')}",
        lambda r: f"there is {p(r, 'food')} and {p(r, 'food')} in the {p(r, 'adj')} kitchen",
        lambda r: f"{p(r, 'first')} {p(r, 'last')} lives at number {n(r, 1, 250)} {p(r, 'last')} street",
        lambda r: f"the bus leaves every {n(r, 5, 30)} minutes from the {p(r, 'place')}",
        lambda r: f"a {p(r, 'adj')} {p(r, 'animal')} is sleeping under the {p(r, 'noun')}",
        lambda r: f"please {p(r, 'verb')} {n(r, 2, 20)} {_plural(p(r, 'noun'))} for the {p(r, 'profession')}",
        lambda r: f"{p(r, 'first')} has been a {p(r, 'profession')} since {year_words(r.randint(1960, 2022))}",
    ]


def _en_sentence(rng: random.Random, templates) -> str:
    return " ".join(rng.choice(templates)(rng).split())


# --------------------------------------------------------------------------------------------
# Mandarin sentences
# --------------------------------------------------------------------------------------------
_ZH_DIGITS = "零一二三四五六七八九"


def zh_number(n: int) -> str:
    """0 <= n < 10000 in Chinese characters (一千零五, 十二, 二十)."""
    if not 0 <= n < 10000:
        raise ValueError(f"number out of range: {n}")
    if n == 0:
        return "零"
    out, zero = "", False
    for value, unit in ((1000, "千"), (100, "百"), (10, "十"), (1, "")):
        d = n // value % 10
        if d == 0:
            zero = bool(out)
            continue
        if zero:
            out += "零"
            zero = False
        out += ("" if (unit == "十" and d == 1 and not out) else _ZH_DIGITS[d]) + unit
    return out


ZH = {
    "surname": list("王李张刘陈杨黄赵周吴徐孙马朱胡郭何林高罗郑梁谢宋唐韩冯董"),
    "given": ["小明", "丽", "伟", "芳", "静", "强", "磊", "洋", "艳", "勇", "军", "杰", "娟", "涛", "明",
              "超", "秀英", "华", "平", "刚", "桂英", "晓东", "海燕", "建国", "志强", "文"],
    "city": ["北京", "上海", "广州", "深圳", "杭州", "南京", "成都", "武汉", "西安", "重庆", "天津",
             "苏州", "长沙", "青岛", "大连", "厦门", "昆明", "沈阳", "济南", "郑州", "合肥", "福州"],
    "place": ["超市", "银行", "医院", "学校", "公园", "车站", "机场", "图书馆", "饭店", "商场", "邮局",
              "博物馆", "电影院", "办公室", "菜市场"],
    "thing": ["书", "苹果", "杯子", "椅子", "电脑", "手机", "衣服", "雨伞", "自行车", "报纸", "面包",
              "鸡蛋", "西瓜", "本子", "钥匙", "帽子", "鞋子", "花"],
    "measure": {"书": "本", "苹果": "个", "杯子": "个", "椅子": "把", "电脑": "台", "手机": "部",
                "衣服": "件", "雨伞": "把", "自行车": "辆", "报纸": "份", "面包": "个", "鸡蛋": "个",
                "西瓜": "个", "本子": "个", "钥匙": "把", "帽子": "顶", "鞋子": "双", "花": "朵"},
    "weekday": ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期天"],
    "adj": ["很好", "不错", "很忙", "很冷", "很热", "很贵", "便宜", "干净", "漂亮", "安静", "热闹"],
    "job": ["医生", "老师", "司机", "工程师", "律师", "厨师", "护士", "农民", "记者", "警察"],
    "food": ["米饭", "面条", "饺子", "包子", "豆腐", "青菜", "牛肉", "鱼", "水果", "茶"],
    "time_of_day": ["早上", "上午", "中午", "下午", "晚上"],
}


def _zh_name(r: random.Random) -> str:
    return r.choice(ZH["surname"]) + r.choice(ZH["given"])


def _zh_count(r: random.Random) -> str:
    thing = r.choice(ZH["thing"])
    n = r.randint(2, 99)
    return ("两" if n == 2 else zh_number(n)) + ZH["measure"][thing] + thing


def _zh_date(r: random.Random) -> str:
    return f"{zh_number(r.randint(1, 12))}月{zh_number(r.randint(1, 28))}日"


def _zh_templates() -> List[Callable[[random.Random], str]]:
    c = random.Random.choice
    return [
        lambda r: f"{_zh_name(r)}在{c(r, ZH['place'])}买了{_zh_count(r)}",
        lambda r: f"会议定在{_zh_date(r)}{c(r, ZH['time_of_day'])}{zh_number(r.randint(1, 12))}点",
        lambda r: f"今天{c(r, ZH['city'])}的天气{c(r, ZH['adj'])}",
        lambda r: f"{_zh_name(r)}是一名{c(r, ZH['job'])}",
        lambda r: f"我们{c(r, ZH['weekday'])}去{c(r, ZH['city'])}",
        lambda r: f"{c(r, ZH['weekday'])}{c(r, ZH['time_of_day'])}{_zh_name(r)}要去{c(r, ZH['place'])}",
        lambda r: f"去{c(r, ZH['place'])}要走{zh_number(r.randint(2, 60))}分钟",
        lambda r: f"{_zh_name(r)}的电话号码是{''.join(c(r, _ZH_DIGITS[1:]) for _ in range(7))}",
        lambda r: f"{c(r, ZH['city'])}到{c(r, ZH['city'])}的火车{c(r, ZH['time_of_day'])}出发",
        lambda r: f"这个{c(r, ZH['place'])}{c(r, ZH['adj'])}",
        lambda r: f"我想吃{c(r, ZH['food'])}和{c(r, ZH['food'])}",
        lambda r: f"{_zh_name(r)}生于一九{''.join(c(r, _ZH_DIGITS) for _ in range(2))}年{_zh_date(r)}",
        lambda r: f"房间里有{_zh_count(r)}",
        lambda r: f"{_zh_name(r)}和{_zh_name(r)}在{c(r, ZH['city'])}工作",
        lambda r: f"一共是{zh_number(r.randint(2, 9999))}块钱",
    ]


def _zh_sentence(rng: random.Random, templates) -> str:
    return rng.choice(templates)(rng)


# --------------------------------------------------------------------------------------------
# Open-domain training text: a Markov chain over encyclopaedic English (essential-generators)
# --------------------------------------------------------------------------------------------
# A word espeak-ng reads as written: letters, an optional 's-style suffix, trailing punctuation.
# Acronyms (NATO) are refused: espeak spells them, the transcript would not.
_MARKOV_WORD = re.compile(r"^[A-Za-z][a-z]*(?:'[a-z]+)?[.,;:]?$")
_MARKOV_CHAIN = None


def _markov_chain():
    """essential-generators' trigram chain ({"w1 w2": {"transitions": [...], "weights": [...]}}),
    46 MB of JSON: loaded once (~6 s)."""
    global _MARKOV_CHAIN
    if _MARKOV_CHAIN is None:
        try:
            from essential_generators.markov_textgen import MarkovTextGenerator
        except ImportError:
            raise RuntimeError("open-domain demo text needs the essential-generators package "
                               "(pip install -r requirements.txt)") from None
        chain = MarkovTextGenerator().chain
        starts = sorted(k for k in chain if k[0].isupper()
                        and all(_MARKOV_WORD.match(w) and w[-1].isalpha() for w in k.split()))
        _MARKOV_CHAIN = (chain, starts)
    return _MARKOV_CHAIN


def markov_sentence(rng: random.Random, min_words: int = 4, max_words: int = 12) -> str:
    """A lower-case word sequence from the chain: from a capitalised word to a full stop or
    ``max_words`` words (then a fragment), only words espeak-ng reads as written."""
    chain, starts = _markov_chain()
    while True:
        words = rng.choice(starts).split()
        while len(words) < max_words and not words[-1].endswith("."):
            node = chain.get(" ".join(words[-2:]))
            if not node or not node.get("transitions"):
                break
            words.append(rng.choices(node["transitions"], weights=node["weights"])[0])
        if len(words) >= min_words and all(_MARKOV_WORD.match(w) for w in words):
            return " ".join(w.rstrip(".,;:").lower() for w in words)


EN_VOCAB_SIZE = 8000


@functools.lru_cache(maxsize=None)
def _en_vocabulary(size: int = EN_VOCAB_SIZE) -> Tuple[Tuple[str, ...], Tuple[float, ...]]:
    """English words for the word-sequence text, with sampling weights: the ``size`` most frequent
    words of ``wordfreq`` that essential-generators' encyclopaedic text also writes in lower case
    (which drops acronyms and initials: espeak-ng would spell "nfl" or expand "mr"), have a vowel,
    and have 3+ letters unless they are common short words. Weight = frequency ** 0.5: frequent
    words come back often enough to be learnt, rarer ones still occur (~6100 words for 8000)."""
    try:
        from wordfreq import top_n_list, word_frequency
    except ImportError:
        raise RuntimeError("word-sequence demo text needs the wordfreq package "
                           "(pip install -r requirements.txt)") from None
    chain, _ = _markov_chain()
    lower = set()
    for key, node in chain.items():
        for w in key.split() + list(node.get("transitions") or ()):
            w = w.rstrip(".,;:")
            if w.isalpha() and w.islower():
                lower.add(w)
    words = tuple(w for w in top_n_list("en", size) if re.fullmatch(r"[a-z]+", w) and w in lower
                  and re.search(r"[aeiouy]", w) and (len(w) >= 3 or w in SHORT_WORDS))
    return words, tuple(word_frequency(w, "en") ** 0.5 for w in words)


def _zh_common_words() -> Tuple[str, ...]:
    """Faker's curated list of ~350 frequent Chinese words."""
    try:
        from faker.providers.lorem.zh_CN import Provider
    except ImportError:
        raise RuntimeError("common-word demo text needs the faker package (pip install -r requirements.txt)") from None
    return tuple(w for w in Provider.word_list if re.fullmatch(r"[\u4e00-\u9fff]+", w))


def common_words_sentence(rng: random.Random, lang: str = "en", min_words: int = 4, max_words: int = 10) -> str:
    """A random sequence of common words (no grammar: only the audio tells which words come):
    English from :func:`_en_vocabulary` (frequency-weighted), separated by spaces; Mandarin
    words from faker's list, joined."""
    if lang == "en":
        words, weights = _en_vocabulary()
        return " ".join(rng.choices(words, weights=weights, k=rng.randint(min_words, max_words)))
    words = _zh_common_words()
    return "".join(rng.choice(words) for _ in range(rng.randint(2, max(2, max_words // 2))))


# --------------------------------------------------------------------------------------------
# Held-out test text: sentence shapes the training templates never produce, and hand-written
# everyday sentences. Neither is ever used for training.
# --------------------------------------------------------------------------------------------
def _en_novel_templates() -> List[Callable[[random.Random], str]]:
    """The demo's vocabulary (names, places, numbers, dates) in frames absent from _en_templates."""
    p, n = _pick, _n
    return [
        lambda r: f"did {p(r, 'first')} really drive to {p(r, 'city')} on {p(r, 'weekday')}",
        lambda r: f"{n(r, 2, 90)} {_plural(p(r, 'animal'))} were counted near {p(r, 'city')} last {p(r, 'period')}",
        lambda r: f"ask {p(r, 'first')} whether the {p(r, 'place')} is open until {time_words(r.randint(1, 12), 0)}",
        lambda r: f"my {p(r, 'relative')} never eats {p(r, 'food')} after {time_words(r.randint(6, 11), r.choice([0, 30]))}",
        lambda r: f"nobody in {p(r, 'city')} remembers the {p(r, 'adj')} {p(r, 'noun')} from {year_words(r.randint(1950, 2020))}",
        lambda r: f"why is the {p(r, 'noun')} in the {p(r, 'place')} so {p(r, 'adj')}",
        lambda r: f"on {_date(r)} {p(r, 'first')} will turn {n(r, 5, 90)}",
        lambda r: f"without the {p(r, 'noun')} we cannot reach {p(r, 'city')} before {p(r, 'weekday')}",
        lambda r: f"the {ordinal_words(r.randint(1, 12))} {p(r, 'profession')} in line came from {p(r, 'city')}",
        lambda r: f"{n(r, 2, 40)} of the {_plural(p(r, 'profession'))} live close to the {p(r, 'place')}",
        lambda r: f"if it rains on {p(r, 'weekday')} we will stay at the {p(r, 'place')}",
        lambda r: f"{p(r, 'first')} gave {p(r, 'first')} a {p(r, 'colour')} {p(r, 'noun')} in {p(r, 'month')}",
        lambda r: f"how many {_plural(p(r, 'animal'))} can you see from the {p(r, 'place')}",
        lambda r: f"between {p(r, 'month')} and {p(r, 'month')} the {p(r, 'place')} closes at {time_words(r.randint(4, 9), 0)}",
        lambda r: f"the {p(r, 'adj')} {p(r, 'profession')} sold her {p(r, 'noun')} for {n(r, 2, 90)} dollars",
        lambda r: f"{p(r, 'first')}'s {p(r, 'noun')} broke on the way to {p(r, 'city')}",
        lambda r: f"please tell my {p(r, 'relative')} that the {p(r, 'vehicle')} is {p(r, 'colour')}",
        lambda r: f"at {time_words(r.randint(1, 12), r.choice([15, 45]))} the {p(r, 'animal')} escaped from the {p(r, 'place')}",
        lambda r: f"everyone in room {n(r, 100, 400)} must {p(r, 'verb')} a {p(r, 'noun')}",
        lambda r: f"{p(r, 'first')} first visited {p(r, 'city')} in {year_words(r.randint(1960, 2020))}",
        lambda r: f"after {n(r, 2, 20)} {p(r, 'unit')} the {p(r, 'vehicle')} stopped beside the {p(r, 'place')}",
        lambda r: f"is the {p(r, 'place')} on {p(r, 'last')} street still closed",
        lambda r: f"which {p(r, 'vehicle')} goes from {p(r, 'city')} to {p(r, 'city')}",
        lambda r: f"somebody left {n(r, 2, 30)} {_plural(p(r, 'noun'))} outside the {p(r, 'place')}",
    ]


EN_OPEN_DOMAIN = (
    "could you turn the music down a little please",
    "i left my keys on the kitchen counter again",
    "the printer on the second floor is out of paper",
    "we should leave early to avoid the traffic",
    "she has been learning to play the guitar since spring",
    "do you know where the nearest post office is",
    "the children are building a snowman in the yard",
    "my grandmother makes the best apple pie in town",
    "he forgot to water the plants while we were away",
    "let's meet outside the cinema after dinner",
    "the weather forecast says it will be sunny all weekend",
    "i can't find the remote control anywhere",
    "the soup needs a little more salt and pepper",
    "our neighbours are painting their fence white",
    "please remember to lock the back door tonight",
    "the dog barked at the mail carrier this morning",
    "they moved into a small flat near the river",
    "my laptop battery does not last very long anymore",
    "we ran out of milk so i went to the shop",
    "the baby finally fell asleep after lunch",
    "would you like tea or coffee with your breakfast",
    "the library closes early on public holidays",
    "i need to buy a birthday present for my sister",
    "the meeting ran much longer than anyone expected",
    "he always reads the newspaper on the train",
    "the garden looks lovely after the rain",
    "can you help me carry these boxes upstairs",
    "she wrote a long letter to her old friend",
    "the restaurant on the corner serves excellent curry",
    "we watched a funny film on television last night",
    "my shoes got completely wet in the storm",
    "the teacher asked everyone to open their books",
    "there is a strange noise coming from the engine",
    "i usually go for a walk before work",
    "the shop assistant was very friendly and helpful",
    "our flight was cancelled because of the fog",
    "he spilled orange juice all over the table",
    "the museum has a new exhibition about ancient egypt",
    "i promise i will call you as soon as i arrive",
    "the kids are playing football in the park",
    "we need to clean the windows before the guests arrive",
    "my brother just started a new job at the bank",
    "the cat is sleeping on the warm windowsill",
    "don't forget to bring an umbrella just in case",
    "the bakery sells fresh bread every morning",
    "she laughed so hard that she started to cry",
    "the road was closed because of the accident",
    "i think we are going to be late for the concert",
    "he painted the bedroom a pale shade of blue",
    "the bus was so crowded that we had to stand",
    "my phone screen cracked when i dropped it",
    "they are planning a picnic by the lake",
    "the tomatoes in our garden are almost ripe",
    "could you pass me the bread and butter please",
    "she is knitting a warm scarf for the winter",
    "the hotel room had a beautiful view of the sea",
    "we spent the whole afternoon tidying the garage",
    "his jokes always make everyone at the table smile",
    "the old bridge is being repaired this summer",
    "i would rather stay at home and read a book",
)


def _zh_novel_templates() -> List[Callable[[random.Random], str]]:
    """The Mandarin demo vocabulary in frames absent from _zh_templates."""
    c = random.Random.choice
    return [
        lambda r: f"{_zh_name(r)}明天要不要去{c(r, ZH['city'])}",
        lambda r: f"{c(r, ZH['city'])}的{c(r, ZH['place'])}{c(r, ZH['time_of_day'])}不开门",
        lambda r: f"请告诉{_zh_name(r)}我{c(r, ZH['weekday'])}没有空",
        lambda r: f"{_zh_name(r)}的{c(r, ZH['thing'])}放在{c(r, ZH['place'])}了",
        lambda r: f"我们在{c(r, ZH['city'])}住了{zh_number(r.randint(2, 30))}年",
        lambda r: f"{c(r, ZH['time_of_day'])}的{c(r, ZH['food'])}{c(r, ZH['adj'])}",
        lambda r: f"你知道{c(r, ZH['place'])}在哪里吗",
        lambda r: f"{_zh_name(r)}以前在{c(r, ZH['city'])}当{c(r, ZH['job'])}",
        lambda r: f"从{c(r, ZH['place'])}到{c(r, ZH['place'])}只要{zh_number(r.randint(2, 30))}分钟",
        lambda r: f"{_zh_date(r)}那天{_zh_name(r)}没有来",
        lambda r: f"这些{c(r, ZH['thing'])}都是{_zh_name(r)}送的",
        lambda r: f"为什么{c(r, ZH['city'])}这么{c(r, ['冷', '热', '忙', '安静', '热闹'])}",
    ]


ZH_OPEN_DOMAIN = (
    "请把窗户关上", "我今天有点累想早点休息", "外面下雨了记得带伞", "这家店的咖啡很好喝",
    "孩子们在院子里玩得很开心", "我的手机没电了", "周末我们一起去爬山吧", "他每天早上都跑步",
    "妈妈正在厨房做饭", "这本小说我已经看完了", "你能帮我拿一下杯子吗", "路上堵车所以我迟到了",
    "我们家的小猫特别喜欢睡觉", "明天的考试你准备好了吗", "这件衣服有点太大了", "他把钥匙忘在办公室了",
    "今年夏天特别热", "我想学习做蛋糕", "老师让我们读课文", "晚饭以后我们去散步",
    "电梯坏了只能走楼梯", "她唱歌唱得非常好听", "请你说慢一点", "我们下个月搬家",
    "冰箱里还有一些牛奶", "这条路晚上很安静", "他给奶奶打了一个电话", "我最近在学游泳",
    "公园里的花都开了", "你吃过早饭了吗", "我们应该早点出发", "这个问题有点难",
    "他们正在开会", "我的电脑突然不动了", "今天的风很大", "周末我想在家看电影",
    "她每天坐地铁上班", "别忘了给花浇水", "朋友送了我一本书", "这里的空气很新鲜",
)


# --------------------------------------------------------------------------------------------
# Speakers and synthesis
# --------------------------------------------------------------------------------------------
_EN_BASE_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan",
                   "en-gb-x-gbcwmd")
_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5")
# More training voices (``more_voices``): espeak-ng's named variants.
_EXTRA_TRAIN_VARIANTS = ("Alex", "Annie", "adam", "anika", "aunty", "david", "john", "klatt", "klatt3", "m8",
                         "norbert", "quincy", "rob", "travis", "zac")
# Voices of the held-out sets (make_heldout_sets) only: never used by a training corpus.
_HELDOUT_VARIANTS = ("Andy", "Gene", "Lee", "Mike", "benjamin", "edward", "iven", "klatt2", "linda", "max",
                     "paul", "steph")
_EN_HELDOUT_BASES = _EN_BASE_VOICES + ("en-us-nyc",)


@dataclass(frozen=True)
class Speaker:
    id: str
    voice: str  # espeak-ng voice, e.g. "en-us+f2"
    speed: int  # words per minute
    pitch: int  # 0..99


@dataclass(frozen=True)
class Utterance:
    id: str
    subset: str
    speaker: Speaker
    text: str  # transcript as written to the corpus
    spoken: str  # what espeak-ng is asked to say
    path: Path


def _make_speakers(rng: random.Random, lang: str, count: int, hard: bool, used: set,
                   new_id: Callable[[], str], variants: Sequence[str] = _VARIANTS,
                   bases: Optional[Sequence[str]] = None) -> List[Speaker]:
    bases = bases or (_EN_BASE_VOICES if lang == "en" else ("cmn",))
    speakers = []
    while len(speakers) < count:
        voice = f"{rng.choice(bases)}+{rng.choice(variants)}"
        # "other" test speakers are faster and have more extreme pitch: harder, but intelligible.
        speed = rng.randint(175, 210) if hard else rng.randint(135, 180)
        pitch = rng.choice([rng.randint(5, 25), rng.randint(75, 95)]) if hard else rng.randint(30, 70)
        key = (voice, speed, pitch)
        if key in used:  # no two speakers share voice, speed and pitch
            continue
        used.add(key)
        speakers.append(Speaker(new_id(), voice, speed, pitch))
    return speakers


def _synthesise(utt: Utterance) -> None:
    if utt.path.is_file() and utt.path.stat().st_size > 0:
        return
    utt.path.parent.mkdir(parents=True, exist_ok=True)
    sp = utt.speaker
    wav = subprocess.run(
        ["espeak-ng", "--stdout", "-v", sp.voice, "-s", str(sp.speed), "-p", str(sp.pitch), utt.spoken],
        check=True, capture_output=True,
    ).stdout
    # -D: no dither, so the audio is bit-exact for a given seed; espeak-ng writes 22.05 kHz.
    atomic_write(utt.path, lambda tmp: subprocess.run(
        ["sox", "-D", "-V1", "-t", "wav", "-", "-r", str(SAMPLING_RATE), "-c", "1", "-b", "16", str(tmp)],
        input=wav, check=True, capture_output=True,
    ))


def _check_tools() -> None:
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed; run local/setup.sh (apt-get install espeak-ng sox)")


def _unique_sentences(rng: random.Random, make: Callable[[random.Random], str], count: int,
                      exclude: Collection[str] = ()) -> List[str]:
    seen: Dict[str, None] = {}
    tries = 0
    while len(seen) < count:
        text = make(rng)
        if text not in exclude:
            seen.setdefault(text, None)
        tries += 1
        if tries > 50 * count + 1000:
            raise RuntimeError(f"could not generate {count} distinct sentences")
    return list(seen)


def generate_sentences(lang: str, count: int, seed: int = 0) -> List[str]:
    """``count`` distinct sentences (lower case; Mandarin without spaces) from the templates."""
    rng = random.Random(f"llmasr-sentences-{lang}-{seed}")
    if lang == "en":
        templates = _en_templates()
        return _unique_sentences(rng, lambda r: _en_sentence(r, templates), count)
    if lang == "cmn":
        templates = _zh_templates()
        return _unique_sentences(rng, lambda r: _zh_sentence(r, templates), count)
    raise ValueError(f"lang must be 'en' or 'cmn', got {lang!r}")


def make_espeak_corpus(
    out_dir,
    lang: str = "en",
    num_train: int = 200,
    num_test: int = 50,
    num_dev: Optional[int] = None,
    num_test_other: Optional[int] = None,
    seed: int = 0,
    utts_per_speaker: int = 10,
    num_jobs: Optional[int] = None,
    markov_fraction: float = 0.0,
    markov_max_words: int = 12,
    more_voices: bool = False,
    common_fraction: float = 0.0,
    num_train_extra: int = 0,
    llm_fraction: float = 0.0,
    llm_path=None,
) -> Path:
    """Synthesise a corpus under ``out_dir`` (a download dir, e.g. ``--dl-dir`` of prepare.sh).

    ``markov_fraction`` (English): that share of the train and dev sentences comes from
    :func:`markov_sentence` (open-domain text of at most ``markov_max_words`` words) instead of
    the templates; ``common_fraction`` (English, Mandarin): that share from
    :func:`common_words_sentence` (random sequences of common words); ``llm_fraction`` (English):
    that share from everyday sentences sampled from the causal LM at ``llm_path``
    (:mod:`llmasr.demo.llm_text`; kept in ``out_dir/llm_text-<seed>.txt``). Test sets stay template
    sentences. ``more_voices``: every subset also uses
    espeak-ng's named variants (``_EXTRA_TRAIN_VARIANTS``); voices of the held-out sets
    (:func:`make_heldout_sets`) are never used either way.

    Returns the corpus directory: ``out_dir/LibriSpeech`` (lang "en") or ``out_dir/aishell``
    (lang "cmn", containing ``data_aishell``). ``num_dev`` defaults to ``num_test``;
    ``num_test_other`` (English only, subset ``test-other``: faster speech, extreme pitch)
    defaults to ``num_test``. ``num_train_extra`` (English only): a second training subset,
    ``train-clean-360``, made like ``train-clean-100`` (text mix, voice pool) with its own speakers:
    e.g. data for the cheap projector warm-up only (prepare.sh puts both in ``train-all-shuf``).
    Existing audio files are kept (re-running is cheap); the transcripts and ``espeak_corpus.json``
    (speakers, voices, arguments) are rewritten.
    """
    _check_corpus_args(lang, markov_fraction, common_fraction, llm_fraction, llm_path, num_train_extra)
    _check_tools()
    num_dev = num_test if num_dev is None else num_dev
    num_test_other = (num_test if num_test_other is None else num_test_other) if lang == "en" else 0
    rng = random.Random(f"llmasr-espeak-{lang}-{seed}")
    out_dir = Path(out_dir)
    subsets, make = _subset_plan(lang, num_train, num_train_extra, num_dev, num_test, num_test_other)
    texts = _split_sentence_pool(rng, make, subsets)
    if markov_fraction > 0 or common_fraction > 0 or llm_fraction > 0:
        _mix_in_open_text(texts, subsets, lang, seed, out_dir, markov_fraction, markov_max_words,
                          common_fraction, llm_fraction, llm_path)
    _check_no_train_overlap(texts, subsets)

    root = out_dir / ("LibriSpeech" if lang == "en" else "aishell")
    utts = _corpus_utterances(rng, lang, subsets, texts, root, seed, utts_per_speaker, more_voices)
    num_jobs = num_jobs or min(8, os.cpu_count() or 1)
    logging.info(f"synthesising {len(utts)} utterances ({lang}) with {num_jobs} jobs into {root}")
    # Each task runs two external processes (espeak-ng | sox), so worker threads already give
    # process-level parallelism without pickling anything.
    with ThreadPoolExecutor(num_jobs) as ex:
        list(ex.map(_synthesise, utts))

    _write_transcripts(root, lang, utts)
    meta = {
        "lang": lang, "seed": seed, "utts_per_speaker": utts_per_speaker,
        "markov_fraction": markov_fraction, "markov_max_words": markov_max_words, "more_voices": more_voices,
        "common_fraction": common_fraction, "llm_fraction": llm_fraction, "num_train_extra": num_train_extra,
        "subsets": {name: n for name, n, _ in subsets},
        "speakers": sorted({(u.subset, u.speaker.id, u.speaker.voice, u.speaker.speed, u.speaker.pitch)
                            for u in utts}),
    }
    atomic_write_json(root / "espeak_corpus.json", meta, indent=1, ensure_ascii=False)
    return root


def _check_corpus_args(lang, markov_fraction, common_fraction, llm_fraction, llm_path, num_train_extra) -> None:
    if lang not in ("en", "cmn"):
        raise ValueError(f"lang must be 'en' or 'cmn', got {lang!r}")
    fractions = {"markov_fraction": markov_fraction, "common_fraction": common_fraction, "llm_fraction": llm_fraction}
    if min(fractions.values()) < 0 or sum(fractions.values()) > 1:
        raise ValueError(f"{fractions}: the text fractions must be >= 0 with a sum <= 1")
    if llm_fraction > 0 and (lang != "en" or llm_path is None):
        raise ValueError("llm_fraction: the LLM-sampled text is English and needs llm_path")
    if num_train_extra and lang != "en":
        raise ValueError("num_train_extra: the AISHELL layout has a single training subset")
    if markov_fraction > 0 and lang != "en":
        raise ValueError("markov_fraction: the Markov text is English; the Mandarin corpus has templates only")


def _subset_plan(lang, num_train, num_train_extra, num_dev, num_test, num_test_other):
    """``([(subset, size, hard voices)], template sentence maker)`` of the non-empty subsets."""
    if lang == "en":
        subsets = [("train-clean-100", num_train, False), ("train-clean-360", num_train_extra, False),
                   ("dev-clean", num_dev, False),
                   ("test-clean", num_test, False), ("test-other", num_test_other, True)]
        templates = _en_templates()
        make = lambda r: _en_sentence(r, templates)  # noqa: E731
    else:
        subsets = [("train", num_train, False), ("dev", num_dev, False), ("test", num_test, False)]
        templates = _zh_templates()
        make = lambda r: _zh_sentence(r, templates)  # noqa: E731
    return [s for s in subsets if s[1] > 0], make


def _split_sentence_pool(rng: random.Random, make, subsets) -> Dict[str, List[str]]:
    """One pool of distinct template sentences, split between subsets: test/dev sentences never
    occur in train."""
    total = sum(n for _, n, _ in subsets)
    pool = _unique_sentences(rng, make, total)
    rng.shuffle(pool)
    texts: Dict[str, List[str]] = {}
    start = 0
    for name, n, _ in subsets:
        texts[name] = pool[start:start + n]
        start += n
    return texts


def _mix_in_open_text(texts, subsets, lang, seed, out_dir: Path, markov_fraction, markov_max_words,
                      common_fraction, llm_fraction, llm_path) -> None:
    """Replace those shares of the train/dev sentences (in place) by Markov text, common-word
    sequences and LLM-sampled everyday sentences."""
    # Their own RNG: the template sentences, speakers and voices stay those of a template corpus.
    mrng = random.Random(f"llmasr-markov-{lang}-{seed}")
    taken = {t for v in texts.values() for t in v}
    mixed = [(name, n) for name, n, _ in subsets if name.startswith(("train", "dev"))]
    llm_text: List[str] = []
    if llm_fraction > 0:
        # the held-out open-domain sentences are banned too: that test set must not change
        llm_text = cached_everyday_sentences(out_dir / f"llm_text-{seed}.txt", llm_path,
                                             sum(round(llm_fraction * n) for _, n in mixed), seed=seed,
                                             exclude=sorted(taken.union(EN_OPEN_DOMAIN)))
        taken.update(llm_text)
    for name, n in mixed:
        k, c, m = round(markov_fraction * n), round(common_fraction * n), round(llm_fraction * n)
        extra, llm_text = llm_text[:m], llm_text[m:]
        extra += _unique_sentences(mrng, lambda r: markov_sentence(r, max_words=markov_max_words), k,
                                   exclude=taken)
        extra += _unique_sentences(mrng, lambda r: common_words_sentence(r, "en" if lang == "en" else "zh"),
                                   c, exclude=taken)
        taken.update(extra)
        texts[name] = texts[name][:n - k - c - m] + extra
        rng_mix = random.Random(f"llmasr-mix-{name}-{seed}")
        rng_mix.shuffle(texts[name])


def _check_no_train_overlap(texts, subsets) -> None:
    train_set = {t for name, _, _ in subsets if name.startswith("train") for t in texts[name]}
    for name, _, _ in subsets:
        if not name.startswith("train"):
            overlap = train_set.intersection(texts[name])
            assert not overlap, f"{name} shares sentences with the training subsets: {sorted(overlap)[:3]}"


def _corpus_utterances(rng, lang, subsets, texts, root: Path, seed, utts_per_speaker, more_voices) -> List["Utterance"]:
    """Speakers for every subset and the utterance (id, text, audio path) of every sentence."""
    used_voices: set = set()
    spk_counter = iter(range(2, 100000))
    used_ids: set = set()

    def new_en_id() -> str:
        while True:
            i = str(rng.randint(100, 9999))
            if i not in used_ids:
                used_ids.add(i)
                return i

    def new_zh_id() -> str:
        return f"S{next(spk_counter):04d}"

    utts: List[Utterance] = []
    for name, n, hard in subsets:
        num_spk = max(1, math.ceil(n / utts_per_speaker))
        speakers = _make_speakers(rng, lang, num_spk, hard, used_voices,
                                  new_en_id if lang == "en" else new_zh_id,
                                  variants=_VARIANTS + (_EXTRA_TRAIN_VARIANTS if more_voices else ()))
        for i, text in enumerate(texts[name]):
            spk = speakers[i % num_spk]
            k = i // num_spk  # index of this utterance within its speaker
            if lang == "en":
                chapter = str(int(hashlib.md5(f"{seed}-{spk.id}".encode()).hexdigest()[:6], 16) % 190000 + 10000)
                uid = f"{spk.id}-{chapter}-{k:04d}"
                path = root / name / spk.id / chapter / f"{uid}.flac"
                utts.append(Utterance(uid, name, spk, text.upper(), text, path))
            else:
                uid = f"BAC009{spk.id}W{k + 1:04d}"
                path = root / "data_aishell" / "wav" / name / spk.id / f"{uid}.wav"
                utts.append(Utterance(uid, name, spk, " ".join(text), text, path))
    return utts


HELDOUT_SETS = ("novel_shape", "open_domain")


def heldout_sentences(lang: str, kind: str, count: int, seed: int = 0, exclude: Collection[str] = ()) -> List[str]:
    """``count`` held-out test sentences: ``novel_shape`` (the demo's vocabulary in frames the
    training templates never produce) or ``open_domain`` (hand-written everyday sentences); none
    of them in ``exclude`` (e.g. the training transcripts)."""
    if lang not in ("en", "cmn"):
        raise ValueError(f"lang must be 'en' or 'cmn', got {lang!r}")
    rng = random.Random(f"llmasr-heldout-{kind}-{lang}-{seed}")
    if kind == "novel_shape":
        templates = _en_novel_templates() if lang == "en" else _zh_novel_templates()
        return _unique_sentences(rng, lambda r: " ".join(r.choice(templates)(r).split()), count, exclude=exclude)
    if kind == "open_domain":
        pool = [t for t in (EN_OPEN_DOMAIN if lang == "en" else ZH_OPEN_DOMAIN) if t not in exclude]
        if count > len(pool):
            raise ValueError(f"only {len(pool)} open-domain {lang} sentences (not in the excluded texts), "
                             f"{count} asked for")
        return rng.sample(pool, count)
    raise ValueError(f"unknown held-out set {kind!r}; expected one of {HELDOUT_SETS}")


def make_heldout_sets(out_dir, lang: str = "en", num_per_set: int = 30, seed: int = 0,
                      exclude: Collection[str] = (), utts_per_speaker: int = 5,
                      num_jobs: Optional[int] = None) -> Path:
    """The held-out test sets as Kaldi data dirs ``out_dir/<set>/{wav.scp,text,utt2spk}`` (audio
    in ``out_dir/<set>/wav/``), one per :data:`HELDOUT_SETS` entry, for ``local/prepare.sh
    --corpus kaldi --dl-dir out_dir``. Texts from :func:`heldout_sentences` (none in ``exclude``),
    spoken by voices no training corpus uses (``_HELDOUT_VARIANTS``, and ``en-us-nyc``).
    Returns ``out_dir``."""
    _check_tools()
    out_dir = Path(out_dir)
    rng = random.Random(f"llmasr-heldout-voices-{lang}-{seed}")
    used: set = set()
    ids = iter(range(1, 100000))
    bases = _EN_HELDOUT_BASES if lang == "en" else ("cmn",)
    utts: List[Utterance] = []
    for kind in HELDOUT_SETS:
        texts = heldout_sentences(lang, kind, num_per_set, seed, exclude)
        num_spk = max(1, math.ceil(num_per_set / utts_per_speaker))
        speakers = _make_speakers(rng, lang, num_spk, False, used, lambda: f"h{next(ids):03d}",
                                  variants=_HELDOUT_VARIANTS, bases=bases)
        for i, text in enumerate(texts):
            spk = speakers[i % num_spk]
            uid = f"{spk.id}-{kind}-{i // num_spk:03d}"
            utts.append(Utterance(uid, kind, spk, text, text, out_dir / kind / "wav" / f"{uid}.wav"))
    with ThreadPoolExecutor(num_jobs or min(8, os.cpu_count() or 1)) as ex:
        list(ex.map(_synthesise, utts))
    for kind in HELDOUT_SETS:
        items = sorted((u for u in utts if u.subset == kind), key=lambda u: u.id)
        atomic_write_text(out_dir / kind / "wav.scp", "".join(f"{u.id} {u.path.resolve()}\n" for u in items))
        atomic_write_text(out_dir / kind / "text", "".join(f"{u.id} {u.text}\n" for u in items))
        atomic_write_text(out_dir / kind / "utt2spk", "".join(f"{u.id} {u.speaker.id}\n" for u in items))
    meta = {"lang": lang, "seed": seed, "num_per_set": num_per_set,
            "speakers": sorted({(u.subset, u.speaker.id, u.speaker.voice, u.speaker.speed, u.speaker.pitch)
                                for u in utts})}
    atomic_write_json(out_dir / "espeak_heldout.json", meta, indent=1, ensure_ascii=False)
    return out_dir


def _write_transcripts(root: Path, lang: str, utts: Sequence[Utterance]) -> None:
    if lang == "en":
        by_chapter: Dict[Path, List[Utterance]] = {}
        for u in utts:
            by_chapter.setdefault(u.path.parent, []).append(u)
        for chapter_dir, items in by_chapter.items():
            spk, chapter = items[0].id.split("-")[:2]
            lines = "".join(f"{u.id} {u.text}\n" for u in sorted(items, key=lambda u: u.id))
            atomic_write_text(chapter_dir / f"{spk}-{chapter}.trans.txt", lines)
    else:
        lines = "".join(f"{u.id} {u.text}\n" for u in sorted(utts, key=lambda u: u.id))
        atomic_write_text(root / "data_aishell" / "transcript" / "aishell_transcript_v0.8.txt", lines)


def read_corpus_transcripts(root) -> Dict[str, Tuple[str, str]]:
    """{uttid: (subset, text)} of a corpus written by :func:`make_espeak_corpus` (for tests/demos)."""
    root = Path(root)
    out: Dict[str, Tuple[str, str]] = {}
    if (root / "data_aishell").is_dir():
        trans = root / "data_aishell" / "transcript" / "aishell_transcript_v0.8.txt"
        texts = dict(line.split(maxsplit=1) for line in trans.read_text(encoding="utf-8").splitlines())
        for wav in (root / "data_aishell" / "wav").rglob("*.wav"):
            out[wav.stem] = (wav.parts[-3], texts[wav.stem])
        return out
    for trans in root.rglob("*.trans.txt"):
        subset = trans.relative_to(root).parts[0]
        for line in trans.read_text(encoding="utf-8").splitlines():
            uid, text = line.split(maxsplit=1)
            out[uid] = (subset, text)
    return out
