#!/usr/bin/env python3
"""Stage 1 of local/prepare.sh: corpus -> lhotse recording/supervision manifests.

Every utterance is checked (audio present, readable, 16 kHz, transcript non-empty, segment inside
the audio); bad ones are logged with id, file and reason, counted, and listed in
<output-dir>/<prefix>_skipped_<part>.tsv. See llmasr.data.corpus.
"""
import argparse
import logging
from pathlib import Path


from llmasr.config import run_cli, str2bool
from llmasr.data.corpus import prepare_manifests


def main(argv=None) -> None:
    """A bad corpus is one line on stderr and exit status 1 (--debug: the traceback)."""
    run_cli(_prepare, argv)


def _prepare(argv) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, choices=["librispeech", "aishell", "kaldi"])
    p.add_argument("--corpus-dir", required=True, type=Path,
                   help="LibriSpeech: <dl>/LibriSpeech; AISHELL: <dl>/aishell (holding data_aishell); "
                        "kaldi: a data dir with wav.scp/text[/segments/utt2spk] or a dir of such dirs")
    p.add_argument("--output-dir", type=Path, default=Path("data/manifests"))
    p.add_argument("--prefix", required=True, help="manifest name prefix, e.g. librispeech")
    p.add_argument("--nj", type=int, default=1, help="parallel jobs for reading audio headers")
    p.add_argument("--parts", nargs="*", default=None, help="LibriSpeech parts (default: all present)")
    p.add_argument("--part", default=None, help="kaldi: part name when --corpus-dir is one data dir")
    p.add_argument("--language", default=None, help="kaldi: language stored in the supervisions")
    p.add_argument("--resample", type=str2bool, default=False,
                   help="keep non-16 kHz audio and resample it on load (default: skip it)")
    p.add_argument("--max-skip-fraction", type=float, default=0.2,
                   help="fail when more than this fraction of a part is unusable")
    args = p.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s [%(filename)s:%(lineno)d] %(message)s",
                        level=logging.INFO)
    prepare_manifests(args.corpus, args.corpus_dir, args.output_dir, args.prefix, num_jobs=args.nj,
                      resample=args.resample, max_skip_fraction=args.max_skip_fraction,
                      parts=args.parts, part=args.part, language=args.language)


if __name__ == "__main__":
    main()
