"""The kinds of model the train/decode recipes handle, each as one :class:`Recipe` object.

A recipe holds everything that differs between the kinds - its flags, how the model is built from
them, the fail-fast checks of its input directories, its decoding options and their tag in the
decode directory name - so that ``llmasr.recipes.train`` / ``decode`` / ``transcribe`` never test
which kind they run. The kind travels as ``args.model_type`` (set by each recipe's parser) and is
looked up in :data:`RECIPES` in exactly one place, :func:`get_recipe`.

A new system is one more :class:`Recipe` in :data:`RECIPES` (and two thin entry scripts).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

from llmasr.config import UserError


@dataclass(frozen=True)
class Recipe:
    """One kind of model. ``add_train_arguments`` / ``add_decode_arguments`` add the recipe's own
    groups after the shared ones (training flags; checkpoint choice, device, test sets)."""

    name: str
    train_description: str
    decode_exp_dir: str
    decode_script: str
    # The model has an LLM: prompt format, LoRA (merged for inference), --llm-path, LLM dtype.
    has_llm: bool
    # Encoder flags take comma-separated lists; checkpoints hold one projector per encoder.
    multi_encoder: bool
    add_train_arguments: Callable[[argparse.ArgumentParser], None]
    add_decode_arguments: Callable[[argparse.ArgumentParser], None]
    build_model: Callable[..., Any]  # (args, dtype=None, encoder_options=None) -> model
    check_inputs: Callable[[Any], None]  # (args) -> None: one-line error for a missing directory/file
    decoding_options: Callable[[Any], Dict[str, Any]]
    decoding_options_tag: Callable[[Any], str]

    def encoder_types(self, args) -> List[str]:
        """The --speech-encoder-type list (empty for a model without the SpeechLLM encoder flags)."""
        from llmasr.recipes.speechllm import split_list

        return split_list(getattr(args, "speech_encoder_type", None)) if self.has_llm else []


# --------------------------------------------------------------------------- SpeechLLM / MoSE


def _speechllm_train_arguments(multi_encoder: bool) -> Callable[[argparse.ArgumentParser], None]:
    def add(parser: argparse.ArgumentParser) -> None:
        from llmasr.aux_ctc import add_aux_ctc_arguments
        from llmasr.data import AsrDataModule
        from llmasr.recipes.speechllm import add_model_arguments

        add_model_arguments(parser, mose=multi_encoder)
        add_aux_ctc_arguments(parser)
        AsrDataModule.add_arguments(parser)
    return add


def _speechllm_decode_arguments(multi_encoder: bool) -> Callable[[argparse.ArgumentParser], None]:
    def add(parser: argparse.ArgumentParser) -> None:
        from llmasr.data import AsrDataModule
        from llmasr.recipes.speechllm import add_decoding_arguments
        from llmasr.recipes.speechllm import add_model_arguments

        add_model_arguments(parser, mose=multi_encoder)
        add_decoding_arguments(parser)
        AsrDataModule.add_arguments(parser)
    return add


def _speechllm_builder(multi_encoder: bool) -> Callable[..., Any]:
    def build(args, dtype=None, encoder_options=None):
        from llmasr.recipes.speechllm import build_speechllm

        return build_speechllm(args, multi_encoder, dtype=dtype, encoder_options=encoder_options)
    return build


def _check_speechllm_inputs(args) -> None:
    from llmasr.llm import check_llm_dir
    from llmasr.recipes.speechllm import split_list

    check_llm_dir(args.llm_path, getattr(args, "llm_gguf_file", None))
    for p in split_list(getattr(args, "speech_encoder_path", None)):
        if not Path(p).is_file() and not Path(p).is_dir():
            raise FileNotFoundError(f"--speech-encoder-path {p} does not exist")


def _speechllm_decoding_options(args) -> Dict[str, Any]:
    from llmasr.recipes.speechllm import speechllm_decoding_options

    return speechllm_decoding_options(args)


def _speechllm_options_tag(args) -> str:
    from llmasr.recipes.speechllm import speechllm_options_tag

    return speechllm_options_tag(args)


def _speechllm_recipe(name: str, multi_encoder: bool, description: str, decode_exp_dir: str,
                      decode_script: str) -> Recipe:
    return Recipe(
        name=name, train_description=description, decode_exp_dir=decode_exp_dir, decode_script=decode_script,
        has_llm=True, multi_encoder=multi_encoder,
        add_train_arguments=_speechllm_train_arguments(multi_encoder),
        add_decode_arguments=_speechllm_decode_arguments(multi_encoder),
        build_model=_speechllm_builder(multi_encoder),
        check_inputs=_check_speechllm_inputs,
        decoding_options=_speechllm_decoding_options,
        decoding_options_tag=_speechllm_options_tag,
    )


# --------------------------------------------------------------------------- FireRedASR-AED


def _aed_train_arguments(parser: argparse.ArgumentParser) -> None:
    from llmasr.data import AsrDataModule
    from llmasr.firered.aed_recipe import add_aed_arguments

    AsrDataModule.add_arguments(parser)
    add_aed_arguments(parser, training=True)


def _aed_decode_arguments(parser: argparse.ArgumentParser) -> None:
    from llmasr.data import AsrDataModule
    from llmasr.firered.aed_recipe import add_aed_arguments

    AsrDataModule.add_arguments(parser)
    add_aed_arguments(parser, training=False)


def _aed_build(args, dtype=None, encoder_options=None):
    """(float32 master weights: ``dtype`` and ``encoder_options`` concern the LLM and its encoders)"""
    from llmasr.firered.aed_recipe import build_aed_model

    return build_aed_model(args)


def _aed_check_inputs(args) -> None:
    from llmasr.firered.aed_recipe import check_package_dir

    check_package_dir(args.init_from)


def _aed_decoding_options(args) -> Dict[str, Any]:
    from llmasr.firered.aed_recipe import decoding_options

    return decoding_options(args)


def _aed_options_tag(args) -> str:
    from llmasr.firered.aed_recipe import decoding_options_tag

    return decoding_options_tag(args)


# --------------------------------------------------------------------------- --help

# Recipe knobs: set by the recipe configs (local/conf/*.yaml) or left at their defaults, not on the
# command line. ``--help`` leaves them out, ``--help-all`` shows them; they are accepted as ever.
# One list for every recipe (a parser ignores the flags it lacks).
MODEL_KNOBS = (
    "--llm-gguf-file", "--attn-implementation", "--speech-encoder-bpe-path", "--projector-activation",
    "--projector-dropout", "--lora-alpha", "--lora-dropout", "--use-prompt-embedding", "--compat-reference-padding",
    "--ctc-compress-frames", "--resize-vocab", "--init-from-firered",
)
DATA_KNOBS = (
    "--sampler-buffer-size", "--quadratic-duration", "--test-num-buckets", "--strict-max-duration",
    "--shuffle-shards", "--drop-last", "--spec-aug-time-warp-factor", "--firered-cmvn",
)
TRAIN_KNOBS = MODEL_KNOBS + DATA_KNOBS + (
    "--master-port", "--find-unused-parameters", "--encoder-cache-max-gb", "--inf-check", "--reset-interval",
    "--projector-lr-scale",
    "--aux-ctc-temperature", "--aux-ctc-blank", "--aux-ctc-negatives", "--aux-ctc-norm-weight",
    "--projector-warmup-lr", "--projector-warmup-lr-schedule", "--projector-warmup-max-seconds",
    "--projector-warmup-cuts",
)
DECODE_KNOBS = MODEL_KNOBS + DATA_KNOBS + (
    "--max-new-tokens-per-speech-token", "--ctc-mode", "--num-threads",
)


# --------------------------------------------------------------------------- registry

SPEECHLLM = _speechllm_recipe(
    "speechllm", False, "Train SpeechLLM - Zipformer/Whisper encoder(s) + projector + LLM with LoRA.",
    "exp/asr_librispeech_zipformer_qwen2_1.5B", "decode.py")
MOSE = _speechllm_recipe(
    "mose", True, "Train SpeechLLM-MoSE (several speech encoders) - Zipformer/Whisper encoder(s) + projector + "
    "LLM with LoRA.", "exp/asr_librispeech_zipformer_mose_qwen2_1.5B", "decode_mose.py")
AED = Recipe(
    name="aed", train_description="Fine-tune FireRedASR-AED (attention decoder, label-smoothed CE).",
    decode_exp_dir="exp/firered_aed", decode_script="decode_aed.py", has_llm=False, multi_encoder=False,
    add_train_arguments=_aed_train_arguments, add_decode_arguments=_aed_decode_arguments, build_model=_aed_build,
    check_inputs=_aed_check_inputs, decoding_options=_aed_decoding_options, decoding_options_tag=_aed_options_tag,
)

RECIPES: Dict[str, Recipe] = {r.name: r for r in (SPEECHLLM, MOSE, AED)}
DEFAULT = SPEECHLLM.name


def get_recipe(name: Union[str, Recipe, None] = None) -> Recipe:
    """The recipe called ``name`` (a :class:`Recipe` is returned as it is; None: SpeechLLM)."""
    if isinstance(name, Recipe):
        return name
    recipe = RECIPES.get(DEFAULT if name is None else name)
    if recipe is None:
        raise UserError(f"model type {name!r} is not one of: {', '.join(RECIPES)}")
    return recipe


def recipe_of(args, recipe: Union[str, Recipe, None] = None, mose: Optional[bool] = None) -> Recipe:
    """The recipe of parsed flags: ``recipe`` if given, else MoSE for ``mose`` (the keyword of the
    older API), else ``args.model_type`` (set by each recipe's parser), else SpeechLLM."""
    if recipe is None:
        recipe = MOSE if mose else getattr(args, "model_type", None)
    return get_recipe(recipe)


__all__ = ["AED", "DECODE_KNOBS", "TRAIN_KNOBS", "MOSE", "RECIPES", "Recipe", "SPEECHLLM", "get_recipe", "recipe_of"]
