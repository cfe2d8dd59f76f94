"""grpo/algorithm.py against the loss written out in its module docstring.

The reference below is deliberately naive: explicit Python loops over groups, completions
and tokens, one scalar at a time, written straight from those equations. The
vectorised functions must agree with it in value and in gradient for every combination
of options.
"""

from __future__ import annotations

import math
from itertools import product

import pytest
import torch

from grpo.algorithm import (
    AdvantageSpec,
    LossSpec,
    completion_mask,
    group_advantages,
    kl_penalty,
    masked_mean,
    policy_loss,
)

DTYPE = torch.float64

# ----------------------------------------------------------------------------------------
# The naive reference (the docstring's equations, read literally)
# ----------------------------------------------------------------------------------------


def naive_mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def naive_std(xs: list[float]) -> float:
    """Bessel-corrected standard deviation; 0 for a single value."""
    if len(xs) < 2:
        return 0.0
    m = naive_mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def naive_advantages(rewards: list[float], G: int, scale: str, eps: float = 1e-4) -> list[float]:
    out = []
    for start in range(0, len(rewards), G):
        group = rewards[start:start + G]
        for r in group:
            a = r - naive_mean(group)
            if scale == "group":
                a = a / (naive_std(group) + eps)
            elif scale == "batch":
                a = a / (naive_std(rewards) + eps)
            out.append(a)
    return out


def naive_kl(logp_t: torch.Tensor, ref_t: float, estimator: str) -> torch.Tensor:
    """One token: d = log pi_ref - log pi_theta; k1 = -d, k2 = d^2/2, k3 = e^d - d - 1."""
    d = ref_t - logp_t
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return d * d / 2
    return torch.exp(d) - d - 1


def naive_policy_loss(logp, old_logp, ref_logp, advantages, mask, *, beta, kl_estimator, eps_low,
                      eps_high, importance_level, loss_type, max_completion_length):
    """The loss of one whole batch and its statistics, token by token.

    logp is a [B, T] leaf tensor; every other input is read as Python floats / bools.
    """
    B, T = logp.shape
    N = B
    total_tokens = sum(bool(mask[i][t]) for i in range(B) for t in range(T))
    loss = torch.zeros((), dtype=logp.dtype)
    ratios, kls, low, high = [], [], [], []
    for i in range(B):
        A = float(advantages[i])
        tokens = [t for t in range(T) if mask[i][t]]
        if importance_level == "sequence" and tokens:
            # s_i = exp(mean_t log rho_it), a number (its gradient enters per token below)
            s_i = math.exp(sum(logp[i, t].item() - old_logp[i][t] for t in tokens) / len(tokens))
        completion_sum = torch.zeros((), dtype=logp.dtype)
        for t in tokens:
            if importance_level == "token":
                rho = torch.exp(logp[i, t] - old_logp[i][t])
            else:  # GSPO-token: value s_i, gradient of log pi_theta(o_it)
                rho = s_i * torch.exp(logp[i, t] - logp[i, t].item())
            clipped = torch.clamp(rho, 1 - eps_low, 1 + eps_high)
            l_it = -torch.minimum(rho * A, clipped * A)
            if ref_logp is not None:
                k = naive_kl(logp[i, t], ref_logp[i][t], kl_estimator)
                kls.append(k.item())
                l_it = l_it + beta * k
            completion_sum = completion_sum + l_it
            r = rho.item()
            ratios.append(r)
            low.append(r < 1 - eps_low and A < 0)
            high.append(r > 1 + eps_high and A > 0)
        if loss_type == "grpo":
            if tokens:
                loss = loss + completion_sum / len(tokens)
        else:
            loss = loss + completion_sum
    if loss_type in ("grpo", "luspo"):  # luspo: |o_i| times completion i's mean term, over N
        loss = loss / N
    elif loss_type == "token_mean":
        loss = loss / total_tokens
    else:
        loss = loss / (N * max_completion_length)
    n = max(len(ratios), 1)
    stats = {
        "kl": sum(kls) / n,
        "ratio_mean": sum(ratios) / n,
        "clip_ratio/low_mean": sum(low) / n,
        "clip_ratio/high_mean": sum(high) / n,
        "clip_ratio/region_mean": sum(a or b for a, b in zip(low, high)) / n,
        "tokens": float(total_tokens),
    }
    return loss, stats


# ----------------------------------------------------------------------------------------
# Random inputs
# ----------------------------------------------------------------------------------------

PROMPTS, G, T = 2, 3, 5
B = PROMPTS * G
MAX_LEN = 8  # the "configured max new tokens" for dr_grpo, > T on purpose


def random_batch(seed: int):
    """Unequal lengths (one empty completion, one full), ratios on both sides of the clip
    range, and NaN at every masked position (it must never leak)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([0, T, 1, 3, 4, 2])
    mask = torch.arange(T)[None, :] < lengths[:, None]  # [B, T]
    logp = torch.log(torch.rand(B, T, generator=g, dtype=DTYPE) * 0.9 + 0.05)  # [B, T]
    old_logp = logp + 0.4 * torch.randn(B, T, generator=g, dtype=DTYPE)
    ref_logp = logp + 0.5 * torch.randn(B, T, generator=g, dtype=DTYPE)
    old_logp[~mask] = float("nan")
    ref_logp[~mask] = float("nan")
    logp[~mask] = 123.0  # a finite but absurd value: the leaf must stay usable for autograd
    rewards = torch.randint(0, 3, (B,), generator=g).to(DTYPE) / 2  # {0, 0.5, 1}
    return logp, old_logp, ref_logp, rewards, mask


SCALES = ("group", "batch", "none")
ESTIMATORS = ("k1", "k2", "k3")
LEVELS = ("token", "sequence")
LOSS_TYPES = ("grpo", "token_mean", "dr_grpo", "luspo")
BETAS = (0.0, 0.04)
EPS_PAIRS = ((0.2, 0.2), (0.2, 0.28))
ALL_OPTIONS = list(product(SCALES, ESTIMATORS, LEVELS, LOSS_TYPES, BETAS, EPS_PAIRS))


@pytest.mark.parametrize("scale,estimator,level,loss_type,beta,eps", ALL_OPTIONS,
                         ids=[f"{s}-{k}-{lv}-{lt}-beta{b}-eps{e[0]}_{e[1]}" for s, k, lv, lt, b, e in ALL_OPTIONS])
def test_policy_loss_matches_naive_reference(scale, estimator, level, loss_type, beta, eps):
    seed = ALL_OPTIONS.index((scale, estimator, level, loss_type, beta, eps))
    logp, old_logp, ref_logp, rewards, mask = random_batch(seed)
    options = dict(beta=beta, kl_estimator=estimator, eps_low=eps[0], eps_high=eps[1],
                   importance_level=level, loss_type=loss_type, max_completion_length=MAX_LEN)

    adv_fast = group_advantages(rewards, G, AdvantageSpec(scale=scale))
    adv_naive = naive_advantages(rewards.tolist(), G, scale)
    assert adv_fast.tolist() == pytest.approx(adv_naive, rel=1e-12, abs=1e-12)

    leaf_fast = logp.clone().requires_grad_(True)
    loss_fast, stats_fast = policy_loss(leaf_fast, old_logp, adv_fast, mask, LossSpec(**options), ref_logp=ref_logp)
    loss_fast.backward()

    leaf_naive = logp.clone().requires_grad_(True)
    loss_naive, stats_naive = naive_policy_loss(leaf_naive, old_logp.tolist(), ref_logp.tolist(), adv_naive,
                                                mask.tolist(), **options)
    loss_naive.backward()

    assert torch.isfinite(loss_fast)
    assert loss_fast.item() == pytest.approx(loss_naive.item(), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(leaf_fast.grad, leaf_naive.grad, rtol=1e-10, atol=1e-12)
    assert set(stats_fast) >= set(stats_naive)
    for key, value in stats_naive.items():
        assert stats_fast[key].item() == pytest.approx(value, rel=1e-10, abs=1e-12), key


def test_random_batch_exercises_both_clip_sides():
    """The random inputs above really put ratios outside the clip range on both sides."""
    logp, old_logp, _, _, mask = random_batch(0)
    rho = torch.exp(logp - old_logp)[mask]
    assert (rho < 0.8).any() and (rho > 1.28).any()


# ----------------------------------------------------------------------------------------
# Advantages
# ----------------------------------------------------------------------------------------


def test_advantages_hand_computed():
    # one group [1, 0, 0, 0]: mean 1/4, Bessel variance (9/16 + 3/16) / 3 = 1/4, std 1/2
    a = group_advantages(torch.tensor([1.0, 0, 0, 0]), 4)
    assert a.tolist() == pytest.approx([0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001])
    a = group_advantages(torch.tensor([1.0, 0, 0, 0]), 4, AdvantageSpec(scale="none"))
    assert a.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])
    a = group_advantages(torch.tensor([1.0, 0, 0, 0]), 4, AdvantageSpec(eps=0.0))
    assert a.tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5])
    # two groups [1, 1, 0, 0] [2, 0, 0, 0] with scale "batch": centred per group, one std
    # for all 8 values: mean 1/2, squared deviations 7 * 1/4 + 9/4 = 4, Bessel std sqrt(4/7)
    a = group_advantages(torch.tensor([1.0, 1, 0, 0, 2, 0, 0, 0]), 4, AdvantageSpec(scale="batch", eps=0.0))
    std = math.sqrt(4 / 7)
    expected = [0.5, 0.5, -0.5, -0.5, 1.5, -0.5, -0.5, -0.5]
    assert a.tolist() == pytest.approx([x / std for x in expected])


@pytest.mark.parametrize("scale", SCALES)
def test_all_equal_group_has_zero_advantage(scale):
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0])  # group 0 all equal, group 1 not
    a = group_advantages(rewards, 3, AdvantageSpec(scale=scale))
    assert a[:3].tolist() == [0.0, 0.0, 0.0]
    assert a[3:].abs().sum() > 0


@pytest.mark.parametrize("scale", SCALES)
def test_group_size_one_gives_zero_advantage(scale):
    a = group_advantages(torch.tensor([0.0, 1.0, 3.0]), 1, AdvantageSpec(scale=scale))
    assert a.tolist() == [0.0, 0.0, 0.0]
    assert group_advantages(torch.tensor([2.0]), 1, AdvantageSpec(scale=scale)).tolist() == [0.0]


@pytest.mark.parametrize("scale,group_size", list(product(SCALES, (2, 3, 6))))
def test_advantages_match_naive_on_random_rewards(scale, group_size):
    rewards = torch.randn(12, generator=torch.Generator().manual_seed(group_size), dtype=DTYPE)
    expected = naive_advantages(rewards.tolist(), group_size, scale)
    got = group_advantages(rewards, group_size, AdvantageSpec(scale=scale))
    assert got.tolist() == pytest.approx(expected, rel=1e-12)


def test_integer_rewards_are_accepted():
    assert group_advantages(torch.tensor([1, 0]), 2, AdvantageSpec(scale="none")).tolist() == [0.5, -0.5]


def test_advantages_bad_arguments():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), 2, AdvantageSpec(scale="global"))
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(4), 0)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), 2)


# ----------------------------------------------------------------------------------------
# Clipping: which side stops the gradient
# ----------------------------------------------------------------------------------------


def one_token_grad(rho: float, advantage: float, eps_low=0.2, eps_high=0.2):
    logp = torch.tensor([[math.log(rho)]], dtype=DTYPE, requires_grad=True)
    loss, stats = policy_loss(logp, torch.zeros(1, 1, dtype=DTYPE), torch.tensor([advantage], dtype=DTYPE),
                              torch.ones(1, 1, dtype=torch.bool), LossSpec(eps_low=eps_low, eps_high=eps_high))
    loss.backward()
    return loss.item(), logp.grad.item(), stats


def test_ratio_above_range_with_positive_advantage_is_clipped():
    loss, grad, stats = one_token_grad(1.5, +1.0)
    assert loss == pytest.approx(-1.2) and grad == 0.0
    assert stats["clip_ratio/high_mean"] == 1 and stats["clip_ratio/region_mean"] == 1
    assert stats["clip_ratio/low_mean"] == 0


def test_ratio_above_range_with_negative_advantage_keeps_gradient():
    loss, grad, stats = one_token_grad(1.5, -1.0)
    assert loss == pytest.approx(1.5)
    assert grad == pytest.approx(1.5)  # d/dlogp of -rho * A = -A * rho
    assert stats["clip_ratio/region_mean"] == 0


def test_ratio_below_range_with_negative_advantage_is_clipped():
    loss, grad, stats = one_token_grad(0.5, -1.0)
    assert loss == pytest.approx(0.8) and grad == 0.0
    assert stats["clip_ratio/low_mean"] == 1 and stats["clip_ratio/region_mean"] == 1
    assert stats["clip_ratio/high_mean"] == 0


def test_ratio_below_range_with_positive_advantage_keeps_gradient():
    loss, grad, stats = one_token_grad(0.5, +1.0)
    assert loss == pytest.approx(-0.5) and grad == pytest.approx(-0.5)
    assert stats["clip_ratio/region_mean"] == 0


def test_clip_higher_widens_only_the_upper_side():
    # rho = 1.25: clipped with eps_high 0.2, inside the range with DAPO's 0.28
    assert one_token_grad(1.25, 1.0)[1] == 0.0
    assert one_token_grad(1.25, 1.0, eps_high=0.28)[1] == pytest.approx(-1.25)
    assert one_token_grad(0.75, -1.0, eps_high=0.28)[1] == 0.0


# ----------------------------------------------------------------------------------------
# mu = 1: the closed-form policy gradient on a real (linear softmax) model
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_on_policy_gradient_is_the_closed_form(level, loss_type):
    """At mu = 1 (old = logp detached) and beta = 0, rho = 1 and grad rho = grad log pi:

        grpo:       grad J = -(1/N)        sum_i A_i (1/|o_i|) sum_t grad log pi(o_it)
        token_mean: grad J = -(1/sum|o_i|) sum_i A_i           sum_t grad log pi(o_it)
        dr_grpo:    grad J = -(1/(N L))    sum_i A_i           sum_t grad log pi(o_it)
        luspo:      grad J = -(1/N)        sum_i A_i           sum_t grad log pi(o_it)

    For pi = softmax(W x), grad_W log pi(o | x) = (onehot(o) - pi(. | x)) x^T.
    """
    g = torch.Generator().manual_seed(7)
    V, D = 7, 4
    x = torch.randn(B, T, D, generator=g, dtype=DTYPE)  # [B, T, D] token contexts
    ids = torch.randint(0, V, (B, T), generator=g)  # [B, T]
    W = torch.randn(V, D, generator=g, dtype=DTYPE, requires_grad=True)  # [V, D]
    lengths = torch.tensor([1, 5, 2, 3, 4, 2])
    mask = torch.arange(T)[None, :] < lengths[:, None]  # [B, T]
    advantages = group_advantages(torch.tensor([1.0, 0, 0, 1, 1, 0], dtype=DTYPE), G)

    logp = torch.log_softmax(x @ W.T, dim=-1).gather(-1, ids[..., None]).squeeze(-1)  # [B, T]
    loss, stats = policy_loss(logp, logp.detach(), advantages, mask,
                              LossSpec(importance_level=level, loss_type=loss_type, max_completion_length=MAX_LEN))
    loss.backward()

    probs = torch.softmax(x @ W.detach().T, dim=-1)  # [B, T, V]
    onehot = torch.nn.functional.one_hot(ids, V).to(DTYPE)  # [B, T, V]
    grad_logp = (onehot - probs)[..., None] * x[..., None, :]  # [B, T, V, D]
    per_completion = (grad_logp * mask[..., None, None]).sum(dim=1)  # [B, V, D]
    if loss_type == "grpo":
        weights = advantages / lengths / B
    elif loss_type == "token_mean":
        weights = advantages / lengths.sum()
    elif loss_type == "luspo":
        weights = advantages / B
    else:
        weights = advantages / (B * MAX_LEN)
    expected = -(weights[:, None, None] * per_completion).sum(dim=0)  # [V, D]

    torch.testing.assert_close(W.grad, expected, rtol=1e-12, atol=1e-12)
    assert stats["ratio_mean"].item() == 1.0 and stats["clip_ratio/region_mean"].item() == 0.0
    if loss_type == "grpo":  # advantages sum to 0 within each group, so J = 0 exactly here
        assert loss.item() == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------------------
# KL estimators
# ----------------------------------------------------------------------------------------


def test_kl_estimators_element_wise():
    logp = torch.randn(3, 4, dtype=DTYPE)
    ref = torch.randn(3, 4, dtype=DTYPE)
    for est in ESTIMATORS:
        expected = [naive_kl(logp[i, t], ref[i, t].item(), est).item() for i in range(3) for t in range(4)]
        assert kl_penalty(logp, ref, est).flatten().tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    with pytest.raises(ValueError, match="kl estimator"):
        kl_penalty(logp, ref, "k4")


def test_k1_and_k3_are_unbiased_estimates_of_the_kl():
    """Tokens sampled from pi_theta over 5 outcomes (200,000 draws, seed 0): the sample means
    of k1 and k3 are within 5 standard errors of the exact KL(pi_theta || pi_ref) =
    sum_x pi_theta(x) log(pi_theta(x) / pi_ref(x)) = 0.1553; the standard errors are below
    2e-3, so the tolerance is at most 0.01 absolute."""
    pi = torch.tensor([0.4, 0.25, 0.15, 0.12, 0.08], dtype=DTYPE)
    ref = torch.full((5,), 0.2, dtype=DTYPE)
    exact = (pi * (pi.log() - ref.log())).sum().item()
    draws = torch.multinomial(pi, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    for est in ("k1", "k3"):
        k = kl_penalty(pi.log()[draws], ref.log()[draws], est)
        standard_error = (k.std() / math.sqrt(k.numel())).item()
        assert standard_error < 2e-3
        assert abs(k.mean().item() - exact) < 5 * standard_error, est
    # k2 is biased (it matches the KL only to second order) but never negative
    assert (kl_penalty(pi.log()[draws], ref.log()[draws], "k2") >= 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_k3_is_never_negative(dtype):
    g = torch.Generator().manual_seed(1)
    logp = 10 * torch.randn(20_000, generator=g)
    scale = 10 ** (10 * torch.rand(20_000, generator=g) - 9)  # gaps from 1e-9 to 10
    ref = logp + scale * torch.randn(20_000, generator=g)
    k3 = kl_penalty(logp.to(dtype), ref.to(dtype), "k3")
    assert (k3 >= 0).all()
    assert (kl_penalty(logp, logp, "k3") == 0).all()


def test_kl_enters_the_loss_and_stats():
    logp, old_logp, ref_logp, rewards, mask = random_batch(3)
    advantages = torch.zeros(B, dtype=DTYPE)  # only the KL term is left
    loss, stats = policy_loss(logp, old_logp, advantages, mask, LossSpec(beta=0.5, loss_type="token_mean"),
                              ref_logp=ref_logp)
    expected = masked_mean(kl_penalty(logp, ref_logp), mask)
    assert loss.item() == pytest.approx(0.5 * expected.item(), rel=1e-12)
    assert stats["kl"].item() == pytest.approx(expected.item(), rel=1e-12)


def test_no_reference_model():
    logp, old_logp, _, rewards, mask = random_batch(4)
    adv = group_advantages(rewards, G)
    loss, stats = policy_loss(logp, old_logp, adv, mask)  # beta = 0, ref_logp = None
    assert torch.isfinite(loss) and stats["kl"].item() == 0.0
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, old_logp, adv, mask, LossSpec(beta=0.04))


# ----------------------------------------------------------------------------------------
# Completion mask
# ----------------------------------------------------------------------------------------

QWEN_ENDS = {151645, 151643}  # <|im_end|>, <|endoftext|> (also the pad id)


def as_lists(mask: torch.Tensor) -> list[list[int]]:
    return mask.int().tolist()


def test_mask_pad_equal_to_eos():
    ids = torch.tensor([[5, 2, 2, 2]])  # pad = eos = 2
    assert as_lists(completion_mask(ids, {2})) == [[1, 1, 0, 0]]


def test_mask_several_end_ids_and_cases():
    ids = torch.tensor([
        [10, 11, 151645, 151643, 151643],  # ends at 2, then padding
        [10, 151643, 151645, 151643, 151643],  # the first end is <|endoftext|>
        [151645, 151643, 151643, 151643, 151643],  # end at position 0
        [10, 11, 12, 13, 14],  # no end token: cut at the length limit, all true
        [10, 11, 12, 13, 151645],  # end at the last position
    ])
    expected = [
        [1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1],
    ]
    assert as_lists(completion_mask(ids, QWEN_ENDS)) == expected
    assert completion_mask(ids, QWEN_ENDS).dtype == torch.bool


def test_mask_only_some_ids_count_as_end():
    ids = torch.tensor([[3, 7, 4, 7, 9]])
    assert as_lists(completion_mask(ids, [4])) == [[1, 1, 1, 0, 0]]
    assert as_lists(completion_mask(ids, [7])) == [[1, 1, 0, 0, 0]]
    assert as_lists(completion_mask(ids, [4, 7])) == [[1, 1, 0, 0, 0]]
    assert as_lists(completion_mask(ids, [])) == [[1, 1, 1, 1, 1]]


@pytest.mark.parametrize("ends", [[2, 9], {2, 9}, (9, 2), torch.tensor([2, 9]), frozenset({2, 9})])
def test_mask_accepts_list_set_tuple_tensor(ends):
    ids = torch.tensor([[1, 9, 2], [2, 1, 1], [1, 1, 1]])
    assert as_lists(completion_mask(ids, ends)) == [[1, 1, 0], [1, 0, 0], [1, 1, 1]]
    assert as_lists(completion_mask(ids, 2)) == [[1, 1, 1], [1, 0, 0], [1, 1, 1]]


def test_mask_bad_shape():
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        completion_mask(torch.tensor([1, 2, 3]), [2])


# ----------------------------------------------------------------------------------------
# Edge cases and bad arguments of policy_loss
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_empty_completions_give_no_nan(level, loss_type):
    logp = torch.randn(2, 3, dtype=DTYPE, requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    spec = LossSpec(beta=0.1, importance_level=level, loss_type=loss_type, max_completion_length=4)
    loss, stats = policy_loss(logp, logp.detach() + 1, torch.tensor([1.0, -1.0], dtype=DTYPE), mask, spec,
                              ref_logp=torch.zeros(2, 3, dtype=DTYPE))
    loss.backward()
    assert loss.item() == 0.0 and (logp.grad == 0).all()
    assert all(torch.isfinite(v) for v in stats.values()) and stats["tokens"].item() == 0


def test_stats_are_detached_scalars_and_mask_may_be_numeric():
    logp, old_logp, ref_logp, rewards, mask = random_batch(5)
    logp.requires_grad_(True)
    adv = group_advantages(rewards, G)
    loss_bool, stats = policy_loss(logp, old_logp, adv, mask, LossSpec(beta=0.04), ref_logp=ref_logp)
    for value in stats.values():
        assert value.dim() == 0 and not value.requires_grad
    assert stats["tokens"].item() == mask.sum().item()
    loss_float, _ = policy_loss(logp, old_logp, adv, mask.to(DTYPE), LossSpec(beta=0.04), ref_logp=ref_logp)
    assert loss_float.item() == loss_bool.item()


def test_default_totals_are_this_calls_counts():
    logp, old_logp, _, rewards, mask = random_batch(6)
    adv = group_advantages(rewards, G)
    for loss_type in LOSS_TYPES:
        options = dict(loss_type=loss_type, max_completion_length=MAX_LEN)
        default, _ = policy_loss(logp, old_logp, adv, mask, LossSpec(**options))
        explicit, _ = policy_loss(logp, old_logp, adv, mask, LossSpec(**options),
                                  total_sequences=B, total_tokens=int(mask.sum()))
        assert default.item() == explicit.item()
    whole, _ = policy_loss(logp, old_logp, adv, mask)
    share, _ = policy_loss(logp, old_logp, adv, mask, total_sequences=2 * B)  # half of a bigger batch
    assert share.item() == pytest.approx(whole.item() / 2, rel=1e-12)


@pytest.mark.parametrize("kwargs,match", [
    (dict(loss_type="seq_mean"), "loss type"),
    (dict(importance_level="token_and_sequence"), "importance level"),
    (dict(kl_estimator="k5"), "kl estimator"),
    (dict(loss_type="dr_grpo"), "max_completion_length"),
    (dict(loss_type="dr_grpo", max_completion_length=0), "max_completion_length"),
    (dict(beta=0.04), "ref_logp"),
    (dict(beta=-0.1), "beta"),
    (dict(eps_low=-0.1), "eps_low"),
])
def test_policy_loss_bad_arguments(kwargs, match):
    logp, old_logp, _, rewards, mask = random_batch(7)
    with pytest.raises(ValueError, match=match):
        policy_loss(logp, old_logp, group_advantages(rewards, G), mask, LossSpec(**kwargs))


def test_policy_loss_bad_shapes():
    logp, old_logp, ref_logp, rewards, mask = random_batch(8)
    adv = group_advantages(rewards, G)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logp, old_logp, adv[:, None], mask)
    with pytest.raises(ValueError, match="shape"):
        policy_loss(logp, old_logp[:, :-1], adv, mask)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, old_logp, adv, mask, LossSpec(beta=0.1), ref_logp=ref_logp[:-1])
