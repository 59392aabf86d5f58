"""FireRedASR-AED and FireRedASR-LLM: exact inference with the released formats, and fine-tuning.

- ``features``   Kaldi fbank (kaldi-native-fbank) + global CMVN from ``cmvn.ark``
- ``tokenizer``  dict.txt + sentencepiece (Chinese characters + English BPE)
- ``conformer``  the Conformer encoder (also registered as speech encoder "firered")
- ``aed``        Transformer decoder, batched beam search, AED model + loss
- ``load``       loading released packages with strict checks and clear errors
- ``llm``        a released FireRedASR-LLM directory loaded into :class:`llmasr.model.SpeechLLM`, decoding options
- ``decode``     speech2text (``src/firered_speech2text.py``)
- ``aed_recipe`` the AED in the shared training/decoding recipes (``src/train_aed.py``, ``src/decode_aed.py``,
  ``src/export_aed.py``)
"""
