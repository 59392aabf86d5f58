"""FireRedASR-AED and FireRedASR-LLM: exact inference with the released formats, and fine-tuning.

- ``features``   Kaldi fbank (kaldi-native-fbank) + global CMVN from ``cmvn.ark``
- ``tokenizer``  dict.txt + sentencepiece (Chinese characters + English BPE)
- ``conformer``  the Conformer encoder (also registered as speech encoder "firered")
- ``aed``        Transformer decoder, batched beam search, AED model + loss
- ``load``       loading released packages with strict checks and clear errors
- ``llm``        FireRedASR-LLM (encoder + adapter + Qwen2 with LoRA) loading and decoding
"""
