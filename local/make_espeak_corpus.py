#!/usr/bin/env python3
"""Synthesise a demo/test corpus with espeak-ng (+ sox) in the LibriSpeech (--lang en) or AISHELL-1
(--lang cmn) layout under --out-dir, ready for `local/prepare.sh --dl-dir <out-dir>`:

  local/make_espeak_corpus.py --out-dir download --num-train 400 --num-test 50 --seed 0
  local/prepare.sh --dl-dir download --nj 4

  local/make_espeak_corpus.py --lang cmn --out-dir download --num-train 400 --num-test 50
  local/prepare.sh --corpus aishell --dl-dir download

See llmasr.demo.espeak (data/README.md) for voices, sentences and layout.
"""
import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from llmasr.demo.espeak import make_espeak_corpus  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, required=True, help="download dir (--dl-dir of prepare.sh)")
    p.add_argument("--lang", default="en", choices=["en", "cmn"])
    p.add_argument("--num-train", type=int, default=200)
    p.add_argument("--num-dev", type=int, default=None, help="default: --num-test")
    p.add_argument("--num-test", type=int, default=50)
    p.add_argument("--num-test-other", type=int, default=None,
                   help="English test-other (faster, extreme pitch); default: --num-test")
    p.add_argument("--utts-per-speaker", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nj", type=int, default=None, help="parallel synthesis jobs (default: min(8, cpus))")
    args = p.parse_args()
    logging.basicConfig(format="%(asctime)s %(levelname)s [%(filename)s:%(lineno)d] %(message)s",
                        level=logging.INFO)
    root = make_espeak_corpus(args.out_dir, lang=args.lang, num_train=args.num_train, num_test=args.num_test,
                              num_dev=args.num_dev, num_test_other=args.num_test_other, seed=args.seed,
                              utts_per_speaker=args.utts_per_speaker, num_jobs=args.nj)
    logging.info(f"corpus written to {root}")


if __name__ == "__main__":
    main()
