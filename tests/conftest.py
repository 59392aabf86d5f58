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


class QuickDemo:
    """One run of ``src/demo.py --quick`` (its trained model, result files and output), shared by
    tests/test_demo.py and the tests that need a trained small model (long recordings)."""

    def __init__(self, exp_dir: Path, work_dir: Path, proc, env):
        import json

        self.exp_dir, self.work_dir, self.proc, self.env = exp_dir, work_dir, proc, env
        self.output = proc.stdout + proc.stderr
        results = exp_dir / "results.json"
        self.result = json.loads(results.read_text()) if results.is_file() else None


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory, repo_dir) -> QuickDemo:
    """Trains the quick demo once per session (3-10 min on 2 CPU cores). The test that owns it
    (test_demo.py::test_quick_demo_learns) checks its exit status and output; the others need
    its model and fail with the demo's output if it did not run through."""
    import subprocess
    import sys

    from tests.helpers import require_binary

    require_binary("espeak-ng")
    require_binary("sox")
    root = tmp_path_factory.mktemp("quick_demo")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(repo_dir / "src" / "demo.py"), "--quick", "--exp-dir", str(root / "exp"),
         "--work-dir", str(root / "work")],
        cwd=str(repo_dir), env=env, capture_output=True, text=True, timeout=1500,
    )
    return QuickDemo(root / "exp", root / "work", proc, env)
