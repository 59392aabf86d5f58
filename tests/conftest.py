"""Shared fixtures: the checkout's package, golden fixtures, deterministic CPU settings.
Helper functions are in tests/helpers.py."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import GOLDEN, REPO, SRC, pin_cpu

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    """The suite tests this checkout's src/llmasr, installed editable (local/setup.sh) or put first on
    PYTHONPATH; another installed copy would be tested instead, silently."""
    try:
        import llmasr
    except ImportError as e:
        raise pytest.UsageError(f"cannot import llmasr ({e}): run local/setup.sh (pip install -e .) "
                                f"or set PYTHONPATH={SRC}") from None
    found = Path(llmasr.__file__).resolve().parent
    if found != SRC / "llmasr":
        raise pytest.UsageError(f"llmasr is imported from {found}, not from this checkout's {SRC / 'llmasr'}: "
                                f"pip install -e {REPO}, or set PYTHONPATH={SRC}")


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN.is_dir():
        pytest.fail(f"golden fixtures not found at {GOLDEN} (set LLMASR_GOLDEN)")
    return GOLDEN


@pytest.fixture(scope="session")
def repo_dir() -> Path:
    return REPO


@pytest.fixture(autouse=True)
def cpu_unless_marked_cuda(request, monkeypatch):
    """Only tests marked ``cuda`` (tests/test_cuda.py) may see a GPU; every other test stays on the CPU
    on a GPU host, where recipes would otherwise switch silently to CUDA + fp16 and NCCL."""
    if request.node.get_closest_marker("cuda") is None:
        pin_cpu(monkeypatch)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tests run tiny models: a second OpenMP thread gains nothing, and on a shared 2-core machine
    spin-waiting threads slow them down by an order of magnitude (results differ by ~1e-6).
    Scripts run as subprocesses choose their own thread count."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def sl(golden_dir) -> Path:
    """The SpeechLLM golden fixture (tiny Zipformers + tiny Qwen2 + the recipe's checkpoints)."""
    return golden_dir / "speechllm"
