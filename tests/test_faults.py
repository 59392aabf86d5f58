"""Faults a cluster injects (issue #28): a stop signal mid-epoch, non-finite batches, a failing or
hung rank, a full disk while writing a checkpoint."""
from __future__ import annotations

import errno
import multiprocessing
import os
import signal
import time

import pytest
import torch

from tests.test_training import assert_same_optimizer_state, assert_same_tensors, env, load, train  # noqa: F401
from tests.test_training_dist import free_port

# 24 cuts, batches of at most 8 s: 17 batches per epoch; default --num-workers (2).
COMMON = dict(optimizer="adamw", base_lr="0.01", num_epochs=1, save_every_n=0, keep_last_k=20, num_workers=2,
              max_duration=8)


# --------------------------------------------------------------------------- full disk


def test_enospc_in_atomic_write_keeps_the_old_file_and_names_file_and_space(tmp_path):
    from llmasr.config import run_cli
    from llmasr.io import DiskFullError, atomic_torch_save, atomic_write

    old = tmp_path / "checkpoint-3.pt"
    atomic_torch_save({"w": torch.arange(10)}, old)
    before = old.read_bytes()

    def full_disk(tmp):
        tmp.write_bytes(b"x" * 1000)  # part of the file made it to disk
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError) as exc:
        atomic_write(old, full_disk)
    msg = str(exc.value)
    assert "no space left writing " + str(old) in msg and "1000 bytes written" in msg and "bytes free" in msg, msg
    assert "\n" not in msg
    assert old.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3.pt"]  # no temporary left

    def main(argv):
        atomic_write(tmp_path / "checkpoint-6.pt", full_disk)

    with pytest.raises(SystemExit) as exit_:
        run_cli(main, [])
    assert exit_.value.code == 1


def test_enospc_in_a_training_checkpoint_keeps_older_checkpoints(env, tmp_path, monkeypatch, capsys):
    """checkpoint-3.pt and -6.pt written, the disk fills at -9: both stay byte-identical, none is
    pruned (--keep-last-k 1 prunes only after a successful write), one-line error."""
    from llmasr.config import run_cli
    from llmasr.recipes.train import main

    exp = tmp_path / "exp"
    real_save = torch.save
    saved = {}

    def save(obj, f, *a, **k):
        name = os.path.basename(str(f))
        if name == "checkpoint-9.pt":
            saved["6"] = (exp / "checkpoint-6.pt").read_bytes()
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    from tests.test_training import base_argv

    argv = base_argv(env, exp, **{**COMMON, "save_every_n": 3, "keep_last_k": 1, "num_workers": 0})
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda a: main(argv=a), argv)
    assert exit_.value.code == 1
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ": error: " in ln]
    assert len(err) == 1 and "no space left writing " + str(exp / "checkpoint-9.pt") in err[0], err
    # keep-last-k 1: -3 was pruned after -6 was written; -6 is intact and loads.
    assert not (exp / "checkpoint-3.pt").exists()
    assert (exp / "checkpoint-6.pt").read_bytes() == saved["6"]
    assert load(exp / "checkpoint-6.pt")["batch_idx_train"] == 6
    assert not list(exp.glob(".checkpoint-9*"))


# --------------------------------------------------------------------------- auto-resume discovery


def test_find_resume_point_takes_the_latest_in_training(tmp_path):
    from llmasr.training.faults import find_resume_point

    assert find_resume_point(tmp_path / "missing") == (1, 0, None)
    torch.save({"batch_idx_train": 17}, tmp_path / "epoch-1.pt")
    torch.save({"batch_idx_train": 12}, tmp_path / "checkpoint-12.pt")
    assert find_resume_point(tmp_path) == (2, 0, tmp_path / "epoch-1.pt")
    torch.save({"batch_idx_train": 17}, tmp_path / "checkpoint-17.pt")  # the epoch's last batch: epoch wins
    assert find_resume_point(tmp_path) == (2, 0, tmp_path / "epoch-1.pt")
    torch.save({"batch_idx_train": 21}, tmp_path / "checkpoint-21.pt")
    assert find_resume_point(tmp_path) == (1, 21, tmp_path / "checkpoint-21.pt")
    (tmp_path / "checkpoint-24.pt").write_bytes(b"torn")  # unreadable: the next older one
    assert find_resume_point(tmp_path) == (1, 21, tmp_path / "checkpoint-21.pt")


# --------------------------------------------------------------------------- preemption


@pytest.mark.timeout(900)
def test_sigterm_mid_epoch_saves_and_auto_resume_is_exact(env, tmp_path, monkeypatch):
    from llmasr.training import faults, loop

    a = tmp_path / "uninterrupted"
    train(env, a, **COMMON)
    ref = load(a / "epoch-1.pt")
    assert ref["batch_idx_train"] == 17

    real_step = loop.train_step
    sent = {}

    def step_then_signal(params, *args, **kwargs):
        info = real_step(params, *args, **kwargs)
        if params.batch_idx_train == 5:  # the signal arrives during batch 5
            sent["t"] = time.time()
            os.kill(os.getpid(), signal.SIGTERM)
        return info

    b = tmp_path / "preempted"
    monkeypatch.setattr(loop, "train_step", step_then_signal)
    with pytest.raises(SystemExit) as exit_:
        train(env, b, **COMMON, auto_resume="true")
    monkeypatch.undo()
    assert exit_.value.code == faults.PREEMPTED_EXIT_STATUS
    assert time.time() - sent["t"] < 60
    assert sorted(p.name for p in b.glob("*.pt")) == ["checkpoint-5.pt"]
    assert load(b / "checkpoint-5.pt")["batch_idx_train"] == 5
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone after the run
    log = "".join(f.read_text() for f in sorted((b / "log").glob("log-train-*")))
    assert "stop signal 15: stopped after global batch 5 (epoch 1, batch 5), saved " + str(b / "checkpoint-5.pt") in log

    train(env, b, **COMMON, auto_resume="true")  # the same command, requeued
    got = load(b / "epoch-1.pt")
    assert got["batch_idx_train"] == ref["batch_idx_train"]
    assert_same_tensors(ref["model"], got["model"], "auto-resumed after SIGTERM")
    assert_same_optimizer_state(ref["optimizer"], got["optimizer"])
    log = "".join(f.read_text() for f in sorted((b / "log").glob("log-train-*")))
    assert f"--auto-resume: resuming from {b / 'checkpoint-5.pt'} (--start-batch 5)" in log


# --------------------------------------------------------------------------- bad batches


@pytest.mark.timeout(600)
def test_non_finite_batches_are_skipped_counted_and_n_in_a_row_stop(env, tmp_path, monkeypatch):
    from llmasr.config import UserError
    from llmasr.model import SpeechLLM

    real_forward = SpeechLLM.forward
    calls = {"n": 0}
    poisoned = {2, 5, 6, 7}  # batch 2 alone (skipped), 5-7 three in a row (--max-bad-batches 3)

    def forward(self, *args, **kwargs):
        loss, stats = real_forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] in poisoned:
                loss = loss * float("nan")
        return loss, stats

    monkeypatch.setattr(SpeechLLM, "forward", forward)
    exp = tmp_path / "exp"
    with pytest.raises(UserError) as exc:
        train(env, exp, **{**COMMON, "num_workers": 0}, max_bad_batches=3, log_interval=1)
    msg = str(exc.value)
    assert msg.startswith("3 batches in a row with a non-finite loss or gradients (--max-bad-batches 3), "
                          "the last at global batch 7"), msg
    out = exp / "bad-batch-7"
    assert f"saved in {out}/" in msg and "\n" not in msg
    batch = load(out / "batch-rank0.pt")
    assert batch["cut_ids"] and batch["features"].dim() == 3
    assert all(torch.isfinite(v).all() for v in load(out / "model.pt")["model"].values())
    (log,) = [f.read_text() for f in (exp / "log").glob("log-train-*")]
    assert "skipped non-finite batch at global batch 2 (1 in a row, 1 in all)" in log
    assert "skipped non-finite batch at global batch 6 (2 in a row, 3 in all)" in log


def test_a_skipped_step_leaves_weights_and_optimizer_untouched():
    from llmasr.training.loop import step_on_batch

    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    x = torch.randn(4, 3)
    _, info = step_on_batch(lin, lambda: ((lin(x) * float("inf")).sum(), {}), opt, skip_non_finite=True)
    assert info["skipped"] == 1.0 and opt.state == {} and all(p.grad is None for p in lin.parameters())
    for k, v in lin.state_dict().items():
        assert torch.equal(v, before[k]), k
    _, info = step_on_batch(lin, lambda: (lin(x).sum(), {}), opt, skip_non_finite=True)
    assert "skipped" not in info and not torch.equal(lin.weight, before["weight"])


# --------------------------------------------------------------------------- a failing or hung rank


class _Args:
    world_size = 2


def _rank_fails(rank, world_size, args):
    from llmasr.config import UserError
    from llmasr.training.dist import setup_dist

    setup_dist(rank, world_size, master_port=args.port, backend_choice="gloo", timeout_min=args.timeout_min)
    if rank == 1:
        raise UserError("cannot read features of cut c-7 (feats.lca)")
    torch.distributed.barrier()  # rank 0 waits for rank 1, which is gone


def _rank_hangs(rank, world_size, args):
    from llmasr.training.dist import setup_dist

    setup_dist(rank, world_size, master_port=args.port, backend_choice="gloo", timeout_min=args.timeout_min)
    if rank == 1:
        time.sleep(600)  # a hung rank: never joins the collective
    torch.distributed.barrier()


@pytest.mark.timeout(120)
def test_a_rank_raising_stops_the_other_with_one_line_naming_it():
    from llmasr.config import UserError
    from llmasr.training.dist import launch

    args = _Args()
    args.port, args.timeout_min = free_port(), 10.0
    t0 = time.time()
    with pytest.raises(UserError) as exc:
        launch(_rank_fails, args)
    assert str(exc.value) == "rank 1 of 2 failed: cannot read features of cut c-7 (feats.lca)"
    assert time.time() - t0 < 60
    assert multiprocessing.active_children() == []  # no zombie ranks


@pytest.mark.timeout(120)
def test_a_hung_rank_ends_the_run_after_the_collective_timeout():
    from llmasr.training.dist import RankFailed, launch

    args = _Args()
    args.port, args.timeout_min = free_port(), 0.1  # 6 s
    t0 = time.time()
    with pytest.raises(RankFailed) as exc:
        launch(_rank_hangs, args)
    took = time.time() - t0
    assert str(exc.value).startswith("rank 0 of 2 failed"), str(exc.value)[:300]
    assert 6 <= took < 60, took
    assert multiprocessing.active_children() == []


def test_dist_backend_choice():
    from llmasr.training.dist import backend

    assert backend("gloo") == "gloo" and backend("nccl") == "nccl"
    assert backend("auto") == ("nccl" if torch.cuda.is_available() else "gloo")
    with pytest.raises(ValueError, match="--dist-backend"):
        backend("mpi")


@pytest.mark.timeout(900)
def test_sigterm_to_a_two_rank_run_stops_both_at_one_batch_and_auto_resume_is_exact(env, tmp_path):
    """The signal reaches the spawning process only (as Kubernetes sends it); both ranks stop after
    the same batch, one checkpoint holds both ranks' state, and the requeued command continues."""
    import re
    import subprocess
    import sys

    from tests.test_training import base_argv
    from tests.test_training_dist import REPO, rank_logs, run
    from llmasr.training.faults import PREEMPTED_EXIT_STATUS

    opts = {**COMMON, "num_epochs": 3, "log_interval": 1}
    a = tmp_path / "uninterrupted"
    run([sys.executable, "src/train.py", *base_argv(env, a, world_size=2, master_port=free_port(), **opts)])
    ref = load(a / "epoch-3.pt")
    assert ref["batch_idx_train"] == 27  # 9 batches per rank and epoch

    b = tmp_path / "preempted"
    cmd = [sys.executable, "src/train.py",
           *base_argv(env, b, world_size=2, master_port=free_port(), auto_resume="true", **opts)]
    envs = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        envs.pop(k, None)
    p = subprocess.Popen(cmd, cwd=REPO, env=envs, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:  # mid-epoch 1, once rank 0 has logged batch 3
        if any(re.search(r"Epoch 1, batch 3 \(global", t) for t in rank_logs(b).values()) if (b / "log").is_dir() else False:
            break
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before the signal could be sent"
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert time.time() - t0 < 60
    assert p.returncode == PREEMPTED_EXIT_STATUS, out[-4000:]
    (ckpt,) = b.glob("checkpoint-*.pt")
    stopped = load(ckpt)
    assert ckpt.name == f"checkpoint-{stopped['batch_idx_train']}.pt" and 3 <= stopped["batch_idx_train"] < 27
    assert [s["sampler"]["batches"] for s in stopped["rank_states"]] == [stopped["cur_batch_idx"]] * 2
    for rank, text in rank_logs(b).items():  # both ranks stopped after the same batch
        assert f"stopped after global batch {stopped['batch_idx_train']} " in text, rank

    run(cmd)  # requeued as is
    got = load(b / "epoch-3.pt")
    assert got["batch_idx_train"] == ref["batch_idx_train"]
    assert_same_tensors(ref["model"], got["model"], "2 ranks auto-resumed after SIGTERM")
    assert_same_optimizer_state(ref["optimizer"], got["optimizer"])
