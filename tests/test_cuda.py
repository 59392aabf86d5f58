"""Tests that need a CUDA GPU (marker ``cuda``); each skips with one line where none is visible. A GPU is
not a declared dependency, so the skip is honest. Run them with ``pytest -m cuda``."""
import pytest
import torch
import torch.nn.functional as F

from llmasr import layers, llm

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")]


@pytest.fixture(autouse=True)
def no_tf32():
    # CUDA fp32 results are compared with CPU ones: TF32 convolutions/matmuls would differ by ~1e-3.
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_weight_conv_takes_fp32_features_on_cuda(half):
    # DeepSpeed fp16/bf16 halves frozen encoders and runs without autocast (issue #29 finding 1).
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(8, 4, 3).cuda().to(half)
    x = torch.randn(2, 8, 20, device="cuda")
    y = layers.cpu_fp32_conv(conv, x)
    assert y.dtype == torch.float32 and y.device.type == "cuda"
    ref = F.conv1d(x.double(), conv.weight.double(), conv.bias.double())
    assert torch.allclose(y.double(), ref, atol=0.05, rtol=0.02)


def test_llm_defaults_on_cuda():
    assert llm.resolve_dtype("auto", "cuda") == torch.float16
    assert llm.default_attn_implementation(torch.float32, "cuda") == "sdpa"
