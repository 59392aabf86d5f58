"""Recipes: the code behind the entry scripts in ``src/`` (each script is a few lines).

- :mod:`llmasr.recipes.model_args` model flags and building a SpeechLLM from them (train and decode)
- :mod:`llmasr.recipes.train`      ``src/train.py`` / ``src/train_mose.py``: parser, checkpointing/resume, run/main
- :mod:`llmasr.recipes.decode`     ``src/decode.py`` / ``src/decode_mose.py``: checkpoint choice, batched decoding, result files
"""
