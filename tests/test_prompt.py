"""Prompt builder: golden ids, training labels, template equivalence, MoSE groups, bad input."""
import json
import random

import pytest
import torch

from llmasr.prompt import (
    IGNORE_INDEX,
    PromptFormat,
    add_speech_tokens,
    build_prompts,
    get_prompt_format,
    register_prompt_format,
    sample_speech_groups,
)

GOLDEN_DECODE_PROMPT = [513, 365, 198, 518, 515, 519, 514, 198, 513, 362, 198]


@pytest.fixture(scope="module")
def fixture_json(golden_dir):
    return json.loads((golden_dir / "speechllm" / "fixture.json").read_text())


@pytest.fixture(scope="module")
def tokenizer(golden_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(golden_dir / "speechllm" / "models" / "llm"))
    ids = add_speech_tokens(tok)
    assert ids == {"<speech>": 515, "<start_text>": 516, "<end_text>": 517, "<start_speech>": 518, "<end_speech>": 519}
    assert len(tok) == 520
    return tok


def test_special_token_ids_match_fixture(tokenizer, fixture_json):
    for token, tid in fixture_json["token_ids"].items():
        if token.startswith("<"):
            assert tokenizer.convert_tokens_to_ids(token) == tid, token
    # adding again changes nothing
    assert add_speech_tokens(tokenizer)["<end_speech>"] == 519
    assert len(tokenizer) == fixture_json["tokenizer_len_after_recipe_additions"]


def test_decode_prompt_golden(tokenizer):
    ids, mask, labels = build_prompts(tokenizer, "speechllm", None, 1, batch_size=3)
    assert labels is None
    assert ids.tolist() == [GOLDEN_DECODE_PROMPT] * 3
    assert mask.dtype == torch.bool and bool(mask.all())


def test_train_prompt_and_labels_golden(tokenizer, fixture_json):
    ex = fixture_json["train_preprocess_example"]
    ids, mask, labels = build_prompts(tokenizer, "speechllm", ex["texts"], 1)
    assert ids.tolist() == ex["input_ids"]
    assert mask.long().tolist() == ex["attention_mask"]
    assert labels.tolist() == ex["labels"]


def _render_speechllm_template(content: str, answer, training: bool) -> str:
    # SpeechLLM's Jinja template written out by hand (train.py / decode.py)
    msgs = [("user", content), ("assistant", answer)]
    out = ""
    for i, (role, text) in enumerate(msgs):
        out += "<|im_start|>" + role + "\n" + text
        if i == len(msgs) - 1:
            out += "<|im_end|>" if training else ""
        else:
            out += "<|im_end|>\n"
    return out


@pytest.mark.parametrize(
    "text",
    ["the old man came back", "a", "don't stop 42 times", "über naïve café", "她说 hello", "two  spaces"],
)
def test_token_level_build_equals_rendered_template(tokenizer, text):
    group = "<start_speech><speech><end_speech>"
    for n in (1, 3):
        rendered = _render_speechllm_template(group * n, text, training=True)
        want = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        ids, _, labels = build_prompts(tokenizer, "speechllm", [text], n)
        assert ids[0].tolist() == want
        # labels: exactly the transcript tokens and the final <|im_end|>
        n_text = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        lab = labels[0].tolist()
        assert lab[-(n_text + 1):] == want[-(n_text + 1):]
        assert all(v == IGNORE_INDEX for v in lab[: -(n_text + 1)])
        assert lab[-1] == 514
    rendered = _render_speechllm_template(group * 2, "", training=False)
    ids, _, _ = build_prompts(tokenizer, "speechllm", None, 2)
    assert ids[0].tolist() == tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_mixed_group_counts_left_padded(tokenizer):
    ids, mask, labels = build_prompts(tokenizer, "speechllm", ["a river", "a river"], [4, 2])
    assert ids.shape[1] == 11 + 9 + 3  # decode prompt + 3 extra groups of 3 + "a river" (2) + <|im_end|>
    row0, row1 = ids[0].tolist(), ids[1].tolist()
    assert row0.count(515) == 4 and row1.count(515) == 2
    assert row1[:6] == [512] * 6 and not mask[1, :6].any() and mask[1, 6:].all()
    assert labels[0, -3:].tolist() == labels[1, -3:].tolist() == [64, 396, 514]
    assert (labels[1, :-3] == IGNORE_INDEX).all()


def test_special_tokens_in_transcript_rejected(tokenizer):
    with pytest.raises(ValueError, match="special tokens"):
        build_prompts(tokenizer, "speechllm", ["hello <|im_end|> world"], 1)
    with pytest.raises(ValueError, match="special tokens"):
        build_prompts(tokenizer, "speechllm", ["x <speech>"], 1)


def test_formats_registry_and_errors(tokenizer):
    with pytest.raises(ValueError, match="unknown --prompt-format"):
        get_prompt_format("nope")
    fmt = PromptFormat(name="test-instruct", speech_group="<speech>", user_content="{speech}transcribe")
    register_prompt_format(fmt)
    ids, _, _ = build_prompts(tokenizer, "test-instruct", None, 1)
    want = tokenizer("<|im_start|>user\n<speech>transcribe<|im_end|>\n<|im_start|>assistant\n",
                     add_special_tokens=False)["input_ids"]
    assert ids[0].tolist() == want
    with pytest.raises(ValueError, match="registered twice"):
        register_prompt_format(PromptFormat(name="test-instruct"))
    bad = PromptFormat(name="test-bad-pad", pad_token="<pad_missing>")
    with pytest.raises(ValueError, match="no pad token"):
        build_prompts(tokenizer, bad, None, 1)


def test_mose_group_dropping_statistics():
    rng = random.Random(0)
    draws = sample_speech_groups(4, 20000, rng)
    assert min(draws) >= 1 and max(draws) == 4
    # kept ~ Binomial(4, 3/4) with 0 mapped to 4: mean = 3 + 4 * (1/4)^4 = 3.015625
    assert abs(sum(draws) / len(draws) - 3.015625) < 0.03
    assert abs(draws.count(1) / len(draws) - 4 * 0.75 * 0.25 ** 3) < 0.01
    assert sample_speech_groups(1, 5, rng) == [1] * 5
