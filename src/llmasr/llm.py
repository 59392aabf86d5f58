"""Load a Hugging Face causal LM (+ tokenizer, + LoRA) from a LOCAL directory.

Nothing is fetched from a hub: ``path`` must be a directory holding ``config.json`` + weights +
tokenizer files (e.g. ``huggingface-cli download Qwen/Qwen2-1.5B-Instruct --local-dir ...``), or a
directory with a GGUF file (``gguf_file=``, e.g. SmolLM2-135M-Instruct for the demo; transformers
de-quantises it).

The speech placeholder tokens (:data:`llmasr.prompt.SPECIAL_TOKENS`) are added to the tokenizer.
As in SpeechLLM the embedding matrix is NOT resized: Qwen2 pads its vocabulary (151936 rows for
151646 tokens), so the new ids already have (unused) rows. For an LLM without spare rows pass
``resize_vocab=True``: the matrix grows to a multiple of 64 and the new rows are set to the mean
of the existing rows - deterministic, so they need not be saved in checkpoints.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from llmasr.config import UserError
from llmasr.prompt import SPECIAL_TOKENS, add_speech_tokens

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj")

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: Union[str, torch.dtype, None], device: Optional[torch.device] = None) -> torch.dtype:
    """"auto"/None -> float16 on CUDA (SpeechLLM's choice), float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device in (None, "auto"):
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def default_attn_implementation(dtype: torch.dtype, device: Optional[torch.device] = None) -> str:
    """flash_attention_2 when installed, on a CUDA ``device`` and in half precision; else PyTorch SDPA.
    With no device, CUDA when one is visible (the caller's ``--device`` should be passed: flash-attn
    refuses fp32 and CPU tensors)."""
    if device in (None, "auto"):
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def check_llm_dir(path: Union[str, Path], gguf_file: Optional[str] = None) -> Path:
    """Fail early and clearly when the LLM directory is unusable."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"LLM directory {str(path)!r} does not exist. Download the model into it first, e.g. "
            f"`huggingface-cli download Qwen/Qwen2-1.5B-Instruct --local-dir {path}` (see models/README.md)"
        )
    if gguf_file is not None:
        if not (path / gguf_file).is_file():
            raise FileNotFoundError(f"GGUF file {str(path / gguf_file)!r} not found")
        return path
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} has no config.json; it is not a Hugging Face model directory")
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"LLM directory {str(path)!r} has no tokenizer ({', '.join(_TOKENIZER_FILES)} missing); "
            "download the tokenizer files together with the weights"
        )
    return path


def _fix_rope_theta(config, path: Path) -> None:
    """transformers 4.x reads ``rope_theta``; configs written by transformers 5 only carry
    ``rope_parameters`` (which 4.x keeps as an unused attribute, silently falling back to
    rope_theta=10000). Copy it over. transformers 5 reads both layouts itself."""
    if _transformers_version() >= (5, 0):
        return
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        return
    raw = json.loads(cfg_file.read_text())
    rope = raw.get("rope_parameters")
    if "rope_theta" not in raw and isinstance(rope, dict) and "rope_theta" in rope:
        logging.info(f"{cfg_file}: taking rope_theta={rope['rope_theta']} from rope_parameters")
        config.rope_theta = rope["rope_theta"]


def _transformers_version() -> Tuple[int, int]:
    import transformers

    return tuple(int(x) for x in transformers.__version__.split(".")[:2])


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    # `dtype=` replaced `torch_dtype=` in 4.56.
    return {"dtype": dtype} if _transformers_version() >= (4, 56) else {"torch_dtype": dtype}


def load_tokenizer(path: Union[str, Path], gguf_file: Optional[str] = None):
    from transformers import AutoTokenizer

    path = check_llm_dir(path, gguf_file)
    has_files = any((path / f).is_file() for f in _TOKENIZER_FILES)
    try:
        if has_files or gguf_file is None:
            return AutoTokenizer.from_pretrained(str(path))
        return AutoTokenizer.from_pretrained(str(path), gguf_file=gguf_file)
    except Exception as e:  # re-raise with the directory named
        raise UserError(f"could not load the tokenizer of {str(path)!r}: {e}") from e


def resize_embeddings_for(llm: nn.Module, num_tokens: int, pad_to_multiple_of: int = 64) -> None:
    """Grow the embedding (and an untied output layer) to hold ``num_tokens`` ids; new rows are
    the mean of the old rows (deterministic, so checkpoints need not store them)."""
    old = llm.get_input_embeddings().weight.shape[0]
    if num_tokens <= old:
        return
    out = llm.get_output_embeddings()
    tied = out is not None and out.weight is llm.get_input_embeddings().weight
    old_out = None if (out is None or tied) else out.weight.detach().clone()
    llm.resize_token_embeddings(num_tokens, pad_to_multiple_of=pad_to_multiple_of, mean_resizing=False)
    with torch.no_grad():
        emb = llm.get_input_embeddings().weight
        emb[old:] = emb[:old].float().mean(0).to(emb.dtype)
        out = llm.get_output_embeddings()
        if old_out is not None and out is not None and out.weight is not emb:
            out.weight[old:] = old_out.float().mean(0).to(out.weight.dtype)
    logging.info(f"resized the LLM vocabulary from {old} to {emb.shape[0]} rows (new rows = mean row)")


def check_vocab_room(llm: nn.Module, tokenizer, resize_vocab: bool) -> None:
    """The speech token ids must index the LLM embedding (SpeechLLM never resizes it)."""
    rows = llm.get_input_embeddings().weight.shape[0]
    if resize_vocab:
        resize_embeddings_for(llm, len(tokenizer))
    else:
        _check_ids_fit(tokenizer, rows)


def _check_ids_fit(tokenizer, rows: int) -> None:
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    too_big = [(t, i) for t, i in zip(SPECIAL_TOKENS, ids) if i >= rows]
    if not too_big:
        return
    raise UserError(
        f"the LLM embedding has {rows} rows but the speech tokens got ids {too_big} (tokenizer size "
        f"{len(tokenizer)}): this LLM has no spare vocabulary rows. Pass --resize-vocab true "
        "(adds rows initialised to the mean embedding) or --use-prompt-embedding true."
    )


def _broken_weight_file(path: Path) -> Optional[str]:
    """'<file>: <problem>' for the first ``*.safetensors`` file of ``path`` that cannot be opened."""
    from safetensors import safe_open

    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as e:  # SafetensorError (header), OSError
            return f"{f}: {e} (truncated or corrupt: download it again)"
    return None


def _foldable_input(module: nn.Module, args: tuple):
    """Forward pre-hook of the output layer. generate()'s prefill gives it the last position,
    ``hidden[:, -1:, :]``, a view whose leading dims cannot be folded into one (torch checks
    ``stride[i] == stride[i+1] * size[i+1]``, size-1 dims included); ``F.linear`` then runs as a batched
    matmul over a per-row copy of the weight (batch x vocab x hidden): for 16 rows of Qwen2's
    151936-row head on CPU 0.85 s instead of 0.18 s in fp32, 40 s instead of 0.06 s in bf16/fp16."""
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or x.dim() < 3:
        return None
    if all(x.stride(i) == x.stride(i + 1) * x.size(i + 1) for i in range(x.dim() - 2)):
        return None
    return (x.clone(memory_format=torch.contiguous_format),) + tuple(args[1:])


def load_llm(
    path: Union[str, Path],
    dtype: Union[str, torch.dtype, None] = "auto",
    attn_implementation: Optional[str] = None,
    use_lora: bool = True,
    lora_r: int = 64,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    lora_targets: Sequence[str] = LORA_TARGETS,
    gguf_file: Optional[str] = None,
    resize_vocab: bool = False,
    unfreeze_llm: bool = True,
    speech_tokens_outside_vocab: bool = False,
    device: Optional[torch.device] = None,
):
    """Returns ``(llm, tokenizer)``; the tokenizer already has the speech tokens.

    As in SpeechLLM's train.py: ``unfreeze_llm=False`` freezes the whole LLM (no LoRA);
    otherwise with ``use_lora`` the model is wrapped by peft (state-dict keys
    ``base_model.model.*``, LoRA weights ``lora_{A,B}.default.weight``, only those trainable), and
    without LoRA every LLM parameter is trained. Decoding must pass the training flags.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = check_llm_dir(path, gguf_file)
    # "auto" dtype and the attention kernel follow the device the LLM will run on (``device``, e.g.
    # --device cpu on a GPU host), not whether CUDA is visible.
    dtype = resolve_dtype(dtype, device)
    tokenizer = load_tokenizer(path, gguf_file)
    add_speech_tokens(tokenizer)
    attn = attn_implementation or default_attn_implementation(dtype, device)

    kwargs = dict(attn_implementation=attn, **_dtype_kwarg(dtype))
    try:
        config = AutoConfig.from_pretrained(str(path), **({"gguf_file": gguf_file} if gguf_file else {}))
        if gguf_file is None:
            _fix_rope_theta(config, path)
    except (OSError, ValueError, ImportError) as e:
        raise UserError(f"could not read the LLM config of {str(path)!r}: {e}") from e
    if not speech_tokens_outside_vocab and not resize_vocab:
        # fail before loading (possibly GBs of) weights
        _check_ids_fit(tokenizer, config.get_text_config().vocab_size)
    try:
        if gguf_file is not None:
            llm = AutoModelForCausalLM.from_pretrained(str(path), gguf_file=gguf_file, **kwargs)
        else:
            llm = AutoModelForCausalLM.from_pretrained(str(path), config=config, **kwargs)
    except Exception as e:
        broken = _broken_weight_file(path)
        if broken is not None:  # (the safetensors error does not name the file)
            raise UserError(f"could not load the LLM weights {broken}") from e
        if isinstance(e, (OSError, ValueError, ImportError)):
            raise UserError(f"could not load the LLM from {str(path)!r}: {e}") from e
        raise
    logging.info(f"loaded LLM {path} ({type(llm).__name__}, {dtype}, attention={attn})")
    head = llm.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(_foldable_input)

    if not speech_tokens_outside_vocab:  # (allowed when prompt_embedding rows replace them)
        check_vocab_room(llm, tokenizer, resize_vocab)

    if use_lora and unfreeze_llm:
        from peft import LoraConfig, get_peft_model

        missing = [t for t in lora_targets if not any(n.endswith("." + t) for n, _ in llm.named_modules())]
        if missing:
            raise ValueError(f"LoRA target modules {missing} do not exist in {type(llm).__name__}")
        lora_config = LoraConfig(
            r=lora_r,
            lora_alpha=lora_alpha,
            target_modules=list(lora_targets),
            lora_dropout=lora_dropout,
            task_type="CAUSAL_LM",
        )
        llm = get_peft_model(llm, lora_config)
    else:
        for p in llm.parameters():
            p.requires_grad_(unfreeze_llm)
    return llm, tokenizer


def base_causal_lm(llm: nn.Module) -> nn.Module:
    """The underlying ``*ForCausalLM`` (peft injects LoRA layers in place, so its decoder runs them)."""
    get_base = getattr(llm, "get_base_model", None)
    return get_base() if callable(get_base) else llm


def merge_lora(llm: nn.Module) -> nn.Module:
    """The LLM with its LoRA adapters folded into the base weights (``W += scaling * B @ A``, peft's
    ``merge_and_unload``) and the peft wrapper removed: one matmul per projection instead of three
    plus the adapter bookkeeping. For inference only - the adapters are gone, so the result can no
    longer be trained or saved in the training layout. An LLM without LoRA is returned as it is."""
    merge = getattr(llm, "merge_and_unload", None)
    if not callable(merge):
        return llm
    merged = merge()
    logging.info(f"merged the LoRA adapters into the LLM weights ({type(merged).__name__})")
    return merged


def decoder_and_head(llm: nn.Module) -> Tuple[nn.Module, nn.Module]:
    """(decoder stack returning last_hidden_state, output projection) of a causal LM."""
    base = base_causal_lm(llm)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model")
    head = base.get_output_embeddings()
    if decoder is None or head is None:
        raise TypeError(f"{type(base).__name__} does not expose a decoder and an output embedding")
    return decoder, head


__all__ = [
    "LORA_TARGETS",
    "load_llm",
    "load_tokenizer",
    "check_llm_dir",
    "resolve_dtype",
    "default_attn_implementation",
    "check_vocab_room",
    "resize_embeddings_for",
    "base_causal_lm",
    "decoder_and_head",
    "merge_lora",
]

