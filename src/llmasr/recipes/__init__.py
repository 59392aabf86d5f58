"""Recipes: the code behind the entry scripts in ``src/`` (each script is a few lines).

- :mod:`llmasr.recipes.recipe`     the kinds of model (SpeechLLM, MoSE, FireRedASR-AED) as :class:`Recipe` objects
- :mod:`llmasr.recipes.speechllm`  the SpeechLLM recipes' model/decoding flags and building a SpeechLLM from them
- :mod:`llmasr.recipes.model_args` building the model of a recipe from parsed flags (train and decode)
- :mod:`llmasr.recipes.inference`  the checkpoint choice and loading a trained model for inference
- :mod:`llmasr.recipes.train`      ``src/train*.py``: parser, checkpointing/resume, run/main
- :mod:`llmasr.recipes.decode`     ``src/decode*.py``: batched decoding, result files
- :mod:`llmasr.recipes.transcribe` ``src/transcribe.py``: your own recordings
"""
