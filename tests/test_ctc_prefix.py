"""CTC prefix scores for joint CTC / LLM decoding (llmasr.ctc_prefix) against an exhaustive sum
over every CTC path (tiny vocabulary, few frames) and against torch's own CTC loss."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from llmasr.aux_ctc import embedding_logits
from llmasr.ctc_prefix import CtcPrefixScorer

V, H, T, BLANK, EOS = 5, 6, 5, 0, 4
TEMPERATURE = {"cosine": 0.5, "distance": 4.0, "dot": 2.0}


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(V, H, generator=g)
    frames = torch.randn(2, T, H, generator=g) * 3
    lens = torch.tensor([T, 3])  # the second row is padded: its frames 3 and 4 must not count
    return emb, frames, lens


def _enumerate(logp, n_frames, prefix, whole):
    """log of the total probability of the paths whose collapsed labels start with (or, ``whole``,
    equal) ``prefix``."""
    total = 0.0
    for path in itertools.product(range(V), repeat=n_frames):
        labels, prev = [], None
        for p in path:
            if p != BLANK and p != prev:
                labels.append(p)
            prev = p
        if labels == prefix if whole else labels[:len(prefix)] == prefix:
            total += math.exp(sum(logp[t, p].item() for t, p in enumerate(path)))
    return math.log(total) if total > 0 else float("-inf")


def _feed(scorer, rows, tokens_per_step):
    """Drive the scorer as a search would: each step every row's token made a candidate; returns
    the per-row sums of the scores of the tokens taken."""
    ids = torch.zeros(rows, 0, dtype=torch.long)
    acc = torch.zeros(rows, dtype=torch.float64)
    sums = []
    for step in tokens_per_step:
        scores = torch.zeros(rows, V)
        scores[torch.arange(rows), torch.tensor(step)] = 5.0
        out = scorer(ids, scores)
        acc = acc + out[torch.arange(rows), torch.tensor(step)].double()
        sums.append(acc.clone())
        ids = torch.cat([ids, torch.tensor(step)[:, None]], 1)
    return sums


@pytest.mark.parametrize("mode", ["cosine", "distance", "dot"])
@pytest.mark.parametrize("labels", [[1, 2], [2, 2], [3], [1, 1, 3], [3, 2, 1, 2]])
def test_prefix_scores_equal_the_sum_over_paths(mode, labels):
    emb, frames, lens = _setup()
    logp = torch.log_softmax(embedding_logits(frames, emb, mode, TEMPERATURE[mode]).double(), -1)
    scorer = CtcPrefixScorer(frames, lens, emb, BLANK, EOS, mode, weight=1.0, num_candidates=V,
                             temperature=TEMPERATURE[mode])
    sums = _feed(scorer, 2, [[c, c] for c in labels + [EOS]])
    for b in range(2):
        n = int(lens[b])
        for i in range(len(labels)):  # the prefix scores
            want = _enumerate(logp[b], n, labels[:i + 1], whole=False)
            got = sums[i][b].item()
            assert (got < -1e3 and want == float("-inf")) or got == pytest.approx(want, abs=1e-4), (b, i)
        # the end token: the whole transcript, also by torch's CTC
        want = _enumerate(logp[b], n, labels, whole=True)
        got = sums[-1][b].item()
        if want == float("-inf"):  # too many labels for the frames (a repeat needs a blank between)
            assert got < -1e3
            continue
        assert got == pytest.approx(want, abs=1e-4)
        torch_ctc = -F.ctc_loss(logp[b, :n, None].float(), torch.tensor([labels]), torch.tensor([n]),
                                torch.tensor([len(labels)]), blank=BLANK, reduction="sum").item()
        assert got == pytest.approx(torch_ctc, abs=1e-3)


def test_rows_reordered_between_steps_keep_their_own_prefix():
    """Beam search reorders rows; each row's state must follow its token prefix, not its index."""
    emb, frames, lens = _setup(seed=1)
    frames = frames[:1]
    lens = lens[:1]
    logp = torch.log_softmax(embedding_logits(frames, emb, "cosine", 0.5).double(), -1)[0]
    scorer = CtcPrefixScorer(frames, lens, emb, BLANK, EOS, "cosine", weight=1.0, num_beams=2,
                             num_candidates=V, temperature=0.5)
    ids = torch.zeros(2, 0, dtype=torch.long)
    first = scorer(ids, torch.zeros(2, V))
    step1 = first[:, [1, 2]].diagonal().double()  # row 0 takes 1, row 1 takes 2
    swapped = torch.tensor([[2], [1]])  # the search swapped them
    second = scorer(swapped, torch.zeros(2, V))
    total_21 = step1[1] + second[0, 3].double()  # prefix [2, 3]
    total_13 = step1[0] + second[1, 3].double()  # prefix [1, 3]
    assert total_21.item() == pytest.approx(_enumerate(logp, T, [2, 3], whole=False), abs=1e-4)
    assert total_13.item() == pytest.approx(_enumerate(logp, T, [1, 3], whole=False), abs=1e-4)
    # a row whose prefix the scorer never saw gets the LLM's scores unchanged
    llm = torch.randn(2, V)
    unknown = scorer(torch.tensor([[2, 4], [4, 1]]), llm)  # row 0 ended ([2] + end), row 1 never seen
    torch.testing.assert_close(unknown, torch.log_softmax(llm, -1))


def test_combination_and_candidates():
    emb, frames, lens = _setup()
    scorer = CtcPrefixScorer(frames, lens, emb, BLANK, EOS, "cosine", weight=0.25, num_candidates=3,
                             temperature=0.5)
    llm = torch.randn(2, V, generator=torch.Generator().manual_seed(0))
    llm[:, BLANK] = 3.0  # the LLM's favourite: never a candidate all the same
    out = scorer(torch.zeros(2, 0, dtype=torch.long), llm)
    logp = torch.log_softmax(llm, -1)
    for b in range(2):
        kept = torch.isfinite(out[b]).nonzero().flatten().tolist()
        others = logp[b].clone()
        others[[EOS, BLANK]] = float("-inf")
        assert sorted(kept) == sorted(others.topk(2).indices.tolist() + [EOS])  # the LLM's best 2 + the end
    ctc = CtcPrefixScorer(frames, lens, emb, BLANK, EOS, "cosine", weight=1.0, num_candidates=3, temperature=0.5)(
        torch.zeros(2, 0, dtype=torch.long), llm)
    finite = torch.isfinite(out)
    torch.testing.assert_close(out[finite], (0.75 * logp + 0.25 * ctc)[finite])
    with pytest.raises(ValueError, match="weight"):
        CtcPrefixScorer(frames, lens, emb, BLANK, EOS, "cosine", weight=1.5)
    with pytest.raises(ValueError, match="num_candidates"):
        CtcPrefixScorer(frames, lens, emb, BLANK, EOS, "cosine", num_beams=4, num_candidates=5)
