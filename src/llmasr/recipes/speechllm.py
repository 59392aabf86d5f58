"""The SpeechLLM recipes' own pieces (one encoder, and MoSE's several): model flags, decoding
flags and options, building a :class:`SpeechLLM` from the flags. :mod:`llmasr.recipes.recipe`
assembles them into the ``speechllm`` and ``mose`` recipes."""
from __future__ import annotations

import argparse
import logging
from typing import Any, Dict, List, Optional, Union

from llmasr.aux_ctc import MODES as AUX_CTC_MODES
from llmasr.config import str2bool
from llmasr.llm import LORA_TARGETS, load_llm
from llmasr.model import SpeechLLM
from llmasr.projector import ACTIVATIONS
from llmasr.prompt import available_prompt_formats


def add_model_arguments(parser: argparse.ArgumentParser, mose: bool = False) -> None:
    """SpeechLLM's model flags (plus LoRA/prompt/LLM loading options). ``mose``: the multi-encoder
    layout, whose encoder flags take comma-separated lists (one entry per encoder, any number)."""
    multi_encoder = bool(mose)
    g = parser.add_argument_group("model")
    g.add_argument("--llm-path", type=str, default="models/qwen2-1.5b-instruct",
                   help="Local directory of the Hugging Face causal LM (weights + tokenizer).")
    g.add_argument("--llm-gguf-file", type=str, default=None,
                   help="Load the LLM (and tokenizer if the directory has none) from this GGUF file in --llm-path.")
    g.add_argument("--llm-dtype", type=str, default="auto",
                   help="LLM dtype: auto (float16 on CUDA like SpeechLLM, float32 on CPU), float32, float16, bfloat16.")
    g.add_argument("--attn-implementation", type=str, default=None,
                   help="eager, sdpa or flash_attention_2 (default: flash_attention_2 if installed on CUDA, else sdpa).")
    if multi_encoder:
        g.add_argument("--speech-encoder-type", type=str, default="large,large,large,large",
                       help="Types of the speech encoders, comma-separated.")
        g.add_argument("--speech-encoder-path", type=str,
                       default="models/zipformer/librispeech/transducer_large/pretrained.pt,"
                       "models/zipformer/librispeech/aed_crctc_large/pretrained.pt,"
                       "models/zipformer/librispeech/crctc_large/pretrained.pt,"
                       "models/zipformer/librispeech/transducer_crctc_large/pretrained.pt",
                       help="Checkpoints of the speech encoders, comma-separated.")
        g.add_argument("--speech-encoder-bpe-path", type=str, default=None,
                       help="Accepted for compatibility with SpeechLLM; unused.")
    else:
        g.add_argument("--speech-encoder-type", type=str, default="large", help="Type of the speech encoder.")
        g.add_argument("--speech-encoder-path", type=str,
                       default="models/zipformer/librispeech/transducer_crctc_large/pretrained.pt",
                       help="Checkpoint of the speech encoder.")
        g.add_argument("--speech-encoder-bpe-path", type=str, default=None,
                       help="Accepted for compatibility with SpeechLLM; unused.")
    if multi_encoder:
        g.add_argument("--encoder-projector-ds-rate", type=_rates, default=4,
                       help="Number of encoder frames concatenated into one LLM input position: one for every "
                       "encoder, or one per encoder, comma-separated (encoders of different frame rates, e.g. "
                       "Whisper 50 Hz next to Zipformer/FireRedASR 25 Hz).")
    else:
        g.add_argument("--encoder-projector-ds-rate", type=int, default=4,
                       help="Number of encoder frames concatenated into one LLM input position.")
    g.add_argument("--projector-activation", type=str, default="swooshr", choices=sorted(ACTIVATIONS),
                   help="swooshr (SpeechLLM) or relu (FireRedASR-LLM, icefall whisper_llm_zh).")
    g.add_argument("--projector-dropout", type=float, default=0.1,
                   help="Dropout on the concatenated frames before the projector (training only).")
    g.add_argument("--use-lora", type=str2bool, default=True, help="Fine-tune the LLM with LoRA.")
    g.add_argument("--lora-r", type=int, default=64)
    g.add_argument("--lora-alpha", type=int, default=16)
    g.add_argument("--lora-dropout", type=float, default=0.05)
    g.add_argument("--unfreeze-llm", type=str2bool, default=True,
                   help="Train the LLM (LoRA if --use-lora, else all weights); false freezes it (no LoRA).")
    g.add_argument("--unfreeze-encoder", type=str2bool, default=False, help="Train the speech encoder(s).")
    g.add_argument("--prompt-format", type=str, default="speechllm", help="One of: " + ", ".join(available_prompt_formats()))
    g.add_argument("--use-prompt-embedding", type=str2bool, default=False,
                   help="Really replace <start_speech>/<end_speech> (and text markers) by the trainable "
                   "prompt_embedding rows. SpeechLLM's table has no effect; keep false for its checkpoints.")
    g.add_argument("--compat-reference-padding", type=str2bool, default=False,
                   help="Reproduce recipes whose results depend on the batch padding (icefall whisper_llm_zh: the "
                   "Whisper encoder attends to the padding and every utterance gets all projected frames of the "
                   "padded batch; see README). false: batch-independent results (padding never reaches the LLM).")
    g.add_argument("--ctc-compress-frames", type=str, default="none", choices=("none",) + AUX_CTC_MODES,
                   help="The LLM reads the projected frames CTC-compressed (blank frames dropped, each run of one "
                   "token averaged; llmasr.aux_ctc.ctc_compress_frames): for a projector aligned by the aux CTC "
                   "in this --aux-ctc-mode (blank: the pad token). none: every projected frame.")
    g.add_argument("--resize-vocab", type=str2bool, default=False,
                   help="Grow the LLM embedding when the speech tokens do not fit (new rows = mean row).")
    g.add_argument("--init-from-firered", type=str, default=None, metavar="DIR",
                   help="Start from a released FireRedASR-LLM directory: its model.pth.tar (encoder overrides, "
                   "projector, LoRA) is loaded into the model. Use with --speech-encoder-type firered "
                   "--speech-encoder-path DIR/asr_encoder.pth.tar --llm-path DIR/Qwen2-7B-Instruct "
                   "--encoder-projector-ds-rate 2 --projector-activation relu --projector-dropout 0 "
                   "--prompt-format firered.")


def _rates(value: str) -> Union[int, List[int]]:
    """--encoder-projector-ds-rate of MoSE: one rate (an int) or one per encoder (a list)."""
    try:
        rates = [int(v) for v in split_list(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected positive integers, comma-separated, got {value!r}") from None
    if not rates or min(rates) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, comma-separated, got {value!r}")
    return rates[0] if len(rates) == 1 else rates


def split_list(value: Optional[str]) -> List[str]:
    return [] if value is None else [v.strip() for v in str(value).split(",") if v.strip()]


def build_speechllm(args: argparse.Namespace, multi_encoder: bool, dtype=None, encoder_options=None) -> SpeechLLM:
    """Build encoders (llmasr.encoders registry), LLM (+LoRA) and projectors from parsed flags.

    The LLM dtype is ``dtype`` if given, else ``--llm-dtype``. Encoders and projectors stay float32
    (their outputs are cast to the LLM dtype when spliced).
    """
    from llmasr.encoders import build_speech_encoder

    types = split_list(args.speech_encoder_type)
    paths = split_list(args.speech_encoder_path)
    if not types:
        raise ValueError("--speech-encoder-type is empty")
    if len(paths) != len(types):
        raise ValueError(
            f"--speech-encoder-type lists {len(types)} encoders ({types}) but --speech-encoder-path has "
            f"{len(paths)} ({paths})"
        )
    if not multi_encoder and len(types) != 1:
        raise ValueError(f"{len(types)} speech encoders given; use the MoSE scripts for more than one")
    rates = args.encoder_projector_ds_rate
    if isinstance(rates, list) and len(rates) != len(types):
        raise ValueError(f"--encoder-projector-ds-rate lists {len(rates)} rates {rates} for {len(types)} speech "
                         f"encoders ({types}): give one rate, or one per encoder")
    encoders = [build_speech_encoder(t, p, **(encoder_options or {})) for t, p in zip(types, paths)]
    llm, tokenizer = load_llm(
        args.llm_path,
        dtype=dtype if dtype is not None else getattr(args, "llm_dtype", "auto"),
        attn_implementation=getattr(args, "attn_implementation", None),
        use_lora=args.use_lora,
        lora_r=getattr(args, "lora_r", 64),
        lora_alpha=getattr(args, "lora_alpha", 16),
        lora_dropout=getattr(args, "lora_dropout", 0.05),
        lora_targets=LORA_TARGETS,
        gguf_file=getattr(args, "llm_gguf_file", None),
        resize_vocab=getattr(args, "resize_vocab", False),
        unfreeze_llm=getattr(args, "unfreeze_llm", True),
        speech_tokens_outside_vocab=getattr(args, "use_prompt_embedding", False),
        device=getattr(args, "device", None),
    )
    model = SpeechLLM(
        encoders,
        llm,
        tokenizer,
        prompt_format=getattr(args, "prompt_format", "speechllm"),
        downsample_rate=args.encoder_projector_ds_rate,
        projector_activation=getattr(args, "projector_activation", "swooshr"),
        projector_dropout=getattr(args, "projector_dropout", 0.1),
        unfreeze_encoder=getattr(args, "unfreeze_encoder", False),
        use_prompt_embedding=getattr(args, "use_prompt_embedding", False),
        mose=multi_encoder,
        compat_reference_padding=getattr(args, "compat_reference_padding", False),
        ctc_compress_frames=getattr(args, "ctc_compress_frames", "none"),
    )
    if getattr(args, "init_from_firered", None):
        from llmasr.firered.llm import load_firered_weights

        load_firered_weights(model, args.init_from_firered)
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logging.info(f"SpeechLLM: {model.num_encoders} encoder(s) {types}, {n_all} parameters, {n_train} trainable")
    return model


def add_decoding_arguments(parser) -> None:
    g = parser.add_argument_group("decoding")
    g.add_argument("--beam-size", type=int, default=1, help="1 = greedy search; > 1 = beam search.")
    g.add_argument("--max-new-tokens", type=int, default=200, help="Upper bound on generated tokens.")
    g.add_argument("--max-new-tokens-per-speech-token", type=float, default=None,
                   help="Optional per-utterance cap: ceil(value * number of speech positions).")
    g.add_argument("--repetition-guard", type=int, default=0,
                   help="Stop an utterance when a pattern of <= 8 tokens repeats this many times (0 = off).")
    g.add_argument("--length-penalty", type=float, default=1.0, help="Beam search length penalty.")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="Hugging Face repetition penalty over the generated tokens (1.0 = off; FireRedASR-LLM uses 3.0).")
    g.add_argument("--ctc-weight", type=float, default=0.0,
                   help="Joint decoding with the projector's aux CTC (llmasr/ctc_prefix.py): each next token scores "
                   "(1-w) log P_llm + w (CTC prefix score gain). For models trained with --aux-ctc-* (0 = off).")
    g.add_argument("--ctc-mode", type=str, default=None, choices=AUX_CTC_MODES,
                   help="The aux CTC's mode for --ctc-weight (default: the --ctc-compress-frames mode). "
                   "The blank is the prompt format's pad token, the aux CTC's default --aux-ctc-blank.")
    g.add_argument("--decode-dtype", type=str, default=None, choices=["float32", "bfloat16", "float16"],
                   help="Decode the LLM in this dtype and run the encoders under autocast to it (SpeechLLM."
                   "set_decode_dtype; bfloat16 on CPUs with AVX512-BF16/AMX, float16/bfloat16 on CUDA). "
                   "Default: the --llm-dtype LLM with fp32 encoders (all fp32 on CPU: the golden results).")


def speechllm_decoding_options(args) -> Dict[str, Any]:
    """Keyword arguments for ``SpeechLLM.decode`` from the flags of :func:`add_decoding_arguments`."""
    return dict(
        beam_size=args.beam_size,
        max_new_tokens=args.max_new_tokens,
        max_new_tokens_per_speech_token=args.max_new_tokens_per_speech_token,
        repetition_guard=args.repetition_guard,
        length_penalty=args.length_penalty,
        repetition_penalty=getattr(args, "repetition_penalty", 1.0),
        **({"ctc_weight": args.ctc_weight, "ctc_mode": args.ctc_mode} if getattr(args, "ctc_weight", 0.0) else {}),
    )


def speechllm_options_tag(args) -> str:
    """``beam1`` plus every SpeechLLM decoding option that differs from its default."""
    tag = f"beam{args.beam_size}"
    if args.max_new_tokens != 200:
        tag += f"-maxnew{args.max_new_tokens}"
    if args.max_new_tokens_per_speech_token is not None:
        tag += f"-perspeech{args.max_new_tokens_per_speech_token:g}"
    if args.repetition_guard:
        tag += f"-repguard{args.repetition_guard}"
    if args.length_penalty != 1.0:
        tag += f"-lp{args.length_penalty:g}"
    if getattr(args, "repetition_penalty", 1.0) != 1.0:
        tag += f"-rp{args.repetition_penalty:g}"
    if getattr(args, "ctc_weight", 0.0):
        tag += f"-ctc{args.ctc_weight:g}"
    return tag


__all__ = ["add_decoding_arguments", "add_model_arguments", "build_speechllm", "speechllm_decoding_options",
           "speechllm_options_tag", "split_list"]
