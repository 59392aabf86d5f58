#!/usr/bin/env python3
"""Decode a MoSE model (several speech encoders, one prompt group each); SpeechLLM flags.

    python3 src/decode_mose.py --exp-dir exp/asr_librispeech_zipformer_mose_qwen2_1.5B --epoch 10 --avg 5 \
      --speech-encoder-type large,large,large,large \
      --speech-encoder-path a/pretrained.pt,b/pretrained.pt,c/pretrained.pt,d/pretrained.pt \
      --max-duration 2000 --manifest-dir data/fbank

Every encoder fills its own <start_speech><speech><end_speech> group at decoding time. Otherwise
identical to src/decode.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from llmasr.config import parse_args_with_config, run_cli  # noqa: E402
from llmasr.recipes.decode import get_decode_parser, run_decode  # noqa: E402


def main(argv=None):
    """A bad input is one line on stderr and exit status 1 (--debug: the traceback)."""
    return run_cli(_decode, argv)


def _decode(argv):
    args = parse_args_with_config(get_decode_parser(mose=True), argv, section="decode", inherit="train")
    with torch.inference_mode():
        return run_decode(args, mose=True)


if __name__ == "__main__":
    main()
