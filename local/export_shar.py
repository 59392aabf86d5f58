#!/usr/bin/env python3
"""Export cut manifests to lhotse Shar shards, for training from corpora that do not fit one disk or
are read over the network (local/prepare.sh stage 5 with --shar-shard-size N).

    local/export_shar.py data/fbank/librispeech_cuts_train-all-shuf.jsonl.gz data/shar/librispeech \\
        --shard-size 1000 --features lilcom

writes data/shar/librispeech/cuts.000000.jsonl.gz + features.000000.tar, cuts.000001..., one pair per
--shard-size cuts, in the manifest's order (shuffle it first: train-all-shuf is). Train with
``--train-cuts data/shar/librispeech`` (every rank reads its own shards; mux weights work:
``--train-cuts data/shar/a:0.7,data/shar/b:0.3``). ``--features numpy`` keeps the stored float32
features bit for bit, ``lilcom`` (lhotse's default) compresses them lossily (about 1/3 of the size);
``--audio flac`` stores the audio instead/as well, for ``--on-the-fly-feats true``.
"""
import argparse
import logging
from pathlib import Path


from llmasr.config import UserError, run_cli
from llmasr.data.corpus import load_cuts_lazy


def main(argv=None) -> None:
    run_cli(_export, argv)


def _export(argv) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", type=Path, help="cuts manifest (.jsonl.gz) with stored features and/or audio")
    p.add_argument("output_dir", type=Path, help="Shar directory to create (must not hold shards yet)")
    p.add_argument("--shard-size", type=int, default=1000,
                   help="cuts per shard; keep the shard count a multiple of the number of training processes "
                        "(each reads its own shards, the epoch ends at the rank with the fewest batches)")
    p.add_argument("--features", choices=["lilcom", "numpy", "none"], default="lilcom",
                   help="how to store the cuts' features (none: do not export them)")
    p.add_argument("--audio", choices=["flac", "wav", "none"], default="none",
                   help="how to store the cuts' audio (for --on-the-fly-feats true)")
    p.add_argument("--num-jobs", type=int, default=1, help="parallel export processes")
    args = p.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s [%(filename)s:%(lineno)d] %(message)s",
                        level=logging.INFO)
    if not args.manifest.is_file():
        raise UserError(f"cut manifest not found: {args.manifest}")
    if args.shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {args.shard_size}")
    fields = {}
    if args.features != "none":
        fields["features"] = args.features
    if args.audio != "none":
        fields["recording"] = args.audio
    if not fields:
        raise UserError("--features none and --audio none: nothing to train from would be exported")
    if args.output_dir.is_dir() and any(args.output_dir.glob("cuts.*")):
        raise UserError(f"{args.output_dir} already holds Shar shards: remove them or choose another directory")

    cuts = load_cuts_lazy(args.manifest)
    first = next(iter(cuts), None)
    if first is None:
        raise UserError(f"{args.manifest}: no cuts")
    if "features" in fields and not first.has_features:
        raise UserError(f"cut {first.id} of {args.manifest} has no stored features: use --features none --audio flac")
    if "recording" in fields and not first.has_recording:
        raise UserError(f"cut {first.id} of {args.manifest} has no recording: use --audio none")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    written = cuts.to_shar(args.output_dir, fields=fields, shard_size=args.shard_size, num_jobs=args.num_jobs,
                           warn_unused_fields=False)
    logging.info(f"{args.output_dir}: {len(written['cuts'])} shards of {sorted(written)} "
                 f"from {args.manifest}")


if __name__ == "__main__":
    main()
