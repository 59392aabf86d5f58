"""Everyday English training text sampled from the demo's own LLM (SmolLM2-135M-Instruct).

The demo's other text sources are templates, encyclopaedic Markov text and random word
sequences: none of them sounds like what people say ("could you pass me the salt"), which is
what the open-domain test set is. A small LLM writes that register well when it continues a
list of a few hand-written examples (a few-shot prompt, no chat template). The examples below are
written for this purpose and are none of the held-out test sentences (``espeak.EN_OPEN_DOMAIN``;
a test checks it); every generated sentence that equals a test sentence is dropped too.

Sampling is seeded (``torch.random.fork_rng``: the caller's RNG state is untouched), so a seed gives
the same sentences on a given machine; thread counts or CPUs that change the logits' last bits can
change a sample. :func:`cached_everyday_sentences` keeps them in a file so a re-run reuses them;
the file's first line is a key of everything that decides the sentences (this module's prompt
material and clean-up, the seed, the model's files), so a cache made by other settings is sampled
again rather than silently reused.
"""
from __future__ import annotations

import hashlib
import inspect
import logging
import random
import re
import time
from pathlib import Path
from typing import Collection, List, Optional, Sequence

from llmasr.io import atomic_write_text

logger = logging.getLogger(__name__)

# Few-shot examples: everyday sentences of several topics and shapes (questions, requests,
# statements). Not test sentences; the generated lines are filtered against those anyway.
EXAMPLES = (
    "I left my umbrella at the office yesterday",
    "Do you want to walk to the shop with me",
    "We need to buy eggs and some fresh fruit",
    "My cousin is learning to drive this year",
    "It was too cold to go swimming",
    "He never remembers where he parked the car",
    "Please put the dirty dishes in the sink",
    "The train was late because of the snow",
    "Our neighbours have a very noisy dog",
    "Have you seen my glasses anywhere",
    "The kettle is still warm if you want some tea",
    "She always takes the stairs instead of the lift",
    "I will pick you up from the station at six",
    "The new cafe around the corner is very busy",
    "Can I borrow your pen for a moment",
    "We usually have pasta on Friday evenings",
    "The lights went out during the storm last night",
    "He is saving money for a new bicycle",
    "Why is the front door wide open",
    "They invited all their friends to the wedding",
)
# Each batch's prompt names a topic: without one, a third of the samples were about going to a
# party tomorrow (measured: 417 word types in 240 sentences without topics, 720 in 493 with).
TOPICS = (
    "food and cooking", "the weather", "travel and holidays", "school", "work and the office", "shopping",
    "health and the doctor", "family", "sport", "the garden", "music", "the house", "money", "friends",
    "animals and pets", "the city", "cars and roads", "clothes", "books and films", "the morning",
    "the evening", "the weekend", "a party", "the kitchen", "phones and computers", "the beach", "feelings",
    "the countryside", "restaurants", "trains and buses",
)
HEADER = "Simple sentences people say every day about {topic}:\n"
EXAMPLES_PER_PROMPT = 5

# SmolLM2 writes American spelling; every test set (templates, hand-written sentences) is British,
# so a word would otherwise be trained in one spelling and scored in the other ("favourite" was
# decoded as "favorite" after the LLM text brought 15 of those into training).
_BRITISH = {
    "favorite": "favourite", "favorites": "favourites", "color": "colour", "colors": "colours",
    "colorful": "colourful", "neighbor": "neighbour", "neighbors": "neighbours", "neighborhood": "neighbourhood",
    "center": "centre", "centers": "centres", "theater": "theatre", "theaters": "theatres", "gray": "grey",
    "flavor": "flavour", "flavors": "flavours", "honor": "honour", "humor": "humour", "behavior": "behaviour",
    "harbor": "harbour", "labor": "labour", "canceled": "cancelled", "traveled": "travelled",
    "traveling": "travelling", "jewelry": "jewellery", "pajamas": "pyjamas",
    "practicing": "practising", "kilometer": "kilometre", "kilometers": "kilometres",
}

# Words of at most two letters that espeak-ng reads as words (the others in frequency lists are
# initials and abbreviations it spells or expands: "mr", "pm", "vs", "de"). llmasr.demo.espeak uses
# them too (it imports this module, not the other way round).
SHORT_WORDS = frozenset("a i am an as at be by do go he if in is it me my no of oh on or so to up us we".split())

# Words espeak-ng reads as written (letters, one apostrophe suffix); short words only when they are words.
_WORD = re.compile(r"^[a-z]+(?:'[a-z]+)?$")


def clean_generated_line(line: str, min_words: int = 4, max_words: int = 14) -> Optional[str]:
    """One generated list item as a transcript (lower case, no punctuation), or None when espeak-ng
    would not read it as written (digits, symbols, acronyms, abbreviations) or its length is off."""
    line = line.strip().lstrip("-*").strip().replace("\u2019", "'")
    if not line or re.search(r"[^A-Za-z' ,.!?]", line) or re.search(r"[.!?].", line.rstrip(".!? ")):
        return None  # symbols or digits, or more than one sentence
    words = line.replace(",", " ").rstrip(".!? ").split()
    if not (min_words <= len(words) <= max_words):
        return None
    out = []
    for w in words:
        if len(w) > 1 and w.isupper():
            return None  # an acronym: espeak-ng spells it
        w = w.lower()
        base = w.split("'")[0]
        if not _WORD.match(w) or (len(base) <= 2 and base not in SHORT_WORDS and "'" not in w):
            return None
        out.append(_BRITISH.get(base, base) + w[len(base):])  # (keeps a "'s")
    return " ".join(out)


def _normalised(text: str) -> str:
    """The form sentences are compared in: lower case, single spaces."""
    return " ".join(text.lower().split())


def continue_shared_prompt(model, prompt_ids, num_rows: int, **generate_kwargs):
    """``num_rows`` continuations of one prompt (``prompt_ids``: 1 x T), the generated tokens only
    (num_rows x new). The prompt's keys/values are computed once (all but its last token, which
    ``generate`` feeds) and repeated for the rows, instead of once per row: the prompt is ~1.5x the
    generated length, so this saves most of the work (measured 3x faster sampling)."""
    import torch

    prefix = model(prompt_ids[:, :-1], use_cache=True)
    key = "cache" if "cache" in prefix.keys() else "past_key_values"  # transformers 5.2x renamed it
    cache = prefix[key]
    cache.batch_repeat_interleave(num_rows)
    input_ids = prompt_ids.expand(num_rows, -1)
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **{key: cache},
                         **generate_kwargs)
    return out[:, prompt_ids.shape[1]:]


def everyday_sentences(llm_path, count: int, seed: int = 0, exclude: Collection[str] = (),
                       batch_size: int = 128, max_new_tokens: int = 48, temperature: float = 0.9,
                       top_p: float = 0.95) -> List[str]:
    """``count`` distinct everyday sentences (transcript form) sampled from the causal LM at
    ``llm_path`` (a local Hugging Face directory), none in ``exclude``. Each batch has one prompt,
    :data:`HEADER` with a random topic plus a random choice of :data:`EXAMPLES` as a "- " list,
    and ``batch_size`` samples continue the list for ``max_new_tokens`` tokens (a few sentences each)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if count <= 0:
        return []
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(str(llm_path))
    model = AutoModelForCausalLM.from_pretrained(str(llm_path), dtype=torch.float32).eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rng = random.Random(f"llmasr-llm-text-{seed}")
    banned = {_normalised(t) for t in exclude}
    banned.update(_normalised(e) for e in EXAMPLES)  # a copied example is not new text
    found: dict = {}
    rounds = 0
    max_rounds = 10 + 4 * count // batch_size
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(seed)
        while len(found) < count:
            rounds += 1
            if rounds > max_rounds:
                raise RuntimeError(f"{llm_path}: only {len(found)} of {count} usable sentences after {rounds - 1} "
                                   "batches; is it an instruction-following LM?")
            prompt = (HEADER.format(topic=rng.choice(TOPICS))
                      + "".join(f"- {e}\n" for e in rng.sample(EXAMPLES, EXAMPLES_PER_PROMPT)) + "-")
            prompt_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            out = continue_shared_prompt(model, prompt_ids, batch_size, do_sample=True, temperature=temperature,
                                         top_p=top_p, max_new_tokens=max_new_tokens, pad_token_id=pad_id)
            for row in out:
                text = tokenizer.decode(row, skip_special_tokens=True)
                lines = text.split("\n")
                if text and not text.endswith("\n"):
                    lines = lines[:-1]  # the last line was cut by max_new_tokens
                for i, line in enumerate(lines):
                    if i > 0 and not line.startswith("- "):
                        break  # the list ended: what follows is something else
                    s = clean_generated_line(line)
                    if s and s not in banned:
                        found.setdefault(s, None)
            elapsed = time.time() - t0
            rate = len(found) / elapsed if found else 0.0
            eta = f"{max(count - len(found), 0) / rate:.0f} s" if rate else "?"
            logger.info(f"LLM text: {min(len(found), count)}/{count} sentences, {elapsed:.0f} s, ETA {eta}")
    logger.info(f"sampled {len(found)} everyday sentences from {llm_path} in {rounds} batches, "
                 f"{time.time() - t0:.0f} s")
    return list(found)[:count]


# Bump when the sampling or clean-up code changes what a seed produces (the key below covers the
# prompt material, the spelling map and everyday_sentences' sampling defaults by value, not the code).
SAMPLER_VERSION = 1


def sampler_cache_key(llm_path, seed: int) -> str:
    """Key of everything that decides :func:`everyday_sentences`' output for ``seed``: the sampler
    version, HEADER, EXAMPLES, TOPICS, the spelling map, the sampling defaults (batch size, tokens,
    temperature, top-p: the cache samples with them) and the model (its files' names and sizes)."""
    defaults = sorted((name, p.default) for name, p in inspect.signature(everyday_sentences).parameters.items()
                      if p.default is not p.empty and name not in ("seed", "exclude"))
    model_dir = Path(llm_path)
    files = sorted((f.name, f.stat().st_size) for f in model_dir.iterdir() if f.is_file()) if model_dir.is_dir() else []
    h = hashlib.sha256()
    for part in (SAMPLER_VERSION, HEADER, EXAMPLES, TOPICS, sorted(_BRITISH.items()), defaults, seed, files):
        h.update(repr(part).encode("utf-8") + b"\0")
    return h.hexdigest()[:16]


def cached_everyday_sentences(cache_file, llm_path, count: int, seed: int = 0,
                              exclude: Sequence[str] = ()) -> List[str]:
    """:func:`everyday_sentences`, kept in ``cache_file``: a ``# key`` line
    (:func:`sampler_cache_key`), then one sentence per line. Reused when the key matches and it holds
    at least ``count`` sentences none of which is excluded; otherwise sampled again (and logged)."""
    cache_file = Path(cache_file)
    banned = {_normalised(t) for t in exclude}
    key = sampler_cache_key(llm_path, seed)
    if cache_file.is_file():
        lines = [line for line in cache_file.read_text(encoding="utf-8").split("\n") if line]
        if not lines or lines[0] != f"# {key}":
            logger.info(f"{cache_file} was sampled with other settings (or an older version): sampling again")
        else:
            cached = lines[1:]
            if len(cached) >= count and not banned.intersection(cached[:count]):
                return cached[:count]
    sentences = everyday_sentences(llm_path, count, seed=seed, exclude=exclude)
    atomic_write_text(cache_file, f"# {key}\n" + "".join(s + "\n" for s in sentences))
    return sentences
