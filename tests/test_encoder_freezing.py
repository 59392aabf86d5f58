"""--unfreeze-encoder for every encoder type: SpeechLLM alone owns freezing, train/eval mode and autograd
(encoders are plain modules). Unfrozen: gradients reach the encoder and an optimizer step changes it.
Frozen: it stays in eval mode during model.train(), gets no gradient and stays bit-identical."""
from __future__ import annotations

import pytest
import torch

from llmasr.llm import load_llm
from llmasr.model import SpeechLLM

ENCODERS = ["zipformer", "whisper", "firered"]



def _encoder(kind: str, golden_dir):
    from llmasr.encoders import build_speech_encoder

    torch.manual_seed(0)
    if kind == "zipformer":  # the SpeechLLM golden set's tiny Zipformer
        return build_speech_encoder("tiny_a", str(golden_dir / "speechllm/models/zipformer/tiny_a/pretrained.pt"))
    if kind == "whisper":  # the whisper_llm_zh golden set's tiny Whisper
        return build_speech_encoder("whisper", str(golden_dir / "whisper_llm_zh/models/whisper/whisper-tiny-random.pt"))
    return build_speech_encoder("firered", None, n_layers_enc=1, n_head=2, d_model=32, kernel_size=5)


@pytest.mark.parametrize("unfreeze", [False, True], ids=["frozen", "unfrozen"])
@pytest.mark.parametrize("kind", ENCODERS)
def test_speechllm_owns_encoder_freezing(golden_dir, kind, unfreeze):
    llm, tok = load_llm(golden_dir / "speechllm/models/llm", dtype=torch.float32, attn_implementation="eager",
                        use_lora=True, lora_r=4, lora_alpha=8)
    model = SpeechLLM([_encoder(kind, golden_dir)], llm, tok, unfreeze_encoder=unfreeze)
    enc = model.encoder
    model.train()
    assert model.training and model.encoder_projector.training
    assert enc.training == unfreeze and all(not m.training for m in enc.modules()) != unfreeze
    assert all(p.requires_grad == unfreeze for p in enc.parameters())
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    proj_before = model.encoder_projector.proj[1].weight.detach().clone()

    torch.manual_seed(1)
    feats, lens = torch.randn(2, 240, 80), torch.tensor([240, 190])
    # Adam without weight decay: a parameter moves only if it got a gradient
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss, _ = model(feats, lens, ["the river", "a red car"])
    loss.backward()
    grads = {n: p.grad for n, p in enc.named_parameters()}
    opt.step()
    after = enc.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not torch.equal(proj_before, model.encoder_projector.proj[1].weight)
    if unfreeze:
        with_grad = [n for n, g in grads.items() if g is not None and g.abs().sum() > 0]
        assert len(with_grad) >= 0.9 * len(grads), sorted(set(grads) - set(with_grad))
        assert len(changed) >= len(with_grad)
    else:
        assert all(g is None for g in grads.values())
        assert not changed, changed
