#!/usr/bin/env python3
"""Optional MUSAN stage of local/prepare.sh: <dl-dir>/musan -> <fbank-dir>/musan_cuts.jsonl.gz
(lhotse recipe manifests, recordings cut into 10 s windows, windows > 5 s kept, stored features;
audio only for --feature-type firered, whose CMVN-normalised features cannot be mixed)."""
import argparse
import logging
from pathlib import Path


from lhotse import CutSet, combine
from lhotse.recipes import prepare_musan

from llmasr.config import UserError, run_cli
from llmasr.features import FEATURE_TYPES, default_storage_type, make_feature_extractor
from llmasr.io import atomic_write


def main(argv=None) -> None:
    run_cli(_compute, argv)


def _compute(argv) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--musan-dir", type=Path, required=True)
    p.add_argument("--manifest-dir", type=Path, default=Path("data/manifests"))
    p.add_argument("--fbank-dir", type=Path, default=Path("data/fbank"))
    p.add_argument("--feature-type", default="fbank", choices=list(FEATURE_TYPES))
    p.add_argument("--num-mel-bins", type=int, default=80)
    p.add_argument("--firered-cmvn", default=None, help="cmvn.ark of the FireRedASR model (firered only)")
    p.add_argument("--nj", type=int, default=1)
    args = p.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s [%(filename)s:%(lineno)d] %(message)s",
                        level=logging.INFO)
    out = args.fbank_dir / "musan_cuts.jsonl.gz"
    if out.is_file():
        logging.info(f"{out} exists - skipping")
        return
    if not args.musan_dir.is_dir():
        raise UserError(f"MUSAN not found: {args.musan_dir}")
    manifests = prepare_musan(args.musan_dir, args.manifest_dir)
    recordings = combine(m["recordings"] for m in manifests.values())
    cuts = (CutSet.from_manifests(recordings=recordings).cut_into_windows(10.0)
            .filter(lambda c: c.duration > 5).to_eager())
    args.fbank_dir.mkdir(parents=True, exist_ok=True)
    if args.feature_type == "firered":
        # lhotse mixes stored features in the log-energy domain (extractor.mix); FireRedASR's
        # CMVN-normalised features have no such mix. Audio-only noise cuts work with
        # --on-the-fly-feats true (CutMix then mixes audio before the features are computed).
        logging.info("--feature-type firered: storing MUSAN cuts without features (audio-domain mixing "
                     "with --enable-musan true --on-the-fly-feats true)")
    else:
        cuts = cuts.compute_and_store_features(
            extractor=make_feature_extractor(args.feature_type, args.num_mel_bins, args.firered_cmvn),
            storage_path=args.fbank_dir / "musan_feats",
            num_jobs=args.nj if args.nj > 1 else None,
            storage_type=default_storage_type(),
            progress_bar=False,
        )
    atomic_write(out, cuts.to_file)
    logging.info(f"{out}: {len(cuts)} noise cuts")


if __name__ == "__main__":
    main()
