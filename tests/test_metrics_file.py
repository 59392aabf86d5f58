"""The structured training record: ``<exp-dir>/log/metrics-train.jsonl`` (llmasr.training.logs)."""
from __future__ import annotations

import json
import math
import re

import pytest
from llmasr.io import load_torch_file

from llmasr.training.logs import METRICS_FILE, MetricsFile, read_metrics

from tests.test_training import env, train  # noqa: F401  (session fixture: tiny models + espeak data)


def test_training_run_writes_metrics_that_match_the_log(env, tmp_path):  # noqa: F811
    exp = tmp_path / "exp"
    train(env, exp, optimizer="adamw", base_lr="0.01", num_epochs=2, log_interval=2)
    recs = read_metrics(exp)
    train_recs = read_metrics(exp, "train")
    valid = read_metrics(exp, "valid")
    assert recs == [r for r in recs if r["stage"] in ("train", "valid")] and len(recs) == len(train_recs) + len(valid)
    assert len(valid) == 2 and [r["epoch"] for r in valid] == [1, 2]
    batches = [r["batch"] for r in train_recs]
    assert len(batches) >= 4 and batches == sorted(set(batches)), batches
    times = [r["time_s"] for r in recs]
    assert times == sorted(times) and times[0] >= 0
    for r in train_recs:
        assert set(r) >= {"stage", "epoch", "batch", "time_s", "lr", "loss", "acc", "tokens", "tot_loss"}
        assert math.isfinite(r["loss"]) and r["loss"] > 0 and r["lr"] == pytest.approx(0.01, rel=0.5)
    # Each train record's loss is the one its log line printed ("Epoch e, batch b (global g), loss[loss=x, ...").
    log = "".join(p.read_text() for p in (exp / "log").glob("log-train-*"))
    logged = {int(g): float(x) for g, x in re.findall(r"\(global (\d+)\), loss\[loss=([0-9.e+-]+)", log)}
    assert sorted(logged) == batches
    for r in train_recs:
        assert float(f"{r['loss']:.4g}") == logged[r["batch"]], r
    # The validation records match the checkpoint's best validation loss.
    ck = load_torch_file(exp / "epoch-2.pt")
    assert min(r["loss"] for r in valid) == pytest.approx(ck["best_valid_loss"], rel=1e-12)
    # A new run from scratch in the same directory starts a new file.
    train(env, exp, optimizer="adamw", base_lr="0.01", num_epochs=1, log_interval=2)
    again = read_metrics(exp)
    assert len(read_metrics(exp, "valid")) == 1 and max(r["epoch"] for r in again) == 1


def test_metrics_file_records_and_torn_or_corrupt_lines(tmp_path):
    mf = MetricsFile(tmp_path / METRICS_FILE, rank=0)
    mf.write("warmup", 0, 1, lr=1e-3, loss=5.0, aux_ctc=5.0)
    mf.write("train", 1, 10, lr=2e-3, loss=2.5, acc=0.25)
    mf.write("valid", 1, 10, loss=2.75)
    recs = read_metrics(tmp_path)
    assert [(r["stage"], r["epoch"], r["batch"], r["loss"]) for r in recs] == [
        ("warmup", 0, 1, 5.0), ("train", 1, 10, 2.5), ("valid", 1, 10, 2.75)]
    assert recs[2]["lr"] == 2e-3  # validation records carry the latest lr
    assert read_metrics(tmp_path, "train") == [recs[1]]
    with pytest.raises(ValueError, match="stage"):
        mf.write("test", 1, 1, loss=1.0)
    with pytest.raises(ValueError, match="no loss"):
        mf.write("train", 1, 1, acc=1.0)
    # Other ranks write nothing.
    MetricsFile(tmp_path / METRICS_FILE, rank=1).write("train", 1, 11, lr=1.0, loss=1.0)
    assert len(read_metrics(tmp_path)) == 3

    path = tmp_path / METRICS_FILE
    text = path.read_text()
    path.write_text(text + '{"stage": "train", "epoch": 1, "ba')  # killed mid-write
    assert read_metrics(tmp_path) == recs
    lines = text.splitlines(keepends=True)
    path.write_text(lines[0] + '{"stage": "train", "epoch"\n' + lines[2])
    with pytest.raises(ValueError, match=re.escape(f"{path}:2")):
        read_metrics(tmp_path)
    path.write_text(lines[0] + json.dumps({"epoch": 1}) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2")):
        read_metrics(tmp_path)
    with pytest.raises(FileNotFoundError, match="metrics-train.jsonl"):
        read_metrics(tmp_path / "nowhere")


def test_resumed_run_keeps_the_records_up_to_its_checkpoint(env, tmp_path):  # noqa: F811
    exp = tmp_path / "exp"
    common = dict(optimizer="adamw", base_lr="0.01", num_epochs=2, log_interval=1, save_every_n=3)
    train(env, exp, **common)
    first = read_metrics(exp, "train")
    total = first[-1]["batch"]
    mid = 3 * (total // 6)  # a checkpoint inside the run
    assert 0 < mid < total and (exp / f"checkpoint-{mid}.pt").is_file()
    train(env, exp, start_batch=mid, **common)  # resume in the same directory
    recs = read_metrics(exp, "train")
    batches = [r["batch"] for r in recs]
    assert batches == list(range(1, total + 1)), batches  # no duplicate of the batches after the checkpoint
    assert recs[:mid] == first[:mid]  # the records up to the checkpoint are the first run's
    assert [r["loss"] for r in recs[mid:]] == pytest.approx([r["loss"] for r in first[mid:]], rel=1e-5)
    times = [r["time_s"] for r in recs]
    assert times == sorted(times)  # the resumed run continues the clock
