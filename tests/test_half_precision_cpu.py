"""Half precision (fp16/bf16) on CPU: every encoder convolution runs in fp32, so nothing hangs.

On x86 CPUs with AVX-512 FP16/AMX, oneDNN (torch 2.13 CPU wheel) JIT-compiles fp16/bf16 depthwise
convolutions for minutes (``brdgmm_dw_convolution_fwd_t::init``; 16 channels is the slow case) -
e.g. ``test_training.py::test_fp16_grad_scaler_skips_overflowing_step`` never finished. The encoders
therefore compute their convolutions in fp32 on CPU (llmasr.encoders.zipformer_modules.cpu_fp32_conv)
and return the incoming dtype. These tests would hang (fail on their timeout) without that.

Tolerances are about 3x what was measured with one thread on the golden tiny Zipformer
(torch 2.13.0+cpu, Xeon with AVX-512 FP16/AMX); the measured values are in the comments.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from llmasr.encoders.zipformer import ZipformerConfig, build_zipformer
from llmasr.encoders.zipformer_modules import ConvNeXt, ConvolutionModule
from llmasr.layers import cpu_fp32_functional_conv

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}



@pytest.fixture(scope="module")
def golden_zipformer(golden_dir, tmp_path_factory):
    golden = torch.load(golden_dir / "zipformer" / "zipformer_tiny.pt", weights_only=True)
    path = tmp_path_factory.mktemp("zipformer_half") / "pretrained.pt"
    torch.save(golden["pretrained"], path)
    model = build_zipformer(ZipformerConfig.from_dict(golden["config"]), str(path)).eval()
    return model, golden["features"], golden["feature_lens"]


def _forward_backward(model, features, lens, autocast_dtype=None):
    """Output (fp32 copy), output lengths, input gradient, all parameter gradients (one flat fp32 vector)."""
    model.zero_grad()
    x = features.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out, out_lens = model(x, lens)
    valid = (torch.arange(out.size(1))[None, :] < out_lens[:, None])[..., None]
    proj = torch.linspace(-1.0, 1.0, out.size(-1))  # fixed, so that every channel gets a gradient
    loss = (out.float() * valid * proj).sum() / valid.sum()
    assert torch.isfinite(loss)
    loss.backward()
    grads = torch.cat([p.grad.float().flatten() for _, p in sorted(model.named_parameters()) if p.grad is not None])
    return out, out_lens, x.grad.float(), grads


def _max_valid_diff(out, ref, lens):
    return max((out[i, :n].float() - ref[i, :n]).abs().max().item() for i, n in enumerate(lens.tolist()))


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# Measured (max |out - out_fp32| over valid frames, max |out_fp32| = 6.17; relative L2 error of the
# input gradient; of all parameter gradients):
#   bf16 autocast: 0.0157, 0.0031, 0.0019       fp16 autocast: 0.0025, 0.00038, 0.00023
#   bf16 model + bf16 input: 0.109, 0.0136, 0.0066    fp16 model + fp16 input: 0.0135, 0.0018, 0.0008
# Wall time (forward + backward, one thread): fp32 0.26 s, bf16 autocast 0.58 s, fp16 autocast 0.44 s,
# fp16 model 0.26 s; before the fix the fp16 runs took 18 s (backward) and a 16-channel model hung.
TOLERANCES = {
    ("autocast", "bf16"): (0.05, 0.01, 0.006),
    ("autocast", "fp16"): (0.008, 0.0012, 0.0008),
    ("model", "bf16"): (0.3, 0.04, 0.02),
    ("model", "fp16"): (0.04, 0.006, 0.003),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how,name", sorted(TOLERANCES))
def test_golden_zipformer_half_forward_backward_is_fast_and_close_to_fp32(golden_zipformer, how, name):
    model, features, lens = golden_zipformer
    dtype = HALF[name]
    ref_out, ref_lens, ref_gx, ref_gw = _forward_backward(model, features, lens)
    if how == "autocast":
        out, out_lens, gx, gw = _forward_backward(model, features, lens, autocast_dtype=dtype)
        assert out.dtype == torch.float32  # the residual stream stays fp32 (BiasNorm), as in icefall
    else:  # the whole encoder and its input in half precision
        half = copy.deepcopy(model).to(dtype)
        out, out_lens, gx, gw = _forward_backward(half, features.to(dtype), lens)
        assert out.dtype == dtype
    assert out_lens.tolist() == ref_lens.tolist()
    out_tol, gx_tol, gw_tol = TOLERANCES[(how, name)]
    assert _max_valid_diff(out.detach(), ref_out.detach(), out_lens) <= out_tol
    assert _rel(gx, ref_gx) <= gx_tol
    assert _rel(gw, ref_gw) <= gw_tol


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(HALF))
def test_depthwise_conv_module_keeps_half_dtype_and_matches_fp32(name):
    dtype = HALF[name]
    torch.manual_seed(0)
    module = ConvolutionModule(16, 15)  # 16 channels, kernel 15: the case that hung in oneDNN
    torch.nn.init.normal_(module.out_proj.weight, std=0.3)  # output ~0.2 instead of ~0.01
    x = torch.randn(2, 50, 16)
    mask = torch.zeros(2, 50, dtype=torch.bool)
    mask[1, 40:] = True
    ref = module(x, mask)
    half = copy.deepcopy(module).to(dtype)
    xh = x.to(dtype).requires_grad_(True)
    out = half(xh, mask)
    assert out.dtype == dtype
    out.float().sum().backward()
    assert xh.grad.dtype == dtype and torch.isfinite(xh.grad).all()
    # Measured max |diff| (max |ref| 0.21): fp16 1.3e-4, bf16 1.2e-3.
    atol = {"fp16": 5e-4, "bf16": 4e-3}[name]
    torch.testing.assert_close(out.float(), ref.detach(), atol=atol, rtol=0)
    # Under autocast with a half input (fp32 weights): same dtype, same values.
    with torch.autocast("cpu", dtype=dtype):
        out_ac = module(x.to(dtype), mask)
    assert out_ac.dtype == dtype
    torch.testing.assert_close(out_ac.float(), ref.detach(), atol=atol, rtol=0)

    # The depthwise conv itself is computed in fp32 and only then rounded: bit-identical to that.
    conv = module.depthwise_conv
    xc = torch.randn(2, 16, 1, 50).to(dtype)
    w = conv.weight.unsqueeze(2)
    got = cpu_fp32_functional_conv(F.conv2d, xc, w.to(dtype), conv.bias.to(dtype), padding=(0, 7), groups=16)
    want = F.conv2d(xc.float(), w.to(dtype).float(), conv.bias.to(dtype).float(), padding=(0, 7), groups=16)
    assert got.dtype == dtype and torch.equal(got, want.to(dtype))
    with torch.autocast("cpu", dtype=dtype):  # an fp32 input under autocast stays fp32
        got32 = cpu_fp32_functional_conv(F.conv2d, xc.float(), w, conv.bias, padding=(0, 7), groups=16)
    assert got32.dtype == torch.float32
    assert torch.equal(got32, F.conv2d(xc.float(), w, conv.bias, padding=(0, 7), groups=16))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(HALF))
def test_frontend_convnext_keeps_half_dtype_and_matches_fp32(name):
    dtype = HALF[name]
    torch.manual_seed(0)
    block = ConvNeXt(16)
    x = torch.randn(2, 16, 30, 19).contiguous(memory_format=torch.channels_last)
    ref = block(x)
    out = copy.deepcopy(block).to(dtype)(x.to(dtype))
    assert out.dtype == dtype
    # Measured max |diff| (max |ref| 4.3): fp16 1.8e-3, bf16 8.7e-3.
    torch.testing.assert_close(out.float(), ref.detach(), atol={"fp16": 6e-3, "bf16": 3e-2}[name], rtol=0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(HALF))
def test_firered_conformer_half_is_fast_and_close_to_fp32(name):
    from llmasr.encoders.firered_conformer import ConformerEncoder

    dtype = HALF[name]
    torch.manual_seed(0)
    enc = ConformerEncoder(80, n_layers=1, n_head=2, d_model=8, residual_dropout=0.0, dropout_rate=0.0,
                           kernel_size=33).eval()  # depthwise conv over 16 channels: hung in fp16
    feats = torch.randn(2, 60, 80)
    lens = torch.tensor([60, 45])
    ref, ref_lens = enc(feats, lens)
    x = feats.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        out, out_lens = enc(x, lens)
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert out_lens.tolist() == ref_lens.tolist()
    # The convs run in fp32; the attention and feed-forward matmuls in half precision. Measured max
    # |diff| over valid frames (max |ref| 2.5): autocast fp16 0.0064, bf16 0.037; half model + half
    # input fp16 0.0075, bf16 0.054.
    valid = torch.arange(out.size(1))[None, :] < out_lens[:, None]
    diff = (out.float() - ref)[valid].abs().max().item()
    assert diff <= {"fp16": 0.02, "bf16": 0.12}[name], diff
    half = copy.deepcopy(enc).to(dtype)
    out_h, _ = half(feats.to(dtype), lens)
    assert out_h.dtype == dtype
    diff = (out_h.float() - ref)[valid].abs().max().item()
    assert diff <= {"fp16": 0.025, "bf16": 0.16}[name], diff


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(HALF))
def test_whisper_conv_front_end_under_half_autocast(name):
    from llmasr.encoders.whisper import WhisperEncoder

    dtype = HALF[name]
    torch.manual_seed(0)
    enc = WhisperEncoder.from_dims(dict(n_mels=80, n_audio_ctx=1500, n_audio_state=16, n_audio_head=2,
                                        n_audio_layer=1)).eval()
    feats = torch.randn(2, 100, 80)
    lens = torch.tensor([100, 70])
    with torch.no_grad():
        ref, ref_lens = enc(feats, lens)
        with torch.autocast("cpu", dtype=dtype):
            out, out_lens = enc(feats, lens)
    assert out_lens.tolist() == ref_lens.tolist()
    valid = torch.arange(out.size(1))[None, :] < out_lens[:, None]
    diff = (out.float() - ref)[valid].abs().max().item()
    # Measured max |diff| over valid frames (max |ref| 2.8): fp16 9.8e-4, bf16 6.6e-3.
    assert diff <= {"fp16": 3e-3, "bf16": 2e-2}[name], diff
