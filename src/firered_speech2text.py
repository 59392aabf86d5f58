#!/usr/bin/env python3
"""Decode wavs with a released FireRedASR-AED or FireRedASR-LLM directory (like FireRedASR's speech2text.py).

  python src/firered_speech2text.py --asr-type aed --model-dir models/FireRedASR-AED-L \
      --wav-scp data/test/wav.scp --output exp/firered/aed.txt \
      --batch-size 2 --beam-size 3 --nbest 1 --decode-max-len 0 --softmax-smoothing 1.25 \
      --aed-length-penalty 0.6 --eos-penalty 1.0

  python src/firered_speech2text.py --asr-type llm --model-dir models/FireRedASR-LLM-L \
      --wav-scp data/test/wav.scp --output exp/firered/llm.txt --batch-size 1 --beam-size 3 \
      --decode-max-len 0 --decode-min-len 0 --repetition-penalty 3.0 --llm-length-penalty 1.0 --temperature 1.0

By default every utterance gets exactly the released code's batch-size-1 result, whatever --batch-size;
add --compat-reference-padding to reproduce its batched results (padding frames attended) instead.
"""
import argparse
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llmasr.config import run_cli
from llmasr.firered.decode import add_decode_args, run


def main(argv=None):
    return run_cli(_speech2text, argv)


def _speech2text(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_decode_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for uttid, text in run(args):
        print(f"{uttid}\t{text}")


if __name__ == "__main__":
    main()
