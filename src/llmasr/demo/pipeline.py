"""The demo's command lines for src/train.py and src/decode.py, built from the recipes' own parsers
(so a flag added to the model's arguments reaches decode without a list to keep in step)."""

from __future__ import annotations

import argparse
from typing import Dict, FrozenSet, List


def _model_group_flags(parser: argparse.ArgumentParser) -> FrozenSet[str]:
    # argparse has no public accessor for an argument group's actions.
    return frozenset(
        opt[2:]
        for group in parser._action_groups
        if group.title == "model"
        for action in group._group_actions
        for opt in action.option_strings
        if opt.startswith("--")
    )


def decode_model_flags() -> FrozenSet[str]:
    """Model flags of src/train.py that src/decode.py also accepts: they shape the network the
    checkpoint was trained with, so decode must get the training config's values."""
    from llmasr.recipes.decode import get_decode_parser
    from llmasr.recipes.train import get_parser

    return _model_group_flags(get_parser(False)) & _model_group_flags(get_decode_parser(False))


def model_flags_for_decode(train_overrides: Dict[str, object]) -> Dict[str, object]:
    """The entries of a demo config's ``train:`` section that decode needs (see decode_model_flags)."""
    wanted = decode_model_flags()
    return {k: v for k, v in train_overrides.items() if str(k).lstrip("-").replace("_", "-") in wanted}


def train_argv(values: Dict[str, object], source: str) -> List[str]:
    """``{flag: value}`` -> src/train.py tokens, each key checked against its parser."""
    from llmasr.config import config_to_argv
    from llmasr.recipes.train import get_parser

    return config_to_argv(get_parser(False), values, source)


def decode_argv(values: Dict[str, object], source: str) -> List[str]:
    """``{flag: value}`` -> src/decode.py tokens, each key checked against its parser."""
    from llmasr.config import config_to_argv
    from llmasr.recipes.decode import get_decode_parser

    return config_to_argv(get_decode_parser(False), values, source)
