"""The recipe registry (llmasr.recipes.recipe), the shared inference loader (llmasr.recipes.inference)
and the grouped --help of the train/decode scripts."""
import argparse
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmasr.config import UserError, str2bool
from llmasr.recipes import recipe as recipes
from llmasr.recipes.decode import get_decode_parser
from llmasr.recipes.inference import check_weights_fit, checkpoint_tag, choose_checkpoint, load_weights
from llmasr.recipes.train import get_parser

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
KINDS = ("speechllm", "mose", "aed")


def test_registry_has_the_three_kinds():
    assert set(recipes.RECIPES) == set(KINDS)
    for name in KINDS:
        assert recipes.get_recipe(name).name == name
    assert recipes.get_recipe(None) is recipes.SPEECHLLM
    assert recipes.get_recipe(recipes.AED) is recipes.AED
    with pytest.raises(UserError, match="'ctc' is not one of: speechllm, mose, aed"):
        recipes.get_recipe("ctc")
    assert (recipes.MOSE.multi_encoder, recipes.SPEECHLLM.multi_encoder, recipes.AED.has_llm) == (True, False, False)


def test_recipe_of_args():
    ns = argparse.Namespace
    assert recipes.recipe_of(ns()) is recipes.SPEECHLLM
    assert recipes.recipe_of(ns(model_type="aed")) is recipes.AED
    assert recipes.recipe_of(ns(model_type="speechllm"), mose=True) is recipes.MOSE  # the older keyword
    assert recipes.recipe_of(ns(model_type="mose"), recipe="aed") is recipes.AED  # explicit wins


@pytest.mark.parametrize("kind", KINDS)
def test_each_recipes_parsers_build_and_carry_the_kind(kind):
    extra = ["--init-from", "models/x"] if kind == "aed" else []
    train_args = get_parser(model_type=kind).parse_args(extra)
    decode_args = get_decode_parser(model_type=kind).parse_args(extra)
    assert train_args.model_type == decode_args.model_type == kind
    assert recipes.recipe_of(train_args).name == kind
    if kind == "mose":  # comma-separated encoder lists
        assert len(train_args.speech_encoder_type.split(",")) == 4
    if kind == "aed":
        assert (train_args.feature_type, decode_args.scoring, train_args.optimizer_type) == ("firered", "cer", "adamw")
    else:
        assert train_args.speech_encoder_type == ("large,large,large,large" if kind == "mose" else "large")


def _mentions_model_type(node) -> bool:
    return any(isinstance(n, ast.Name) and n.id == "model_type" or isinstance(n, ast.Attribute) and n.attr == "model_type"
               or isinstance(n, ast.Constant) and n.value == "model_type" for n in ast.walk(node))


def _is_mose_flag(node) -> bool:
    """``mose`` used as a truth value: ``if mose``, ``not mose``, ``a and mose`` (``mose is None`` is not)."""
    if isinstance(node, ast.Name):
        return node.id == "mose"
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return _is_mose_flag(node.operand)
    if isinstance(node, ast.BoolOp):
        return any(_is_mose_flag(v) for v in node.values)
    return False


def _kind_tests(tree):
    """Line numbers of comparisons of the model kind (``model_type``) with a kind string, and of
    tests of a ``mose`` flag."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and _mentions_model_type(node):
            for operand in [node.left, *node.comparators]:
                values = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
                if any(isinstance(v, ast.Constant) and v.value in KINDS for v in values):
                    found.append(node.lineno)
                    break
        if isinstance(node, (ast.If, ast.IfExp, ast.While, ast.Assert)) and _is_mose_flag(node.test):
            found.append(node.lineno)
    return found


def test_the_kind_is_compared_at_most_once_in_src():
    hits = {}
    for path in sorted(SRC.rglob("*.py")):
        lines = _kind_tests(ast.parse(path.read_text(), str(path)))
        if lines:
            hits[str(path.relative_to(SRC))] = lines
    assert sum(len(v) for v in hits.values()) <= 1, hits


def test_the_kind_check_finds_what_it_looks_for():
    code = ('if args.model_type == "aed": pass\n'
            'x = 1 if mose else 2\n'
            'if getattr(a, "model_type", "speechllm") in ("mose", "x"): pass\n'
            'y = RECIPES[name]\n'
            'if prompt_format == "speechllm" or mose is None: pass\n')  # other strings, None checks: no kind
    assert sorted(_kind_tests(ast.parse(code))) == [1, 2, 3]


# --------------------------------------------------------------------------- the inference loader


def _args(exp_dir, *argv):
    return get_decode_parser().parse_args(["--exp-dir", str(exp_dir), *argv])


def _weights(value: float):
    return {"model": {"encoder_projector.proj.weight": torch.full((2, 2), value)}}


def test_checkpoint_choice(tmp_path):
    for e in (1, 2, 3):
        torch.save(_weights(float(e)), tmp_path / f"epoch-{e}.pt")
    for b in (100, 200):
        torch.save(_weights(b / 100), tmp_path / f"checkpoint-{b}.pt")
    (tmp_path / "mine.pt").write_bytes((tmp_path / "epoch-2.pt").read_bytes())

    args = _args(tmp_path, "--checkpoint", "mine.pt")  # relative: found in --exp-dir
    assert choose_checkpoint(args) == tmp_path / "mine.pt"
    assert checkpoint_tag(args) == "mine"
    sd, source = load_weights(args)
    assert source == str(tmp_path / "mine.pt") and sd["encoder_projector.proj.weight"][0, 0].item() == 2.0

    args = _args(tmp_path, "--epoch", "3", "--avg", "2")
    assert choose_checkpoint(args) is None and checkpoint_tag(args) == "epoch-3-avg-2"
    sd, source = load_weights(args)
    assert sd["encoder_projector.proj.weight"][0, 0].item() == pytest.approx(2.5)  # mean of epochs 2 and 3
    assert source == f"{tmp_path} epoch-3-avg-2"

    args = _args(tmp_path, "--iter", "150", "--avg", "1")  # the newest batch checkpoint <= 150
    assert checkpoint_tag(args) == "iter-150-avg-1"
    assert load_weights(args)[0]["encoder_projector.proj.weight"][0, 0].item() == 1.0

    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        choose_checkpoint(_args(tmp_path, "--checkpoint", "nothere.pt"))
    with pytest.raises(FileNotFoundError, match="epoch-4.pt"):  # --avg 2 ending at 5 needs 4 and 5
        choose_checkpoint(_args(tmp_path, "--epoch", "5", "--avg", "2"))
    with pytest.raises(UserError, match="say which weights to use"):
        choose_checkpoint(_args(tmp_path))


def test_weights_must_fit_the_recipe():
    single = {"encoder_projector.proj.weight": 0, "llm.x.lora_A.weight": 0}
    mose = {"encoder_projector.0.proj.weight": 0, "encoder_projector.1.proj.weight": 0, "llm.x.lora_A.weight": 0}
    args = get_decode_parser().parse_args([])
    check_weights_fit(recipes.SPEECHLLM, args, single, "s.pt")
    with pytest.raises(UserError, match="2 encoder projector.*MoSE.*with decode.py"):
        check_weights_fit(recipes.SPEECHLLM, args, mose, "m.pt")
    margs = get_decode_parser(mose=True).parse_args(["--speech-encoder-type", "large,large",
                                                      "--speech-encoder-path", "a,b"])
    check_weights_fit(recipes.MOSE, margs, mose, "m.pt")
    with pytest.raises(UserError, match="has no LoRA weights"):
        check_weights_fit(recipes.SPEECHLLM, args, {"encoder_projector.proj.weight": 0}, "n.pt")
    check_weights_fit(recipes.AED, args, {"anything": 0}, "aed.pt")  # no SpeechLLM layout to check


def test_the_three_inference_paths_use_the_shared_loader():
    """decode, transcribe and firered.decode load through llmasr.recipes.inference /
    llmasr.checkpoint.prepare_for_inference, and none of them moves, evaluates or merges a model itself."""
    uses = {"llmasr/recipes/decode.py": "load_for_inference", "llmasr/recipes/transcribe.py": "load_for_inference",
            "llmasr/firered/decode.py": "prepare_for_inference"}
    for rel, loader in uses.items():
        text = (SRC / rel).read_text()
        assert loader in text, rel
        for own in (".merge_lora_for_inference()", ".set_decode_dtype(", ".eval()", "torch.set_num_threads"):
            assert own not in text, f"{rel} does {own} itself"


# --------------------------------------------------------------------------- --help


ICEFALL_FLAGS = ("--world-size", "--num-epochs", "--start-epoch", "--exp-dir", "--max-duration", "--base-lr", "--seed")


def _help(script: str, flag: str) -> str:
    out = subprocess.run([sys.executable, str(SRC / script), flag], capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _flag_lines(text: str):
    return [line for line in text.splitlines() if re.match(r"^  -", line)]


def _every_flag(parser):
    # (--local_rank: passed by the deepspeed launcher, never in any help)
    return {a.option_strings[0] for a in parser._actions if a.option_strings} - {"--local_rank"}


@pytest.mark.parametrize("script,parser", [("train.py", lambda: get_parser()),
                                           ("decode.py", lambda: get_decode_parser())])
def test_help_is_grouped_and_short_help_all_shows_every_flag(script, parser):
    short, full = _help(script, "--help"), _help(script, "--help-all")
    for flag in ICEFALL_FLAGS if script == "train.py" else ("--exp-dir", "--epoch", "--avg", "--max-duration"):
        assert re.search(rf"^  {flag}\b", short, re.M), flag
    assert len(_flag_lines(short)) < 65
    every = _every_flag(parser())
    assert len(every) > len(_flag_lines(short)) + 10
    shown = {line.split()[0].rstrip(",") for line in _flag_lines(full)}
    assert every - shown == set()
    if script == "train.py":
        for group in ("training:", "checkpointing:", "distributed:", "logging:", "model:", "Data:"):
            assert f"\n{group}\n" in short, group


@pytest.mark.parametrize("knobs,make", [(recipes.TRAIN_KNOBS, lambda: get_parser()),
                                        (recipes.DECODE_KNOBS, lambda: get_decode_parser())])
def test_every_hidden_flag_still_parses(knobs, make):
    parser = make()
    table = {opt: a for a in parser._actions for opt in a.option_strings}
    hidden = [f for f in knobs if f in table]
    assert len(hidden) >= 20
    for flag in hidden:
        action = table[flag]
        assert action.help == argparse.SUPPRESS, flag
        if action.choices:
            value = next(c for c in action.choices if c != action.default)
        elif action.type is str2bool:
            value = "false" if action.default else "true"
        elif action.type in (int, float) or isinstance(action.default, (int, float)) and not isinstance(action.default, bool):
            value = "3"
        else:
            value = "x"
        try:
            args = parser.parse_args([flag, value])
        except SystemExit:
            pytest.fail(f"{flag} {value} is not accepted")
        assert getattr(args, action.dest) != action.default, flag
