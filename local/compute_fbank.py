#!/usr/bin/env python3
"""Stage 3 of local/prepare.sh: manifests -> cuts with stored features (lhotse Fbank or WhisperFbank).

Writes <fbank-dir>/<prefix>_cuts_<part>.jsonl.gz (features in <prefix>_feats_<part>/, lilcom
compressed chunked archives) and, with --combine-train, <prefix>_cuts_train-all-shuf.jsonl.gz
holding every train part present, shuffled.
"""
import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from llmasr.data.corpus import CorpusError, combine_shuffled, compute_features  # noqa: E402
from llmasr.data.features import make_feature_extractor  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest-dir", type=Path, default=Path("data/manifests"))
    p.add_argument("--fbank-dir", type=Path, default=Path("data/fbank"))
    p.add_argument("--prefix", required=True)
    p.add_argument("--parts", nargs="*", default=None, help="default: every part with manifests")
    p.add_argument("--feature-type", default="fbank", choices=["fbank", "whisper"])
    p.add_argument("--num-mel-bins", type=int, default=80, help="80; 128 for Whisper large-v3")
    p.add_argument("--nj", type=int, default=1)
    p.add_argument("--combine-train", nargs="*", default=None,
                   help="parts to concatenate+shuffle into <prefix>_cuts_train-all-shuf (missing ones ignored)")
    p.add_argument("--seed", type=int, default=42, help="shuffling seed of train-all-shuf")
    args = p.parse_args()
    logging.basicConfig(format="%(asctime)s %(levelname)s [%(filename)s:%(lineno)d] %(message)s",
                        level=logging.INFO)
    try:
        extractor = make_feature_extractor(args.feature_type, args.num_mel_bins)
        done = compute_features(args.manifest_dir, args.fbank_dir, args.prefix, extractor,
                                num_jobs=args.nj, parts=args.parts)
    except (CorpusError, ValueError) as e:
        logging.error(str(e))
        sys.exit(1)
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
