"""The demo's ``curves.png``: the projector warm-up's aux CTC loss, the LLM stage's loss, and the
error rate of every test set per epoch against a reference system (zero-shot Whisper-base).

Input is structured: the records of the metrics file training writes
(:func:`llmasr.training.logs.read_metrics`) and the error rates decode wrote.

    from llmasr.demo.plotting import curve_series, plot_training_curves
    series = curve_series(read_metrics(exp_dir), {"template": [(0, 331.0), (1, 60.0)]}, {"template": 42.0})
    plot_training_curves("exp/demo/curves.png", series)

matplotlib runs with the non-interactive Agg backend (no display needed); the file is written
atomically.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from llmasr.io import atomic_write

PathLike = Union[str, os.PathLike]
Points = List[Tuple[float, float]]


def curve_series(records: Sequence[dict], rates: Dict[str, Points],
                 reference: Optional[Dict[str, float]] = None) -> Dict[str, object]:
    """What :func:`plot_training_curves` draws, from metrics-file records and error rates.

    ``rates``: ``{test set: [(epoch, rate in %)]}`` (epoch 0: before training); ``reference``:
    ``{test set: rate}`` of the system to beat. Returns ``warmup`` ``[(step, aux CTC loss)]``,
    ``train`` ``[(global batch, running loss)]`` (``tot_loss``, else the batch's ``loss``),
    ``valid`` ``[(global batch, loss)]``, ``rates`` and ``reference`` (sets with rates only).
    Non-finite losses (skipped batches) are left out."""
    def points(stage: str, key: str) -> Points:
        out = []
        for r in records:
            if r["stage"] == stage:
                value = r.get(key, r["loss"])
                if math.isfinite(value):
                    out.append((r["batch"], value))
        return out

    rates = {name: sorted(pts) for name, pts in rates.items() if pts}
    return {
        "warmup": points("warmup", "loss"),
        "train": points("train", "tot_loss"),
        "valid": points("valid", "loss"),
        "rates": rates,
        "reference": {name: v for name, v in (reference or {}).items() if name in rates},
    }


def draw_curves(series: Dict[str, object], metric: str = "WER", title: Optional[str] = None,
                reference_name: str = "zero-shot Whisper-base"):
    """The matplotlib figure of ``series`` (:func:`curve_series`): one panel per non-empty part."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p, keys in (("warmup", ("warmup",)), ("llm", ("train", "valid")), ("rates", ("rates",)))
              if any(series[k] for k in keys)]
    if not panels:
        raise ValueError("nothing to plot: no loss and no error-rate points")
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), dpi=110, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "warmup":
            _loss_panel(ax, "projector warm-up", "warm-up step", [("aux CTC loss", series["warmup"], "tab:cyan", "-")])
        elif panel == "llm":
            _loss_panel(ax, "LLM stage (projector + LoRA)", "training batch",
                        [("training loss (running)", series["train"], "tab:blue", "-"),
                         ("validation loss", series["valid"], "tab:orange", "o")])
        else:
            _rates_panel(ax, series["rates"], series["reference"], metric, reference_name)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _loss_panel(ax, title: str, x_label: str, curves) -> None:
    for label, pts, color, style in curves:
        if pts:
            xs, ys = zip(*pts)
            if style == "o":
                ax.plot(xs, ys, color=color, marker="o", ls="", label=label)
            else:
                ax.plot(xs, ys, color=color, lw=1.5, label=label)
    ys = [y for _, pts, _, _ in curves for _, y in pts]
    if ys and min(ys) > 0:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(x_label)
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")


def _rates_panel(ax, rates: Dict[str, Points], reference: Dict[str, float], metric: str, reference_name: str) -> None:
    colors = iter(["tab:red", "tab:green", "tab:purple", "tab:brown", "tab:olive"])
    top = 0.0
    for name, pts in rates.items():
        color = next(colors, "tab:gray")
        xs, ys = zip(*pts)
        ax.plot(xs, ys, color=color, marker="o", lw=1.5, label=f"{name}")
        for x, y in pts:
            ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center",
                        fontsize=7, color=color)
        if name in reference:
            ax.axhline(reference[name], color=color, ls="--", lw=1.0,
                       label=f"{name}, {reference_name}: {reference[name]:.1f}%")
        top = max([top, *ys, reference.get(name, 0.0)])
    ax.set_ylim(0, min(top * 1.15 + 1, max(top * 1.15, 110)))
    ax.set_title(f"test-set {metric} per epoch (0: untrained)", fontsize=9)
    ax.set_xticks(sorted({x for pts in rates.values() for x, _ in pts}))
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{metric} (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")


def plot_training_curves(out_path: PathLike, series: Dict[str, object], metric: str = "WER",
                         title: Optional[str] = None) -> Path:
    """Write :func:`draw_curves`'s figure of ``series`` as a PNG (atomically)."""
    fig = draw_curves(series, metric, title)
    import matplotlib.pyplot as plt

    out_path = Path(out_path)
    try:
        atomic_write(out_path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return out_path


__all__ = ["curve_series", "draw_curves", "plot_training_curves"]
