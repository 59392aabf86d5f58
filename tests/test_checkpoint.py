"""Checkpoints: SpeechLLM key layout, averaging semantics, file selection, strict-but-partial loading."""
import os
import shutil
import time

import pytest
from tests.helpers import build_golden_speechllm
import torch

from llmasr.io import load_torch_file

from llmasr.checkpoint import (
    average_checkpoints,
    averaged_checkpoint,
    epoch_checkpoints,
    iter_checkpoints,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
    trainable_state_dict,
)



@pytest.fixture(scope="module")
def golden_model(sl):
    return build_golden_speechllm(sl)


def test_average_equals_hand_mean_and_shipped_file(sl):
    e1 = load_torch_file(sl / "exp/baseline/epoch-1.pt")["model"]
    e2 = load_torch_file(sl / "exp/baseline/epoch-2.pt")["model"]
    shipped = load_torch_file(sl / "exp/baseline/epoch-2-avg-2.pt")
    assert set(shipped) == {"model"}
    avg = average_checkpoints([sl / "exp/baseline/epoch-1.pt", sl / "exp/baseline/epoch-2.pt"])
    assert set(avg) == set(e1) == set(shipped["model"])
    for k in e1:
        hand = (e1[k].double() + e2[k].double()) / 2
        torch.testing.assert_close(avg[k].double(), hand, rtol=1e-6, atol=1e-7)
        assert torch.equal(avg[k], shipped["model"][k]), k  # bit-exact with the recipe's own file
        assert avg[k].dtype == e1[k].dtype


def test_average_shared_storage_and_integers(tmp_path):
    for i, (a, n) in enumerate([(1.0, 3), (3.0, 6), (8.0, 10)]):
        w = torch.full((2, 2), a)
        sd = {"w": w, "tied": w, "count": torch.tensor([n], dtype=torch.int64)}  # "tied" shares storage
        torch.save({"model": sd}, tmp_path / f"c{i}.pt")
    avg = average_checkpoints([tmp_path / f"c{i}.pt" for i in range(3)])
    assert torch.equal(avg["w"], torch.full((2, 2), 4.0))  # (1+3+8)/3, added once though stored twice
    assert torch.equal(avg["tied"], torch.full((2, 2), 4.0))
    assert avg["count"].tolist() == [19 // 3]


def test_save_checkpoint_matches_recipe_layout(golden_model, sl, tmp_path):
    ref = load_torch_file(sl / "exp/baseline/epoch-1.pt")
    path = tmp_path / "exp" / "epoch-1.pt"
    params = {"cur_epoch": 1, "batch_idx_train": 7, "exp_dir": tmp_path / "exp", "best_train_loss": 1.5}
    opt = torch.optim.SGD([p for p in golden_model.parameters() if p.requires_grad], lr=0.1)
    save_checkpoint(path, golden_model, params, optimizer=opt)
    assert [f for f in os.listdir(path.parent)] == ["epoch-1.pt"]  # no temporary left behind
    ckpt = load_checkpoint(path)
    # exactly the recipe's keys and shapes: trainable params + the tied lm_head quirk
    assert {k: tuple(v.shape) for k, v in ckpt["model"].items()} == {
        k: tuple(v.shape) for k, v in ref["model"].items()
    }
    assert "llm.base_model.model.lm_head.weight" in ckpt["model"]
    assert not any(k.startswith("encoder.") for k in ckpt["model"])
    assert ckpt["cur_epoch"] == 1 and ckpt["batch_idx_train"] == 7 and ckpt["exp_dir"] == tmp_path / "exp"
    assert ckpt["optimizer"] is not None and ckpt["scheduler"] is None and ckpt["sampler"] is None
    with pytest.raises(ValueError, match="clashes"):
        save_checkpoint(path, golden_model, {"model": 1})


def test_load_model_state_roundtrip_and_errors(golden_model, sl):
    sd = load_checkpoint(sl / "exp/baseline/epoch-2.pt")["model"]
    load_model_state(golden_model, sd)
    mine = trainable_state_dict(golden_model)
    for k, v in sd.items():
        assert torch.equal(mine[k], v), k

    with pytest.raises(RuntimeError, match=r"does not match the model: 1 unexpected: encoder_projector\.extra\.weight"):
        load_model_state(golden_model, {**sd, "encoder_projector.extra.weight": torch.zeros(1)})
    lora_free = {k: v for k, v in sd.items() if ".lora_" not in k}
    with pytest.raises(RuntimeError, match="no LoRA weights"):
        load_model_state(golden_model, lora_free)
    mose = {k.replace("encoder_projector.", "encoder_projector.0."): v for k, v in sd.items()}
    mose.update({k.replace("encoder_projector.", "encoder_projector.1."): v for k, v in sd.items()
                 if k.startswith("encoder_projector.")})
    with pytest.raises(RuntimeError, match="MoSE with 2 encoder projector"):
        load_model_state(golden_model, mose)
    bad = dict(sd)
    bad["encoder_projector.proj.1.weight"] = torch.zeros(64, 96)
    with pytest.raises(RuntimeError, match=r"shape mismatch.*proj\.1\.weight"):
        load_model_state(golden_model, bad)


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        load_checkpoint(tmp_path / "nothere.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(RuntimeError, match="corrupt.pt.*corrupt"):
        load_checkpoint(tmp_path / "corrupt.pt")
    torch.save({"optimizer": {}}, tmp_path / "nomodel.pt")
    with pytest.raises(RuntimeError, match="no 'model' entry"):
        load_checkpoint(tmp_path / "nomodel.pt")
    torch.save({"module.a": torch.zeros(1)}, tmp_path / "ddp.pt")
    assert list(load_checkpoint(tmp_path / "ddp.pt")["model"]) == ["a"]


def test_epoch_and_iter_selection(tmp_path, sl):
    for e in (1, 2):
        shutil.copy(sl / f"exp/baseline/epoch-{e}.pt", tmp_path / f"epoch-{e}.pt")
    assert [p.name for p in epoch_checkpoints(tmp_path, 2, 2)] == ["epoch-1.pt", "epoch-2.pt"]
    with pytest.raises(ValueError, match="epochs 0..2"):
        epoch_checkpoints(tmp_path, 2, 3)
    with pytest.raises(FileNotFoundError, match="epoch-3.pt"):
        epoch_checkpoints(tmp_path, 3, 2)
    for b in (100, 200, 300, 400):
        torch.save({"model": {"w": torch.tensor([float(b)])}}, tmp_path / f"checkpoint-{b}.pt")
    assert [p.name for p in iter_checkpoints(tmp_path, 350, 2)] == ["checkpoint-300.pt", "checkpoint-200.pt"]
    with pytest.raises(FileNotFoundError, match="only 1"):
        iter_checkpoints(tmp_path, 150, 2)
    sd = averaged_checkpoint(tmp_path, iteration=400, avg=3)
    assert sd["w"].item() == 300.0 and (tmp_path / "iter-400-avg-3.pt").is_file()

    # epoch averaging writes epoch-2-avg-2.pt, identical to the recipe's file
    sd = averaged_checkpoint(tmp_path, epoch=2, avg=2)
    out = tmp_path / "epoch-2-avg-2.pt"
    shipped = load_torch_file(sl / "exp/baseline/epoch-2-avg-2.pt")["model"]
    written = load_torch_file(out)
    assert set(written) == {"model"} and list(written["model"]) == list(shipped)
    assert all(torch.equal(written["model"][k], shipped[k]) and torch.equal(sd[k], shipped[k]) for k in shipped)
    # a different file planted under that name, newer than the inputs: never read, recomputed and replaced
    torch.save({"model": {k: v * 0 for k, v in sd.items()}}, out)
    os.utime(out, (time.time() + 3600,) * 2)
    again = averaged_checkpoint(tmp_path, epoch=2, avg=2)
    rewritten = load_torch_file(out)["model"]
    assert all(torch.equal(again[k], shipped[k]) and torch.equal(rewritten[k], shipped[k]) for k in shipped)


def test_decode_ignores_a_planted_averaged_checkpoint(sl, tmp_path, monkeypatch):
    """decode --epoch 2 --avg 2 with a stale/foreign epoch-2-avg-2.pt newer than its inputs: the
    recogs are still the reference recipe's (the true average was used) and the file is replaced."""
    import decode  # src/decode.py

    exp = tmp_path / "exp"
    exp.mkdir()
    for e in (1, 2):
        shutil.copy(sl / f"exp/baseline/epoch-{e}.pt", exp / f"epoch-{e}.pt")
    e1 = load_torch_file(exp / "epoch-1.pt")["model"]
    torch.save({"model": e1}, exp / "epoch-2-avg-2.pt")  # epoch 1 alone: decodes differently
    os.utime(exp / "epoch-2-avg-2.pt", (time.time() + 3600,) * 2)
    monkeypatch.chdir(sl)  # the manifests' feature paths are relative to the golden directory
    decode.main([
        "--exp-dir", str(exp), "--epoch", "2", "--avg", "2", "--max-duration", "300", "--num-workers", "0",
        "--llm-path", "models/llm", "--speech-encoder-type", "tiny_a",
        "--speech-encoder-path", "models/zipformer/tiny_a/pretrained.pt",
        "--speech-encoder-bpe-path", "models/zipformer/bpe.model", "--manifest-dir", "data/fbank",
        "--attn-implementation", "eager", "--normalize", "speechllm",
    ])
    want_dir = sl / "expected/baseline/recogs/epoch-2-avg-2-beam-1"
    wanted = sorted(want_dir.glob("recogs-*.txt"))
    assert len(wanted) == 2
    for want in wanted:
        assert (exp / "decode-epoch-2-avg-2-beam1" / want.name).read_text() == want.read_text(), want.name
    shipped = load_torch_file(sl / "exp/baseline/epoch-2-avg-2.pt")["model"]
    ours = load_torch_file(exp / "epoch-2-avg-2.pt")["model"]
    assert list(ours) == list(shipped) and all(torch.equal(ours[k], shipped[k]) for k in shipped)
