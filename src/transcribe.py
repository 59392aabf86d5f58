#!/usr/bin/env python3
"""Transcribe your own recordings with a trained model: prints ``<utt-id>\\t<text>`` per file.

    python3 src/transcribe.py --config local/conf/demo_en.yaml --exp-dir exp/demo_en --epoch 2 --avg 1 \\
      --llm-path models/demo/SmolLM2-135M-Instruct --speech-encoder-path models/demo/whisper-base/whisper-base.pt \\
      hello.wav other.flac
    python3 src/transcribe.py ... --wav-scp wav.scp --output hyps.txt    # Kaldi wav.scp: <utt-id> <path>

The model flags, ``--config`` (its ``train:`` section gives the model flags, ``decode:`` the decoding
options) and ``--exp-dir`` + ``--epoch/--avg`` or ``--checkpoint`` are those of ``src/decode.py``
(the demo prints the full command). Audio of any sampling rate is resampled to 16 kHz; the
features are computed on the fly by the front end of the model's ``--feature-type``; files are
decoded in batches of up to ``--max-duration`` seconds. The utterance id of a file is its name
without the extension.
"""
from llmasr.recipes.transcribe import main

if __name__ == "__main__":
    main()
