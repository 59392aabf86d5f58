"""The CUDA code paths of issue #29, exercised on the CPU: the branch each piece of code takes on a GPU
is forced (device check patched or cuda availability mocked), so a break there shows up here."""
import json
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmasr import layers, llm

ROOT = Path(__file__).resolve().parents[1]


def _strict_conv1d(x, weight, bias):
    # What a CUDA convolution does with mixed dtypes: refuse them.
    if x.dtype != weight.dtype:
        raise RuntimeError(f"Input type ({x.dtype}) and weight type ({weight.dtype}) should be the same")
    return F.conv1d(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


def test_half_weight_conv_with_fp32_features_on_the_cuda_branch(monkeypatch):
    # DeepSpeed fp16/bf16 casts a frozen encoder's conv weights to half and runs without autocast;
    # the features stay fp32. On CUDA, _half_on_cpu is False: patch it so the CPU takes that branch.
    monkeypatch.setattr(layers, "_half_on_cpu", lambda x, w: False)
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9)
    w = torch.randn(3, 4, 3)
    b = torch.randn(3)
    for half in (torch.float16, torch.bfloat16):
        y = layers.cpu_fp32_functional_conv(_strict_conv1d, x, w.to(half), b.to(half))
        assert y.dtype == torch.float32 and y.shape == (2, 3, 7)
        ref = F.conv1d(x.to(half).float(), w.to(half).float(), b.to(half).float())
        assert torch.allclose(y, ref.to(half).float(), atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="should be the same"):
        _strict_conv1d(x, w.half(), b.half())  # the fake really refuses what the fix avoids


def test_conv_module_goes_through_the_cast(monkeypatch):
    # cpu_fp32_conv (whisper, FireRed subsampling) uses the same branch on CUDA.
    monkeypatch.setattr(layers, "_half_on_cpu", lambda x, w: False)
    conv = torch.nn.Conv1d(4, 3, 3).to(torch.bfloat16)
    seen = []
    orig = conv._conv_forward
    monkeypatch.setattr(conv, "_conv_forward", lambda x, w, b: seen.append((x.dtype, w.dtype)) or orig(x, w, b))
    y = layers.cpu_fp32_conv(conv, torch.randn(1, 4, 5))
    assert seen == [(torch.bfloat16, torch.bfloat16)] and y.dtype == torch.float32


@pytest.fixture
def cuda_visible_with_flash_attn(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))


def test_llm_dtype_and_kernel_follow_device_not_cuda_visibility(cuda_visible_with_flash_attn):
    assert llm.resolve_dtype("auto", "cpu") == torch.float32
    assert llm.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert llm.resolve_dtype("auto", "cuda") == torch.float16
    assert llm.resolve_dtype("auto", "auto") == torch.float16  # "auto" device: CUDA is visible
    assert llm.default_attn_implementation(torch.float32, "cpu") == "sdpa"
    assert llm.default_attn_implementation(torch.bfloat16, "cpu") == "sdpa"
    assert llm.default_attn_implementation(torch.float16, "cuda") == "flash_attention_2"
    assert llm.default_attn_implementation(torch.bfloat16, "cuda:0") == "flash_attention_2"


def test_float32_never_picks_flash_attn(cuda_visible_with_flash_attn):
    for device in (None, "auto", "cuda", "cuda:0"):
        assert llm.default_attn_implementation(llm.resolve_dtype("float32", device), device) == "sdpa"


def test_deepspeed_adam_configs_use_torch_adam():
    # Without torch_adam DeepSpeed JIT-compiles FusedAdam (needs nvcc / CUDA_HOME on the node).
    configs = sorted((ROOT / "local" / "conf").glob("ds_*.json"))
    assert len(configs) >= 3
    with_adam = []
    for path in configs:
        opt = json.loads(path.read_text()).get("optimizer")
        if opt and opt["type"].lower() in ("adam", "adamw"):
            with_adam.append(path.name)
            assert opt["params"].get("torch_adam") is True, path.name
    assert "ds_zero1_whisper.json" in with_adam


def test_cpu_tests_stay_on_the_cpu_on_a_gpu_host(monkeypatch):
    import os

    from llmasr.training import dist
    from tests.helpers import pin_cpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU host
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert dist.backend() == "nccl"
    pin_cpu(monkeypatch)  # what conftest's autouse fixture does for every test not marked cuda
    assert dist.backend() == "gloo"
    assert dist.get_device(0) == torch.device("cpu")
    assert llm.resolve_dtype("auto") == torch.float32
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""  # subprocess launchers inherit it
