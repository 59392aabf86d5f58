"""Everyday training text sampled from the demo's LLM (llmasr.demo.llm_text) and its use in the corpus."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import DEMO_MODEL_PACKAGES, require_binary, require_distribution
from tests.test_prepare import read_trans


def _ngrams(text: str, n: int):
    w = text.lower().split()
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def test_examples_are_not_test_sentences():
    """The few-shot examples are not held-out sentences, nor share 4 words in a row with one."""
    from llmasr.demo.espeak import EN_OPEN_DOMAIN
    from llmasr.demo.llm_text import EXAMPLES, clean_generated_line

    test4 = set().union(*(_ngrams(t, 4) for t in EN_OPEN_DOMAIN))
    for e in EXAMPLES:
        assert clean_generated_line(e) == e.lower(), e  # each example is itself a valid transcript
        assert not _ngrams(e, 4) & test4, e
    assert len(set(EXAMPLES)) == len(EXAMPLES) >= 20


@pytest.mark.parametrize("line, expected", [
    ("- The bus is running on time.", "the bus is running on time"),
    (" I'm going to play soccer with everyone.", "i'm going to play soccer with everyone"),
    (" You\u2019ll probably ask where I\u2019m from.", "you'll probably ask where i'm from"),
    ("Well, we could go by boat!", "well we could go by boat"),
    ("My favorite color is gray, like our neighbor's car.", "my favourite colour is grey like our neighbour's car"),
    ("The game was cancelled because of the COVID-19 pandemic.", None),  # digits, symbol
    ("Call the FBI right now please.", None),  # an acronym espeak-ng spells
    ("Mr Brown is waiting for you downstairs.", None),  # an abbreviation it expands
    ("It is late. We should go home now.", None),  # two sentences
    ("Go home now.", None),  # too short
    ("I said \"hello\" to the new teacher.", None),  # quotes
    ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen", None),
])
def test_clean_generated_line(line, expected):
    from llmasr.demo.llm_text import clean_generated_line

    assert clean_generated_line(line) == expected


@pytest.mark.timeout(120)
def test_continue_shared_prompt_equals_generating_each_row():
    """The shared prompt cache (computed once, repeated per row) gives the same tokens as generating
    every row from the whole prompt: greedy, on a tiny random Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmasr.demo.llm_text import continue_shared_prompt

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    prompt = torch.randint(3, 97, (1, 11))
    kw = dict(do_sample=False, max_new_tokens=9, min_new_tokens=9, pad_token_id=0)
    with torch.inference_mode():
        shared = continue_shared_prompt(model, prompt, 3, **kw)
        full = model.generate(input_ids=prompt.expand(3, -1), attention_mask=torch.ones(3, 11, dtype=torch.long), **kw)
    assert shared.shape == (3, 9)
    assert torch.equal(shared, full[:, 11:])


@pytest.fixture(scope="module")
def smollm2_dir():
    require_distribution(*DEMO_MODEL_PACKAGES)
    from llmasr.demo import models as demo_models

    torch.set_num_threads(2)
    return demo_models.prepare_demo_models(demo_models.default_models_dir())[1]


@pytest.mark.timeout(600)
def test_everyday_sentences_from_smollm2(smollm2_dir):
    """Real SmolLM2-135M-Instruct continues the few-shot list: distinct, speakable sentences, none
    excluded, the same for the same seed, and the caller's torch RNG untouched."""
    from llmasr.demo.espeak import EN_OPEN_DOMAIN
    from llmasr.demo.llm_text import EXAMPLES, clean_generated_line, everyday_sentences

    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = everyday_sentences(smollm2_dir, 24, seed=3, exclude=EN_OPEN_DOMAIN, batch_size=8)
    assert torch.equal(torch.rand(3), expected_next)
    assert len(a) == len(set(a)) == 24
    assert all(clean_generated_line(s) == s for s in a)
    assert not set(a) & {e.lower() for e in EXAMPLES} and not set(a) & set(EN_OPEN_DOMAIN)
    # everyday English, not word salad: the commonest function words occur throughout
    words = [w for s in a for w in s.split()]
    assert sum(w in {"the", "a", "i", "to", "is", "you", "my", "we", "and", "of", "in"} for w in words) > 0.15 * len(words)
    assert everyday_sentences(smollm2_dir, 24, seed=3, exclude=EN_OPEN_DOMAIN, batch_size=8) == a
    b = everyday_sentences(smollm2_dir, 8, seed=4, exclude=a, batch_size=8)
    assert not set(b) & set(a)


def test_corpus_mixes_llm_text_and_caches_it(tmp_path, monkeypatch):
    """llm_fraction: that share of train/dev sentences comes from the LLM sampler (called once, its
    sentences kept in the download dir and reused), with the open-domain test sentences banned;
    without llm_path it is refused before any work."""
    require_binary("espeak-ng")
    require_binary("sox")
    from llmasr.demo import llm_text
    from llmasr.demo.espeak import EN_OPEN_DOMAIN, make_espeak_corpus

    calls = []
    sampled = [f"we talked about {w} all evening" for w in ("music", "football", "dinner", "holidays", "work", "cars")]

    def fake_sampler(llm_path, count, seed=0, exclude=()):
        calls.append((llm_path, count, seed, set(exclude)))
        return sampled[:count]

    monkeypatch.setattr(llm_text, "everyday_sentences", fake_sampler)
    kw = dict(num_train=6, num_train_extra=4, num_test=2, num_dev=0, num_test_other=0, seed=7,
              utts_per_speaker=2, num_jobs=2, common_fraction=0.2, llm_fraction=0.5, llm_path="/models/llm")
    root = make_espeak_corpus(tmp_path / "dl", "en", **kw)
    assert len(calls) == 1 and calls[0][:3] == ("/models/llm", 3 + 2, 7)
    assert set(EN_OPEN_DOMAIN) <= calls[0][3]  # the open-domain test set cannot lose a sentence
    texts = {subset: [t.lower() for s, t in trans if s == subset]
             for trans in [list(read_trans(root).values())] for subset in ("train-clean-100", "train-clean-360")}
    llm = {t for t in texts["train-clean-100"] + texts["train-clean-360"] if t.startswith("we talked about")}
    assert len(llm) == 5 and sum(t in llm for t in texts["train-clean-100"]) == 3
    cache = tmp_path / "dl" / "llm_text-7.txt"
    key_line = f"# {llm_text.sampler_cache_key('/models/llm', 7)}\n"
    assert cache.read_text() == key_line + "".join(s + "\n" for s in sampled[:5])
    assert read_trans(make_espeak_corpus(tmp_path / "dl", "en", **kw)) == read_trans(root)
    assert len(calls) == 1  # the cache answered
    with pytest.raises(ValueError, match="llm_path"):
        make_espeak_corpus(tmp_path / "x", "en", num_train=2, num_test=1, llm_fraction=0.5)
    with pytest.raises(ValueError, match="sum <= 1"):
        make_espeak_corpus(tmp_path / "x", "en", num_train=2, num_test=1, llm_fraction=0.5, common_fraction=0.6,
                           llm_path="/models/llm")


def test_llm_text_cache_is_reused_only_for_the_same_settings(tmp_path, monkeypatch):
    """The cache file's key line covers the prompt material, the seed and the model files: a cache
    from other settings, or from before the key existed, is sampled again, never silently reused."""
    from llmasr.demo import llm_text

    calls = []

    def fake_sampler(llm_path, count, seed=0, exclude=()):
        calls.append(seed)
        return [f"sentence {seed} number {i} is here" for i in range(count)]

    monkeypatch.setattr(llm_text, "everyday_sentences", fake_sampler)
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"x" * 10)
    cache = tmp_path / "llm_text-1.txt"
    first = llm_text.cached_everyday_sentences(cache, model, 3, seed=1)
    assert llm_text.cached_everyday_sentences(cache, model, 2, seed=1) == first[:2] and calls == [1]
    # other model weights (same file name, other size) -> other key -> sampled again
    (model / "model.safetensors").write_bytes(b"x" * 11)
    llm_text.cached_everyday_sentences(cache, model, 3, seed=1)
    assert calls == [1, 1]
    # other prompt material
    monkeypatch.setattr(llm_text, "EXAMPLES", llm_text.EXAMPLES[:-1])
    llm_text.cached_everyday_sentences(cache, model, 3, seed=1)
    assert calls == [1, 1, 1]
    # a cache written before the key line existed (sentences only)
    cache.write_text("".join(s + "\n" for s in first))
    llm_text.cached_everyday_sentences(cache, model, 3, seed=1)
    assert calls == [1, 1, 1, 1] and cache.read_text().startswith("# ")
    # the seed is part of the key even for the same file
    key = llm_text.sampler_cache_key(model, 1)
    assert llm_text.sampler_cache_key(model, 2) != key
    assert llm_text.sampler_cache_key(model, 1) == key


def test_llm_text_cache_key_covers_the_sampling_defaults(tmp_path, monkeypatch):
    """The cache samples with everyday_sentences' defaults: changing one (here the temperature)
    must change the key, or a cache sampled at the old temperature would be reused."""
    from llmasr.demo import llm_text

    key = llm_text.sampler_cache_key(tmp_path, 0)
    defaults = llm_text.everyday_sentences.__defaults__
    names = [n for n, p in __import__("inspect").signature(llm_text.everyday_sentences).parameters.items()
             if p.default is not p.empty]
    hotter = tuple(0.5 if n == "temperature" else d for n, d in zip(names, defaults))
    assert hotter != defaults
    monkeypatch.setattr(llm_text.everyday_sentences, "__defaults__", hotter)
    assert llm_text.sampler_cache_key(tmp_path, 0) != key
