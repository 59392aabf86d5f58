"""Distributed training on CPU (gloo): DDP with --world-size 2, DeepSpeed ZeRO-2 under torchrun.

Both launch real processes (``src/train.py``), train one short epoch of the tiny models on espeak
speech, and check that the ranks stay identical and that the checkpoint decodes.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import require_module
from tests.test_training import base_argv, build_model, first_batches, load, training_env

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    torch.set_num_threads(1)
    return training_env(tmp_path_factory.getbasetemp())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, timeout=800):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-6000:]}"
    return p


def rank_logs(exp: Path) -> dict:
    logs = {}
    for f in (exp / "log").glob("log-train-*"):
        logs[f.name.rsplit("-", 1)[1]] = f.read_text()
    return logs


@pytest.mark.timeout(900)  # several processes (torchrun/DeepSpeed); a hang still fails, a loaded machine does not
def test_ddp_two_processes_keep_replicas_identical(env, tmp_path):
    exp = tmp_path / "ddp"
    argv = base_argv(env, exp, world_size=2, master_port=free_port(), optimizer="adamw", base_lr="0.01")
    run([sys.executable, "src/train.py", *argv])
    logs = rank_logs(exp)
    assert sorted(logs) == ["0", "1"], sorted(logs)
    for rank, text in logs.items():
        assert "trainable parameters identical on all 2 ranks" in text, rank
    ck = load(exp / "epoch-1.pt")
    # The sampler splits the 24 cuts between the ranks: at most 12 batches per rank.
    assert 2 <= ck["batch_idx_train"] <= 12, ck["batch_idx_train"]
    assert ck["model"]["llm.base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"].abs().max() > 0


@pytest.mark.timeout(900)  # several processes (torchrun/DeepSpeed); a hang still fails, a loaded machine does not
def test_deepspeed_zero2_trains_and_its_checkpoint_decodes(env, tmp_path):
    require_module("deepspeed")  # requirements.txt (local/setup.sh installs it with --no-build-isolation)
    from llmasr.checkpoint import load_checkpoint, load_model_state

    exp = tmp_path / "ds"
    argv = base_argv(env, exp, optimizer="adamw", base_lr="0.01")
    # (--world-size 1 in argv is ignored under torchrun: RANK/WORLD_SIZE come from the launcher)
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "src/train.py", "--deepspeed", "--deepspeed-config", "local/conf/ds_zero2.json", *argv])
    assert (exp / "zero-epoch-1").is_dir()
    logs = rank_logs(exp)
    assert sorted(logs) == ["0", "1"]
    assert all("trainable parameters identical on all 2 ranks" in t for t in logs.values())

    ck = load_checkpoint(exp / "epoch-1.pt")
    assert ck["model"]["encoder_projector.proj.1.weight"].dtype == torch.float32
    model = build_model(env)
    lora_b = "llm.base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"
    assert model.state_dict()[lora_b].abs().max() == 0  # peft starts LoRA B at zero
    load_model_state(model, ck["model"], source="epoch-1.pt")
    assert model.state_dict()[lora_b].abs().max() > 0  # trained weights arrived
    batch = first_batches(env)[0]
    model.eval()
    hyps = model.decode(batch["features"], batch["feature_lens"], max_new_tokens=5)
    assert len(hyps) == len(batch["cut_ids"]) and all(isinstance(h, str) for h in hyps)
