#!/usr/bin/env python3
"""Export a FireRedASR-AED fine-tuned with src/train_aed.py as a released-format directory
(model.pth.tar, cmvn.ark, dict.txt, train_bpe1000.model), which src/firered_speech2text.py and the
released FireRedASR code load (icefall's export.py: --epoch/--avg/--iter/--checkpoint as in decoding):

    python3 src/export_aed.py --init-from models/FireRedASR-AED-L --exp-dir exp/firered_aed \
      --epoch 3 --avg 2 --export-dir exp/firered_aed/FireRedASR-AED-L-epoch-3-avg-2
"""
import argparse
import logging
from pathlib import Path

from llmasr import checkpoint as ckpt_lib
from llmasr.config import run_cli
from llmasr.firered.aed_recipe import build_aed_model, export_released


def main(argv=None):
    """A bad input is one line on stderr and exit status 1 (--debug: the traceback)."""
    return run_cli(_export, argv)


def _export(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init-from", required=True, metavar="DIR", help="The released directory training started from.")
    p.add_argument("--exp-dir", type=Path, default=Path("exp/firered_aed"))
    p.add_argument("--checkpoint", type=str, default=None, help="One checkpoint file in --exp-dir (or a path).")
    p.add_argument("--epoch", type=int, default=-1, help="epoch-<epoch>.pt, averaged with the --avg - 1 before it.")
    p.add_argument("--iter", type=int, default=0, help="If > 0, average the --avg newest checkpoint-<batch>.pt "
                   "with batch <= --iter.")
    p.add_argument("--avg", type=int, default=1)
    p.add_argument("--export-dir", type=Path, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.checkpoint:
        path = Path(args.checkpoint)
        path = path if path.is_file() else args.exp_dir / path
        state_dict, source = ckpt_lib.load_checkpoint(path)["model"], str(path)
    else:
        state_dict = ckpt_lib.averaged_checkpoint(args.exp_dir, args.epoch, args.avg, args.iter or None)
        source = f"{args.exp_dir} epoch {args.epoch} / iter {args.iter}, avg {args.avg}"
    model = build_aed_model(args)
    ckpt_lib.load_model_state(model, state_dict, source=source)
    export_released(model, args.init_from, args.export_dir)


if __name__ == "__main__":
    main()
