#!/usr/bin/env python3
"""Train SpeechLLM-MoSE: several speech encoders, one projector each, one LLM (zhu-han/SpeechLLM
train_mose.py). Same options as train.py; the encoder flags take comma-separated lists:

    python src/train_mose.py --world-size 4 --max-duration 200 --num-epochs 10 \
      --exp-dir exp/speechllm_mose --manifest-dir data/fbank \
      --speech-encoder-type large,large,large,large \
      --speech-encoder-path a/pretrained.pt,b/pretrained.pt,c/pretrained.pt,d/pretrained.pt

During training each encoder's <speech> group is dropped from a prompt with probability 1/N.
"""
from llmasr.config import run_cli
from llmasr.recipes.train import main as train


def main(argv=None):
    """A bad input is one line on stderr and exit status 1 (--debug: the traceback)."""
    return run_cli(lambda args: train(model_type="mose", argv=args), argv)


if __name__ == "__main__":
    main()
