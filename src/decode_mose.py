#!/usr/bin/env python3
"""Decode a MoSE model (several speech encoders, one prompt group each); SpeechLLM flags.

    python3 src/decode_mose.py --exp-dir exp/asr_librispeech_zipformer_mose_qwen2_1.5B --epoch 10 --avg 5 \
      --speech-encoder-type large,large,large,large \
      --speech-encoder-path a/pretrained.pt,b/pretrained.pt,c/pretrained.pt,d/pretrained.pt \
      --max-duration 2000 --manifest-dir data/fbank

Every encoder fills its own <start_speech><speech><end_speech> group at decoding time. Otherwise
identical to src/decode.py.

Under ``torchrun --nproc-per-node N`` each rank decodes a share of every test set (same files as one
process); a killed decode resumes (see src/decode.py, README "Decoding at scale").
"""

from llmasr.config import run_cli
from llmasr.recipes.decode import main as decode


def main(argv=None):
    """A bad input is one line on stderr and exit status 1 (--debug: the traceback)."""
    return run_cli(lambda args: decode(args, model_type="mose"), argv)


if __name__ == "__main__":
    main()
