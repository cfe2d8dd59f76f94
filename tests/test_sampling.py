"""Counter-based sampling: exact distribution, and draws independent of batch composition."""

import torch

from models.sampling import counter_uniform, gumbel_sample, row_seed, splitmix64


def test_gumbel_sampling_matches_the_softmax_distribution():
    probs = torch.tensor([0.05, 0.15, 0.3, 0.5])
    n = 40_000
    seeds = splitmix64(torch.arange(n) + row_seed(3))
    draws = gumbel_sample(torch.log(probs).expand(n, 4), seeds, position=0)
    freq = torch.bincount(draws, minlength=4).double() / n
    # 4 standard errors of a binomial proportion
    assert torch.all((freq - probs.double()).abs() < 4 * (probs * (1 - probs) / n).sqrt().double())


def test_filtered_entries_are_never_drawn():
    logits = torch.tensor([0.0, float("-inf"), 1.0, float("-inf")]).expand(5000, 4)
    seeds = splitmix64(torch.arange(5000) + row_seed(1))
    draws = gumbel_sample(logits, seeds, position=3)
    assert set(draws.tolist()) <= {0, 2} and len(set(draws.tolist())) == 2


def test_a_row_draws_the_same_whatever_batch_it_sits_in():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    seeds = torch.tensor([row_seed(0, 5, i) for i in range(6)])
    whole = gumbel_sample(logits, seeds, position=7)
    shuffled = torch.tensor([4, 0, 5, 2])
    assert torch.equal(gumbel_sample(logits[shuffled], seeds[shuffled], position=7), whole[shuffled])
    u7, u8 = counter_uniform(seeds, 7, 50), counter_uniform(seeds, 8, 50)
    assert not torch.equal(u7, u8) and torch.equal(u7, counter_uniform(seeds, 7, 50))


def test_uniform_noise_is_uniform_and_uncorrelated_across_positions():
    seeds = torch.tensor([row_seed(9, i) for i in range(200)])
    a, b = counter_uniform(seeds, 0, 1000), counter_uniform(seeds, 1, 1000)
    assert 0 < a.min() and a.max() < 1
    assert abs(a.mean().item() - 0.5) < 0.005 and abs(a.std().item() - (1 / 12) ** 0.5) < 0.005
    corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
    assert abs(corr.item()) < 0.01


def test_row_seed_is_the_tensor_hash_folded_over_its_parts():
    """row_seed hashes Python ints directly; it must give the bits of the tensor SplitMix64
    (which counter_uniform uses), so seeds, and every sampled completion, stay as they were."""
    import random

    rng = random.Random(0)
    mask, golden = (1 << 64) - 1, 0x9E3779B97F4A7C15
    for _ in range(300):
        parts = [rng.randrange(-(1 << 40), 1 << 40) for _ in range(rng.randrange(1, 6))] + [rng.randrange(1 << 20)]
        h = 0
        for p in parts:
            x = (h ^ (p * golden)) & mask
            h = splitmix64(torch.tensor([x - (1 << 64) if x >= 1 << 63 else x])).item()
        assert row_seed(*parts) == h, parts
    assert row_seed(1, 2) != row_seed(2, 1)
