"""Shared test fixtures: import path, golden fixtures, deterministic CPU settings."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

# Golden fixtures live beside the repository (../shared/golden); override with LLMASR_GOLDEN.
GOLDEN = Path(os.environ.get("LLMASR_GOLDEN", REPO.parent / "shared" / "golden")).resolve()

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN.is_dir():
        pytest.fail(f"golden fixtures not found at {GOLDEN} (set LLMASR_GOLDEN)")
    return GOLDEN


@pytest.fixture(scope="session")
def repo_dir() -> Path:
    return REPO


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; run local/setup.sh (it installs espeak-ng and sox)")
    return path
