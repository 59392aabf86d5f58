#!/usr/bin/env python3
"""Fine-tune FireRedASR-AED (label-smoothed CE) from released weights, or train it from scratch.

  python src/train_aed.py --init-from models/FireRedASR-AED-L --exp-dir exp/firered_aed \
      --train-cuts data/fbank/aishell_cuts_train.jsonl.gz --valid-cuts data/fbank/aishell_cuts_dev.jsonl.gz \
      --test-cuts data/fbank/aishell_cuts_test.jsonl.gz --max-duration 200 --num-epochs 3 --lr 1e-5 \
      --dropout-schedule "0:0.0,2000:0.1" --spec-aug-schedule "0:0,4000:1" --use-bf16

Only the cuts' audio and texts are used: features are recomputed with FireRedASR's own front end
(Kaldi fbank + the model's cmvn.ark). Decode only: --decode-only --epoch N --avg K --test-cuts ...
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from llmasr.firered.train import add_train_args, main  # noqa: E402
from llmasr.training.logs import setup_logger  # noqa: E402


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(parser)
    args = parser.parse_args()
    Path(args.exp_dir).mkdir(parents=True, exist_ok=True)
    setup_logger(Path(args.exp_dir) / "log" / ("log-decode" if args.decode_only else "log-train"))
    main(args)
