"""The projector warm-up (llmasr.training.warmup) on the shared training step reproduces the
warm-up's own loop it replaced, and writes its metrics records."""
from __future__ import annotations

import hashlib
import math

import pytest
import torch

from llmasr.aux_ctc import AuxCtc, AuxCtcConfig
from llmasr.training.logs import METRICS_FILE, MetricsFile, read_metrics
from llmasr.training.warmup import projector_warmup

from tests.test_training import build_model, env, first_batches, train  # noqa: F401  (env: session fixture)

# Recorded from the warm-up loop of commit 58830ad (llmasr.aux_ctc.projector_warmup, its own
# optimizer, clipping and cosine line) on the setup of _run below: the losses of each log interval
# (float.hex) and the sha256 of the projector's state after the warm-up. Bit-identical on the CPU
# that recorded them (an Intel Xeon with AVX-512); other CPUs' kernels round differently (an AMD
# EPYC without AVX-512: ~1e-6 relative), so the losses are compared to 1e-5 - a changed schedule,
# clipping or optimizer moves them by 1e-3 and more (cosine vs constant differ by 1 % at step 4).
EXPECTED = {
    "cosine": ("0x1.a087820000000p+3",
               [(2, "0x1.e1b55a0000000p+3"), (4, "0x1.bbbc410000000p+3"), (6, "0x1.a3281e0000000p+3"),
                (7, "0x1.a087820000000p+3")],
               "d67d41dd48ab1aea162b274a628d2983bd53f15147ff24986d90013e0ee68143"),
    "constant": ("0x1.677c440000000p+3",
                 [(2, "0x1.e1b55a0000000p+3"), (4, "0x1.b9c89f0000000p+3"), (6, "0x1.89ba3e0000000p+3"),
                  (7, "0x1.677c440000000p+3")],
                 "b3d634783471b4260573a40d09f741b6e1093816733003ab0f661fdb368d5eb9"),
}


def _run(env, schedule, metrics=None):
    model = build_model(env, ds_rate=1, seed=5)
    batches = first_batches(env, 3)
    aux = AuxCtc(AuxCtcConfig(mode="distance"), model.tokenizer, model.llm.get_input_embeddings(), model.prompt_format)
    logs = []
    out = projector_warmup(model, batches, aux, 7, lr=3e-3, lr_schedule=schedule, log_interval=2,
                           on_log=lambda s, l, e: logs.append((s, l)), metrics=metrics)
    h = hashlib.sha256()
    for k, v in sorted(model.encoder_projector.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return out, logs, h.hexdigest()


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_warmup_on_the_training_step_reproduces_its_old_loop(env, tmp_path, schedule):  # noqa: F811
    metrics = MetricsFile(tmp_path / METRICS_FILE, rank=0)
    out, logs, digest = _run(env, schedule, metrics)
    final, intervals, weights = EXPECTED[schedule]
    assert out["steps"] == 7
    if out["loss"].hex() == final:  # (the recording CPU: the projector is bit-identical too)
        assert digest == weights
    assert out["loss"] == pytest.approx(float.fromhex(final), rel=1e-5)
    assert [s for s, _ in logs] == [s for s, _ in intervals]
    assert [l for _, l in logs] == pytest.approx([float.fromhex(l) for _, l in intervals], rel=1e-5)
    recs = read_metrics(tmp_path, "warmup")
    assert [(r["epoch"], r["batch"]) for r in recs] == [(0, 2), (0, 4), (0, 6), (0, 7)]
    assert [r["loss"] for r in recs] == [r["aux_ctc"] for r in recs] == [l for _, l in logs]
    if schedule == "cosine":  # the lr each logged step ran at: 3e-3 * cos^2(pi * done / 2 / total)
        assert [r["lr"] for r in recs] == pytest.approx([1.5e-3 * (1 + math.cos(math.pi * s / 7)) for s in (1, 3, 5, 6)])
    else:
        assert all(r["lr"] == 3e-3 for r in recs)


def test_recipe_warmup_writes_warmup_records_before_the_training_ones(env, tmp_path):  # noqa: F811
    exp = tmp_path / "exp"
    train(env, exp, optimizer="adamw", base_lr="0.01", encoder_projector_ds_rate=1, projector_warmup_steps=6,
          projector_warmup_lr="0.003", log_interval=3)
    recs = read_metrics(exp)
    stages = [r["stage"] for r in recs]
    assert stages[:2] == ["warmup", "warmup"] and "warmup" not in stages[2:] and "train" in stages
    warm = read_metrics(exp, "warmup")
    assert [r["batch"] for r in warm] == [3, 6] and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in warm)
    log = "".join(p.read_text() for p in (exp / "log").glob("log-train-*"))
    assert f"projector warm-up done: 6 steps, aux CTC loss {warm[-1]['loss']:.3f}" in log
    assert warm[-1]["time_s"] <= read_metrics(exp, "train")[0]["time_s"]
