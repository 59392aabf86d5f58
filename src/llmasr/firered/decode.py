"""Decoding wav lists with released FireRedASR-AED / FireRedASR-LLM directories (speech2text).

FireRedASR-LLM (:class:`llmasr.model.SpeechLLM`, loaded by :func:`llmasr.firered.llm.load_firered_llm`):

* default: every utterance gives the release's batch-size-1 result, alone or in any batch. Its
  ``<speech>`` becomes the ``T_enc(T) // 2`` adapter frames the release splices for it alone (the
  encoder reports ``T_enc(T)``, see :mod:`llmasr.encoders.firered`), rows are left-padded with the
  attention mask passed to ``generate``, and each row may generate as many tokens as it has speech
  positions (with ``--decode-max-len 0``).
* ``--compat-reference-padding`` (``SpeechLLM.compat_reference_padding``): the release's batched
  behaviour - every row gets all adapter frames of the padded batch, every position is attended, and
  ``max_new_tokens`` is the padded adapter length.

FireRedASR-AED: by default each utterance's step limit is its own padded encoder length (batch-size-1
results); ``--compat-reference-padding`` uses the padded batch's, as the release.
"""
from __future__ import annotations

import argparse
import glob
import logging
import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from llmasr.config import UserError, read_text_lines
from llmasr.io import atomic_write_text

logger = logging.getLogger(__name__)


def add_decode_args(parser: argparse.ArgumentParser) -> None:
    """Options with the released names (``--beam-size``; ``--beam_size`` also accepted)."""

    def opt(name, **kw):
        parser.add_argument(f"--{name}", f"--{name.replace('-', '_')}", **kw)

    opt("asr-type", required=True, choices=["aed", "llm"])
    opt("model-dir", required=True, help="released model directory (model.pth.tar, cmvn.ark, ...)")
    opt("wav-path", help="one wav file")
    opt("wav-paths", nargs="*", help="several wav files")
    opt("wav-dir", help="all *.wav below this directory")
    opt("wav-scp", help="'uttid path' per line")
    opt("output", help="write 'uttid<TAB>text' lines here")
    opt("ref-text", help="'uttid text' per line: also write icefall recogs/errs/wer-summary (CER) files")
    opt("batch-size", type=int, default=1)
    opt("beam-size", type=int, default=1)
    opt("decode-max-len", type=int, default=0)
    # FireRedASR-AED
    opt("nbest", type=int, default=1)
    opt("softmax-smoothing", type=float, default=1.0)
    opt("aed-length-penalty", type=float, default=0.0)
    opt("eos-penalty", type=float, default=1.0)
    # FireRedASR-LLM
    opt("decode-min-len", type=int, default=0)
    opt("repetition-penalty", type=float, default=1.0)
    opt("llm-length-penalty", type=float, default=0.0)
    opt("temperature", type=float, default=1.0)
    opt("compat-reference-padding", action="store_true",
        help="reproduce the released code's BATCHED results: AED step limit = padded encoder length of "
             "the batch; LLM: every row gets all adapter frames of the padded batch, no attention mask, "
             "max_new_tokens = padded adapter length. Without it every utterance gives the released "
             "code's batch-size-1 result, whatever the batch size.")
    opt("device", default="cuda" if torch.cuda.is_available() else "cpu")
    opt("dtype", default=None, choices=["float32", "float16", "bfloat16"],
        help="LLM dtype (default: float16 if the package says use_fp16, else float32); AED: Linear/Embedding "
             "weights cast to it, encoder and beam search under autocast (bfloat16 on CPUs with AVX512-BF16/AMX; "
             "default float32)")


def wav_list(args) -> List[Tuple[str, str]]:
    base = lambda p: os.path.basename(p).rsplit(".", 1)[0]  # noqa: E731
    if args.wav_path:
        return [(base(args.wav_path), args.wav_path)]
    if args.wav_paths:
        return [(base(p), p) for p in sorted(args.wav_paths)]
    if args.wav_scp:
        out = []
        root = Path(args.wav_scp).parent
        with open(args.wav_scp, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.split(maxsplit=1)
                if len(parts) != 2:
                    raise UserError(f"{args.wav_scp}:{lineno}: expected 'uttid path', got {line.rstrip()!r}")
                uttid, path = parts[0], parts[1].strip()
                if not os.path.isabs(path) and not os.path.exists(path):
                    # relative to the scp's directory or its parent (kaldi data dirs, FireRedASR examples)
                    for base_dir in (root, root.parent):
                        if (base_dir / path).exists():
                            path = str(base_dir / path)
                            break
                out.append((uttid, path))
        return out
    if args.wav_dir:
        return [(base(p), p) for p in sorted(glob.glob(f"{args.wav_dir}/**/*.wav", recursive=True))]
    raise UserError("give --wav-path, --wav-paths, --wav-dir or --wav-scp")


def read_text(path: str) -> Dict[str, str]:
    """'uttid text' lines (a line that is not UTF-8 is an error naming the file and line)."""
    out = {}
    for _, line in read_text_lines(path, "--ref-text"):
        parts = line.split(maxsplit=1)
        if parts:
            out[parts[0]] = parts[1] if len(parts) > 1 else ""
    return out


class Recognizer:
    def __init__(self, asr_type: str, model_dir: str, device: str = "cpu", dtype: Optional[str] = None,
                 compat_reference_padding: bool = False):
        from llmasr.checkpoint import inference_device, prepare_for_inference

        self.asr_type = asr_type
        self.device = inference_device(device)
        if asr_type == "aed":
            from .load import load_aed_dir

            self.features, self.model, self.tokenizer = load_aed_dir(model_dir)
            # matmul weights cast once, the rest fp32 under autocast
            prepare_for_inference(self.model, self.device, dtype, merge_lora=False)
        else:
            from .llm import load_firered_llm

            # (the LLM is loaded in ``dtype`` itself)
            self.features, self.model = load_firered_llm(model_dir, dtype=dtype,
                                                         compat_reference_padding=compat_reference_padding)
            prepare_for_inference(self.model, self.device, merge_lora=True)

    @torch.inference_mode()
    def transcribe(self, wavs: Sequence[str], args) -> List[str]:
        feats, lens, _ = self.features(list(wavs))
        feats, lens = feats.to(self.device), lens.to(self.device)
        if self.asr_type == "aed":
            hyps = self.model.transcribe(feats, lens, args.beam_size, args.nbest, args.decode_max_len,
                                         args.softmax_smoothing, args.aed_length_penalty, args.eos_penalty,
                                         compat_reference_padding=args.compat_reference_padding)
            return [self.tokenizer.detokenize(h[0]["yseq"].tolist()) for h in hyps]
        from .llm import generation_options

        return self.model.decode(feats, lens, **generation_options(
            args.beam_size, args.decode_max_len, args.decode_min_len, args.repetition_penalty,
            args.llm_length_penalty, args.temperature))


def run(args) -> List[Tuple[str, str]]:
    wavs = wav_list(args)
    if not wavs:
        raise UserError("no wavs to decode")
    rec = Recognizer(args.asr_type, args.model_dir, args.device, args.dtype, args.compat_reference_padding)
    results: List[Tuple[str, str]] = []
    start = time.time()
    for i in range(0, len(wavs), args.batch_size):
        batch = wavs[i : i + args.batch_size]
        texts = rec.transcribe([p for _, p in batch], args)
        for (uttid, _), text in zip(batch, texts):
            logger.info(f"{uttid}\t{text}")
            results.append((uttid, text))
    elapsed = time.time() - start
    logger.info(f"decoded {len(results)} utterances in {elapsed:.2f} s")
    if args.output:
        # one line per utterance even if a hypothesis contains line breaks
        atomic_write_text(args.output, "".join(f"{u}\t{' '.join(t.splitlines())}\n" for u, t in results))
    if args.ref_text:
        from llmasr.scoring import write_results

        refs = read_text(args.ref_text)
        missing = [u for u, _ in results if u not in refs]
        if missing:
            raise UserError(f"{args.ref_text}: no reference for {missing[:5]}")
        out_dir = Path(args.output).parent if args.output else Path(".")
        write_results(out_dir, Path(args.ref_text).parent.name or "test", f"{args.asr_type}-beam{args.beam_size}",
                      [(u, refs[u], t) for u, t in results], mode="cer")
    return results
