#!/usr/bin/env python3
"""The built-in demo: build a corpus, train an LLM-based recogniser on a CPU, decode and score it.

    bash local/run_demo.sh               # = local/setup.sh (if needed) + python src/demo.py
    python src/demo.py --quick           # ~3 minutes: smaller corpus, one epoch (used by the tests)
    python src/demo.py --lang zh         # Mandarin: espeak-ng cmn corpus in AISHELL layout, CER

The steps, their outputs and the command line: :mod:`llmasr.demo.run`.
"""
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from llmasr.demo.run import main as demo  # noqa: E402  (torch-free: the first lines print at once)

REPO = Path(__file__).resolve().parents[1]


def main(argv=None):
    return demo(argv, repo=REPO)


if __name__ == "__main__":
    from llmasr.config import run_cli

    run_cli(main)
