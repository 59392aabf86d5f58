"""The built-in demo (``src/demo.py``) and its parts (not needed by the GPU recipes).

- :mod:`llmasr.demo.run`         the demo's command line and the order of its steps
- :mod:`llmasr.demo.stages`      the steps: corpus, prepare.sh, zero-shot Whisper, train, decode
- :mod:`llmasr.demo.report`      curves.png, the error-rate tables, results.json, the summary
- :mod:`llmasr.demo.console`     progress lines and step headers with an ETA
- :mod:`llmasr.demo.processes`   the toolkit's scripts as subprocesses; threads per process
- :mod:`llmasr.demo.monitor`     training progress from the metrics file training writes
- :mod:`llmasr.demo.espeak`      synthetic LibriSpeech/AISHELL-layout corpora spoken by espeak-ng
- :mod:`llmasr.demo.ct2_whisper` CTranslate2 Whisper -> openai-whisper checkpoint converter
- :mod:`llmasr.demo.models`      the demo's Whisper-base and SmolLM2-135M-Instruct, cached locally
- :mod:`llmasr.demo.pipeline`    src/train.py / src/decode.py command lines from the demo config
- :mod:`llmasr.demo.results`     error rates from decode's wer-summary / recogs files
- :mod:`llmasr.demo.plotting`    the loss / error-rate curves from the metrics file and decode's rates
"""
