"""The data package's seams: the one sampler builder behind the train/valid/test loaders
(llmasr.data.samplers.make_sampler) and the RNG restore around a seeded training batch (llmasr.data.seeding)."""
from __future__ import annotations

import logging
import random
from unittest import mock

import numpy as np
import pytest
import torch

from tests.test_datamodule import durations, make_dm, prepared_en, work  # noqa: F401 (fixtures)


def _batches(sampler):
    return [[c.id for c in b] for b in sampler]


def test_every_loader_builds_its_sampler_with_make_sampler(work):
    """train/valid/test loaders all get their lhotse sampler from make_sampler, with the flags each honours."""
    from llmasr.data import datamodule, samplers

    dm = make_dm("--max-duration", "7", "--num-buckets", "3", "--shuffle", "false", "--drop-last", "false",
                 "--seed", "11", "--test-num-buckets", "2", "--strict-max-duration", "false",
                 "--quadratic-duration", "25")
    made = []

    def spy(*args, **kwargs):
        made.append((args, kwargs, samplers.make_sampler(*args, **kwargs)))
        return made[-1][2]

    with mock.patch.object(datamodule, "make_sampler", spy):
        train = dm.train_dataloader(dm.train_cuts(), world_size=1, rank=0)
        valid = dm.valid_dataloader(dm.dev_cuts(), world_size=1, rank=0)
        test = dm.test_dataloader(dm.test_cuts("test-clean"))
    assert [a[1] for a, _, _ in made] == ["train", "valid", "test"]
    assert train.sampler.sampler is made[0][2] and valid.sampler is made[1][2] and test.sampler is made[2][2]
    (_, _, max_d, buckets), kw = made[0][0], made[0][1]
    assert (max_d, buckets) == (7.0, 3)
    assert kw == dict(bucketing=True, strict_ceiling=None, shuffle=False, drop_last=False, buffer_size=6000,
                      quadratic_duration=25.0, world_size=1, rank=0, seed=11)
    assert made[1][0][2:] == (7.0, 10) and made[1][1] == dict(world_size=1, rank=0)  # no shuffle, keep all
    assert made[2][0][2:] == (7.0, 2) and made[2][1] == dict(world_size=1, rank=0)
    # --strict-max-duration (the default) hands --max-cut-duration over as the strict ceiling
    with mock.patch.object(datamodule, "make_sampler", spy):
        make_dm("--max-cut-duration", "20").train_dataloader(dm.train_cuts(), world_size=1, rank=0)
    assert made[-1][1]["strict_ceiling"] == 20.0


def test_make_sampler_honours_its_arguments(work, caplog):
    from lhotse.dataset import DynamicBucketingSampler, SimpleCutSampler

    from llmasr.config import UserError
    from llmasr.data.samplers import StrictDynamicBucketingSampler, make_sampler

    cuts = make_dm().train_cuts().to_eager()
    dur = durations(cuts)
    order = [c.id for c in cuts]
    ceiling = max(dur.values())

    strict = make_sampler(cuts, "train", 9.0, 4, strict_ceiling=ceiling, shuffle=True, seed=5,
                          world_size=1, rank=0)
    assert isinstance(strict, StrictDynamicBucketingSampler)
    batches = _batches(strict)
    assert sorted(i for b in batches for i in b) == sorted(order)
    assert max(sum(dur[i] for i in b) for b in batches) <= 9.0  # the strict budget holds for every batch
    again = make_sampler(cuts, "train", 9.0, 4, strict_ceiling=ceiling, shuffle=True, seed=5, world_size=1, rank=0)
    other = make_sampler(cuts, "train", 9.0, 4, strict_ceiling=ceiling, shuffle=True, seed=6, world_size=1, rank=0)
    assert _batches(again) == batches and _batches(other) != batches  # the seed sets the shuffle

    lhotse = make_sampler(cuts, "valid", 9.0, 4, world_size=1, rank=0)
    assert type(lhotse) is DynamicBucketingSampler and len(lhotse.duration_bins) + 1 == 4 and not lhotse.shuffle

    # No bucketing, no shuffle: the manifest's order, cut into batches whose padded duration (cuts x the
    # longest) is at most 9 s (lhotse's budget); drop_last drops the incomplete last one (computed here by
    # filling batches in order).
    plain = make_sampler(cuts, "train", 9.0, 4, bucketing=False, world_size=1, rank=0)
    assert isinstance(plain, SimpleCutSampler)
    expected, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * max(dur[j] for j in cur + [i]) > 9.0:
            expected.append(cur)
            cur = []
        cur.append(i)
    expected.append(cur)
    assert _batches(plain) == expected
    last = expected[-1]
    assert (len(last) + 1) * max(dur[j] for j in last) <= 9.0  # room for one more: incomplete
    dropping = make_sampler(cuts, "train", 9.0, 4, bucketing=False, drop_last=True, world_size=1, rank=0)
    assert _batches(dropping) == expected[:-1]

    # Two ranks: disjoint halves of the cuts, in as many batches.
    ranks = [_batches(make_sampler(cuts, "valid", 9.0, 4, world_size=2, rank=r)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])
    ids = [[i for b in r for i in b if "_dup" not in i] for r in ranks]
    assert not set(ids[0]) & set(ids[1]) and sorted(ids[0] + ids[1]) == sorted(order)

    # Fewer cuts than buckets: one bucket per cut; a single cut: the plain sampler; none: an error naming the loader.
    three = cuts.subset(first=3)
    with caplog.at_level(logging.INFO):
        few = make_sampler(three, "test", 9.0, 10, world_size=1, rank=0)
    assert "test: only 3 cuts, using 3 buckets instead of 10" in caplog.text
    assert sorted(i for b in _batches(few) for i in b) == sorted(c.id for c in three)
    assert isinstance(make_sampler(cuts.subset(first=1), "test", 9.0, 10, world_size=1, rank=0), SimpleCutSampler)
    with pytest.raises(UserError, match="^valid: no cuts left"):
        make_sampler(cuts.filter(lambda c: False), "valid", 9.0, 10, world_size=1, rank=0)


def _seeded_training_batch():
    dm = make_dm("--enable-spec-aug", "true", "--max-duration", "9")
    loader = dm.train_dataloader(dm.train_cuts(), world_size=1, rank=0)
    return loader.dataset, next(iter(loader.sampler))


def _rng_states():
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def _assert_same_states(a, b):
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert all(np.array_equal(x, y) for x, y in zip(a[2], b[2]))


def test_seeded_batch_restores_the_cuda_generators_too(work):
    """lhotse's fix_random_seed (inside every seeded training batch) reseeds every CUDA generator, so with
    --num-workers 0 on a GPU the training's dropout would depend on the data loading: the batch asks
    fork_rng for every visible CUDA device once CUDA is initialised, for none before (a DataLoader worker
    must not initialise CUDA), and leaves the CPU, python and numpy RNGs as they were."""
    dataset, batch = _seeded_training_batch()
    asked, reseeded = [], []
    real_fork_rng = torch.random.fork_rng

    def spy(devices=None, enabled=True, device_type=None, **kw):
        asked.append((list(devices), device_type))
        return real_fork_rng(devices=[], enabled=enabled)  # this host has no CUDA state to save

    torch.manual_seed(123)
    before = _rng_states()
    with mock.patch.object(torch.random, "fork_rng", spy), \
            mock.patch.object(torch.cuda, "is_initialized", return_value=True), \
            mock.patch.object(torch.cuda, "device_count", return_value=2), \
            mock.patch.object(torch.cuda, "manual_seed_all", side_effect=reseeded.append):
        first = dataset[batch]
    assert reseeded == [batch.seed]  # what makes the restore necessary
    assert asked == [([0, 1], "cuda")]
    _assert_same_states(_rng_states(), before)

    with mock.patch.object(torch.random, "fork_rng", spy):  # CUDA not initialised (as on this host)
        second = dataset[batch]
    assert asked[-1] == ([], "cuda")
    _assert_same_states(_rng_states(), before)
    # the augmentation is the batch seed's alone, and it did draw random numbers (SpecAugment changed rows)
    assert torch.equal(first["features"], second["features"])
    plain = make_dm("--max-duration", "9").train_dataloader(make_dm().train_cuts(), world_size=1, rank=0)
    assert not torch.equal(first["features"], plain.dataset[batch]["features"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU visible")
def test_seeded_batch_leaves_the_cuda_rng_of_the_training_process(work):
    dataset, batch = _seeded_training_batch()
    torch.zeros(1, device="cuda")  # the training process has CUDA initialised (its model is there)
    torch.cuda.manual_seed_all(7)
    before = torch.cuda.get_rng_state_all()
    dataset[batch]
    after = torch.cuda.get_rng_state_all()
    assert all(torch.equal(a, b) for a, b in zip(before, after))
