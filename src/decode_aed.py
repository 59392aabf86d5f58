#!/usr/bin/env python3
"""Decode a FireRedASR-AED fine-tuned with src/train_aed.py; the decode recipe of src/decode.py
(--epoch/--avg/--iter/--checkpoint, <exp-dir>/decode-<checkpoint>-<options>/ with recogs-/errs-/
wer-summary- files, CER by default) with FireRedASR's beam-search options:

    python3 src/decode_aed.py --init-from models/FireRedASR-AED-L --exp-dir exp/firered_aed \
      --epoch 3 --avg 2 --manifest-dir data/fbank_firered --dataset-prefix aishell --test-sets dev,test \
      --max-duration 200 --beam-size 3 --softmax-smoothing 1.25 --aed-length-penalty 0.6 --eos-penalty 1.0

Each utterance gets its own step limit (--decode-max-len 0: its encoder length), so batching never
changes a hypothesis.

Under ``torchrun --nproc-per-node N`` each rank decodes a share of every test set (same files as one
process); a killed decode resumes (see src/decode.py, README "Decoding at scale").
"""

from llmasr.config import run_cli
from llmasr.recipes.decode import main as decode


def main(argv=None):
    """A bad input is one line on stderr and exit status 1 (--debug: the traceback)."""
    return run_cli(lambda args: decode(args, model_type="aed"), argv)


if __name__ == "__main__":
    main()
