#!/usr/bin/env python3
"""Stage 3 of local/prepare.sh: manifests -> cuts with stored features (lhotse Fbank, WhisperFbank or
FireRedASR fbank + CMVN).

Writes <fbank-dir>/<prefix>_cuts_<part>.jsonl.gz (features in <prefix>_feats_<part>/, lilcom
compressed chunked archives) and, with --combine-train, <prefix>_cuts_train-all-shuf.jsonl.gz
holding every train part present, shuffled.

--feature-type firered needs --firered-cmvn (the model's cmvn.ark). FireRedASR frames with
snip_edges (1 + (num_samples - 400) // 160 frames) while lhotse manifests need
round(duration / 10 ms) frames, 2-3 more: the stored matrix is FireRedASR's features followed by
zero frames (0 = FireRedASR's padding value after CMVN; see llmasr.features.firered.FireRedFbank),
so its first frames are exactly the reference features.
"""
import argparse
import logging
import os
from pathlib import Path


from lhotse.features.base import FeatureExtractor

from llmasr.config import UserError, run_cli
from llmasr.data.corpus import combine_shuffled, compute_features
from llmasr.features import FEATURE_TYPES, make_feature_extractor


def check_firered_cmvn(feature_type: str, cmvn) -> None:
    """--feature-type firered without a readable cmvn.ark would silently store un-normalised fbank."""
    if feature_type != "firered":
        return
    if not cmvn:
        raise UserError("--feature-type firered needs --firered-cmvn, the cmvn.ark of the FireRedASR model "
                         "(e.g. models/FireRedASR-AED-L/cmvn.ark)")
    if not os.path.isfile(cmvn) or not os.access(cmvn, os.R_OK):
        raise UserError(f"--firered-cmvn {cmvn}: cmvn.ark not found or not readable")


def storage_extractor(feature_type: str, num_mel_bins: int, firered_cmvn=None) -> FeatureExtractor:
    """The extractor whose output prepare.sh stores (checks the cmvn.ark first)."""
    check_firered_cmvn(feature_type, firered_cmvn)
    return make_feature_extractor(feature_type, num_mel_bins, firered_cmvn)


def main(argv=None) -> None:
    """A bad input is one line on stderr and exit status 1 (--debug: the traceback)."""
    run_cli(_compute, argv)


def _compute(argv) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest-dir", type=Path, default=Path("data/manifests"))
    p.add_argument("--fbank-dir", type=Path, default=Path("data/fbank"))
    p.add_argument("--prefix", required=True)
    p.add_argument("--parts", nargs="*", default=None, help="default: every part with manifests")
    p.add_argument("--feature-type", default="fbank", choices=list(FEATURE_TYPES))
    p.add_argument("--num-mel-bins", type=int, default=80, help="80; 128 for Whisper large-v3")
    p.add_argument("--firered-cmvn", default=None,
                   help="cmvn.ark of the FireRedASR model (required for --feature-type firered)")
    p.add_argument("--nj", type=int, default=1)
    p.add_argument("--combine-train", nargs="*", default=None,
                   help="parts to concatenate+shuffle into <prefix>_cuts_train-all-shuf (missing ones ignored)")
    p.add_argument("--seed", type=int, default=42, help="shuffling seed of train-all-shuf")
    args = p.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s [%(filename)s:%(lineno)d] %(message)s",
                        level=logging.INFO)
    extractor = storage_extractor(args.feature_type, args.num_mel_bins, args.firered_cmvn)
    done = compute_features(args.manifest_dir, args.fbank_dir, args.prefix, extractor,
                            num_jobs=args.nj, parts=args.parts)
    if args.combine_train:
        train = [done[p] for p in args.combine_train if p in done]
        if not train:
            logging.warning(f"none of the train parts {args.combine_train} present: no train-all-shuf")
            return
        out = args.fbank_dir / f"{args.prefix}_cuts_train-all-shuf.jsonl.gz"
        n = combine_shuffled(train, out, seed=args.seed)
        logging.info(f"{out}: {n} cuts from {[p.name for p in train]}")


if __name__ == "__main__":
    main()
