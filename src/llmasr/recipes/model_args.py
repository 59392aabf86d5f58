"""Model flags shared by the training and decoding recipes, and building the model of a recipe from them."""
from __future__ import annotations

import argparse

from llmasr.recipes.speechllm import add_model_arguments, build_speechllm, split_list


def build_model_from_args(args: argparse.Namespace, mose: bool = False, dtype=None, encoder_options=None,
                          recipe=None):
    """The model of the recipe of ``args`` (:func:`llmasr.recipes.recipe.recipe_of`: ``recipe``, MoSE
    for ``mose``, else ``args.model_type``) built from its flags."""
    from llmasr.recipes.recipe import recipe_of

    return recipe_of(args, recipe, mose).build_model(args, dtype=dtype, encoder_options=encoder_options)


__all__ = ["add_model_arguments", "build_model_from_args", "build_speechllm", "split_list"]
