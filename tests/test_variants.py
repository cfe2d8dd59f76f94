"""The GRPO family in grpo/algorithm.py against naive, scalar-by-scalar references.

Each variant (module docstring of grpo/algorithm.py, "Variants") is written out again here
as explicit Python loops over completions and tokens, read straight from its equation, and
the vectorised functions must agree in value and in gradient (float64). Closed-form checks
(on-policy gradients, the exact expectation of the importance-weighted KL's gradient) pin
down what each variant is for.
"""

from __future__ import annotations

import math
from itertools import product

import pytest
import torch

from grpo.algorithm import (
    AdvantageSpec,
    CorrectionSpec,
    LossSpec,
    entropy_threshold,
    group_advantages,
    high_entropy_mask,
    multi_reward_advantages,
    policy_loss,
    rollout_correction,
    rollout_importance_weights,
    rollout_rejection_mask,
)

DTYPE = torch.float64
PROMPTS, G, T = 2, 3, 5
B = PROMPTS * G
MAX_LEN = 8


def random_batch(seed: int):
    """Unequal lengths (one empty, one full), ratios on both sides of every clip range (and
    past the dual clip's c = 1.5), NaN at masked positions of the fixed inputs."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([0, T, 1, 3, 4, 2])
    mask = torch.arange(T)[None, :] < lengths[:, None]  # [B, T]
    logp = torch.log(torch.rand(B, T, generator=g, dtype=DTYPE) * 0.9 + 0.05)
    old_logp = logp + 0.5 * torch.randn(B, T, generator=g, dtype=DTYPE)
    ref_logp = logp + 0.5 * torch.randn(B, T, generator=g, dtype=DTYPE)
    weights = torch.rand(B, T, generator=g, dtype=DTYPE) * 2
    old_logp[~mask] = float("nan")
    ref_logp[~mask] = float("nan")
    logp[~mask] = 123.0
    rewards = torch.randint(0, 3, (B,), generator=g).to(DTYPE) / 2
    rewards[[1, 3]], rewards[[2, 4]] = 0.0, 1.0  # every group has a signal: no all-zero advantages
    return logp, old_logp, ref_logp, weights, group_advantages(rewards, G), mask


# ----------------------------------------------------------------------------------------
# The naive reference
# ----------------------------------------------------------------------------------------


def naive_term(kind, logp_it, old_it, A, *, eps_low, eps_high, c, tau_pos, tau_neg, rho):
    """p_it for one token, for the token-local kinds. rho is the importance weight (a tensor
    with its gradient), logp_it the token's log-prob (tensor)."""
    if kind == "clip":
        p = -torch.minimum(rho * A, torch.clamp(rho, 1 - eps_low, 1 + eps_high) * A)
        if c is not None and A < 0:
            p = torch.minimum(p, torch.tensor(-c * A, dtype=DTYPE))
        return p
    if kind == "cispo":
        w = min(max(rho.item(), 1 - eps_low), 1 + eps_high)  # a number: no gradient
        return -w * A * logp_it
    if kind == "sapo":
        tau = tau_pos if A > 0 else tau_neg
        return -(4 / tau) * torch.sigmoid(tau * (rho - 1)) * A
    raise AssertionError(kind)


def naive_vespo_weight(log_w: float, A: float, shape) -> float:
    """phi(w) = w^k e^(lambda (1 - w)) of the sequence ratio w = e^log_w, a number."""
    k_pos, lambda_pos, k_neg, lambda_neg = shape
    k, lam = (k_pos, lambda_pos) if A >= 0 else (k_neg, lambda_neg)
    w = math.exp(log_w)
    return w ** k * math.exp(lam * (1 - w))


def naive_loss(logp, old_logp, ref_logp, advantages, mask, *, kind, level, loss_type, beta=0.0,
               eps_low=0.2, eps_high=0.28, c=None, tau_pos=1.0, tau_neg=1.05, weights=None,
               kl_iw=False, vespo_shape=(2.0, 3.0, 3.0, 2.0)):
    Bn, Tn = logp.shape
    total_tokens = sum(bool(mask[i][t]) for i in range(Bn) for t in range(Tn))
    loss = torch.zeros((), dtype=DTYPE)
    for i in range(Bn):
        A = float(advantages[i])
        tokens = [t for t in range(Tn) if mask[i][t]]
        if not tokens:
            continue
        if level == "sequence":
            s_i = math.exp(sum(logp[i, t].item() - old_logp[i][t] for t in tokens) / len(tokens))
        if kind == "gmpo":
            logs = []
            for t in tokens:
                x = logp[i, t] - old_logp[i][t]
                clipped = torch.clamp(x, -eps_low, eps_high)
                logs.append(torch.minimum(x, clipped) if A >= 0 else torch.maximum(x, clipped))
            seq = torch.exp(sum(logs) / len(tokens))
        if kind == "vespo":  # the product of the token ratios, then the gamma weight (a number)
            phi = naive_vespo_weight(sum(logp[i, t].item() - old_logp[i][t] for t in tokens), A, vespo_shape)
        total = torch.zeros((), dtype=DTYPE)
        for t in tokens:
            if level == "token":
                rho = torch.exp(logp[i, t] - old_logp[i][t])
            else:
                rho = s_i * torch.exp(logp[i, t] - logp[i, t].item())
            if kind == "gmpo":
                p = -A * seq
            elif kind == "vespo":
                p = -phi * A * logp[i, t]
            else:
                p = naive_term(kind, logp[i, t], old_logp[i][t], A, eps_low=eps_low, eps_high=eps_high, c=c,
                               tau_pos=tau_pos, tau_neg=tau_neg, rho=rho)
            if weights is not None:
                p = p * float(weights[i][t])
            if beta > 0:
                d = ref_logp[i][t] - logp[i, t]
                k = torch.exp(d) - d - 1
                if kl_iw:
                    k = torch.exp(logp[i, t] - old_logp[i][t]) * k
                p = p + beta * k
            total = total + p
        loss = loss + (total / len(tokens) if loss_type == "grpo" else total)
    if loss_type in ("grpo", "luspo"):  # luspo: each completion's sum over its tokens, over N
        return loss / Bn
    if loss_type == "token_mean":
        return loss / total_tokens
    return loss / (Bn * MAX_LEN)


VARIANTS = {  # name -> policy_loss keyword arguments (naive_loss reads the same names via KW)
    "cispo": dict(policy_loss_type="cispo"),
    "cispo_no_lower": dict(policy_loss_type="cispo", eps_low=0.99, eps_high=1.0),
    "gmpo": dict(policy_loss_type="gmpo", eps_low=0.4, eps_high=0.4),
    "sapo": dict(policy_loss_type="sapo"),
    "sapo_sharp": dict(policy_loss_type="sapo", sapo_tau_pos=4.0, sapo_tau_neg=8.0),
    "dual_clip": dict(clip_ratio_c=1.5),
    "token_weights": dict(weights=True),
    "kl_importance_weighted": dict(beta=0.1, kl_importance_weighted=True),
    "sapo_kl": dict(policy_loss_type="sapo", beta=0.1),
    "vespo": dict(policy_loss_type="vespo"),
    "vespo_shape": dict(policy_loss_type="vespo", vespo_shape=(1.5, 0.7, 4.0, 3.5)),
    "vespo_kl": dict(policy_loss_type="vespo", beta=0.1, kl_importance_weighted=True),
}
CASES = list(product(VARIANTS, ("token", "sequence"), ("grpo", "token_mean", "dr_grpo", "luspo")))


def split_kwargs(options: dict, weights: torch.Tensor):
    fast = {k: v for k, v in options.items() if k != "weights"}
    if options.get("weights"):
        fast["token_weights"] = weights
    naive = dict(kind=options.get("policy_loss_type", "clip"), beta=options.get("beta", 0.0),
                 eps_low=options.get("eps_low", 0.2), eps_high=options.get("eps_high", 0.28),
                 c=options.get("clip_ratio_c"), tau_pos=options.get("sapo_tau_pos", 1.0),
                 tau_neg=options.get("sapo_tau_neg", 1.05),
                 weights=weights.tolist() if options.get("weights") else None,
                 kl_iw=options.get("kl_importance_weighted", False),
                vespo_shape=options.get("vespo_shape", (2.0, 3.0, 3.0, 2.0)))
    fast.setdefault("eps_low", 0.2)
    fast.setdefault("eps_high", 0.28)
    return fast, naive


@pytest.mark.parametrize("variant,level,loss_type", CASES, ids=["-".join(c) for c in CASES])
def test_variant_matches_naive_reference(variant, level, loss_type):
    logp, old_logp, ref_logp, weights, adv, mask = random_batch(CASES.index((variant, level, loss_type)))
    fast_kw, naive_kw = split_kwargs(VARIANTS[variant], weights)
    leaf = logp.clone().requires_grad_(True)
    weights_kw = {"token_weights": fast_kw.pop("token_weights")} if "token_weights" in fast_kw else {}
    spec = LossSpec(importance_level=level, loss_type=loss_type, max_completion_length=MAX_LEN, **fast_kw)
    loss, stats = policy_loss(leaf, old_logp, adv, mask, spec, ref_logp=ref_logp, **weights_kw)
    loss.backward()
    leaf_naive = logp.clone().requires_grad_(True)
    expected = naive_loss(leaf_naive, old_logp.tolist(), ref_logp.tolist(), adv.tolist(), mask.tolist(),
                          level=level, loss_type=loss_type, **naive_kw)
    expected.backward()
    assert torch.isfinite(loss) and torch.isfinite(leaf.grad).all()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(leaf.grad, leaf_naive.grad, rtol=1e-10, atol=1e-12)
    assert leaf.grad.abs().sum() > 0


def test_dual_clip_case_is_exercised_and_changes_the_loss():
    """The batch has tokens with rho > c and A < 0 (the dual clip holds there), and the dual
    clip changes the loss; the stat counts them."""
    logp, old_logp, _, _, adv, mask = random_batch(3)
    plain, _ = policy_loss(logp, old_logp, adv, mask)
    dual, stats = policy_loss(logp, old_logp, adv, mask, LossSpec(clip_ratio_c=1.5))
    assert stats["clip_ratio/dual_mean"] > 0
    assert dual < plain


def test_dual_clip_holds_the_gradient_at_zero_past_c():
    logp = torch.tensor([[math.log(3.0)]], dtype=DTYPE, requires_grad=True)  # rho = 3 > c = 2
    old, mask = torch.zeros(1, 1, dtype=DTYPE), torch.ones(1, 1, dtype=torch.bool)
    adv = torch.tensor([-1.0], dtype=DTYPE)
    loss, _ = policy_loss(logp, old, adv, mask, LossSpec(clip_ratio_c=2.0))
    loss.backward()
    assert loss.item() == pytest.approx(2.0) and logp.grad.item() == 0.0
    logp.grad = None
    loss, _ = policy_loss(logp, old, adv, mask)  # without: -rho A = 3, gradient rho = 3
    loss.backward()
    assert loss.item() == pytest.approx(3.0) and logp.grad.item() == pytest.approx(3.0)


@pytest.mark.parametrize("kind", ["cispo", "sapo", "gmpo", "vespo"])
@pytest.mark.parametrize("loss_type", ["grpo", "token_mean", "luspo"])
def test_on_policy_gradient_equals_grpo(kind, loss_type):
    """With pi_old = pi_theta (mu = 1) every variant's gradient is GRPO's: -A grad log pi,
    aggregated the same way (CISPO's weight is 1, SAPO's gate has slope 1 at rho = 1, GMPO's
    geometric mean has gradient mean_t grad log pi = GRPO's under "grpo", VESPO's phi(1) = 1).
    For GMPO under token_mean and luspo it is |o_i| times that mean, again GRPO's sum."""
    logp, _, _, _, adv, mask = random_batch(7)
    grads = []
    for policy_loss_type in ("clip", kind):
        leaf = logp.clone().requires_grad_(True)
        loss, _ = policy_loss(leaf, leaf.detach(), adv, mask,
                              LossSpec(loss_type=loss_type, policy_loss_type=policy_loss_type))
        loss.backward()
        grads.append(leaf.grad)
    if kind == "gmpo":  # the gradient is spread evenly over the tokens of o_i: compare per completion
        torch.testing.assert_close(grads[1].sum(dim=1), grads[0].sum(dim=1), rtol=1e-12, atol=1e-14)
    else:
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-14)


def test_cispo_keeps_the_gradient_of_clipped_tokens():
    """A token with rho > 1 + eps_high and A > 0: the clip zeroes its gradient, CISPO scales
    grad log pi by the clipped weight 1 + eps_high instead."""
    logp = torch.tensor([[math.log(2.0)]], dtype=DTYPE, requires_grad=True)
    old, mask = torch.zeros(1, 1, dtype=DTYPE), torch.ones(1, 1, dtype=torch.bool)
    adv = torch.tensor([1.0], dtype=DTYPE)
    for kind, expected in (("clip", 0.0), ("cispo", -1.28)):
        logp.grad = None
        loss, _ = policy_loss(logp, old, adv, mask, LossSpec(eps_high=0.28, policy_loss_type=kind))
        loss.backward()
        assert logp.grad.item() == pytest.approx(expected)


def test_sapo_gate_is_soft():
    """SAPO's gradient is positive at every ratio (no hard zero) and decays away from 1."""
    rho = torch.tensor([[0.5, 0.9, 1.0, 1.1, 2.0, 4.0]], dtype=DTYPE)
    logp = torch.log(rho).requires_grad_(True)
    mask = torch.ones_like(rho, dtype=torch.bool)
    loss, _ = policy_loss(logp, torch.zeros_like(rho), torch.tensor([1.0], dtype=DTYPE), mask,
                          LossSpec(policy_loss_type="sapo", loss_type="token_mean", sapo_tau_pos=2.0))
    loss.backward()
    slope = -logp.grad[0] * rho.shape[1] / rho[0]  # d gate / d rho per token
    assert (slope > 0).all() and slope[2].item() == pytest.approx(1.0)
    assert slope[5] < slope[4] < slope[3] < slope[2] and slope[0] < slope[1] < slope[2]


def test_importance_weighted_kl_gradient_is_the_kl_gradient():
    """Sampling from pi_old and weighting k3 by rho = pi_theta / pi_old (with its gradient):
    the expectation over pi_old of grad(rho k3) is grad KL(pi_theta || pi_ref), exactly. Here
    the expectation is the sum over a whole vocabulary of V tokens."""
    V = 7
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(V, generator=g, dtype=DTYPE, requires_grad=True)
    old = torch.log_softmax(torch.randn(V, generator=g, dtype=DTYPE), 0)
    ref = torch.log_softmax(torch.randn(V, generator=g, dtype=DTYPE), 0)
    logp = torch.log_softmax(theta, 0)
    ids_logp = logp.view(V, 1)  # one token per "completion": every vocabulary entry
    expected_grad = torch.autograd.grad((logp.exp() * (logp - ref)).sum(), theta, retain_graph=True)[0]
    # sum_v pi_old(v) grad(rho_v k_v) is the expectation; build it token by token
    got = torch.zeros(V, dtype=DTYPE)
    for v in range(V):
        one = torch.zeros(V, 1, dtype=torch.bool)
        one[v] = True
        lv, _ = policy_loss(ids_logp, old.view(V, 1), torch.zeros(V, dtype=DTYPE), one,
                            LossSpec(beta=1.0, kl_importance_weighted=True, loss_type="token_mean"),
                            ref_logp=ref.view(V, 1), total_tokens=1)
        got = got + old[v].exp() * torch.autograd.grad(lv, theta, retain_graph=True)[0]
    torch.testing.assert_close(got, expected_grad, rtol=1e-12, atol=1e-14)
    # and without the importance weight the same expectation is not the KL's gradient
    plain = torch.zeros(V, dtype=DTYPE)
    for v in range(V):
        one = torch.zeros(V, 1, dtype=torch.bool)
        one[v] = True
        lv, _ = policy_loss(ids_logp, old.view(V, 1), torch.zeros(V, dtype=DTYPE), one,
                            LossSpec(beta=1.0, loss_type="token_mean"), ref_logp=ref.view(V, 1), total_tokens=1)
        plain = plain + old[v].exp() * torch.autograd.grad(lv, theta, retain_graph=True)[0]
    assert not torch.allclose(plain, expected_grad, rtol=1e-3)


# ----------------------------------------------------------------------------------------
# VESPO and LUSPO: what each is for, and the peer's formula
# ----------------------------------------------------------------------------------------


def test_vespo_weight_is_a_gamma_kernel_of_the_sequence_ratio():
    """phi(1) = 1; phi is largest at w = k / lambda and falls towards 0 on both sides; the
    ratio is the product over the completion's tokens (no length normalisation); A >= 0 and
    A < 0 use their own (k, lambda)."""
    from grpo.algorithm import vespo_weights

    shape = (2.0, 3.0, 3.0, 2.0)
    log_w = torch.tensor([0.0, math.log(2 / 3), math.log(0.1), math.log(4.0), math.log(1.5), math.log(1.5)],
                         dtype=DTYPE)
    old = torch.zeros(6, 2, dtype=DTYPE)
    logp = torch.stack([log_w / 2, log_w / 2], dim=1)  # two tokens whose ratios multiply to w
    adv = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, -1.0], dtype=DTYPE)
    phi = vespo_weights(logp, old, adv, torch.ones(6, 2, dtype=torch.bool), shape).squeeze(1)
    expected = [naive_vespo_weight(x, a, shape) for x, a in zip(log_w.tolist(), adv.tolist())]
    assert phi.tolist() == pytest.approx(expected, rel=1e-12)
    assert phi[0].item() == pytest.approx(1.0)
    assert phi[1] > phi[0] > phi[4] > phi[3] and phi[1] > phi[2]  # peak at w = k / lambda = 2/3
    assert phi[5] != phi[4]  # a negative advantage uses (k_neg, lambda_neg)
    assert not phi.requires_grad


def test_vespo_damps_the_gradient_of_an_off_policy_completion():
    """Two completions with the same advantage, one on-policy, one whose sequence ratio has
    run to 4: the second's gradient is phi(4) = 4^2 e^(3 (1 - 4)) of the first's."""
    logp = torch.tensor([[0.0, 0.0], [math.log(2.0), math.log(2.0)]], dtype=DTYPE, requires_grad=True)
    old, mask = torch.zeros(2, 2, dtype=DTYPE), torch.ones(2, 2, dtype=torch.bool)
    loss, _ = policy_loss(logp, old, torch.tensor([1.0, 1.0], dtype=DTYPE), mask,
                          LossSpec(policy_loss_type="vespo", loss_type="token_mean"))
    loss.backward()
    assert (logp.grad[1] / logp.grad[0]).tolist() == pytest.approx([16 * math.exp(-9)] * 2, rel=1e-12)


def test_luspo_weighs_each_completion_by_its_length():
    """With the sequence ratio, LUSPO's term for completion i is |o_i| times GSPO's: the
    gradient of each row is |o_i| times its gradient under "grpo" aggregation."""
    logp, old_logp, _, _, adv, mask = random_batch(11)
    grads = {}
    for loss_type in ("grpo", "luspo"):
        leaf = logp.clone().requires_grad_(True)
        loss, _ = policy_loss(leaf, old_logp, adv, mask, LossSpec(importance_level="sequence", loss_type=loss_type))
        loss.backward()
        grads[loss_type] = leaf.grad
    lengths = mask.sum(dim=1, keepdim=True).to(DTYPE)
    torch.testing.assert_close(grads["luspo"], grads["grpo"] * lengths, rtol=1e-12, atol=1e-14)
    assert (lengths > 1).any() and grads["luspo"].abs().sum() > 0


def trl_style_loss(logp, old_logp, ref_logp, adv, mask, kind, beta, eps_low=0.2, eps_high=0.28,
                   shape=(2.0, 3.0, 3.0, 2.0)):
    """TRL GRPOTrainer's loss for loss_type "luspo" (importance_sampling_level "sequence") and
    "vespo", written out from its trainer's documented steps as masked [B, T] tensor algebra:

      luspo: coef = exp(masked mean of log-ratio) [B, 1]; term = -min(coef A, clip(coef) A);
             plus beta k3; loss = mean over rows of (term * mask).sum over tokens.
      vespo: w = exp(sum of log-ratio) (clamped in log space to [log 1e-8, 20]); phi =
             exp(lambda + k log w - lambda w), detached; term = -phi A log pi; plus beta k3;
             loss = (term * mask).sum() / number of loss tokens.
    """
    m = mask.to(DTYPE)
    A = adv.unsqueeze(1)
    log_ratio = logp - old_logp
    kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
    if kind == "luspo":
        coef = torch.exp((log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0))
        term = -torch.minimum(coef * A, coef.clamp(1 - eps_low, 1 + eps_high) * A) + beta * kl
        return (term * m).sum(-1).mean()
    k_pos, lambda_pos, k_neg, lambda_neg = shape
    log_w = (log_ratio.detach().clamp(-20, 20) * m).sum(-1, keepdim=True).clamp(math.log(1e-8), 20.0)
    k = torch.where(A >= 0, torch.tensor(k_pos, dtype=DTYPE), torch.tensor(k_neg, dtype=DTYPE))
    lam = torch.where(A >= 0, torch.tensor(lambda_pos, dtype=DTYPE), torch.tensor(lambda_neg, dtype=DTYPE))
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    term = -phi * A * logp + beta * kl
    return (term * m).sum() / m.sum()


@pytest.mark.parametrize("kind", ["luspo", "vespo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_equals_trl_formula(kind, beta):
    """LUSPO is loss_type "luspo" with importance_level "sequence"; VESPO is policy_loss_type
    "vespo" with loss_type "token_mean" (TRL reduces it as it does DAPO's). Both equal TRL's
    formula in value and gradient (inputs clean at masked positions: TRL multiplies by the mask)."""
    logp, old_logp, ref_logp, _, adv, mask = random_batch(12)
    old_logp, ref_logp, logp = old_logp.nan_to_num(0.0), ref_logp.nan_to_num(0.0), torch.where(mask, logp, 0.0)
    options = (dict(loss_type="luspo", importance_level="sequence") if kind == "luspo"
               else dict(policy_loss_type="vespo", loss_type="token_mean"))
    ours_leaf, peer_leaf = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    ours, _ = policy_loss(ours_leaf, old_logp, adv, mask, LossSpec(beta=beta, eps_low=0.2, eps_high=0.28, **options),
                          ref_logp=ref_logp)
    peer = trl_style_loss(peer_leaf, old_logp, ref_logp, adv, mask, kind, beta)
    ours.backward()
    peer.backward()
    assert ours.item() == pytest.approx(peer.item(), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(ours_leaf.grad, peer_leaf.grad, rtol=1e-10, atol=1e-12)


def test_variant_arguments_are_checked():
    logp, old_logp, _, _, adv, mask = random_batch(0)
    with pytest.raises(ValueError, match="policy loss type"):
        policy_loss(logp, old_logp, adv, mask, LossSpec(policy_loss_type="ppo2"))
    with pytest.raises(ValueError, match="clip_ratio_c"):
        policy_loss(logp, old_logp, adv, mask, LossSpec(clip_ratio_c=1.0))
    with pytest.raises(ValueError, match="clip_ratio_c"):
        policy_loss(logp, old_logp, adv, mask, LossSpec(clip_ratio_c=3.0, policy_loss_type="cispo"))
    with pytest.raises(ValueError, match="sapo"):
        policy_loss(logp, old_logp, adv, mask, LossSpec(policy_loss_type="sapo", sapo_tau_neg=0.0))
    with pytest.raises(ValueError, match="token_weights"):
        policy_loss(logp, old_logp, adv, mask, token_weights=torch.ones(B, T + 1))
    with pytest.raises(ValueError, match="vespo_shape"):
        policy_loss(logp, old_logp, adv, mask,
                    LossSpec(policy_loss_type="vespo", vespo_shape=(2.0, 0.0, 3.0, 2.0)))
    with pytest.raises(ValueError, match="vespo_shape"):
        policy_loss(logp, old_logp, adv, mask,
                    LossSpec(policy_loss_type="vespo", vespo_shape=(-1.0, 3.0, 3.0, 2.0)))


# ----------------------------------------------------------------------------------------
# Advantages: leave-one-out baseline, several rewards
# ----------------------------------------------------------------------------------------


def naive_adv(rewards, group, scale, baseline, eps=1e-4):
    def mean(xs):
        return sum(xs) / len(xs)

    def std(xs):
        return math.sqrt(sum((x - mean(xs)) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0

    out = []
    for s in range(0, len(rewards), group):
        grp = rewards[s:s + group]
        for j, r in enumerate(grp):
            if baseline == "leave_one_out":
                others = grp[:j] + grp[j + 1:]
                a = r - mean(others) if others else 0.0
            else:
                a = r - mean(grp)
            if scale == "group":
                a /= std(grp) + eps
            elif scale == "batch":
                a /= std(rewards) + eps
            out.append(a)
    return out


@pytest.mark.parametrize("scale,group", list(product(("group", "batch", "none"), (1, 2, 4))))
def test_leave_one_out_matches_naive(scale, group):
    rewards = torch.randint(0, 4, (4 * group,), generator=torch.Generator().manual_seed(group)).to(DTYPE)
    got = group_advantages(rewards, group, AdvantageSpec(scale=scale, baseline="leave_one_out"))
    expected = naive_adv(rewards.tolist(), group, scale, "leave_one_out")
    assert got.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    if group > 1 and scale == "none":
        assert not torch.allclose(got, group_advantages(rewards, group, AdvantageSpec(scale=scale)))


@pytest.mark.parametrize("normalization,scale,baseline",
                         list(product(("sum_then_normalize", "normalize_each"), ("group", "batch", "none"),
                                      ("mean", "leave_one_out"))))
def test_multi_reward_advantages_match_naive(normalization, scale, baseline):
    g = torch.Generator().manual_seed(1)
    per_reward = torch.stack([torch.randint(0, 2, (12,), generator=g), torch.randint(0, 5, (12,), generator=g)],
                             dim=1).to(DTYPE)  # [N, K=2]: a 0/1 reward and a wider one
    weights = torch.tensor([1.0, 0.5], dtype=DTYPE)
    spec = AdvantageSpec(normalization=normalization, scale=scale, baseline=baseline)
    got = multi_reward_advantages(per_reward, weights, 4, spec)
    cols = per_reward.T.tolist()
    if normalization == "sum_then_normalize":
        expected = naive_adv([1.0 * a + 0.5 * b for a, b in zip(*cols)], 4, scale, baseline)
    else:
        ea, eb = naive_adv(cols[0], 4, scale, baseline), naive_adv(cols[1], 4, scale, baseline)
        expected = [1.0 * a + 0.5 * b for a, b in zip(ea, eb)]
    assert got.tolist() == pytest.approx(expected, rel=1e-10, abs=1e-10)


def test_normalising_each_reward_differs_and_agrees_where_it_should():
    g = torch.Generator().manual_seed(2)
    per_reward = torch.stack([torch.randint(0, 2, (12,), generator=g), torch.randint(0, 5, (12,), generator=g)],
                             dim=1).to(DTYPE)
    w = torch.tensor([1.0, 1.0], dtype=DTYPE)
    each = multi_reward_advantages(per_reward, w, 4, AdvantageSpec(normalization="normalize_each"))
    summed = multi_reward_advantages(per_reward, w, 4, AdvantageSpec(normalization="sum_then_normalize"))
    assert not torch.allclose(each, summed)
    torch.testing.assert_close(
        multi_reward_advantages(per_reward, w, 4, AdvantageSpec(normalization="normalize_each", scale="none")),
        multi_reward_advantages(per_reward, w, 4, AdvantageSpec(normalization="sum_then_normalize", scale="none")))
    one = per_reward[:, :1]
    torch.testing.assert_close(
        multi_reward_advantages(one, w[:1], 4, AdvantageSpec(normalization="normalize_each")),
        multi_reward_advantages(one, w[:1], 4, AdvantageSpec(normalization="sum_then_normalize")))


# ----------------------------------------------------------------------------------------
# Entropy token selection
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.8, 1.0])
def test_entropy_threshold_is_the_kth_largest(fraction):
    g = torch.Generator().manual_seed(3)
    entropy = torch.rand(B, T, generator=g, dtype=DTYPE)
    _, _, _, _, _, mask = random_batch(0)
    values = sorted((entropy[i, t].item() for i in range(B) for t in range(T) if mask[i, t]), reverse=True)
    k = max(1, math.ceil(fraction * len(values)))
    threshold = entropy_threshold(entropy, mask, fraction)
    assert threshold.item() == values[k - 1]
    keep = high_entropy_mask(entropy, mask, threshold)
    assert int(keep.sum()) == k and not (keep & ~mask).any()


def test_entropy_threshold_of_no_tokens_keeps_everything():
    threshold = entropy_threshold(torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool), 0.2)
    assert threshold.item() == float("-inf")
    with pytest.raises(ValueError, match="top_fraction"):
        entropy_threshold(torch.ones(2, 3), torch.ones(2, 3), 0.0)


def test_entropy_selection_zeroes_the_gradient_of_low_entropy_tokens():
    logp, old_logp, _, _, adv, mask = random_batch(4)
    entropy = torch.rand(B, T, generator=torch.Generator().manual_seed(5), dtype=DTYPE)
    keep = high_entropy_mask(entropy, mask, entropy_threshold(entropy, mask, 0.3))
    leaf = logp.clone().requires_grad_(True)
    loss, _ = policy_loss(leaf, old_logp, adv, mask, token_weights=keep.to(DTYPE))
    loss.backward()
    assert (leaf.grad[mask & ~keep] == 0).all()
    assert (leaf.grad[keep] != 0).any()


# ----------------------------------------------------------------------------------------
# Rollout correction (sampler vs trainer)
# ----------------------------------------------------------------------------------------


def naive_log_weights(logp, sampler, mask, level):
    out = []
    for i in range(len(logp)):
        tokens = [t for t in range(len(logp[i])) if mask[i][t]]
        diffs = {t: logp[i][t] - sampler[i][t] for t in tokens}
        if level == "token":
            out.append([diffs.get(t, 0.0) for t in range(len(logp[i]))])
        else:
            total = sum(diffs.values())
            if level == "geometric" and tokens:
                total /= len(tokens)
            out.append([total] * len(logp[i]))
    return out


@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
def test_rollout_importance_weights_match_naive(level):
    logp, old_logp, _, _, _, mask = random_batch(6)
    trainer = old_logp.nan_to_num(0.0)
    sampler = trainer + 0.4 * torch.randn(B, T, generator=torch.Generator().manual_seed(9), dtype=DTYPE)
    sampler[~mask] = float("nan")
    cap = 1.5
    weights, stats = rollout_importance_weights(trainer, sampler, mask, cap=cap, level=level)
    logs = naive_log_weights(trainer.tolist(), sampler.tolist(), mask.tolist(), level)
    raws = [math.exp(logs[i][t]) for i in range(B) for t in range(T) if mask[i, t]]
    for i, t in product(range(B), range(T)):
        expected = min(math.exp(logs[i][t]), cap) if mask[i, t] else 0.0
        assert weights[i, t].item() == pytest.approx(expected, rel=1e-12)
    assert not weights.requires_grad
    assert stats["rollout_is/mean"].item() == pytest.approx(sum(raws) / len(raws), rel=1e-12)
    assert stats["rollout_is/max"].item() == pytest.approx(max(raws), rel=1e-12)
    assert stats["rollout_is/min"].item() == pytest.approx(min(raws), rel=1e-12)
    assert stats["rollout_is/truncated_frac"].item() == pytest.approx(sum(r > cap for r in raws) / len(raws))
    assert 0 < stats["rollout_is/truncated_frac"] < 1

    keep, rstats = rollout_rejection_mask(trainer, sampler, mask, low=0.7, high=1.4, level=level)
    for i, t in product(range(B), range(T)):
        assert bool(keep[i, t]) == (bool(mask[i, t]) and 0.7 <= math.exp(logs[i][t]) <= 1.4)
    assert rstats["rollout_is/rejected_frac"].item() == pytest.approx(
        sum(not (0.7 <= r <= 1.4) for r in raws) / len(raws))
    if level != "token":  # a completion is kept or dropped whole
        for i in range(B):
            assert len({bool(keep[i, t]) for t in range(T) if mask[i, t]}) <= 1


def test_rollout_weights_of_huge_ratios_stay_finite():
    mask = torch.ones(1, 3, dtype=torch.bool)
    weights, stats = rollout_importance_weights(torch.zeros(1, 3), torch.full((1, 3), -500.0), mask,
                                                cap=2.0, level="sequence")
    assert torch.equal(weights, torch.full((1, 3), 2.0)) and torch.isfinite(stats["rollout_is/max"])
    with pytest.raises(ValueError, match="cap"):
        rollout_importance_weights(torch.zeros(1, 3), torch.zeros(1, 3), mask, cap=0.0)
    with pytest.raises(ValueError, match="low <= high"):
        rollout_rejection_mask(torch.zeros(1, 3), torch.zeros(1, 3), mask, low=2.0, high=1.0)


@pytest.mark.parametrize("is_level,rs_level", [("token", "none"), ("none", "sequence"), ("geometric", "token"),
                                               ("sequence", "geometric")])
def test_rollout_correction_is_the_product_of_its_factors(is_level, rs_level):
    """w = token_weights * min(exp(log-ratio at is_level), cap) * 1[band at rs_level], token by
    token, and the stats are the means over loss tokens; in policy_loss, the gradient of each
    token is scaled by exactly that w."""
    logp, old_logp, _, entropy_weights, adv, mask = random_batch(13)
    trainer = old_logp.nan_to_num(0.0)
    sampler = trainer + 0.4 * torch.randn(B, T, generator=torch.Generator().manual_seed(4), dtype=DTYPE)
    spec = CorrectionSpec(is_level=is_level, is_cap=1.3, rs_level=rs_level, rs_low=0.6, rs_high=1.6)
    weights, stats = rollout_correction(trainer, sampler, mask, entropy_weights, spec)
    lists = trainer.tolist(), sampler.tolist(), mask.tolist()
    is_logs = naive_log_weights(*lists, is_level) if is_level != "none" else None
    rs_logs = naive_log_weights(*lists, rs_level) if rs_level != "none" else None
    loss_tokens = [(i, t) for i in range(B) for t in range(T) if mask[i, t]]
    for i, t in product(range(B), range(T)):
        expected = float(entropy_weights[i, t]) if mask[i, t] else 0.0
        if is_logs:
            expected *= min(math.exp(is_logs[i][t]), 1.3)
        if rs_logs:
            expected *= 0.6 <= math.exp(rs_logs[i][t]) <= 1.6
        assert weights[i, t].item() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    if is_logs:
        raws = [math.exp(is_logs[i][t]) for i, t in loss_tokens]
        assert stats["rollout_is/mean"].item() == pytest.approx(sum(raws) / len(raws), rel=1e-12)
        assert stats["rollout_is/truncated_frac"].item() == pytest.approx(sum(r > 1.3 for r in raws) / len(raws))
    if rs_logs:
        raws = [math.exp(rs_logs[i][t]) for i, t in loss_tokens]
        assert stats["rollout_rs/rejected_frac"].item() == pytest.approx(
            sum(not 0.6 <= r <= 1.6 for r in raws) / len(raws))
    assert set(stats) == ({"rollout_is/mean", "rollout_is/truncated_frac"} if is_logs else set()) | (
        {"rollout_rs/rejected_frac"} if rs_logs else set())
    assert not torch.allclose(weights, entropy_weights * mask)  # the correction acts


def test_rollout_correction_off_is_the_identity_and_needs_the_sampler():
    logp, old_logp, _, weights, _, mask = random_batch(14)
    assert rollout_correction(old_logp, None, mask, weights) == (weights, {})
    assert rollout_correction(old_logp, None, mask) == (None, {})
    with pytest.raises(ValueError, match="sampler"):
        rollout_correction(old_logp, None, mask, spec=CorrectionSpec(is_level="token"))
    with pytest.raises(ValueError, match="importance-sampling level"):
        rollout_correction(old_logp, old_logp, mask, spec=CorrectionSpec(is_level="tokens"))


# ----------------------------------------------------------------------------------------
# A reference that follows the policy
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_follow_policy_mixes_each_tensor(alpha):
    from grpo.algorithm import follow_policy_

    g = torch.Generator().manual_seed(0)
    ref = [torch.randn(3, 2, generator=g, dtype=DTYPE), torch.randn(4, generator=g, dtype=DTYPE)]
    policy = [torch.randn(3, 2, generator=g, dtype=DTYPE), torch.randn(4, generator=g, dtype=DTYPE)]
    before = [r.clone() for r in ref]
    follow_policy_(ref, policy, alpha)
    for r, b, p in zip(ref, before, policy):
        for x, y, z in zip(r.flatten().tolist(), b.flatten().tolist(), p.flatten().tolist()):
            assert x == pytest.approx(alpha * z + (1 - alpha) * y, rel=1e-12)
    with pytest.raises(ValueError, match="alpha"):
        follow_policy_(ref, policy, 0.0)
    with pytest.raises(ValueError):
        follow_policy_(ref, policy[:1], 0.5)  # unpaired tensors are an error, not a silent partial update
