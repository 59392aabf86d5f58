"""The projector-alignment CTC loss (llmasr.aux_ctc): logits, loss value, edge cases, warm-up."""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn as nn

from llmasr.aux_ctc import (
    AuxCtc,
    AuxCtcConfig,
    aux_ctc_loss,
    ctc_compress_frames,
    embedding_logits,
    greedy_ctc_ids,
    min_ctc_frames,
    resolve_blank_id,
)
from llmasr.projector import Projector
from llmasr.training.warmup import projector_warmup


def test_distance_logits_are_negative_squared_distances_up_to_a_per_frame_constant():
    g = torch.Generator().manual_seed(0)
    frames = torch.randn(2, 5, 8, generator=g)
    emb = torch.randn(11, 8, generator=g)
    logits = embedding_logits(frames, emb, "distance", temperature=2.0)
    ref = -torch.cdist(frames, emb.expand(2, 11, 8)) ** 2 / 2.0
    diff = logits - ref  # must not depend on the class
    assert torch.allclose(diff, diff[..., :1].expand_as(diff), atol=1e-4)
    # A frame equal to an embedding row scores that row highest.
    at_rows = embedding_logits(emb[[3, 7]].unsqueeze(0), emb, "distance")
    assert at_rows.argmax(-1).tolist() == [[3, 7]]


def test_cosine_and_dot_logits():
    frames = torch.tensor([[[3.0, 4.0]]])
    emb = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert torch.allclose(embedding_logits(frames, emb, "dot", 1.0), torch.tensor([[[3.0, 8.0]]]))
    assert torch.allclose(embedding_logits(frames, emb, "cosine", 0.5), torch.tensor([[[1.2, 1.6]]]))
    with pytest.raises(ValueError, match="mode"):
        embedding_logits(frames, emb, "euclid")


def test_loss_matches_hand_computed_ctc_probability():
    # Vocabulary {0: blank, 1, 2}; 2 frames, target [1]. Paths: (1,1), (b,1), (1,b).
    emb = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    frames = torch.tensor([[[0.9, 0.1], [0.2, -0.3]]], requires_grad=True)
    loss, stats = aux_ctc_loss(frames, torch.tensor([2]), [[1]], emb, blank_id=0)
    d2 = ((frames.detach()[0, :, None, :] - emb[None]) ** 2).sum(-1)  # (2 frames, 3 classes)
    p = torch.softmax(-d2, -1)
    prob = p[0, 1] * p[1, 1] + p[0, 0] * p[1, 1] + p[0, 1] * p[1, 0]
    assert loss.item() == pytest.approx(-math.log(prob.item()), rel=1e-5)
    frame_norm = (math.hypot(0.9, 0.1) + math.hypot(0.2, -0.3)) / 2
    assert stats == {"aux_ctc_loss_sum": pytest.approx(loss.item()), "aux_ctc_tokens": 1, "aux_ctc_infeasible": 0,
                     "aux_ctc_frame_norm": pytest.approx(frame_norm, rel=1e-6),
                     "aux_ctc_embedding_norm": pytest.approx(2 / 3, rel=1e-6)}
    # Gradient reaches the frames, never the embedding.
    emb_param = nn.Parameter(emb.clone())
    loss2, _ = aux_ctc_loss(frames, torch.tensor([2]), [[1]], emb_param, blank_id=0)
    loss2.backward()
    assert frames.grad is not None and frames.grad.abs().sum() > 0
    assert emb_param.grad is None


def test_loss_is_per_target_token_and_infeasible_utterances_are_counted_not_hidden():
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(6, 4, generator=g)
    frames = torch.randn(2, 4, 4, generator=g)
    one, s1 = aux_ctc_loss(frames[:1], torch.tensor([4]), [[1, 2, 3]], emb, blank_id=0)
    # second utterance: [4, 4, 5] needs 4 frames (a blank between the repeats) but has 3
    assert min_ctc_frames([[4, 4, 5]]).tolist() == [4]
    both, s2 = aux_ctc_loss(frames, torch.tensor([4, 3]), [[1, 2, 3], [4, 4, 5]], emb, blank_id=0)
    assert s2["aux_ctc_infeasible"] == 1 and s2["aux_ctc_tokens"] == 3
    assert both.item() == pytest.approx(one.item(), rel=1e-5)
    assert torch.isfinite(both)
    # per-token normalisation: two copies of an utterance give the same loss as one
    two, s3 = aux_ctc_loss(frames[[0, 0]], torch.tensor([4, 4]), [[1, 2, 3]] * 2, emb, blank_id=0)
    assert two.item() == pytest.approx(one.item(), rel=1e-5) and s3["aux_ctc_tokens"] == 6


def test_bad_targets_are_named():
    emb = torch.randn(5, 3)
    frames = torch.randn(1, 4, 3)
    with pytest.raises(ValueError, match="cut-7.*blank"):
        aux_ctc_loss(frames, torch.tensor([4]), [[1, 0]], emb, blank_id=0, cut_ids=["cut-7"])
    with pytest.raises(ValueError, match="cut-7.*empty"):
        aux_ctc_loss(frames, torch.tensor([4]), [[]], emb, blank_id=0, cut_ids=["cut-7"])
    with pytest.raises(ValueError, match="outside"):
        aux_ctc_loss(frames, torch.tensor([4]), [[9]], emb, blank_id=0)


# ------------------------------------------------------------------------------- warm-up


class WordTokenizer:
    """Whitespace tokenizer over a fixed word list; id 0 is the pad/blank token."""

    def __init__(self, words):
        self.vocab = {"<|endoftext|>": 0, **{w: i + 1 for i, w in enumerate(words)}}
        self.inv = {i: w for w, i in self.vocab.items()}

    def get_vocab(self):
        return dict(self.vocab)

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[self.vocab[w] for w in t.split()] for t in texts]}

    def batch_decode(self, ids):
        return [" ".join(self.inv[i] for i in row) for row in ids]


class ToyModel(nn.Module):
    """SpeechLLM-shaped: identity encoder (frozen), a Projector, an LLM embedding."""

    def __init__(self, feat_dim, emb):
        super().__init__()
        self.encoder_projector = Projector(feat_dim, emb.shape[1], downsample_rate=2, activation="gelu", dropout=0.0)
        self.embedding = nn.Embedding.from_pretrained(emb, freeze=True)

    @property
    def projectors(self):
        return [self.encoder_projector]

    def encode(self, features, feature_lens, cut_ids=None):
        return [self.encoder_projector(features, feature_lens)]


def _toy_batches(words, protos, n_batches, seed):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        texts, feats = [], []
        for _ in range(4):
            ws = [rng.choice(words) for _ in range(rng.randint(2, 5))]
            frames = []
            for w in ws:
                frames += [protos[w]] * rng.randint(4, 6) + [torch.zeros_like(protos[w])] * 2
            x = torch.stack(frames) + 0.1 * torch.randn(len(frames), protos[w].shape[0], generator=g)
            texts.append(" ".join(ws))
            feats.append(x)
        lens = torch.tensor([f.shape[0] for f in feats])
        padded = nn.utils.rnn.pad_sequence(feats, batch_first=True)
        out.append({"features": padded, "feature_lens": lens, "texts": texts})
    return out


@pytest.fixture
def one_thread():
    # Tiny matrices: extra OpenMP threads only add synchronisation (several times slower on a
    # busy machine).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_projector_warmup_learns_to_spell_the_transcript_in_llm_tokens(one_thread):
    torch.manual_seed(0)
    words = ["one", "two", "three", "four", "five", "six"]
    tok = WordTokenizer(words)
    emb = torch.randn(len(words) + 1, 16)
    protos = {w: torch.randn(12) for w in words}
    model = ToyModel(12, emb)
    cfg = AuxCtcConfig(weight=1.0, warmup_steps=150, warmup_lr=3e-3)
    aux = AuxCtc(cfg, tok, model.embedding, prompt_format="speechllm")
    assert aux.blank_id == 0 == resolve_blank_id(tok, "pad", "speechllm")

    test = _toy_batches(words, protos, 2, seed=99)

    def eval_loss():
        with torch.no_grad():
            return sum(aux(model.encode(b["features"], b["feature_lens"]), b["texts"])[0].item() for b in test) / 2

    before = eval_loss()
    logged = []
    out = projector_warmup(model, _toy_batches(words, protos, 30, seed=1), aux, num_steps=150, lr=3e-3,
                           log_interval=50, on_log=lambda s, l, t: logged.append(s))
    after = eval_loss()
    assert out["steps"] == 150 and logged == [50, 100, 150]
    assert after < 0.1 * before
    hyps, refs = [], []
    for b in test:
        frames, lens = model.encode(b["features"], b["feature_lens"])[0]
        hyps += aux.greedy(frames, lens)
        refs += b["texts"]
    assert sum(h == r for h, r in zip(hyps, refs)) >= len(refs) - 1
    # The embedding was not trained.
    assert torch.equal(model.embedding.weight, emb)


def test_cosine_warmup_schedule_ends_with_vanishing_steps(one_thread):
    """--projector-warmup-lr-schedule cosine: the learning rate falls from lr to 0 over the steps, so
    the last updates are tiny; with the constant schedule they are as large as the first."""
    words = ["one", "two", "three", "four", "five", "six"]
    tok = WordTokenizer(words)
    protos = {w: torch.randn(12, generator=torch.Generator().manual_seed(i)) for i, w in enumerate(words)}

    def step_sizes(schedule):
        torch.manual_seed(0)
        model = ToyModel(12, torch.randn(len(words) + 1, 16))
        aux = AuxCtc(AuxCtcConfig(weight=1.0), tok, model.embedding, prompt_format="speechllm")
        weights = [p for p in model.parameters() if p.requires_grad and p is not model.embedding.weight]
        last = [torch.cat([w.detach().flatten() for w in weights])]
        sizes = []

        def on_log(step, loss, elapsed):
            now = torch.cat([w.detach().flatten() for w in weights])
            sizes.append(float((now - last[0]).norm()))
            last[0] = now

        projector_warmup(model, _toy_batches(words, protos, 40, seed=1), aux, num_steps=40, lr=3e-3,
                         lr_schedule=schedule, log_interval=1, on_log=on_log)
        return sizes

    const, cosine = step_sizes("constant"), step_sizes("cosine")
    assert len(const) == len(cosine) == 40
    assert const[-1] > 0.3 * const[0]
    assert cosine[-1] < 0.02 * cosine[0] and cosine[20] > 0.3 * cosine[0]
    with pytest.raises(ValueError, match="lr schedule"):
        projector_warmup(ToyModel(12, torch.randn(len(words) + 1, 16)), [], None, 1, lr_schedule="linear")


def test_greedy_ctc_merges_repeats_and_drops_blanks():
    emb = torch.eye(4)
    # frames nearest to rows: 1 1 0 1 2 2 0(pad beyond length)
    seq = torch.stack([emb[i] for i in [1, 1, 0, 1, 2, 2, 3]]).unsqueeze(0)
    assert greedy_ctc_ids(seq, torch.tensor([6]), emb, blank_id=0) == [[1, 1, 2]]


def test_sampled_softmax_covering_the_vocabulary_equals_the_full_loss_and_subsets_differ():
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(40, 8, generator=g)
    frames = torch.randn(2, 9, 8, generator=g)
    lens = torch.tensor([9, 7])
    targets = [[5, 17, 17, 3], [30, 2]]
    full, s_full = aux_ctc_loss(frames, lens, targets, emb, blank_id=1)
    covered, s_cov = aux_ctc_loss(frames, lens, targets, emb, blank_id=1, num_negatives=1000)
    assert covered.item() == pytest.approx(full.item(), rel=1e-5)
    assert s_cov["aux_ctc_tokens"] == s_full["aux_ctc_tokens"] == 6
    # Fewer classes in the softmax: every class keeps its logit, so the loss can only drop.
    few, _ = aux_ctc_loss(frames, lens, targets, emb, blank_id=1, num_negatives=3,
                          generator=torch.Generator().manual_seed(0))
    assert few.item() < full.item()


def test_recipe_hook_skips_the_warmup_when_off_or_resuming():
    from argparse import ArgumentParser

    from llmasr.aux_ctc import add_aux_ctc_arguments
    from llmasr.training.warmup import maybe_projector_warmup

    parser = ArgumentParser()
    add_aux_ctc_arguments(parser)
    off = parser.parse_args([])
    assert AuxCtcConfig.from_args(off) == AuxCtcConfig() and not AuxCtcConfig.from_args(off).needed
    assert maybe_projector_warmup(off, None, [], torch.device("cpu")) is None
    on = parser.parse_args(["--projector-warmup-steps", "5", "--aux-ctc-negatives", "64"])
    assert AuxCtcConfig.from_args(on).num_negatives == 64
    on.start_epoch, on.start_batch = 3, 0  # resuming: the projector is already trained
    assert maybe_projector_warmup(on, None, [], torch.device("cpu")) is None
    with pytest.raises(ValueError, match="aux-ctc-mode"):
        AuxCtcConfig(mode="l1")


def test_aux_targets_are_the_transcript_as_the_llm_is_trained_on_it():
    # The speechllm format trains the LLM on lower-cased text; the alignment must use the same
    # tokens (LibriSpeech transcripts are upper case: "ONE" is not a token of this vocabulary).
    tok = WordTokenizer(["one", "two"])
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(3, 4, generator=g)
    frames = torch.randn(1, 5, 4, generator=g)
    lens = torch.tensor([5])
    aux = AuxCtc(AuxCtcConfig(weight=1.0), tok, nn.Embedding.from_pretrained(emb), prompt_format="speechllm")
    upper, _ = aux([(frames, lens)], ["ONE TWO"])
    expected, _ = aux_ctc_loss(frames, lens, [[1, 2]], emb, blank_id=0)
    assert upper.item() == pytest.approx(expected.item(), rel=1e-6)


def test_norm_penalty_pulls_frames_to_the_embedding_scale():
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(6, 8, generator=g)
    r = emb.norm(dim=-1).mean()
    direction = torch.nn.functional.normalize(torch.randn(1, 4, 8, generator=g), dim=-1)
    lens = torch.tensor([3])  # the 4th frame is padding: not in the penalty
    targets = [[1, 2]]
    base, _ = aux_ctc_loss(direction * r, lens, targets, emb, blank_id=0, mode="cosine")
    for scale in (0.5, 1.0, 4.0):
        frames = direction * r * scale
        frames[0, 3] *= 100.0
        plain, s = aux_ctc_loss(frames, lens, targets, emb, blank_id=0, mode="cosine")
        pen, _ = aux_ctc_loss(frames, lens, targets, emb, blank_id=0, mode="cosine", norm_weight=2.0)
        assert plain.item() == pytest.approx(base.item(), rel=1e-5)  # cosine: scale-free
        assert pen.item() - plain.item() == pytest.approx(2.0 * math.log(scale) ** 2, abs=1e-5)
        assert s["aux_ctc_frame_norm"] == pytest.approx(float(r) * scale, rel=1e-5)
        assert s["aux_ctc_embedding_norm"] == pytest.approx(float(r), rel=1e-6)


def test_ctc_compression_drops_blanks_averages_runs_and_keeps_a_frame_of_silence():
    # dot logits against the identity: a frame's best class is its largest coordinate; 0 is blank
    emb = torch.eye(5)
    spoken = [[0, 1, 1, 0, 2, 2, 2, 3], [0, 0, 0, 0, 0, 4, 4, 4], [4, 4, 0, 4, 1, 1, 1, 1]]
    frames = torch.stack([torch.stack([2 * emb[i] for i in row]) for row in spoken])
    frames[0, 2, 1] = 4.0  # the second frame of the "1" run: the mean of the run is (0, 3, 0, 0, 0)
    frames[1, 3, 2] = 1.0  # all five valid frames say blank; frame 3 is the least blank
    lens = torch.tensor([8, 5, 4])
    frames.requires_grad_(True)
    out, out_lens = ctc_compress_frames(frames, lens, emb, blank_id=0, mode="dot")
    assert out_lens.tolist() == [3, 1, 2]
    assert out.shape == (3, 3, 5)
    assert torch.equal(out[0], torch.tensor([[0, 3.0, 0, 0, 0], [0, 0, 2.0, 0, 0], [0, 0, 0, 2.0, 0]]))
    assert torch.equal(out[1, 0], frames[1, 3].detach())  # silence: the least-blank frame, not frame 0
    assert torch.equal(out[2, :2], torch.tensor([[0, 0, 0, 0, 2.0], [0, 0, 0, 0, 2.0]]))  # 4 4 | 4: two runs
    assert not out[1, 1:].any() and not out[2, 2:].any()  # zero padding
    # beyond the lengths (row 1's "4 4 4", row 2's "1 1 1 1") nothing is read
    out.sum().backward()
    assert torch.allclose(frames.grad[0, :, 0], torch.tensor([0, 0.5, 0.5, 0, 1 / 3, 1 / 3, 1 / 3, 1.0]))
    assert frames.grad[1, 5:].abs().sum() == 0 and frames.grad[2, 4:].abs().sum() == 0


def test_ctc_compression_in_chunks_equals_in_one_go_and_follows_the_mode():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(40, 8, generator=g)
    frames = torch.randn(3, 17, 8, generator=g)
    lens = torch.tensor([17, 9, 4])
    whole = ctc_compress_frames(frames, lens, emb, 0, "cosine", chunk_frames=10_000)
    chunked = ctc_compress_frames(frames, lens, emb, 0, "cosine", chunk_frames=5)
    assert torch.equal(whole[1], chunked[1]) and torch.allclose(whole[0], chunked[0])
    # one compressed vector per run of one token of the frames' argmax in that mode (a blank between
    # two equal tokens makes two runs), counted here frame by frame
    for mode in ("cosine", "distance"):
        labels = embedding_logits(frames, emb, mode).argmax(-1).tolist()
        runs = []
        for row, n in zip(labels, lens.tolist()):
            runs.append(sum(1 for j in range(n) if row[j] != 0 and (j == 0 or row[j - 1] != row[j])))
        assert min(runs) > 0  # (no all-blank row: those keep one frame, tested above)
        _, out_lens = ctc_compress_frames(frames, lens, emb, 0, mode)
        assert out_lens.tolist() == runs
        assert [len(t) for t in greedy_ctc_ids(frames, lens, emb, 0, mode)] == runs



@pytest.mark.parametrize("flags, says", [
    (["--projector-warmup-steps", "5", "--aux-ctc-mode", "distance"], "--aux-ctc-mode is distance"),
    (["--aux-ctc-blank", "<|im_end|>"], "--aux-ctc-blank is '<|im_end|>'"),
])
def test_training_refuses_a_compression_that_reads_the_projector_unlike_its_alignment(flags, says, capsys, tmp_path):
    from llmasr.recipes.train import main

    with pytest.raises(SystemExit) as exc:
        main(argv=["--exp-dir", str(tmp_path), "--ctc-compress-frames", "cosine", *flags])
    assert exc.value.code == 2 and says in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before any work


@pytest.mark.parametrize("mode", ["distance", "cosine", "dot"])
def test_logits_and_loss_are_float32_under_a_bf16_training_autocast(mode):
    """The training step runs under autocast (bf16 on CPU); the aux CTC's vocabulary matmul must not
    (#29 finding 8): its logits equal the autocast-free ones, so training and decoding agree."""
    g = torch.Generator().manual_seed(4)
    frames = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    emb = torch.randn(50, 16, generator=g)
    lens, targets = torch.tensor([9, 7]), [[5, 17, 17, 3], [30, 2]]
    ref = embedding_logits(frames, emb, mode)
    ref_loss, _ = aux_ctc_loss(frames, lens, targets, emb, blank_id=1, mode=mode)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (frames @ emb.t()).dtype == torch.bfloat16  # the region really is autocast
        got = embedding_logits(frames, emb, mode)
        loss, _ = aux_ctc_loss(frames, lens, targets, emb, blank_id=1, mode=mode)
    assert got.dtype == torch.float32 and loss.dtype == torch.float32
    assert (got - ref).abs().max().item() <= 1e-5
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-5)
