"""FireRedASR-LLM: Conformer encoder -> adapter (2 frames spliced, Linear-ReLU-Linear) -> Qwen2 + LoRA.

Released directory layout: ``model.pth.tar`` (adapter ``encoder_projector.linear{1,2}``, LoRA
``llm.base_model.model.*.lora_{A,B}.default.weight`` and encoder overrides ``encoder.*``),
``asr_encoder.pth.tar`` (AED package with the encoder), ``cmvn.ark`` and ``Qwen2-7B-Instruct/``.

Loading: the encoder comes from ``asr_encoder.pth.tar``; ``encoder.*`` tensors of ``model.pth.tar``
override it; the adapter is the shared :class:`llmasr.projector.Projector` (keys remapped from
``linear1/linear2``); the LLM is loaded with :func:`llmasr.llm.load_llm` (LoRA r=64, alpha=16).
Unlike the reference (``strict=False``), unknown or mis-shaped keys are errors.

Decoding (:meth:`FireRedAsrLlm.transcribe`), two modes:

* ``compat_reference_padding=True`` reproduces the released code (golden NOTES §3): the ``<speech>``
  token is replaced by ALL ``T_enc // 2`` adapter frames of the padded batch (including frames computed
  from padding, even at batch size 1), no attention mask is given to ``generate`` (every position is
  attended), and ``max_new_tokens`` is that padded adapter length.
* default: each utterance contributes its valid ``L // 2`` adapter frames, sequences are left-padded
  and the attention mask is passed; each utterance may generate at most its own valid adapter length
  (``max_new_tokens`` is the longest, longer rows are cut). Greedy results of a batch then equal those
  of each utterance decoded alone; beam search can still differ slightly at the cut.

Both call Hugging Face ``generate`` with the released options (greedy or beam search, repetition
penalty on generated tokens only because no ``input_ids`` are given, ``<|im_end|>`` as eos).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from transformers import LogitsProcessorList

from llmasr.generation import GeneratedTokensRepetitionPenalty
from llmasr.checkpoint import remap_linear12_keys
from llmasr.projector import Projector
from llmasr.prompt import IGNORE_INDEX, SPEECH_TOKEN, get_prompt_format, prompt_prefix_ids, resolve_prompt_ids

from .conformer import ConformerEncoder
from llmasr.features.firered import FireRedFeatureExtractor
from .load import CheckpointError, load_encoder, load_package, load_state_dict_checked

PROMPT_FORMAT = "firered"
_PUNC = re.compile(r"[，。？！,.!?《》（）·“”、\\/]")
_CJK = re.compile(r"([\u3400-\u4dbf\u4e00-\u9fff])")


def clean_text(text: str) -> str:
    """FireRedASR-LLM training-text normalisation: drop punctuation, no spaces around Chinese
    characters, single spaces between English words, lower-case."""
    text = re.sub(r"\s+", " ", _PUNC.sub("", text))
    return "".join(p for p in _CJK.split(text.strip()) if p.strip()).strip().lower()


def splice_speech(
    embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    speech_pos: torch.Tensor,
    speech: torch.Tensor,
    speech_lens: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    padding_side: str = "left",
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Replace the single ``<speech>`` token of each row by its ``speech_lens[i]`` speech frames.

    embeds (N, P, H) token embeddings, attention_mask (N, P) bool, speech_pos (N,) index of the
    placeholder, speech (N, S, H), speech_lens (N,). Returns compacted (N, L, H) embeddings, bool mask
    and labels (IGNORE_INDEX on speech), padded on ``padding_side``.
    """
    n, p, h = embeds.shape
    s = speech.size(1)
    device = embeds.device
    j = torch.arange(p - 1 + s, device=device)[None, :].expand(n, -1)
    sp = speech_pos[:, None]
    before, in_speech = j < sp, (j >= sp) & (j < sp + s)
    tok_idx = torch.where(before, j, j - s + 1).clamp(0, p - 1)
    sp_idx = (j - sp).clamp(0, s - 1)
    gathered_tok = embeds.gather(1, tok_idx[..., None].expand(-1, -1, h))
    gathered_sp = speech.to(embeds.dtype).gather(1, sp_idx[..., None].expand(-1, -1, h))
    full = torch.where(in_speech[..., None], gathered_sp, gathered_tok)
    keep = torch.where(in_speech, sp_idx < speech_lens[:, None], attention_mask.gather(1, tok_idx).bool())

    lengths = keep.sum(1)
    width = int(lengths.max())
    dest = keep.long().cumsum(1) - 1
    if padding_side == "left":
        dest = dest + (width - lengths)[:, None]
    rows, cols = keep.nonzero(as_tuple=True)
    out = embeds.new_zeros(n, width, h)
    out[rows, dest[rows, cols]] = full[rows, cols]
    mask = torch.zeros(n, width, dtype=torch.bool, device=device)
    mask[rows, dest[rows, cols]] = True
    out_labels = None
    if labels is not None:
        lab = torch.where(in_speech, torch.full_like(tok_idx, IGNORE_INDEX), labels.gather(1, tok_idx))
        out_labels = torch.full((n, width), IGNORE_INDEX, dtype=labels.dtype, device=device)
        out_labels[rows, dest[rows, cols]] = lab[rows, cols]
    return out, mask, out_labels


class FireRedAsrLlm(nn.Module):
    def __init__(self, encoder: ConformerEncoder, encoder_projector: Projector, llm: nn.Module, tokenizer,
                 freeze_encoder: bool = False):
        super().__init__()
        self.encoder = encoder
        self.encoder_projector = encoder_projector
        self.llm = llm
        self.tokenizer = tokenizer
        self.freeze_encoder = freeze_encoder
        self.prompt_format = get_prompt_format(PROMPT_FORMAT)
        self.ids = resolve_prompt_ids(tokenizer, self.prompt_format)
        if freeze_encoder:
            for prm in self.encoder.parameters():
                prm.requires_grad_(False)

    # -- pieces (exposed for tests and training) -------------------------------------------------
    def encode_speech(self, feats: torch.Tensor, feat_lens: torch.Tensor):
        """-> enc_out (N, T_enc, C), enc_lens, adapter_out (N, T_enc // 2, H), adapter_lens (L // 2)."""
        if self.freeze_encoder:
            with torch.no_grad():
                enc_out, enc_lens = self.encoder(feats, feat_lens)
        else:
            enc_out, enc_lens = self.encoder(feats, feat_lens)
        speech, speech_lens = self.encoder_projector(enc_out, enc_lens)
        return enc_out, enc_lens, speech, speech_lens

    def decode_prompt_ids(self, batch_size: int, device=None) -> torch.Tensor:
        ids = prompt_prefix_ids(self.tokenizer, self.prompt_format, 1)
        return torch.tensor(ids, dtype=torch.long, device=device)[None].expand(batch_size, -1)

    def merge_decode_inputs(self, speech: torch.Tensor, speech_lens: torch.Tensor, compat_reference_padding: bool):
        """Decode prompt with speech spliced in -> (inputs_embeds, attention_mask or None)."""
        n = speech.size(0)
        input_ids = self.decode_prompt_ids(n, speech.device)
        embeds = self.llm.get_input_embeddings()(input_ids)
        speech_pos = (input_ids == self.ids.speech).int().argmax(1)
        if compat_reference_padding:
            # All padded adapter frames for every row; the reference passes no attention mask.
            lens = torch.full_like(speech_lens, speech.size(1))
        else:
            lens = speech_lens
        mask = torch.ones_like(input_ids, dtype=torch.bool)
        merged, merged_mask, _ = splice_speech(embeds, mask, speech_pos, speech, lens, padding_side="left")
        return merged, (None if compat_reference_padding else merged_mask)

    # -- decoding --------------------------------------------------------------------------------
    @torch.no_grad()
    def transcribe(self, feats: torch.Tensor, feat_lens: torch.Tensor, beam_size: int = 1, decode_max_len: int = 0,
                   decode_min_len: int = 0, repetition_penalty: float = 1.0, llm_length_penalty: float = 1.0,
                   temperature: float = 1.0, compat_reference_padding: bool = False) -> torch.Tensor:
        """-> generated token ids (N, U) (new tokens only, finished rows padded with the pad id)."""
        _, _, speech, speech_lens = self.encode_speech(feats, feat_lens)
        inputs_embeds, attention_mask = self.merge_decode_inputs(speech, speech_lens, compat_reference_padding)
        if decode_max_len >= 1:
            max_new_tokens = decode_max_len
        elif compat_reference_padding:
            max_new_tokens = speech.size(1)
        else:
            max_new_tokens = int(speech_lens.max())
        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
        if repetition_penalty != 1.0:
            kwargs["logits_processor"] = LogitsProcessorList([GeneratedTokensRepetitionPenalty(repetition_penalty)])
        out = self.llm.generate(
            inputs_embeds=inputs_embeds,
            max_new_tokens=max(1, max_new_tokens),
            num_beams=beam_size,
            do_sample=False,
            min_length=decode_min_len,
            top_p=1.0,
            repetition_penalty=1.0,  # applied by our processor; 1.0 also disables generation_config.json's
            length_penalty=llm_length_penalty,
            temperature=temperature,
            bos_token_id=self.ids.bos,
            eos_token_id=self.ids.eos,
            pad_token_id=self.ids.pad,
            **kwargs,
        )
        if not compat_reference_padding and decode_max_len < 1:
            # Each utterance's own limit (its valid adapter length), as when decoded alone.
            over = torch.arange(out.size(1), device=out.device)[None, :] >= speech_lens.to(out.device)[:, None]
            out = out.masked_fill(over, self.ids.pad)
        return out

    def decode_text(self, generated_ids: torch.Tensor) -> List[str]:
        return self.tokenizer.batch_decode(generated_ids, skip_special_tokens=True)

    # -- training --------------------------------------------------------------------------------
    def forward(self, feats: torch.Tensor, feat_lens: torch.Tensor, texts: Sequence[str]):
        """Cross-entropy on the cleaned transcript + ``<|im_end|>`` (the prompt and speech are not
        labelled). Valid adapter frames only, right-padded, attention mask passed."""
        from llmasr.prompt import build_prompts

        _, _, speech, speech_lens = self.encode_speech(feats, feat_lens)
        input_ids, attn, labels = build_prompts(self.tokenizer, self.prompt_format, [clean_text(t) for t in texts])
        device = speech.device
        input_ids, attn, labels = input_ids.to(device), attn.to(device), labels.to(device)
        embeds = self.llm.get_input_embeddings()(input_ids)
        speech_pos = (input_ids == self.ids.speech).int().argmax(1)
        merged, mask, merged_labels = splice_speech(embeds, attn, speech_pos, speech, speech_lens, labels,
                                                    padding_side="right")
        out = self.llm(inputs_embeds=merged, attention_mask=mask.long(), labels=merged_labels)
        return out.loss


def load_firered_llm(model_dir: Union[str, Path], dtype: Union[str, torch.dtype, None] = None,
                     attn_implementation: str = "eager", freeze_encoder: Optional[bool] = None):
    """(feature extractor, FireRedAsrLlm in eval mode) from a released FireRedASR-LLM directory."""
    from llmasr.llm import load_llm

    model_dir = Path(model_dir)
    model_path = model_dir / "model.pth.tar"
    args, sd = load_package(model_path)
    encoder, _ = load_encoder(model_dir / "asr_encoder.pth.tar")

    if dtype is None:
        dtype = torch.float16 if getattr(args, "use_fp16", 0) else torch.float32
    freeze_llm = bool(getattr(args, "freeze_llm", 0))
    llm, tokenizer = load_llm(model_dir / "Qwen2-7B-Instruct", dtype=dtype, attn_implementation=attn_implementation,
                              use_lora=bool(getattr(args, "use_lora", 1)), lora_r=64, lora_alpha=16,
                              lora_dropout=0.05, unfreeze_llm=not freeze_llm)
    if tokenizer.convert_tokens_to_ids(SPEECH_TOKEN) >= llm.get_input_embeddings().weight.size(0):
        raise CheckpointError(f"{model_dir}: the LLM vocabulary has no row for {SPEECH_TOKEN}")
    llm_dim = llm.get_input_embeddings().weight.size(1)
    projector = Projector(encoder.output_dim, llm_dim, downsample_rate=int(getattr(args, "encoder_downsample_rate", 2)),
                          activation="relu", dropout=0.0)

    groups = {"encoder.": {}, "encoder_projector.": {}, "llm.": {}}
    for k, v in sd.items():
        prefix = next((p for p in groups if k.startswith(p)), None)
        if prefix is None:
            raise CheckpointError(f"{model_path}: unexpected key {k!r} (expected encoder.*, encoder_projector.*, llm.*)")
        groups[prefix][k[len(prefix):]] = v
    # encoder.*: overrides of asr_encoder.pth.tar (any subset, but every key must exist with its shape)
    enc_own = encoder.state_dict()
    bad = [k for k in groups["encoder."] if k not in enc_own or enc_own[k].shape != groups["encoder."][k].shape]
    if bad:
        raise CheckpointError(f"{model_path}: encoder override keys unknown or mis-shaped: {bad[:8]}")
    encoder.load_state_dict(groups["encoder."], strict=False)
    # adapter: complete
    load_state_dict_checked(projector, remap_linear12_keys(groups["encoder_projector."]), f"{model_path} (encoder_projector)")
    # LLM: LoRA (or full fine-tuned) weights on top of the Qwen2 directory
    llm_own = llm.state_dict()
    bad = [k for k in groups["llm."] if k not in llm_own or llm_own[k].shape != groups["llm."][k].shape]
    if bad:
        raise CheckpointError(f"{model_path}: LLM keys unknown or mis-shaped (LoRA config mismatch?): {bad[:8]}")
    llm.load_state_dict({k: v.to(llm_own[k].dtype) for k, v in groups["llm."].items()}, strict=False)

    if freeze_encoder is None:
        freeze_encoder = bool(getattr(args, "freeze_encoder", 0))
    # Encoder and adapter stay float32 (as in the reference); speech frames are cast to the LLM dtype.
    model = FireRedAsrLlm(encoder, projector, llm, tokenizer, freeze_encoder=freeze_encoder)
    fe = FireRedFeatureExtractor(model_dir / "cmvn.ark")
    return fe, model.eval()


__all__ = ["FireRedAsrLlm", "GeneratedTokensRepetitionPenalty", "load_firered_llm", "splice_speech", "clean_text"]
