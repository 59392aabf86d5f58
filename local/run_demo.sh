#!/usr/bin/env bash
# The first command to run: set up the environment if needed, then the built-in demo
# (src/demo.py): synthesise a small espeak-ng corpus, train Whisper-base -> projector ->
# SmolLM2-135M-Instruct (+LoRA) on this CPU with src/train.py, decode with src/decode.py, and print
# a WER table (untrained / after each epoch / zero-shot Whisper-base) with a loss+WER plot.
#
#   bash local/run_demo.sh                 # English, ~15-20 min on 2 idle cores
#   bash local/run_demo.sh --quick         # ~3 min smoke run
#   bash local/run_demo.sh --lang zh       # Mandarin (espeak-ng cmn, AISHELL layout, CER)
#   bash local/run_demo.sh --help          # all options of src/demo.py
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ] || ! { [ -f "$VENV/.requirements.sha" ] && sha256sum -c --status "$VENV/.requirements.sha" 2>/dev/null; }; then
  echo "$(date '+%Y-%m-%d %H:%M:%S') (run_demo) environment not set up yet: running local/setup.sh"
  bash local/setup.sh
fi
. "$VENV/bin/activate"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec python src/demo.py "$@"
