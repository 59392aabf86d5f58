#!/usr/bin/env python3
"""Synthesise a demo/test corpus with espeak-ng (+ sox) in the LibriSpeech (--lang en) or AISHELL-1
(--lang cmn) layout under --out-dir, ready for `local/prepare.sh --dl-dir <out-dir>`:

  local/make_espeak_corpus.py --out-dir download --num-train 400 --num-test 50 --seed 0
  local/prepare.sh --dl-dir download --nj 4

  local/make_espeak_corpus.py --lang cmn --out-dir download --num-train 400 --num-test 50
  local/prepare.sh --corpus aishell --dl-dir download

  # the built-in demo's corpus: half open-domain text, more voices, + held-out test sets
  local/make_espeak_corpus.py --out-dir download --num-train 600 --num-test 30 --markov-fraction 0.5 \
    --more-voices --num-heldout 30
  local/prepare.sh --corpus kaldi --name heldout --dl-dir download/heldout --feature-type whisper

See llmasr.demo.espeak (data/README.md) for voices, sentences and layout.
"""
import argparse
import logging
from pathlib import Path


from llmasr.config import run_cli
from llmasr.demo.espeak import make_espeak_corpus, make_heldout_sets, read_corpus_transcripts


def main(argv=None) -> None:
    run_cli(_make, argv)


def _make(argv) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, required=True, help="download dir (--dl-dir of prepare.sh)")
    p.add_argument("--lang", default="en", choices=["en", "cmn"])
    p.add_argument("--num-train", type=int, default=200)
    p.add_argument("--num-train-extra", type=int, default=0,
                   help="English: a second training subset (train-clean-360) made like train-clean-100")
    p.add_argument("--num-dev", type=int, default=None, help="default: --num-test")
    p.add_argument("--num-test", type=int, default=50)
    p.add_argument("--num-test-other", type=int, default=None,
                   help="English test-other (faster, extreme pitch); default: --num-test")
    p.add_argument("--utts-per-speaker", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nj", type=int, default=None, help="parallel synthesis jobs (default: min(8, cpus))")
    p.add_argument("--markov-fraction", type=float, default=0.0,
                   help="English: share of train/dev sentences from open-domain Markov text (essential-generators)")
    p.add_argument("--markov-max-words", type=int, default=12)
    p.add_argument("--common-fraction", type=float, default=0.0,
                   help="share of train/dev sentences that are random sequences of common words (English: wordfreq's "
                   "frequent words; Mandarin: faker's list)")
    p.add_argument("--more-voices", action="store_true", help="also espeak-ng's named voice variants")
    p.add_argument("--num-heldout", type=int, default=0,
                   help="also write the novel-shape and open-domain test sets (this many utterances each, voices "
                   "not in training) as Kaldi dirs under <out-dir>/heldout (local/prepare.sh --corpus kaldi)")
    args = p.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s [%(filename)s:%(lineno)d] %(message)s",
                        level=logging.INFO)
    root = make_espeak_corpus(args.out_dir, lang=args.lang, num_train=args.num_train, num_test=args.num_test,
                              num_dev=args.num_dev, num_test_other=args.num_test_other, seed=args.seed,
                              utts_per_speaker=args.utts_per_speaker, num_jobs=args.nj,
                              markov_fraction=args.markov_fraction, markov_max_words=args.markov_max_words,
                              more_voices=args.more_voices, common_fraction=args.common_fraction,
                              num_train_extra=args.num_train_extra)
    logging.info(f"corpus written to {root}")
    if args.num_heldout:
        seen = {t.lower() if args.lang == "en" else t.replace(" ", "") for _, t in read_corpus_transcripts(root).values()}
        heldout = make_heldout_sets(args.out_dir / "heldout", args.lang, num_per_set=args.num_heldout, seed=args.seed,
                                    exclude=seen, num_jobs=args.nj)
        logging.info(f"held-out sets written to {heldout} (local/prepare.sh --corpus kaldi --name heldout "
                     f"--dl-dir {heldout})")


if __name__ == "__main__":
    main()
