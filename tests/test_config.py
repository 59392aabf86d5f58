"""--config FILE for the entry scripts (llmasr.config): the shipped recipe configs must parse."""
import argparse
from pathlib import Path

import pytest

from llmasr.config import format_duration, parse_args_with_config, str2bool

REPO = Path(__file__).resolve().parents[1]


def small_parser():
    p = argparse.ArgumentParser()
    p.add_argument("--exp-dir", default="exp/x")
    p.add_argument("--lora-r", type=int, default=64)
    p.add_argument("--use-lora", type=str2bool, default=True)
    p.add_argument("--encoders", type=str, default="large")
    p.add_argument("--test-sets", nargs="+", default=["test-clean"])
    p.add_argument("--verbose", action="store_true")
    return p


def test_config_values_are_typed_and_overridden_by_the_command_line(tmp_path):
    cfg = tmp_path / "r.yaml"
    cfg.write_text(
        "train:\n  lora-r: 8\n  use_lora: false\n  encoders: [a, b]\n  test-sets: [x, y]\n  verbose: true\n"
        "  exp-dir: exp/train-only\n"
        "decode:\n  lora-r: 16\n"
    )
    a = parse_args_with_config(small_parser(), ["--config", str(cfg)], "train")
    assert (a.lora_r, a.use_lora, a.encoders, a.test_sets, a.verbose) == (8, False, "a,b", ["x", "y"], True)
    a = parse_args_with_config(small_parser(), ["--config", str(cfg), "--lora-r", "4"], "train")
    assert a.lora_r == 4 and a.config == cfg
    # decode inherits the train section's flags (not --exp-dir), its own section wins
    d = parse_args_with_config(small_parser(), ["--config", str(cfg)], "decode", inherit="train")
    assert (d.lora_r, d.use_lora, d.encoders, d.exp_dir) == (16, False, "a,b", "exp/x")
    # no --config: plain argparse
    assert parse_args_with_config(small_parser(), [], "train").lora_r == 64


def test_config_errors_name_the_file_and_key(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  lora-rank: 8\n")
    with pytest.raises(ValueError, match=r"bad.yaml.*'lora-rank' is not a flag"):
        parse_args_with_config(small_parser(), ["--config", str(cfg)], "train")
    with pytest.raises(ValueError, match=r"no 'decode' section"):
        parse_args_with_config(small_parser(), ["--config", str(cfg)], "decode")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        parse_args_with_config(small_parser(), ["--config", str(tmp_path / "missing.yaml")], "train")
    cfg.write_text("train:\n  lora-r: eight\n")
    with pytest.raises(SystemExit):  # argparse's own type check of the value
        parse_args_with_config(small_parser(), ["--config", str(cfg)], "train")


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "local" / "conf").glob("*.yaml")))
def test_shipped_recipe_configs_parse_with_train_and_decode(name):
    import yaml

    from llmasr.recipes.decode import get_decode_parser
    from llmasr.recipes.train import get_parser

    path = REPO / "local" / "conf" / name
    sections = yaml.safe_load(path.read_text())
    if "train" in sections:
        parser = get_parser(False)
        a = parse_args_with_config(parser, ["--config", str(path)], "train")
        # a key's destination is its flag's dest (e.g. optimizer -> optimizer_type), not its spelling
        dest_of = {opt: action.dest for action in parser._actions for opt in action.option_strings}
        for key, value in sections["train"].items():
            assert f"--{key}" in dest_of, f"{name}: train key {key!r} is not a flag of src/train.py"
            got = getattr(a, dest_of[f"--{key}"])
            assert got == value or str(got) == str(value), (key, value, got)
    if "decode" in sections:
        parse_args_with_config(get_decode_parser(False), ["--config", str(path)], "decode", inherit="train")


def test_format_duration_is_one_rounded_clock_format():
    # one formatter for training logs, decode progress and the demo (they used to round, truncate
    # and switch formats differently): nearest second, H:MM:SS, or M:SS below an hour if short
    assert format_duration(0) == "0:00:00"
    assert format_duration(59.6) == "0:01:00"
    assert format_duration(3599.4) == "0:59:59"
    assert format_duration(3725) == "1:02:05"
    assert format_duration(36000 + 61) == "10:01:01"
    assert format_duration(75.2, short=True) == "1:15"
    assert format_duration(3725, short=True) == "1:02:05"
    assert format_duration(-3) == "0:00:00"
    assert format_duration(float("nan"), short=True) == "?"
    assert format_duration(float("inf")) == "?"
