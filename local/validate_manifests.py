#!/usr/bin/env python3
"""Last stage of local/prepare.sh: check cut manifests (features present, readable, finite, shapes
and durations consistent, transcripts non-empty). Exits 1 listing every problem."""
import argparse
import logging
import sys
from pathlib import Path


from llmasr.config import run_cli
from llmasr.data.corpus import validate_cuts_file


def main(argv=None) -> None:
    run_cli(_validate, argv)


def _validate(argv) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("manifests", nargs="+", type=Path)
    p.add_argument("--nj", type=int, default=1)
    p.add_argument("--read-features", type=int, default=1, help="0: metadata checks only (fast)")
    args = p.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s [%(filename)s:%(lineno)d] %(message)s",
                        level=logging.INFO)
    bad = 0
    for m in args.manifests:
        problems = validate_cuts_file(m, read_features=bool(args.read_features), num_jobs=args.nj)
        for msg in problems:
            logging.error(msg)
        bad += len(problems)
        logging.info(f"{m}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
