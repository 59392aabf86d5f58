"""Scaling out: two "nodes" (two torchrun launchers, c10d rendezvous on 127.0.0.1, gloo, one process
each) train, agree on the weights, only global rank 0 writes checkpoints, and a --start-batch resume of
both is bit-identical to the uninterrupted run; lhotse Shar export (local/export_shar.py) and training
from Shar shards (each rank reads its own; same batches as the manifest when the shards are read in order).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_resume import COMMON, assert_same_run, data_module, epoch_batches
from tests.test_training import base_argv, env, load  # noqa: F401
from tests.test_training_dist import free_port, rank_logs

REPO = Path(__file__).resolve().parents[1]
SYNC = re.compile(r"trainable parameters identical on all 2 ranks \(sha1 (\w+)\)")


def export_shar(manifest: Path, out: Path, *flags: str) -> Path:
    p = subprocess.run([sys.executable, "local/export_shar.py", str(manifest), str(out), *flags], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def shar(env, tmp_path_factory):
    """The 24 training cuts in 5 shards (5, 5, 5, 5, 4 cuts) and the 4 dev cuts in 2, float32 features kept."""
    root = tmp_path_factory.mktemp("shar")
    return {part: export_shar(env["manifests"] / f"librispeech_cuts_{part}.jsonl.gz", root / part,
                              "--shard-size", size, "--features", "numpy")
            for part, size in (("train", "5"), ("dev", "2"))}


def cut_id_batches(dm, spec, epoch=0, rank=0, world_size=1):
    loader = dm.train_dataloader(dm.train_cuts(spec), world_size=world_size, rank=rank)
    loader.sampler.set_epoch(epoch)
    return [b["cut_ids"] for b in loader]


def test_shar_export_trains_on_the_manifest_batches(env, shar):
    from llmasr.config import UserError

    assert sorted(f.name for f in shar["train"].iterdir())[:2] == ["cuts.000000.jsonl.gz", "cuts.000001.jsonl.gz"]
    assert len(list(shar["train"].glob("features.*.tar"))) == 5
    # "Same batches": with the shards read in order (--shuffle-shards false) one process gets the cut-id
    # batches of the manifest, in the same order, for the same --seed (bucket shuffling on), epoch
    # after epoch, and the same features and SpecAugment (numpy export: float32 kept).
    in_order = data_module(env, "--num-workers", "0", "--shuffle-shards", "false")
    manifest = data_module(env, "--num-workers", "0")
    for epoch in (0, 1):
        want = cut_id_batches(manifest, "train", epoch)
        assert len(want) == 17
        assert cut_id_batches(in_order, str(shar["train"]), epoch) == want
    ref = epoch_batches(manifest.train_dataloader(manifest.train_cuts("train"), world_size=1, rank=0))
    got = epoch_batches(in_order.train_dataloader(in_order.train_cuts(str(shar["train"])), world_size=1, rank=0))
    assert all(torch.equal(a["features"], b["features"]) for a, b in zip(ref, got, strict=True))
    # The mux of several corpora is the manifests' too (train:0.7 + dev:0.3).
    assert cut_id_batches(in_order, f"{shar['train']}:0.7,{shar['dev']}:0.3") == \
        cut_id_batches(manifest, "train:0.7,dev:0.3")

    # Shuffled shards (the default): another cut order per epoch; two ranks read disjoint shards
    # (3 and 2 of 5) that cover every cut once.
    shuffled = data_module(env, "--num-workers", "0")
    e0, e1 = cut_id_batches(shuffled, str(shar["train"]), 0), cut_id_batches(shuffled, str(shar["train"]), 1)
    assert e0 != e1 and sorted(sum(e0, [])) == sorted(sum(e1, [])) == sorted(sum(want, []))
    ranks = [sum(cut_id_batches(shuffled, str(shar["train"]), 0, r, 2), []) for r in (0, 1)]
    assert sorted(len(r) for r in ranks) == [9, 15] and sorted(ranks[0] + ranks[1]) == sorted(sum(want, []))

    with pytest.raises(UserError, match="mixes Shar data and cut manifests"):
        shuffled.train_cuts(f"{shar['train']}:0.7,dev:0.3")
    with pytest.raises(UserError, match="2 shards for 3 ranks"):
        cut_id_batches(shuffled, str(shar["dev"]), 0, 0, 3)


def test_shar_loader_resumes_mid_epoch_with_workers(env, shar):
    """ResumableSampler over Shar shards: the state after 5 batches (workers prefetching) resumes into the
    rest of the epoch of rank 1 of 2, shuffled shards, epoch 1."""
    def loader(dm, state=None):
        out = dm.train_dataloader(dm.train_cuts(str(shar["train"])), sampler_state_dict=state, world_size=2, rank=1)
        if state is None:
            out.sampler.set_epoch(1)
        return out

    ref = epoch_batches(loader(data_module(env, "--num-workers", "0")))
    assert len(ref) > 5
    dm = data_module(env, "--num-workers", "2")
    first = loader(dm)
    head = epoch_batches(first, 5)
    state = first.sampler.state_dict()
    assert state["world_size"] == 2 and state["epoch"] == 1 and state["batches"] == 5
    rest = epoch_batches(loader(dm, state))
    for got, want in zip(head + rest, ref, strict=True):
        assert got["cut_ids"] == want["cut_ids"] and torch.equal(got["features"], want["features"])


def launch_two_nodes(argv_per_node, timeout=800):
    """Two torchrun launchers on this host as two nodes of one process each (c10d rendezvous, gloo)."""
    port, run_id = free_port(), f"job{os.getpid()}"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--node-rank", str(node), "--rdzv-backend", "c10d",
                               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id, "src/train.py", *argv],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node, argv in enumerate(argv_per_node)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-6000:]


def state_sha1(state: dict) -> str:
    h = hashlib.sha1()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].numpy().tobytes())
    return h.hexdigest()


@pytest.mark.timeout(900)
def test_two_nodes_train_agree_and_resume_exactly(env, shar, tmp_path):
    t0 = time.time()
    opts = dict(COMMON, save_every_n=2, train_cuts=str(shar["train"]), dev_cuts="dev")
    # Node-local experiment directories: only the node of global rank 0 (c10d assigns the ranks at the
    # rendezvous, whatever --node-rank says) gets checkpoints.
    local = [tmp_path / "node0", tmp_path / "node1"]
    launch_two_nodes([base_argv(env, d, **opts) for d in local])
    logs = {d: rank_logs(d) for d in local}
    (writer,) = [d for d in local if "0" in logs[d]]
    (other,) = [d for d in local if d != writer]
    assert list(logs[other]) == ["1"]
    assert [f.name for f in other.rglob("*") if f.is_file() and "log-train" not in f.name] == []
    shas = [SYNC.findall(text) for d in local for text in logs[d].values()]
    assert len(shas[0]) == 2 and shas[0] == shas[1], shas  # the replicas agreed after each epoch
    assert all("is not shared by all ranks" in text for d in local for text in logs[d].values())
    ref = load(writer / "epoch-2.pt")
    # 5 shards split 3/2 per epoch: each epoch ends with the rank of 9 cuts (5-6 batches of <= 8 s).
    assert 8 <= ref["batch_idx_train"] <= 12, ref["batch_idx_train"]

    # Kill-and-resume, both nodes restarted with --start-batch N on a shared --exp-dir holding
    # checkpoint-N.pt, N in the middle of epoch 2 (the shard order of epoch 2, re-read up to the position).
    mid = [ck for ck in sorted(writer.glob("checkpoint-*.pt"))
           if load(ck)["cur_epoch"] == 2 and load(ck)["batch_idx_train"] < ref["batch_idx_train"]]
    assert mid, sorted(f.name for f in writer.iterdir())
    n = load(mid[0])["batch_idx_train"]
    shared = tmp_path / "shared"
    shared.mkdir()
    shutil.copy(mid[0], shared / mid[0].name)
    launch_two_nodes([base_argv(env, shared, start_batch=n, **opts)] * 2)
    got = load(shared / "epoch-2.pt")
    assert_same_run(ref, got, f"two nodes resumed at --start-batch {n}")
    assert state_sha1(got["model"]) == state_sha1(ref["model"])
    assert not any("is not shared" in t for t in rank_logs(shared).values())
    print(f"two-node test: {time.time() - t0:.0f} s (batches {ref['batch_idx_train']}, resumed at {n}, "
          f"weights sha1 {state_sha1(ref['model'])[:12]})", file=sys.stderr)
