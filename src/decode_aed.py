#!/usr/bin/env python3
"""Decode a FireRedASR-AED fine-tuned with src/train_aed.py; the decode recipe of src/decode.py
(--epoch/--avg/--iter/--checkpoint, <exp-dir>/decode-<checkpoint>-<options>/ with recogs-/errs-/
wer-summary- files, CER by default) with FireRedASR's beam-search options:

    python3 src/decode_aed.py --init-from models/FireRedASR-AED-L --exp-dir exp/firered_aed \
      --epoch 3 --avg 2 --manifest-dir data/fbank_firered --dataset-prefix aishell --test-sets dev,test \
      --max-duration 200 --beam-size 3 --softmax-smoothing 1.25 --aed-length-penalty 0.6 --eos-penalty 1.0

Each utterance gets its own step limit (--decode-max-len 0: its encoder length), so batching never
changes a hypothesis.
"""
import torch

from llmasr.config import parse_args_with_config, run_cli
from llmasr.recipes.decode import get_decode_parser, run_decode


def main(argv=None):
    """A bad input is one line on stderr and exit status 1 (--debug: the traceback)."""
    return run_cli(_decode, argv)


def _decode(argv):
    args = parse_args_with_config(get_decode_parser(model_type="aed"), argv, section="decode", inherit="train")
    with torch.inference_mode():
        return run_decode(args)


if __name__ == "__main__":
    main()
