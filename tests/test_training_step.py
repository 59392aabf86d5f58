"""The training step under fp16 with a GradScaler (#29 finding 6) and grad checkpointing with a
frozen LLM (#29 finding 3), on CPU with the tiny models of tests/test_training.py."""
from __future__ import annotations

import math

import pytest
import torch

from llmasr.training.loop import NonFiniteLossError, train_one_epoch, train_step
from llmasr.training.optim import build_optimizer
from llmasr.training.schedulers import FixedLRScheduler

from tests.test_training import build_model, env, first_batches, make_params  # noqa: F401  (env: session fixture)


def _plant_inf_loss(model, when):
    """Make the model's loss inf whenever ``when()`` is true (an overflowing fp16 forward)."""
    return model.register_forward_hook(lambda m, i, out: (out[0] * float("inf"), out[1]) if when() else out)


def test_fp16_inf_loss_lets_the_grad_scaler_skip_the_step(env, tmp_path):  # noqa: F811
    model = build_model(env)
    model.train()
    opt = build_optimizer("adamw", model, 0.01)
    sched = FixedLRScheduler(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    params = make_params(tmp_path, use_autocast=True, dtype=torch.float16, optimizer_type="adamw", grad_clip=5.0)
    batch = first_batches(env)[0]
    trainable = [p for p in model.parameters() if p.requires_grad]
    inject = {"on": True}
    _plant_inf_loss(model, lambda: inject["on"])

    before = [p.detach().clone() for p in trainable]
    params.batch_idx_train += 1
    info = train_step(params, model, batch, opt, sched, scaler, torch.device("cpu"))  # no NonFiniteLossError
    assert info["skipped"] == 1.0 and "loss" not in info and "tokens" not in info
    assert all(torch.equal(b, p) for b, p in zip(before, trainable)), "a skipped step changed the weights"
    assert scaler.get_scale() == 512.0
    assert not opt.state or all(not s for s in opt.state.values())  # AdamW took no step
    assert not list(tmp_path.glob("batch-*.pt"))

    # In an epoch the skipped batch adds nothing to the loss sums: the epoch loss stays finite.
    calls = {"n": 0}

    def second_batch_overflows():
        calls["n"] += 1
        return calls["n"] == 2

    inject["on"] = False
    model2 = build_model(env)
    _plant_inf_loss(model2, second_batch_overflows)
    opt2 = build_optimizer("adamw", model2, 0.01)
    scaler2 = torch.amp.GradScaler("cpu", init_scale=1024.0)
    params2 = make_params(tmp_path, use_autocast=True, dtype=torch.float16, optimizer_type="adamw", grad_clip=5.0,
                          cur_batch_idx=0, epoch_loss_sum=0.0, epoch_tokens=0.0, reset_interval=200, log_interval=1,
                          valid_interval=0, save_every_n=0, best_train_loss=math.inf, best_train_epoch=-1,
                          start_epoch=1, start_batch=0)
    train_one_epoch(params2, model2, opt2, FixedLRScheduler(opt2), [batch] * 3, None, scaler2, torch.device("cpu"))
    assert params2.batch_idx_train == 3 and scaler2.get_scale() == 512.0
    assert math.isfinite(params2.train_loss) and params2.epoch_tokens == 2 * info_tokens(model, batch, params)
    from llmasr.training.logs import read_metrics

    recs = read_metrics(tmp_path, "train")  # the skipped batch is recorded, marked, with no loss
    assert [r["batch"] for r in recs] == [1, 2, 3] and [r.get("skipped", 0.0) for r in recs] == [0.0, 1.0, 0.0]
    assert math.isnan(recs[1]["loss"]) and math.isfinite(recs[0]["loss"]) and math.isfinite(recs[2]["loss"])
    assert [r["grad_scale"] for r in recs] == [1024.0, 512.0, 512.0]


def info_tokens(model, batch, params):
    from llmasr.training.loop import compute_loss

    with torch.no_grad():
        return compute_loss(model, batch, torch.device("cpu"), params, is_training=False)[1]["tokens"]


def test_inf_loss_without_a_grad_scaler_still_raises(env, tmp_path):  # noqa: F811
    model = build_model(env)
    model.train()
    opt = build_optimizer("adamw", model, 0.01)
    _plant_inf_loss(model, lambda: True)
    params = make_params(tmp_path, optimizer_type="adamw")
    params.batch_idx_train = 1
    with pytest.raises(NonFiniteLossError, match="non-finite loss inf"):
        train_step(params, model, first_batches(env)[0], opt, FixedLRScheduler(opt),
                   torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"))


def _model(env, *flags):
    import argparse

    from llmasr.recipes.model_args import add_model_arguments, build_model_from_args

    p = argparse.ArgumentParser()
    add_model_arguments(p)
    args = p.parse_args(["--llm-path", str(env["llm"]), "--attn-implementation", "eager", "--speech-encoder-type",
                         "tiny", "--speech-encoder-path", str(env["zip_a"]), *flags])
    torch.manual_seed(0)
    return build_model_from_args(args, dtype=torch.float32)


@pytest.mark.parametrize("flags", [("--unfreeze-llm", "false"), ("--lora-dropout", "0")], ids=["frozen", "lora"])
def test_grad_checkpointing_recomputes_the_llm_layers_and_keeps_loss_and_grads(env, flags):  # noqa: F811
    """--grad-checkpointing with a frozen LLM (#29 finding 3): the LLM is in eval mode (no dropout), and
    transformers checkpoints only in training mode, so the option did nothing. Now the layers'
    forward runs again in the backward (checkpointed), with the same loss and gradients."""
    batch = first_batches(env)[0]
    results = []
    for checkpointing in (False, True):
        model = _model(env, *flags)
        if checkpointing:
            model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        layers = [m for m in model.llm.modules() if type(m).__name__.endswith("DecoderLayer")]
        assert layers
        frozen = flags[0] == "--unfreeze-llm"
        assert model.llm_trainable is not frozen
        for layer in layers:
            # Attention dropout would make the runs differ: it must stay off for the frozen LLM.
            layer.self_attn.attention_dropout = 0.5 if frozen else 0.0
            assert layer.self_attn.training is not frozen
        calls = []
        for layer in layers:
            layer.input_layernorm.register_forward_hook(lambda m, i, o: calls.append(1))
        loss, _ = model(batch["features"], batch["feature_lens"], batch["texts"])
        forward_calls = len(calls)
        loss.backward()
        assert forward_calls == len(layers)
        # Checkpointed: every layer runs a second time in the backward.
        assert len(calls) == (2 if checkpointing else 1) * len(layers), (checkpointing, len(calls))
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert grads and all(g is not None for g in grads.values())
        results.append((loss.detach(), grads))
    (l0, g0), (l1, g1) = results
    assert abs(l0.item() - l1.item()) <= 1e-6
    assert sorted(g0) == sorted(g1)
    for n in g0:
        assert (g0[n] - g1[n]).abs().max().item() <= 1e-6, n
