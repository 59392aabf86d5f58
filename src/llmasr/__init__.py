"""llmasr: training and decoding recipes for LLM-based speech recognition.

Components (one implementation each, shared by every recipe):

- ``llmasr.data``       lhotse manifests, samplers, batches
- ``llmasr.encoders``   speech encoder registry (Zipformer, Whisper, FireRedASR Conformer)
- ``llmasr.projector``  frame-concatenating projector into the LLM embedding space
- ``llmasr.prompt``     the chat prompt builder used by training AND decoding
- ``llmasr.llm``        loading a Hugging Face causal LM (+ LoRA) from a local directory
- ``llmasr.model``      SpeechLLM: encoders + projectors + LLM
- ``llmasr.checkpoint`` saving, loading and averaging checkpoints (icefall layout)
- ``llmasr.decoding``   batched generation
- ``llmasr.scoring``    WER/CER and icefall-style result files
- ``llmasr.training``   optimisers, training loop, DDP/DeepSpeed
- ``llmasr.firered``    FireRedASR-AED / FireRedASR-LLM
"""

__version__ = "0.1.0"
