"""llmasr: training and decoding recipes for LLM-based speech recognition.

Layers, bottom to top (a module imports only from layers below it; tests/test_imports.py checks):

- ``llmasr.config``, ``llmasr.io``    flags/configs; safe loading, strict state-dict loading, atomic writes
- ``llmasr.layers``     Swoosh activations, convolutions kept in fp32 on CPU
- ``llmasr.features``   feature front ends (Kaldi fbank, Whisper log-mel, FireRedASR fbank + CMVN)
- ``llmasr.data``       corpus readers, lhotse manifests, samplers, batches
- ``llmasr.encoders``   speech encoder registry (Zipformer, Whisper, FireRedASR Conformer)
- ``llmasr.projector``  frame-concatenating projector into the LLM embedding space
- ``llmasr.prompt``     the chat prompt builder used by training AND decoding
- ``llmasr.llm``        loading a Hugging Face causal LM (+ LoRA) from a local directory
- ``llmasr.generation`` batched generation (greedy / beam search, KV cache)
- ``llmasr.model``      SpeechLLM: encoders + projectors + LLM
- ``llmasr.checkpoint`` training checkpoints, averaging, other trainers' key layouts
- ``llmasr.scoring``    WER/CER and icefall-style result files
- ``llmasr.training``   optimisers, schedulers, training loop, DDP/DeepSpeed
- ``llmasr.firered``    FireRedASR-AED (decoder, beam search, tokenizer) and the released formats
- ``llmasr.recipes``    the train/decode recipes behind the scripts in ``src/``
- ``llmasr.demo``       the built-in demo's corpus builder, models and plots
"""

__version__ = "0.1.0"
