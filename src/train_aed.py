#!/usr/bin/env python3
"""Fine-tune FireRedASR-AED (label-smoothed CE of its attention decoder) with the shared training
recipe: same flags, checkpoints, resume and logs as src/train.py.

    python3 src/train_aed.py --world-size 4 --init-from models/FireRedASR-AED-L \
      --exp-dir exp/firered_aed --manifest-dir data/fbank_firered --dataset-prefix aishell \
      --train-cuts train --dev-cuts dev --max-duration 200 --num-epochs 3 --base-lr 1e-5 \
      --use-bf16 true --dropout-schedule "0:0.0,2000:0.1"

Features: --feature-type firered (the default here) reads manifests from
local/prepare.sh --feature-type firered --firered-cmvn models/FireRedASR-AED-L/cmvn.ark, or computes them
with --on-the-fly-feats true --firered-cmvn models/FireRedASR-AED-L/cmvn.ark. Resume with --start-epoch N
(from epoch-(N-1).pt) or --start-batch B (from checkpoint-B.pt). Decode with src/decode_aed.py, export a
released-format directory with src/export_aed.py.
"""
from llmasr.config import run_cli
from llmasr.recipes.train import main as train


def main(argv=None):
    """A bad input is one line on stderr and exit status 1 (--debug: the traceback)."""
    return run_cli(lambda args: train(model_type="aed", argv=args), argv)


if __name__ == "__main__":
    main()
