"""The chat prompt, built at the token level; ONE builder shared by training and decoding.

A prompt is

    system_prefix + user_prefix + user_content{speech} + user_suffix + assistant_prefix [+ text + assistant_suffix]

where ``{speech}`` in ``user_content`` expands to ``speech_group`` repeated once per speech
encoder (MoSE). The decode prompt stops after ``assistant_prefix``; training appends the transcript
and ``assistant_suffix``. Labels cover only the transcript tokens and ``assistant_suffix``.

The "speechllm" format reproduces zhu-han/SpeechLLM (``src/train.py:preprocess`` and
``src/decode.py``): the recipe renders its own Jinja template (no system message) and tokenises it;
rendering the same string and tokenising the pieces gives identical ids, e.g. for the golden Qwen2
tokenizer the decode prompt is ``[513, 365, 198, 518, 515, 519, 514, 198, 513, 362, 198]``. We do
not call ``tokenizer.apply_chat_template`` (transformers 5 returns a dict from it, and the model's
own template would add a system message).

Speech placeholders are tokenizer special tokens (:data:`SPECIAL_TOKENS`, added in SpeechLLM's
order so ids match its checkpoints).
"""
from __future__ import annotations

import random
import re
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

IGNORE_INDEX = -100

SPEECH_TOKEN = "<speech>"
START_TEXT_TOKEN = "<start_text>"
END_TEXT_TOKEN = "<end_text>"
START_SPEECH_TOKEN = "<start_speech>"
END_SPEECH_TOKEN = "<end_speech>"
# Order matters: added in this order, so with Qwen2-Instruct <speech> = len(tokenizer), as in the
# SpeechLLM (and FireRedASR-LLM) checkpoints.
SPECIAL_TOKENS = (SPEECH_TOKEN, START_TEXT_TOKEN, END_TEXT_TOKEN, START_SPEECH_TOKEN, END_SPEECH_TOKEN)
# Rows of SpeechLLM's ``prompt_embedding`` table (see llmasr.model).
PROMPT_EMBEDDING_TOKENS = (START_TEXT_TOKEN, END_TEXT_TOKEN, START_SPEECH_TOKEN, END_SPEECH_TOKEN)


def _remove_spaces(text: str) -> str:
    # icefall whisper_llm_zh: "".join(text.split()) - every kind of whitespace goes
    return "".join(text.split())


_FIRERED_PUNC = re.compile(r"[，。？！,.!?《》（）·“”、\\/]")
_CJK = re.compile(r"([\u3400-\u4dbf\u4e00-\u9fff])")


def firered_clean_text(text: str) -> str:
    """FireRedASR-LLM's transcript clean-up (its ``clean_text``): drop punctuation, no spaces around
    Chinese characters, single spaces between English words, lower-case."""
    text = re.sub(r"\s+", " ", _FIRERED_PUNC.sub("", text))
    return "".join(p for p in _CJK.split(text.strip()) if p.strip()).strip().lower()


TEXT_TRANSFORMS: Dict[str, Callable[[str], str]] = {
    "none": lambda text: text,
    "lower": str.lower,
    "remove_spaces": _remove_spaces,
    "firered_clean": firered_clean_text,
}


@dataclass(frozen=True)
class PromptFormat:
    name: str
    system_prefix: str = ""  # whole system turn incl. its end marker, "" = no system message
    user_prefix: str = "<|im_start|>user\n"
    user_content: str = "{speech}"  # "{speech}" -> speech_group * number of encoders
    speech_group: str = f"{START_SPEECH_TOKEN}{SPEECH_TOKEN}{END_SPEECH_TOKEN}"
    user_suffix: str = "<|im_end|>\n"
    assistant_prefix: str = "<|im_start|>assistant\n"
    assistant_suffix: str = "<|im_end|>"  # appended to the transcript in training, labelled
    eos_token: str = "<|im_end|>"  # generation stops here
    pad_token: str = "<|endoftext|>"  # left padding of prompts, generate()'s pad_token_id
    bos_token: str = "<|im_start|>"  # generate()'s bos_token_id (SpeechLLM sets it; unused)
    speech_token: str = SPEECH_TOKEN
    # Normalisation of the transcript, applied to training targets (build_prompts) and to the
    # references at decode time, so both see the same text: a name from TEXT_TRANSFORMS.
    text_transform: str = "none"
    # How the recipe behind this format scores its decodes, so that src/decode.py reproduces its
    # numbers by default (--scoring / --normalize override): the metric ("wer": whitespace-separated
    # words, "cer": characters) and llmasr.scoring's normalisation ("none": the recipe's raw tokens,
    # every character counting for CER). None: not pinned (WER, llmasr.scoring's default).
    score_metric: Optional[str] = None
    score_normalize: Optional[str] = None

    def __post_init__(self):
        if self.text_transform not in TEXT_TRANSFORMS:
            raise ValueError(
                f"prompt format {self.name!r}: unknown text_transform {self.text_transform!r}; "
                f"known: {', '.join(sorted(TEXT_TRANSFORMS))}"
            )

    def transform_text(self, text: str) -> str:
        """The transcript as this format trains on it (and scores it)."""
        return TEXT_TRANSFORMS[self.text_transform](text)

    def prompt_text(self, num_speech_groups: int) -> str:
        """The decode prompt as a string (the part before the transcript)."""
        if num_speech_groups < 1:
            raise ValueError(f"a prompt needs at least one speech group, got {num_speech_groups}")
        user = self.user_content.format(speech=self.speech_group * num_speech_groups)
        return self.system_prefix + self.user_prefix + user + self.user_suffix + self.assistant_prefix


_FORMATS: Dict[str, PromptFormat] = {}


def register_prompt_format(fmt: PromptFormat) -> PromptFormat:
    if fmt.name in _FORMATS and _FORMATS[fmt.name] != fmt:
        raise ValueError(f"prompt format {fmt.name!r} registered twice with different content")
    _FORMATS[fmt.name] = fmt
    return fmt


def get_prompt_format(fmt: Union[str, PromptFormat]) -> PromptFormat:
    if isinstance(fmt, PromptFormat):
        return fmt
    if fmt not in _FORMATS:
        raise ValueError(f"unknown --prompt-format {fmt!r}; known formats: {', '.join(sorted(_FORMATS))}")
    return _FORMATS[fmt]


def available_prompt_formats() -> List[str]:
    return sorted(_FORMATS)


# zhu-han/SpeechLLM: no system message, <start_speech><speech><end_speech> per encoder; its
# datamodule lower-cases every supervision text (training and the decode references). Its decode
# scores raw WER: hyp.split() against the lower-cased reference words.
register_prompt_format(PromptFormat(name="speechllm", text_transform="lower", score_metric="wer",
                                    score_normalize="none"))

# ---------------------------------------------------------------------------------------------
# Other recipes register their formats here (FireRedASR-LLM, icefall whisper_llm_zh), e.g.
#   register_prompt_format(PromptFormat(name="firered", speech_group=SPEECH_TOKEN,
#                                       user_content="{speech}请转写音频为文字"))
# ---------------------------------------------------------------------------------------------

# FireRedASR-LLM (FireRedTeam/FireRedASR ``LlmTokenizerWrapper.preprocess_texts``): its own template,
# no system message, one <speech> token followed by the instruction; training appends the cleaned
# transcript (firered_clean_text, also applied to the decode references) and <|im_end|> (no trailing
# newline).
register_prompt_format(PromptFormat(name="firered", speech_group=SPEECH_TOKEN, user_content="{speech}请转写音频为文字",
                                    text_transform="firered_clean"))

# icefall egs/speech_llm/ASR_LLM/whisper_llm_zh (train.py/decode.py ``preprocess``): its own Jinja
# template, no system message; user turn "<speech>请转写音频为文字"; training target = transcript with
# spaces removed + <|im_end|> (no trailing newline), everything up to "assistant\n" and the padding
# masked; decode prompt ends with "<|im_start|>assistant\n"; pad <|endoftext|>, bos <|im_start|>,
# eos <|im_end|>. Same token layout as "firered"; its transcripts (and CER references) have every
# space removed. Its decode scores CER over list(hyp): every character of the hypothesis counts,
# spaces and punctuation included (store_transcripts(char_level=True), write_error_stats(compute_CER=True)).
register_prompt_format(
    PromptFormat(name="whisper_llm_zh", speech_group=SPEECH_TOKEN, user_content="{speech}请转写音频为文字",
                 text_transform="remove_spaces", score_metric="cer", score_normalize="none")
)


# ---------------------------------------------------------------------------------------------
# Tokenizer side
# ---------------------------------------------------------------------------------------------


def add_speech_tokens(tokenizer) -> Dict[str, int]:
    """Add :data:`SPECIAL_TOKENS` as additional special tokens (as SpeechLLM does) and return
    ``{token: id}``. Idempotent. The LLM embedding is not touched here (see llmasr.llm)."""
    missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    return {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}


@dataclass(frozen=True)
class PromptIds:
    """Token ids of a format resolved against a tokenizer."""

    pad: int
    eos: int
    bos: Optional[int]
    speech: int
    prompt_embedding: Tuple[int, ...]  # ids replaced by prompt_embedding rows 0..3 (if present)
    suffix: Tuple[int, ...]  # tokens of assistant_suffix


def _token_id(tokenizer, token: str, what: str, required: bool = True) -> Optional[int]:
    vocab = tokenizer.get_vocab()
    if token not in vocab:
        if not required:
            return None
        raise ValueError(
            f"the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no {what} token {token!r}; "
            "choose a --prompt-format that matches this LLM's chat format"
        )
    return vocab[token]


# Per-tokenizer caches (weak: they go away with the tokenizer).
_IDS_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_PREFIX_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def resolve_prompt_ids(tokenizer, fmt: Union[str, PromptFormat]) -> PromptIds:
    return _resolve(tokenizer, get_prompt_format(fmt))[0]


def _resolve(tokenizer, fmt: PromptFormat) -> Tuple[PromptIds, frozenset]:
    # get_vocab() builds a dict of the whole vocabulary (150k entries for Qwen2): once per
    # (tokenizer, format, tokenizer size), not once per batch.
    cache = _IDS_CACHE.setdefault(tokenizer, {})
    key = (fmt, len(tokenizer))
    if key not in cache:
        cache[key] = (_resolve_uncached(tokenizer, fmt), frozenset(_special_ids(tokenizer)))
    return cache[key]


def _resolve_uncached(tokenizer, fmt: PromptFormat) -> PromptIds:
    return PromptIds(
        pad=_token_id(tokenizer, fmt.pad_token, "pad"),
        eos=_token_id(tokenizer, fmt.eos_token, "end-of-turn"),
        bos=_token_id(tokenizer, fmt.bos_token, "bos", required=False),
        speech=_token_id(tokenizer, fmt.speech_token, "speech placeholder (call add_speech_tokens first)"),
        prompt_embedding=tuple(
            -1 if t not in tokenizer.get_vocab() else tokenizer.convert_tokens_to_ids(t) for t in PROMPT_EMBEDDING_TOKENS
        ),
        suffix=tuple(_encode(tokenizer, fmt.assistant_suffix)),
    )


def _encode(tokenizer, text: str) -> List[int]:
    # add_special_tokens=False: no BOS/EOS from the tokenizer; chat markers are in the text.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])




def prompt_prefix_ids(tokenizer, fmt: Union[str, PromptFormat], num_speech_groups: int = 1) -> List[int]:
    """Token ids of the decode prompt (ends with the assistant header)."""
    fmt = get_prompt_format(fmt)
    # the prefix is the same for every utterance: tokenise it once
    cache = _PREFIX_CACHE.setdefault(tokenizer, {})
    key = (fmt, num_speech_groups, len(tokenizer))
    if key not in cache:
        cache[key] = _encode(tokenizer, fmt.prompt_text(num_speech_groups))
    return list(cache[key])


def transcript_ids(tokenizer, fmt: Union[str, PromptFormat], texts: Sequence[str]) -> List[List[int]]:
    """The transcripts' token ids exactly as training labels them: normalised with the format's
    ``text_transform``, tokenised without special tokens (what :func:`build_prompts` appends after
    the prompt, and what the projector alignment in llmasr.aux_ctc spells)."""
    fmt = get_prompt_format(fmt)
    texts = [fmt.transform_text(t) for t in texts]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []


def build_prompts(
    tokenizer,
    fmt: Union[str, PromptFormat],
    texts: Optional[Sequence[str]] = None,
    num_speech_groups: Union[int, Sequence[int]] = 1,
    batch_size: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Token ids for a batch of prompts, left-padded with the format's pad token.

    Args:
        texts: transcripts (training; normalised with the format's ``text_transform`` here) or None (decoding: prompts end with the assistant header).
        num_speech_groups: speech groups per prompt, one int for all or one per utterance (MoSE
            training drops groups per utterance).
        batch_size: number of prompts when ``texts`` is None (default: len(num_speech_groups) or 1).

    Returns:
        input_ids (B, P) int64, attention_mask (B, P) bool (False on padding),
        labels (B, P) int64 with IGNORE_INDEX everywhere except transcript tokens and the
        assistant suffix (None when ``texts`` is None).
    """
    fmt = get_prompt_format(fmt)
    ids, special = _resolve(tokenizer, fmt)
    if texts is not None:
        n = len(texts)
    elif batch_size is not None:
        n = batch_size
    elif not isinstance(num_speech_groups, int):
        n = len(num_speech_groups)
    else:
        n = 1
    groups = [num_speech_groups] * n if isinstance(num_speech_groups, int) else list(num_speech_groups)
    if len(groups) != n:
        raise ValueError(f"num_speech_groups has {len(groups)} entries for {n} prompts")
    if n == 0:
        raise ValueError("build_prompts called with an empty batch")

    prefixes = [prompt_prefix_ids(tokenizer, fmt, g) for g in groups]
    if texts is None:
        seqs = prefixes
        num_labelled = [0] * n
    else:
        seqs, num_labelled = [], []
        for text, prefix, tids in zip(texts, prefixes, transcript_ids(tokenizer, fmt, texts)):
            bad = [t for t in tids if t in special]
            if bad:
                raise ValueError(
                    f"transcript {fmt.transform_text(text)!r} contains special tokens "
                    f"{tokenizer.convert_ids_to_tokens(bad)}; "
                    "remove them from the supervision text"
                )
            target = list(tids) + list(ids.suffix)
            seqs.append(prefix + target)
            num_labelled.append(len(target))

    max_len = max(len(s) for s in seqs)
    pads = [max_len - len(s) for s in seqs]
    input_ids = torch.tensor([[ids.pad] * p + s for p, s in zip(pads, seqs)], dtype=torch.long)
    attention_mask = torch.tensor([[False] * p + [True] * len(s) for p, s in zip(pads, seqs)], dtype=torch.bool)
    labels = None
    if texts is not None:
        # label only the last num_labelled positions of each row (transcript + suffix)
        positions = torch.arange(max_len).expand(n, max_len)
        labelled = positions >= (max_len - torch.tensor(num_labelled)).unsqueeze(1)
        labels = torch.where(labelled, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return input_ids, attention_mask, labels


def _special_ids(tokenizer) -> set:
    """Ids of every special token (chat markers, pad, speech placeholders)."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special)
    return ids


def sample_speech_groups(num_encoders: int, batch_size: int, rng: Optional[random.Random] = None) -> List[int]:
    """MoSE training (zhu-han/SpeechLLM ``train_mose.py``): each of the ``num_encoders`` speech
    groups is kept with probability 1 - 1/num_encoders; if all are dropped, all are kept."""
    rng = rng or random
    out = []
    for _ in range(batch_size):
        kept = sum(1 for _ in range(num_encoders) if rng.random() > 1 / num_encoders)
        out.append(kept if kept > 0 else num_encoders)
    return out


__all__ = [
    "IGNORE_INDEX",
    "SPECIAL_TOKENS",
    "PROMPT_EMBEDDING_TOKENS",
    "PromptFormat",
    "PromptIds",
    "TEXT_TRANSFORMS",
    "firered_clean_text",
    "register_prompt_format",
    "get_prompt_format",
    "available_prompt_formats",
    "add_speech_tokens",
    "resolve_prompt_ids",
    "prompt_prefix_ids",
    "build_prompts",
    "sample_speech_groups",
]
