"""Resuming is exact with DataLoader workers (--num-workers 2): a run killed after checkpoint-N.pt
and resumed with --start-batch N, or resumed at an epoch boundary with --start-epoch, ends with the
weights, optimizer state and batch count of an uninterrupted run (single process and DDP), SpecAugment
on. Also: the per-rank throughput in the training log and the bucketing sampler flags.

The workers prefetch ``num_workers * prefetch_factor`` = 4 batches, so a checkpoint of the sampler's
own position used to skip 4 batches per rank on resume.
"""
from __future__ import annotations

import re
import shutil
import sys
import time

import pytest
import torch

from tests.test_datamodule import make_dm
from tests.test_training import assert_same_optimizer_state, assert_same_tensors, base_argv, env, load, train  # noqa: F401
from tests.test_training_dist import free_port, rank_logs, run

# 24 cuts of 2.6-4.7 s, batches of at most 8 s: 17 batches per epoch (9 per rank with 2 ranks).
COMMON = dict(optimizer="adamw", base_lr="0.01", num_epochs=2, save_every_n=3, keep_last_k=20, num_workers=2,
              max_duration=8, enable_spec_aug="true")
SPEED = re.compile(r"([\d.]+) samples/s, ([\d.]+) frames/s, padding ([\d.]+), ([\d.]+)s/batch")


class Killed(Exception):
    pass


def data_module(env, *argv):
    return make_dm("--manifest-dir", str(env["manifests"]), "--max-duration", "8", "--num-buckets", "2",
                   "--drop-last", "false", "--min-duration", "0.1", "--enable-spec-aug", "true", "--seed", "11", *argv)


def epoch_batches(loader, n=None):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def assert_same_run(ref: dict, got: dict, what: str):
    assert got["batch_idx_train"] == ref["batch_idx_train"], what
    assert_same_tensors(ref["model"], got["model"], what)
    assert_same_optimizer_state(ref["optimizer"], got["optimizer"])
    assert got["train_loss"] == ref["train_loss"], what


def speed_lines(log: str):
    return [SPEED.search(line) for line in log.splitlines() if re.search(r"Epoch \d+, batch \d+ \(global", line)]


def test_loader_state_is_the_trained_position_with_workers(env):
    from llmasr.config import UserError

    # Reference: the epoch made in this process (no workers, 1 torch thread as in a worker).
    dm0 = data_module(env, "--num-workers", "0")
    ref = epoch_batches(dm0.train_dataloader(dm0.train_cuts("train"), world_size=1, rank=0))
    assert len(ref) == 17

    dm = data_module(env, "--num-workers", "2")
    loader = dm.train_dataloader(dm.train_cuts("train"), world_size=1, rank=0)
    head = epoch_batches(loader, 5)
    state = loader.sampler.state_dict()
    # The workers have drawn 4 more batches from the sampler; the state counts the 5 handed out.
    assert state["batches"] == 5 and state["last_cut_ids"] == sorted(head[-1]["cut_ids"])
    resumed = epoch_batches(dm.train_dataloader(dm.train_cuts("train"), sampler_state_dict=state, world_size=1, rank=0))
    # Same batches, same SpecAugment masks/warps whichever process made them, resumed or not.
    for got, want in zip(head + resumed, ref, strict=True):
        assert got["cut_ids"] == want["cut_ids"]
        assert torch.equal(got["features"], want["features"]), got["cut_ids"]
    # ... and SpecAugment did change them.
    plain = data_module(env, "--enable-spec-aug", "false")
    first = epoch_batches(plain.train_dataloader(plain.train_cuts("train"), world_size=1, rank=0), 1)[0]
    assert not torch.equal(first["features"], ref[0]["features"])

    # Other sampler options or another number of ranks cannot continue this epoch.
    other = data_module(env, "--num-workers", "0", "--max-duration", "12")
    with pytest.raises(UserError, match="batch 5 of epoch 0 now holds cuts"):
        other.train_dataloader(other.train_cuts("train"), sampler_state_dict=state, world_size=1, rank=0)
    with pytest.raises(UserError, match="state is of 1 ranks, this run has 2"):
        dm0.train_dataloader(dm0.train_cuts("train"), sampler_state_dict=state, world_size=2, rank=0)


@pytest.mark.timeout(900)
def test_single_process_kill_and_resume_with_workers_is_exact(env, tmp_path, monkeypatch):
    from llmasr.recipes.train import Checkpointer

    t0 = time.time()
    a = tmp_path / "uninterrupted"
    train(env, a, **COMMON)
    ref = load(a / "epoch-2.pt")
    assert ref["batch_idx_train"] == 34

    # Killed right after checkpoint-6.pt (batch 6 of 17 of epoch 1, the workers 4 batches ahead).
    save_batch = Checkpointer.save_batch

    def save_then_die(self):
        save_batch(self)
        if self.params.batch_idx_train == 6:
            raise Killed

    b = tmp_path / "killed"
    monkeypatch.setattr(Checkpointer, "save_batch", save_then_die)
    with pytest.raises(Killed):
        train(env, b, **COMMON)
    monkeypatch.undo()
    assert not (b / "epoch-1.pt").exists()
    train(env, b, start_batch=6, **COMMON)
    assert_same_run(ref, load(b / "epoch-2.pt"), "--start-batch 6 after a kill")

    # Epoch boundary: the resumed run creates its loader's workers for epoch 2, the uninterrupted
    # one reused those of epoch 1.
    c = tmp_path / "epoch_boundary"
    c.mkdir()
    shutil.copy(a / "epoch-1.pt", c / "epoch-1.pt")
    train(env, c, start_epoch=2, **COMMON)
    assert_same_run(ref, load(c / "epoch-2.pt"), "--start-epoch 2")

    # Throughput at every log line: 1-2 cuts of 2.6-4.7 s per batch (100 frames/s of audio).
    (log,) = [f.read_text() for f in (a / "log").glob("log-train-*")]
    speeds = speed_lines(log)
    assert len(speeds) == 8 and all(speeds), log  # batches 1, 5, 10, 15 of both epochs
    for m in speeds:
        samples, frames, padding = float(m[1]), float(m[2]), float(m[3])
        assert 1.0 <= frames / samples / 100 <= 5.0 and 0.0 <= padding < 0.5, m[0]
    print(f"single-process resume test: {time.time() - t0:.0f} s", file=sys.stderr)


@pytest.mark.timeout(900)
def test_ddp_kill_and_resume_with_workers_is_exact(env, tmp_path):
    from llmasr.config import UserError

    t0 = time.time()
    a = tmp_path / "uninterrupted"
    run([sys.executable, "src/train.py", *base_argv(env, a, world_size=2, master_port=free_port(), **COMMON)])
    ref = load(a / "epoch-2.pt")
    assert ref["batch_idx_train"] == 18  # 9 batches per rank and epoch
    ranks = load(a / "checkpoint-3.pt")["rank_states"]
    assert [s["sampler"]["batches"] for s in ranks] == [3, 3]
    assert ranks[0]["sampler"]["last_cut_ids"] != ranks[1]["sampler"]["last_cut_ids"]
    for rank, text in rank_logs(a).items():  # each rank logs its own throughput
        speeds = speed_lines(text)
        assert speeds and all(speeds), rank

    # checkpoint-3.pt is all that a run killed after writing it leaves to resume from.
    b = tmp_path / "killed"
    b.mkdir()
    shutil.copy(a / "checkpoint-3.pt", b / "checkpoint-3.pt")
    with pytest.raises(UserError, match="written by 2 processes, this run has 1"):
        train(env, b, start_batch=3, **COMMON)
    run([sys.executable, "src/train.py",
         *base_argv(env, b, world_size=2, master_port=free_port(), start_batch=3, **COMMON)])
    assert_same_run(ref, load(b / "epoch-2.pt"), "DDP --start-batch 3")
    print(f"DDP resume test: {time.time() - t0:.0f} s", file=sys.stderr)


def test_throughput_counts_samples_frames_and_padding(monkeypatch):
    from llmasr.training import logs

    now = [1000.0]  # a fake clock: a loaded machine must not move the numbers
    monkeypatch.setattr(logs.time, "time", lambda: now[0])
    speed = logs.Throughput()
    speed.update(torch.tensor([100, 50]), 100)  # 50 of 200 frames are padding
    speed.update(torch.tensor([80]), 80)
    now[0] += 2.0  # the 2 batches took 2 s
    rates = speed.report()
    assert rates["samples_per_s"] == pytest.approx(1.5, rel=1e-3)
    assert rates["frames_per_s"] == pytest.approx(115, rel=1e-3)
    assert rates["padding"] == pytest.approx(50 / 280)
    assert rates["s_per_batch"] == pytest.approx(1.0, rel=1e-3)
    assert speed.report()["samples_per_s"] == 0  # a new interval


def test_sampler_buffer_and_quadratic_duration_flags(env):
    from llmasr.config import UserError

    dur = {c.id: c.duration for c in data_module(env).train_cuts("train")}
    plain = data_module(env, "--num-workers", "0", "--max-duration", "12", "--enable-spec-aug", "false")
    assert plain.train_dataloader(plain.train_cuts("train"), world_size=1, rank=0).sampler.sampler.buffer_size == 4000
    for strict in ("true", "false"):
        dm = data_module(env, "--num-workers", "0", "--max-duration", "12", "--enable-spec-aug", "false",
                         "--sampler-buffer-size", "50", "--quadratic-duration", "4", "--strict-max-duration", strict)
        loader = dm.train_dataloader(dm.train_cuts("train"), world_size=1, rank=0)
        assert loader.sampler.sampler.buffer_size == 50
        batches = [b["cut_ids"] for b in loader]
        assert sorted(i for b in batches for i in b) == sorted(dur)
        cost = [sum(dur[i] + dur[i] ** 2 / 4 for i in b) for b in batches]
        if strict == "true":  # the budget counts d + d^2/4: 3 s cuts cost 5.25 s, two per batch at most
            assert max(cost) <= 12.0 and max(len(b) for b in batches) == 2, cost
        else:  # lhotse's budget: only the batch without its last cut is within it
            assert all(c - max(dur[i] + dur[i] ** 2 / 4 for i in b) <= 12.0 for c, b in zip(cost, batches))
    with pytest.raises(UserError, match="--quadratic-duration needs --bucketing-sampler true"):
        dm = data_module(env, "--quadratic-duration", "4", "--bucketing-sampler", "false")
        dm.train_dataloader(dm.train_cuts("train"), world_size=1, rank=0)
