"""Sharded and resumable decoding (llmasr.decoding_shards): ``torchrun --nproc-per-node 2 src/decode.py``
over gloo writes the result files of one process byte for byte, each rank decoding part of the golden
SpeechLLM set; a decode killed (SIGKILL) after its first batches and started again (on 2 ranks) ends
with the files of an uninterrupted run, having decoded only the rest; torn partial lines, stale partial
files and the duration balancing at unit level.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmasr.decoding_shards import DecodeShard, PartialResults, balance_by_duration, shard_batches, shard_cuts

REPO = Path(__file__).resolve().parents[1]
SETS = ("librispeech_test_clean", "librispeech_test_other")
RESULT_GLOBS = ("recogs-*", "errs-*", "wer-summary-*")


def decode_argv(exp: Path, max_duration: int) -> list:
    return ["--exp-dir", str(exp), "--epoch", "2", "--avg", "2", "--beam-size", "1",
            "--max-duration", str(max_duration), "--num-workers", "0", "--llm-path", "models/llm",
            "--speech-encoder-type", "tiny_a",
            "--speech-encoder-path", "models/zipformer/tiny_a/pretrained.pt",
            "--speech-encoder-bpe-path", "models/zipformer/bpe.model", "--manifest-dir", "data/fbank",
            "--attn-implementation", "eager"]


def command(world_size: int) -> list:
    script = str(REPO / "src" / "decode.py")
    if world_size == 1:
        return [sys.executable, script]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world_size), script]


def clean_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def new_exp(sl: Path, path: Path) -> Path:
    path.mkdir(parents=True)
    for e in (1, 2):
        shutil.copy(sl / f"exp/baseline/epoch-{e}.pt", path / f"epoch-{e}.pt")
    return path


def run_decode(sl: Path, exp: Path, world_size: int = 1, max_duration: int = 300) -> str:
    # (cwd: the manifests' feature paths are relative to the golden directory)
    p = subprocess.run(command(world_size) + decode_argv(exp, max_duration), cwd=sl, env=clean_env(),
                       capture_output=True, text=True, timeout=500)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return p.stdout + p.stderr


def decode_dir(exp: Path) -> Path:
    (out,) = exp.glob("decode-*")
    return out


def result_files(exp: Path) -> dict:
    out = decode_dir(exp)
    files = {f.name: f.read_bytes() for g in RESULT_GLOBS for f in out.glob(g)}
    assert len(files) == 6, sorted(files)
    return files


def partial_records(exp: Path) -> dict:
    """{file name: [records]} of the partial files (torn lines left out)."""
    out = {}
    for f in sorted((decode_dir(exp) / ".partial").glob("*.jsonl")):
        recs = []
        for line in f.read_text().split("\n")[1:]:
            try:
                recs.append(json.loads(line))
            except ValueError:
                pass
        out[f.name] = recs
    return out


@pytest.fixture(scope="module")
def one_process(sl, tmp_path_factory):
    """The golden set decoded by one process (--max-duration 300, the recipe's batches)."""
    exp = new_exp(sl, tmp_path_factory.mktemp("one") / "exp")
    run_decode(sl, exp)
    return exp


@pytest.mark.timeout(600)
def test_two_ranks_write_the_files_of_one_process(sl, one_process, tmp_path):
    want = result_files(one_process)
    recipe = sl / "expected/baseline/recogs/epoch-2-avg-2-beam-1"
    for f in recipe.glob("recogs-*.txt"):  # (the one process reproduces the reference recipe)
        assert want[f.name] == f.read_bytes(), f.name
    exp = new_exp(sl, tmp_path / "exp")
    out = run_decode(sl, exp, world_size=2)
    got = result_files(exp)
    assert got == want
    # only rank 0 wrote a log, and it lists both shares; each rank decoded part of each set
    (log,) = decode_dir(exp).glob("log-decode-*")
    shares = re.findall(r"rank (\d) of 2: (\d+) batches, (\d+) cuts, ([\d.]+) s", log.read_text())
    assert [(r, int(c) > 0) for r, _, c, _ in shares] == [("0", True), ("1", True)] * 2, shares
    assert sorted(int(c) for _, _, c, _ in shares) == sorted(decoded_counts(out)) and sum(decoded_counts(out)) == 20
    # the partial files are gone once every set has its files; nothing else was written
    assert sorted(f.name for f in decode_dir(exp).iterdir() if not f.name.startswith("log-")) == sorted(got)
    assert sorted(f.name for f in exp.iterdir()) == ["decode-epoch-2-avg-2-beam1", "epoch-1.pt", "epoch-2-avg-2.pt",
                                                     "epoch-2.pt"]


def decoded_counts(output: str) -> list:
    """The cuts each rank decoded in each set (its "decoded N cuts in ..." line)."""
    return [int(n) for n in re.findall(r"decoded (\d+) cuts in ", output)]


def kill_after_first_batches(sl: Path, exp: Path, max_duration: int) -> None:
    """Start a one-process decode and SIGKILL it as soon as a partial file holds a batch."""
    p = subprocess.Popen(command(1) + decode_argv(exp, max_duration), cwd=sl, env=clean_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and p.poll() is None:
            if any(len(f.read_text().split("\n")) > 2 for f in exp.glob("decode-*/.partial/*.jsonl")):
                break
            time.sleep(0.02)
        assert p.poll() is None, "the decode ended before it could be killed"
        os.kill(p.pid, signal.SIGKILL)
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()


@pytest.mark.timeout(900)
def test_killed_decode_resumes_on_two_ranks_with_the_same_files(sl, tmp_path):
    # --max-duration 3: batches of 1-2 cuts, so the kill lands after the first batches
    ref = new_exp(sl, tmp_path / "ref")
    run_decode(sl, ref, max_duration=3)
    want = result_files(ref)

    exp = new_exp(sl, tmp_path / "exp")
    kill_after_first_batches(sl, exp, 3)
    assert not list(decode_dir(exp).glob("recogs-*clean*"))
    before = {name: [r["id"] for r in recs] for name, recs in partial_records(exp).items()}
    (first,) = before  # (killed in the first set)
    assert first == f"{SETS[0]}-rank0.jsonl" and 0 < len(before[first]) < 10, before
    with open(decode_dir(exp) / ".partial" / first, "a") as f:  # a torn line, as a kill mid-write leaves
        f.write('{"id": "1089-134686-0000", "ref": "a torn')
    time.sleep(1.1)  # (a new log file name: its time stamp has seconds)

    out = run_decode(sl, exp, world_size=2, max_duration=3)
    assert result_files(exp) == want
    (log,) = [f for f in decode_dir(exp).glob("log-decode-*") if "rank 0 of 2" in f.read_text()]
    text = log.read_text()
    k = len(before[first])
    assert f"decoding test-clean: {10 - k} cuts ({k} decoded before)" in text
    assert "decoding test-other: 10 cuts\n" in text
    assert "1 incomplete line(s) ignored" in text
    # the restart decoded only the rest: 2 ranks x 2 sets, 20 - k cuts in all
    counts = decoded_counts(out)
    assert len(counts) == 4 and sum(counts) == 20 - k, counts
    assert not (decode_dir(exp) / ".partial").exists()


@pytest.mark.timeout(600)
def test_a_rank_with_nothing_to_decode(sl, tmp_path):
    """--test-num-buckets 1 --max-duration 300: each set is one batch, so rank 1 has none; fine."""
    exp = new_exp(sl, tmp_path / "exp")
    p = subprocess.run(command(2) + decode_argv(exp, 300) + ["--test-num-buckets", "1"], cwd=sl, env=clean_env(),
                       capture_output=True, text=True, timeout=500)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    (log,) = decode_dir(exp).glob("log-decode-*")
    assert log.read_text().count("rank 1 of 2: 0 batches, 0 cuts, 0.0 s") == 2
    assert sorted(decoded_counts(out)) == [0, 0, 10, 10]
    for s in SETS:
        (recogs,) = decode_dir(exp).glob(f"recogs-{s}-*")
        assert recogs.read_text().count("\thyp=") == 10


@pytest.mark.timeout(600)
def test_a_failing_rank_stops_the_other_naming_it(sl, tmp_path):
    """A feature file that cannot be read fails the rank whose batch holds it; the other rank stops
    too (not waiting for the collective timeout), with one line naming the failed rank and the cut."""
    work = tmp_path / "golden"
    work.mkdir()
    (work / "models").symlink_to(sl / "models")
    shutil.copytree(sl / "data", work / "data")
    broken = work / "data/fbank/librispeech_feats_test-other/108/1089-134958-0006.npy"
    broken.write_bytes(b"not a numpy file")
    exp = new_exp(sl, tmp_path / "exp")
    t0 = time.time()
    p = subprocess.run(command(2) + decode_argv(exp, 300) + ["--dist-timeout-min", "5"], cwd=work, env=clean_env(),
                       capture_output=True, text=True, timeout=500)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and time.time() - t0 < 240, out[-4000:]
    failed = re.findall(r"decode.py: error: rank (\d) of 2 failed decoding librispeech_test_other \(this rank (\d) "
                        r"stops too\): UserError: cannot load features of cut 1089-134958-0006 from ", out)
    assert len(failed) == 1 and failed[0][0] != failed[0][1], out[-4000:]
    # (the failed rank's own line)
    assert "decode.py: error: cannot load features of cut 1089-134958-0006 from" in out, out[-4000:]
    assert not list(decode_dir(exp).glob("recogs-*other*"))  # test-clean was written, test-other not
    assert list(decode_dir(exp).glob("recogs-*clean*"))


def test_torn_and_stale_partial_lines(tmp_path):
    shard = DecodeShard()
    p = PartialResults(tmp_path, "set", "fp1", shard)
    assert p.load() == set()
    p.open()
    p.add("a", "ref a", "hyp a")
    p.add("b", "ref b", "hyp b")
    p.commit([("c", "non-finite features")])
    p.close()
    with open(p.path, "a") as f:
        f.write('{"id": "d", "ref": "r')  # killed mid-write
    again = PartialResults(tmp_path, "set", "fp1", shard)
    assert again.load() == {"a", "b", "c"}
    assert again.results == {"a": ("ref a", "hyp a"), "b": ("ref b", "hyp b")}
    assert again.dropped == {"c": "non-finite features"}
    again.open()  # cuts the torn line off before appending
    again.add("d", "ref d", "hyp d")
    again.commit()
    # ("b" decoded again, as when its batch had lost a cut: the new result counts, once)
    merged, dropped = again.gather([("d", "ref d", "hyp d"), ("b", "ref b", "hyp b2")], [])
    assert sorted(merged) == [("a", "ref a", "hyp a"), ("b", "ref b", "hyp b2"), ("d", "ref d", "hyp d")]
    assert dropped == [("c", "non-finite features")]
    lines = p.path.read_text().split("\n")
    assert len(lines) == 6 and lines[-1] == "" and json.loads(lines[4])["id"] == "d"
    # another checkpoint/options (fingerprint): nothing is reused, the file is removed
    stale = PartialResults(tmp_path, "set", "fp2", shard)
    assert stale.load() == set() and not p.path.exists()
    # --resume false: removed as well
    PartialResults(tmp_path, "set", "fp2", shard).open()
    assert PartialResults(tmp_path, "set", "fp2", DecodeShard(resume=False)).load() == set()
    assert list((tmp_path / ".partial").iterdir()) == []


def test_duration_balancing():
    durations = [7.0, 1.5, 3.25, 9.0, 2.0, 2.0, 4.5, 0.5, 6.0, 3.0, 5.5]
    items = [(f"c{i:02d}", d) for i, d in enumerate(durations)]
    for n in (1, 2, 3, 4):
        shares = balance_by_duration(items, n)
        assert sorted(sum(shares, [])) == [i for i, _ in items]
        for share in shares:  # each share keeps the order of the items
            assert share == sorted(share)
        totals = [sum(d for i, d in items if i in share) for share in shares]
        assert max(totals) - min(totals) <= max(durations), (n, totals)
        assert balance_by_duration(list(reversed(items)), n) == [share[::-1] for share in shares]
    # longest first into the least-loaded rank: 9 | 7 | 6, then 5.5 -> rank 2 (6), 4.5 -> rank 1 (7),
    # 3.25 -> rank 0 (9), 3.0 -> rank 1 (11.5, tied with rank 2), 2.0 (c04) -> rank 2, 2.0 (c05) -> rank 0 ...
    assert balance_by_duration(items, 3) == [["c02", "c03", "c05", "c07"], ["c00", "c06", "c09"],
                                             ["c01", "c04", "c08", "c10"]]
    assert [sum(d for i, d in items if i in s) for s in balance_by_duration(items, 3)] == [14.75, 14.5, 15.0]
    assert balance_by_duration(items[:1], 3) == [["c00"], [], []]  # ranks without a share are fine


def test_shard_batches_and_cuts(sl):
    from lhotse import CutSet

    cuts = CutSet.from_file(sl / "data/fbank/librispeech_cuts_test-clean.jsonl.gz")
    batches = [cuts.subset(cut_ids=[c.id for c in list(cuts)[i:i + 3]]) for i in range(0, 10, 3)]  # 3, 3, 3, 1
    per_rank = [shard_batches(batches, r, 3) for r in range(3)]
    assert sorted(id(b) for share in per_rank for b in share) == sorted(id(b) for b in batches)
    assert shard_batches(batches[:1], 2, 3) == []
    seconds = [sum(c.duration for b in share for c in b) for share in per_rank]
    assert max(seconds) - min(seconds) <= max(sum(c.duration for c in b) for b in batches)
    shares = [[c.id for c in shard_cuts(cuts, r, 2)] for r in (0, 1)]
    assert sorted(shares[0] + shares[1]) == sorted(c.id for c in cuts) and len(shares[0]) == 5
    assert shares[0] == [c.id for c in cuts if c.id in set(shares[0])]  # the manifest's order
    assert shard_cuts(cuts, 0, 1) is cuts


def test_fingerprint_follows_the_weights_and_options(tmp_path):
    from llmasr.recipes.decode import _fingerprint_base, get_decode_parser

    (tmp_path / "epoch-3.pt").write_bytes(b"weights")
    parse = get_decode_parser().parse_args

    def fp(*flags):
        return _fingerprint_base(parse(["--exp-dir", str(tmp_path), "--epoch", "3", *flags]), None)

    base = fp()
    assert fp("--num-workers", "4", "--max-duration", "50", "--resume", "false") == base
    assert fp("--beam-size", "4") != base
    assert fp("--compat-reference-padding", "true", "--max-duration", "50") != \
        fp("--compat-reference-padding", "true")
    st = (tmp_path / "epoch-3.pt").stat()
    os.utime(tmp_path / "epoch-3.pt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # retrained
    assert fp() != base
