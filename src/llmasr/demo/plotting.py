"""Training-curve plots: training loss and held-out error rate over training, one PNG.

Input comes from what every training run already writes:

- the training log ``<exp-dir>/log/log-train-*`` (lines with ``batch <global batch>`` ... ``loss``),
  read by :func:`read_train_losses`, or any list of ``(batch, loss)`` points;
- error rates measured at some global batches (``(batch, rate)``), e.g. from decoding epoch
  checkpoints.

    from llmasr.demo.plotting import plot_training_curves
    plot_training_curves("exp/demo/curves.png", losses=[(10, 3.1), ...], wers=[(0, 350.0), (75, 40.0)],
                         reference={"Whisper-base zero-shot": 42.0})

matplotlib runs with the non-interactive Agg backend (no display needed); the file is written
atomically.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from llmasr.io import atomic_write

PathLike = Union[str, os.PathLike]

# The training loop (llmasr.training.loop) logs e.g.
#   "Epoch 1, batch 40 (global 115), loss[loss=2.345, acc=0.5, ...], tot_loss[loss=2.5, ...], ..."
# we take the first "loss=" after "batch N" (the current batch's loss) and the global batch index.
_BATCH_LOSS = re.compile(r"batch[ =:]*(\d+).*?\bloss[=:\s]+([0-9.eE+-]+|nan|inf)")
_GLOBAL = re.compile(r"\(global (\d+)\)|batch_idx_train[=:\s]+(\d+)")


def read_train_losses(
    log_files: Iterable[PathLike], prefer_tot_loss: bool = True, key: str = "loss"
) -> List[Tuple[int, float]]:
    """``(global batch, loss)`` points from training log files.

    A line counts when it has ``batch <n>`` followed by ``loss=<x>`` (validation lines do not). With ``prefer_tot_loss`` the
    running average ``tot_loss[loss=...]`` is used when present (smoother curve). ``key`` picks
    another logged metric instead of ``loss`` (e.g. ``aux_ctc``, ``acc``). If a line carries
    ``(global <n>)`` or ``batch_idx_train=<n>`` that global index is used, else the ``batch``
    number. Sorted by batch.
    """
    points: Dict[int, float] = {}
    for f in log_files:
        for line in Path(f).read_text(errors="replace").splitlines():
            m = _BATCH_LOSS.search(line)
            if m is None or "validation:" in line:  # the validation loss is not a training point
                continue
            batch = int(m.group(1))
            g = _GLOBAL.search(line)
            if g is not None:
                batch = int(g.group(1) or g.group(2))
            value = m.group(2)
            if key != "loss":
                value = None
                cur = re.search(r"(?<!tot_)loss\[[^\]]*\b" + re.escape(key) + r"=([0-9.eE+-]+)", line)
                if cur is not None:
                    value = cur.group(1)
            if prefer_tot_loss:
                t = re.search(r"tot_loss\[[^\]]*\b" + re.escape(key) + r"=([0-9.eE+-]+)", line)
                if t is not None:
                    value = t.group(1)
            if value is None:
                continue
            try:
                points[batch] = float(value)
            except ValueError:
                continue
    return sorted(points.items())


def plot_training_curves(
    out_path: PathLike,
    losses: Sequence[Tuple[float, float]],
    wers: Sequence[Tuple[float, float]] = (),
    reference: Optional[Dict[str, float]] = None,
    metric: str = "WER",
    x_label: str = "training batch",
    title: Optional[str] = None,
    aux_losses: Sequence[Tuple[float, float]] = (),
) -> Path:
    """Write a PNG with the training loss (left axis, log scale) and the held-out error rate in %
    (right axis, markers), plus horizontal reference lines (e.g. a zero-shot baseline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not losses and not wers:
        raise ValueError("nothing to plot: no loss and no error-rate points")
    out_path = Path(out_path)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    handles = []
    if losses:
        xs, ys = zip(*losses)
        (h,) = ax.plot(xs, ys, color="tab:blue", lw=1.5, label="training loss (LLM cross-entropy)")
        handles.append(h)
    if aux_losses:
        xs, ys = zip(*aux_losses)
        (h,) = ax.plot(xs, ys, color="tab:cyan", lw=1.0, ls="--", label="projector aux CTC loss")
        handles.append(h)
    ax.set_xlabel(x_label)
    ax.set_ylabel("loss")
    if losses and min(y for _, y in losses) > 0:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if wers:
        ax2 = ax.twinx()
        xs, ys = zip(*wers)
        (h,) = ax2.plot(xs, ys, color="tab:red", marker="o", lw=1.5, label=f"held-out {metric} (%)")
        handles.append(h)
        for x, y in wers:
            ax2.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center",
                         fontsize=8, color="tab:red")
        styles = iter(["--", ":", "-."])
        for name, value in (reference or {}).items():
            h = ax2.axhline(value, color="tab:gray", ls=next(styles, "--"), lw=1.0, label=f"{name}: {value:.1f}%")
            handles.append(h)
        ax2.set_ylabel(f"{metric} (%)")
        top = max(list(ys) + list((reference or {}).values()))
        ax2.set_ylim(0, min(top * 1.15 + 1, max(top * 1.15, 110)))
    ax.legend(handles=handles, loc="upper right", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    try:
        atomic_write(out_path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return out_path


__all__ = ["read_train_losses", "plot_training_curves"]
