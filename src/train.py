#!/usr/bin/env python3
"""Train an LLM-based ASR model: speech encoder -> projector -> Qwen2 (+LoRA), as zhu-han/SpeechLLM.

    python src/train.py --world-size 4 --max-duration 200 --num-epochs 10 \
      --exp-dir exp/speechllm --manifest-dir data/fbank \
      --llm-path models/qwen2-1.5b-instruct \
      --speech-encoder-type large \
      --speech-encoder-path models/zipformer/librispeech/transducer_crctc_large/pretrained.pt

Resume with --start-epoch N (from epoch-(N-1).pt) or --start-batch B (from checkpoint-B.pt).
DeepSpeed: torchrun --nproc_per_node 4 src/train.py --deepspeed true \
  --deepspeed-config local/conf/ds_zero2.json --optimizer adamw --base-lr 1e-4 ...
"""
from llmasr.config import run_cli
from llmasr.recipes.train import main as train


def main(argv=None):
    """A bad input is one line on stderr and exit status 1 (--debug: the traceback)."""
    return run_cli(lambda args: train(model_type="speechllm", argv=args), argv)


if __name__ == "__main__":
    main()
