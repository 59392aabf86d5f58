"""FireRedASR-LLM: a released directory loaded into the shared :class:`llmasr.model.SpeechLLM`.

Released layout: ``model.pth.tar`` (adapter ``encoder_projector.linear{1,2}``, LoRA
``llm.base_model.model.*.lora_{A,B}.default.weight`` and encoder overrides ``encoder.*``),
``asr_encoder.pth.tar`` (AED package with the encoder), ``cmvn.ark`` and ``Qwen2-7B-Instruct/``.

The model is SpeechLLM with FireRed's settings: speech encoder ``"firered"`` (its reported lengths are
the release's speech frames, see :mod:`llmasr.encoders.firered`), projector of 2 frames with ReLU
(the release's ``Adapter``, keys remapped from ``linear1/linear2``), prompt format ``"firered"``
(its transcript clean-up :func:`llmasr.prompt.firered_clean_text` is the format's text transform),
Qwen2 with LoRA r=64, alpha=16 (scaling 0.25). The encoder comes from ``asr_encoder.pth.tar``; the
``encoder.*`` tensors of ``model.pth.tar`` override it. Unlike the release (``strict=False``),
unknown or mis-shaped keys are errors.

Decoding with the release's options: :func:`generation_options`. What each mode reproduces is in
:mod:`llmasr.firered.decode`.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import torch

from llmasr.features.firered import FireRedFeatureExtractor
from llmasr.model import SpeechLLM

from llmasr.io import load_state_dict_strict

from .load import load_package

PROMPT_FORMAT = "firered"
LORA_OPTIONS = dict(lora_r=64, lora_alpha=16, lora_dropout=0.05)  # the release's LoraConfig


def load_firered_weights(model: SpeechLLM, model_dir) -> None:
    """Load a released FireRedASR-LLM ``model_dir/model.pth.tar`` into ``model`` (``--init-from-firered``).

    Its ``model_state_dict`` has our module names (``encoder.*``: any subset of the Conformer,
    overriding ``asr_encoder.pth.tar``; ``encoder_projector.linear1/linear2.*``: the whole adapter;
    ``llm.*``: LoRA weights). Every key must exist in the model with its shape and the projector
    must be complete; the rest of the model keeps its loaded weights (the base LLM is not read again).
    """
    path = Path(model_dir) / "model.pth.tar"
    if not path.is_file():
        raise FileNotFoundError(f"FireRedASR-LLM package not found: {path}")
    _load_package_into(model, path, *load_package(path))


def _load_package_into(model: SpeechLLM, path: Path, pkg_args: argparse.Namespace,
                       sd: Mapping[str, torch.Tensor]) -> None:
    from llmasr.checkpoint import to_our_layout

    if model.mose or model.prompt_format.name != PROMPT_FORMAT:
        raise ValueError(f"{path}: a FireRedASR-LLM package needs one encoder and --prompt-format {PROMPT_FORMAT} "
                         f"(got {model.num_encoders} encoder(s), format {model.prompt_format.name!r})")
    ds = int(getattr(pkg_args, "encoder_downsample_rate", model.downsample_rate))
    if ds != model.downsample_rate:
        raise ValueError(f"{path} was trained with encoder_downsample_rate {ds}, but --encoder-projector-ds-rate "
                         f"is {model.downsample_rate}")
    sd = to_our_layout(sd, source=str(path))
    # Every tensor of the package must fit the model and the adapter must be complete; the rest of the
    # model (the encoder's other weights, the base LLM) keeps what asr_encoder.pth.tar / the LLM dir gave it.
    keep = [k for k in model.state_dict() if not k.startswith("encoder_projector.")]

    def lora_hint(mismatch):
        if any(".lora_" in k for k in mismatch.unexpected):
            yield "LoRA config mismatch? build the model with LoRA: --use-lora true --unfreeze-llm true"

    load_state_dict_strict(model, sd, str(path), allow_missing=keep, context="FireRedASR-LLM", hints=lora_hint)
    logging.info(f"initialised {len(sd)} tensors from {path}")


def load_firered_llm(model_dir: Union[str, Path], dtype: Union[str, torch.dtype, None] = None,
                     attn_implementation: str = "eager", freeze_encoder: Optional[bool] = None,
                     compat_reference_padding: bool = False) -> Tuple[FireRedFeatureExtractor, SpeechLLM]:
    """(feature extractor, SpeechLLM in eval mode) from a released FireRedASR-LLM directory.

    ``dtype``: of the LLM (default float16 if the package says ``use_fp16``, else float32); the encoder
    and adapter stay float32, as in the release. ``compat_reference_padding``: see
    :mod:`llmasr.firered.decode`.
    """
    from llmasr.encoders import build_speech_encoder
    from llmasr.llm import load_llm

    model_dir = Path(model_dir)
    path = model_dir / "model.pth.tar"
    args, sd = load_package(path)
    encoder = build_speech_encoder("firered", str(model_dir / "asr_encoder.pth.tar"))
    if dtype is None:
        dtype = torch.float16 if getattr(args, "use_fp16", 0) else torch.float32
    llm, tokenizer = load_llm(model_dir / "Qwen2-7B-Instruct", dtype=dtype, attn_implementation=attn_implementation,
                              use_lora=bool(getattr(args, "use_lora", 1)),
                              unfreeze_llm=not getattr(args, "freeze_llm", 0), **LORA_OPTIONS)
    if freeze_encoder is None:
        freeze_encoder = bool(getattr(args, "freeze_encoder", 0))
    model = SpeechLLM([encoder], llm, tokenizer, prompt_format=PROMPT_FORMAT,
                      downsample_rate=int(getattr(args, "encoder_downsample_rate", 2)), projector_activation="relu",
                      projector_dropout=0.0, unfreeze_encoder=not freeze_encoder,
                      compat_reference_padding=compat_reference_padding)
    _load_package_into(model, path, args, sd)
    return FireRedFeatureExtractor(model_dir / "cmvn.ark"), model.eval()


def generation_options(beam_size: int = 1, decode_max_len: int = 0, decode_min_len: int = 0,
                       repetition_penalty: float = 1.0, llm_length_penalty: float = 1.0,
                       temperature: float = 1.0) -> Dict:
    """Keyword arguments of :meth:`SpeechLLM.generate_ids` / ``decode`` for the release's decoding options.

    ``decode_max_len < 1``: as many new tokens as the utterance has speech positions (the release's
    ``max_new_tokens = speech_features.size(1)``), per row (``max_new_tokens_per_speech_token=1``).
    ``decode_min_len`` is Hugging Face's ``min_length`` of the release: less the input length (prompt +
    speech positions), so it has no effect unless larger; in a batch that is the padded input length,
    so only ``decode_min_len`` 0 (the release's default) is guaranteed batch-independent. Greedy/beam
    search without sampling, so ``temperature`` changes nothing, as in the release. The repetition
    penalty applies to generated tokens only.
    """
    opts = dict(beam_size=beam_size, repetition_penalty=repetition_penalty, length_penalty=llm_length_penalty,
                min_length=decode_min_len, temperature=temperature)
    if decode_max_len >= 1:
        opts["max_new_tokens"] = decode_max_len
    else:
        opts["max_new_tokens_per_speech_token"] = 1.0
        # only a bound: the per-row limit (one token per speech position) is smaller
        opts["max_new_tokens"] = 2**31 - 1
    return opts


__all__ = ["LORA_OPTIONS", "PROMPT_FORMAT", "generation_options", "load_firered_llm", "load_firered_weights"]
