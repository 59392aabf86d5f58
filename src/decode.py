#!/usr/bin/env python3
"""Decode a Zipformer (or other single-encoder) + LLM model; icefall / SpeechLLM flags.

    python3 src/decode.py --exp-dir exp/asr_librispeech_zipformer_qwen2_1.5B --epoch 10 --avg 5 \
      --max-duration 2000 --manifest-dir data/fbank --test-sets test-clean,test-other

``--epoch E --avg A`` averages epoch-(E-A+1..E).pt (every time, as the reference recipes) and writes
the result as epoch-E-avg-A.pt; ``--checkpoint epoch-10-avg-5.pt`` loads that file from --exp-dir
instead. Results (recogs-/errs-/wer-summary- files and the log) go to <exp-dir>/decode-<checkpoint>-beam<B>/.

Sharded and resumable (llmasr.decoding_shards, README "Decoding at scale"):

    torchrun --standalone --nproc-per-node 4 src/decode.py ...   # the same flags; byte-identical files

each rank decodes whole batches of the one-process plan (so also --compat-reference-padding results are
those of one process); a killed decode started again with the same flags decodes only the batches its
partial files (<decode dir>/.partial/) do not hold; --resume false starts over.
"""

from llmasr.config import run_cli
from llmasr.recipes.decode import main as decode


def main(argv=None):
    """A bad input is one line on stderr and exit status 1 (--debug: the traceback)."""
    return run_cli(lambda args: decode(args), argv)


if __name__ == "__main__":
    main()
