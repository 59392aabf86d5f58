"""The demo's results: ``curves.png``, the error-rate tables, ``results.json`` and the closing
summary with the next commands."""
from __future__ import annotations

import shlex
import time
from pathlib import Path

from llmasr.demo.console import T_START, fmt_time, say
from llmasr.demo.stages import DemoRun, all_sets_argv


def plot(d: DemoRun) -> Path:
    """curves.png from the training's metrics file and the decoded error rates."""
    from llmasr.demo.plotting import curve_series, plot_training_curves
    from llmasr.training.logs import read_metrics

    rates = {t.key: [(e["epoch"], e["rates"][t.key]) for e in d.per_epoch if t.key in e["rates"]]
             for t in d.test_sets}
    for key, value in d.before.items():
        rates.setdefault(key, []).insert(0, (0, value))
    series = curve_series(read_metrics(d.exp_dir), rates, d.zero_shot)
    return plot_training_curves(d.exp_dir / "curves.png", series, metric=d.metric,
                                title=f"LLM-ASR demo ({d.lang}): Whisper-base -> projector -> SmolLM2-135M + LoRA")


def print_tables(d: DemoRun) -> None:
    rows = [("untrained model (before training)", d.before, d.before_norm)]
    rows += [(f"after epoch {e['epoch']} (batch {e['batch']})", e["rates"], e["whisper_norm"]) for e in d.per_epoch]
    if d.zero_shot:
        rows.append(("zero-shot Whisper-base (openai-whisper)", d.zero_shot, d.zero_shot_norm))
    keys = [t.key for t in d.test_sets]
    print("", flush=True)
    print(f"  {d.metric} % on the test sets (none of their sentences occurs in training):")
    for t in d.test_sets:
        print(f"    {t.key:<12} {t.name}: {t.label}")
    tables = [(f"{d.metric} %", 1)] + ([("WER % with Whisper's English normaliser (numbers as digits etc.)", 2)]
                                       if d.lang == "en" else [])
    for title, col in tables:
        print(f"\n  {title}\n  {'system':<42}" + "".join(f" {key:>12}" for key in keys))
        for row in rows:
            print(f"  {row[0]:<42}" + "".join(f" {row[col][key]:>12.2f}" if key in row[col] else f" {'-':>12}"
                                              for key in keys))


def results(d: DemoRun, plot_path: Path) -> dict:
    """The numbers of the run (``results.json``)."""
    final = d.per_epoch[-1]
    return {
        "lang": d.lang,
        "quick": d.quick,
        "metric": d.metric,
        "test_sets": {t.key: {"name": t.name, "label": t.label} for t in d.test_sets},
        "before": d.before["template"],
        "after": final["rate"],
        "after_rates": final["rates"],
        "per_epoch": d.per_epoch,
        "zero_shot_whisper": d.zero_shot.get("template"),
        "zero_shot_whisper_rates": d.zero_shot,
        "zero_shot_whisper_normalised": d.zero_shot_norm.get("template"),
        "zero_shot_whisper_normalised_rates": d.zero_shot_norm,
        "before_normalised": d.before_norm.get("template"),
        "after_normalised": final["whisper_norm"].get("template"),
        "after_normalised_rates": final["whisper_norm"],
        "train_seconds": d.train_seconds,
        "total_seconds": time.time() - T_START,
        "threads": d.threads,
        "plot": str(plot_path),
        "exp_dir": str(d.exp_dir),
        "decode_args": d.decode_common,  # model, paths and decoding flags of src/decode.py / src/transcribe.py
        "heldout_dir": str(d.heldout_dir) if d.heldout_dir else None,
    }


def print_summary(d: DemoRun) -> None:
    final = d.per_epoch[-1]
    print("", flush=True)
    say(f"Done in {fmt_time(time.time() - T_START)} (training {fmt_time(d.train_seconds)}): "
        f"{d.metric} {d.before['template']:.2f}% before training -> {final['rate']:.2f}% after"
        + (f" (zero-shot Whisper-base: {d.zero_shot['template']:.2f}%)" if d.zero_shot else ""))
    final_dir = Path(final["dir"])
    summaries = sorted(p.name for p in final_dir.glob("*-summary-*"))
    exp_dir, common, n = d.exp_dir, d.decode_common, d.num_epochs
    print(f"""
  Files:
    {exp_dir}/curves.png                  warm-up and training loss + {d.metric} of every test set
    {final_dir}/   recogs-*, errs-*, {', '.join(summaries)}
    {exp_dir}/log/                        training log, metrics-train.jsonl; tensorboard: tensorboard --logdir {exp_dir}/tensorboard
    {exp_dir}/epoch-*.pt                  checkpoints (projector + LoRA)
    {exp_dir}/results.json                the numbers above
  Go further:
    python src/transcribe.py {' '.join(shlex.quote(a) for a in common)} --epoch {n} --avg 1 my_recording.wav
    python src/transcribe.py {' '.join(shlex.quote(a) for a in common)} --epoch {n} --avg 1 my_long_recording.wav --segments segments.jsonl   # any length: speech segments, one JSON line each
    python src/decode.py {' '.join(shlex.quote(a) for a in common + all_sets_argv(d))} --epoch {n} --avg {min(2, n)} --beam-size 4
    python src/train.py --help            # the same script trains Zipformer/Whisper + Qwen2 on GPUs
    local/prepare.sh --help               # prepare LibriSpeech / AISHELL / Kaldi data dirs
""", flush=True)
