"""The ``--engine vllm`` decoder: the speech encoders and projectors run in torch and build the spliced
input embeddings exactly as the Hugging Face path does (:meth:`llmasr.model.SpeechLLM.prepare_inputs`);
the LLM (LoRA merged) runs in vLLM, fed those embeddings as ``prompt_embeds``.

What maps onto vLLM (greedy search only):

- each row's token limit (``--max-new-tokens``, ``--max-new-tokens-per-speech-token``) -> ``max_tokens``
  per request (:func:`llmasr.generation.row_token_limits`, the hf path's own rule);
- the prompt format's end-of-turn ids -> ``stop_token_ids`` with ``ignore_eos`` and vLLM's own
  generation defaults (the hf path also ignores the LLM's ``generation_config.json``);
- ``--repetition-guard``: greedy rows do not depend on when they stop, so each output is cut where
  :class:`llmasr.generation.RepetitionGuard` would have stopped it (same tokens; the steps after it
  are computed and discarded).

Refused before the engine starts (:func:`check_vllm_options`): beam search (vLLM's ``beam_search``
takes token or text prompts, not prompt embeddings), joint CTC (``--ctc-weight``: a per-step scorer
over the LLM's candidates), ``--repetition-penalty`` != 1 (vLLM penalises the prompt's tokens too, which
prompt embeddings do not have; the hf path penalises the generated ones only).

vLLM starts an engine process (spawn): scripts that use it need ``if __name__ == "__main__":``.
"""
from __future__ import annotations

import copy
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from llmasr.config import UserError
from llmasr.generation import GenerationOptions, RepetitionGuard, row_token_limits
from llmasr.llm import base_causal_lm, merge_lora

INSTALL_HINT = "--engine vllm needs vLLM: bash local/setup.sh --with-vllm"
ENGINES = ("hf", "vllm")
DEFAULT_CPU_KV_CACHE_GB = 2.0


def import_vllm():
    """The vllm module, or a UserError with the install command."""
    try:
        import vllm
    except ImportError as e:
        raise UserError(f"{INSTALL_HINT} ({e})") from None
    return vllm


def check_vllm_options(beam_size: int = 1, ctc_weight: float = 0.0, repetition_penalty: float = 1.0,
                       no_repeat_ngram_size: int = 0, **_ignored) -> None:
    """Stop with one line naming the first decoding option the vLLM engine cannot serve."""
    if beam_size != 1:
        raise UserError(f"--beam-size {beam_size} is not supported with --engine vllm (vLLM has no beam search "
                        "over prompt embeddings); use --beam-size 1 or --engine hf")
    if ctc_weight:
        raise UserError(f"--ctc-weight {ctc_weight:g} (joint CTC decoding) is not supported with --engine vllm; "
                        "use --engine hf")
    if repetition_penalty != 1.0:
        raise UserError(f"--repetition-penalty {repetition_penalty:g} is not supported with --engine vllm (vLLM "
                        "penalises prompt tokens, which prompt embeddings have none of); use --engine hf")
    if no_repeat_ngram_size:
        raise UserError(f"no_repeat_ngram_size {no_repeat_ngram_size} is not supported with --engine vllm")


def guard_cut(ids: Sequence[int], repeats: int, max_period: int) -> List[int]:
    """``ids`` up to and including the token at which :class:`RepetitionGuard` stops a row."""
    guard = RepetitionGuard(repeats, max_period)
    row = torch.tensor([list(ids)], dtype=torch.long)
    for t in range(1, len(ids) + 1):
        if bool(guard(row[:, :t])[0]):
            return list(ids[:t])
    return list(ids)


def save_llm_checkpoint(model, out: Path) -> Path:
    """Write the model's LLM (LoRA merged on a copy if it is not merged yet) and its tokenizer to
    ``out`` as a Hugging Face checkpoint vLLM can load."""
    llm = model.llm
    if callable(getattr(llm, "merge_and_unload", None)):
        llm = merge_lora(copy.deepcopy(llm))
    base_causal_lm(llm).save_pretrained(out, safe_serialization=True)
    model.tokenizer.save_pretrained(out)
    # vLLM would otherwise read sampling defaults / extra eos ids from it; the hf path ignores them too
    (out / "generation_config.json").unlink(missing_ok=True)
    return out


class VllmEngine:
    """Decodes batches like :meth:`SpeechLLM.decode`, with the LLM in a vLLM engine (see the module note).

    ``workdir``: where the merged LLM checkpoint is written (a temporary directory by default, removed
    by :meth:`close`)."""

    def __init__(self, model, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 max_model_len: Optional[int] = None, workdir: Optional[Path] = None,
                 kv_cache_gb: Optional[float] = None, **llm_kwargs):
        vllm = import_vllm()
        self.model = model
        self._tmp = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="llmasr-vllm-")
            workdir = Path(self._tmp.name)
        start = time.time()
        llm_dir = save_llm_checkpoint(model, Path(workdir))
        dtype = next(model.llm.parameters()).dtype
        self.dtype = dtype
        # prompt (speech + template) + new tokens; 4096 is ~2.5 min of audio at 25 speech positions/s
        limit = getattr(base_causal_lm(model.llm).config, "max_position_embeddings", None) or 4096
        max_model_len = max_model_len or min(4096, int(limit))
        # On CPU vLLM reserves gpu_memory_utilization x the machine's RAM: a fixed KV cache instead
        if kv_cache_gb is None and not torch.cuda.is_available():
            kv_cache_gb = DEFAULT_CPU_KV_CACHE_GB
        if kv_cache_gb is not None:
            llm_kwargs["kv_cache_memory_bytes"] = int(kv_cache_gb * 2**30)
        self.llm = vllm.LLM(
            model=str(llm_dir), tokenizer=str(llm_dir), enable_prompt_embeds=True,
            dtype=str(dtype).replace("torch.", ""), tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
            generation_config="vllm", seed=0, **llm_kwargs,
        )
        self.startup_seconds = time.time() - start
        logging.info(f"vLLM engine started in {self.startup_seconds:.1f} s (dtype {self.dtype}, "
                     f"tensor parallel {tensor_parallel_size})")

    def close(self) -> None:
        """Stop the engine processes now (not at interpreter exit) and remove the temporary checkpoint."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and callable(getattr(core, "shutdown", None)):
            core.shutdown()
        self.llm = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def sampling_params(self, limits: Sequence[int], min_new_tokens: int = 0):
        from vllm import SamplingParams

        eos = self.model.prompt_ids.eos
        stop = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
        return [SamplingParams(temperature=0.0, max_tokens=int(n), min_tokens=min(int(min_new_tokens), int(n)),
                               stop_token_ids=stop, ignore_eos=True, detokenize=False, seed=0)
                for n in limits]

    @torch.inference_mode()
    def generate_ids(self, features: torch.Tensor, feature_lens: torch.Tensor, beam_size: int = 1,
                     max_new_tokens: Optional[int] = None, features_by_type=None, min_new_tokens: int = 0,
                     **gen_opts) -> List[List[int]]:
        """Generated ids of each row (new tokens only, no padding)."""
        known = {k: gen_opts.pop(k) for k in list(gen_opts) if k in GenerationOptions.__dataclass_fields__}
        gen_opts.pop("min_length", None)  # the hf path's min_length=1 holds for every vLLM request
        check_vllm_options(beam_size=beam_size, **known, **gen_opts)
        opts = GenerationOptions(beam_size=beam_size, **known)
        if max_new_tokens is not None:
            opts.max_new_tokens = max_new_tokens
        merged, mask, _, speech_lens, _ = self.model.prepare_inputs(features, feature_lens,
                                                                    features_by_type=features_by_type)
        limits = row_token_limits(opts, speech_lens.sum(1))
        limits = [opts.max_new_tokens] * merged.shape[0] if limits is None else limits.tolist()
        prompts = [{"prompt_embeds": merged[i][mask[i]].to(self.dtype).cpu()} for i in range(merged.shape[0])]
        outs = self.llm.generate(prompts, self.sampling_params(limits, min_new_tokens), use_tqdm=False)
        ids = [list(o.outputs[0].token_ids) for o in outs]
        if opts.repetition_guard > 0:
            ids = [guard_cut(r, opts.repetition_guard, opts.repetition_guard_max_period) for r in ids]
        return ids

    def decode(self, features: torch.Tensor, feature_lens: torch.Tensor, beam_size: int = 1,
               max_new_tokens: Optional[int] = None, features_by_type=None, **gen_opts) -> List[str]:
        ids = self.generate_ids(features, feature_lens, beam_size, max_new_tokens, features_by_type, **gen_opts)
        return self.model.tokenizer.batch_decode(ids, skip_special_tokens=True)


def make_engine(args, model, gen_opts: Optional[Dict[str, Any]] = None) -> Optional[VllmEngine]:
    """The decoder ``--engine`` asks for: None for ``hf`` (decode with ``model.decode``), else a started
    :class:`VllmEngine`. The decoding options are checked before the engine starts."""
    engine = getattr(args, "engine", "hf")
    if engine == "hf":
        return None
    if engine not in ENGINES:
        raise UserError(f"--engine {engine}: choose one of {', '.join(ENGINES)}")
    check_vllm_options(**(gen_opts or {}))
    import_vllm()
    return VllmEngine(model, tensor_parallel_size=getattr(args, "vllm_tensor_parallel_size", 1),
                      gpu_memory_utilization=getattr(args, "vllm_gpu_memory_utilization", 0.9),
                      kv_cache_gb=getattr(args, "vllm_kv_cache_gb", None),
                      enforce_eager=bool(getattr(args, "vllm_enforce_eager", False)))


def add_engine_arguments(parser) -> None:
    from llmasr.config import str2bool

    g = parser.add_argument_group("engine")
    g.add_argument("--engine", type=str, default="hf", choices=ENGINES,
                   help="hf: Hugging Face generate (exact fidelity); vllm: the LLM runs in vLLM on the spliced "
                   "prompt embeddings (greedy only; install: bash local/setup.sh --with-vllm).")
    g.add_argument("--vllm-tensor-parallel-size", type=int, default=1, help="vLLM: GPUs the LLM is split over.")
    g.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.9,
                   help="vLLM: fraction of GPU memory the engine may take (weights + KV cache).")
    g.add_argument("--vllm-enforce-eager", type=str2bool, default=False,
                   help="vLLM: skip its torch.compile step (a faster start, slower steps: for short decodes).")
    g.add_argument("--vllm-kv-cache-gb", type=float, default=None,
                   help=f"vLLM: KV cache size in GB instead of the memory fraction (default on CPU: "
                   f"{DEFAULT_CPU_KV_CACHE_GB:g}, as vLLM's CPU build would reserve the fraction of the RAM).")


__all__ = ["ENGINES", "INSTALL_HINT", "VllmEngine", "add_engine_arguments", "check_vllm_options", "guard_cut",
           "import_vllm", "make_engine", "save_llm_checkpoint"]
