"""llmasr.io: safe checkpoint loading on every loading path, one strict state-dict loader, atomic
writes that honour the umask, pruning of temporaries a killed save left behind."""
from __future__ import annotations

import argparse
import fcntl
import io
import os
import pathlib
import re
import shutil
import stat
import threading
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from llmasr.io import (
    TRUST_ENV,
    CheckpointError,
    atomic_torch_save,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    load_state_dict_strict,
    load_torch_file,
    prune_stale_temp_files,
)

GOLDEN_SUFFIXES = (".pt", ".pth.tar", ".bin")


class WindowsPathFromElsewhere:
    """Pickles as ``pathlib.WindowsPath`` (what a checkpoint saved on Windows holds)."""

    def __reduce__(self):
        return pathlib.WindowsPath, ("C:\\exp",)


class Payload:
    """Unpickling this creates ``marker`` (what a malicious checkpoint would do, harmlessly)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture
def payload(tmp_path):
    """(write(path, obj) -> path with Payload inside obj, marker path)"""
    marker = tmp_path / "PAYLOAD-RAN"

    def write(path: Path, obj: dict) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({**obj, "extra": Payload(marker)}, path)
        return path

    yield write, marker


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _same(a, b, where="") -> None:
    """Deep equality of two loaded checkpoints (tensors bit-exact)."""
    assert type(a) is type(b), (where, type(a), type(b))
    if torch.is_tensor(a):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, argparse.Namespace):
        _same(vars(a), vars(b), where)
    else:
        assert a == b, where


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------


def test_every_golden_file_loads_unchanged(golden_dir):
    """Every checkpoint the reference implementations wrote loads through the allow-list with
    exactly the content full unpickling gives."""
    files = sorted(p for p in golden_dir.rglob("*") if p.is_file() and p.name.endswith(GOLDEN_SUFFIXES))
    assert len(files) >= 15, files
    needed = set()
    for f in files:
        needed.update(torch.serialization.get_unsafe_globals_in_checkpoint(str(f)))
        _same(load_torch_file(f), torch.load(f, map_location="cpu", weights_only=False), f.name)
    # the fixtures exercise the Namespace and Path entries of the allow-list
    assert {"argparse.Namespace", "pathlib.PosixPath"} <= needed


def test_training_state_types_load(tmp_path):
    """What our/icefall training checkpoints hold besides tensors: numpy RNG state and scalars,
    Paths, torch version, dtypes."""
    import numpy as np

    rng = np.random.RandomState(3).get_state()
    obj = {"rng": rng, "loss": np.float64(1.25), "count": np.int64(7), "arr": np.arange(4, dtype=np.float32),
           "dtype": np.dtype("int16"), "exp_dir": Path("exp/x"), "torch-version": torch.__version__,
           "amp": torch.bfloat16, "win": WindowsPathFromElsewhere()}
    torch.save(obj, tmp_path / "state.pt")
    got = load_torch_file(tmp_path / "state.pt")
    assert got["rng"][0] == "MT19937" and np.array_equal(got["rng"][1], rng[1]) and got["rng"][2:] == rng[2:]
    assert got["loss"] == 1.25 and got["count"] == 7 and got["arr"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert got["dtype"] == np.dtype("int16") and got["exp_dir"] == Path("exp/x") and got["amp"] is torch.bfloat16
    assert got["torch-version"] == torch.__version__ and got["win"] == pathlib.PureWindowsPath("C:/exp")


def test_pickle_payload_refused_with_one_line_naming_file_and_global(payload, tmp_path, monkeypatch):
    write, marker = payload
    bad = write(tmp_path / "evil.pt", {"model": {"w": torch.zeros(2)}})
    with pytest.raises(CheckpointError) as e:
        load_torch_file(bad, "checkpoint")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"refusing to load checkpoint {bad}: it needs the Python global 'io.open'")
    assert f"{TRUST_ENV}={bad}" in msg
    assert not marker.exists()
    # the opt-in for a trusted file: listing the file (or its directory) loads it with full unpickling
    monkeypatch.setenv(TRUST_ENV, os.pathsep.join([str(tmp_path / "other.pt"), str(tmp_path)]))
    got = load_torch_file(bad)
    assert marker.exists() and torch.equal(got["model"]["w"], torch.zeros(2))  # the payload is real


def _decode(golden_dir, exp, *flags):
    import decode  # src/decode.py

    return decode.main([
        "--exp-dir", str(exp), *flags, "--max-duration", "300", "--num-workers", "0",
        "--llm-path", "models/llm", "--speech-encoder-type", "tiny_a",
        "--speech-encoder-path", "models/zipformer/tiny_a/pretrained.pt",
        "--speech-encoder-bpe-path", "models/zipformer/bpe.model", "--manifest-dir", "data/fbank",
        "--attn-implementation", "eager", "--normalize", "speechllm",
        "--debug",  # the exception itself, not the one-line exit of a user error
    ])


def _train(golden_dir, exp, *flags):
    from llmasr.recipes.train import main

    sl = golden_dir / "speechllm"
    main(argv=["--exp-dir", str(exp), "--llm-path", str(sl / "models/llm"), "--speech-encoder-type", "tiny_a",
               "--speech-encoder-path", str(sl / "models/zipformer/tiny_a/pretrained.pt"),
               "--manifest-dir", str(sl / "data/fbank"), "--world-size", "1", "--tensorboard", "false", *flags])


def test_payload_refused_by_every_loading_path(golden_dir, payload, tmp_path, monkeypatch):
    from llmasr.encoders import build_speech_encoder
    from llmasr.firered.load import load_aed, load_encoder, load_package

    write, marker = payload
    sl = golden_dir / "speechllm"
    monkeypatch.delenv(TRUST_ENV, raising=False)
    good = load_torch_file(sl / "exp/baseline/epoch-1.pt")

    exp = tmp_path / "exp"
    exp.mkdir()
    shutil.copy(sl / "exp/baseline/epoch-1.pt", exp / "epoch-1.pt")
    shutil.copy(sl / "models/zipformer/tiny_a/model_params.json", tmp_path)  # defines type tiny_a
    write(exp / "epoch-2.pt", good)  # a valid checkpoint that also carries the payload
    monkeypatch.chdir(sl)  # the manifests' feature paths are relative to the golden directory
    paths = {
        "decode --checkpoint": lambda: _decode(golden_dir, exp, "--checkpoint", "epoch-2.pt"),
        "decode --epoch 2 --avg 2": lambda: _decode(golden_dir, exp, "--epoch", "2", "--avg", "2"),
        "train --start-epoch 3": lambda: _train(golden_dir, exp, "--start-epoch", "3"),
        "train --pretrained-model-path": lambda: _train(golden_dir, tmp_path / "exp2", "--pretrained-model-path",
                                                        str(exp / "epoch-2.pt")),
        "zipformer encoder": lambda: build_speech_encoder(
            "tiny_a", str(write(tmp_path / "zip.pt", load_torch_file(sl / "models/zipformer/tiny_a/pretrained.pt")))),
        "whisper encoder": lambda: build_speech_encoder("whisper", str(write(
            tmp_path / "whisper.pt", load_torch_file(golden_dir / "whisper_llm_zh/models/whisper/whisper-tiny-random.pt")))),
        "firered encoder": lambda: build_speech_encoder("firered", str(write(
            tmp_path / "asr_encoder.pth.tar", load_torch_file(golden_dir / "firered/llm/asr_encoder.pth.tar")))),
        "firered package": lambda: load_package(write(tmp_path / "pkg.pth.tar", {"args": argparse.Namespace()})),
        "firered load_aed": lambda: load_aed(tmp_path / "pkg.pth.tar"),
        "firered load_encoder": lambda: load_encoder(tmp_path / "pkg.pth.tar"),
    }
    for name, load in paths.items():
        with pytest.raises(CheckpointError, match=r"refusing to load .*: it needs the Python global 'io.open'"):
            load()
        assert not marker.exists(), f"{name} ran the payload"


def test_corrupt_files_error_names_the_file(golden_dir, tmp_path):
    from llmasr.checkpoint import load_checkpoint
    from llmasr.encoders import build_speech_encoder
    from llmasr.firered.load import load_package

    data = (golden_dir / "speechllm/exp/baseline/epoch-1.pt").read_bytes()
    shutil.copy(golden_dir / "speechllm/models/zipformer/tiny_a/model_params.json", tmp_path)  # type tiny_a
    legacy = io.BytesIO()  # torch.save's format before the zip archive: a pickle
    torch.save({"model": {"w": torch.arange(100.0)}}, legacy, _use_new_zipfile_serialization=False)
    cases = {
        "truncated.pt": (data[: len(data) // 2],
                         "PytorchStreamReader failed reading zip archive: failed finding central directory"),
        "legacy.pt": (legacy.getvalue()[:-100], r"unexpected EOF, expected \d+ more bytes"),
        "notes.pt": (b"some notes, not a checkpoint\n", "not written by torch.save"),
        "empty.pt": (b"", "the file is empty"),
    }
    for name, (content, detail) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        for what, load in (("checkpoint", load_checkpoint), ("Zipformer checkpoint", lambda p: build_speech_encoder("tiny_a", str(p))),
                           ("Whisper checkpoint", lambda p: build_speech_encoder("whisper", str(p))),
                           ("FireRedASR package", load_package)):
            with pytest.raises(CheckpointError) as e:
                load(path)
            assert re.fullmatch(rf"{what} {path} is corrupt or truncated, or not a torch file \({detail}\)", str(e.value))
    with pytest.raises(FileNotFoundError, match="absent.pt does not exist"):
        load_torch_file(tmp_path / "absent.pt")


# ---------------------------------------------------------------------------------------------
# strict loading
# ---------------------------------------------------------------------------------------------


class _Wrapper(nn.Module):  # like DDP: the model in .module
    def __init__(self, module):
        super().__init__()
        self.module = module


def test_load_state_dict_strict_reports_everything_at_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 4))
    sd = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    bad = dict(sd)
    del bad["1.bias"]
    bad["0.weight"] = torch.zeros(3, 5)
    bad["extra.w"] = torch.zeros(1)
    bad["decoder.x"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        load_state_dict_strict(model, bad, "ckpt.pt", ignore_unexpected_prefixes=("decoder.",),
                               context="tiny", hints=lambda m: [f"hint for {m.missing[0]}"])
    assert str(e.value) == ("ckpt.pt does not match the model (tiny): 1 missing: 1.bias | 1 unexpected: extra.w | "
                            "1 shape mismatch: 0.weight: checkpoint (3, 5) vs model (3, 2) | hint for 1.bias")
    assert not torch.equal(model[0].bias, sd["0.bias"])  # nothing loaded

    many = {f"w{i}": torch.zeros(1) for i in range(8)}
    with pytest.raises(CheckpointError, match=r"8 unexpected: w0, w1, w2, w3, w4 \.\.\. \(\+3 more\)"):
        load_state_dict_strict(model, {**sd, **many}, "many.pt")

    kept = load_state_dict_strict(_Wrapper(model), {k: v for k, v in sd.items() if k != "1.bias"}, "partial.pt",
                                  allow_missing=["1.bias"])
    assert kept == ["1.bias"]
    assert torch.equal(model[0].weight, sd["0.weight"]) and not torch.equal(model[1].bias, sd["1.bias"])


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------


def test_atomic_writes_follow_the_umask(umask, tmp_path):
    files = [
        atomic_torch_save({"w": torch.ones(2)}, tmp_path / "a" / "epoch-1.pt"),
        atomic_write_text(tmp_path / "recogs.txt", "x\n"),
        atomic_write_json(tmp_path / "r.json", {"b": 1, "a": [2]}, indent=1, sort_keys=True),
    ]
    assert [_mode(f) for f in files] == [0o644, 0o644, 0o644]
    assert (tmp_path / "r.json").read_text() == '{\n "a": [\n  2\n ],\n "b": 1\n}\n'
    d = atomic_write(tmp_path / "llm", lambda tmp: (tmp / "config.json").write_text("{}"), directory=True)
    assert _mode(d) == 0o755 and _mode(d / "config.json") == 0o644
    umask(0o027)
    assert _mode(atomic_torch_save({"w": torch.ones(2)}, tmp_path / "a" / "epoch-1.pt")) == 0o640
    assert torch.equal(load_torch_file(tmp_path / "a" / "epoch-1.pt")["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "config.json", "epoch-1.pt", "llm", "r.json",
                                                           "recogs.txt"]


def test_writers_see_the_real_name_and_saves_are_reproducible(tmp_path):
    """The writer's temporary has the destination's name (lhotse, sox, matplotlib pick the format
    from it; torch.save records it), so atomic_torch_save gives a direct torch.save's bytes."""
    seen = []
    atomic_write(tmp_path / "cuts_train.jsonl.gz", lambda tmp: seen.append(tmp.name) or tmp.write_bytes(b"x"))
    assert seen == ["cuts_train.jsonl.gz"]
    obj = {"model": {"w": torch.arange(6.0).view(2, 3)}, "exp_dir": Path("exp")}
    (tmp_path / "direct").mkdir()
    torch.save(obj, tmp_path / "direct" / "epoch-1.pt")
    for _ in range(2):
        atomic_torch_save(obj, tmp_path / "epoch-1.pt")
        assert (tmp_path / "epoch-1.pt").read_bytes() == (tmp_path / "direct" / "epoch-1.pt").read_bytes()


def test_checkpoints_are_readable_by_others(umask, tmp_path, golden_dir):
    """save_checkpoint and the averaged file: 0644 under umask 022 (mkstemp made them 0600)."""
    from llmasr.checkpoint import averaged_checkpoint, save_checkpoint

    save_checkpoint(tmp_path / "epoch-1.pt", nn.Linear(2, 2), {"cur_epoch": 1})
    shutil.copy(tmp_path / "epoch-1.pt", tmp_path / "epoch-2.pt")
    averaged_checkpoint(tmp_path, epoch=2, avg=2)
    assert _mode(tmp_path / "epoch-1.pt") == 0o644 and _mode(tmp_path / "epoch-2-avg-2.pt") == 0o644


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = atomic_write_text(tmp_path / "wer-summary.txt", "old\n")

    def failing(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, failing)
    old_dir = atomic_write(tmp_path / "dir", lambda tmp: (tmp / "f").write_text("1"), directory=True)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(old_dir, lambda tmp: failing(tmp / "f"), directory=True)
    assert target.read_text() == "old\n" and (old_dir / "f").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "wer-summary.txt"]
    atomic_write(old_dir, lambda tmp: (tmp / "g").write_text("2"), directory=True)  # replaces a directory
    assert [p.name for p in old_dir.iterdir()] == ["g"] and sorted(p.name for p in tmp_path.iterdir()) == [
        "dir", "wer-summary.txt"]


def test_prune_removes_only_dead_temporaries(tmp_path):
    stale = tmp_path / ".epoch-3.pt.1a2b3c4d.tmp"  # a save killed mid-write: nobody holds its lock
    stale.write_bytes(b"partial")
    old_mkstemp = tmp_path / ".checkpoint-8.pt.k2j_x9az.tmp"  # what earlier versions left
    old_mkstemp.write_bytes(b"partial")
    stale_dir = tmp_path / ".llm.0badf00d.tmp"
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"x")
    others = ["notes.tmp", ".hidden", "epoch-3.pt", ".epoch-3.pt.tmp", ".x.TOOLONG123.tmp"]
    for name in others:
        (tmp_path / name).write_text("keep")

    started, release = threading.Event(), threading.Event()

    def slow_writer(tmp):
        tmp.write_bytes(b"in progress")
        started.set()
        assert release.wait(60)

    live = threading.Thread(target=atomic_write, args=(tmp_path / "epoch-4.pt", slow_writer))
    live.start()
    assert started.wait(60)
    (live_tmp,) = [p for p in tmp_path.glob(".epoch-4.pt.*.tmp")]
    removed = prune_stale_temp_files(tmp_path)
    release.set()
    live.join()
    assert sorted(p.name for p in removed) == sorted(p.name for p in (stale, old_mkstemp, stale_dir))
    assert not live_tmp.exists() and (tmp_path / "epoch-4.pt").read_bytes() == b"in progress"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others + ["epoch-4.pt"])
    # a lock held by another open file description (another process) also protects the file
    held = tmp_path / ".epoch-5.pt.00000000.tmp"
    held.write_bytes(b"")
    with open(held) as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        assert prune_stale_temp_files(tmp_path) == [] and held.exists()


def test_training_start_prunes_stale_temporaries(golden_dir, tmp_path):
    exp = tmp_path / "exp"
    exp.mkdir()
    stale = exp / ".epoch-2.pt.deadbeef.tmp"
    stale.write_bytes(b"partial")
    (exp / "keep.tmp").write_text("keep")
    # stops at the first input check, after the start-up clean-up
    with pytest.raises(FileNotFoundError, match="no-such-llm"):
        _train(golden_dir, exp, "--llm-path", str(tmp_path / "no-such-llm"))
    assert not stale.exists() and (exp / "keep.tmp").exists()
