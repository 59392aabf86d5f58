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
import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

DEBUG_ENV = "LLMASR_DEBUG"


class UserError(RuntimeError, ValueError):
    """Bad input - a path, a flag combination, a data file - as opposed to a bug. Entry scripts run
    through :func:`run_cli` print its message as one line and exit 1; tracebacks are for bugs.
    (Both a RuntimeError and a ValueError: callers written against either keep working.)"""


def _user_error_types() -> Tuple[type, ...]:
    # FileNotFoundError: a missing input names its file (ours always do, the OS's too).
    # CheckpointError: an unreadable or mismatching checkpoint file (llmasr.io, same layer).
    from llmasr.io import CheckpointError, DiskFullError

    return UserError, FileNotFoundError, CheckpointError, DiskFullError


def user_message(e: BaseException) -> str:
    """The one-line message of a user error. An exception re-raised by a DataLoader worker carries
    "Caught X in DataLoader worker process N. Original Traceback ..."; its original message is the
    text after the traceback's last line naming the type."""
    text = str(e)
    if "Original Traceback" in text:
        name = re.escape(type(e).__qualname__)
        last = None
        for last in re.finditer(rf"^(?:[\w.]+\.)?{name}: ", text, re.M):
            pass
        if last is not None:
            text = text[last.end():]
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip()) or type(e).__name__


def run_cli(main: Callable[[List[str]], Any], argv: Optional[Sequence[str]] = None) -> Any:
    """Run an entry script's ``main(argv)``. A user error (:class:`UserError`, a missing file, an
    unusable checkpoint) becomes one ``<script>: error: <message>`` line on stderr (and in the log
    files the script opened) and exit status 1. ``--debug`` anywhere on the command line (removed
    before ``main`` sees it) or ``LLMASR_DEBUG=1`` lets it through with its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        return main(argv)
    except _user_error_types() as e:
        if debug:
            raise
        message = user_message(e)
        record = logging.makeLogRecord({"levelno": logging.ERROR, "levelname": "ERROR", "msg": message})
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):  # the console gets the line below
                handler.handle(record)
        print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
        raise SystemExit(1) from None


def read_text_lines(path: Union[str, Path], what: str = "") -> List[Tuple[int, str]]:
    """``(line number, line)`` of a UTF-8 text file, without line ends; a line that is not UTF-8
    is a :class:`UserError` naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what + ' ' if what else ''}{path}: no such file")
    out = []
    for lineno, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            out.append((lineno, raw.decode("utf-8")))
        except UnicodeDecodeError as e:
            raise UserError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                            f"convert the file to UTF-8, e.g. iconv -f <its encoding> -t UTF-8") from None
    return out


def format_duration(seconds: float, short: bool = False) -> str:
    """Seconds as ``H:MM:SS`` rounded to the nearest second, the one format of every elapsed/ETA
    value the toolkit prints (training logs, decode progress, the demo); ``short``: ``M:SS`` below
    an hour (the demo's console lines). Negative -> 0; not finite (an ETA before any progress) -> "?"."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(max(seconds, 0.0)))
    hours, minutes, secs = s // 3600, s % 3600 // 60, s % 60
    return f"{minutes}:{secs:02d}" if short and hours == 0 else f"{hours}:{minutes:02d}:{secs:02d}"


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
    text = "\n".join(line for _, line in read_text_lines(path, "--config"))
    import yaml

    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:  # their messages give the line and column
        raise UserError(f"--config {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping with a {section!r} section")
    if section not in data:
        if not required:
            return {}
        raise UserError(f"--config {path}: no {section!r} section (sections: {', '.join(map(str, data))})")
    values = data[section] or {}
    if not isinstance(values, dict):
        raise UserError(f"--config {path}: section {section!r} must map flag names to values")
    return values


class _HelpAllAction(argparse.Action):
    """``--help-all``: the help with the flags ``--help`` leaves out, then exit."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None, hidden=()):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)
        self.hidden = hidden

    def __call__(self, parser, namespace, values, option_string=None):
        for action, text in self.hidden:
            action.help = text
        parser.print_help()
        parser.exit()


def hide_from_help(parser: argparse.ArgumentParser, flags: Sequence[str]) -> List[str]:
    """Leave ``flags`` (recipe knobs a user never changes on the command line; still accepted) out
    of ``--help`` and add ``--help-all``, which shows every flag. Flags this parser lacks are
    ignored: one list serves the parsers of every recipe. Returns the flags hidden."""
    actions = _option_table(parser)
    hidden, names = [], []
    for flag in flags:
        action = actions.get(flag)
        if action is None or action.help == argparse.SUPPRESS:
            continue
        hidden.append((action, action.help))
        names.append(flag)
        action.help = argparse.SUPPRESS
    parser.add_argument("--help-all", action=_HelpAllAction, hidden=hidden,
                        help=f"Show the help with every flag ({len(names)} recipe knobs are left out here).")
    return names


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
            raise UserError(f"{source}: {key!r} is not a flag of this script (see --help)")
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
