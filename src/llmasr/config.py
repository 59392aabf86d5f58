"""Recipe configs: ``--config FILE`` for the entry scripts.

A recipe config is a YAML (or JSON) file with one section per script, whose keys are that script's
flags without the leading dashes::

    train:
      speech-encoder-type: whisper
      encoder-projector-ds-rate: 8
    decode:
      beam-size: 1

``python3 src/train.py --config local/conf/whisper_llm_zh_aishell.yaml --exp-dir ...`` reads the
``train`` section as if its flags were typed first on the command line, so flags given on the
command line win. The values go through the parser's own type conversion and checks, and a key that
is not a flag of the script is an error naming the file and the key (a typo must not be ignored).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union


def str2bool(v: Union[str, bool]) -> bool:
    """icefall-style boolean flags: ``--use-lora true``."""
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {v!r}")


def load_config_section(path: Path, section: str, required: bool = True) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping with a {section!r} section")
    if section not in data:
        if not required:
            return {}
        raise ValueError(f"--config {path}: no {section!r} section (sections: {', '.join(map(str, data))})")
    values = data[section] or {}
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: section {section!r} must map flag names to values")
    return values


def _option_table(parser: argparse.ArgumentParser) -> Dict[str, argparse.Action]:
    # argparse has no public accessor for its option table.
    return {opt: action for action in parser._actions for opt in action.option_strings}


def _flag(key: str) -> str:
    return "--" + str(key).lstrip("-").replace("_", "-")


def config_to_argv(parser: argparse.ArgumentParser, values: Dict[str, Any], source: str) -> List[str]:
    """Turn ``{flag: value}`` into command-line tokens for ``parser`` (checked against its flags)."""
    actions = _option_table(parser)
    argv: List[str] = []
    for key, value in values.items():
        flag = _flag(key)
        action = actions.get(flag)
        if action is None:
            raise ValueError(f"{source}: {key!r} is not a flag of this script (see --help)")
        if value is None:
            continue
        if action.nargs == 0:  # store_true / store_false: present or absent
            if bool(value) == isinstance(action, argparse._StoreTrueAction):
                argv.append(flag)
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        if isinstance(value, (list, tuple)):
            if action.nargs in ("+", "*") or isinstance(action.nargs, int):
                argv.append(flag)
                argv.extend(str(v) for v in value)
                continue
            value = ",".join(str(v) for v in value)  # comma-separated list flags (MoSE encoders)
        argv.extend([flag, str(value)])
    return argv


def parse_args_with_config(
    parser: argparse.ArgumentParser, argv: Optional[Sequence[str]], section: str, inherit: Optional[str] = None
) -> argparse.Namespace:
    """``parser.parse_args`` with ``--config FILE`` support (the FILE's ``section`` comes first).

    ``inherit``: another section whose keys that are flags of this parser apply too, before
    ``section`` (decoding takes the model flags - encoder type, ds rate, prompt format... - from the
    ``train`` section, so a recipe states them once)."""
    if not any(a.option_strings == ["--config"] for a in parser._actions):
        parser.add_argument(
            "--config", type=Path, default=None,
            help=f"Recipe config (YAML/JSON): its '{section}' section sets flags; the command line overrides it.",
        )
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path, default=None)
    known, _ = pre.parse_known_args(argv)
    argv = list(argv) if argv is not None else None
    if known.config is not None:
        import sys

        rest = argv if argv is not None else sys.argv[1:]
        values: Dict[str, Any] = {}
        if inherit is not None:
            known_flags = _option_table(parser)
            for key, value in load_config_section(known.config, inherit, required=False).items():
                if _flag(key) in known_flags and _flag(key) != "--exp-dir":
                    values[key] = value
        values.update(load_config_section(known.config, section))
        extra = config_to_argv(parser, values, f"--config {known.config}")
        argv = extra + list(rest)
    return parser.parse_args(argv)
