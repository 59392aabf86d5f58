"""Zipformer2 encoder: parity with icefall's own outputs (golden fixture), checkpoint layout, errors, training."""
from __future__ import annotations

import json

import pytest
import torch

from llmasr.encoders import build_speech_encoder
from llmasr.encoders.zipformer import (
    LARGE,
    MEDIUM,
    ZipformerConfig,
    ZipformerEncoder,
    accepts,
    build_zipformer,
    load_zipformer_checkpoint,
)

ATOL = 1e-4



@pytest.fixture(scope="module")
def golden(golden_dir):
    return torch.load(golden_dir / "zipformer" / "zipformer_tiny.pt", weights_only=True)


@pytest.fixture(scope="module")
def golden_ckpt(golden, tmp_path_factory):
    """The fixture's icefall pretrained.pt (whole ASR model: decoder/joiner/CTC heads included) as a file."""
    path = tmp_path_factory.mktemp("zipformer") / "pretrained.pt"
    torch.save(golden["pretrained"], path)
    return path


@pytest.fixture(scope="module")
def golden_model(golden, golden_ckpt):
    cfg = ZipformerConfig.from_dict(golden["config"])
    return build_zipformer(cfg, str(golden_ckpt)).eval()


@pytest.fixture(scope="module")
def tiny_a_path(golden_dir):
    return golden_dir / "speechllm" / "models" / "zipformer" / "tiny_a" / "pretrained.pt"


# ---------------------------------------------------------------------------------------------------------
# Parity with icefall
# ---------------------------------------------------------------------------------------------------------


def test_golden_padded_batch(golden, golden_model):
    with torch.inference_mode():
        out, out_lens = golden_model(golden["features"], golden["feature_lens"])
    assert out_lens.tolist() == golden["encoder_out_lens"].tolist() == [73, 59, 38]
    assert out.shape == golden["encoder_out"].shape == (3, 73, 80)
    for i, n in enumerate(out_lens.tolist()):
        diff = (out[i, :n] - golden["encoder_out"][i, :n]).abs().max().item()
        assert diff <= ATOL, f"utterance {i}: max abs diff {diff}"


def test_golden_frontend(golden, golden_model):
    with torch.inference_mode():
        x, x_lens = golden_model.encoder_embed(golden["features"], golden["feature_lens"])
    assert x_lens.tolist() == golden["encoder_embed_out_lens"].tolist()
    for i, n in enumerate(x_lens.tolist()):
        assert (x[i, :n] - golden["encoder_embed_out"][i, :n]).abs().max().item() <= ATOL


def test_golden_each_utterance_alone(golden, golden_model):
    with torch.inference_mode():
        for i, n in enumerate(golden["feature_lens"].tolist()):
            out, out_lens = golden_model(golden["features"][i : i + 1, :n], golden["feature_lens"][i : i + 1])
            ref = golden["encoder_out_alone"][i]
            assert out_lens.tolist() == [ref.shape[0]]
            diff = (out[0] - ref).abs().max().item()
            assert diff <= ATOL, f"utterance {i} alone: max abs diff {diff}"


def test_bf16_autocast_close_to_fp32(golden, golden_model):
    feats, lens = golden["features"], golden["feature_lens"]
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, out_lens = golden_model(feats, lens)
    assert out_lens.tolist() == [73, 59, 38]
    ref = golden["encoder_out"]
    # As in icefall under autocast, BiasNorm keeps the residual stream (and so the output) in fp32.
    assert out.dtype == torch.float32
    rel = (out[0] - ref[0]).norm() / ref[0].norm()
    assert rel < 0.01, rel  # measured 0.002


# ---------------------------------------------------------------------------------------------------------
# Published layouts
# ---------------------------------------------------------------------------------------------------------


def icefall_encoder_shapes(cfg: ZipformerConfig) -> dict:
    """Expected icefall parameter names/shapes, written from icefall's module definitions (not our code)."""
    d0 = cfg.encoder_dim[0]
    shapes = {
        "encoder_embed.conv.0.weight": (8, 1, 3, 3), "encoder_embed.conv.0.bias": (8,),
        "encoder_embed.conv.4.weight": (32, 8, 3, 3), "encoder_embed.conv.4.bias": (32,),
        "encoder_embed.conv.7.weight": (128, 32, 3, 3), "encoder_embed.conv.7.bias": (128,),
        "encoder_embed.convnext.depthwise_conv.weight": (128, 1, 7, 7),
        "encoder_embed.convnext.depthwise_conv.bias": (128,),
        "encoder_embed.convnext.pointwise_conv1.weight": (384, 128, 1, 1),
        "encoder_embed.convnext.pointwise_conv1.bias": (384,),
        "encoder_embed.convnext.pointwise_conv2.weight": (128, 384, 1, 1),
        "encoder_embed.convnext.pointwise_conv2.bias": (128,),
        "encoder_embed.out.weight": (d0, 128 * 19), "encoder_embed.out.bias": (d0,),
        "encoder_embed.out_norm.log_scale": (), "encoder_embed.out_norm.bias": (d0,),
    }
    for i, ds in enumerate(cfg.downsampling_factor):
        d, h, ff, k = cfg.encoder_dim[i], cfg.num_heads[i], cfg.feedforward_dim[i], cfg.cnn_module_kernel[i]
        q, v, p = cfg.query_head_dim[i], cfg.value_head_dim[i], cfg.pos_head_dim[i]
        base = f"encoder.encoders.{i}."
        if ds != 1:
            shapes[base + "downsample.bias"] = (ds,)
            shapes[base + "out_combiner.bypass_scale"] = (d,)
            base += "encoder."
        for j in range(cfg.num_encoder_layers[i]):
            L = f"{base}layers.{j}."
            for name in ("bypass_scale", "bypass.bypass_scale", "bypass_mid.bypass_scale", "norm.bias"):
                shapes[L + name] = (d,)
            shapes[L + "norm.log_scale"] = ()
            shapes[L + "self_attn_weights.in_proj.weight"] = ((2 * q + p) * h, d)
            shapes[L + "self_attn_weights.in_proj.bias"] = ((2 * q + p) * h,)
            shapes[L + "self_attn_weights.linear_pos.weight"] = (h * p, cfg.pos_dim)
            for a in ("self_attn1", "self_attn2"):
                shapes[L + a + ".in_proj.weight"] = (h * v, d)
                shapes[L + a + ".in_proj.bias"] = (h * v,)
                shapes[L + a + ".out_proj.weight"] = (d, h * v)
                shapes[L + a + ".out_proj.bias"] = (d,)
            for name, hid in (("feed_forward1", ff * 3 // 4), ("feed_forward2", ff), ("feed_forward3", ff * 5 // 4),
                              ("nonlin_attention", None)):
                if hid is None:
                    hid_in, hid = 3 * (3 * d // 4), 3 * d // 4
                else:
                    hid_in = hid
                shapes[L + name + ".in_proj.weight"] = (hid_in, d)
                shapes[L + name + ".in_proj.bias"] = (hid_in,)
                shapes[L + name + ".out_proj.weight"] = (d, hid)
                shapes[L + name + ".out_proj.bias"] = (d,)
            for c in ("conv_module1", "conv_module2"):
                shapes[L + c + ".in_proj.weight"] = (2 * d, d)
                shapes[L + c + ".in_proj.bias"] = (2 * d,)
                shapes[L + c + ".depthwise_conv.weight"] = (d, 1, k)
                shapes[L + c + ".depthwise_conv.bias"] = (d,)
                shapes[L + c + ".out_proj.weight"] = (d, d)
                shapes[L + c + ".out_proj.bias"] = (d,)
    shapes["encoder.downsample_output.bias"] = (cfg.output_downsampling_factor,)
    return shapes


def test_shape_spec_matches_real_icefall_checkpoint(golden):
    """Validates icefall_encoder_shapes() itself against the state dict icefall produced."""
    cfg = ZipformerConfig.from_dict(golden["config"])
    real = {k: tuple(v.shape) for k, v in golden["pretrained"]["model"].items()
            if k.startswith(("encoder_embed.", "encoder."))}
    assert icefall_encoder_shapes(cfg) == real


@pytest.mark.parametrize("encoder_type,cfg,num_params", [("large", LARGE, 146_625_594), ("medium", MEDIUM, 63_994_103)])
def test_published_layout(encoder_type, cfg, num_params):
    with torch.device("meta"):  # no memory, no init cost
        model = build_speech_encoder(encoder_type)
    assert model.config == cfg
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == icefall_encoder_shapes(cfg)
    assert sum(p.numel() for p in model.parameters()) == num_params
    assert (model.output_dim, model.feature_dim, model.feature_type) == (max(cfg.encoder_dim), 80, "fbank")
    assert ",".join(map(str, cfg.num_encoder_layers)) == ("2,2,4,5,4,2" if encoder_type == "large" else "2,2,3,4,3,2")


def test_config_from_icefall_strings():
    cfg = ZipformerConfig.from_dict({
        "num_encoder_layers": "2,2,4,5,4,2", "feedforward_dim": "512,768,1536,2048,1536,768",
        "encoder_dim": "192,256,512,768,512,256", "encoder_unmasked_dim": "192,192,256,320,256,192",
        "num_heads": "4,4,4,8,4,4", "query_head_dim": "32", "value_head_dim": 12, "pos_head_dim": [4],
        "pos_dim": 48, "cnn_module_kernel": "31,31,15,15,15,31", "downsampling_factor": "1,2,4,8,4,2",
        "decoder_dim": 512, "causal": False,
    })
    assert cfg == LARGE
    with pytest.raises(ValueError, match="encoder_dim.*3 values.*6 stacks"):
        ZipformerConfig.from_dict({"num_encoder_layers": "2", "encoder_dim": "1,2,3", "feedforward_dim": "8"})
    with pytest.raises(ValueError, match="causal"):
        ZipformerConfig.from_dict({**MEDIUM.to_icefall_dict(), "causal": True})


# ---------------------------------------------------------------------------------------------------------
# Lengths
# ---------------------------------------------------------------------------------------------------------


def test_shortest_input_and_error_below(golden_model):
    feats = torch.randn(2, 300, 80)
    with torch.inference_mode():
        out, lens = golden_model(feats, torch.tensor([300, 9]))
        assert lens.tolist() == [73, 1] and out.shape == (2, 73, 80)
        out, lens = golden_model(feats[:1, :9], torch.tensor([9]))
        assert lens.tolist() == [1] and out.shape == (1, 1, 80) and torch.isfinite(out).all()
        lens = ZipformerEncoder.output_lengths(torch.tensor([9, 10, 11, 12, 13, 300, 241, 157]))
        assert lens.tolist() == [1, 1, 1, 1, 2, 73, 59, 38]  # ((T - 7) // 2 + 1) // 2
        with pytest.raises(ValueError, match=r"at least 9 .*\(1, 8\)"):
            golden_model(feats[:, :50], torch.tensor([50, 8]))
        with pytest.raises(ValueError, match="at least 9"):
            golden_model(feats[:1, :8], torch.tensor([8]))
        with pytest.raises(ValueError, match=r"\(N, T, 80\)"):
            golden_model(torch.randn(1, 50, 40), torch.tensor([50]))


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------


def test_tiny_a_via_registry(tiny_a_path):
    assert accepts("tiny_a", str(tiny_a_path))
    assert not accepts("tiny_a", "/nonexistent/dir/pretrained.pt")
    model = build_speech_encoder("tiny_a", str(tiny_a_path)).eval()
    params = json.loads((tiny_a_path.parent / "model_params.json").read_text())
    assert model.config.num_encoder_layers == (1, 1, 2, 1, 1, 1)
    assert (model.output_dim, model.feature_dim, model.feature_type) == (48, 80, "fbank")
    assert model.config.pos_dim == params["pos_dim"] == 8
    sd = torch.load(tiny_a_path, weights_only=True)["model"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    feats = torch.full((2, 160, 80), -23.0259)  # lhotse pads with log(1e-10)
    feats[:, :, :] += torch.randn(2, 160, 80)
    with torch.inference_mode():
        out, lens = model(feats, torch.tensor([160, 100]))
    assert lens.tolist() == [38, 23] and out.shape == (2, 38, 48)
    with pytest.raises(ValueError, match="unknown --speech-encoder-type 'tiny_b'"):
        build_speech_encoder("tiny_b", "/nonexistent/pretrained.pt")


def test_own_encoder_checkpoint_roundtrip(golden, golden_model, tmp_path):
    cfg = golden_model.config
    feats, lens = golden["features"][:, :120], torch.tensor([120, 110, 100])
    with torch.inference_mode():
        ref, _ = golden_model(feats, lens)
    for obj in ({"model": golden_model.state_dict()}, golden_model.state_dict()):
        path = tmp_path / "enc.pt"
        torch.save(obj, path)
        model = build_zipformer(cfg, str(path)).eval()
        with torch.inference_mode():
            out, _ = model(feats, lens)
        assert torch.equal(out, ref)


def test_wrong_config_error_names_keys_shapes_and_config(golden_ckpt):
    # tiny_a's config vs the zipformer golden checkpoint: same stacks, different layer counts and dims.
    cfg = ZipformerConfig.from_dict({
        "num_encoder_layers": "1,1,2,1,1,1", "encoder_dim": "16,24,32,48,32,24",
        "feedforward_dim": "32,48,64,96,64,48", "num_heads": "2", "query_head_dim": "8", "value_head_dim": "4",
        "pos_head_dim": "2", "pos_dim": 8, "encoder_unmasked_dim": "16,16,24,32,24,16",
        "cnn_module_kernel": "15,15,7,7,7,15"})
    model = ZipformerEncoder(cfg)
    with pytest.raises(ValueError) as e:
        load_zipformer_checkpoint(model, str(golden_ckpt), config_source="type 'tiny_a'")
    msg = str(e.value)
    assert str(golden_ckpt) in msg
    assert "type 'tiny_a': num_encoder_layers=1,1,2,1,1,1 encoder_dim=16,24,32,48,32,24" in msg
    assert "checkpoint looks like num_encoder_layers=1,2,1,2,1,1 encoder_dim=32,48,64,80,56,40" in msg
    assert "unexpected: encoder.encoders.1.encoder.layers.1." in msg
    assert "missing: encoder.encoders.2.encoder.layers.1." in msg
    assert "shape mismatch: encoder_embed.out.weight: checkpoint (32, 2432) vs model (16, 2432)" in msg


def test_missing_and_foreign_keys(golden, tmp_path):
    cfg = ZipformerConfig.from_dict(golden["config"])
    sd = dict(golden["pretrained"]["model"])
    del sd["encoder.encoders.3.downsample.bias"]
    sd["speech_projector.weight"] = torch.zeros(2, 2)
    path = tmp_path / "broken.pt"
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError) as e:
        build_zipformer(cfg, str(path))
    msg = str(e.value)
    assert "1 missing: encoder.encoders.3.downsample.bias" in msg
    assert "1 unexpected: speech_projector.weight" in msg
    assert "shape mismatch" not in msg


def test_truncated_and_non_checkpoint_files(tiny_a_path, tmp_path):
    data = tiny_a_path.read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    cfg = ZipformerConfig.from_dict(json.loads((tiny_a_path.parent / "model_params.json").read_text()))
    with pytest.raises(ValueError, match=f"{bad}.*corrupt or truncated"):
        build_zipformer(cfg, str(bad))
    notes = tmp_path / "notes.pt"
    torch.save({"model": "not a state dict"}, notes)
    with pytest.raises(ValueError, match=f"{notes}: expected"):
        build_speech_encoder("medium", str(notes))
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        build_speech_encoder("medium", str(tmp_path / "nope.pt"))


# ---------------------------------------------------------------------------------------------------------
# Training when unfrozen
# ---------------------------------------------------------------------------------------------------------


def test_trains_when_unfrozen(golden, golden_ckpt):
    torch.manual_seed(0)
    cfg = ZipformerConfig.from_dict(golden["config"])
    model = build_zipformer(cfg, str(golden_ckpt)).train()
    # The CTC head stays fixed: only the encoder can lower the loss.
    head = torch.nn.Linear(model.output_dim, 8).requires_grad_(False)
    feats, feat_lens = golden["features"][:, :160], torch.tensor([160, 140, 120])
    targets = torch.randint(1, 8, (3, 6))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(8):
        out, out_lens = model(feats, feat_lens)
        logp = head(out).log_softmax(-1).transpose(0, 1)
        loss = torch.nn.functional.ctc_loss(logp, targets, out_lens, torch.full((3,), 6))
        opt.zero_grad()
        loss.backward()
        if not losses:
            no_grad = [n for n, p in model.named_parameters() if p.grad is None]
            assert not no_grad, no_grad  # every parameter, incl. icefall's unused layer bypass_scale, is in the graph
            assert model.encoder_embed.conv[0].weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses))
    assert losses[-1] < 0.7 * losses[0], losses
