"""Batched generation (greedy / beam search with KV cache via HF ``generate``).

Defaults reproduce zhu-han/SpeechLLM's ``model.decode``: ``max_new_tokens=200``, no sampling,
``repetition_penalty=1.0``, ``length_penalty=1.0``, stop only at the format's end-of-turn token
(``<|im_end|>``; explicit ids override the LLM's ``generation_config.json``), pad finished rows
with the pad token. Unlike SpeechLLM, ``beam_size`` is honoured.

Optional (off by default, so golden runs are unchanged):

- ``max_new_tokens_per_speech_token``: per-utterance cap ``ceil(r * speech positions)`` (an
  utterance with few speech tokens cannot run on for ``max_new_tokens``);
- ``repetition_guard``: stop a row once its last tokens are one pattern (period 1..8 tokens)
  repeated this many times - hallucination loops then cost a few steps instead of the limit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
)

from llmasr.prompt import PromptIds


@dataclass
class GenerationOptions:
    beam_size: int = 1
    max_new_tokens: int = 200
    max_new_tokens_per_speech_token: Optional[float] = None
    repetition_guard: int = 0  # 0 = off; else minimum number of repeats that stops a row
    repetition_guard_max_period: int = 8
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)  # passed to generate() as is


class PerRowLimit(StoppingCriteria):
    """Utterance i is done after ``limits[i]`` new tokens (transformers' MaxLengthCriteria has one limit
    for the whole batch)."""

    def __init__(self, limits: torch.Tensor):
        self.limits = limits

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        # Rows are utterance-major: 1 (greedy), num_beams, or the 2 * num_beams candidates that
        # transformers' beam search checks per utterance. With inputs_embeds only, input_ids holds
        # just the generated tokens.
        limits = self.limits.to(input_ids.device).repeat_interleave(input_ids.shape[0] // self.limits.numel())
        return torch.full_like(limits, input_ids.shape[1]) >= limits


class RepetitionGuard(StoppingCriteria):
    """A row is done when its tail is one pattern of period p <= max_period repeated >= repeats times
    (transformers has no such criterion; NoRepeatNGramLogitsProcessor forbids n-grams instead of stopping)."""

    def __init__(self, repeats: int, max_period: int):
        self.repeats = repeats
        self.max_period = max_period

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        n, t = input_ids.shape
        done = torch.zeros(n, dtype=torch.bool, device=input_ids.device)
        for period in range(1, self.max_period + 1):
            span = period * self.repeats
            if span > t:
                break
            tail = input_ids[:, t - span:]
            done |= (tail[:, period:] == tail[:, :-period]).all(1)
        return done


def row_token_limits(opts: GenerationOptions, num_speech_tokens: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Each row's cap on new tokens with ``max_new_tokens_per_speech_token`` (``ceil(r * speech
    positions)``, within 1..max_new_tokens), or None when every row has ``max_new_tokens``."""
    if opts.max_new_tokens_per_speech_token is None:
        return None
    if num_speech_tokens is None:
        raise ValueError("max_new_tokens_per_speech_token needs the number of speech tokens")
    limits = torch.ceil(num_speech_tokens.float() * opts.max_new_tokens_per_speech_token).long()
    return limits.clamp(1, int(opts.max_new_tokens))


def generate(
    llm,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_ids: PromptIds,
    opts: Optional[GenerationOptions] = None,
    num_speech_tokens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Generate from merged embeddings (left-padded, mask False on padding). Returns (B, N) new ids."""
    opts = opts or GenerationOptions()
    if opts.beam_size < 1:
        raise ValueError(f"beam size must be >= 1, got {opts.beam_size}")
    max_new = int(opts.max_new_tokens)
    criteria = []
    limits = row_token_limits(opts, num_speech_tokens)
    if limits is not None:
        max_new = int(limits.max())
        criteria.append(PerRowLimit(limits))
    if opts.repetition_guard > 0:
        criteria.append(RepetitionGuard(opts.repetition_guard, opts.repetition_guard_max_period))
    kwargs = dict(
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask.long(),
        max_new_tokens=max_new,
        num_beams=opts.beam_size,
        do_sample=False,
        min_length=1,
        top_p=1.0,
        # 1.0 also overrides a generation_config.json penalty; a real one is applied below
        repetition_penalty=1.0,
        length_penalty=opts.length_penalty,
        temperature=1.0,
        bos_token_id=prompt_ids.bos,
        eos_token_id=prompt_ids.eos,
        pad_token_id=prompt_ids.pad,
    )
    if opts.no_repeat_ngram_size:
        kwargs["no_repeat_ngram_size"] = opts.no_repeat_ngram_size
    if criteria:
        kwargs["stopping_criteria"] = StoppingCriteriaList(criteria)
    extra = dict(opts.extra)
    processors = LogitsProcessorList()
    if opts.repetition_penalty != 1.0:
        if not opts.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {opts.repetition_penalty}")
        # The processor itself, not generate(repetition_penalty=): with inputs_embeds and an attention
        # mask, transformers 5's generate sets the processor's prompt_ignore_length to each row's left
        # padding, so it would skip that many GENERATED tokens and a batched utterance would be penalised
        # differently from the same utterance alone. Built directly, it sees every generated id (with
        # inputs_embeds only, generate tracks just those), as the released FireRedASR code with 4.x.
        processors.append(RepetitionPenaltyLogitsProcessor(float(opts.repetition_penalty)))
    processors.extend(extra.pop("logits_processor", None) or [])  # after the penalty (a CTC scorer reads it)
    if processors:
        kwargs["logits_processor"] = processors
    kwargs.update(extra)
    out = llm.generate(**kwargs)
    if not isinstance(out, torch.Tensor):  # return_dict_in_generate in extra
        out = out.sequences
    return out


__all__ = ["GenerationOptions", "PerRowLimit", "RepetitionGuard", "generate", "row_token_limits"]
