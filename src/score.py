#!/usr/bin/env python3
"""Re-score recogs-*.txt files (ours or icefall's): WER/CER with the toolkit's normalisation.

    python3 src/score.py exp/<dir>/<decode dir>/recogs-test-clean-*.txt [--mode cer] [--normalize en]
"""
from llmasr.config import run_cli
from llmasr.scoring import main as score


def main(argv=None):
    return run_cli(score, argv)


if __name__ == "__main__":
    main()
